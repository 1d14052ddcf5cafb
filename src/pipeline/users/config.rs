//! Settings of the users stage: the validated [`UsersConfig`] and the command-line flags
//! ([`UsersArgs`]) it is built from.

use std::time::Duration;

use super::UsersError;
use crate::identity::{config as idcfg, IdentityConfig, UserCreator};
use crate::pending::{self, PendingConfig, PendingOps};

/// DIDs remembered as having an actor row: ~1 M × ~120 B ≈ 120 MiB at most, enough that a
/// warm indexer almost never asks the database again.
pub const DEFAULT_KNOWN_DIDS: usize = 1_000_000;
/// `--resolve-identities` default of `replay`: offline, users are stubs.
pub const DEFAULT_RESOLVE_IDENTITIES_REPLAY: bool = false;
/// `--resolve-identities` default of `run`: the daemon resolves new users.
pub const DEFAULT_RESOLVE_IDENTITIES_RUN: bool = true;

/// Settings of the users stage.
#[derive(Debug, Clone)]
pub struct UsersConfig {
    /// Identity resolution; `resolve_identities = false` makes the stage a pass-through.
    pub identity: IdentityConfig,
    /// Bounds of the pending-op map.
    pub pending: PendingConfig,
    /// Bound of the known-DID set (default [`DEFAULT_KNOWN_DIDS`]).
    pub known_dids: usize,
}

impl Default for UsersConfig {
    /// Resolution off (offline replay); the other settings at their production defaults.
    fn default() -> Self {
        Self {
            identity: IdentityConfig {
                resolve_identities: false,
                ..IdentityConfig::default()
            },
            pending: PendingConfig::default(),
            known_dids: DEFAULT_KNOWN_DIDS,
        }
    }
}

impl UsersConfig {
    /// Resolution on, with `identity` otherwise as given.
    pub fn resolving(identity: IdentityConfig) -> Self {
        Self {
            identity: IdentityConfig {
                resolve_identities: true,
                ..identity
            },
            ..Self::default()
        }
    }

    /// Whether the stage resolves identities (otherwise it passes events through).
    pub fn enabled(&self) -> bool {
        self.identity.resolve_identities
    }

