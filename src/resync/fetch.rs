//! `com.atproto.sync.getRepo` from an account's PDS: the URL comes from a DID document a
//! stranger controls, so the request goes through the identity module's network guard (https
//! and public addresses only unless `--allow-private-network`), with a timeout over the whole
//! download and a cap on the body.

use std::time::Duration;

use super::ResyncError;
use crate::identity::fetch::guard_refusal;
use crate::identity::netguard::NetPolicy;
use crate::identity::{IdentityConfig, IdentityError};

/// Largest XRPC error body read (its `error` and `message` are all that is kept).
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Fetches repo CARs from PDSes.
pub(crate) struct Pds {
    client: reqwest::Client,
    policy: NetPolicy,
    timeout: Duration,
    max_bytes: usize,
}

impl Pds {
    /// A fetcher under `identity`'s network policy.
    pub(crate) fn new(
        identity: &IdentityConfig,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Self, IdentityError> {
        let policy = NetPolicy::for_config(identity);
        Ok(Self {
            client: policy.client(timeout)?,
            policy,
            timeout,
            max_bytes,
        })
    }

    /// The repo CAR of `did` from the PDS at `endpoint`.
    pub(crate) async fn get_repo(&self, endpoint: &str, did: &str) -> Result<Vec<u8>, ResyncError> {
        let url = format!(
            "{}/xrpc/com.atproto.sync.getRepo?did={did}",
            endpoint.trim_end_matches('/')
        );
        match tokio::time::timeout(self.timeout, self.get(&url)).await {
            Ok(r) => r,
            Err(_) => Err(ResyncError::Timeout(self.timeout)),
        }
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, ResyncError> {
        let refused = |reason: String| ResyncError::Refused {
            url: url.to_owned(),
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| refused(e.to_string()))?;
        self.policy
            .check_url(&parsed)
            .map_err(|e| refused(e.to_string()))?;
        let http = |e: reqwest::Error| match guard_refusal(&e) {
            Some(r) => refused(r.to_string()),
            None => ResyncError::Http {
                url: url.to_owned(),
                reason: e.to_string(),
            },
        };
        let mut resp = self.client.get(parsed).send().await.map_err(http)?;
        let status = resp.status().as_u16();
        let limit = if (200..300).contains(&status) {
            self.max_bytes
        } else {
            MAX_ERROR_BODY
        };
        if (200..300).contains(&status) && resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(ResyncError::TooLarge(limit));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > limit {
                if (200..300).contains(&status) {
                    return Err(ResyncError::TooLarge(limit));
                }
                break;
            }
            body.extend_from_slice(&chunk);
        }
        if (200..300).contains(&status) {
            return Ok(body);
        }
        Err(xrpc_error(status, &body))
    }
}

/// An XRPC error answer: `{"error": NAME, "message": …}` when the body is one, else the status.
pub(crate) fn xrpc_error(status: u16, body: &[u8]) -> ResyncError {
    #[derive(serde::Deserialize)]
    struct Body {
        error: String,
        #[serde(default)]
        message: Option<String>,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => ResyncError::Xrpc {
            status,
            error: b.error.chars().take(100).collect(),
            message: b.message.unwrap_or_default().chars().take(500).collect(),
        },
        Err(_) => ResyncError::Status(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xrpc_errors_keep_their_name() {
        let e = xrpc_error(
            400,
            br#"{"error":"RepoDeactivated","message":"Repo has been deactivated"}"#,
        );
        assert_eq!(e.reason(), "repo_deactivated");
        assert!(e.is_permanent());
        let e = xrpc_error(502, b"<html>bad gateway</html>");
        assert!(matches!(e, ResyncError::Status(502)));
        assert!(!e.is_permanent());
    }
}
