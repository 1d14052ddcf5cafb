//! Merkle Search Tree nodes as stored in a repo: the DAG-CBOR node
//! `{l: CID|null, e: [{p: prefix len, k: key suffix, v: record CID, t: CID|null}]}`, key
//! heights (leading zero 2-bit groups of sha256(key)), and CIDs of encoded nodes.
//!
//! Written here rather than taken from a crate: `atrium-repo` decodes MSTs but cannot invert
//! ops on a partial tree, is async over a block store and pulls a second
//! `serde_ipld_dagcbor`; `jacquard-repo` has `validate_v1_1` but comes with the whole jacquard
//! API stack (jacquard-common, iroh-car, ed25519-dalek, miette, tokio stores) and ignores an
//! op whose inversion errors; `rsky-repo` links libsecp256k1 (C) and its own crate family.
//! A node codec plus partial-tree insert/remove ([`super::tree`]) is a few hundred lines on
//! the dependencies we already have, synchronous and allocation-light.

use cid::multihash::Multihash;
use cid::Cid;
use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::VerifyError;

/// DAG-CBOR multicodec.
const DAG_CBOR: u64 = 0x71;
/// sha2-256 multihash code.
const SHA2_256: u64 = 0x12;
/// Longest MST key accepted (a repo path `collection/rkey`: NSID ≤ 317 + `/` + rkey ≤ 512).
pub const MAX_KEY_BYTES: usize = 1024;
/// Most entries accepted in one node. Real nodes hold a few dozen (fanout 4 on average);
/// the cap bounds the work one forged node can cause.
pub const MAX_NODE_ENTRIES: usize = 4096;

/// One decoded MST node with its keys expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeData {
    /// Subtree of keys before the first entry.
    pub left: Option<Cid>,
    pub entries: Vec<EntryData>,
}

/// One key of a node and the subtree to its right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryData {
    pub key: Vec<u8>,
    pub value: Cid,
    pub right: Option<Cid>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(deny_unknown_fields)]
struct WireNode<'a> {
    #[serde(borrow)]
    e: Vec<WireEntry<'a>>,
    l: Option<Cid>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
#[serde(deny_unknown_fields)]
struct WireEntry<'a> {
    #[serde(with = "serde_bytes", borrow)]
    k: &'a [u8],
    p: usize,
    t: Option<Cid>,
    v: Cid,
}

/// Height of a key: the number of leading zero 2-bit groups of sha256(key) (fanout 4).
pub fn key_height(key: &[u8]) -> u8 {
    let digest = Sha256::digest(key);
    let mut zeros = 0u32;
    for &b in digest.iter() {
        zeros += b.leading_zeros();
        if b != 0 {
            break;
        }
    }
    // At most 256 / 2 = 128.
    u8::try_from(zeros / 2).unwrap_or(u8::MAX)
}

/// CIDv1 (DAG-CBOR, sha2-256) of `bytes`.
pub fn cid_for(bytes: &[u8]) -> Cid {
    let digest = Sha256::digest(bytes);
    // A 32-byte digest always fits the 64-byte multihash.
    let mh = Multihash::<64>::wrap(SHA2_256, &digest).unwrap_or_default();
    Cid::new_v1(DAG_CBOR, mh)
}

/// Decodes a node block, expanding prefix-compressed keys. Keys must be strictly ascending.
pub fn decode_node(bytes: &[u8]) -> Result<NodeData, VerifyError> {
    let bad = |why: String| VerifyError::BadMst(why);
    let wire: WireNode =
        serde_ipld_dagcbor::from_slice(bytes).map_err(|e| bad(format!("decode: {e}")))?;
    if wire.e.len() > MAX_NODE_ENTRIES {
        return Err(bad(format!("{} entries", wire.e.len())));
    }
    let mut entries: Vec<EntryData> = Vec::with_capacity(wire.e.len());
    for (i, e) in wire.e.iter().enumerate() {
        let prev = entries.last().map(|p| p.key.as_slice()).unwrap_or_default();
        if i == 0 && e.p != 0 {
            return Err(bad("first entry with a prefix".into()));
        }
        if e.p > prev.len() || e.p + e.k.len() > MAX_KEY_BYTES {
            return Err(bad(format!("entry {i}: bad prefix or key length")));
        }
        let mut key = Vec::with_capacity(e.p + e.k.len());
        key.extend_from_slice(&prev[..e.p]);
        key.extend_from_slice(e.k);
        if key.is_empty() || (i > 0 && key.as_slice() <= prev) {
            return Err(bad(format!("entry {i}: key empty or out of order")));
        }
        entries.push(EntryData {
            key,
            value: e.v,
            right: e.t,
        });
    }
    Ok(NodeData {
        left: wire.l,
        entries,
    })
}

/// Encodes a node canonically (keys prefix-compressed against the previous key).
pub fn encode_node(node: &NodeData) -> Result<Vec<u8>, VerifyError> {
    let entries = node
        .entries
        .iter()
        .map(|e| (e.key.as_slice(), &e.value, e.right.as_ref()));
    write_node(node.left.as_ref(), node.entries.len(), entries)
}

