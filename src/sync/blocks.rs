//! The blocks of a CAR by CID, each hash-checked when used. Lookups go through the
//! [`Car`](crate::firehose::car::Car)'s own index (a CID → position map built while parsing):
//! nothing is copied into a second map.

use cid::Cid;

use super::error::VerifyError;
use crate::firehose::car::{self, Car};

/// A CAR's blocks by CID, borrowed from the CAR buffer.
#[derive(Debug, Default)]
pub struct Blocks<'a> {
    car: Car<'a>,
}

impl<'a> Blocks<'a> {
    /// Parses a CARv1 buffer (header, then blocks). A block listed twice keeps its first copy.
    pub fn parse(buf: &'a [u8]) -> Result<Self, VerifyError> {
        let car = Car::parse(buf).map_err(|e| VerifyError::BadCar(e.to_string()))?;
        Ok(Self { car })
    }

    /// The header's only root, if it names exactly one.
    pub fn root(&self) -> Option<Cid> {
        match self.car.roots() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Distinct blocks (a CID listed twice counts once).
    pub fn len(&self) -> usize {
        self.car.distinct()
    }

    pub fn is_empty(&self) -> bool {
        self.car.is_empty()
    }

    /// Block `cid`, checked to hash to it.
    pub fn get(&self, cid: &Cid) -> Result<&'a [u8], VerifyError> {
        let data = self.car.get(cid).ok_or(VerifyError::MissingBlock(*cid))?;
        if car::verify(cid, data) {
            Ok(data)
        } else {
            Err(VerifyError::BlockMismatch(*cid))
        }
    }

    /// Whether block `cid` is present (not hash-checked).
    pub fn contains(&self, cid: &Cid) -> bool {
        self.car.get(cid).is_some()
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
