//! The blocks of a CAR indexed by CID, each hash-checked when first used. A firehose CAR
//! slice holds a dozen blocks, a `getRepo` CAR tens of thousands: the firehose
//! [`Car`](crate::firehose::car::Car) keeps a list (linear lookup is fastest for a dozen),
//! this keeps a hash map.

use std::collections::HashMap;

use cid::Cid;

use super::error::VerifyError;
use crate::firehose::car::{self, Car};

/// A CAR's blocks by CID, borrowed from the CAR buffer.
#[derive(Debug, Default)]
pub struct Blocks<'a> {
    roots: Vec<Cid>,
    map: HashMap<Cid, &'a [u8]>,
}

impl<'a> Blocks<'a> {
    /// Parses a CARv1 buffer (header, then blocks). A block listed twice keeps its first copy.
    pub fn parse(buf: &'a [u8]) -> Result<Self, VerifyError> {
        let car = Car::parse(buf).map_err(|e| VerifyError::BadCar(e.to_string()))?;
        let mut map = HashMap::with_capacity(car.len());
        for (cid, data) in car.blocks() {
            map.entry(*cid).or_insert(*data);
        }
        Ok(Self {
            roots: car.roots().to_vec(),
            map,
        })
    }

    /// The header's only root, if it names exactly one.
    pub fn root(&self) -> Option<Cid> {
        match self.roots.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Block `cid`, checked to hash to it.
    pub fn get(&self, cid: &Cid) -> Result<&'a [u8], VerifyError> {
        let data = *self.map.get(cid).ok_or(VerifyError::MissingBlock(*cid))?;
        if car::verify(cid, data) {
            Ok(data)
        } else {
            Err(VerifyError::BlockMismatch(*cid))
        }
    }

    /// Whether block `cid` is present (not hash-checked).
    pub fn contains(&self, cid: &Cid) -> bool {
        self.map.contains_key(cid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firehose::car::tests::{build, cid_of};

    #[test]
    fn indexes_and_checks_blocks() {
        let a: &[u8] = b"\xa1\x61a\x01";
        let b: &[u8] = b"\xa1\x61b\x02";
        let car = build(&[(cid_of(a), a), (cid_of(b), a)]);
        let blocks = Blocks::parse(&car).expect("parses");
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks.root(), Some(cid_of(a)));
        assert_eq!(blocks.get(&cid_of(a)), Ok(a));
        assert_eq!(
            blocks.get(&cid_of(b)),
            Err(VerifyError::BlockMismatch(cid_of(b)))
        );
        assert_eq!(
            blocks.get(&cid_of(b"x")),
            Err(VerifyError::MissingBlock(cid_of(b"x")))
        );
        assert!(matches!(
            Blocks::parse(&car[..car.len() - 1]),
            Err(VerifyError::BadCar(_))
        ));
    }
}