    /// A new creator for `identity` (the caller owns it and may share it, e.g. with the
    /// re-resolution job), after checking the bounds. `None` when resolution is off.
    pub fn creator(&self) -> Result<Option<UserCreator>, UsersError> {
        if !self.enabled() {
            return Ok(None);
        }
        PendingOps::<()>::new(self.pending)?;
        if self.known_dids == 0 {
            return Err(UsersError::Invalid {
                flag: "known-DID set size",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        Ok(Some(UserCreator::new(self.identity.clone())?))
    }
}

/// Command-line flags of user creation; `#[command(flatten)]` them into a subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct UsersArgs {
    /// Resolve the identity (DID document → handle, PDS, signing key) of new users before
    /// their events are written. Off: users are created at once as stubs, without network.
    /// Default: off for `replay`, on for `run`.
    #[arg(
        long,
        env = "RESOLVE_IDENTITIES",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub resolve_identities: Option<bool>,

    /// PLC directory base URL (`did:plc` documents are fetched from `<URL>/<did>`).
    #[arg(long, env = "PLC_URL", value_name = "URL", default_value = idcfg::DEFAULT_PLC_URL)]
    pub plc_url: String,

    /// Let DID documents and handles point identity fetches at loopback, private, link-local
    /// or multicast addresses, over plain http and through redirects to other hosts (tests,
    /// labs). Off: only https to public addresses; the PLC directory above is always allowed.
    #[arg(
        long,
        env = "ALLOW_PRIVATE_NETWORK",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_private_network: bool,

    /// Most DIDs whose events wait for their user at once; past it the least recently used
    /// DID's events are written at once with a stub user.
    #[arg(long, env = "PENDING_MAX_DIDS", value_name = "N", default_value_t = pending::DEFAULT_MAX_DIDS)]
    pub pending_max_dids: usize,

    /// Most events held per waiting DID; past it the DID's events are written at once with
    /// a stub user.
    #[arg(long, env = "PENDING_MAX_OPS_PER_DID", value_name = "N", default_value_t = pending::DEFAULT_MAX_OPS_PER_DID)]
    pub pending_max_ops_per_did: usize,

    /// Identity resolutions at once (semaphore permits).
    #[arg(long, env = "USER_CREATION_PERMITS", value_name = "N", default_value_t = idcfg::DEFAULT_CONCURRENCY)]
    pub user_creation_permits: usize,

    /// Timeout of one identity resolution, in milliseconds; a user whose identity does not
    /// resolve in time is created as a stub and retried later.
    #[arg(long, env = "RESOLVE_TIMEOUT_MS", value_name = "MS", default_value_t = DEFAULT_RESOLVE_TIMEOUT_MS)]
    pub resolve_timeout_ms: u64,
}

/// `--resolve-timeout-ms` default (the identity module's default timeout).
pub const DEFAULT_RESOLVE_TIMEOUT_MS: u64 = idcfg::DEFAULT_TIMEOUT.as_millis() as u64;

impl UsersArgs {
    /// The stage's settings; `resolve_default` applies when `--resolve-identities` is not
    /// given ([`DEFAULT_RESOLVE_IDENTITIES_REPLAY`] or [`DEFAULT_RESOLVE_IDENTITIES_RUN`]).
    /// Rejects values that cannot work, naming the flag.
    pub fn to_config(&self, resolve_default: bool) -> Result<UsersConfig, UsersError> {
        let positive = |flag: &'static str, v: usize| {
            if v == 0 {
                Err(UsersError::Invalid {
                    flag,
                    value: v.to_string(),
                    reason: "must be at least 1",
                })
            } else {
                Ok(v)
            }
        };
        let max_dids = positive(
            "--pending-max-dids (PENDING_MAX_DIDS)",
            self.pending_max_dids,
        )?;
        let max_ops = positive(
            "--pending-max-ops-per-did (PENDING_MAX_OPS_PER_DID)",
            self.pending_max_ops_per_did,
        )?;
        let permits = positive(
            "--user-creation-permits (USER_CREATION_PERMITS)",
            self.user_creation_permits,
        )?;
        if self.resolve_timeout_ms == 0 {
            return Err(UsersError::Invalid {
                flag: "--resolve-timeout-ms (RESOLVE_TIMEOUT_MS)",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        let url = self.plc_url.trim_end_matches('/');
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() < 9 {
            return Err(UsersError::Invalid {
                flag: "--plc-url (PLC_URL)",
                value: self.plc_url.clone(),
                reason: "must be an http(s) URL",
            });
        }
        Ok(UsersConfig {
            identity: IdentityConfig {
                resolve_identities: self.resolve_identities.unwrap_or(resolve_default),
                plc_url: url.to_owned(),
                concurrency: permits,
                timeout: Duration::from_millis(self.resolve_timeout_ms),
                allow_private_network: self.allow_private_network,
                ..IdentityConfig::default()
            },
            pending: PendingConfig {
                max_dids,
                max_ops_per_did: max_ops,
                ..PendingConfig::default()
            },
            known_dids: DEFAULT_KNOWN_DIDS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        users: UsersArgs,
    }

    #[test]
    fn flags_parse_with_defaults_and_reject_zero() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let c = cli.users.to_config(false).unwrap();
        assert!(!c.identity.resolve_identities);
        assert_eq!(c.pending, PendingConfig::default());
        assert_eq!(c.identity.concurrency, idcfg::DEFAULT_CONCURRENCY);
        assert_eq!(c.identity.timeout, idcfg::DEFAULT_TIMEOUT);
        assert!(
            cli.users
                .to_config(true)
                .unwrap()
                .identity
                .resolve_identities
        );

        let cli = Cli::try_parse_from([
            "x",
            "--resolve-identities",
            "--plc-url",
            "http://127.0.0.1:1/",
            "--pending-max-dids",
            "5",
            "--pending-max-ops-per-did",
            "3",
            "--user-creation-permits",
            "2",
            "--resolve-timeout-ms",
            "250",
            "--allow-private-network",
        ])
        .unwrap();
        let c = cli.users.to_config(false).unwrap();
        assert!(c.identity.resolve_identities);
        assert!(c.identity.allow_private_network);
        assert_eq!(c.identity.plc_url, "http://127.0.0.1:1");
        assert_eq!(c.pending.max_dids, 5);
        assert_eq!(c.pending.max_ops_per_did, 3);
        assert_eq!(c.identity.concurrency, 2);
        assert_eq!(c.identity.timeout, Duration::from_millis(250));
        let off = Cli::try_parse_from(["x", "--resolve-identities=false"]).unwrap();
        assert!(
            !off.users
                .to_config(true)
                .unwrap()
                .identity
                .resolve_identities
        );

        let zero = Cli::try_parse_from(["x", "--pending-max-dids", "0"]).unwrap();
        let err = zero.users.to_config(false).unwrap_err().to_string();
        assert!(err.contains("PENDING_MAX_DIDS"), "{err}");
        let bad = Cli::try_parse_from(["x", "--plc-url", "plc.directory"]).unwrap();
        assert!(bad.users.to_config(false).is_err());
    }
}
