//! Shared helpers of the integration tests: per-test databases and the fixtures' truth.
#![allow(dead_code)]

pub mod fake_identity;
pub mod reframe;
pub mod standin;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use atproto_ingest::db::DbConfig;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/firehose")
        .join(name)
}

/// A DbConfig for the database `#[sqlx::test]` created for this test.
pub fn db_config(pool: &sqlx::PgPool) -> DbConfig {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let root = base.rsplit_once('/').map_or(base.as_str(), |(r, _)| r);
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or("postgres")
        .to_owned();
    let mut cfg = DbConfig::new(format!("{root}/{db}"));
    cfg.pool_size = 4;
    cfg
}

/// A deadpool pool of `size` connections on the database `#[sqlx::test]` made for this test.
pub async fn deadpool(pool: &sqlx::PgPool, size: usize) -> deadpool_postgres::Pool {
    let mut cfg = db_config(pool);
    cfg.pool_size = size;
    atproto_ingest::db::connect(&cfg).await.unwrap()
}

/// What `NAME.truth.json` (+ the ops log's invalid marks) says the database must hold.
pub struct Truth {
    /// collection → URIs of live, lexicon-valid records.
    pub live: BTreeMap<String, BTreeSet<String>>,
    pub gone: BTreeSet<String>,
    /// did → (handle, status)
    pub accounts: BTreeMap<String, (Option<String>, String)>,
}