/// Encodes a node from borrowed parts: `left`, then `len` entries of (key, value, right).
///
/// The DAG-CBOR is written directly (the serde encoder spent a third of an inversion):
/// `{e: [{k, p, t, v}, …], l}` with map keys in canonical order (all one byte long, so
/// bytewise), shortest-form lengths and integers, CIDs as tag 42 over `0x00 ‖ CID bytes`.
/// `tests::encoder_matches_serde_*` check it byte for byte against the serde encoding.
pub fn write_node<'a>(
    left: Option<&Cid>,
    len: usize,
    entries: impl Iterator<Item = (&'a [u8], &'a Cid, Option<&'a Cid>)>,
) -> Result<Vec<u8>, VerifyError> {
    // A typical entry: ~20 key bytes + a 36-byte CID (+ a subtree link) + field names.
    let mut out = Vec::with_capacity(16 + len * 72);
    out.push(0xa2);
    out.extend_from_slice(b"\x61e");
    cbor_head(&mut out, 4, len as u64);
    let mut prev: &[u8] = &[];
    let mut written = 0usize;
    for (key, value, right) in entries {
        let p = common_prefix_len(prev, key);
        let suffix = key.get(p..).unwrap_or_default();
        out.push(0xa4);
        out.extend_from_slice(b"\x61k");
        cbor_head(&mut out, 2, suffix.len() as u64);
        out.extend_from_slice(suffix);
        out.extend_from_slice(b"\x61p");
        cbor_head(&mut out, 0, p as u64);
        out.extend_from_slice(b"\x61t");
        write_opt_cid(&mut out, right)?;
        out.extend_from_slice(b"\x61v");
        write_cid(&mut out, value)?;
        prev = key;
        written += 1;
    }
    if written != len {
        return Err(VerifyError::BadMst(format!(
            "encode: {written} entries, {len} announced"
        )));
    }
    out.extend_from_slice(b"\x61l");
    write_opt_cid(&mut out, left)?;
    Ok(out)
}

/// A CBOR item head: major type and its argument in the shortest form.
fn cbor_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// A CID link: tag 42, a byte string of the identity multibase prefix 0x00 and the CID.
fn write_cid(out: &mut Vec<u8>, cid: &Cid) -> Result<(), VerifyError> {
    out.extend_from_slice(&[0xd8, 42]);
    cbor_head(out, 2, cid.encoded_len() as u64 + 1);
    out.push(0);
    cid.write_bytes(&mut *out)
        .map_err(|e| VerifyError::BadMst(format!("encode: {e}")))?;
    Ok(())
}

fn write_opt_cid(out: &mut Vec<u8>, cid: Option<&Cid>) -> Result<(), VerifyError> {
    match cid {
        Some(cid) => write_cid(out, cid),
        None => {
            out.push(0xf6);
            Ok(())
        }
    }
}

