//! Partial-tree tests: the interop commit-proof vectors (tree roots before and after, and
//! inversion from exactly the proof blocks) and order-independence of insert/remove.

use std::collections::HashMap;

use cid::Cid;

use super::*;
use crate::firehose::car::tests::build;
use crate::sync::didkey::tests::interop;
use crate::sync::mst::{encode_node, EntryData, NodeData};

impl Node {
    /// The node in wire form (children's CIDs computed as needed).
    pub(super) fn data(&mut self) -> Result<NodeData, VerifyError> {
        let mut data = NodeData {
            left: None,
            entries: Vec::with_capacity(self.entries.len()),
        };
        for entry in &mut self.entries {
            match entry {
                Entry::Leaf { key, value } => data.entries.push(EntryData {
                    key: key.clone(),
                    value: *value,
                    right: None,
                }),
                Entry::Child(link) => {
                    let cid = link.cid()?;
                    let slot = match data.entries.last_mut() {
                        Some(last) => &mut last.right,
                        None => &mut data.left,
                    };
                    if slot.replace(cid).is_some() {
                        return Err(VerifyError::BadMst("two subtrees in a row".into()));
                    }
                }
            }
        }
        Ok(data)
    }
}

/// Every node of the loaded part of `node`, encoded.
fn collect(node: &mut Node, out: &mut HashMap<Cid, Vec<u8>>) {
    for e in &mut node.entries {
        if let Entry::Child(Link::Loaded(child)) = e {
            collect(child, out);
        }
    }
    let data = node.data().expect("data");
    let bytes = node.bytes().expect("bytes");
    // The in-place encoder, the NodeData encoder and serde agree byte for byte.
    assert_eq!(bytes, encode_node(&data).expect("encode"));
    assert_eq!(bytes, crate::sync::mst::tests::serde_encode(&data));
    out.insert(cid_for(&bytes), bytes);
}

fn blocks_car(blocks: &HashMap<Cid, Vec<u8>>) -> Vec<u8> {
    let list: Vec<(Cid, &[u8])> = blocks.iter().map(|(c, b)| (*c, b.as_slice())).collect();
    build(&list)
}

fn cid(s: &str) -> Cid {
    Cid::try_from(s).expect("cid")
}

fn tree_of<'b, 'a>(blocks: &'b Blocks<'a>, keys: &[String], value: Cid) -> PartialTree<'b, 'a> {
    let mut tree = PartialTree::empty(blocks);
    for k in keys {
        assert_eq!(tree.insert(k.as_bytes(), value).expect("insert"), None);
    }
    tree
}

#[test]
fn interop_commit_proofs() {
    let v = interop("firehose/commit-proof-fixtures.json");
    let cases = v.as_array().expect("array");
    assert!(cases.len() >= 6);
    let none = Blocks::default();
    for case in cases {
        let name = case["comment"].as_str().expect("comment");
        let strs = |f: &str| -> Vec<String> {
            case[f]
                .as_array()
                .expect("list")
                .iter()
                .map(|s| s.as_str().expect("str").to_owned())
                .collect()
        };
        let leaf = cid(case["leafValue"].as_str().expect("leaf"));
        let (keys, adds, dels) = (strs("keys"), strs("adds"), strs("dels"));
        let before = cid(case["rootBeforeCommit"].as_str().expect("before"));
        let after = cid(case["rootAfterCommit"].as_str().expect("after"));

        let mut tree = tree_of(&none, &keys, leaf);
        assert_eq!(tree.root_cid().expect("root"), before, "{name}: before");
        for k in &adds {
            tree.insert(k.as_bytes(), leaf).expect("add");
        }
        for k in &dels {
            assert_eq!(
                tree.remove(k.as_bytes()).expect("del"),
                Some(leaf),
                "{name}"
            );
        }
        assert_eq!(tree.root_cid().expect("root"), after, "{name}: after");

        // Invert from the after-tree using only the proof's blocks.
        let mut all = HashMap::new();
        collect(&mut tree.root, &mut all);
        let proof: HashMap<Cid, Vec<u8>> = strs("blocksInProof")
            .iter()
            .map(|c| {
                let c = cid(c);
                (
                    c,
                    all.get(&c)
                        .cloned()
                        .unwrap_or_else(|| panic!("{name}: {c}")),
                )
            })
            .collect();
        let car = blocks_car(&proof);
        let blocks = Blocks::parse(&car).expect("car");
        let mut partial = PartialTree::load(&blocks, &after).expect("load");
        for k in &adds {
            assert_eq!(
                partial.remove(k.as_bytes()).expect(name),
                Some(leaf),
                "{name}"
            );
        }
        for k in &dels {
            assert_eq!(
                partial.insert(k.as_bytes(), leaf).expect(name),
                None,
                "{name}"
            );
        }
        assert_eq!(
            partial.root_cid().expect("root"),
            before,
            "{name}: inverted"
        );
    }
}

