//! Legal atproto data that PostgreSQL refuses (§6): hostile records built from real fixture
//! frames (re-encoded with a correct CID) and replayed mixed into the real stream. Nothing
//! stops: each hostile record is stored sanitized (or, breaking its lexicon, counted as
//! invalid), every other account ends at its truth, the cursor reaches the last seq. And the
//! safety net for what the policy misses: a batch failing with a data error is split until the
//! event is alone, which goes to `dead_letters`; `dead-letters retry` applies it after a fix.
use crate::common;
use crate::common::reframe::{write_fixture, Frame};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ipld_core::ipld::Ipld;
use tokio_util::sync::CancellationToken;

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::firehose::fixture::{open, FrameReader, RawFrame};
use atproto_ingest::firehose::{frame, EventKind};
use atproto_ingest::mapping::sanitize::{CUT_MARK, MAX_INDEXED_BYTES};
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::replay;
use atproto_ingest::txn::RetryPolicy;
use atproto_ingest::writer::dead_letters;

/// Over the btree limit, under the 8 KB an AT-URI may have (the bulk is in the fragment).
const LONG_URI_BYTES: usize = 7000;

fn cfg() -> PipelineConfig {
    PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    })
}

/// A frame of `small.frames` that creates one record.
struct Create {
    index: usize,
    seq: i64,
    did: String,
    uri: String,
    rkey: String,
}

/// The raw frames of `small.frames`, and its one-op creates by collection, of accounts active
/// at the end whose record no later op touches (so the hostile version is the final one).
fn corpus(truth: &common::Truth) -> (Vec<Vec<u8>>, BTreeMap<String, Vec<Create>>) {
    let mut frames = Vec::new();
    let mut creates: BTreeMap<String, Vec<Create>> = BTreeMap::new();
    let mut last_op: BTreeMap<String, usize> = BTreeMap::new();
    let reader = open(&common::fixture("small.frames")).unwrap();
    for raw in FrameReader::new(reader, usize::MAX) {
        let RawFrame::Message(msg) = raw.unwrap() else {
            unreachable!("small.frames has no oversized frame")
        };
        let ev = frame::decode(&msg).unwrap().event;
        if let EventKind::Commit(c) = &ev.kind {
            for op in &c.ops {
                last_op.insert(op.uri(&c.repo), frames.len());
            }
            let active = truth
                .accounts
                .get(&c.repo)
                .is_some_and(|(_, s)| s == "active");
            if let [op] = &c.ops[..] {
                let uri = op.uri(&c.repo);
                let live = truth
                    .live
                    .get(&op.collection)
                    .is_some_and(|l| l.contains(&uri));
                if active && live && op.action == atproto_ingest::firehose::Action::Create {
                    creates
                        .entry(op.collection.clone())
                        .or_default()
                        .push(Create {
                            index: frames.len(),
                            seq: ev.seq,
                            did: c.repo.clone(),
                            uri,
                            rkey: op.rkey.clone(),
                        });
                }
            }
        }
        frames.push(msg);
    }
    for list in creates.values_mut() {
        list.retain(|c| last_op.get(&c.uri) == Some(&c.index));
    }
    (frames, creates)
}

/// The first create of `collection` by an account not in `used` (which it joins).
fn pick<'a>(
    creates: &'a BTreeMap<String, Vec<Create>>,
    collection: &str,
    used: &mut BTreeSet<String>,
) -> &'a Create {
    let c = creates[collection]
        .iter()
        .find(|c| !used.contains(&c.did))
        .unwrap_or_else(|| panic!("no {collection} create of a fresh account"));
    used.insert(c.did.clone());
    c
}

fn s(v: &str) -> Ipld {
    Ipld::String(v.to_owned())
}

/// A legal AT-URI of [`LONG_URI_BYTES`] whose fragment does not compress (PostgreSQL
/// compresses long index entries: a run of one letter would fit the btree).
fn long_uri(did: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut uri = format!("at://{did}/app.bsky.feed.post/3hostile#/");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while uri.len() < LONG_URI_BYTES {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        uri.push(ALPHABET[(x >> 33) as usize % ALPHABET.len()] as char);
    }
    uri
}

/// Replaces frame `c.index`'s record with `edit(record)`.
fn rewrite(frames: &mut [Vec<u8>], c: &Create, edit: impl FnOnce(&mut BTreeMap<String, Ipld>)) {
    let mut f = Frame::parse(&frames[c.index]);
    let mut record = f.record(0);
    edit(&mut record);
    f.set_record(0, record);
    frames[c.index] = f.encode();
}

async fn one<T>(pool: &sqlx::PgPool, sql: &str, uri: &str) -> T
where
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    sqlx::query_scalar(sql)
        .bind(uri)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql} [{uri}]: {e}"))
}

