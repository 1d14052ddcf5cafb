//! Sync 1.1 verification on real data: every `#commit` and `#sync` of `snap.frames` verifies
//! with its account's key (from the DID documents' legacy form and from the PLC log's
//! `did:key`), commits chain (`since`/`prevData`), tampered copies re-encoded from real frames
//! fail with the right reason, and every `getRepo` CAR of `snap.network` verifies and holds
//! exactly the account's live records of `snap.truth.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cid::Cid;
use ipld_core::ipld::Ipld;

use crate::common::fixture;
use crate::common::reframe::{reencode, Frame};
use atproto_ingest::firehose::event::{Commit, EventKind};
use atproto_ingest::firehose::fixture::{open, FrameReader, RawFrame};
use atproto_ingest::firehose::frame::{self, DEFAULT_MAX_FRAME_BYTES};
use atproto_ingest::identity::DidDocument;
use atproto_ingest::sync::mst::decode_node;
use atproto_ingest::sync::{
    chains, verify_commit, verify_repo_car, verify_sync, PublicKey, VerifyError,
    DEFAULT_MAX_REPO_CAR_BYTES,
};

fn json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

/// Signing keys per DID from the DID documents (legacy uncompressed secp256k1 form).
fn doc_keys() -> HashMap<String, PublicKey> {
    let docs = json("snap.network/did-docs.json");
    let mut keys = HashMap::new();
    for (did, doc) in docs.as_object().unwrap() {
        let doc = DidDocument::parse(did, doc.to_string().as_bytes()).unwrap();
        let key = PublicKey::parse(doc.signing_key.as_deref().unwrap()).unwrap();
        keys.insert(did.clone(), key);
    }
    keys
}

/// Signing keys per DID from the last PLC operation's `verificationMethods.atproto`.
fn plc_keys() -> HashMap<String, PublicKey> {
    let audit = json("snap.network/plc-audit.json");
    let mut keys = HashMap::new();
    for (did, log) in audit.as_object().unwrap() {
        let last = log.as_array().unwrap().last().unwrap();
        let did_key = last["operation"]["verificationMethods"]["atproto"]
            .as_str()
            .unwrap();
        keys.insert(did.clone(), PublicKey::from_did_key(did_key).unwrap());
    }
    keys
}

fn frames() -> Vec<Vec<u8>> {
    let reader = open(&fixture("snap.frames")).unwrap();
    FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES)
        .map(|f| match f.unwrap() {
            RawFrame::Message(m) => m,
            RawFrame::Oversized { len } => panic!("oversized frame of {len}"),
        })
        .collect()
}

fn decode(msg: &[u8]) -> EventKind {
    frame::decode(msg).unwrap().event.kind
}

#[test]
fn both_key_forms_are_the_same_keys() {
    let (docs, plc) = (doc_keys(), plc_keys());
    assert_eq!(docs.len(), 50);
    assert_eq!(docs, plc);
}

#[test]
fn every_commit_and_sync_verifies_and_commits_chain() {
    let keys = doc_keys();
    // Per repo: (rev, data) of the last verified commit or #sync.
    let mut heads: HashMap<String, (String, Cid)> = HashMap::new();
    let (mut commits, mut syncs, mut chained, mut firsts, mut ops) = (0, 0, 0, 0, 0);
    for msg in frames() {
        match decode(&msg) {
            EventKind::Commit(c) => {
                let key = &keys[&c.repo];
                let v = verify_commit(&c, key)
                    .unwrap_or_else(|e| panic!("{} rev {}: {e}", c.repo, c.rev));
                assert_eq!((v.rev.as_str(), v.commit_cid), (c.rev.as_str(), c.commit));
                match heads.get(&c.repo) {
                    Some((rev, data)) => {
                        assert!(
                            chains(&c, rev, data),
                            "{} rev {} breaks the chain",
                            c.repo,
                            c.rev
                        );
                        chained += 1;
                    }
                    None => {
                        assert_eq!(c.since, None, "first commit of {}", c.repo);
                        firsts += 1;
                    }
                }
                heads.insert(c.repo.clone(), (v.rev, v.data));
                commits += 1;
                ops += c.ops.len();
            }
            EventKind::Sync(s) => {
                let v = verify_sync(&s, &keys[&s.did]).unwrap_or_else(|e| panic!("{}: {e}", s.did));
                // A #sync restates the repo's current commit.
                if let Some((rev, data)) = heads.get(&s.did) {
                    assert_eq!((rev, data), (&v.rev, &v.data), "#sync of {}", s.did);
                }
                heads.insert(s.did.clone(), (v.rev, v.data));
                syncs += 1;
            }
            _ => {}
        }
    }
    let manifest = json("snap.manifest.json");
    assert_eq!(
        commits,
        manifest["event_types"]["#commit"].as_u64().unwrap()
    );
    assert_eq!(syncs, manifest["event_types"]["#sync"].as_u64().unwrap());
    assert_eq!(
        ops as u64,
        manifest["commit_ops"]["total"].as_u64().unwrap()
    );
    // Every commit but each repo's first continues the one before it.
    assert_eq!(chained + firsts, commits);
    assert!(firsts <= 50, "{firsts}");
}

