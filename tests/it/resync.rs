//! Resync (§12) against the stand-in network: tampered repos are made equal to their CAR with
//! derived tables exact; failures back off or leave the queue with a reason; a bad signature
//! refreshes the identity once; held events are applied or skipped; `replay --resync` waits
//! for its resyncs; half a replay, a backfill and the rest of the replay give the truth.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::firehose::fixture::{open, FrameReader, RawFrame};
use atproto_ingest::firehose::frame::DEFAULT_MAX_FRAME_BYTES;
use atproto_ingest::firehose::{Action, EventKind};
use atproto_ingest::identity::Resolver;
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::{replay, replay_with_resync, REPLAY_SERVICE};
use atproto_ingest::resync::{run_workers, Held, HeldLimits, Live, ResyncConfig, Resyncer};
use atproto_ingest::sync::{verify_repo_car, PublicKey, DEFAULT_MAX_REPO_CAR_BYTES};
use tokio_util::sync::CancellationToken;

use crate::common::reframe::{write_fixture, Frame};
use crate::common::standin::{self, Failure, StandIn};
use crate::common::{self};

fn frames() -> Vec<Vec<u8>> {
    FrameReader::new(
        open(&common::fixture("snap.frames")).unwrap(),
        DEFAULT_MAX_FRAME_BYTES,
    )
    .map(|f| match f.unwrap() {
        RawFrame::Message(m) => m,
        RawFrame::Oversized { len } => panic!("oversized frame of {len}"),
    })
    .collect()
}

fn replay_cfg() -> PipelineConfig {
    PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    })
}

async fn replay_file(pool: &sqlx::PgPool, path: &std::path::Path) {
    let db = common::db_config(pool);
    replay(
        &db,
        vec![path.to_owned()],
        replay_cfg(),
        CancellationToken::new(),
        Arc::default(),
    )
    .await
    .unwrap();
}

fn resync_cfg() -> ResyncConfig {
    ResyncConfig {
        poll_interval: Duration::from_millis(20),
        fetch_timeout: Duration::from_millis(500),
        ..ResyncConfig::default()
    }
}

fn live(held: Arc<Held>) -> Live {
    Live {
        fence: CursorKey {
            service: REPLAY_SERVICE.into(),
            fence: 0,
        },
        held,
    }
}

/// Runs resync workers until no repo is due and none is in flight.
async fn resync_until_idle(pool: &sqlx::PgPool, net: &StandIn, resyncer: Option<Resyncer>) {
    let resyncer = match resyncer {
        Some(r) => r,
        None => resyncer_for(pool, net, None, Arc::default()).await,
    };
    let finish = CancellationToken::new();
    finish.cancel();
    run_workers(Arc::new(resyncer), finish, CancellationToken::new()).await;
}

async fn resyncer_for(
    pool: &sqlx::PgPool,
    net: &StandIn,
    resolver: Option<Arc<Resolver>>,
    held: Arc<Held>,
) -> Resyncer {
    let dp = common::deadpool(pool, 6).await;
    Resyncer::new(
        dp,
        resync_cfg(),
        &net.identity_config(),
        resolver,
        Some(live(held)),
    )
    .unwrap()
}

async fn queue(pool: &sqlx::PgPool, dids: &[&str]) {
    let dp = common::deadpool(pool, 1).await;
    let client = dp.get().await.unwrap();
    let marks: Vec<(String, &str)> = dids.iter().map(|d| (d.to_string(), "test")).collect();
    atproto_ingest::repos::desynchronize(&**client, &marks)
        .await
        .unwrap();
}

async fn prepare(pool: &sqlx::PgPool) {
    atproto_ingest::db::prepare(&common::db_config(pool))
        .await
        .unwrap();
}

#[tokio::test]
async fn standin_serves_documents_repos_and_pages() {
    let net = StandIn::snap().await;
    let resolver = Resolver::new(net.identity_config()).unwrap();
    let did = net.network().fetchable_dids()[0].clone();
    let id = resolver.resolve(&did).await.unwrap();
    assert_eq!(id.pds_endpoint.as_deref(), Some(net.url()));
    assert!(id.handle_valid, "{id:?}");
    let key = PublicKey::parse(id.signing_key.as_deref().unwrap()).unwrap();

    let http = reqwest::Client::new();
    let url = format!("{}/xrpc/com.atproto.sync.getRepo?did={did}", net.url());
    let car = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    let repo = verify_repo_car(&car, &did, &key, DEFAULT_MAX_REPO_CAR_BYTES).unwrap();
    assert!(!repo.records.is_empty());
    assert_eq!(net.requests(standin::GET_REPO, &did), 1);

    net.fail(&did, Failure::Status(500));
    assert_eq!(http.get(&url).send().await.unwrap().status(), 500);
    net.heal(&did);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);

    net.set_page_limit(20);
    let mut cursor: Option<String> = None;
    let mut listed = Vec::new();
    loop {
        let mut url = format!("{}/xrpc/com.atproto.sync.listRepos?limit=100", net.url());
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        for r in page["repos"].as_array().unwrap() {
            listed.push(r["did"].as_str().unwrap().to_owned());
        }
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed, net.network().listed_dids());
    assert_eq!(net.total_requests(standin::LIST_REPOS), 3);
}

