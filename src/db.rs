//! PostgreSQL: the runtime pool (deadpool-postgres), migrations (sqlx), database creation.
//! Every connection honours the URL's `sslmode` / `sslrootcert` ([`crate::tls`]).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use crate::tls::{self, PgTls, SslMode, TlsError};

/// Local default for developers: the quick start needs no configuration.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/atproto_ingest";
/// Connections in the pool (§9 `DB_POOL_SIZE`).
pub const DEFAULT_POOL_SIZE: usize = 40;
/// `statement_timeout` on every connection (§6).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a task waits for a free connection before failing (a bounded wait, §6).
pub const DEFAULT_POOL_WAIT: Duration = Duration::from_secs(10);
/// How long opening one connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL ({0})")]
    BadUrl(String),
    /// The whole cause chain in one line (tokio-postgres names only the kind, e.g. "error
    /// performing TLS handshake", and keeps the why in its source).
    #[error("cannot reach PostgreSQL at {target}: {}", chain(cause))]
    Unreachable {
        target: String,
        cause: tokio_postgres::Error,
    },
    #[error("creating the pool: {0}")]
    Pool(String),
    #[error("DATABASE_URL TLS settings: {0}")]
    Tls(#[from] TlsError),
    #[error("migrations failed: {0}")]
    Migrate(String),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no connection available: {0}")]
    Checkout(#[from] deadpool_postgres::PoolError),
}

/// Database settings, validated.
#[derive(Clone)]
pub struct DbConfig {
    pub url: String,
    pub pool_size: usize,
    pub statement_timeout: Duration,
    pub pool_wait: Duration,
    /// `idle_in_transaction_session_timeout` on every connection: the server ends a session
    /// that sits in an open transaction this long, releasing its row locks. A leader paused
    /// (SIGSTOP, VM freeze) mid-transaction would otherwise block its successor's writes on
    /// the same rows until it woke up. Default: the transaction limit
    /// ([`crate::txn::DEFAULT_TX_TIMEOUT`]); no healthy transaction idles that long.
    pub idle_in_transaction_timeout: Duration,
}

impl std::fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("pool_wait", &self.pool_wait)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .finish()
    }
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: DEFAULT_POOL_SIZE,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            pool_wait: DEFAULT_POOL_WAIT,
            idle_in_transaction_timeout: crate::txn::DEFAULT_TX_TIMEOUT,
        }
    }

    /// The parsed connection settings, with `statement_timeout` set at connection start-up
    /// and TLS negotiated as `sslmode` says (use them with [`DbConfig::tls`]).
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, DbError> {
        let (url, params) = tls::split_pg_url(&self.url)?;
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| DbError::BadUrl(e.to_string()))?;
        if is_url(&self.url) {
            cfg.ssl_mode(params.mode.negotiation());
        }
        cfg.options(format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            self.statement_timeout.as_millis(),
            self.idle_in_transaction_timeout.as_millis()
        ));
        cfg.connect_timeout(CONNECT_TIMEOUT);
        cfg.application_name("atproto-ingest");
        Ok(cfg)
    }

    /// The TLS connector for [`DbConfig::pg_config`]: checks the server's certificate as
    /// `sslmode` asks (none for `prefer`/`require`). Reads `sslrootcert` now.
    pub fn tls(&self) -> Result<PgTls, DbError> {
        let (_, mut params) = tls::split_pg_url(&self.url)?;
        if !is_url(&self.url) {
            // key=value strings: tokio-postgres parsed disable/prefer/require itself.
            params.mode = match self.pg_config()?.get_ssl_mode() {
                tokio_postgres::config::SslMode::Disable => SslMode::Disable,
                tokio_postgres::config::SslMode::Require => SslMode::Require,
                _ => SslMode::Prefer,
            };
        }
        Ok(tls::pg_connector(&params)?)
    }

    /// The database name the URL points at.
    pub fn database(&self) -> Result<String, DbError> {
        Ok(self
            .pg_config()?
            .get_dbname()
            .unwrap_or("postgres")
            .to_owned())
    }
}

/// `e: its source: its source's source …`, each message once.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let msg = cause.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        next = cause.source();
    }
    out
}

fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The URL with any password replaced, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Builds the runtime pool and checks one connection, so a bad URL fails at start.
pub async fn connect(cfg: &DbConfig) -> Result<Pool, DbError> {
    let pg = cfg.pg_config()?;
    let mgr = Manager::from_config(
        pg,
        cfg.tls()?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(mgr)
        .max_size(cfg.pool_size)
        .wait_timeout(Some(cfg.pool_wait))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))?;
    let conn = pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(cause) => DbError::Unreachable {
            target: redact_url(&cfg.url),
            cause,
        },
        other => DbError::Checkout(other),
    })?;
    drop(conn);
    Ok(pool)
}

/// Creates the database named in the URL when it does not exist (connecting to `postgres`).
pub async fn ensure_database(cfg: &DbConfig) -> Result<(), DbError> {
    let name = cfg.database()?;
    let mut admin = cfg.pg_config()?;
    admin.dbname("postgres");
    let (client, conn) = admin
        .connect(cfg.tls()?)
        .await
        .map_err(|cause| DbError::Unreachable {
            target: redact_url(&cfg.url),
            cause,
        })?;
    let task = tokio::spawn(conn);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        match client
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await
        {
            Ok(()) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    task.abort();
    Ok(())
}

/// Applies `migrations/` (embedded at build time) with a single sqlx connection.
pub async fn migrate(cfg: &DbConfig) -> Result<(), DbError> {
    // A one-connection sqlx pool, closed afterwards: `Migrator::run` on a pool is `Send`
    // (on a bare connection it is not), so migrations can run inside spawned tasks.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&cfg.url)
        .await
        .map_err(|e| DbError::Migrate(format!("connecting to {}: {e}", redact_url(&cfg.url))))?;
    let result = sqlx::migrate!("./migrations").run(&pool).await;
    pool.close().await;
    result.map_err(|e| DbError::Migrate(e.to_string()))
}

/// Makes the database ready for the pipeline: creates it when it does not exist, then applies
/// the migrations. The one start-up path of `run`, `replay` and `migrate`.
pub async fn prepare(cfg: &DbConfig) -> Result<(), DbError> {
    ensure_database(cfg).await?;
    migrate(cfg).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn bad_url_is_named() {
        let e = DbConfig::new("not a url").pg_config().unwrap_err();
        assert!(e.to_string().contains("DATABASE_URL"), "{e}");
    }
}
