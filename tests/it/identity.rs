//! Identity resolution against a real local HTTP server playing the PLC directory, did:web
//! hosts and handle `.well-known` endpoints (slow, failing or lying on demand).
use crate::common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atproto_ingest::identity::{
    Creation, IdentityConfig, IdentityError, Resolver, StubReason, UserCreator,
};
use futures_util::future::join_all;

use common::fake_identity::{doc, Server};

fn did(n: usize) -> String {
    format!("did:plc:user{n:04}aaaaaaaaaaaaaaaaa")
}

#[tokio::test]
async fn extracts_identity_and_flags_handles_that_do_not_point_back() {
    let server = Server::start().await;
    server.account("did:plc:alice", "alice.example.com", true);
    server.account("did:plc:mallory", "bob.example.com", false);
    server.account("did:plc:bob", "bob.example.com", true);
    server.account("did:plc:carol", "carol.example.com", false); // handle 404
    server.account("did:web:web.example.com", "web.example.com", true);
    let resolver = Resolver::new(server.config()).unwrap();

    let alice = resolver.resolve("did:plc:alice").await.unwrap();
    assert_eq!(alice.handle.as_deref(), Some("alice.example.com"));
    assert!(alice.handle_valid);
    assert_eq!(
        alice.pds_endpoint.as_deref(),
        Some("https://pds.alice.example.com")
    );
    assert_eq!(alice.signing_key.as_deref(), Some("zKey-alice.example.com"));

    let mallory = resolver.resolve("did:plc:mallory").await.unwrap();
    assert_eq!(mallory.handle.as_deref(), Some("bob.example.com"), "kept");
    assert!(
        !mallory.handle_valid,
        "bob.example.com points to did:plc:bob"
    );
    assert!(resolver.resolve("did:plc:bob").await.unwrap().handle_valid);

    let carol = resolver.resolve("did:plc:carol").await.unwrap();
    assert_eq!(carol.handle.as_deref(), Some("carol.example.com"));
    assert!(!carol.handle_valid);

    let web = resolver.resolve("did:web:web.example.com").await.unwrap();
    assert!(web.handle_valid);
    assert_eq!(server.requests("/web/web.example.com"), 1);
}

