//! Resync (§12): the stand-in network serves what identity resolution and `getRepo` need.

use atproto_ingest::identity::Resolver;
use atproto_ingest::sync::{verify_repo_car, PublicKey, DEFAULT_MAX_REPO_CAR_BYTES};

use crate::common::standin::{self, Failure, StandIn};

#[tokio::test]
async fn standin_serves_documents_repos_and_pages() {
    let net = StandIn::snap().await;
    let resolver = Resolver::new(net.identity_config()).unwrap();
    let did = net.network().fetchable_dids()[0].clone();
    let id = resolver.resolve(&did).await.unwrap();
    assert_eq!(id.pds_endpoint.as_deref(), Some(net.url()));
    assert!(id.handle_valid, "{id:?}");
    let key = PublicKey::parse(id.signing_key.as_deref().unwrap()).unwrap();

    let http = reqwest::Client::new();
    let url = format!("{}/xrpc/com.atproto.sync.getRepo?did={did}", net.url());
    let car = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    let repo = verify_repo_car(&car, &did, &key, DEFAULT_MAX_REPO_CAR_BYTES).unwrap();
    assert!(!repo.records.is_empty());
    assert_eq!(net.requests(standin::GET_REPO, &did), 1);

    net.fail(&did, Failure::Status(500));
    assert_eq!(http.get(&url).send().await.unwrap().status(), 500);
    net.heal(&did);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);

    net.set_page_limit(20);
    let mut cursor: Option<String> = None;
    let mut listed = Vec::new();
    loop {
        let mut url = format!("{}/xrpc/com.atproto.sync.listRepos?limit=100", net.url());
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        for r in page["repos"].as_array().unwrap() {
            listed.push(r["did"].as_str().unwrap().to_owned());
        }
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed, net.network().listed_dids());
    assert_eq!(net.total_requests(standin::LIST_REPOS), 3);
}