/// A small deterministic generator (xorshift), enough to shuffle keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

#[test]
fn root_is_independent_of_order_and_removal_undoes_insertion() {
    let none = Blocks::default();
    let value = cid_for(b"record");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let keys: Vec<String> = (0..300)
        .map(|i| {
            format!(
                "app.bsky.feed.like/3k{:011x}",
                rng.next() % 1_000_000_000 + i
            )
        })
        .collect();
    let mut shuffled = keys.clone();
    rng.shuffle(&mut shuffled);
    let root = tree_of(&none, &keys, value).root_cid().expect("root");
    assert_eq!(
        tree_of(&none, &shuffled, value).root_cid().expect("root"),
        root
    );

    // Remove a random half from a fully loaded tree: same as building from the rest.
    let mut tree = tree_of(&none, &shuffled, value);
    let (gone, kept) = shuffled.split_at(150);
    for k in gone {
        assert_eq!(tree.remove(k.as_bytes()).expect("remove"), Some(value));
        assert_eq!(tree.remove(k.as_bytes()).expect("again"), None);
    }
    let rest = tree_of(&none, kept, value).root_cid().expect("root");
    assert_eq!(tree.root_cid().expect("root"), rest);

    // The same removals on a tree loaded lazily from its blocks.
    let mut full = tree_of(&none, &keys, value);
    let mut all = HashMap::new();
    collect(&mut full.root, &mut all);
    let car = blocks_car(&all);
    let blocks = Blocks::parse(&car).expect("car");
    let mut lazy = PartialTree::load(&blocks, &root).expect("load");
    for k in gone {
        assert_eq!(lazy.remove(k.as_bytes()).expect("remove"), Some(value));
    }
    assert_eq!(lazy.root_cid().expect("root"), rest);
    for k in gone {
        assert_eq!(lazy.insert(k.as_bytes(), value).expect("insert"), None);
    }
    assert_eq!(lazy.root_cid().expect("root"), root);
    let other = cid_for(b"other");
    assert_eq!(
        lazy.insert(keys[0].as_bytes(), other).expect("update"),
        Some(value)
    );
    assert_ne!(lazy.root_cid().expect("root"), root);
}

#[test]
fn missing_node_is_reported_not_guessed() {
    let none = Blocks::default();
    let value = cid_for(b"record");
    let keys: Vec<String> = (0..64).map(|i| format!("com.example.k/{i:04}")).collect();
    let mut full = tree_of(&none, &keys, value);
    let root = full.root_cid().expect("root");
    let mut all = HashMap::new();
    collect(&mut full.root, &mut all);
    // Only the root block: any op below the root needs a node that is not there.
    let only_root: HashMap<Cid, Vec<u8>> = all.into_iter().filter(|(c, _)| *c == root).collect();
    let car = blocks_car(&only_root);
    let blocks = Blocks::parse(&car).expect("car");
    let mut tree = PartialTree::load(&blocks, &root).expect("root loads");
    let deep = keys
        .iter()
        .find(|k| key_height(k.as_bytes()) < tree.root.height)
        .expect("a key below the root");
    assert!(matches!(
        tree.remove(deep.as_bytes()),
        Err(VerifyError::MissingBlock(_))
    ));
    assert!(matches!(
        PartialTree::load(&none, &root),
        Err(VerifyError::MissingBlock(_))
    ));
}