#[tokio::test]
async fn bad_documents_and_failures_are_errors_then_stubs() {
    let server = Server::start().await;
    {
        let mut fake = server.fake();
        fake.docs.insert(
            "did:plc:other".into(),
            (200, doc("did:plc:someoneelse", "x.example.com")),
        );
        fake.docs
            .insert("did:plc:garbage".into(), (200, "{not json".into()));
        fake.docs
            .insert("did:plc:list".into(), (200, "[1,2,3]".into()));
        fake.docs
            .insert("did:plc:huge".into(), (200, "x".repeat(200_000)));
        fake.docs
            .insert("did:plc:broken".into(), (500, "oops".into()));
    }
    let resolver = Resolver::new(server.config()).unwrap();
    let kind = |r: Result<_, IdentityError>| r.err().map(|e| e.kind());
    assert_eq!(
        kind(resolver.resolve("did:plc:other").await),
        Some("malformed")
    );
    assert_eq!(
        kind(resolver.resolve("did:plc:garbage").await),
        Some("malformed")
    );
    assert_eq!(
        kind(resolver.resolve("did:plc:list").await),
        Some("malformed")
    );
    assert_eq!(
        kind(resolver.resolve("did:plc:huge").await),
        Some("malformed")
    );
    assert_eq!(
        kind(resolver.resolve("did:plc:broken").await),
        Some("http_status")
    );
    assert_eq!(
        kind(resolver.resolve("did:plc:missing").await),
        Some("not_found")
    );
    assert_eq!(
        kind(resolver.resolve("not-a-did").await),
        Some("invalid_did")
    );
    assert_eq!(
        kind(resolver.resolve("did:key:z6Mkabc").await),
        Some("invalid_did")
    );

    let creator = UserCreator::new(server.config()).unwrap();
    let base = server.config().retry_base;
    for (prior, expected) in [(0, base), (1, base * 2), (3, base * 8)] {
        match creator.create("did:plc:broken", prior).await {
            Creation::Stub {
                reason: StubReason::Failed(_),
                failures,
                retry_after,
                ..
            } => {
                assert_eq!(failures, prior + 1);
                assert_eq!(retry_after, Some(expected));
            }
            other => panic!("expected a stub, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_slow_did_never_stalls_the_others() {
    let server = Server::start().await;
    for n in 0..8 {
        server.account(&did(n), &format!("u{n}.example.com"), true);
    }
    let slow = did(99);
    server.account(&slow, "slow.example.com", true);
    server
        .fake()
        .delays
        .insert(slow.clone(), Duration::from_secs(3));
    let creator = UserCreator::new(IdentityConfig {
        concurrency: 2,
        timeout: Duration::from_millis(500),
        ..server.config()
    })
    .unwrap();

    let started = Instant::now();
    let slow_task = {
        let creator = creator.clone();
        let slow = slow.clone();
        tokio::spawn(async move { (creator.create(&slow, 0).await, started.elapsed()) })
    };
    // Let the slow one take its permit first.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let fast = join_all((0..8).map(|n| {
        let creator = creator.clone();
        async move { (creator.create(&did(n), 0).await, started.elapsed()) }
    }))
    .await;
    for (creation, elapsed) in &fast {
        assert!(!creation.is_stub(), "{creation:?}");
        assert!(
            elapsed < &Duration::from_millis(450),
            "fast DID took {elapsed:?}"
        );
    }
    let (creation, elapsed) = slow_task.await.unwrap();
    match creation {
        Creation::Stub {
            reason: StubReason::Failed(IdentityError::Timeout(_)),
            failures: 1,
            retry_after: Some(retry),
            ..
        } => assert_eq!(retry, server.config().retry_base),
        other => panic!("expected a timed-out stub, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_millis(1500),
        "slow DID took {elapsed:?}"
    );
}

#[tokio::test]
async fn concurrency_never_exceeds_the_permits() {
    const PERMITS: usize = 3;
    let server = Server::start().await;
    for n in 0..30 {
        server.account(&did(n), &format!("u{n}.example.com"), true);
    }
    server.fake().default_delay = Duration::from_millis(100);
    let creator = UserCreator::new(IdentityConfig {
        concurrency: PERMITS,
        ..server.config()
    })
    .unwrap();

    let results = join_all((0..30).map(|n| {
        let creator = creator.clone();
        async move { creator.create(&did(n), 0).await }
    }))
    .await;
    assert!(results.iter().all(|c| !c.is_stub()));
    assert_eq!(
        server.total_requests(),
        60,
        "one document and one handle each"
    );
    let max = server.shared.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(
        max, PERMITS,
        "observed max in flight must reach, never pass, the permits"
    );
    assert_eq!(creator.available_permits(), PERMITS);
}

#[tokio::test]
async fn cache_answers_repeats_and_invalidation_refreshes_the_handle() {
    let server = Server::start().await;
    server.account("did:plc:alice", "alice.example.com", true);
    let creator = UserCreator::new(server.config()).unwrap();
    let resolver = creator.resolver().unwrap().clone();

    let first = resolver.resolve("did:plc:alice").await.unwrap();
    let second = resolver.resolve("did:plc:alice").await.unwrap();
    assert_eq!(first, second);
    assert_eq!(server.requests("/plc/did:plc:alice"), 1);
    assert_eq!(server.requests("/handle/alice.example.com"), 1);
    assert_eq!(resolver.cache_sizes(), (1, 1));

    // An #identity event: the account moved to a new handle.
    server.account("did:plc:alice", "alice2.example.com", true);
    resolver.invalidate("did:plc:alice");
    let third = resolver.resolve("did:plc:alice").await.unwrap();
    assert_eq!(server.requests("/plc/did:plc:alice"), 2);
    assert_eq!(third.handle.as_deref(), Some("alice2.example.com"));
    assert!(third.handle_valid);
    assert_eq!(server.requests("/handle/alice2.example.com"), 1);
}

#[tokio::test]
async fn switched_off_resolution_makes_stubs_without_network() {
    let server = Server::start().await;
    server.account("did:plc:alice", "alice.example.com", true);
    let creator = UserCreator::new(IdentityConfig {
        resolve_identities: false,
        ..server.config()
    })
    .unwrap();
    assert!(creator.resolver().is_none());
    match creator.create("did:plc:alice", 0).await {
        Creation::Stub {
            reason: StubReason::Disabled,
            retry_after: None,
            ..
        } => {}
        other => panic!("expected a disabled stub, got {other:?}"),
    }
    assert_eq!(server.total_requests(), 0);
}

#[tokio::test]
async fn closing_the_creator_ends_waiting_creations_as_stubs() {
    let server = Server::start().await;
    server.account("did:plc:alice", "alice.example.com", true);
    let creator = UserCreator::new(server.config()).unwrap();
    creator.close();
    let creation = creator.create("did:plc:alice", 0).await;
    assert!(matches!(
        creation,
        Creation::Stub {
            reason: StubReason::Failed(IdentityError::ShuttingDown),
            ..
        }
    ));
    assert_eq!(server.total_requests(), 0);
}

/// A fresh database with the schema applied, dropped by the caller via `drop_db`.
async fn fresh_db() -> (tokio_postgres::Client, String) {
    const ADMIN: &str = "host=127.0.0.1 user=postgres dbname=postgres";
    let name = format!(
        "identity_test_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let (admin, conn) = tokio_postgres::connect(ADMIN, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 user=postgres dbname={name}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(include_str!("../../migrations/20261121000001_init.sql"))
        .await
        .unwrap();
    (client, name)
}

async fn drop_db(client: tokio_postgres::Client, name: &str) {
    drop(client);
    let (admin, conn) = tokio_postgres::connect(
        "host=127.0.0.1 user=postgres dbname=postgres",
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test]
async fn outcomes_are_written_to_actors() {
    use atproto_ingest::identity::{store_failure, store_resolved, Identity};
    let (db, name) = fresh_db().await;
    db.batch_execute("INSERT INTO actors (did) VALUES ('did:plc:alice'), ('did:plc:bob')")
        .await
        .unwrap();

    let n = store_failure(&db, "did:plc:bob", 3, Duration::from_secs(240))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let row = db
        .query_one(
            "SELECT resolve_failures, \
             extract(epoch FROM next_resolve_at - now())::float8 AS wait, resolved_at IS NULL \
             FROM actors WHERE did = 'did:plc:bob'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    let wait: f64 = row.get(1);
    assert!(
        (230.0..=241.0).contains(&wait),
        "next_resolve_at in {wait} s"
    );
    assert!(row.get::<_, bool>(2));

    let identity = Identity {
        did: "did:plc:bob".into(),
        handle: Some("bob.example.com".into()),
        handle_valid: false,
        pds_endpoint: Some("https://pds.example.com".into()),
        signing_key: Some("zKey".into()),
    };
    assert_eq!(store_resolved(&db, &identity).await.unwrap(), 1);
    let row = db
        .query_one(
            "SELECT handle, handle_valid, pds_endpoint, signing_key, resolve_failures, \
             next_resolve_at IS NULL, resolved_at IS NOT NULL FROM actors WHERE did = 'did:plc:bob'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("bob.example.com")
    );
    assert_eq!(row.get::<_, Option<bool>>(1), Some(false));
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("https://pds.example.com")
    );
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("zKey"));
    assert_eq!(row.get::<_, i32>(4), 0);
    assert!(row.get::<_, bool>(5) && row.get::<_, bool>(6));

    let absent = Identity {
        did: "did:plc:nobody".into(),
        ..identity
    };
    assert_eq!(store_resolved(&db, &absent).await.unwrap(), 0, "no row yet");
    drop_db(db, &name).await;
}

/// An `#identity` event emitted before the identity's last resolution does not undo it (the
/// users stage refreshes on `#identity`, and the refresh may commit before the event is
/// written); one emitted after it stores its handle, unverified.
#[sqlx::test(migrations = "./migrations")]
async fn an_identity_event_older_than_the_last_resolution_keeps_the_verified_handle(
    pg: sqlx::PgPool,
) {
    use atproto_ingest::cursor::{self, CursorKey};
    use atproto_ingest::firehose::event::Identity as IdentityEvent;
    use atproto_ingest::firehose::{Event, EventKind};
    use atproto_ingest::identity::{store_resolved, Identity};
    use atproto_ingest::txn::{run_tx, RetryPolicy};
    use atproto_ingest::writer;
    use tokio_util::sync::CancellationToken;

    let pool = common::deadpool(&pg, 1).await;
    let key = CursorKey {
        service: "identity-order.test".into(),
        fence: 1,
    };
    cursor::claim_fence(&pool, &key.service, 1).await.unwrap();
    let did = "did:plc:dana";
    let event = |seq: i64, handle: &str, time: chrono::DateTime<chrono::Utc>| Event {
        seq,
        kind: EventKind::Identity(IdentityEvent {
            did: did.into(),
            handle: Some(handle.into()),
            time: time.to_rfc3339(),
        }),
    };
    let apply = async |ev: Event| {
        run_tx(
            &pool,
            &RetryPolicy::default(),
            &CancellationToken::new(),
            async |tx| writer::apply(tx, std::slice::from_ref(&ev), None, &key).await,
        )
        .await
        .unwrap();
    };
    let handle = async || -> (Option<String>, Option<bool>) {
        sqlx::query_as("SELECT handle, handle_valid FROM actors WHERE did = $1")
            .bind(did)
            .fetch_one(&pg)
            .await
            .unwrap()
    };

    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    apply(event(1, "old.dana.test", before)).await;
    assert_eq!(handle().await, (Some("old.dana.test".into()), Some(false)));
    // The refresh the event triggered resolves the current handle, both ways.
    let client = pool.get().await.unwrap();
    let resolved = Identity {
        did: did.into(),
        handle: Some("dana.test".into()),
        handle_valid: true,
        pds_endpoint: Some("https://pds.dana.test".into()),
        signing_key: None,
    };
    store_resolved(&**client, &resolved).await.unwrap();
    drop(client);
    // The same event written again after it (a replay, a retried batch): no change.
    apply(event(2, "old.dana.test", before)).await;
    assert_eq!(handle().await, (Some("dana.test".into()), Some(true)));
    // A later change of handle: stored, unverified until resolved again.
    let after = chrono::Utc::now() + chrono::Duration::seconds(1);
    apply(event(3, "new.dana.test", after)).await;
    assert_eq!(handle().await, (Some("new.dana.test".into()), Some(false)));
}