#[sqlx::test(migrations = false)]
async fn hostile_records_are_stored_sanitized_and_nothing_stops(pool: sqlx::PgPool) {
    let truth = common::truth("small");
    let (mut frames, creates) = corpus(&truth);
    let mut used = BTreeSet::new();

    let nul_post = pick(&creates, "app.bsky.feed.post", &mut used);
    rewrite(&mut frames, nul_post, |r| {
        r.insert("text".into(), s("hostile\u{0}text\u{0}"));
    });
    let nul_profile = pick(&creates, "app.bsky.actor.profile", &mut used);
    rewrite(&mut frames, nul_profile, |r| {
        r.insert("displayName".into(), s("Mal\u{0}lory"));
    });
    let long_like = pick(&creates, "app.bsky.feed.like", &mut used);
    let like_target = long_uri(&nul_post.did);
    rewrite(&mut frames, long_like, |r| {
        let Some(Ipld::Map(subject)) = r.get_mut("subject") else {
            panic!("like without subject")
        };
        subject.insert("uri".into(), s(&like_target));
    });
    let quote = pick(&creates, "app.bsky.feed.post", &mut used);
    let quote_target = long_uri(&nul_profile.did);
    let quoted_cid = Frame::parse(&frames[quote.index]).ops()[0]["cid"].clone();
    let Ipld::Link(quoted_cid) = quoted_cid else {
        panic!("op without cid")
    };
    rewrite(&mut frames, quote, |r| {
        let strong_ref = BTreeMap::from([
            ("uri".to_owned(), s(&quote_target)),
            ("cid".to_owned(), s(&quoted_cid.to_string())),
        ]);
        let embed = BTreeMap::from([
            ("$type".to_owned(), s("app.bsky.embed.record")),
            ("record".to_owned(), Ipld::Map(strong_ref)),
        ]);
        r.insert("embed".into(), Ipld::Map(embed));
    });
    let far_future = pick(&creates, "app.bsky.feed.post", &mut used);
    rewrite(&mut frames, far_future, |r| {
        r.insert("createdAt".into(), s("10000-01-01T00:00:00.000Z"));
    });
    // A collection without a table: U+0000 in a key and in a value, a year-(-1) createdAt.
    let custom = pick(&creates, "app.bsky.feed.post", &mut used);
    let custom_uri = format!("at://{}/com.example.hostile/{}", custom.did, custom.rkey);
    {
        let mut f = Frame::parse(&frames[custom.index]);
        let mut ops = f.ops();
        ops[0].insert(
            "path".into(),
            s(&format!("com.example.hostile/{}", custom.rkey)),
        );
        f.set_ops(ops);
        let record = BTreeMap::from([
            ("$type".to_owned(), s("com.example.hostile")),
            ("te\u{0}xt".to_owned(), s("a\u{0}b")),
            ("createdAt".to_owned(), s("-0001-01-01T00:00:00Z")),
        ]);
        f.set_record(0, record);
        frames[custom.index] = f.encode();
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.frames");
    write_fixture(&path, &frames);
    let db = common::db_config(&pool);
    let stats = Arc::new(Stats::default());
    replay(
        &db,
        vec![path],
        cfg(),
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .expect("a replay with hostile records ends normally");
    eprintln!("{}", stats.summary());

    let cursor = common::replay_cursor(&pool).await;
    assert_eq!(cursor, 2000);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "the policy stores every hostile record");
    assert_eq!(stats.dead_letters.load(Ordering::Relaxed), 0);
    // NUL text, NUL displayName, NUL in JSON, two long references.
    assert_eq!(stats.sanitized.load(Ordering::Relaxed), 5);

    let text: String = one(
        &pool,
        "SELECT text FROM posts WHERE uri = $1",
        &nul_post.uri,
    )
    .await;
    assert_eq!(text, "hostiletext");
    let name: String = one(
        &pool,
        "SELECT display_name FROM profiles WHERE did = $1",
        &nul_profile.did,
    )
    .await;
    assert_eq!(name, "Mallory");

    let cut = |full: &str| {
        let keep = MAX_INDEXED_BYTES - CUT_MARK.len();
        format!("{}{CUT_MARK}", &full[..keep])
    };
    let subject: String = one(
        &pool,
        "SELECT subject_uri FROM likes WHERE uri = $1",
        &long_like.uri,
    )
    .await;
    assert_eq!(subject, cut(&like_target));
    let likes: i64 = one(
        &pool,
        "SELECT like_count FROM post_aggregates WHERE uri = $1",
        &subject,
    )
    .await;
    assert_eq!(likes, 1);
    let quoted: String = one(
        &pool,
        "SELECT quote_uri FROM posts WHERE uri = $1",
        &quote.uri,
    )
    .await;
    assert_eq!(quoted, cut(&quote_target));
    let quotes: i64 = one(
        &pool,
        "SELECT quote_count FROM post_aggregates WHERE uri = $1",
        &quoted,
    )
    .await;
    assert_eq!(quotes, 1);

    // A createdAt that is no atproto datetime breaks the post lexicon: counted, not stored.
    assert_eq!(
        stats.invalid_total(),
        7,
        "the six validate:false records + 1"
    );
    let far: i64 = one(
        &pool,
        "SELECT count(*) FROM posts WHERE uri = $1",
        &far_future.uri,
    )
    .await;
    assert_eq!(far, 0);

    let (value, no_time): (serde_json::Value, bool) =
        sqlx::query_as("SELECT value, created_at IS NULL FROM records WHERE uri = $1")
            .bind(&custom_uri)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        value,
        serde_json::json!({"$type": "com.example.hostile", "text": "ab", "createdAt": "-0001-01-01T00:00:00Z"})
    );
    assert!(no_time, "not a datetime: no created_at");

    common::assert_matches_truth_except(&pool, &truth, &BTreeSet::new(), &used).await;
}

