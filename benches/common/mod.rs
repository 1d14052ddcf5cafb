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

/// Drops the database of `url` (after a run: it leaves nothing behind).
pub async fn drop_database(url: &str) {
    admin_execute(url, |name| {
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")
    })
    .await;
}

/// Before a run: drops the database of `url`, which the run creates again with its
/// migrations. With `BENCH_DB_COLLATE` set (e.g. `C`), creates it here with that default
/// collation (`LC_CTYPE` stays `C.UTF-8`), so a run can measure what the collation of the
/// columns without an explicit one costs; the run then finds it and only migrates it.
pub async fn fresh_database(url: &str) {
    drop_database(url).await;
    if let Ok(collate) = std::env::var("BENCH_DB_COLLATE") {
        admin_execute(url, |name| {
            format!("CREATE DATABASE \"{name}\" TEMPLATE template0 LC_COLLATE '{collate}' LC_CTYPE 'C.UTF-8'")
        })
        .await;
    }
}

/// Runs `sql(database name of url)` on the server's `postgres` database.
async fn admin_execute(url: &str, sql: impl FnOnce(&str) -> String) {
    let db = DbConfig::new(url.to_owned());
    let name = db.database().expect("database name");
    let mut admin = db.pg_config().expect("url");
    admin.dbname("postgres");
    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&sql(&name))
        .await
        .expect("bench database statement");
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

/// CPU seconds (user + system) of process `pid` from `/proc/<pid>/stat`; with `children`,
/// also the CPU of its children that have exited and been reaped (`cutime` + `cstime`).
fn proc_cpu_secs(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // rest[0] is field 3 (state): utime = field 14, stime 15, cutime 16, cstime 17.
    let get = |field: usize| f.get(field - 3).copied().unwrap_or(0);
    let mut ticks = get(14) + get(15);
    if children {
        ticks += get(16) + get(17);
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// CPU seconds this process has used so far, all threads.
pub fn self_cpu_secs() -> f64 {
    proc_cpu_secs("self", false)
}

/// The PostgreSQL server's pid (its postmaster), from `postmaster.pid` in its data directory;
/// `None` when the server is not on this machine or the file is not readable.
pub async fn postmaster_pid(url: &str) -> Option<String> {
    let db = DbConfig::new(url.to_owned());
    let mut admin = db.pg_config().ok()?;
    admin.dbname("postgres");
    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    let dir: String = client
        .query_one("SHOW data_directory", &[])
        .await
        .ok()?
        .try_get(0)
        .ok()?;
    let pid = std::fs::read_to_string(Path::new(&dir).join("postmaster.pid")).ok()?;
    pid.lines().next().map(|l| l.trim().to_owned())
}

/// CPU seconds the whole PostgreSQL server has used so far: the postmaster, its live
/// children (backends, WAL writer, checkpointer, …) and its exited children.
pub fn pg_cpu_secs(postmaster: &str) -> f64 {
    let mut total = proc_cpu_secs(postmaster, true);
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1));
        if ppid == Some(postmaster) {
            total += proc_cpu_secs(pid, true);
        }
    }
    total
}

/// The median of `xs` (0 when empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// The benchmarks' multi-threaded runtime.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A replay's pipeline settings at their defaults.
/// Writer lanes of a single-setting benchmark: `BENCH_WRITER_LANES` (one number), else the
/// daemon's default.
pub fn writer_lanes() -> usize {
    std::env::var("BENCH_WRITER_LANES")
        .map_or(atproto_ingest::pipeline::DEFAULT_WRITER_LANES, |v| {
            v.parse().expect("BENCH_WRITER_LANES: a number")
        })
}

pub fn replay_config() -> atproto_ingest::pipeline::PipelineConfig {
    atproto_ingest::pipeline::PipelineConfig::new(atproto_ingest::cursor::CursorKey {
        service: String::new(),
        fence: 0,
    })
}

/// Replays `files` into `db` with `cfg`; its counters and wall time in seconds.
pub async fn timed_replay(
    db: &DbConfig,
    files: Vec<PathBuf>,
    cfg: atproto_ingest::pipeline::PipelineConfig,
) -> (std::sync::Arc<atproto_ingest::pipeline::Stats>, f64) {
    let stats = std::sync::Arc::new(atproto_ingest::pipeline::Stats::default());
    let started = std::time::Instant::now();
    atproto_ingest::replay::replay(
        db,
        files,
        cfg,
        tokio_util::sync::CancellationToken::new(),
        stats.clone(),
    )
    .await
    .expect("replay");
    (stats, started.elapsed().as_secs_f64())
}
