//! Re-encoding real fixture frames: a frame's body as a DAG-CBOR map, its CAR as blocks, and
//! records replaced with a correct CID. Hostile and tampered inputs are built from real frames
//! with these helpers, never from hand-written bytes.

use std::collections::BTreeMap;

use cid::Cid;
use ipld_core::ipld::Ipld;

use atproto_ingest::firehose::car::Car;
use atproto_ingest::firehose::cbor::item_len;
use atproto_ingest::firehose::fixture::{encode_varint, FrameWriter};
use atproto_ingest::sync::mst::cid_for;

/// A frame split into its header bytes and its body as a DAG-CBOR map.
#[derive(Clone)]
pub struct Frame {
    pub header: Vec<u8>,
    pub body: BTreeMap<String, Ipld>,
}

impl Frame {
    pub fn parse(msg: &[u8]) -> Self {
        let hlen = item_len(msg).unwrap();
        let Ipld::Map(body) = serde_ipld_dagcbor::from_slice(&msg[hlen..]).unwrap() else {
            panic!("body is not a map");
        };
        Self {
            header: msg[..hlen].to_vec(),
            body,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.header.clone();
        out.extend(serde_ipld_dagcbor::to_vec(&Ipld::Map(self.body.clone())).unwrap());
        out
    }

    pub fn bytes(&self, field: &str) -> Vec<u8> {
        match &self.body[field] {
            Ipld::Bytes(b) => b.clone(),
            other => panic!("{field}: {other:?}"),
        }
    }

    pub fn seq(&self) -> i64 {
        match self.body.get("seq") {
            Some(Ipld::Integer(i)) => *i as i64,
            other => panic!("seq: {other:?}"),
        }
    }

    pub fn set_seq(&mut self, seq: i64) {
        self.body.insert("seq".into(), Ipld::Integer(seq.into()));
    }

    /// The CAR's roots and blocks.
    pub fn car(&self) -> (Vec<Cid>, Vec<(Cid, Vec<u8>)>) {
        let buf = self.bytes("blocks");
        let car = Car::parse(&buf).unwrap();
        let blocks = car.blocks().iter().map(|(c, d)| (*c, d.to_vec())).collect();
        (car.roots().to_vec(), blocks)
    }

    pub fn set_car(&mut self, roots: &[Cid], blocks: &[(Cid, Vec<u8>)]) {
        self.body
            .insert("blocks".into(), Ipld::Bytes(car_bytes(roots, blocks)));
    }

    /// The ops as DAG-CBOR maps.
    pub fn ops(&self) -> Vec<BTreeMap<String, Ipld>> {
        let Some(Ipld::List(ops)) = self.body.get("ops") else {
            panic!("ops");
        };
        ops.iter()
            .map(|o| match o {
                Ipld::Map(m) => m.clone(),
                other => panic!("op: {other:?}"),
            })
            .collect()
    }

    pub fn set_ops(&mut self, ops: Vec<BTreeMap<String, Ipld>>) {
        self.body.insert(
            "ops".into(),
            Ipld::List(ops.into_iter().map(Ipld::Map).collect()),
        );
    }

    /// The record of op `i` as a DAG-CBOR map.
    pub fn record(&self, i: usize) -> BTreeMap<String, Ipld> {
        let Some(Ipld::Link(cid)) = self.ops()[i].get("cid").cloned() else {
            panic!("op {i} has no record");
        };
        let (_, blocks) = self.car();
        let block = &blocks.iter().find(|(c, _)| *c == cid).unwrap().1;
        let Ipld::Map(record) = serde_ipld_dagcbor::from_slice(block).unwrap() else {
            panic!("record is not a map");
        };
        record
    }

    /// Replaces op `i`'s record with `record`, re-encoded under its correct CID (the old block
    /// stays in the CAR, as an unused block). The commit's signed MST no longer proves it.
    pub fn set_record(&mut self, i: usize, record: BTreeMap<String, Ipld>) -> Cid {
        let (cid, bytes) = reencode(&Ipld::Map(record));
        let (roots, mut blocks) = self.car();
        blocks.push((cid, bytes));
        self.set_car(&roots, &blocks);
        let mut ops = self.ops();
        ops[i].insert("cid".into(), Ipld::Link(cid));
        self.set_ops(ops);
        cid
    }
}

/// A CAR v1 of `roots` and `blocks`, in that order.
pub fn car_bytes(roots: &[Cid], blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Header<'a> {
        roots: &'a [Cid],
        version: u64,
    }
    let header = serde_ipld_dagcbor::to_vec(&Header { roots, version: 1 }).unwrap();
    let mut out = Vec::new();
    encode_varint(header.len() as u64, &mut out);
    out.extend(header);
    for (cid, data) in blocks {
        let c = cid.to_bytes();
        encode_varint((c.len() + data.len()) as u64, &mut out);
        out.extend(c);
        out.extend(data);
    }
    out
}

/// DAG-CBOR bytes of `value` and their CID (sha-256, dag-cbor codec).
pub fn reencode(value: &Ipld) -> (Cid, Vec<u8>) {
    let bytes = serde_ipld_dagcbor::to_vec(value).unwrap();
    (cid_for(&bytes), bytes)
}

/// Writes `frames` as a fixture file (length-prefixed) at `path`.
pub fn write_fixture(path: &std::path::Path, frames: &[Vec<u8>]) {
    let mut w = FrameWriter::new(std::io::BufWriter::new(
        std::fs::File::create(path).unwrap(),
    ));
    for f in frames {
        w.write_frame(f).unwrap();
    }
    w.flush().unwrap();
}
