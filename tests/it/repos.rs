//! Repo sync state against a real database: a break desynchronizes a repo and queues it once,
//! workers claim due repos without overlap, failures back off, a finished resync
//! synchronizes the repo unless it broke again meanwhile.
use crate::common::deadpool;

use atproto_ingest::repos::{self, Claim};
use sqlx::PgPool;

async fn state(pg: &PgPool, did: &str) -> (String, Option<String>, bool) {
    sqlx::query_as("SELECT sync_state, sync_reason, needs_resync FROM actors WHERE did = $1")
        .bind(did)
        .fetch_one(pg)
        .await
        .unwrap()
}

async fn queue(pg: &PgPool) -> Vec<(String, String, i32, f64)> {
    sqlx::query_as(
        "SELECT did, reason, attempts, extract(epoch FROM next_attempt_at - now())::float8 \
         FROM resync_queue ORDER BY did",
    )
    .fetch_all(pg)
    .await
    .unwrap()
}

#[sqlx::test(migrations = "./migrations")]
async fn a_break_queues_one_resync_and_claims_do_not_overlap(pg: PgPool) {
    let pool = deadpool(&pg, 2).await;
    let client = pool.get().await.unwrap();
    let marks = vec![
        ("did:plc:b".to_owned(), "too_big"),
        ("did:plc:a".to_owned(), "chain_broken"),
        ("did:plc:a".to_owned(), "again"),
    ];
    assert_eq!(repos::desynchronize(&**client, &marks).await.unwrap(), 2);
    // Marking again changes nothing and keeps one queue row each.
    assert_eq!(repos::desynchronize(&**client, &marks).await.unwrap(), 0);
    assert_eq!(
        state(&pg, "did:plc:a").await,
        ("desynchronized".into(), Some("chain_broken".into()), true)
    );
    assert_eq!(queue(&pg).await.len(), 2);

    let first = repos::claim_due(&**client, 1).await.unwrap();
    let other = pool.get().await.unwrap();
    let second = repos::claim_due(&**other, 5).await.unwrap();
    assert_eq!(first.len() + second.len(), 2);
    assert_ne!(first[0].did, second[0].did, "no repo is claimed twice");
    assert!(repos::claim_due(&**client, 5).await.unwrap().is_empty());
    assert_eq!(state(&pg, &first[0].did).await.0, "resyncing");
}

#[sqlx::test(migrations = "./migrations")]
async fn failures_back_off_and_success_synchronizes(pg: PgPool) {
    let pool = deadpool(&pg, 1).await;
    let client = pool.get().await.unwrap();
    let did = "did:plc:x".to_owned();
    repos::desynchronize(&**client, &[(did.clone(), "too_big")])
        .await
        .unwrap();
    let claim = repos::claim_due(&**client, 1).await.unwrap().remove(0);
    assert_eq!(
        claim,
        Claim {
            did: did.clone(),
            reason: "too_big".into(),
            attempts: 1
        }
    );
    repos::resync_failed(&**client, &claim, "pds unreachable")
        .await
        .unwrap();
    let q = queue(&pg).await;
    assert!(
        (55.0..=60.0).contains(&q[0].3),
        "first retry in a minute: {q:?}"
    );
    assert_eq!(state(&pg, &did).await.0, "desynchronized");
    assert!(repos::claim_due(&**client, 1).await.unwrap().is_empty());

    // Due again: a second failure waits two minutes.
    sqlx::query("UPDATE resync_queue SET next_attempt_at = now()")
        .execute(&pg)
        .await
        .unwrap();
    let claim = repos::claim_due(&**client, 1).await.unwrap().remove(0);
    assert_eq!(claim.attempts, 2);
    repos::resync_failed(&**client, &claim, "timeout")
        .await
        .unwrap();
    assert!((115.0..=120.0).contains(&queue(&pg).await[0].3));

    sqlx::query("UPDATE resync_queue SET next_attempt_at = now()")
        .execute(&pg)
        .await
        .unwrap();
    repos::claim_due(&**client, 1).await.unwrap();
    assert!(repos::resynced(&**client, &did, "3rev", "bdata", "bcommit")
        .await
        .unwrap());
    assert_eq!(state(&pg, &did).await, ("synchronized".into(), None, false));
    assert!(queue(&pg).await.is_empty());
    let heads = repos::heads(&**client, std::slice::from_ref(&did))
        .await
        .unwrap();
    assert_eq!(heads[0].1.rev.as_deref(), Some("3rev"));
    assert_eq!(heads[0].1.data.as_deref(), Some("bdata"));
}

