//! Outbound HTTP that a stranger's DID document cannot turn against the operator's network.
//!
//! DID documents, handles and PDS endpoints name hosts chosen by whoever controls the account.
//! Every fetch of such a host goes through the client built here, which:
//! - speaks `https` only;
//! - connects only to public unicast addresses: a name is resolved first and its loopback,
//!   private, link-local, shared, multicast, documentation and reserved addresses are dropped
//!   (the connection can only go to what is left), and an IP literal in the URL is checked the
//!   same way — so a redirect or a DNS answer cannot smuggle a private address in;
//! - follows at most [`MAX_REDIRECTS`] redirects, each to the same host over `https`.
//!
//! Hosts the operator configured (the PLC directory, and the literal host of a URL template)
//! are trusted: they may be private and plain `http`. `--allow-private-network` lifts every
//! restriction, for tests and labs.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect::{Attempt, Policy};

use super::{IdentityConfig, IdentityError};

/// Redirects followed: did:web and handle hosts may redirect once or twice, never in loops.
pub(crate) const MAX_REDIRECTS: usize = 3;

/// What outbound fetches may reach.
#[derive(Debug, Clone, Default)]
pub(crate) struct NetPolicy {
    /// Everything allowed: private addresses, plain http, redirects to other hosts.
    allow_private: bool,
    /// Hosts (lower case, no port) the operator configured: trusted like `allow_private`.
    trusted: Arc<HashSet<String>>,
}

impl NetPolicy {
    /// The policy for `config`: its flag, and the hosts of its PLC URL and URL templates.
    pub(crate) fn for_config(config: &IdentityConfig) -> Self {
        let trusted = [
            config.plc_url.as_str(),
            config.did_web_url_template.as_str(),
            config.handle_http_url_template.as_str(),
        ]
        .into_iter()
        .filter_map(literal_host)
        .collect();
        Self {
            allow_private: config.allow_private_network,
            trusted: Arc::new(trusted),
        }
    }

    fn trusts(&self, host: &str) -> bool {
        self.allow_private || self.trusted.contains(&host.to_ascii_lowercase())
    }

    /// Checks a URL before it is requested (or followed as a redirect).
    pub(crate) fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let host = url.host_str().ok_or(Refused::NoHost)?;
        if self.trusts(host) {
            return Ok(());
        }
        if url.scheme() != "https" {
            return Err(Refused::NotHttps(url.scheme().to_owned()));
        }
        // An IP literal bypasses the resolver: check it here. Names are checked on resolution.
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => check_ip(ip),
            Err(_) => Ok(()),
        }
    }

    /// The HTTP client enforcing this policy (resolver filter and redirect rule).
    pub(crate) fn client(&self, timeout: Duration) -> Result<reqwest::Client, IdentityError> {
        let redirects = self.clone();
        reqwest::Client::builder()
            // Backstop only: callers enforce their own limit over the whole operation.
            .timeout(timeout.saturating_mul(2))
            .connect_timeout(timeout)
            .redirect(Policy::custom(move |a| redirects.redirect(a)))
            .dns_resolver(Arc::new(GuardedResolver {
                policy: self.clone(),
            }))
            .user_agent(concat!("atproto-ingest/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(IdentityError::Client)
    }

    fn redirect(&self, attempt: Attempt<'_>) -> reqwest::redirect::Action {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(Refused::TooManyRedirects);
        }
        let to = attempt.url().host_str().map(str::to_ascii_lowercase);
        let from = attempt
            .previous()
            .first()
            .and_then(|u| u.host_str())
            .map(str::to_ascii_lowercase);
        if !self.allow_private && to != from {
            return attempt.error(Refused::OtherHost(to.unwrap_or_default()));
        }
        match self.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    }
}

/// Why a fetch was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("URL has no host")]
    NoHost,
    #[error("only https is fetched, not {0}")]
    NotHttps(String),
    #[error("address {0} is not public (loopback, private, link-local, multicast or reserved)")]
    NotPublic(IpAddr),
    #[error("{0} resolves to no public address")]
    NoPublicAddress(String),
    #[error("redirect to another host ({0}) refused")]
    OtherHost(String),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
}

fn check_ip(ip: IpAddr) -> Result<(), Refused> {
    if is_public(ip) {
        Ok(())
    } else {
        Err(Refused::NotPublic(ip))
    }
}

/// The host of `url` when it is literal (not a `{host}`/`{handle}` placeholder), lower case.
fn literal_host(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?.to_ascii_lowercase();
    (!host.contains('{') && !host.contains("%7b")).then_some(host)
}

/// Whether `ip` is a public unicast address (the only kind a stranger's host may resolve to).
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b) // NAT64: embeds an IPv4 address
        || s[0] == 0x2002 // 6to4: embeds an IPv4 address
        || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0))
    // IPv4-compatible
}

/// Resolves names with the system resolver, keeping only the addresses the policy allows.
struct GuardedResolver {
    policy: NetPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = if policy.trusts(&host) {
                addrs
            } else {
                addrs.into_iter().filter(|a| is_public(a.ip())).collect()
            };
            if allowed.is_empty() {
                return Err(Box::new(Refused::NoPublicAddress(host)) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip(private)), "{private} must not be public");
        }
        for public in [
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip(public)), "{public} is public");
        }
    }

    fn policy(allow: bool) -> NetPolicy {
        NetPolicy::for_config(&IdentityConfig {
            allow_private_network: allow,
            plc_url: "http://10.9.8.7:2582".into(),
            ..IdentityConfig::default()
        })
    }

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn urls_of_strangers_must_be_https_and_public_and_configured_hosts_are_trusted() {
        let p = policy(false);
        assert!(p.check_url(&url("https://example.com/x")).is_ok());
        assert!(matches!(
            p.check_url(&url("http://example.com/x")),
            Err(Refused::NotHttps(_))
        ));
        assert!(matches!(
            p.check_url(&url("https://127.0.0.1:8080/x")),
            Err(Refused::NotPublic(_))
        ));
        assert!(matches!(
            p.check_url(&url("https://[::1]/x")),
            Err(Refused::NotPublic(_))
        ));
        // The configured PLC directory may be private and plain http.
        assert!(p.check_url(&url("http://10.9.8.7:2582/did:plc:x")).is_ok());
        // Placeholders are not trusted hosts.
        assert_eq!(literal_host("https://{host}/.well-known/did.json"), None);
        assert_eq!(
            literal_host("http://127.0.0.1:9/web/{host}/x").as_deref(),
            Some("127.0.0.1")
        );
        let open = policy(true);
        assert!(open.check_url(&url("http://127.0.0.1:1/x")).is_ok());
    }
}
