//! A stand-in for the network behind a fixture (`snap.network/`, `bfbench.network/`): one
//! HTTP server on 127.0.0.1 port 0 playing the PLC directory, every account's PDS and a relay's
//! enumeration endpoints, from the recorded answers.
//!
//! - PLC: `GET /<did>` → the recorded DID document, its `#atproto_pds` `serviceEndpoint`
//!   rewritten to this server (so `getRepo` comes back here);
//! - handles: `GET /handle/<handle>/.well-known/atproto-did` → the DID whose document claims
//!   the handle (the handle check of identity resolution passes);
//! - `GET /xrpc/com.atproto.sync.getRepo?did=` → the recorded CAR or XRPC error;
//! - `GET /xrpc/com.atproto.sync.listRepos?limit=&cursor=` → the recorded repos in their
//!   recorded order, re-paged (the cursor is an offset);
//! - `GET /xrpc/com.atproto.sync.getLatestCommit?did=` → the recorded answer.
//!
//! Hooks: [`StandIn::fail`] makes one DID's `getRepo` answer a status, stall or vanish;
//! [`StandIn::requests`] counts requests per endpoint and DID; [`StandIn::set_page_limit`] caps
//! listRepos pages. [`StandIn::identity_config`] points identity resolution here.
//! Shared by the integration tests and the benchmarks (included by path).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atproto_ingest::identity::IdentityConfig;
use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

/// What one DID's `getRepo` does instead of its recorded answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Answers this HTTP status with an XRPC error body.
    Status(u16),
    /// Never answers (the client's timeout must fire).
    Stall,
    /// `RepoNotFound` (HTTP 400), as for a deleted account.
    NotFound,
    /// The recorded CAR with its last byte flipped: it no longer verifies.
    Corrupt,
}

/// A recorded `getRepo` answer.
#[derive(Clone)]
enum RepoAnswer {
    Car(Arc<Vec<u8>>),
    Error { status: u16, body: Value },
}

/// The recorded network, loaded once.
pub struct Network {
    docs: HashMap<String, Value>,
    /// handle → DID, from each document's `alsoKnownAs`.
    handles: HashMap<String, String>,
    repos: HashMap<String, RepoAnswer>,
    /// Every listed repo, in recorded page order.
    listed: Vec<Value>,
    latest: HashMap<String, (u16, Value)>,
}

impl Network {
    /// Loads `dir` (a `NAME.network/` directory).
    pub fn load(dir: &Path) -> Self {
        let read = |name: &str| -> Value {
            serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
        };
        let docs: HashMap<String, Value> = serde_json::from_value(read("did-docs.json")).unwrap();
        let mut handles = HashMap::new();
        for (did, doc) in &docs {
            for aka in doc["alsoKnownAs"].as_array().into_iter().flatten() {
                if let Some(h) = aka.as_str().and_then(|a| a.strip_prefix("at://")) {
                    handles.insert(h.to_ascii_lowercase(), did.clone());
                }
            }
        }
        let mut repos = HashMap::new();
        for (did, answer) in read("repos.json").as_object().unwrap() {
            let answer = match answer["file"].as_str() {
                Some(file) => RepoAnswer::Car(Arc::new(std::fs::read(dir.join(file)).unwrap())),
                None => RepoAnswer::Error {
                    status: answer["status"].as_u64().unwrap_or(400) as u16,
                    body: answer["error"].clone(),
                },
            };
            repos.insert(did.clone(), answer);
        }
        let listed = read("list-repos.json")
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|page| page["repos"].as_array().cloned().unwrap_or_default())
            .collect();
        let latest = read("latest-commits.json")
            .as_object()
            .unwrap()
            .iter()
            .map(|(did, a)| {
                let status = a["status"].as_u64().unwrap_or(200) as u16;
                (did.clone(), (status, a["body"].clone()))
            })
            .collect();
        Self {
            docs,
            handles,
            repos,
            listed,
            latest,
        }
    }

    /// The DIDs listRepos lists, in order.
    pub fn listed_dids(&self) -> Vec<String> {
        self.listed
            .iter()
            .filter_map(|r| r["did"].as_str().map(str::to_owned))
            .collect()
    }

    /// The DIDs whose `getRepo` answers a CAR.
    pub fn fetchable_dids(&self) -> Vec<String> {
        let mut dids: Vec<String> = self
            .repos
            .iter()
            .filter(|(_, a)| matches!(a, RepoAnswer::Car(_)))
            .map(|(d, _)| d.clone())
            .collect();
        dids.sort();
        dids
    }

    /// The recorded CAR of `did`.
    pub fn car(&self, did: &str) -> Option<Arc<Vec<u8>>> {
        match self.repos.get(did) {
            Some(RepoAnswer::Car(car)) => Some(car.clone()),
            _ => None,
        }
    }
}

