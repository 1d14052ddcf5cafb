//! The users stage end to end: fixture replays with identity resolution on, against a local
//! HTTP server playing the PLC directory and handle hosts (slow, failing or hanging on
//! demand), into real PostgreSQL databases, compared with the fixture's truth.
use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::firehose::fixture::{open, FrameReader, RawFrame};
use atproto_ingest::identity::{IdentityConfig, UserCreator};
use atproto_ingest::jobs::run_reresolve;
use atproto_ingest::pending::PendingConfig;
use atproto_ingest::pipeline::users::UsersConfig;
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::replay;
use common::fake_identity::Server;
use tokio_util::sync::CancellationToken;

/// How the fake PLC answers one DID.
#[derive(Clone, Copy)]
enum Doc {
    NotFound,
    Fail,
}

/// Serves a document for every DID of `fx` (handle = the truth's, pointing back), `special`
/// ones answering otherwise.
async fn start(fx: &Fixture, special: &[(&str, Doc)]) -> Server {
    let server = Server::start().await;
    for (did, handle) in &fx.handles {
        server.account(did, handle, true);
    }
    let mut fake = server.fake();
    for (did, answer) in special {
        match answer {
            Doc::NotFound => fake.docs.remove(*did),
            Doc::Fail => fake.docs.insert((*did).to_owned(), (500, String::new())),
        };
    }
    drop(fake);
    server
}

/// The identity settings of a replay that resolves through `server`.
fn identity(server: &Server, permits: usize, timeout: Duration) -> IdentityConfig {
    IdentityConfig {
        resolve_identities: true,
        concurrency: permits,
        timeout,
        ..server.config()
    }
}

/// What the test needs to know of `small.frames`.
struct Fixture {
    /// DID → truth handle.
    handles: BTreeMap<String, String>,
    /// DIDs in order of first appearance, with their first seq and event count.
    order: Vec<(String, i64, usize)>,
    events: usize,
}

fn small() -> Fixture {
    let truth = common::truth("small");
    let handles = truth
        .accounts
        .iter()
        .filter_map(|(d, (h, _))| h.clone().map(|h| (d.clone(), h)))
        .collect();
    let mut order: Vec<(String, i64, usize)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut events = 0;
    for f in FrameReader::new(open(&common::fixture("small.frames")).unwrap(), usize::MAX) {
        let RawFrame::Message(m) = f.unwrap() else {
            continue;
        };
        let Ok(d) = atproto_ingest::firehose::decode(&m) else {
            continue;
        };
        events += 1;
        if let Some(did) = d.event.kind.did() {
            let i = *index.entry(did.to_owned()).or_insert_with(|| {
                order.push((did.to_owned(), d.event.seq, 0));
                order.len() - 1
            });
            order[i].2 += 1;
        }
    }
    Fixture {
        handles,
        order,
        events,
    }
}

fn cfg(users: UsersConfig) -> PipelineConfig {
    let mut c = PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    });
    c.users = users;
    c
}