pub fn truth(name: &str) -> Truth {
    let t: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{name}.truth.json"))).unwrap(),
    )
    .unwrap();
    let mut invalid = BTreeSet::new();
    let oplog = std::fs::read_to_string(fixture(&format!("{name}.oplog.jsonl"))).unwrap();
    for line in oplog.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for w in v["writes"].as_array().into_iter().flatten() {
            if w.get("invalid").is_some() {
                invalid.insert(w["uri"].as_str().unwrap().to_owned());
            }
        }
    }
    let mut live: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in t["live_records"].as_array().unwrap() {
        let uri = r["uri"].as_str().unwrap();
        if !invalid.contains(uri) {
            live.entry(r["collection"].as_str().unwrap().to_owned())
                .or_default()
                .insert(uri.to_owned());
        }
    }
    // Cross-check with the truth's own lexicon-valid counts.
    for (c, n) in t["counts_lexicon_valid"].as_object().unwrap() {
        assert_eq!(
            live.get(c).map_or(0, |s| s.len() as u64),
            n.as_u64().unwrap(),
            "truth {c}"
        );
    }
    // A record deleted and written again under the same URI is live, not gone.
    let present: BTreeSet<&str> = t["live_records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["uri"].as_str().unwrap())
        .collect();
    let mut gone = BTreeSet::new();
    for key in ["deleted_uris", "account_deleted_uris"] {
        for u in t[key].as_array().unwrap() {
            let u = u.as_str().unwrap();
            if !present.contains(u) {
                gone.insert(u.to_owned());
            }
        }
    }
    let accounts = t["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["did"].as_str().unwrap().to_owned(),
                (
                    a["handle"].as_str().map(str::to_owned),
                    a["status"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    Truth {
        live,
        gone,
        accounts,
    }
}

/// Record URIs per collection as stored.
pub async fn stored(pool: &sqlx::PgPool) -> BTreeMap<String, BTreeSet<String>> {
    let tables = [
        ("app.bsky.feed.post", "posts"),
        ("app.bsky.feed.like", "likes"),
        ("app.bsky.feed.repost", "reposts"),
        ("app.bsky.graph.follow", "follows"),
        ("app.bsky.graph.block", "blocks"),
        ("app.bsky.graph.list", "lists"),
        ("app.bsky.graph.listitem", "list_items"),
        ("app.bsky.feed.generator", "feed_generators"),
        ("app.bsky.graph.starterpack", "starter_packs"),
        ("app.bsky.feed.threadgate", "threadgates"),
        ("app.bsky.feed.postgate", "postgates"),
        ("app.bsky.actor.profile", "profiles"),
    ];
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (coll, table) in tables {
        let uris: Vec<String> = sqlx::query_scalar(&format!("SELECT uri FROM {table}"))
            .fetch_all(pool)
            .await
            .unwrap();
        if !uris.is_empty() {
            out.insert(coll.to_owned(), uris.into_iter().collect());
        }
    }
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT collection, uri FROM records")
        .fetch_all(pool)
        .await
        .unwrap();
    for (c, u) in rows {
        out.entry(c).or_default().insert(u);
    }
    out
}

/// Checks the database against the truth: records, deletions, accounts, aggregates.
pub async fn assert_matches_truth(pool: &sqlx::PgPool, truth: &Truth) {
    assert_matches_truth_except(pool, truth, &BTreeSet::new(), &BTreeSet::new()).await;
}

/// [`assert_matches_truth`] leaving out the records in `skip_uris` and every record and
/// account of `skip_dids` (tests that alter some accounts' records on purpose).
pub async fn assert_matches_truth_except(
    pool: &sqlx::PgPool,
    truth: &Truth,
    skip_uris: &BTreeSet<String>,
    skip_dids: &BTreeSet<String>,
) {
    let skipped = |uri: &str| {
        skip_uris.contains(uri)
            || uri
                .strip_prefix("at://")
                .and_then(|r| r.split('/').next())
                .is_some_and(|did| skip_dids.contains(did))
    };
    let mut stored = stored(pool).await;
    for uris in stored.values_mut() {
        uris.retain(|u| !skipped(u));
    }
    stored.retain(|_, uris| !uris.is_empty());
    for (coll, expected) in &truth.live {
        let expected: BTreeSet<String> = expected.iter().filter(|u| !skipped(u)).cloned().collect();
        let expected = &expected;
        let got = stored.get(coll).cloned().unwrap_or_default();
        let missing: Vec<_> = expected.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(expected).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{coll}: missing {missing:?} extra {extra:?}"
        );
    }
    for coll in stored.keys() {
        assert!(
            truth.live.contains_key(coll),
            "unexpected collection {coll}"
        );
    }
    let all: BTreeSet<&String> = stored.values().flatten().collect();
    for g in &truth.gone {
        assert!(!all.contains(g), "deleted record still present: {g}");
    }
    let actors: Vec<(String, Option<String>, String)> =
        sqlx::query_as("SELECT did, handle, status FROM actors")
            .fetch_all(pool)
            .await
            .unwrap();
    let actors: BTreeMap<String, (Option<String>, String)> =
        actors.into_iter().map(|(d, h, s)| (d, (h, s))).collect();
    for (did, want) in truth
        .accounts
        .iter()
        .filter(|(d, _)| !skip_dids.contains(*d))
    {
        assert_eq!(actors.get(did), Some(want), "actor {did}");
    }
    assert_aggregates_consistent(pool).await;
}

/// Aggregates equal the COUNT(*) of the rows they summarise.
pub async fn assert_aggregates_consistent(pool: &sqlx::PgPool) {
    let checks = [
        "SELECT count(*) FROM post_aggregates a WHERE like_count <> (SELECT count(*) FROM likes l WHERE l.subject_uri = a.uri)",
        "SELECT count(*) FROM post_aggregates a WHERE repost_count <> (SELECT count(*) FROM reposts l WHERE l.subject_uri = a.uri)",
        "SELECT count(*) FROM post_aggregates a WHERE reply_count <> (SELECT count(*) FROM posts p WHERE p.reply_parent_uri = a.uri)",
        "SELECT count(*) FROM post_aggregates a WHERE quote_count <> (SELECT count(*) FROM posts p WHERE p.quote_uri = a.uri)",
        "SELECT count(*) FROM (SELECT subject_uri FROM likes UNION SELECT subject_uri FROM reposts UNION SELECT reply_parent_uri FROM posts WHERE reply_parent_uri IS NOT NULL UNION SELECT quote_uri FROM posts WHERE quote_uri IS NOT NULL) s WHERE NOT EXISTS (SELECT 1 FROM post_aggregates a WHERE a.uri = s.subject_uri)",
        "SELECT count(*) FROM profile_aggregates a WHERE followers_count <> (SELECT count(*) FROM follows f WHERE f.subject_did = a.did)",
        "SELECT count(*) FROM profile_aggregates a WHERE follows_count <> (SELECT count(*) FROM follows f WHERE f.did = a.did)",
        "SELECT count(*) FROM profile_aggregates a WHERE posts_count <> (SELECT count(*) FROM posts p WHERE p.did = a.did)",
        "SELECT count(*) FROM (SELECT did FROM posts UNION SELECT did FROM follows UNION SELECT subject_did FROM follows) s WHERE NOT EXISTS (SELECT 1 FROM profile_aggregates a WHERE a.did = s.did)",
        "SELECT count(*) FROM feed_items f WHERE NOT EXISTS (SELECT 1 FROM posts p WHERE p.uri = f.uri) AND NOT EXISTS (SELECT 1 FROM reposts r WHERE r.uri = f.uri)",
        "SELECT count(*) FROM notifications n WHERE NOT EXISTS (SELECT 1 FROM posts p WHERE p.uri = n.record_uri) AND NOT EXISTS (SELECT 1 FROM likes r WHERE r.uri = n.record_uri) AND NOT EXISTS (SELECT 1 FROM reposts r WHERE r.uri = n.record_uri) AND NOT EXISTS (SELECT 1 FROM follows r WHERE r.uri = n.record_uri)",
    ];
    for sql in checks {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
        assert_eq!(n, 0, "inconsistent: {sql}");
    }
    let posts: i64 = sqlx::query_scalar("SELECT count(*) FROM posts")
        .fetch_one(pool)
        .await
        .unwrap();
    let reposts: i64 = sqlx::query_scalar("SELECT count(*) FROM reposts")
        .fetch_one(pool)
        .await
        .unwrap();
    let feed: i64 = sqlx::query_scalar("SELECT count(*) FROM feed_items")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(feed, posts + reposts, "one feed item per post and repost");
}

/// A digest of every row of every table but the cursor, to prove a replay changed nothing.
pub async fn snapshot(pool: &sqlx::PgPool) -> BTreeMap<String, String> {
    snapshot_with(pool, "x::text").await
}

/// The same digest without `indexed_at` (wall-clock times): compares two databases.
pub async fn snapshot_without_times(pool: &sqlx::PgPool) -> BTreeMap<String, String> {
    // Times of sync-state changes, of the resync queue and of backfill runs differ between
    // runs by nature.
    snapshot_with(
        pool,
        "(to_jsonb(x) - 'indexed_at' - 'sync_changed_at' - 'queued_at' - 'next_attempt_at' - 'started_at' - 'updated_at' - 'finished_at')::text",
    )
    .await
}

async fn snapshot_with(pool: &sqlx::PgPool, expr: &str) -> BTreeMap<String, String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename NOT IN ('firehose_cursor', '_sqlx_migrations') ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = BTreeMap::new();
    for t in tables {
        let digest: Option<String> = sqlx::query_scalar(&format!(
            "SELECT md5(string_agg({expr}, '|' ORDER BY {expr})) FROM {t} x"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        out.insert(t, digest.unwrap_or_default());
    }
    out
}

/// A scratch database next to the test's own (for comparing two replays); dropped on `drop`.
pub struct ScratchDb {
    pub cfg: DbConfig,
    pub pool: sqlx::PgPool,
    admin: sqlx::PgPool,
    name: String,
}

impl ScratchDb {
    pub async fn new(test_pool: &sqlx::PgPool, suffix: &str) -> Self {
        let base = db_config(test_pool);
        // sqlx's test database names are near the 63-byte limit: use a short unique one.
        let name = format!("scratch_{suffix}_{:016x}", rand::random::<u64>());
        let root = base.url.rsplit_once('/').unwrap().0.to_owned();
        let admin = sqlx::PgPool::connect(&format!("{root}/postgres"))
            .await
            .unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .execute(&admin)
            .await
            .unwrap();
        let mut cfg = base.clone();
        cfg.url = format!("{root}/{name}");
        atproto_ingest::db::ensure_database(&cfg).await.unwrap();
        let pool = sqlx::PgPool::connect(&cfg.url).await.unwrap();
        Self {
            cfg,
            pool,
            admin,
            name,
        }
    }

    pub async fn drop_db(self) {
        self.pool.close().await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&self.admin)
        .await;
    }
}

/// Writes the first `n` frames of a fixture to a new temp file.
pub fn first_frames(name: &str, n: usize) -> tempfile::NamedTempFile {
    use atproto_ingest::firehose::fixture::{open, FrameReader, FrameWriter, RawFrame};
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut w = FrameWriter::new(std::io::BufWriter::new(file.reopen().unwrap()));
    for f in FrameReader::new(open(&fixture(name)).unwrap(), usize::MAX).take(n) {
        match f.unwrap() {
            RawFrame::Message(m) => w.write_frame(&m).unwrap(),
            RawFrame::Oversized { .. } => unreachable!(),
        }
    }
    w.flush().unwrap();
    file
}

/// Replays `files` into `db` with `cfg` to the end (its summary printed) and returns its
/// counters.
pub async fn replay_files(
    db: &DbConfig,
    files: Vec<PathBuf>,
    cfg: atproto_ingest::pipeline::PipelineConfig,
) -> std::sync::Arc<atproto_ingest::pipeline::Stats> {
    let stats = std::sync::Arc::new(atproto_ingest::pipeline::Stats::default());
    atproto_ingest::replay::replay(
        db,
        files,
        cfg,
        tokio_util::sync::CancellationToken::new(),
        stats.clone(),
    )
    .await
    .unwrap();
    eprintln!("{}", stats.summary());
    stats
}

/// The cursor `replay` stored.
pub async fn replay_cursor(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT seq FROM firehose_cursor WHERE service = 'replay'")
        .fetch_one(pool)
        .await
        .unwrap()
}
