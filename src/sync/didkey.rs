//! atproto signing keys: the `Multikey` string of a DID document (`z…` base58btc of a
//! multicodec-prefixed compressed key), `did:key:z…` (PLC operations), and the legacy
//! `EcdsaSecp256k1VerificationKey2019` / `EcdsaSecp256r1VerificationKey2019` form (the raw SEC1
//! key, compressed or uncompressed, without multicodec prefix), which
//! [`multikey_from_method`] turns into the `Multikey` form so the rest of the crate (and the
//! `actors.signing_key` column) only ever sees one form.

use multibase::Base;

use super::error::KeyError;

/// Multicodec varint prefix of a compressed secp256k1 public key (`secp256k1-pub`, 0xe7).
const K256_PREFIX: [u8; 2] = [0xe7, 0x01];
/// Multicodec varint prefix of a compressed P-256 public key (`p256-pub`, 0x1200).
const P256_PREFIX: [u8; 2] = [0x80, 0x24];
const DID_KEY: &str = "did:key:";

/// The two curves atproto signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    /// secp256k1 (`ES256K`).
    K256,
    /// NIST P-256 (`ES256`).
    P256,
}

impl Curve {
    fn prefix(self) -> [u8; 2] {
        match self {
            Self::K256 => K256_PREFIX,
            Self::P256 => P256_PREFIX,
        }
    }
}

/// A parsed, on-curve verifying key. Parse once per account and keep it: parsing
/// decompresses the point, which costs about as much as a signature check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    K256(secp256k1::PublicKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl PublicKey {
    /// Parses `did:key:z…` or a bare `Multikey` string `z…`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        Self::from_multikey(s.strip_prefix(DID_KEY).unwrap_or(s))
    }

    /// Parses `did:key:z…` only.
    pub fn from_did_key(s: &str) -> Result<Self, KeyError> {
        let multikey = s
            .strip_prefix(DID_KEY)
            .ok_or_else(|| KeyError::NotDidKey(s.chars().take(64).collect()))?;
        Self::from_multikey(multikey)
    }

    /// Parses a `Multikey` `publicKeyMultibase` (base58btc, multicodec prefix, SEC1 key).
    pub fn from_multikey(s: &str) -> Result<Self, KeyError> {
        let bytes = decode_base58btc(s)?;
        let (prefix, key) = bytes.split_at_checked(2).ok_or(KeyError::Unsupported)?;
        match <[u8; 2]>::try_from(prefix) {
            Ok(K256_PREFIX) => Self::from_sec1(Curve::K256, key),
            Ok(P256_PREFIX) => Self::from_sec1(Curve::P256, key),
            _ => Err(KeyError::Unsupported),
        }
    }

    /// A key from its SEC1 bytes (33-byte compressed or 65-byte uncompressed).
    pub fn from_sec1(curve: Curve, key: &[u8]) -> Result<Self, KeyError> {
        match curve {
            Curve::K256 => secp256k1::PublicKey::from_slice(key)
                .map(Self::K256)
                .map_err(|_| KeyError::BadPoint),
            Curve::P256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(key)
                .map(Self::P256)
                .map_err(|_| KeyError::BadPoint),
        }
    }

    pub fn curve(&self) -> Curve {
        match self {
            Self::K256(_) => Curve::K256,
            Self::P256(_) => Curve::P256,
        }
    }

    /// The key as `did:key:z…` (compressed), the form PLC operations use.
    pub fn to_did_key(&self) -> String {
        let point = match self {
            Self::K256(k) => k.serialize().to_vec(),
            Self::P256(k) => k.to_encoded_point(true).as_bytes().to_vec(),
        };
        format!("{DID_KEY}{}", encode_multikey(self.curve(), &point))
    }
}

fn decode_base58btc(s: &str) -> Result<Vec<u8>, KeyError> {
    // A key is 35 bytes (≈48 base58 characters); refuse to decode anything far longer.
    const MAX_CHARS: usize = 128;
    if s.len() > MAX_CHARS {
        return Err(KeyError::Multibase(format!("{} characters", s.len())));
    }
    let (base, bytes) = multibase::decode(s).map_err(|e| KeyError::Multibase(e.to_string()))?;
    if base != Base::Base58Btc {
        return Err(KeyError::NotBase58);
    }
    Ok(bytes)
}

/// `z` + base58btc(multicodec prefix ‖ compressed key).
fn encode_multikey(curve: Curve, compressed: &[u8]) -> String {
    let mut v = Vec::with_capacity(2 + compressed.len());
    v.extend_from_slice(&curve.prefix());
    v.extend_from_slice(compressed);
    multibase::encode(Base::Base58Btc, v)
}

