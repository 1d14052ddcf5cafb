//! Identity fetches cannot be turned against the operator's network: a `did:web` host that
//! redirects to another (private) host, or a DID naming a private address, is refused unless
//! `allow_private_network` is set; the operator's own configured hosts stay usable.
use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use atproto_ingest::identity::{IdentityConfig, IdentityError, Resolver};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

struct Target {
    base: String,
    port: u16,
    /// Requests that reached the redirect target (`/doc/{did}`).
    landed: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct AppState {
    port: u16,
    landed: Arc<AtomicUsize>,
}

/// `/web/{host}/.well-known/did.json` redirects: `other.*` hosts to `localhost` (another host
/// name for a loopback address), `same.*` hosts to this very host; `/doc/{did}` serves the doc.
async fn start() -> Target {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let landed = Arc::new(AtomicUsize::new(0));
    let state = AppState {
        port,
        landed: landed.clone(),
    };
    let app = Router::new()
        .route("/web/{host}/.well-known/did.json", get(redirect))
        .route("/doc/{did}", get(document))
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Target {
        base: format!("http://127.0.0.1:{port}"),
        port,
        landed,
    }
}

async fn redirect(State(s): State<AppState>, Path(host): Path<String>) -> Response {
    let did = format!("did:web:{host}");
    let to = if host.starts_with("other.") {
        format!("http://localhost:{}/doc/{did}", s.port)
    } else {
        format!("http://127.0.0.1:{}/doc/{did}", s.port)
    };
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

async fn document(State(s): State<AppState>, Path(did): Path<String>) -> Response {
    s.landed.fetch_add(1, Ordering::SeqCst);
    let handle = did.trim_start_matches("did:web:").to_owned();
    (StatusCode::OK, common::fake_identity::doc(&did, &handle)).into_response()
}

fn config(t: &Target, allow_private_network: bool) -> IdentityConfig {
    IdentityConfig {
        plc_url: format!("{}/plc", t.base),
        did_web_url_template: format!("{}/web/{{host}}/.well-known/did.json", t.base),
        dns_txt: false,
        allow_private_network,
        ..IdentityConfig::default()
    }
}

fn refused(r: Result<impl std::fmt::Debug, IdentityError>, why: &str) {
    match r {
        Err(e @ IdentityError::Refused { .. }) => {
            assert!(e.to_string().contains(why), "{e} should say {why:?}");
            assert!(e.is_permanent());
            assert_eq!(e.kind(), "refused");
        }
        other => panic!("expected a refusal ({why}), got {other:?}"),
    }
}

#[tokio::test]
async fn a_did_web_redirect_to_another_private_host_is_refused_without_the_flag() {
    let t = start().await;
    let guarded = Resolver::new(config(&t, false)).unwrap();
    refused(
        guarded.resolve_did("did:web:other.example.com").await,
        "redirect to another host (localhost)",
    );
    assert_eq!(
        t.landed.load(Ordering::SeqCst),
        0,
        "the redirect was not followed"
    );

    // A redirect within the operator's configured host is fine.
    let doc = guarded
        .resolve_did("did:web:same.example.com")
        .await
        .unwrap();
    assert_eq!(doc.did, "did:web:same.example.com");
    assert_eq!(t.landed.load(Ordering::SeqCst), 1);

    // With --allow-private-network the cross-host redirect is followed.
    let open = Resolver::new(config(&t, true)).unwrap();
    let doc = open.resolve_did("did:web:other.example.com").await.unwrap();
    assert_eq!(doc.did, "did:web:other.example.com");
    assert_eq!(t.landed.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_did_naming_a_private_address_is_refused_before_any_request() {
    let t = start().await;
    // The default template: the host comes from the DID itself, so it is a stranger's.
    let stranger = IdentityConfig {
        dns_txt: false,
        ..IdentityConfig::default()
    };
    let r = Resolver::new(stranger).unwrap();
    let port = t.port;
    refused(
        r.resolve_did(&format!("did:web:127.0.0.1%3A{port}")).await,
        "is not public",
    );
    // A name that resolves only to loopback addresses.
    refused(
        r.resolve_did(&format!("did:web:localhost%3A{port}")).await,
        "resolves to no public address",
    );
    assert_eq!(t.landed.load(Ordering::SeqCst), 0);
}
