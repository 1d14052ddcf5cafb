//! HTTP operating surface (§9): `/metrics` (Prometheus text), `/healthz` (the process is alive),
//! `/readyz` (leader or standby, and the database answers). [`Health`] is the shared state the
//! other tasks update.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// `/readyz` database probe limit: a probe must answer fast, and a pool that cannot hand out a
/// connection within this long is not ready to ingest either.
pub const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);
/// Default listen address (§9 `HTTP_ADDR`): local only; expose through a proxy if needed.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9464";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The instance's role in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Starting = 0,
    Leader = 1,
    Standby = 2,
    Draining = 3,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Leader => "leader",
            Role::Standby => "standby",
            Role::Draining => "draining",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Role::Leader,
            2 => Role::Standby,
            3 => Role::Draining,
            _ => Role::Starting,
        }
    }
}

/// Shared health state: role and durable cursor, updated by other tasks.
#[derive(Debug)]
pub struct Health {
    role: AtomicU8,
    /// Last durable cursor; [`NO_CURSOR`] until one is known.
    cursor: AtomicI64,
}

const NO_CURSOR: i64 = i64::MIN;

impl Default for Health {
    fn default() -> Self {
        Self {
            role: AtomicU8::new(Role::Starting as u8),
            cursor: AtomicI64::new(NO_CURSOR),
        }
    }
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Release);
    }
    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Acquire))
    }
    pub fn set_cursor(&self, seq: i64) {
        self.cursor.store(seq, Ordering::Release);
    }
    pub fn cursor(&self) -> Option<i64> {
        Some(self.cursor.load(Ordering::Acquire)).filter(|c| *c != NO_CURSOR)
    }
}

/// Everything the handlers need.
#[derive(Clone)]
pub struct HttpState {
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
    pub pool: Pool,
}

/// The routes, for embedding or testing.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds `addr` (use port 0 in tests) and serves until `cancel`, then finishes in-flight
/// requests. Returns the bound address and the server task.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    cancel: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<(), HttpError>>), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    tracing::info!(addr = %bound, "HTTP listening: /metrics /healthz /readyz");
    let task = tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
            .map_err(HttpError::Serve)
    });
    Ok((bound, task))
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&s.metrics),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> Response {
    let role = s.health.role();
    let db = check_db(&s.pool).await;
    let role_ready = matches!(role, Role::Leader | Role::Standby);
    let ready = role_ready && db.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ready": ready,
        "role": role.as_str(),
        "db": match &db { Ok(()) => "ok", Err(_) => "unreachable" },
        "db_error": db.err(),
        "cursor": s.health.cursor(),
    });
    (status, Json(body)).into_response()
}

/// `SELECT 1` on a pooled connection within [`READY_DB_TIMEOUT`].
async fn check_db(pool: &Pool) -> Result<(), String> {
    let probe = async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(READY_DB_TIMEOUT, probe).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {READY_DB_TIMEOUT:?}")),
    }
}
