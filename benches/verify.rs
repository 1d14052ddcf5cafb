//! Verification benchmark: the cost per `#commit` of Sync 1.1 verification on
//! `fixtures/firehose/snap.frames`, split into its parts (CAR + commit block parsing, the
//! signature, the MST inversion), plus key parsing and full repo CAR walks (records/s over
//! `snap.network/repos`). One thread; frames are decoded before timing starts.
//!
//! `cargo bench --bench verify [-- ROUNDS]` (default 5 rounds over the 2,841 commits).

use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use atproto_ingest::firehose::event::{Commit, EventKind};
use atproto_ingest::firehose::fixture::{self, FrameReader, RawFrame};
use atproto_ingest::firehose::frame::{self, DEFAULT_MAX_FRAME_BYTES};
use atproto_ingest::identity::DidDocument;
use atproto_ingest::sync::{
    open_commit, prove_ops, verify_commit, verify_repo_car, PublicKey, DEFAULT_MAX_REPO_CAR_BYTES,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/firehose")
        .join(name)
}

fn read_json(name: &str) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_slice(&std::fs::read(fixture(name))?)?)
}

/// Signing keys per DID as the DID documents give them (multibase strings).
fn key_strings() -> Result<HashMap<String, String>, Box<dyn std::error::Error>> {
    let docs = read_json("snap.network/did-docs.json")?;
    let mut keys = HashMap::new();
    for (did, doc) in docs.as_object().ok_or("did-docs.json: not an object")? {
        let doc = DidDocument::parse(did, doc.to_string().as_bytes())?;
        keys.insert(did.clone(), doc.signing_key.ok_or("no signing key")?);
    }
    Ok(keys)
}

fn commits() -> Result<Vec<Commit>, Box<dyn std::error::Error>> {
    let reader = fixture::open(&fixture("snap.frames"))?;
    let mut out = Vec::new();
    for raw in FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES) {
        if let RawFrame::Message(msg) = raw? {
            if let EventKind::Commit(c) = frame::decode(&msg)?.event.kind {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// Per-item durations → "mean µs, p50, p99".
fn summary(mut d: Vec<Duration>) -> String {
    d.sort_unstable();
    let us = |x: Duration| x.as_secs_f64() * 1e6;
    let mean = d.iter().map(|x| us(*x)).sum::<f64>() / d.len().max(1) as f64;
    let at = |q: f64| {
        d.get(((d.len() as f64 - 1.0) * q) as usize)
            .map_or(0.0, |x| us(*x))
    };
    format!(
        "mean {mean:8.1} µs   p50 {:8.1} µs   p99 {:8.1} µs",
        at(0.5),
        at(0.99)
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let key_strs = key_strings()?;
    let commits = commits()?;
    let ops: usize = commits.iter().map(|c| c.ops.len()).sum();
    println!(
        "snap.frames: {} commits, {ops} ops, {rounds} rounds",
        commits.len()
    );

    // Key parsing (legacy documents are converted to Multikey when the document is parsed).
    let started = Instant::now();
    let mut keys = HashMap::new();
    for _ in 0..rounds {
        for (did, k) in &key_strs {
            keys.insert(did.clone(), PublicKey::parse(k)?);
        }
    }
    let per_key = started.elapsed().as_secs_f64() * 1e6 / (rounds * key_strs.len()) as f64;
    println!("key parse (decompress point):  {per_key:8.1} µs per key");

    let (mut open, mut sig, mut inv, mut total) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        for c in &commits {
            let key = keys.get(&c.repo).ok_or("no key")?;
            let t0 = Instant::now();
            let (blocks, commit) = open_commit(c)?;
            let t1 = Instant::now();
            commit.verify_signature(key)?;
            let t2 = Instant::now();
            prove_ops(c, &blocks, &commit)?;
            let t3 = Instant::now();
            black_box(verify_commit(c, key)?);
            let t4 = Instant::now();
            open.push(t1 - t0);
            sig.push(t2 - t1);
            inv.push(t3 - t2);
            total.push(t4 - t3);
        }
    }
    println!("open (CAR + commit block):    {}", summary(open));
    println!("signature (ECDSA K-256):      {}", summary(sig));
    println!("MST inversion (all ops):      {}", summary(inv));
    println!("verify_commit (all of it):    {}", summary(total.clone()));
    let secs: f64 = total.iter().map(Duration::as_secs_f64).sum();
    println!(
        "throughput, one thread:       {:8.0} commits/s",
        total.len() as f64 / secs
    );

    let repos = read_json("snap.network/repos.json")?;
    let mut cars = Vec::new();
    for (did, answer) in repos.as_object().ok_or("repos.json: not an object")? {
        if let Some(file) = answer["file"].as_str() {
            let car = std::fs::read(fixture(&format!("snap.network/{file}")))?;
            cars.push((did.clone(), car));
        }
    }
    let (mut records, mut bytes) = (0usize, 0usize);
    let started = Instant::now();
    for _ in 0..rounds {
        for (did, car) in &cars {
            let key = keys.get(did).ok_or("no key")?;
            let repo = verify_repo_car(car, did, key, DEFAULT_MAX_REPO_CAR_BYTES)?;
            records += repo.records.len();
            bytes += car.len();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "repo CARs ({} repos): {:8.0} records/s, {:6.1} MB/s",
        cars.len(),
        records as f64 / secs,
        bytes as f64 / secs / 1e6
    );
    Ok(())
}
