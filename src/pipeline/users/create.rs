//! One user creation (or `#identity` refresh), as run by a task of the users stage: look the
//! actor up, resolve its identity under the creator's semaphore, store the outcome, report back.
//! The task spawns nothing itself: aborting it cancels the resolution in flight too.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, Semaphore};

use super::UsersError;
use crate::identity::store::{self, Existing};
use crate::identity::{Creation, UserCreator};
use crate::metrics as m;

/// What a creation task reports back.
pub(super) struct Done {
    pub(super) did: String,
    pub(super) generation: u64,
    pub(super) outcome: Outcome,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Outcome {
    /// The actor row already existed, resolved or scheduled: nothing resolved.
    Known,
    Resolved,
    Stub,
    /// A database error: the events are released, the writer creates the row.
    DbError,
}

/// One user creation (or `refresh`): check the row, resolve under the semaphore, store,
/// report back. Never fails: errors become a [`Outcome::DbError`] or a stub.
pub(super) async fn create_user(
    pool: Pool,
    creator: UserCreator,
    db_permits: Arc<Semaphore>,
    did: String,
    refresh: bool,
    generation: u64,
    done: mpsc::Sender<Done>,
) {
    let outcome = create(&pool, &creator, &db_permits, &did, refresh).await;
    let _ = done
        .send(Done {
            did,
            generation,
            outcome,
        })
        .await;
}

async fn create(
    pool: &Pool,
    creator: &UserCreator,
    db_permits: &Semaphore,
    did: &str,
    refresh: bool,
) -> Outcome {
    let mut prior_failures = 0;
    {
        // Closed never happens (the semaphore is never closed); then run unthrottled.
        let _permit = db_permits.acquire().await.ok();
        match lookup(pool, did).await {
            Ok(Some(row)) => {
                if !refresh && (row.resolved || row.scheduled || !creator.is_enabled()) {
                    return Outcome::Known;
                }
                prior_failures = row.failures;
            }
            Ok(None) => {}
            Err(e) => {
                metrics::counter!(m::USERS_DB_ERRORS_TOTAL, "op" => "lookup").increment(1);
                tracing::warn!(did, error = %e, "looking up an actor failed; resolving anyway");
            }
        }
    }
    let creation = creator.create(did, prior_failures).await;
    let _permit = db_permits.acquire().await.ok();
    match store(pool, &creation).await {
        Ok(()) if creation.is_stub() => Outcome::Stub,
        Ok(()) => Outcome::Resolved,
        Err(e) => {
            metrics::counter!(m::USERS_DB_ERRORS_TOTAL, "op" => "store").increment(1);
            tracing::warn!(did, error = %e, "storing a user's identity failed");
            Outcome::DbError
        }
    }
}

async fn lookup(pool: &Pool, did: &str) -> Result<Option<Existing>, UsersError> {
    let client = pool.get().await?;
    Ok(store::lookup(&client, did).await?)
}

async fn store(pool: &Pool, creation: &Creation) -> Result<(), UsersError> {
    let client = pool.get().await?;
    Ok(store::store_creation(&client, creation).await?)
}