async fn run_replay(pool: &sqlx::PgPool, c: PipelineConfig) -> Arc<Stats> {
    let stats = Arc::new(Stats::default());
    replay(
        &common::db_config(pool),
        vec![common::fixture("small.frames")],
        c,
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .unwrap();
    stats
}

async fn cursor(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT seq FROM firehose_cursor WHERE service = 'replay'")
        .fetch_optional(pool)
        .await
        .unwrap()
}

type ActorRow = (
    String,
    Option<String>,
    Option<bool>,
    Option<String>,
    Option<String>,
    bool,
    i32,
    bool,
);

async fn actors(pool: &sqlx::PgPool) -> BTreeMap<String, ActorRow> {
    let rows: Vec<ActorRow> = sqlx::query_as(
        "SELECT did, handle, handle_valid, pds_endpoint, signing_key, resolved_at IS NOT NULL, \
         resolve_failures, next_resolve_at IS NOT NULL FROM actors",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|r| (r.0.clone(), r)).collect()
}

fn users_cfg(server: &Server, permits: usize, timeout: Duration, p: PendingConfig) -> UsersConfig {
    UsersConfig {
        pending: p,
        ..UsersConfig::resolving(identity(server, permits, timeout))
    }
}

#[sqlx::test(migrations = false)]
async fn resolving_replay_equals_truth_and_fills_identities(pool: sqlx::PgPool) {
    const PERMITS: usize = 3;
    let fx = small();
    let missing: Vec<&str> = fx.order.iter().take(3).map(|(d, ..)| d.as_str()).collect();
    let special: Vec<(&str, Doc)> = missing.iter().map(|d| (*d, Doc::NotFound)).collect();
    let server = start(&fx, &special).await;
    server.fake().default_delay = Duration::from_millis(5);
    // Bounds large enough that no DID is released early: every user is resolved first.
    let roomy = PendingConfig {
        max_dids: 1000,
        max_ops_per_did: 10_000,
        ..PendingConfig::default()
    };
    let c = users_cfg(&server, PERMITS, Duration::from_secs(5), roomy);
    let stats = run_replay(&pool, cfg(c)).await;

    common::assert_matches_truth(&pool, &common::truth("small")).await;
    assert_eq!(cursor(&pool).await, Some(2000));
    let u = &stats.users;
    eprintln!("{u:?}");
    assert_eq!(
        u.resolved.load(Ordering::Relaxed) as usize,
        fx.order.len() - missing.len()
    );
    assert_eq!(u.stubs.load(Ordering::Relaxed) as usize, missing.len());
    assert_eq!(u.evictions.load(Ordering::Relaxed), 0);
    assert_eq!(u.pending_dids.load(Ordering::Relaxed), 0);
    assert!(u.events_held.load(Ordering::Relaxed) > 0);
    assert!(
        server.max_in_flight() <= PERMITS,
        "{} requests at once with {PERMITS} permits",
        server.max_in_flight()
    );

    let actors = actors(&pool).await;
    for (did, handle) in &fx.handles {
        let a = &actors[did];
        if missing.contains(&did.as_str()) {
            assert!(!a.5, "{did} resolved");
            assert_eq!(a.6, 1, "{did}: one failure");
            assert!(a.7, "{did}: retry scheduled");
        } else {
            assert_eq!(a.1.as_deref(), Some(handle.as_str()));
            assert_eq!(a.2, Some(true), "{did}: handle verified");
            assert_eq!(
                a.3.as_deref(),
                Some(format!("https://pds.{handle}").as_str())
            );
            assert_eq!(a.4.as_deref(), Some(format!("zKey-{handle}").as_str()));
            assert!(a.5 && !a.7, "{did} resolved, nothing scheduled");
        }
    }

    // A second replay: every DID is known in the database, no user is created again.
    let before = server.total_requests();
    let again = run_replay(
        &pool,
        cfg(users_cfg(
            &server,
            PERMITS,
            Duration::from_secs(5),
            PendingConfig::default(),
        )),
    )
    .await;
    // Only the replayed `#identity` events refresh (document + handle each).
    let requests = server.total_requests() - before;
    let refreshes = again.users.refreshes.load(Ordering::Relaxed) as usize;
    assert!(
        requests <= 2 * refreshes,
        "{requests} requests, {refreshes} refreshes"
    );
    let u = &again.users;
    assert_eq!(u.resolved.load(Ordering::Relaxed), 0, "{u:?}");
    assert_eq!(u.stubs.load(Ordering::Relaxed), 0, "{u:?}");
    // Each DID is found in the database, or (under load, with the test's pool of 4 shared
    // with the writer's lanes) its lookup outlasted the pending map's bound of 100 events per
    // DID and its events went on at once: released, not created again.
    let released = u.overflows.load(Ordering::Relaxed) + u.evictions.load(Ordering::Relaxed);
    assert_eq!(
        (u.known_in_db.load(Ordering::Relaxed) + released) as usize,
        fx.order.len(),
        "{u:?}"
    );
    common::assert_matches_truth(&pool, &common::truth("small")).await;
}

#[sqlx::test(migrations = false)]
async fn tiny_bounds_and_a_slow_plc_still_equal_the_truth(pool: sqlx::PgPool) {
    let fx = small();
    let server = start(&fx, &[]).await;
    server.fake().default_delay = Duration::from_millis(60);
    let identity = identity(&server, 2, Duration::from_secs(5));
    let creator = UserCreator::new(identity.clone()).unwrap();
    let c = UsersConfig {
        // New accounts start with 4 events (#identity, #account, #sync, a commit) 4 seqs
        // apart: 4 per DID lets 5 DIDs fill the map (evictions), longer bursts overflow.
        pending: PendingConfig {
            max_dids: 5,
            max_ops_per_did: 4,
            ..PendingConfig::default()
        },
        ..UsersConfig::resolving(identity.clone())
    };
    let started = Instant::now();
    let stats = run_replay(&pool, cfg(c)).await;
    eprintln!("replay took {:?}", started.elapsed());
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    assert_eq!(cursor(&pool).await, Some(2000));
    let u = &stats.users;
    assert!(u.evictions.load(Ordering::Relaxed) > 0, "no eviction");
    assert!(u.overflows.load(Ordering::Relaxed) > 0, "no overflow");
    assert!(server.max_in_flight() <= 2);

    // Stubs released early are scheduled; the re-resolution job resolves them.
    let scheduled = actors(&pool).await.values().filter(|a| a.7).count();
    assert!(scheduled > 0, "evicted users are scheduled for resolution");
    server.fake().default_delay = Duration::ZERO;
    let deadpool = atproto_ingest::db::connect(&common::db_config(&pool))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let job = tokio::spawn(run_reresolve(
        deadpool,
        creator,
        Duration::from_millis(20),
        cancel.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let unresolved: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM actors WHERE resolved_at IS NULL AND status <> 'deleted'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if unresolved == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{unresolved} actors never resolved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    job.await.unwrap();
    common::assert_matches_truth(&pool, &common::truth("small")).await;
}

/// One DID whose PLC answer takes longer than the resolution timeout, five failing with 500:
/// everything else is written meanwhile.
#[sqlx::test(migrations = false)]
async fn slow_or_failing_dids_never_stall_the_others(pool: sqlx::PgPool) {
    const TIMEOUT: Duration = Duration::from_secs(6);
    let fx = small();
    let (slow, _, slow_events) = fx.order[fx.order.len() / 2].clone();
    let failing: Vec<&str> = fx
        .order
        .iter()
        .skip(1)
        .step_by(8)
        .map(|(d, ..)| d.as_str())
        .filter(|d| *d != slow)
        .take(5)
        .collect();
    let special: Vec<(&str, Doc)> = failing.iter().map(|d| (*d, Doc::Fail)).collect();
    let server = start(&fx, &special).await;
    server
        .fake()
        .delays
        .insert(slow.clone(), Duration::from_secs(30));
    let c = users_cfg(
        &server,
        4,
        TIMEOUT,
        PendingConfig {
            max_dids: 1000,
            max_ops_per_did: 10_000,
            ..PendingConfig::default()
        },
    );
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let run = tokio::spawn({
        let (db, stats) = (common::db_config(&pool), stats.clone());
        async move {
            replay(
                &db,
                vec![common::fixture("small.frames")],
                cfg(c),
                CancellationToken::new(),
                stats,
            )
            .await
        }
    });
    // Everything but the slow DID's events is written well before its resolution times out.
    loop {
        let written = stats.events_written.load(Ordering::Relaxed) as usize;
        if written + slow_events == fx.events {
            break;
        }
        assert!(
            started.elapsed() < TIMEOUT - Duration::from_secs(1),
            "only {written} of {} events written while one DID is slow",
            fx.events - slow_events
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started.elapsed() < TIMEOUT);
    assert_eq!(stats.users.pending_dids.load(Ordering::Relaxed), 1);
    run.await.unwrap().unwrap();
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    assert_eq!(cursor(&pool).await, Some(2000));
    let actors = actors(&pool).await;
    for did in failing.iter().copied().chain([slow.as_str()]) {
        let a = &actors[did];
        assert!(
            !a.5 && a.6 == 1 && a.7,
            "{did}: stub with a retry scheduled"
        );
    }
}

/// Killed (runtime torn down, no drain) while a DID's events are pending: the durable cursor
/// is below them, and a restart ends equal to the truth.
#[sqlx::test(migrations = false)]
async fn killed_while_ops_are_pending_loses_nothing(pool: sqlx::PgPool) {
    let fx = small();
    // A DID first seen mid-file, so batches before it carry a cursor.
    let (hung, first_seq, hung_events) = fx.order.iter().find(|o| o.1 > 200).unwrap().clone();
    let server = start(&fx, &[]).await;
    server
        .fake()
        .delays
        .insert(hung.clone(), Duration::from_secs(600));
    let pending = PendingConfig {
        max_dids: 1000,
        max_ops_per_did: 10_000,
        ..PendingConfig::default()
    };
    let c = users_cfg(&server, 4, Duration::from_secs(60), pending);

    // The "process": its own runtime, dropped without any shutdown of the pipeline.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stats = Arc::new(Stats::default());
    let db = common::db_config(&pool);
    rt.spawn({
        let stats = stats.clone();
        async move {
            replay(
                &db,
                vec![common::fixture("small.frames")],
                cfg(c),
                CancellationToken::new(),
                stats,
            )
            .await
        }
    });
    let started = Instant::now();
    while (stats.events_written.load(Ordering::Relaxed) as usize) + hung_events < fx.events {
        assert!(started.elapsed() < Duration::from_secs(20), "stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let min_pending = stats.users.min_pending_seq.load(Ordering::Relaxed);
    assert_eq!(min_pending, first_seq);
    assert_eq!(stats.users.pending_dids.load(Ordering::Relaxed), 1);
    rt.shutdown_background(); // kill -9: the pending ops are gone with the process

    // Every batch written carries a cursor below the pending ops: here exactly below them.
    let durable = cursor(&pool).await.unwrap();
    assert!(
        durable < min_pending,
        "cursor {durable} ≥ pending {min_pending}"
    );
    assert_eq!(durable, first_seq - 1);
    let hung_rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM posts WHERE did = $1) + (SELECT count(*) FROM likes WHERE did = $1) + (SELECT count(*) FROM follows WHERE did = $1)",
    )
    .bind(&hung)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(hung_rows, 0, "the pending DID's records were not written");

    // Restart (the PLC answers now): the replay ends equal to the truth.
    server.fake().delays.clear();
    let again = users_cfg(&server, 4, Duration::from_secs(5), pending);
    run_replay(&pool, cfg(again)).await;
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    assert_eq!(cursor(&pool).await, Some(2000));
    let seen: HashSet<String> = actors(&pool)
        .await
        .into_values()
        .filter(|a| a.5)
        .map(|a| a.0)
        .collect();
    assert!(
        seen.contains(&hung),
        "the hung DID resolved after the restart"
    );
}

/// Issue 9, "own every task": the pipeline dropped (a leader that lost its lease aborts its
/// term this way) while user creations wait on a slow PLC writes nothing to `actors`
/// afterwards, and the PLC gets no new request: the creations, their identity resolutions and
/// the stub scheduler all stop with the pipeline.
#[sqlx::test(migrations = false)]
async fn dropping_the_pipeline_stops_user_creations_in_flight(pool: sqlx::PgPool) {
    const DELAY: Duration = Duration::from_millis(1500);
    let fx = small();
    let server = start(&fx, &[]).await;
    server.fake().default_delay = DELAY;
    // Roomy bounds: every DID's events wait for its creation.
    let c = users_cfg(
        &server,
        4,
        Duration::from_secs(30),
        PendingConfig {
            max_dids: 1000,
            max_ops_per_did: 10_000,
            ..PendingConfig::default()
        },
    );
    let stats = Arc::new(Stats::default());
    let run = tokio::spawn({
        let (db, stats) = (common::db_config(&pool), stats.clone());
        async move {
            replay(
                &db,
                vec![common::fixture("small.frames")],
                cfg(c),
                CancellationToken::new(),
                stats,
            )
            .await
        }
    });
    // Creations are waiting on the PLC (and more on the permits) before any resolves.
    let started = Instant::now();
    while server.shared.in_flight.load(Ordering::SeqCst) < 4
        || stats.users.pending_dids.load(Ordering::Relaxed) == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no creation in flight: {} requests, {} pending DIDs, {:?}",
            server.shared.in_flight.load(Ordering::SeqCst),
            stats.users.pending_dids.load(Ordering::Relaxed),
            stats.users
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stats.users.resolved.load(Ordering::Relaxed), 0);

    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    // Let statements already on the wire land before taking the snapshot.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rows = actors(&pool).await;
    let requests = server.total_requests();

    // Well past the time every creation waiting at the drop would have taken to finish.
    tokio::time::sleep(DELAY * 3).await;
    let after = actors(&pool).await;
    assert_eq!(
        after.len(),
        rows.len(),
        "actors rows written after the pipeline was dropped"
    );
    assert_eq!(after, rows, "actors changed after the pipeline was dropped");
    assert_eq!(
        server.total_requests(),
        requests,
        "the PLC got requests after the pipeline was dropped"
    );
    assert_eq!(server.shared.in_flight.load(Ordering::SeqCst), 0);
}

/// The first two `#identity` frames of `small.frames` with a handle, as (did, handle, frame).
fn identity_frames() -> Vec<(String, String, Vec<u8>)> {
    use atproto_ingest::firehose::EventKind;
    let mut out = Vec::new();
    for f in FrameReader::new(open(&common::fixture("small.frames")).unwrap(), usize::MAX) {
        let RawFrame::Message(m) = f.unwrap() else {
            continue;
        };
        if let Ok(d) = atproto_ingest::firehose::decode(&m) {
            if let EventKind::Identity(i) = d.event.kind {
                if let Some(h) = i.handle {
                    out.push((i.did, h, m));
                }
            }
        }
        if out.len() == 2 {
            break;
        }
    }
    out
}

#[sqlx::test(migrations = false)]
async fn a_handle_from_an_identity_event_is_unverified_until_resolution_confirms_it(
    pool: sqlx::PgPool,
) {
    let frames = identity_frames();
    let [(same_did, same_handle, _), (new_did, new_handle, _)] = &frames[..] else {
        panic!("two #identity frames");
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.frames");
    let raw: Vec<Vec<u8>> = frames.iter().map(|f| f.2.clone()).collect();
    common::reframe::write_fixture(&path, &raw);
    let replay_identities = |users: UsersConfig| {
        let pool = pool.clone();
        let path = path.clone();
        async move {
            let mut c = cfg(users);
            c.batch_max_ops = 1;
            replay(
                &common::db_config(&pool),
                vec![path],
                c,
                CancellationToken::new(),
                Arc::new(Stats::default()),
            )
            .await
            .unwrap();
        }
    };
    // A first replay creates the schema and the two actors; then both are made verified, one
    // with the handle its event repeats, the other with an older handle.
    replay_identities(UsersConfig::default()).await;
    sqlx::query(
        "UPDATE actors SET handle = CASE did WHEN $1 THEN $2 ELSE 'old.test' END, \
         handle_valid = true",
    )
    .bind(same_did)
    .bind(same_handle)
    .execute(&pool)
    .await
    .unwrap();
    replay_identities(UsersConfig::default()).await;
    let rows = actors(&pool).await;
    assert_eq!(
        (rows[same_did].1.as_deref(), rows[same_did].2),
        (Some(same_handle.as_str()), Some(true)),
        "an unchanged handle keeps its verification"
    );
    assert_eq!(
        (rows[new_did].1.as_deref(), rows[new_did].2),
        (Some(new_handle.as_str()), Some(false)),
        "a new handle from #identity is stored unverified"
    );

    // Resolution (the users stage refreshes on #identity) confirms it both ways.
    let server = Server::start().await;
    server.account(new_did, new_handle, true);
    server.account(same_did, same_handle, true);
    replay_identities(UsersConfig::resolving(identity(
        &server,
        2,
        Duration::from_secs(5),
    )))
    .await;
    let rows = actors(&pool).await;
    assert_eq!(
        (rows[new_did].1.as_deref(), rows[new_did].2),
        (Some(new_handle.as_str()), Some(true)),
        "verified by resolution"
    );
}
