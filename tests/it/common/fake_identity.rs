//! A local HTTP server playing the PLC directory, `did:web` and handle `.well-known`
//! endpoints for identity tests: per-key latency, failures, bad documents, request counts and
//! the highest number of requests in flight at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atproto_ingest::identity::IdentityConfig;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

/// What the fake server answers and how it behaves.
#[derive(Default)]
pub struct Fake {
    /// DID → (status, body) of its document.
    pub docs: HashMap<String, (u16, String)>,
    /// handle → body of its `atproto-did`.
    pub handles: HashMap<String, String>,
    /// Extra latency for one key (DID or handle).
    pub delays: HashMap<String, Duration>,
    /// Latency of every request.
    pub default_delay: Duration,
}

#[derive(Default)]
pub struct Shared {
    pub fake: Mutex<Fake>,
    /// Requests served, by path.
    pub requests: Mutex<HashMap<String, usize>>,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

pub struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared, path: String) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        *shared.requests.lock().unwrap().entry(path).or_default() += 1;
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Server {
    pub shared: Arc<Shared>,
    pub base: String,
}

impl Server {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/plc/{did}", get(plc))
            .route("/web/{host}/.well-known/did.json", get(web))
            .route("/handle/{handle}/.well-known/atproto-did", get(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { shared, base }
    }

    pub fn config(&self) -> IdentityConfig {
        IdentityConfig {
            plc_url: format!("{}/plc", self.base),
            did_web_url_template: format!("{}/web/{{host}}/.well-known/did.json", self.base),
            handle_http_url_template: format!(
                "{}/handle/{{handle}}/.well-known/atproto-did",
                self.base
            ),
            dns_txt: false,
            ..IdentityConfig::default()
        }
    }

    pub fn fake(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.shared.fake.lock().unwrap()
    }

    /// A DID whose document claims `handle`, and (if `proves`) a handle pointing back.
    pub fn account(&self, did: &str, handle: &str, proves: bool) {
        let mut fake = self.fake();
        fake.docs.insert(did.into(), (200, doc(did, handle)));
        if proves {
            fake.handles.insert(handle.into(), did.into());
        }
    }

    pub fn requests(&self, path: &str) -> usize {
        let requests = self.shared.requests.lock().unwrap();
        requests.get(path).copied().unwrap_or(0)
    }

    pub fn total_requests(&self) -> usize {
        self.shared.requests.lock().unwrap().values().sum()
    }
}

pub fn doc(did: &str, handle: &str) -> String {
    serde_json::json!({
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": [format!("at://{handle}")],
        "verificationMethod": [{
            "id": format!("{did}#atproto"),
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": format!("zKey-{handle}"),
        }],
        "service": [{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": format!("https://pds.{handle}"),
        }],
    })
    .to_string()
}

async fn serve(shared: &Shared, path: String, key: &str) -> Option<(u16, String)> {
    let _guard = InFlight::enter(shared, path);
    let delay = {
        let fake = shared.fake.lock().unwrap();
        fake.delays.get(key).copied().unwrap_or(fake.default_delay)
    };
    tokio::time::sleep(delay).await;
    let fake = shared.fake.lock().unwrap();
    fake.docs
        .get(key)
        .cloned()
        .or_else(|| fake.handles.get(key).map(|did| (200, did.clone())))
}

fn reply(found: Option<(u16, String)>) -> (StatusCode, String) {
    match found {
        Some((status, body)) => (StatusCode::from_u16(status).unwrap(), body),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}

async fn plc(State(s): State<Arc<Shared>>, Path(did): Path<String>) -> (StatusCode, String) {
    reply(serve(&s, format!("/plc/{did}"), &did).await)
}

async fn web(State(s): State<Arc<Shared>>, Path(host): Path<String>) -> (StatusCode, String) {
    let did = format!("did:web:{host}");
    reply(serve(&s, format!("/web/{host}"), &did).await)
}

async fn handle(State(s): State<Arc<Shared>>, Path(h): Path<String>) -> (StatusCode, String) {
    reply(serve(&s, format!("/handle/{h}"), &h).await)
}

impl Server {
    /// Highest number of requests the server saw in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}
