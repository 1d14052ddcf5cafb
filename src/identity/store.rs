//! The `actors` SQL of user creation and re-resolution, in one place: looking an actor up,
//! creating its row, writing a resolution's outcome, scheduling a resolution and listing the
//! ones due. (The batch writer's own bulk insert of stub actors lives with the writer.)

use std::time::Duration;

use tokio_postgres::GenericClient;

use super::{Creation, Identity};

const LOOKUP_ACTOR: &str = "SELECT resolved_at IS NOT NULL, next_resolve_at IS NOT NULL, \
     resolve_failures FROM actors WHERE did = $1";

const INSERT_ACTOR: &str = "INSERT INTO actors (did) VALUES ($1) ON CONFLICT (did) DO NOTHING";

const STORE_RESOLVED: &str = "UPDATE actors SET handle = $2, handle_valid = $3, \
     pds_endpoint = $4, signing_key = $5, resolved_at = now(), resolve_failures = 0, \
     next_resolve_at = NULL WHERE did = $1";

const STORE_FAILURE: &str = "UPDATE actors SET resolve_failures = $2, \
     next_resolve_at = now() + make_interval(secs => $3) WHERE did = $1";

/// An identity that will never resolve (tombstoned, unsupported method): `next_resolve_at` is
/// set to `infinity`, so the re-resolution job never picks it again and no stub release
/// re-schedules it (only a NULL is re-scheduled); an `#identity` event still refreshes it.
const STORE_GIVEN_UP: &str = "UPDATE actors SET resolve_failures = $2, \
     next_resolve_at = 'infinity' WHERE did = $1";

/// Stub users (and refreshes that could not run now) get a resolution scheduled, unless one
/// already is (a failed resolution's backoff is kept).
const SCHEDULE_ACTOR: &str = "INSERT INTO actors (did, next_resolve_at) VALUES ($1, now()) \
     ON CONFLICT (did) DO UPDATE SET next_resolve_at = now() WHERE actors.next_resolve_at IS NULL";

const DUE_ACTORS: &str = "SELECT did, resolve_failures FROM actors \
     WHERE next_resolve_at <= now() AND status <> 'deleted' ORDER BY next_resolve_at LIMIT $1";

/// What the database says of an actor before creating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Existing {
    /// Its identity is resolved.
    pub resolved: bool,
    /// A resolution is scheduled (`next_resolve_at`).
    pub scheduled: bool,
    /// Consecutive failed resolutions so far.
    pub failures: u32,
}

/// The actor row of `did`, if any.
pub(crate) async fn lookup(
    client: &deadpool_postgres::Client,
    did: &str,
) -> Result<Option<Existing>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(LOOKUP_ACTOR).await?;
    let Some(row) = client.query_opt(&stmt, &[&did]).await? else {
        return Ok(None);
    };
    Ok(Some(Existing {
        resolved: row.try_get(0)?,
        scheduled: row.try_get(1)?,
        failures: failures(row.try_get(2)?),
    }))
}

/// Writes a creation's outcome: the actor row, then the resolved identity or the failure (a
/// stub of switched-off resolution gets the bare row).
pub(crate) async fn store_creation(
    client: &deadpool_postgres::Client,
    creation: &Creation,
) -> Result<(), tokio_postgres::Error> {
    let stmt = client.prepare_cached(INSERT_ACTOR).await?;
    client.execute(&stmt, &[&creation.did()]).await?;
    match creation {
        Creation::Resolved(identity) => {
            store_resolved(&***client, identity).await?;
        }
        Creation::Stub { did, failures, .. } if creation.is_given_up() => {
            let failures = i32::try_from(*failures).unwrap_or(i32::MAX);
            client.execute(STORE_GIVEN_UP, &[did, &failures]).await?;
        }
        Creation::Stub {
            did,
            failures,
            retry_after: Some(after),
            ..
        } => {
            store_failure(&***client, did, *failures, *after).await?;
        }
        Creation::Stub { .. } => {}
    }
    Ok(())
}

/// Schedules the resolution of `dids` (stub users), one row per statement (no lock-order
/// concerns between concurrent writers).
pub(crate) async fn schedule(
    client: &deadpool_postgres::Client,
    dids: &[String],
) -> Result<(), tokio_postgres::Error> {
    let stmt = client.prepare_cached(SCHEDULE_ACTOR).await?;
    for did in dids {
        client.execute(&stmt, &[did]).await?;
    }
    Ok(())
}

/// Up to `limit` actors whose resolution is due, oldest first, with their failures so far.
pub(crate) async fn due(
    client: &deadpool_postgres::Client,
    limit: i64,
) -> Result<Vec<(String, u32)>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(DUE_ACTORS).await?;
    let mut out = Vec::new();
    for row in client.query(&stmt, &[&limit]).await? {
        out.push((row.try_get(0)?, failures(row.try_get(1)?)));
    }
    Ok(out)
}

fn failures(column: i32) -> u32 {
    u32::try_from(column).unwrap_or(0)
}

/// Records a resolved identity; returns the rows updated (0 if the actor does not exist yet).
pub async fn store_resolved<C: GenericClient>(
    client: &C,
    identity: &Identity,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            STORE_RESOLVED,
            &[
                &identity.did,
                &identity.handle,
                &identity.handle_valid,
                &identity.pds_endpoint,
                &identity.signing_key,
            ],
        )
        .await
}

/// [`store_resolved`] for several identities in one statement (a resync group).
pub async fn store_resolved_many<C: GenericClient>(
    client: &C,
    identities: &[&Identity],
) -> Result<u64, tokio_postgres::Error> {
    if identities.is_empty() {
        return Ok(0);
    }
    let did: Vec<&str> = identities.iter().map(|i| i.did.as_str()).collect();
    let handle: Vec<Option<&str>> = identities.iter().map(|i| i.handle.as_deref()).collect();
    let valid: Vec<bool> = identities.iter().map(|i| i.handle_valid).collect();
    let pds: Vec<Option<&str>> = identities
        .iter()
        .map(|i| i.pds_endpoint.as_deref())
        .collect();
    let key: Vec<Option<&str>> = identities
        .iter()
        .map(|i| i.signing_key.as_deref())
        .collect();
    client
        .execute(
            "UPDATE actors a SET handle = u.handle, handle_valid = u.valid, \
             pds_endpoint = u.pds, signing_key = u.key, resolved_at = now(), \
             resolve_failures = 0, next_resolve_at = NULL \
             FROM UNNEST($1::text[], $2::text[], $3::bool[], $4::text[], $5::text[]) \
             AS u(did, handle, valid, pds, key) WHERE a.did = u.did",
            &[&did, &handle, &valid, &pds, &key],
        )
        .await
}

/// Records a failed resolution: `failures` consecutive failures, next try after `retry_after`.
pub async fn store_failure<C: GenericClient>(
    client: &C,
    did: &str,
    failures: u32,
    retry_after: Duration,
) -> Result<u64, tokio_postgres::Error> {
    let failures = i32::try_from(failures).unwrap_or(i32::MAX);
    let secs = retry_after.as_secs_f64();
    client
        .execute(STORE_FAILURE, &[&did, &failures, &secs])
        .await
}
