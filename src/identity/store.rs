//! Writes resolution outcomes into `actors` (the row itself is created by the writer).

use std::time::Duration;

use tokio_postgres::GenericClient;

use super::Identity;

const STORE_RESOLVED: &str = "UPDATE actors SET handle = $2, handle_valid = $3, \
     pds_endpoint = $4, signing_key = $5, resolved_at = now(), resolve_failures = 0, \
     next_resolve_at = NULL WHERE did = $1";

const STORE_FAILURE: &str = "UPDATE actors SET resolve_failures = $2, \
     next_resolve_at = now() + make_interval(secs => $3) WHERE did = $1";

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