/// Length of the common prefix of two keys (interop `common_prefix.json`).
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sync::didkey::tests::interop;

    #[test]
    fn interop_key_heights() {
        let v = interop("mst/key_heights.json");
        let cases = v.as_array().expect("array");
        assert!(cases.len() >= 9);
        for case in cases {
            let key = case["key"].as_str().expect("key");
            let height = case["height"].as_u64().expect("height");
            assert_eq!(u64::from(key_height(key.as_bytes())), height, "{key}");
        }
    }

    #[test]
    fn interop_common_prefix() {
        let v = interop("mst/common_prefix.json");
        for case in v.as_array().expect("array") {
            let (l, r) = (case["left"].as_str(), case["right"].as_str());
            let (l, r) = (l.expect("left"), r.expect("right"));
            let len = case["len"].as_u64().expect("len");
            assert_eq!(common_prefix_len(l.as_bytes(), r.as_bytes()) as u64, len);
        }
    }

    #[test]
    fn node_round_trips_with_prefix_compression() {
        let leaf = cid_for(b"leaf");
        let node = NodeData {
            left: Some(cid_for(b"left")),
            entries: vec![
                EntryData {
                    key: b"app.bsky.feed.post/3aaa".to_vec(),
                    value: leaf,
                    right: None,
                },
                EntryData {
                    key: b"app.bsky.feed.post/3aab".to_vec(),
                    value: leaf,
                    right: Some(cid_for(b"right")),
                },
            ],
        };
        let bytes = encode_node(&node).expect("encodes");
        assert_eq!(decode_node(&bytes).expect("decodes"), node);
        // The empty node is the root of an empty repo: {e: [], l: null}.
        let empty = encode_node(&NodeData {
            left: None,
            entries: vec![],
        })
        .expect("encodes");
        assert_eq!(empty, b"\xa2\x61e\x80\x61l\xf6");
    }

    /// The serde encoding the hand-written encoder replaced: the reference it must match.
    pub(crate) fn serde_encode(node: &NodeData) -> Vec<u8> {
        let mut e = Vec::new();
        let mut prev: &[u8] = &[];
        for entry in &node.entries {
            let p = common_prefix_len(prev, &entry.key);
            e.push(WireEntry {
                k: &entry.key[p..],
                p,
                t: entry.right,
                v: entry.value,
            });
            prev = &entry.key;
        }
        serde_ipld_dagcbor::to_vec(&WireNode { e, l: node.left }).expect("serde encodes")
    }

    /// Every MST node block in the commits of `snap.frames` (real PDS output).
    fn fixture_nodes() -> Vec<Vec<u8>> {
        use crate::firehose::fixture::{self, FrameReader, RawFrame};
        use crate::firehose::{frame, EventKind};
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/firehose/snap.frames");
        let reader = fixture::open(&path).expect("snap.frames");
        let mut nodes = Vec::new();
        for raw in FrameReader::new(reader, frame::DEFAULT_MAX_FRAME_BYTES) {
            let RawFrame::Message(msg) = raw.expect("frame") else {
                continue;
            };
            let Ok(decoded) = frame::decode(&msg) else {
                continue;
            };
            if let EventKind::Commit(c) = decoded.event.kind {
                let car = crate::firehose::car::Car::parse(&c.blocks).expect("car");
                for (_, data) in car.blocks() {
                    if decode_node(data).is_ok() {
                        nodes.push(data.to_vec());
                    }
                }
            }
        }
        nodes
    }

    #[test]
    fn encoder_matches_serde_on_fixture_nodes() {
        let nodes = fixture_nodes();
        assert!(nodes.len() > 1000, "{} nodes", nodes.len());
        for bytes in &nodes {
            let node = decode_node(bytes).expect("decodes");
            let ours = encode_node(&node).expect("encodes");
            assert_eq!(ours, serde_encode(&node));
            // Canonical PDS output re-encodes to itself.
            assert_eq!(&ours, bytes);
        }
    }

    #[test]
    fn encoder_matches_serde_on_edge_lengths() {
        // Keys, prefixes and entry counts across every CBOR length form (direct, 1 and 2
        // bytes), CIDs of other codecs and hash lengths, subtrees or not.
        let raw = Cid::new_v1(0x55, Multihash::<64>::wrap(0x12, &[7; 32]).expect("mh"));
        let short = Cid::new_v1(DAG_CBOR, Multihash::<64>::wrap(0x00, b"id").expect("mh"));
        for (n, key_len) in [(0, 1), (1, 23), (3, 24), (24, 255), (30, 300), (300, 20)] {
            let entries: Vec<EntryData> = (0..n)
                .map(|i: usize| EntryData {
                    key: format!("{:0>key_len$}", format!("{i:05}")).into_bytes(),
                    value: [cid_for(b"v"), raw, short][i % 3],
                    right: (i % 2 == 0).then(|| cid_for(&i.to_be_bytes())),
                })
                .collect();
            for left in [None, Some(raw)] {
                let node = NodeData {
                    left,
                    entries: entries.clone(),
                };
                assert_eq!(encode_node(&node).expect("encodes"), serde_encode(&node));
            }
        }
    }

    proptest::proptest! {
        /// Random nodes (keys over a 3-letter alphabet, so that prefixes are shared, up to 300
        /// bytes; random subtrees) encode as serde encodes them.
        #[test]
        fn encoder_matches_serde_on_random_nodes(
            left in proptest::option::of(proptest::collection::vec(0u8..=255, 0..8)),
            entries in proptest::collection::vec(
                (
                    proptest::collection::vec(0u8..3, 0..300),
                    proptest::collection::vec(0u8..=255, 0..8),
                    proptest::option::of(0u8..=255),
                ),
                0..40,
            ),
        ) {
            let entries = entries
                .into_iter()
                .map(|(key, value, right)| EntryData {
                    key,
                    value: cid_for(&value),
                    right: right.map(|r| cid_for(&[r])),
                })
                .collect();
            let node = NodeData {
                left: left.map(|l| cid_for(&l)),
                entries,
            };
            proptest::prop_assert_eq!(encode_node(&node).expect("encodes"), serde_encode(&node));
        }
    }

    #[test]
    fn malformed_nodes_are_errors() {
        let leaf = cid_for(b"leaf");
        let unordered = NodeData {
            left: None,
            entries: vec![
                EntryData {
                    key: b"b/2".to_vec(),
                    value: leaf,
                    right: None,
                },
                EntryData {
                    key: b"a/1".to_vec(),
                    value: leaf,
                    right: None,
                },
            ],
        };
        let bytes = encode_node(&unordered).expect("encodes");
        assert!(matches!(decode_node(&bytes), Err(VerifyError::BadMst(_))));
        for junk in [&b""[..], b"\xa0", b"\x80", b"\xa2\x61e\x80\x61x\xf6"] {
            assert!(decode_node(junk).is_err());
        }
    }
}