/// Frames of fetchable repos to leave out: a delete (its record stays: an extra row), an
/// update (the old version stays: a changed row) and a create of a record live at the end (a
/// missing row). Returns (frame indexes, their DIDs).
fn frames_to_drop(frames: &[Vec<u8>], net: &StandIn) -> (BTreeSet<usize>, BTreeSet<String>) {
    let fetchable: BTreeSet<String> = net.network().fetchable_dids().into_iter().collect();
    let truth = common::truth("snap");
    let live: BTreeSet<&String> = truth.live.values().flatten().collect();
    let mut want = [Action::Delete, Action::Update, Action::Create].to_vec();
    let (mut drop, mut dids) = (BTreeSet::new(), BTreeSet::new());
    for (i, f) in frames.iter().enumerate() {
        let Ok(d) = atproto_ingest::firehose::decode(f) else {
            continue;
        };
        let EventKind::Commit(c) = d.event.kind else {
            continue;
        };
        if !fetchable.contains(&c.repo) || c.ops.len() != 1 || dids.contains(&c.repo) {
            continue;
        }
        let op = &c.ops[0];
        let derived = [
            "app.bsky.feed.like",
            "app.bsky.feed.post",
            "app.bsky.graph.follow",
        ];
        let fits = match op.action {
            Action::Delete => derived.contains(&op.collection.as_str()),
            Action::Update => true,
            Action::Create => {
                derived.contains(&op.collection.as_str()) && live.contains(&op.uri(&c.repo))
            }
        };
        if fits && want.contains(&op.action) {
            want.retain(|a| *a != op.action);
            drop.insert(i);
            dids.insert(c.repo.clone());
        }
    }
    assert!(want.is_empty(), "no frame for {want:?}");
    (drop, dids)
}

#[sqlx::test(migrations = false)]
async fn tampered_repos_are_made_equal_to_their_car(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let all = frames();
    let (drop, mut dids) = frames_to_drop(&all, &net);
    let kept: Vec<Vec<u8>> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| !drop.contains(i))
        .map(|(_, f)| f.clone())
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    write_fixture(file.path(), &kept);
    replay_file(&pool, file.path()).await;
    let truth = common::truth("snap");
    let stored = common::stored(&pool).await;
    assert_ne!(stored, truth.live, "leaving frames out changed nothing");

    // Rows changed behind the writer's back, in tables without derived rows: a profile with
    // another CID and content, a custom record that no repo holds.
    let victim: String = sqlx::query_scalar(
        "SELECT did FROM profiles WHERE did = ANY($1) AND NOT did = ANY($2) ORDER BY did LIMIT 1",
    )
    .bind(net.network().fetchable_dids())
    .bind(dids.iter().cloned().collect::<Vec<_>>())
    .fetch_one(&pool)
    .await
    .unwrap();
    let changed = sqlx::query(
        "UPDATE profiles SET cid = 'bafytampered', display_name = 'tampered' WHERE did = $1",
    )
    .bind(&victim)
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(changed, 1);
    sqlx::query(
        "INSERT INTO records (uri, cid, did, collection, rkey, value) \
         VALUES ($1, 'bafyextra', $2, 'com.example.status', 'extra', '{}')",
    )
    .bind(format!("at://{victim}/com.example.status/extra"))
    .bind(&victim)
    .execute(&pool)
    .await
    .unwrap();
    dids.insert(victim);

    let list: Vec<&str> = dids.iter().map(String::as_str).collect();
    queue(&pool, &list).await;
    resync_until_idle(&pool, &net, None).await;
    common::assert_matches_truth(&pool, &truth).await;
    let states: Vec<(String, String)> =
        sqlx::query_as("SELECT sync_state, rev FROM actors WHERE did = ANY($1)")
            .bind(&list)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        states.iter().all(|(s, _)| s == "synchronized"),
        "{states:?}"
    );
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM resync_queue")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 0);
    for did in &dids {
        assert_eq!(net.requests(standin::GET_REPO, did), 1, "{did}");
    }
}

