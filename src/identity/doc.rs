//! DID document parsing: handle (`alsoKnownAs`), PDS endpoint and signing key.

use serde::Deserialize;
use serde_json::Value;

use super::IdentityError;
use crate::firehose::syntax::is_handle;

/// The parts of a DID document an App View needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DidDocument {
    /// The DID (equal to the document's `id`).
    pub did: String,
    /// The first `at://` handle in `alsoKnownAs`, lower-cased, if syntactically valid.
    pub handle: Option<String>,
    /// Endpoint of the `#atproto_pds` service of type `AtprotoPersonalDataServer`.
    pub pds_endpoint: Option<String>,
    /// The `#atproto` verification method's key in the `Multikey` form (`z…`, multicodec
    /// prefix, compressed); a legacy `EcdsaSecp256k1VerificationKey2019` /
    /// `EcdsaSecp256r1VerificationKey2019` key (bare, possibly uncompressed) is converted.
    pub signing_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDoc {
    id: String,
    #[serde(default)]
    also_known_as: Vec<String>,
    #[serde(default)]
    verification_method: Vec<RawMethod>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMethod {
    id: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    public_key_multibase: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawService {
    id: String,
    #[serde(rename = "type", default)]
    kind: Value,
    #[serde(default)]
    service_endpoint: Value,
}

/// Whether a fragment id (`#atproto` or `did:…#atproto`) names `fragment` of `did`.
fn names(id: &str, did: &str, fragment: &str) -> bool {
    match id.split_once('#') {
        Some(("", f)) => f == fragment,
        Some((d, f)) => d == did && f == fragment,
        None => false,
    }
}

fn is_pds_type(kind: &Value) -> bool {
    const PDS: &str = "AtprotoPersonalDataServer";
    match kind {
        Value::String(s) => s == PDS,
        Value::Array(a) => a.iter().any(|v| v.as_str() == Some(PDS)),
        _ => false,
    }
}

fn http_url(endpoint: &Value) -> Option<String> {
    let s = endpoint.as_str()?;
    let url = reqwest::Url::parse(s).ok()?;
    (matches!(url.scheme(), "http" | "https") && url.host().is_some()).then(|| s.to_owned())
}

impl DidDocument {
    /// Parses a document fetched for `did`. Malformed JSON or a document about another DID is
    /// an error; missing or invalid optional parts are `None`.
    pub fn parse(did: &str, body: &[u8]) -> Result<Self, IdentityError> {
        let raw: RawDoc = serde_json::from_slice(body).map_err(|e| IdentityError::Malformed {
            did: did.to_owned(),
            reason: e.to_string(),
        })?;
        if raw.id != did {
            return Err(IdentityError::IdMismatch {
                expected: did.to_owned(),
                found: raw.id,
            });
        }
        let handle = raw
            .also_known_as
            .iter()
            .find_map(|aka| aka.strip_prefix("at://"))
            .map(str::to_ascii_lowercase)
            .filter(|h| is_handle(h));
        let pds_endpoint = raw
            .service
            .iter()
            .find(|s| names(&s.id, did, "atproto_pds") && is_pds_type(&s.kind))
            .and_then(|s| http_url(&s.service_endpoint));
        let signing_key = raw
            .verification_method
            .iter()
            .find(|m| names(&m.id, did, "atproto"))
            .and_then(|m| {
                let key = m.public_key_multibase.as_deref()?;
                crate::sync::didkey::multikey_from_method(m.kind.as_deref(), key)
            })
            .filter(|k| !k.is_empty());
        Ok(Self {
            did: raw.id,
            handle,
            pds_endpoint,
            signing_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";

    fn doc(id: &str) -> String {
        format!(
            r##"{{"@context":["https://www.w3.org/ns/did/v1"],"id":"{id}",
            "alsoKnownAs":["at://Alice.Example.com"],
            "verificationMethod":[{{"id":"{id}#atproto","type":"Multikey","controller":"{id}",
              "publicKeyMultibase":"zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"}}],
            "service":[{{"id":"#atproto_pds","type":"AtprotoPersonalDataServer",
              "serviceEndpoint":"https://pds.example.com"}}]}}"##
        )
    }

    #[test]
    fn extracts_handle_endpoint_and_key() {
        let d = DidDocument::parse(DID, doc(DID).as_bytes()).expect("parses");
        assert_eq!(d.handle.as_deref(), Some("alice.example.com"));
        assert_eq!(d.pds_endpoint.as_deref(), Some("https://pds.example.com"));
        assert_eq!(
            d.signing_key.as_deref(),
            Some("zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF")
        );
    }

    #[test]
    fn legacy_uncompressed_key_becomes_multikey() {
        // did-docs.json of fixtures/firehose/snap.network: the older PLC's legacy form.
        let body = format!(
            r##"{{"id":"{DID}","verificationMethod":[{{"id":"#atproto",
            "type":"EcdsaSecp256k1VerificationKey2019","controller":"{DID}",
            "publicKeyMultibase":"zR96LpgfbFVikZwdUeuFVTGWHAazJsR3ZfGkPMiT8bZ4ABSWMbhR5KwSNB3xf55vf1g6gTmu6TLNs93AJZmEXPmui"}}]}}"##
        );
        let d = DidDocument::parse(DID, body.as_bytes()).expect("parses");
        assert_eq!(
            d.signing_key.as_deref(),
            Some("zQ3shryyC9656fBANu4g19iXepuANMzHZm1rkT7Qoo5kqNgUL")
        );
        let garbage = body.replace("zR96", "z0OIl");
        let d = DidDocument::parse(DID, garbage.as_bytes()).expect("parses");
        assert_eq!(d.signing_key, None);
    }

    #[test]
    fn rejects_other_id_and_garbage() {
        assert!(matches!(
            DidDocument::parse(DID, doc("did:plc:other").as_bytes()),
            Err(IdentityError::IdMismatch { .. })
        ));
        for bad in [
            &b"not json"[..],
            b"[]",
            b"{}",
            br#"{"id":5}"#,
            br#"{"id":"x","service":7}"#,
        ] {
            assert!(matches!(
                DidDocument::parse(DID, bad),
                Err(IdentityError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn optional_parts_may_be_missing_or_wrong() {
        let body = format!(
            r##"{{"id":"{DID}","alsoKnownAs":["https://x"],
            "service":[{{"id":"#atproto_pds","type":"Other","serviceEndpoint":"https://a"}},
                       {{"id":"#atproto_pds","type":"AtprotoPersonalDataServer","serviceEndpoint":"ftp://b"}}]}}"##
        );
        let d = DidDocument::parse(DID, body.as_bytes()).expect("parses");
        assert_eq!(
            (d.handle, d.pds_endpoint, d.signing_key),
            (None, None, None)
        );
    }
}
