//! CARv1 slices as carried in `#commit.blocks`: header, then `varint | CID | data` sections.
//! Blocks are borrowed from the frame; a block is hash-checked against its CID when used.
//!
//! Written in-house (about 100 lines) rather than taking atrium-repo's reader: that crate
//! pulls a second serde_ipld_dagcbor and an async reader API, and the firehose only ever
//! holds a CAR slice that is already in memory.

use std::collections::HashMap;

use cid::Cid;
use sha2::{Digest, Sha256};

use super::fixture::decode_varint;

/// Multihash code of sha2-256, the only hash atproto uses for records.
const SHA2_256: u64 = 0x12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CarError {
    #[error("CAR header: {0}")]
    Header(String),
    #[error("CAR section at byte {0} is truncated")]
    Truncated(usize),
    #[error("CAR section at byte {0} has a bad CID: {1}")]
    BadCid(usize, String),
}

/// Why a block could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// No block with that CID in the CAR.
    Missing,
    /// The block's bytes do not hash to its CID.
    Mismatch,
}

#[derive(serde::Deserialize)]
struct CarHeader {
    version: u64,
    roots: Vec<Cid>,
}

/// CARs of more blocks than this are indexed by CID; smaller ones are searched in order. A
/// commit's CAR holds a dozen blocks: comparing a dozen CIDs costs less than hashing them into
/// a map (and allocating it), and it is done twice per commit (decoder, verifier).
const INDEX_ABOVE_BLOCKS: usize = 32;

/// The blocks of one CAR slice, in file order, indexed by CID when there are many (a lookup
/// stays cheap: a commit with many ops never scans its blocks once per op).
#[derive(Debug, Default)]
pub struct Car<'a> {
    roots: Vec<Cid>,
    blocks: Vec<(Cid, &'a [u8])>,
    /// CID → position in `blocks` of its first section (a repeated CID keeps the first);
    /// only past `INDEX_ABOVE_BLOCKS` blocks.
    index: Option<HashMap<Cid, usize>>,
}

impl<'a> Car<'a> {
    /// Parses the whole slice. An empty slice is an empty CAR (`tooBig` commits carry none).
    pub fn parse(buf: &'a [u8]) -> Result<Self, CarError> {
        if buf.is_empty() {
            return Ok(Self::default());
        }
        let (hlen, used) =
            decode_varint(buf).ok_or_else(|| CarError::Header("bad length".into()))?;
        let hend = usize::try_from(hlen)
            .ok()
            .and_then(|l| used.checked_add(l))
            .filter(|&e| e <= buf.len())
            .ok_or_else(|| CarError::Header("truncated".into()))?;
        let header: CarHeader = serde_ipld_dagcbor::from_slice(&buf[used..hend])
            .map_err(|e| CarError::Header(e.to_string()))?;
        if header.version != 1 {
            return Err(CarError::Header(format!("version {}", header.version)));
        }
        let mut blocks = Vec::with_capacity(8);
        let mut pos = hend;
        while pos < buf.len() {
            let (len, used) = decode_varint(&buf[pos..]).ok_or(CarError::Truncated(pos))?;
            let start = pos + used;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|&e| e <= buf.len())
                .ok_or(CarError::Truncated(pos))?;
            let mut section = &buf[start..end];
            let cid =
                Cid::read_bytes(&mut section).map_err(|e| CarError::BadCid(pos, e.to_string()))?;
            blocks.push((cid, section));
            pos = end;
        }
        let index = (blocks.len() > INDEX_ABOVE_BLOCKS).then(|| {
            let mut index = HashMap::with_capacity(blocks.len());
            for (i, (cid, _)) in blocks.iter().enumerate() {
                index.entry(*cid).or_insert(i);
            }
            index
        });
        Ok(Self {
            roots: header.roots,
            blocks,
            index,
        })
    }

    /// The header's roots (a commit CAR names its signed commit).
    pub fn roots(&self) -> &[Cid] {
        &self.roots
    }

    /// Every block in file order, not hash-checked.
    pub fn blocks(&self) -> &[(Cid, &'a [u8])] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Distinct CIDs among the blocks.
    pub fn distinct(&self) -> usize {
        match &self.index {
            Some(index) => index.len(),
            None => (0..self.blocks.len())
                .filter(|&i| self.first(&self.blocks[i].0) == Some(i))
                .count(),
        }
    }

    /// Position of the first block named `cid`.
    fn first(&self, cid: &Cid) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(cid).copied(),
            None => self.blocks.iter().position(|(c, _)| c == cid),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The bytes of block `cid`, not hash-checked (for size checks before any hashing).
    pub fn get(&self, cid: &Cid) -> Option<&'a [u8]> {
        self.first(cid)
            .and_then(|i| self.blocks.get(i))
            .map(|&(_, data)| data)
    }

    /// The bytes of block `cid`, checked to hash to it.
    pub fn get_verified(&self, cid: &Cid) -> Result<&'a [u8], BlockError> {
        let data = self.get(cid).ok_or(BlockError::Missing)?;
        if verify(cid, data) {
            Ok(data)
        } else {
            Err(BlockError::Mismatch)
        }
    }
}