#[sqlx::test(migrations = "./migrations")]
async fn a_break_during_a_resync_keeps_the_repo_queued(pg: PgPool) {
    let pool = deadpool(&pg, 1).await;
    let client = pool.get().await.unwrap();
    let did = "did:plc:y".to_owned();
    repos::desynchronize(&**client, &[(did.clone(), "too_big")])
        .await
        .unwrap();
    repos::claim_due(&**client, 1).await.unwrap();
    repos::desynchronize(&**client, &[(did.clone(), "chain_broken")])
        .await
        .unwrap();
    assert!(
        !repos::resynced(&**client, &did, "3rev", "bdata", "bcommit")
            .await
            .unwrap()
    );
    assert_eq!(state(&pg, &did).await.0, "desynchronized");
    assert_eq!(queue(&pg).await.len(), 1);
    let (by_state, queued) = repos::counts(&**client).await.unwrap();
    assert_eq!(
        by_state,
        vec![("synchronized", 0), ("desynchronized", 1), ("resyncing", 0)]
    );
    assert_eq!(queued, 1);
}

/// A live batch planned while a resync holds the repo's row waits for it, then sees the
/// resync's head: a commit the CAR already holds is skipped, and the repo's rev never moves
/// back (read unlocked, the batch planned from the old head and wrote the older rev over the
/// CAR's, and the verifier then found the repo's next commit broken).
#[sqlx::test(migrations = "./migrations")]
async fn a_batch_planned_during_a_resync_never_moves_the_repo_back(pg: PgPool) {
    use atproto_ingest::cursor::{self, CursorKey};
    use atproto_ingest::firehose::fixture::{self, FrameReader, RawFrame};
    use atproto_ingest::firehose::frame::{self, DEFAULT_MAX_FRAME_BYTES};
    use atproto_ingest::firehose::{Action, Event, EventKind, OpRecord};
    use atproto_ingest::txn::{run_tx, RetryPolicy};
    use atproto_ingest::writer;
    use std::collections::HashMap;
    use tokio_util::sync::CancellationToken;

    // The first repo of small.frames with two commits that create records.
    let reader = fixture::open(&crate::common::fixture("small.frames")).unwrap();
    let mut by_repo: HashMap<String, Vec<Event>> = HashMap::new();
    let mut pair = None;
    for f in FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES) {
        let RawFrame::Message(m) = f.unwrap() else {
            continue;
        };
        let Ok(d) = frame::decode(&m) else { continue };
        let EventKind::Commit(c) = &d.event.kind else {
            continue;
        };
        if !c
            .ops
            .iter()
            .any(|o| o.action == Action::Create && !matches!(o.record, OpRecord::Invalid(_)))
        {
            continue;
        }
        let seen = by_repo.entry(c.repo.clone()).or_default();
        seen.push(d.event.clone());
        if seen.len() == 2 {
            pair = Some((seen[0].clone(), seen[1].clone()));
            break;
        }
    }
    let (first, second) = pair.unwrap();
    let EventKind::Commit(c2) = &second.kind else {
        unreachable!()
    };
    let did = c2.repo.clone();
    let created: Vec<String> = c2
        .ops
        .iter()
        .filter(|o| o.action == Action::Create && !matches!(o.record, OpRecord::Invalid(_)))
        .map(|o| o.uri(&did))
        .collect();

    let pool = deadpool(&pg, 2).await;
    let key = CursorKey {
        service: "resync-race.test".into(),
        fence: 1,
    };
    cursor::claim_fence(&pool, &key.service, 1).await.unwrap();
    let apply = |events: Vec<Event>| {
        let pool = pool.clone();
        let key = key.clone();
        async move {
            run_tx(
                &pool,
                &RetryPolicy::default(),
                &CancellationToken::new(),
                async |tx| writer::apply(tx, &events, None, &key).await,
            )
            .await
            .unwrap()
        }
    };
    apply(vec![first]).await;

    // A resync holds the row and, at its end, moves the repo to a head past both commits.
    let car_rev = "3zzzzzzzzzzzz";
    let mut resync = pg.begin().await.unwrap();
    sqlx::query("SELECT rev FROM actors WHERE did = $1 FOR UPDATE")
        .bind(&did)
        .execute(&mut *resync)
        .await
        .unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let batch = async {
        apply(vec![second]).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let release = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "the batch did not wait for the resync"
        );
        // As `repos::resynced` does, last, once the CAR's rows are written.
        sqlx::query("UPDATE actors SET rev = $2 WHERE did = $1")
            .bind(&did)
            .bind(car_rev)
            .execute(&mut *resync)
            .await
            .unwrap();
        resync.commit().await.unwrap();
    };
    tokio::join!(batch, release);

    let rev: Option<String> = sqlx::query_scalar("SELECT rev FROM actors WHERE did = $1")
        .bind(&did)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(rev.as_deref(), Some(car_rev), "the repo moved back");
    let stored: Vec<String> = crate::common::stored(&pg)
        .await
        .into_values()
        .flatten()
        .collect();
    for uri in &created {
        assert!(
            !stored.contains(uri),
            "{uri}: a commit the CAR holds was applied over it"
        );
    }
}