/// The `snap.network/` fixture directory of this crate.
pub fn snap_network() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/firehose/snap.network")
}

#[derive(Default)]
struct Hooks {
    failures: HashMap<String, Failure>,
    /// DID documents served instead of the recorded ones.
    docs: HashMap<String, Value>,
    /// (endpoint, DID or "") → requests served.
    requests: HashMap<(&'static str, String), usize>,
    page_limit: Option<usize>,
}

struct Shared {
    net: Network,
    base: String,
    hooks: Mutex<Hooks>,
}

impl Shared {
    fn count(&self, endpoint: &'static str, did: &str) {
        let mut hooks = self.hooks.lock().unwrap();
        *hooks
            .requests
            .entry((endpoint, did.to_owned()))
            .or_default() += 1;
    }
}

/// A running stand-in; the server lives as long as the test's runtime.
#[derive(Clone)]
pub struct StandIn {
    shared: Arc<Shared>,
}

/// Endpoint names for [`StandIn::requests`].
pub const PLC: &str = "plc";
pub const GET_REPO: &str = "getRepo";
pub const LIST_REPOS: &str = "listRepos";
pub const LATEST_COMMIT: &str = "getLatestCommit";
pub const HANDLE: &str = "handle";

impl StandIn {
    /// Serves `snap.network/`.
    pub async fn snap() -> Self {
        Self::start(Network::load(&snap_network())).await
    }

    /// Serves `net`.
    pub async fn start(net: Network) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            net,
            base,
            hooks: Mutex::default(),
        });
        let app = Router::new()
            .route("/xrpc/com.atproto.sync.getRepo", get(get_repo))
            .route("/xrpc/com.atproto.sync.listRepos", get(list_repos))
            .route("/xrpc/com.atproto.sync.getLatestCommit", get(latest_commit))
            .route("/handle/{handle}/.well-known/atproto-did", get(handle))
            .route("/{did}", get(plc))
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { shared }
    }

    /// `http://127.0.0.1:PORT`: the PLC URL, every PDS and the relay URL at once.
    pub fn url(&self) -> &str {
        &self.shared.base
    }

    pub fn network(&self) -> &Network {
        &self.shared.net
    }

    /// Identity resolution against this server: PLC here, handles checked here, private
    /// addresses allowed (the server is on loopback, the PDS URLs are plain http).
    pub fn identity_config(&self) -> IdentityConfig {
        IdentityConfig {
            plc_url: self.url().to_owned(),
            handle_http_url_template: format!(
                "{}/handle/{{handle}}/.well-known/atproto-did",
                self.url()
            ),
            dns_txt: false,
            allow_private_network: true,
            timeout: Duration::from_secs(5),
            ..IdentityConfig::default()
        }
    }

    /// From now on `did`'s `getRepo` fails this way.
    pub fn fail(&self, did: &str, failure: Failure) {
        let mut hooks = self.shared.hooks.lock().unwrap();
        hooks.failures.insert(did.to_owned(), failure);
    }

    /// From now on the PLC serves `doc` as `did`'s document (before the endpoint rewrite).
    pub fn set_doc(&self, did: &str, doc: Value) {
        self.shared
            .hooks
            .lock()
            .unwrap()
            .docs
            .insert(did.to_owned(), doc);
    }

    /// The recorded document of `did`.
    pub fn recorded_doc(&self, did: &str) -> Value {
        self.shared.net.docs[did].clone()
    }

    /// `did`'s `getRepo` answers its recording again (and its recorded document).
    pub fn heal(&self, did: &str) {
        let mut hooks = self.shared.hooks.lock().unwrap();
        hooks.failures.remove(did);
        hooks.docs.remove(did);
    }

    /// listRepos pages hold at most `limit` repos, whatever the client asks.
    pub fn set_page_limit(&self, limit: usize) {
        self.shared.hooks.lock().unwrap().page_limit = Some(limit.max(1));
    }

    /// Requests served by `endpoint` ([`GET_REPO`], …) for `did` ("" for listRepos).
    pub fn requests(&self, endpoint: &str, did: &str) -> usize {
        let hooks = self.shared.hooks.lock().unwrap();
        hooks
            .requests
            .iter()
            .filter(|((e, d), _)| *e == endpoint && d == did)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Requests served by `endpoint` for any DID.
    pub fn total_requests(&self, endpoint: &str) -> usize {
        let hooks = self.shared.hooks.lock().unwrap();
        hooks
            .requests
            .iter()
            .filter(|((e, _), _)| *e == endpoint)
            .map(|(_, n)| *n)
            .sum()
    }
}