/// A data error the policy does not catch (a CHECK constraint provoked on one post): the batch
/// is split until that event is alone, it alone goes to `dead_letters`, everything else is
/// written and the cursor reaches the end. `retry` keeps it while the constraint stands and
/// applies it once the constraint is gone, after which the database equals the truth.
#[sqlx::test(migrations = false)]
async fn a_refused_event_is_isolated_dead_lettered_and_retried(pool: sqlx::PgPool) {
    let truth = common::truth("small");
    let (_, creates) = corpus(&truth);
    let victim = &creates["app.bsky.feed.post"][0];
    let db = common::db_config(&pool);
    atproto_ingest::db::prepare(&db).await.unwrap();
    sqlx::query(&format!(
        "ALTER TABLE posts ADD CONSTRAINT hostile_check CHECK (uri <> '{}')",
        victim.uri
    ))
    .execute(&pool)
    .await
    .unwrap();

    let stats = Arc::new(Stats::default());
    replay(
        &db,
        vec![common::fixture("small.frames")],
        cfg(),
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .expect("a refused event does not stop the replay");
    assert_eq!(stats.dead_letters.load(Ordering::Relaxed), 1);
    let cursor = common::replay_cursor(&pool).await;
    assert_eq!(cursor, 2000);

    let pg = common::deadpool(&pool, 2).await;
    let rows = dead_letters::list(&pg, None, 10).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(row.seq, victim.seq);
    assert_eq!(row.service, "replay");
    assert_eq!(row.did.as_deref(), Some(victim.did.as_str()));
    assert_eq!(row.uri.as_deref(), Some(victim.uri.as_str()));
    assert_eq!(row.collection.as_deref(), Some("app.bsky.feed.post"));
    assert_eq!(row.sqlstate, "23514");
    assert!(row.error.contains("hostile_check"), "{}", row.error);
    assert_eq!(row.attempts, 1);
    let record = row.record.as_ref().unwrap();
    assert_eq!(record["ops"][0]["collection"], "app.bsky.feed.post");
    let (resync, reason, queued): (bool, Option<String>, bool) = sqlx::query_as(
        "SELECT needs_resync, sync_reason, EXISTS (SELECT 1 FROM resync_queue q WHERE q.did = a.did) \
         FROM actors a WHERE did = $1",
    )
    .bind(&victim.did)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        resync && queued,
        "a dead-lettered event leaves its repo incomplete"
    );
    assert_eq!(reason.as_deref(), Some("dead_letter"));
    // Everything but the refused post is there.
    let skip = BTreeSet::from([victim.uri.clone()]);
    common::assert_matches_truth_except(&pool, &truth, &skip, &BTreeSet::new()).await;

    let policy = RetryPolicy::default();
    let cancel = CancellationToken::new();
    let report = dead_letters::retry(&pg, &policy, &cancel, None)
        .await
        .unwrap();
    assert_eq!((report.applied, report.failed), (0, 1));
    let rows = dead_letters::list(&pg, Some(row.id), 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].attempts, rows[0].sqlstate.as_str()), (2, "23514"));

    // The command line: `list --json`, then `retry --id N` once the constraint is gone.
    let url = db.url.clone();
    let list = cli(&["dead-letters", "list", "--json", "--database-url", &url]);
    let listed: serde_json::Value = serde_json::from_str(list.trim()).unwrap();
    assert_eq!(
        (listed["seq"].as_i64(), listed["attempts"].as_i64()),
        (Some(victim.seq), Some(2)),
        "{listed}"
    );
    sqlx::query("ALTER TABLE posts DROP CONSTRAINT hostile_check")
        .execute(&pool)
        .await
        .unwrap();
    let id = row.id.to_string();
    let retried = cli(&["dead-letters", "retry", "--id", &id, "--database-url", &url]);
    assert!(
        retried.contains("re-applied and removed: 1, still failing (kept with the new error): 0"),
        "{retried}"
    );
    assert_eq!(
        cli(&["dead-letters", "list", "--database-url", &url]).trim(),
        "no dead letters"
    );
    common::assert_matches_truth(&pool, &truth).await;
}

/// Runs the binary; its stdout (it must exit 0).
fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_atproto-ingest"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