#[test]
fn every_repo_car_verifies_and_equals_the_truth() {
    let keys = doc_keys();
    let truth = json("snap.truth.json");
    let mut expected: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for r in truth["live_records"].as_array().unwrap() {
        let did = r["did"].as_str().unwrap().to_owned();
        let uri = r["uri"].as_str().unwrap().to_owned();
        let cid = r["cid"].as_str().unwrap().to_owned();
        expected.entry(did).or_default().insert((uri, cid));
    }
    let repos = json("snap.network/repos.json");
    let mut verified = 0;
    for (did, answer) in repos.as_object().unwrap() {
        let Some(file) = answer["file"].as_str() else {
            continue;
        };
        let car = std::fs::read(fixture(&format!("snap.network/{file}"))).unwrap();
        let repo = verify_repo_car(&car, did, &keys[did], DEFAULT_MAX_REPO_CAR_BYTES)
            .unwrap_or_else(|e| panic!("{did}: {e}"));
        let got: BTreeSet<(String, String)> = repo
            .records
            .iter()
            .map(|r| {
                (
                    format!("at://{did}/{}/{}", r.collection, r.rkey),
                    r.cid.to_string(),
                )
            })
            .collect();
        assert_eq!(got.len(), repo.records.len(), "{did}: duplicate keys");
        assert_eq!(&got, expected.get(did).unwrap_or(&BTreeSet::new()), "{did}");
        // Too small a cap, another DID or another account's key: refused.
        assert!(matches!(
            verify_repo_car(&car, did, &keys[did], car.len() - 1),
            Err(VerifyError::TooLarge(_))
        ));
        assert!(matches!(
            verify_repo_car(
                &car,
                "did:plc:other",
                &keys[did],
                DEFAULT_MAX_REPO_CAR_BYTES
            ),
            Err(VerifyError::CommitMismatch { field: "did" })
        ));
        let other = keys.iter().find(|(d, _)| *d != did).unwrap().1;
        assert!(matches!(
            verify_repo_car(&car, did, other, DEFAULT_MAX_REPO_CAR_BYTES),
            Err(VerifyError::BadSignature)
        ));
        verified += 1;
    }
    assert_eq!(verified, 48);
}

// ---- tampered copies, re-encoded from real frames ----

fn commit_of(msg: &[u8]) -> Commit {
    match decode(msg) {
        EventKind::Commit(c) => c,
        other => panic!("not a commit: {}", other.type_name()),
    }
}

/// Real commit frames with at least one create op, with their keys.
fn create_commits() -> Vec<(Vec<u8>, PublicKey)> {
    let keys = doc_keys();
    frames()
        .into_iter()
        .filter_map(|msg| match decode(&msg) {
            EventKind::Commit(c) if c.ops.iter().any(|o| o.cid.is_some() && o.prev.is_none()) => {
                let key = keys[&c.repo].clone();
                Some((msg, key))
            }
            _ => None,
        })
        .take(200)
        .collect()
}

#[test]
fn reencoded_frames_still_verify() {
    for (msg, key) in create_commits().iter().take(20) {
        let f = Frame::parse(msg);
        let (roots, blocks) = f.car();
        let mut copy = Frame::parse(msg);
        copy.set_car(&roots, &blocks);
        verify_commit(&commit_of(&copy.encode()), key).unwrap();
    }
}

