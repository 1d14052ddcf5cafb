//! Handle → DID resolution: DNS TXT `_atproto.<handle>` first, then HTTPS
//! `/.well-known/atproto-did`.

use hickory_resolver::TokioResolver;

use super::config::MAX_HANDLE_BODY_BYTES;
use super::fetch::{get_bounded, handle_url};
use super::netguard::NetPolicy;
use super::{IdentityConfig, IdentityError};
use crate::firehose::syntax::is_did;

/// Looks up handles over DNS (optional) and HTTPS.
pub(crate) struct HandleResolver {
    dns: Option<TokioResolver>,
}

impl HandleResolver {
    /// Builds the DNS resolver from the system configuration when `config.dns_txt` is on.
    pub(crate) fn new(config: &IdentityConfig) -> Result<Self, IdentityError> {
        let dns = if config.dns_txt {
            let builder = TokioResolver::builder_tokio()
                .map_err(|e| IdentityError::DnsSetup(e.to_string()))?;
            Some(builder.build())
        } else {
            None
        };
        Ok(Self { dns })
    }

    /// The DID `handle` claims, or `None` if neither DNS nor HTTPS names exactly one.
    /// Errors are only those worth logging; a handle that does not resolve is `Ok(None)`.
    pub(crate) async fn resolve(
        &self,
        client: &reqwest::Client,
        policy: &NetPolicy,
        config: &IdentityConfig,
        handle: &str,
    ) -> Result<Option<String>, IdentityError> {
        let mut dns_error = None;
        if let Some(dns) = &self.dns {
            match txt_did(dns, handle).await {
                Ok(Some(did)) => return Ok(Some(did)),
                Ok(None) => {}
                Err(e) => dns_error = Some(e),
            }
        }
        match http_did(client, policy, config, handle).await {
            Ok(found) => Ok(found),
            Err(IdentityError::NotFound { .. }) => dns_error.map_or(Ok(None), Err),
            Err(e) => Err(e),
        }
    }
}

async fn txt_did(dns: &TokioResolver, handle: &str) -> Result<Option<String>, IdentityError> {
    // Trailing dot: never append search domains.
    let name = format!("_atproto.{handle}.");
    let lookup = match dns.txt_lookup(name.as_str()).await {
        Ok(lookup) => lookup,
        Err(e) => {
            return if e.is_no_records_found() || e.is_nx_domain() {
                Ok(None)
            } else {
                Err(IdentityError::Dns {
                    name,
                    reason: e.to_string(),
                })
            };
        }
    };
    let mut dids = lookup.iter().filter_map(|txt| {
        let joined: Vec<u8> = txt.iter().flat_map(|part| part.iter().copied()).collect();
        let text = String::from_utf8(joined).ok()?;
        text.strip_prefix("did=").map(|d| d.trim().to_owned())
    });
    let first = dids.next();
    // More than one `did=` record is ambiguous: the spec says treat it as no answer.
    Ok(first.filter(|d| is_did(d) && dids.next().is_none()))
}

async fn http_did(
    client: &reqwest::Client,
    policy: &NetPolicy,
    config: &IdentityConfig,
    handle: &str,
) -> Result<Option<String>, IdentityError> {
    let url = handle_url(config, handle);
    let body = get_bounded(client, policy, &url, handle, MAX_HANDLE_BODY_BYTES).await?;
    let text = String::from_utf8_lossy(&body);
    let did = text.trim();
    Ok(is_did(did).then(|| did.to_owned()))
}
