//! listRepos pages: fetched with retries, each stored in one transaction (repos recorded,
//! inactive statuses written, repos to resync queued, the page cursor kept).

use std::time::Duration;

use deadpool_postgres::Pool;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::BackfillError;
use crate::firehose::event::Account;
use crate::firehose::{Event, EventKind};
use crate::repos;
use crate::retry::{self, Backoff, Jitter, RetryError};
use crate::txn::{run_tx, RetryPolicy};
use crate::writer::{self, WriteError};

/// Largest `listRepos` page read: 1,000 entries of ~200 bytes, with a wide margin.
const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;
/// Attempts per page before the backfill stops (it resumes at that page when run again).
const PAGE_ATTEMPTS: u32 = 6;

#[derive(Deserialize)]
pub(super) struct Page {
    #[serde(default)]
    pub(super) cursor: Option<String>,
    pub(super) repos: Vec<Listed>,
}

#[derive(Deserialize)]
pub(super) struct Listed {
    did: String,
    #[serde(default)]
    rev: Option<String>,
    #[serde(default = "yes")]
    active: bool,
    #[serde(default)]
    status: Option<String>,
}

fn yes() -> bool {
    true
}

/// The relay's HTTP base: `ws(s)://` becomes `http(s)://`, trailing `/` dropped.
pub fn http_base(relay_url: &str) -> String {
    let url = relay_url.trim_end_matches('/');
    if let Some(rest) = url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else {
        url.to_owned()
    }
}

pub(super) async fn fetch_page(
    client: &reqwest::Client,
    relay: &str,
    cursor: Option<&str>,
    limit: usize,
    cancel: &CancellationToken,
) -> Result<Page, BackfillError> {
    let mut url = format!("{relay}/xrpc/com.atproto.sync.listRepos?limit={limit}");
    if let Some(c) = cursor {
        url.push_str("&cursor=");
        url.push_str(&encode(c));
    }
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(30),
        jitter: Jitter::Half,
        max_attempts: Some(PAGE_ATTEMPTS),
    };
    let result = retry::retry(
        &backoff,
        cancel,
        async |_| get_page(client, &url).await,
        |_| false,
        |e, attempt, delay| {
            warn!(attempt, error = %e, delay_ms = delay.as_millis() as u64, "listRepos page failed; retrying");
        },
    )
    .await;
    result.map_err(|e| match e {
        RetryError::Cancelled { .. } => BackfillError::Interrupted,
        RetryError::Permanent { error, .. } | RetryError::Exhausted { error, .. } => {
            BackfillError::List { url, reason: error }
        }
    })
}

async fn get_page(client: &reqwest::Client, url: &str) -> Result<Page, String> {
    let mut resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_PAGE_BYTES {
            return Err(format!("page larger than {MAX_PAGE_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        return Err(format!("HTTP {status}: {text}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("bad page: {e}"))
}

/// Percent-encodes a cursor for a query string.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One page in one transaction: the listed repos recorded, inactive accounts' statuses
/// written, active repos not synchronized at the listed rev queued, the next cursor stored.
pub(super) async fn store_page(
    pool: &Pool,
    retry: &RetryPolicy,
    cancel: &CancellationToken,
    relay: &str,
    repos: &[Listed],
    next: Option<&str>,
) -> Result<(), BackfillError> {
    let mut listed: Vec<&Listed> = repos
        .iter()
        .filter(|r| crate::firehose::syntax::is_did(&r.did))
        .collect();
    listed.sort_by(|a, b| a.did.cmp(&b.did));
    listed.dedup_by(|a, b| a.did == b.did);
    let dids: Vec<&str> = listed.iter().map(|r| r.did.as_str()).collect();
    let revs: Vec<Option<&str>> = listed.iter().map(|r| r.rev.as_deref()).collect();
    let statuses: Vec<Option<String>> = listed
        .iter()
        .map(|r| (!r.active).then(|| r.status.clone().unwrap_or_else(|| "deactivated".into())))
        .collect();
    // Inactive accounts: their status as an `#account` event would set it (a `deleted` one
    // purges what is stored), through the writer.
    let accounts: Vec<Event> = listed
        .iter()
        .zip(&statuses)
        .filter_map(|(r, s)| {
            s.as_ref().map(|status| Event {
                seq: 0,
                kind: EventKind::Account(Account {
                    did: r.did.clone(),
                    active: false,
                    status: Some(status.clone()),
                    time: String::new(),
                }),
            })
        })
        .collect();
    run_tx(pool, retry, cancel, async |tx| -> Result<(), WriteError> {
        tx.execute(
            "INSERT INTO backfill_repos (relay, did, rev, status) \
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[]) \
             ON CONFLICT (relay, did) DO UPDATE SET rev = excluded.rev, status = excluded.status",
            &[&relay, &dids, &revs, &statuses],
        )
        .await?;
        if !accounts.is_empty() {
            writer::apply_events(tx, &accounts, writer::plan::Revs::Skip).await?;
        }
        let due = tx
            .query(
                "SELECT u.did FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(did, rev, status) \
                 WHERE u.status IS NULL AND NOT EXISTS (SELECT 1 FROM actors a WHERE a.did = u.did \
                   AND a.sync_state = 'synchronized' AND a.rev IS NOT NULL AND a.rev >= u.rev) \
                 ORDER BY 1",
                &[&dids, &revs, &statuses],
            )
            .await?;
        let marks = due
            .iter()
            .map(|r| Ok((r.try_get::<_, String>(0)?, "backfill")))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
        repos::desynchronize(&**tx, &marks).await?;
        tx.execute(
            "UPDATE backfill_runs SET cursor = $2, listed_all = $3, updated_at = now() WHERE relay = $1",
            &[&relay, &next, &next.is_none()],
        )
        .await?;
        Ok(())
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_become_http() {
        assert_eq!(http_base("wss://bsky.network/"), "https://bsky.network");
        assert_eq!(http_base("ws://127.0.0.1:9/"), "http://127.0.0.1:9");
        assert_eq!(http_base("http://x"), "http://x");
        assert_eq!(encode("17::did:plc:a b"), "17%3A%3Adid%3Aplc%3Aa%20b");
    }
}