fn xrpc_error(status: u16, error: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(json!({"error": error, "message": message})),
    )
        .into_response()
}

async fn plc(State(s): State<Arc<Shared>>, UrlPath(did): UrlPath<String>) -> Response {
    s.count(PLC, &did);
    let replaced = s.hooks.lock().unwrap().docs.get(&did).cloned();
    let Some(mut doc) = replaced.or_else(|| s.net.docs.get(&did).cloned()) else {
        return (StatusCode::NOT_FOUND, "DID not registered").into_response();
    };
    for service in doc["service"].as_array_mut().into_iter().flatten() {
        let id = service["id"].as_str().unwrap_or_default();
        if id == "#atproto_pds" || id.ends_with("#atproto_pds") {
            service["serviceEndpoint"] = Value::String(s.base.clone());
        }
    }
    axum::Json(doc).into_response()
}

async fn handle(State(s): State<Arc<Shared>>, UrlPath(h): UrlPath<String>) -> Response {
    s.count(HANDLE, &h);
    match s.net.handles.get(&h.to_ascii_lowercase()) {
        Some(did) => did.clone().into_response(),
        None => (StatusCode::NOT_FOUND, "no such handle").into_response(),
    }
}

async fn get_repo(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let q = query(q);
    let did = q.get("did").cloned().unwrap_or_default();
    s.count(GET_REPO, &did);
    let failure = s.hooks.lock().unwrap().failures.get(&did).copied();
    match failure {
        Some(Failure::Status(code)) => return xrpc_error(code, "InternalServerError", "failing"),
        Some(Failure::Stall) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return xrpc_error(504, "Timeout", "stalled");
        }
        Some(Failure::NotFound) => {
            return xrpc_error(400, "RepoNotFound", &format!("Could not find repo: {did}"))
        }
        Some(Failure::Corrupt) | None => {}
    }
    match s.net.repos.get(&did) {
        Some(RepoAnswer::Car(car)) => Response::builder()
            .header(header::CONTENT_TYPE, "application/vnd.ipld.car")
            .body(Body::from({
                let mut car = car.as_ref().clone();
                if let (Some(Failure::Corrupt), Some(last)) = (failure, car.last_mut()) {
                    *last ^= 0xff;
                }
                car
            }))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Some(RepoAnswer::Error { status, body }) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
            (status, axum::Json(body.clone())).into_response()
        }
        None => xrpc_error(400, "RepoNotFound", &format!("Could not find repo: {did}")),
    }
}

async fn list_repos(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    s.count(LIST_REPOS, "");
    let q = query(q);
    let asked: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(500)
        .clamp(1, 1000);
    let limit = match s.hooks.lock().unwrap().page_limit {
        Some(cap) => asked.min(cap),
        None => asked,
    };
    let start: usize = match q.get("cursor").map(|c| c.parse()) {
        None => 0,
        Some(Ok(offset)) => offset,
        Some(Err(_)) => return xrpc_error(400, "InvalidRequest", "bad cursor"),
    };
    let listed = &s.net.listed;
    let end = (start + limit).min(listed.len());
    let repos: Vec<Value> = listed
        .get(start..end)
        .map(<[Value]>::to_vec)
        .unwrap_or_default();
    let mut body = json!({ "repos": repos });
    if end < listed.len() {
        body["cursor"] = Value::String(end.to_string());
    }
    axum::Json(body).into_response()
}

async fn latest_commit(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let q = query(q);
    let did = q.get("did").cloned().unwrap_or_default();
    s.count(LATEST_COMMIT, &did);
    match s.net.latest.get(&did) {
        Some((status, body)) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
            (status, axum::Json(body.clone())).into_response()
        }
        None => xrpc_error(400, "RepoNotFound", &format!("Could not find repo: {did}")),
    }
}

/// A query string's parameters, percent-decoded.
fn query(raw: Option<String>) -> HashMap<String, String> {
    let raw = raw.unwrap_or_default();
    raw.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