/// The `Multikey` string for a DID document verification method of type `kind` with
/// `publicKeyMultibase` `multibase`: unchanged for `Multikey` (and any other type), converted
/// for the legacy `EcdsaSecp256k1VerificationKey2019` / `EcdsaSecp256r1VerificationKey2019`
/// types, whose multibase is the bare SEC1 key (uncompressed keys are compressed: the
/// compressed form is the x coordinate with the parity of y in the tag byte). `None` when a
/// legacy key does not decode.
pub(crate) fn multikey_from_method(kind: Option<&str>, multibase: &str) -> Option<String> {
    let curve = match kind {
        Some("EcdsaSecp256k1VerificationKey2019") => Curve::K256,
        Some("EcdsaSecp256r1VerificationKey2019") => Curve::P256,
        _ => return Some(multibase.to_owned()),
    };
    let raw = decode_base58btc(multibase).ok()?;
    let compressed = match raw.as_slice() {
        [0x02 | 0x03, rest @ ..] if rest.len() == 32 => raw.clone(),
        [0x04, xy @ ..] if xy.len() == 64 => {
            let (x, y) = xy.split_at(32);
            let mut c = Vec::with_capacity(33);
            c.push(0x02 | (y[31] & 1));
            c.extend_from_slice(x);
            c
        }
        _ => return None,
    };
    Some(encode_multikey(curve, &compressed))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn interop(name: &str) -> serde_json::Value {
        let path = format!("{}/fixtures/interop/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("interop vectors");
        serde_json::from_str(&text).expect("json")
    }

    #[test]
    fn w3c_did_keys_round_trip() {
        for (file, curve) in [
            ("w3c_didkey_K256.json", Curve::K256),
            ("w3c_didkey_P256.json", Curve::P256),
        ] {
            let v = interop(&format!("crypto/{file}"));
            let cases = v.as_array().expect("array");
            assert!(!cases.is_empty());
            for case in cases {
                let did = case["publicDidKey"].as_str().expect("did");
                let key = PublicKey::from_did_key(did).expect(did);
                assert_eq!(key.curve(), curve);
                assert_eq!(key.to_did_key(), did);
            }
        }
    }

    #[test]
    fn legacy_method_becomes_the_multikey_of_its_did_key() {
        // Each signature fixture gives one key both as did:key and as a legacy bare multibase.
        let v = interop("crypto/signature-fixtures.json");
        for case in v.as_array().expect("array") {
            let suite = case["didDocSuite"].as_str();
            let legacy = case["publicKeyMultibase"].as_str().expect("multibase");
            let did = case["publicKeyDid"].as_str().expect("did");
            let multikey = multikey_from_method(suite, legacy).expect("converts");
            assert_eq!(format!("did:key:{multikey}"), did);
            assert_eq!(PublicKey::parse(&multikey), PublicKey::parse(did));
        }
        // Multikey documents pass through untouched.
        assert_eq!(
            multikey_from_method(Some("Multikey"), "zQ3sabc").as_deref(),
            Some("zQ3sabc")
        );
    }

    #[test]
    fn uncompressed_legacy_key_matches_plc_did_key() {
        // did:plc:73w5gmpgkg2tmhnafikja5jk in fixtures/firehose/snap.network: the DID
        // document's legacy uncompressed key and the PLC log's did:key are one key.
        let legacy = "zR96LpgfbFVikZwdUeuFVTGWHAazJsR3ZfGkPMiT8bZ4ABSWMbhR5KwSNB3xf55vf1g6gTmu6TLNs93AJZmEXPmui";
        let multikey = multikey_from_method(Some("EcdsaSecp256k1VerificationKey2019"), legacy)
            .expect("converts");
        assert_eq!(
            format!("did:key:{multikey}"),
            "did:key:zQ3shryyC9656fBANu4g19iXepuANMzHZm1rkT7Qoo5kqNgUL"
        );
    }

    #[test]
    fn garbage_keys_are_errors_not_panics() {
        for bad in [
            "",
            "z",
            "z1",
            "zQ3s",
            "did:key:",
            "did:key:z",
            "mAAAA",
            "zKey-alice.example.com",
        ] {
            assert!(PublicKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(
            PublicKey::from_did_key("zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme").is_err()
        );
        assert_eq!(
            multikey_from_method(Some("EcdsaSecp256k1VerificationKey2019"), "z1"),
            None
        );
        let long = format!("z{}", "2".repeat(500));
        assert!(matches!(
            PublicKey::parse(&long),
            Err(KeyError::Multibase(_))
        ));
    }
}
