//! Shared by the release benchmarks: the corpora in `../shared/fixtures/firehose/`
//! (decompressed once under `target/`), a fresh benchmark database, peak RSS.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use atproto_ingest::db::DbConfig;

/// `postgres://postgres@127.0.0.1:5432/atproto_ingest_bench` unless `BENCH_DATABASE_URL`.
pub fn database_url() -> String {
    std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/atproto_ingest_bench".into())
}

/// `../shared/fixtures/firehose/NAME`, relative to the crate.
pub fn shared(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/firehose")
        .join(name)
}

/// The corpus at `$ENV`, else `shared(default)`; a `.zst` is decompressed once to
/// `target/<name without .zst>`. `None` (with a line on stderr) when it is not there.
pub fn corpus(env: &str, default: &str) -> Option<PathBuf> {
    let src = std::env::var(env)
        .map(PathBuf::from)
        .unwrap_or_else(|_| shared(default));
    if !src.exists() {
        eprintln!("bench corpus {} not found; skipping", src.display());
        return None;
    }
    if src.extension().is_none_or(|e| e != "zst") {
        return Some(src);
    }
    let name = src.file_stem()?.to_owned();
    let out = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    if !out.exists() {
        eprintln!("decompressing {} → {}", src.display(), out.display());
        let mut dec = zstd::stream::read::Decoder::new(std::fs::File::open(&src).ok()?).ok()?;
        let tmp = out.with_extension("partial");
        let mut f = std::fs::File::create(&tmp).ok()?;
        std::io::copy(&mut dec, &mut f).ok()?;
        std::fs::rename(&tmp, &out).ok()?;
    }
    Some(out)
}

/// Drops the database of `url` (it is created again, with its migrations, by the run).
pub async fn drop_database(url: &str) {
    let db = DbConfig::new(url.to_owned());
    let name = db.database().expect("database name");
    let mut admin = db.pg_config().expect("url");
    admin.dbname("postgres");
    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .expect("drop bench database");
}

/// This process's peak resident set (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
