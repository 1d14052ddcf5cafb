//! HTTP GET with a bounded body, and where DIDs and handles are fetched from.

use super::netguard::{NetPolicy, Refused};
use super::{IdentityConfig, IdentityError};
use crate::firehose::syntax::is_did;

/// GETs `url` and returns its body, at most `limit` bytes, if `policy` allows the URL (the
/// client, built by the same policy, checks addresses and redirects). 404/410 map to
/// [`IdentityError::NotFound`] for `did` (pass the DID being resolved, or the handle).
pub(crate) async fn get_bounded(
    client: &reqwest::Client,
    policy: &NetPolicy,
    url: &str,
    did: &str,
    limit: usize,
) -> Result<Vec<u8>, IdentityError> {
    let refused = |reason: &dyn std::fmt::Display| IdentityError::Refused {
        url: url.to_owned(),
        reason: reason.to_string(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| refused(&e))?;
    policy.check_url(&parsed).map_err(|e| refused(&e))?;
    let http = |source: reqwest::Error| match guard_refusal(&source) {
        Some(reason) => refused(reason),
        None => IdentityError::Http {
            url: url.to_owned(),
            source,
        },
    };
    let mut resp = client.get(parsed).send().await.map_err(http)?;
    let status = resp.status().as_u16();
    match status {
        200..=299 => {}
        404 | 410 => {
            return Err(IdentityError::NotFound {
                did: did.to_owned(),
                status,
            })
        }
        _ => {
            return Err(IdentityError::Status {
                url: url.to_owned(),
                status,
            })
        }
    }
    let too_large = || IdentityError::TooLarge {
        url: url.to_owned(),
        limit,
    };
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(http)? {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The network guard's refusal inside a client error (a resolved address or a redirect).
pub(crate) fn guard_refusal(e: &reqwest::Error) -> Option<&Refused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Some(r);
        }
        source = s.source();
    }
    None
}

/// The URL of `did`'s document: PLC directory for `did:plc`, the host's `did.json` for
/// `did:web` (host-level only, `%3A` decoded as a port separator).
pub(crate) fn did_document_url(
    config: &IdentityConfig,
    did: &str,
) -> Result<String, IdentityError> {
    if !is_did(did) {
        return Err(IdentityError::InvalidDid(did.to_owned()));
    }
    if did.starts_with("did:plc:") {
        return Ok(format!("{}/{did}", config.plc_url.trim_end_matches('/')));
    }
    if let Some(host) = did.strip_prefix("did:web:") {
        if host.contains(':') {
            return Err(IdentityError::UnsupportedDid(did.to_owned()));
        }
        let host = host.replace("%3A", ":").replace("%3a", ":");
        return Ok(config.did_web_url_template.replace("{host}", &host));
    }
    Err(IdentityError::UnsupportedDid(did.to_owned()))
}

/// The URL of `handle`'s `atproto-did` proof.
pub(crate) fn handle_url(config: &IdentityConfig, handle: &str) -> String {
    config.handle_http_url_template.replace("{handle}", handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = IdentityConfig::default();
        assert_eq!(
            did_document_url(&c, "did:plc:abc").ok().as_deref(),
            Some("https://plc.directory/did:plc:abc")
        );
        assert_eq!(
            did_document_url(&c, "did:web:example.com%3A8080")
                .ok()
                .as_deref(),
            Some("https://example.com:8080/.well-known/did.json")
        );
        assert!(matches!(
            did_document_url(&c, "did:web:example.com:path"),
            Err(IdentityError::UnsupportedDid(_))
        ));
        assert!(matches!(
            did_document_url(&c, "did:key:zabc"),
            Err(IdentityError::UnsupportedDid(_))
        ));
        assert!(matches!(
            did_document_url(&c, "nope"),
            Err(IdentityError::InvalidDid(_))
        ));
        assert_eq!(
            handle_url(&c, "a.example.com"),
            "https://a.example.com/.well-known/atproto-did"
        );
    }
}