/// True when `data` hashes to `cid` (sha2-256 only).
pub fn verify(cid: &Cid, data: &[u8]) -> bool {
    let mh = cid.hash();
    mh.code() == SHA2_256 && mh.digest() == Sha256::digest(data).as_slice()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::firehose::fixture::encode_varint;
    use cid::multihash::Multihash;

    /// DAG-CBOR codec code.
    const DAG_CBOR: u64 = 0x71;

    pub fn cid_of(data: &[u8]) -> Cid {
        let digest = Sha256::digest(data);
        Cid::new_v1(DAG_CBOR, Multihash::wrap(SHA2_256, &digest).unwrap())
    }

    /// Builds a CAR slice holding `blocks`.
    pub fn build(blocks: &[(Cid, &[u8])]) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct H {
            roots: Vec<Cid>,
            version: u64,
        }
        let header = serde_ipld_dagcbor::to_vec(&H {
            roots: blocks.iter().take(1).map(|b| b.0).collect(),
            version: 1,
        })
        .unwrap();
        let mut out = Vec::new();
        encode_varint(header.len() as u64, &mut out);
        out.extend_from_slice(&header);
        for (cid, data) in blocks {
            let c = cid.to_bytes();
            encode_varint((c.len() + data.len()) as u64, &mut out);
            out.extend_from_slice(&c);
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn parses_and_verifies() {
        let a: &[u8] = b"\xa1\x61a\x01";
        let b: &[u8] = b"\xa1\x61b\x02";
        let car = build(&[(cid_of(a), a), (cid_of(b), b)]);
        let parsed = Car::parse(&car).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed.get_verified(&cid_of(b)), Ok(b));
        assert_eq!(
            parsed.get_verified(&cid_of(b"zz")),
            Err(BlockError::Missing)
        );
        // A block stored under the wrong CID is reported, not trusted.
        let bad = build(&[(cid_of(a), b)]);
        assert_eq!(
            Car::parse(&bad).unwrap().get_verified(&cid_of(a)),
            Err(BlockError::Mismatch)
        );
    }

    #[test]
    fn small_and_indexed_cars_find_the_same_first_copies() {
        // Blocks 0..n, each listed twice (the second copy under the same CID, other bytes):
        // below and above the index threshold, a lookup gives the first copy.
        for n in [3usize, INDEX_ABOVE_BLOCKS / 2, INDEX_ABOVE_BLOCKS / 2 + 1] {
            let datas: Vec<Vec<u8>> = (0..n).map(|i| format!("block {i}").into_bytes()).collect();
            let mut list: Vec<(Cid, &[u8])> = Vec::new();
            for d in &datas {
                list.push((cid_of(d), d.as_slice()));
            }
            for d in &datas {
                list.push((cid_of(d), b"a later copy".as_slice()));
            }
            let car = build(&list);
            let parsed = Car::parse(&car).unwrap();
            assert_eq!(parsed.index.is_some(), 2 * n > INDEX_ABOVE_BLOCKS, "{n}");
            assert_eq!((parsed.len(), parsed.distinct()), (2 * n, n));
            for d in &datas {
                assert_eq!(parsed.get_verified(&cid_of(d)), Ok(d.as_slice()));
            }
            assert_eq!(parsed.get(&cid_of(b"absent")), None);
        }
    }

    #[test]
    fn truncated_car_is_an_error() {
        let a: &[u8] = b"\xa1\x61a\x01";
        let car = build(&[(cid_of(a), a)]);
        for cut in [3, car.len() - 5, car.len() - 1] {
            assert!(Car::parse(&car[..cut]).is_err(), "cut at {cut}");
        }
        assert!(Car::parse(&[]).unwrap().is_empty());
    }
}