#[sqlx::test(migrations = false)]
async fn failing_pds_backs_off_and_permanent_failures_leave_the_queue(pool: sqlx::PgPool) {
    prepare(&pool).await;
    let net = StandIn::snap().await;
    let dids = net.network().fetchable_dids();
    let (failing, stalled, gone) = (&dids[0], &dids[1], &dids[2]);
    net.fail(failing, Failure::Status(503));
    net.fail(stalled, Failure::Stall);
    net.fail(gone, Failure::NotFound);
    queue(&pool, &[failing, stalled, gone]).await;
    resync_until_idle(&pool, &net, None).await;

    let queue_row = async |did: &str| -> Option<(i32, f64, String)> {
        sqlx::query_as(
            "SELECT attempts, EXTRACT(EPOCH FROM next_attempt_at - now())::float8, last_error \
             FROM resync_queue WHERE did = $1",
        )
        .bind(did)
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    let state = async |did: &str| -> (String, Option<String>) {
        sqlx::query_as("SELECT sync_state, sync_reason FROM actors WHERE did = $1")
            .bind(did)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    for (did, reason) in [(failing, "xrpc_error"), (stalled, "timeout")] {
        let (attempts, wait, error) = queue_row(did).await.unwrap();
        assert_eq!(attempts, 1);
        assert!((50.0..=61.0).contains(&wait), "first backoff {wait}s");
        assert!(error.starts_with(reason), "{error}");
        assert_eq!(state(did).await.0, "desynchronized");
    }
    assert!(
        queue_row(gone).await.is_none(),
        "a missing repo leaves the queue"
    );
    let (st, reason) = state(gone).await;
    assert_eq!(st, "desynchronized");
    assert!(reason.unwrap().starts_with("repo_not_found"));

    // Backing off: nothing is due, nothing is fetched.
    resync_until_idle(&pool, &net, None).await;
    assert_eq!(net.requests(standin::GET_REPO, failing), 1);
    // The minute passes; still failing: the wait doubles.
    sqlx::query("UPDATE resync_queue SET next_attempt_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    net.heal(stalled);
    resync_until_idle(&pool, &net, None).await;
    let (attempts, wait, _) = queue_row(failing).await.unwrap();
    assert_eq!(attempts, 2);
    assert!((110.0..=121.0).contains(&wait), "second backoff {wait}s");
    assert_eq!(state(stalled).await.0, "synchronized");
    // Healed and due again: synchronized, out of the queue.
    net.heal(failing);
    sqlx::query("UPDATE resync_queue SET next_attempt_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    resync_until_idle(&pool, &net, None).await;
    assert!(queue_row(failing).await.is_none());
    assert_eq!(state(failing).await, ("synchronized".into(), None));
    assert_eq!(net.requests(standin::GET_REPO, failing), 3);
    common::assert_aggregates_consistent(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn a_bad_signature_refreshes_the_identity_once(pool: sqlx::PgPool) {
    prepare(&pool).await;
    let net = StandIn::snap().await;
    let dids = net.network().fetchable_dids();
    let (did, other) = (&dids[0], &dids[1]);
    // `did`'s document carries another account's key.
    let mut wrong = net.recorded_doc(did);
    wrong["verificationMethod"] = net.recorded_doc(other)["verificationMethod"].clone();
    net.set_doc(did, wrong);
    queue(&pool, &[did]).await;
    resync_until_idle(&pool, &net, None).await;
    assert_eq!(
        net.requests(standin::PLC, did),
        2,
        "resolved, then refreshed once"
    );
    let (state, reason): (String, Option<String>) =
        sqlx::query_as("SELECT sync_state, sync_reason FROM actors WHERE did = $1")
            .bind(did)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "desynchronized");
    assert!(reason.unwrap().starts_with("bad_signature"));

    // A rotated key: the cached document is stale, the refreshed one verifies.
    let resolver = Arc::new(Resolver::new(net.identity_config()).unwrap());
    resolver.resolve(did).await.unwrap();
    net.heal(did);
    queue(&pool, &[did]).await;
    let resyncer = resyncer_for(&pool, &net, Some(resolver), Arc::default()).await;
    resync_until_idle(&pool, &net, Some(resyncer)).await;
    let state: String = sqlx::query_scalar("SELECT sync_state FROM actors WHERE did = $1")
        .bind(did)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "synchronized");
    assert_eq!(net.requests(standin::PLC, did), 4);
}

#[sqlx::test(migrations = false)]
async fn held_events_are_released_and_an_overflow_resyncs_again(pool: sqlx::PgPool) {
    prepare(&pool).await;
    let net = StandIn::snap().await;
    let did = net.network().fetchable_dids()[0].clone();
    let commits: Vec<_> = frames()
        .iter()
        .filter_map(|f| atproto_ingest::firehose::decode(f).ok())
        .map(|d| d.event)
        .filter(|e| matches!(&e.kind, EventKind::Commit(c) if c.repo == did))
        .collect();
    assert!(commits.len() >= 3);
    // Held commits are all older than the CAR (taken after the last frame): skipped.
    let held = Arc::new(Held::default());
    for e in &commits {
        held.push(e.clone()).unwrap();
    }
    queue(&pool, &[&did]).await;
    let resyncer = resyncer_for(&pool, &net, None, held.clone()).await;
    resync_until_idle(&pool, &net, Some(resyncer)).await;
    assert!(!held.is_holding(&did));
    assert_eq!(held.sizes(), (0, 0, 0));
    let truth = common::truth("snap");
    let want: BTreeSet<String> = truth
        .live
        .values()
        .flatten()
        .filter(|u| u.starts_with(&format!("at://{did}/")))
        .cloned()
        .collect();
    let got: BTreeSet<String> = common::stored(&pool)
        .await
        .into_values()
        .flatten()
        .collect();
    assert_eq!(got, want);

    // Past the per-repo bound the held events are dropped: the repo is resynced again.
    let held = Arc::new(Held::new(HeldLimits {
        max_events: 100,
        max_bytes: usize::MAX,
        max_events_per_repo: 1,
    }));
    held.push(commits[0].clone()).unwrap();
    assert!(held.push(commits[1].clone()).is_err());
    queue(&pool, &[&did]).await;
    let resyncer = resyncer_for(&pool, &net, None, held.clone()).await;
    let resyncer = Arc::new(resyncer);
    let claim = {
        let dp = common::deadpool(&pool, 1).await;
        let c = dp.get().await.unwrap();
        atproto_ingest::repos::claim_due(&**c, 1).await.unwrap()
    };
    assert_eq!(claim.len(), 1);
    resyncer
        .resync(&did, &CancellationToken::new())
        .await
        .unwrap();
    let (state, reason): (String, Option<String>) =
        sqlx::query_as("SELECT sync_state, sync_reason FROM actors WHERE did = $1")
            .bind(&did)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("desynchronized", Some("held_overflow"))
    );
    assert!(!held.is_holding(&did));
}

#[sqlx::test(migrations = false)]
async fn replay_with_resync_repairs_damaged_commits_before_it_returns(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let fetchable: BTreeSet<String> = net.network().fetchable_dids().into_iter().collect();
    let mut all = frames();
    // A create whose record block is missing from its CAR: the op cannot be applied and the
    // repo is queued for a resync (`block_missing`).
    let (idx, did) = all
        .iter()
        .enumerate()
        .find_map(|(i, f)| {
            let ev = atproto_ingest::firehose::decode(f).ok()?.event;
            match ev.kind {
                EventKind::Commit(c)
                    if fetchable.contains(&c.repo)
                        && c.ops.len() == 1
                        && c.ops[0].action == Action::Create =>
                {
                    Some((i, c.repo))
                }
                _ => None,
            }
        })
        .unwrap();
    let mut frame = Frame::parse(&all[idx]);
    let (roots, blocks) = frame.car();
    let record_cid = match &frame.ops()[0]["cid"] {
        ipld_core::ipld::Ipld::Link(c) => *c,
        other => panic!("{other:?}"),
    };
    let kept: Vec<_> = blocks
        .into_iter()
        .filter(|(c, _)| *c != record_cid)
        .collect();
    frame.set_car(&roots, &kept);
    all[idx] = frame.encode();
    let file = tempfile::NamedTempFile::new().unwrap();
    write_fixture(file.path(), &all);

    let db = common::db_config(&pool);
    let mut cfg = replay_cfg();
    cfg.users.identity = net.identity_config();
    cfg.users.identity.resolve_identities = false;
    let stats = Arc::new(Stats::default());
    replay_with_resync(
        &db,
        vec![file.path().to_owned()],
        cfg,
        Some(resync_cfg()),
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .unwrap();
    assert_eq!(stats.unavailable("block_missing"), 1);
    assert_eq!(net.requests(standin::GET_REPO, &did), 1);
    assert_eq!(net.total_requests(standin::GET_REPO), 1);
    common::assert_matches_truth(&pool, &common::truth("snap")).await;
    let state: String = sqlx::query_scalar("SELECT sync_state FROM actors WHERE did = $1")
        .bind(&did)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "synchronized");
}

#[sqlx::test(migrations = false)]
async fn half_a_replay_then_backfill_then_the_rest_is_the_truth(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let half = common::first_frames("snap.frames", 1500);
    replay_file(&pool, half.path()).await;
    let report = crate::backfill::run(&pool, crate::backfill::config(&net, 100)).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    replay_file(&pool, &common::fixture("snap.frames")).await;
    common::assert_matches_truth(&pool, &common::truth("snap")).await;
    let states: BTreeMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT sync_state, count(*) FROM actors GROUP BY 1")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(states.get("desynchronized"), None, "{states:?}");
}
