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
