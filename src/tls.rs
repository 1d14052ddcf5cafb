//! TLS for the daemon's own connections: PostgreSQL (`sslmode` / `sslrootcert` in
//! `DATABASE_URL`, libpq's names) and Redis (`rediss://`, `ssl_ca_certs` in `REDIS_URL`), over
//! rustls with the ring provider. The relay's TLS belongs to `firehose::client`.
//!
//! `sslmode`, as libpq: `disable` (plain), `prefer` (the default: TLS when the server offers
//! it, else plain), `require` (TLS, certificate not checked), `verify-ca` (TLS, chain checked
//! against `sslrootcert`), `verify-full` (chain and host name checked). `sslrootcert` is a PEM
//! file (only its CAs are trusted) or `system` (the Mozilla roots built in, also the default
//! when it is absent). Without them in the URL, `PGSSLMODE` / `PGSSLROOTCERT` apply, as for
//! libpq and sqlx. `allow` is refused: tokio-postgres cannot try plain text first.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connector every PostgreSQL connection of the daemon uses (pool, admin, cancel).
pub type PgTls = MakeRustlsConnect;

/// Query parameter of `REDIS_URL` naming a PEM CA file (redis-py's name for it).
pub const REDIS_CA_PARAM: &str = "ssl_ca_certs";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "sslmode={0:?} is not supported (use disable, prefer, require, verify-ca or verify-full)"
    )]
    BadSslMode(String),
    #[error("cannot read the CA file {path}: {source}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {0} holds no PEM certificate")]
    EmptyCa(PathBuf),
    #[error("the CA file {path} holds a certificate rustls rejects: {source}")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("{REDIS_CA_PARAM} needs a rediss:// URL (TLS)")]
    CaWithoutTls,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// libpq's `sslmode` values that tokio-postgres can honour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, TlsError> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(TlsError::BadSslMode(other.to_owned())),
        })
    }

    /// What tokio-postgres negotiates; the verify modes are `require` plus our verifier.
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as S;
        match self {
            Self::Disable => S::Disable,
            Self::Prefer => S::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => S::Require,
        }
    }
}

/// The TLS settings of a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTlsParams {
    pub mode: SslMode,
    /// `sslrootcert`; `None` (or `system`) means the built-in Mozilla roots.
    pub root_cert: Option<PathBuf>,
}

/// Splits `sslmode` and `sslrootcert` off a `postgres://` URL (tokio-postgres rejects the
/// verify modes and unknown keys), falling back to `PGSSLMODE` / `PGSSLROOTCERT`. Returns the
/// URL without them. Key/value connection strings are returned unchanged.
pub fn split_pg_url(url: &str) -> Result<(String, PgTlsParams), TlsError> {
    let (rest, mode) = take_param(url, "sslmode");
    let (rest, root) = take_param(&rest, "sslrootcert");
    let mode = mode.or_else(|| std::env::var("PGSSLMODE").ok());
    let root = root.or_else(|| std::env::var("PGSSLROOTCERT").ok());
    let params = PgTlsParams {
        mode: match mode.as_deref() {
            None | Some("") => SslMode::Prefer,
            Some(m) => SslMode::parse(m)?,
        },
        root_cert: root
            .filter(|r| !r.is_empty() && r != "system")
            .map(PathBuf::from),
    };
    Ok((rest, params))
}

