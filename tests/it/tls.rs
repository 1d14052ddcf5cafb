//! TLS for real: a private PostgreSQL (`ssl=on`, a certificate made here, `hostssl`-only
//! `pg_hba`) and a private Redis (`--tls-port`), reached through the daemon's own connect
//! paths (`db::ensure_database`, `db::migrate` (sqlx), `db::connect`, `leader::Elector`).
//! The server binaries must be installed (`.ci/run` installs them); a missing one fails the
//! test with a message saying so.

use crate::tls_common;

use std::time::Duration;

use atproto_ingest::db::{self, DbConfig};
use atproto_ingest::leader::{Elector, LeaderConfig};
use tls_common::{PgTls, Pki, RedisTls};

fn small(url: &str) -> DbConfig {
    let mut cfg = DbConfig::new(url);
    cfg.pool_size = 2;
    cfg
}

/// `(ssl, version)` of this session, from the server's own `pg_stat_ssl`.
async fn session_ssl(pool: &deadpool_postgres::Pool) -> (bool, Option<String>) {
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The error line of connecting with `url`; asserts there is one and it is one line.
async fn connect_error(url: &str) -> String {
    let e = match db::connect(&small(url)).await {
        Ok(_) => panic!("connected with {url}"),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains('\n'), "not one line: {e}");
    eprintln!("{e}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_with_the_right_ca_creates_migrates_and_connects_over_tls() {
    let pki = Pki::new();
    let pg = PgTls::start(&pki);
    let query = format!("sslmode=verify-full&sslrootcert={}", pg.ca().display());
    let cfg = small(&pg.url("localhost", "ingest_tls", &query));
    // The server accepts only hostssl: each of these would be refused in plain text.
    db::ensure_database(&cfg).await.unwrap();
    db::migrate(&cfg).await.unwrap();
    let pool = db::connect(&cfg).await.unwrap();
    let (ssl, version) = session_ssl(&pool).await;
    assert!(ssl, "pg_stat_ssl says the session is not encrypted");
    assert!(version.unwrap_or_default().starts_with("TLSv1."));
    let client = pool.get().await.unwrap();
    let migrated: i64 = client
        .query_one("SELECT count(*) FROM _sqlx_migrations WHERE success", &[])
        .await
        .unwrap()
        .get(0);
    assert!(migrated > 0, "sqlx applied no migration over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_wrong_host_or_wrong_ca_fails_with_one_clear_line() {
    let pki = Pki::new();
    let pg = PgTls::start(&pki);
    let ca = pg.ca().display().to_string();
    let other = pg.other_ca().display().to_string();

    // The certificate names `localhost`, not `127.0.0.1`.
    let e = connect_error(&pg.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(e.contains("not valid for name \"127.0.0.1\""), "{e}");
    assert!(e.contains("cannot reach PostgreSQL"), "{e}");

    // A CA that did not sign the server's certificate.
    let e = connect_error(&pg.url(
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ))
    .await;
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    assert!(e.contains(&other), "{e}");
    let e = connect_error(&pg.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    ))
    .await;
    assert!(e.contains("UnknownIssuer"), "{e}");

    // Without TLS the hostssl-only server refuses us: the successes above were encrypted.
    let e = connect_error(&pg.url("127.0.0.1", "postgres", "sslmode=disable")).await;
    assert!(e.contains("no encryption"), "{e}");

    // A CA file that does not exist is named before any connection.
    let e = connect_error(&pg.url(
        "localhost",
        "postgres",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await;
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_prefer_require_and_verify_ca_encrypt_as_libpq_does() {
    let pki = Pki::new();
    let pg = PgTls::start(&pki);
    let ca = pg.ca().display().to_string();
    for query in [
        // No sslmode: prefer, the default (TLS when offered).
        String::new(),
        "sslmode=prefer".to_owned(),
        // require: encrypted, certificate not checked (unknown CA, other name).
        "sslmode=require".to_owned(),
        // verify-ca: chain checked, host name not.
        format!("sslmode=verify-ca&sslrootcert={ca}"),
    ] {
        let url = pg.url("127.0.0.1", "postgres", &query);
        let pool = db::connect(&small(&url))
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        assert!(session_ssl(&pool).await.0, "{query}: not encrypted");
    }
    // The URL is still valid for the config check with the verify modes in it.
    let url = pg.url("localhost", "postgres", "sslmode=verify-full");
    assert!(small(&url).pg_config().is_ok());
    // An sslmode tokio-postgres cannot honour is refused by name.
    let e = connect_error(&pg.url("127.0.0.1", "postgres", "sslmode=allow")).await;
    assert!(e.contains("sslmode=\"allow\""), "{e}");
}

async fn elector(url: String, prefix: &str) -> Result<Elector, String> {
    Elector::connect(LeaderConfig {
        redis_url: url,
        key_prefix: prefix.to_owned(),
        ttl: Duration::from_secs(3),
        poll_interval: Duration::from_secs(1),
    })
    .await
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_ca_file_and_clear_failures() {
    let pki = Pki::new();
    let redis = RedisTls::start(&pki);
    let port = redis.port;
    let ca = redis.ca().display().to_string();
    let other = redis.other_ca().display().to_string();

    // The right CA and host name: the lease is taken and read back over TLS.
    let url = format!("rediss://localhost:{port}/0?ssl_ca_certs={ca}");
    let e = elector(url, "tls-test:").await.unwrap();
    let lease = e.try_acquire().await.unwrap().expect("lease is free");
    let info = e.lease_info().await.unwrap();
    assert!(info.holder.is_some(), "{info:?}");
    assert_eq!(info.fence, Some(lease.fence));

    // Wrong CA, wrong host name, plain text to the TLS port: each one line, quickly.
    for (url, want) in [
        (
            format!("rediss://localhost:{port}/0?ssl_ca_certs={other}"),
            "UnknownIssuer",
        ),
        (
            format!("rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"),
            "not valid for name",
        ),
        (
            format!("rediss://localhost:{port}/0?ssl_ca_certs=/nonexistent/ca.pem"),
            "/nonexistent/ca.pem",
        ),
    ] {
        let started = std::time::Instant::now();
        let err = elector(url.clone(), "tls-test:")
            .await
            .err()
            .unwrap_or_default();
        eprintln!("{err}");
        assert!(err.contains(want), "{url}: {err}");
        assert!(!err.contains('\n'), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{url}: slow failure"
        );
    }
    let plain = elector(format!("redis://127.0.0.1:{port}/0"), "tls-test:").await;
    assert!(plain.is_err(), "plain text reached the TLS-only port");
}
