//! Decode benchmark: every frame of `bench.frames.zst` through `frame::decode` on one
//! thread (CID checks and typed record decoding included), reporting frames/s, MB/s and
//! heap allocations per frame (counted by a global allocator wrapper in this binary).
//!
//! `cargo bench --bench decode [-- FILE]`, or `DECODE_BENCH_FILE=FILE`. The default is
//! `../shared/fixtures/firehose/bench.frames.zst` relative to the crate (`../../shared/…`
//! is tried too, for worktrees). The file is decompressed once to `target/bench-data/`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use atproto_ingest::firehose::fixture::decode_varint;
use atproto_ingest::firehose::frame;
use atproto_ingest::firehose::{EventKind, OpRecord};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only adds relaxed counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        ALLOC_BYTES.fetch_add(new_size as u64, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn input_path() -> Option<PathBuf> {
    if let Some(p) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        return Some(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("DECODE_BENCH_FILE") {
        return Some(PathBuf::from(p));
    }
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["../shared", "../../shared"]
        .iter()
        .map(|d| crate_dir.join(d).join("fixtures/firehose/bench.frames.zst"))
        .find(|p| p.exists())
}

/// The raw (decompressed) frames file, decompressing once into `target/bench-data/`.
fn raw_file(input: &Path) -> std::io::Result<PathBuf> {
    if input.extension().is_none_or(|e| e != "zst") {
        return Ok(input.to_path_buf());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("bench-data");
    std::fs::create_dir_all(&dir)?;
    let stem = input.file_stem().unwrap_or_default();
    let out = dir.join(stem);
    if !out.exists() {
        eprintln!("decompressing {} -> {}", input.display(), out.display());
        let tmp = out.with_extension("partial");
        let mut dec = zstd::stream::read::Decoder::new(std::fs::File::open(input)?)?;
        std::io::copy(&mut dec, &mut std::fs::File::create(&tmp)?)?;
        std::fs::rename(&tmp, &out)?;
    }
    Ok(out)
}

/// Splits a fixture buffer into its frames (borrowed).
fn split(buf: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::with_capacity(120_000);
    let mut pos = 0;
    while pos < buf.len() {
        let Some((len, used)) = decode_varint(&buf[pos..]) else {
            break;
        };
        let start = pos + used;
        let end = start + len as usize;
        if end > buf.len() {
            eprintln!("file truncated at byte {pos}");
            break;
        }
        frames.push(&buf[start..end]);
        pos = end;
    }
    frames
}

fn main() {
    let Some(input) = input_path() else {
        eprintln!(
            "decode bench skipped: bench.frames.zst not found \
             (pass a path or set DECODE_BENCH_FILE)"
        );
        return;
    };
    if !input.exists() {
        eprintln!("decode bench skipped: {} does not exist", input.display());
        return;
    }
    let raw = match raw_file(&input).and_then(std::fs::read) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("decode bench skipped: reading {}: {e}", input.display());
            return;
        }
    };
    let frames = split(&raw);
    let bytes: usize = frames.iter().map(|f| f.len()).sum();
    let rounds: usize = std::env::var("DECODE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    println!(
        "{} frames, {:.1} MB, {rounds} rounds",
        frames.len(),
        bytes as f64 / 1e6
    );

    let mut best = f64::MAX;
    for round in 0..rounds {
        let mut skipped: BTreeMap<&str, u64> = BTreeMap::new();
        let (mut ops, mut known, mut generic, mut problems) = (0u64, 0u64, 0u64, 0u64);
        let (a0, b0) = (ALLOCS.load(Relaxed), ALLOC_BYTES.load(Relaxed));
        let t = Instant::now();
        for f in &frames {
            match frame::decode(f) {
                Ok(d) => {
                    if let EventKind::Commit(c) = &d.event.kind {
                        for op in &c.ops {
                            ops += 1;
                            match &op.record {
                                OpRecord::Known(_) => known += 1,
                                OpRecord::Generic(_) => generic += 1,
                                OpRecord::Invalid(_) | OpRecord::Unavailable(_) => problems += 1,
                                OpRecord::None | OpRecord::Superseded => {}
                            }
                        }
                    }
                    black_box(d);
                }
                Err(e) => *skipped.entry(e.reason()).or_default() += 1,
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let allocs = ALLOCS.load(Relaxed) - a0;
        let alloc_bytes = ALLOC_BYTES.load(Relaxed) - b0;
        let n = frames.len() as f64;
        best = best.min(secs);
        println!(
            "round {round}: {secs:.3} s  {:.0} frames/s  {:.1} MB/s  {:.1} allocs/frame  \
             {:.0} alloc bytes/frame  | ops {ops} known {known} generic {generic} \
             invalid/unavailable {problems} skipped {skipped:?}",
            n / secs,
            bytes as f64 / 1e6 / secs,
            allocs as f64 / n,
            alloc_bytes as f64 / n,
        );
    }
    println!(
        "best: {:.0} frames/s, {:.1} MB/s (target 60000 frames/s)",
        frames.len() as f64 / best,
        bytes as f64 / 1e6 / best
    );
}