/// The connector for `params`: no certificate check for `prefer`/`require`, the chain for
/// `verify-ca`, chain and name for `verify-full`. Reads the CA file now, so a missing one fails
/// at start.
pub fn pg_connector(params: &PgTlsParams) -> Result<PgTls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = match params.mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(EncryptOnly { provider }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = match &params.root_cert {
                Some(path) => read_roots(path)?,
                None => system_roots(),
            };
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
            Arc::new(Verify {
                inner,
                check_name: params.mode == SslMode::VerifyFull,
            })
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A Redis client for `url`: `rediss://` is TLS (server checked against the built-in roots, or
/// only the CAs of `?ssl_ca_certs=/path.pem`), `redis://` plain.
pub fn redis_client(url: &str) -> Result<redis::Client, TlsError> {
    let (url, ca) = take_param(url, REDIS_CA_PARAM);
    if !url.starts_with("rediss://") {
        return match ca {
            Some(_) => Err(TlsError::CaWithoutTls),
            None => Ok(redis::Client::open(url)?),
        };
    }
    // redis builds its rustls config from the process-wide provider: make sure it is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match ca {
        None => Ok(redis::Client::open(url)?),
        Some(path) => {
            let path = PathBuf::from(path);
            // Parsed here too, so a bad file fails with its name rather than deep in redis.
            read_roots(&path)?;
            let pem = std::fs::read(&path).map_err(|source| TlsError::ReadCa {
                path: path.clone(),
                source,
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            Ok(redis::Client::build_with_tls(url, certs)?)
        }
    }
}

fn system_roots() -> RootCertStore {
    RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
}

fn read_roots(path: &std::path::Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            source: rustls::Error::General(e.to_string()),
        })?;
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::EmptyCa(path.to_owned()));
    }
    Ok(roots)
}

/// Removes every `key=value` from the URL's query and returns the URL and the last value
/// (percent-decoded). A URL without a query, or a key/value string, is returned unchanged.
pub fn take_param(url: &str, key: &str) -> (String, Option<String>) {
    let (url_part, fragment) = match url.split_once('#') {
        Some((u, f)) => (u, format!("#{f}")),
        None => (url, String::new()),
    };
    let Some((base, query)) = url_part.split_once('?') else {
        return (url.to_owned(), None);
    };
    if !url.contains("://") {
        return (url.to_owned(), None);
    }
    let mut found = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == key {
                found = Some(percent_decode(v));
                false
            } else {
                !pair.is_empty()
            }
        })
        .collect();
    let url = if kept.is_empty() {
        format!("{base}{fragment}")
    } else {
        format!("{base}?{}{fragment}", kept.join("&"))
    };
    (url, found)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `prefer` and `require`: encrypted, but any certificate is accepted (libpq's behaviour).
/// Handshake signatures are still checked, so the session key is the server's.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca` (chain only) and `verify-full` (chain and name).
#[derive(Debug)]
struct Verify {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::Error::InvalidCertificate;
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_tls_params_off_the_url() {
        let (url, p) = split_pg_url(
            "postgres://u:p@db.example:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(url, "postgres://u:p@db.example:5432/app?application_name=x");
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca.pem")));

        let (url, p) = split_pg_url("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(url, "postgres://h/db");
        assert_eq!(p.mode, SslMode::Disable);

        let (_, p) = split_pg_url("postgres://h/db?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!((p.mode, p.root_cert), (SslMode::Require, None));
    }

    #[test]
    fn unknown_sslmode_is_named() {
        let e = split_pg_url("postgres://h/db?sslmode=allow").unwrap_err();
        assert!(e.to_string().contains("\"allow\""), "{e}");
    }

    #[test]
    fn take_param_keeps_other_params_and_plain_strings() {
        assert_eq!(
            take_param("rediss://h:1/0?ssl_ca_certs=/a%20b.pem", REDIS_CA_PARAM),
            ("rediss://h:1/0".to_owned(), Some("/a b.pem".to_owned()))
        );
        assert_eq!(
            take_param("rediss://h/0?ssl_ca_certs=/c.pem#insecure", REDIS_CA_PARAM),
            (
                "rediss://h/0#insecure".to_owned(),
                Some("/c.pem".to_owned())
            )
        );
        assert_eq!(
            take_param("redis://h/0?protocol=resp3", REDIS_CA_PARAM),
            ("redis://h/0?protocol=resp3".to_owned(), None)
        );
        assert_eq!(
            take_param("host=h sslmode=require", "sslmode"),
            ("host=h sslmode=require".to_owned(), None)
        );
    }

    #[test]
    fn missing_ca_file_fails_at_build_time() {
        let p = PgTlsParams {
            mode: SslMode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/ca.pem")),
        };
        let e = pg_connector(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let e = redis_client("redis://h/0?ssl_ca_certs=/x.pem")
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("rediss://"));
    }
}