#[test]
fn altered_commit_block_is_a_bad_signature() {
    let (msg, key) = &create_commits()[5];
    let mut f = Frame::parse(msg);
    let (roots, mut blocks) = f.car();
    let i = blocks.iter().position(|(c, _)| *c == roots[0]).unwrap();
    let Ipld::Map(mut commit) = serde_ipld_dagcbor::from_slice(&blocks[i].1).unwrap() else {
        panic!("commit block");
    };
    // Point the signed commit at the previous tree: plausible, but not what was signed.
    let prev_data = f.body["prevData"].clone();
    commit.insert("data".into(), prev_data);
    let (cid, bytes) = reencode(&Ipld::Map(commit));
    blocks[i] = (cid, bytes);
    f.set_car(&[cid], &blocks);
    f.body.insert("commit".into(), Ipld::Link(cid));
    let err = verify_commit(&commit_of(&f.encode()), key).unwrap_err();
    assert_eq!(err.reason(), "bad_signature", "{err}");
}

#[test]
fn op_not_in_the_signed_tree_is_not_proven() {
    let (msg, key) = &create_commits()[7];
    let mut f = Frame::parse(msg);
    let (roots, mut blocks) = f.car();
    let Ipld::List(mut ops) = f.body["ops"].clone() else {
        panic!("ops");
    };
    let i = ops
        .iter()
        .position(|o| matches!(o, Ipld::Map(m) if m.get("prev").is_none_or(|p| *p == Ipld::Null)))
        .unwrap();
    let Ipld::Map(op) = &mut ops[i] else { panic!() };
    let Some(Ipld::Link(old)) = op.get("cid").cloned() else {
        panic!("create without cid")
    };
    let block = &blocks.iter().find(|(c, _)| *c == old).unwrap().1;
    let Ipld::Map(mut record) = serde_ipld_dagcbor::from_slice(block).unwrap() else {
        panic!("record");
    };
    // A forged record with a correct CID for itself, which the signed MST does not hold.
    record.insert(
        "createdAt".into(),
        Ipld::String("2001-01-01T00:00:00.000Z".into()),
    );
    let (cid, bytes) = reencode(&Ipld::Map(record));
    op.insert("cid".into(), Ipld::Link(cid));
    blocks.push((cid, bytes));
    f.body.insert("ops".into(), Ipld::List(ops));
    f.set_car(&roots, &blocks);
    let commit = commit_of(&f.encode());
    let err = verify_commit(&commit, key).unwrap_err();
    assert_eq!(err.reason(), "op_not_proven", "{err}");
}

#[test]
fn missing_mst_node_is_a_missing_block() {
    let mut deeper = 0;
    for (msg, key) in create_commits().into_iter().take(80) {
        let commit = commit_of(&msg);
        let f = Frame::parse(&msg);
        let (roots, blocks) = f.car();
        let op_cids: Vec<Cid> = commit.ops.iter().filter_map(|o| o.cid).collect();
        let nodes: Vec<Cid> = blocks
            .iter()
            .filter(|(c, d)| *c != roots[0] && !op_cids.contains(c) && decode_node(d).is_ok())
            .map(|(c, _)| *c)
            .collect();
        for node in &nodes {
            let kept: Vec<_> = blocks.iter().filter(|(c, _)| c != node).cloned().collect();
            let mut copy = Frame::parse(&msg);
            copy.set_car(&roots, &kept);
            match verify_commit(&commit_of(&copy.encode()), &key) {
                Err(VerifyError::MissingBlock(c)) => {
                    assert_eq!(c, *node);
                    deeper += 1;
                }
                // A node of the new tree that the inversion never has to open.
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(deeper > 20, "only {deeper} removals were caught");
}

#[test]
fn other_accounts_key_and_mismatched_events_are_rejected() {
    let keys = doc_keys();
    let (msg, key) = &create_commits()[0];
    let mut commit = commit_of(msg);
    let other = keys.values().find(|k| *k != key).unwrap();
    assert_eq!(
        verify_commit(&commit, other),
        Err(VerifyError::BadSignature)
    );
    let mut wrong_prev = commit.clone();
    wrong_prev.prev_data = Some(wrong_prev.commit);
    assert_eq!(
        verify_commit(&wrong_prev, key).unwrap_err().reason(),
        "prev_data_mismatch"
    );
    commit.rev = "2222222222222".into();
    assert_eq!(
        verify_commit(&commit, key),
        Err(VerifyError::CommitMismatch { field: "rev" })
    );
}
