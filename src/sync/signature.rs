//! Signature checks: ECDSA over the SHA-256 of a message, 64-byte compact `r‖s`, low-S only
//! (atproto forbids the malleable high-S twin and DER encodings), and the bytes a repo commit
//! is signed over: its DAG-CBOR block without the `sig` entry.

use super::didkey::PublicKey;
use super::error::VerifyError;
use crate::firehose::cbor::item_len;

/// A compact ECDSA signature is `r ‖ s`, 32 bytes each.
const SIG_BYTES: usize = 64;

/// libsecp256k1's verification context, built once (its tables take a moment).
static K256_VERIFIER: std::sync::LazyLock<secp256k1::Secp256k1<secp256k1::VerifyOnly>> =
    std::sync::LazyLock::new(secp256k1::Secp256k1::verification_only);

impl PublicKey {
    /// Verifies `sig` over `msg` (hashed with SHA-256). Rejects DER, wrong lengths and high-S
    /// signatures on both curves: libsecp256k1 rejects high-S itself, `p256` does not, so S
    /// is checked here for it.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), VerifyError> {
        use p256::ecdsa::signature::Verifier;
        if sig.len() != SIG_BYTES {
            return Err(VerifyError::BadSignature);
        }
        let ok = match self {
            Self::K256(key) => {
                let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(msg).into();
                secp256k1::ecdsa::Signature::from_compact(sig).is_ok_and(|s| {
                    K256_VERIFIER
                        .verify_ecdsa(&secp256k1::Message::from_digest(digest), &s, key)
                        .is_ok()
                })
            }
            Self::P256(key) => p256::ecdsa::Signature::from_slice(sig)
                .ok()
                .filter(|s| s.normalize_s().is_none())
                .is_some_and(|s| key.verify(msg, &s).is_ok()),
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::BadSignature)
        }
    }
}

/// The unsigned commit a signature covers: `block` (a DAG-CBOR map) with its `sig` entry cut
/// out and the map's entry count lowered by one. Removing an entry from a canonical map
/// leaves it canonical, and unknown fields stay signed, as the reference implementation
/// (decode, delete `sig`, re-encode) has it.
pub(crate) fn unsigned_commit_bytes(block: &[u8]) -> Result<Vec<u8>, VerifyError> {
    let bad = |why: &str| VerifyError::BadCommit(why.to_owned());
    let (&first, _) = block.split_first().ok_or_else(|| bad("empty block"))?;
    if first >> 5 != 5 {
        return Err(bad("not a map"));
    }
    let (count, head) = match first & 0x1f {
        n @ 0..=23 => (usize::from(n), 1),
        24 => (
            usize::from(*block.get(1).ok_or_else(|| bad("truncated"))?),
            2,
        ),
        _ => return Err(bad("map too large")),
    };
    let mut out = Vec::with_capacity(block.len());
    write_map_head(count.checked_sub(1).ok_or_else(|| bad("no sig"))?, &mut out);
    let mut pos = head;
    let mut found = false;
    for _ in 0..count {
        let rest = block.get(pos..).ok_or_else(|| bad("truncated"))?;
        let klen = item_len(rest).map_err(|e| bad(&format!("{e:?}")))?;
        let vlen = item_len(&rest[klen..]).map_err(|e| bad(&format!("{e:?}")))?;
        if &rest[..klen] == b"\x63sig" {
            if found {
                return Err(bad("two sig entries"));
            }
            found = true;
        } else {
            out.extend_from_slice(&rest[..klen + vlen]);
        }
        pos += klen + vlen;
    }
    if !found {
        return Err(bad("no sig"));
    }
    if pos != block.len() {
        return Err(bad("trailing data"));
    }
    Ok(out)
}

fn write_map_head(count: usize, out: &mut Vec<u8>) {
    match u8::try_from(count) {
        Ok(n @ 0..=23) => out.push(0xa0 | n),
        // Callers only pass counts below 256 (the head parsed above has at most one byte).
        Ok(n) => out.extend_from_slice(&[0xb8, n]),
        Err(_) => out.push(0xa0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::didkey::tests::interop;
    use base64::Engine;

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(s.trim_end_matches('='))
            .expect("base64")
    }

    #[test]
    fn interop_signature_vectors() {
        let v = interop("crypto/signature-fixtures.json");
        let cases = v.as_array().expect("array");
        let (mut valid, mut invalid) = (0, 0);
        for case in cases {
            let comment = case["comment"].as_str().unwrap_or_default();
            let key = PublicKey::parse(case["publicKeyDid"].as_str().expect("did")).expect("key");
            let msg = b64(case["messageBase64"].as_str().expect("msg"));
            let sig = b64(case["signatureBase64"].as_str().expect("sig"));
            let expected = case["validSignature"].as_bool().expect("bool");
            assert_eq!(key.verify(&msg, &sig).is_ok(), expected, "{comment}");
            if expected {
                valid += 1;
            } else {
                invalid += 1;
            }
        }
        // Two valid (one per curve); high-S and DER on both curves are invalid.
        assert!(
            valid >= 2 && invalid >= 4,
            "{valid} valid, {invalid} invalid"
        );
    }

    #[test]
    fn high_s_twin_of_a_valid_signature_is_rejected_on_both_curves() {
        let v = interop("crypto/signature-fixtures.json");
        for case in v.as_array().expect("array") {
            if case["validSignature"] != true {
                continue;
            }
            let key = PublicKey::parse(case["publicKeyDid"].as_str().expect("did")).expect("key");
            let msg = b64(case["messageBase64"].as_str().expect("msg"));
            let sig = b64(case["signatureBase64"].as_str().expect("sig"));
            // s' = n - s verifies under plain ECDSA; atproto must refuse it.
            let high = match &key {
                PublicKey::K256(_) => {
                    let s = k256::ecdsa::Signature::from_slice(&sig).expect("sig");
                    let (r, s) = s.split_scalars();
                    k256::ecdsa::Signature::from_scalars(r, -*s)
                        .expect("twin")
                        .to_vec()
                }
                PublicKey::P256(_) => {
                    let s = p256::ecdsa::Signature::from_slice(&sig).expect("sig");
                    let (r, s) = s.split_scalars();
                    p256::ecdsa::Signature::from_scalars(r, -*s)
                        .expect("twin")
                        .to_vec()
                }
            };
            assert!(key.verify(&msg, &sig).is_ok());
            assert_eq!(key.verify(&msg, &high), Err(VerifyError::BadSignature));
            let mut flipped = sig.clone();
            flipped[10] ^= 1;
            assert_eq!(key.verify(&msg, &flipped), Err(VerifyError::BadSignature));
            assert!(key.verify(&msg, &sig[..63]).is_err());
        }
    }

    #[test]
    fn unsigned_bytes_drop_only_sig() {
        #[derive(serde::Serialize)]
        struct Signed<'a> {
            did: &'a str,
            rev: &'a str,
            #[serde(with = "serde_bytes")]
            sig: &'a [u8],
            data: u64,
            version: u64,
        }
        #[derive(serde::Serialize)]
        struct Unsigned<'a> {
            did: &'a str,
            rev: &'a str,
            data: u64,
            version: u64,
        }
        let signed = serde_ipld_dagcbor::to_vec(&Signed {
            did: "did:plc:x",
            rev: "3abc",
            sig: &[7; 64],
            data: 5,
            version: 3,
        })
        .expect("encode");
        let unsigned = serde_ipld_dagcbor::to_vec(&Unsigned {
            did: "did:plc:x",
            rev: "3abc",
            data: 5,
            version: 3,
        })
        .expect("encode");
        assert_eq!(unsigned_commit_bytes(&signed).expect("cut"), unsigned);
        assert!(unsigned_commit_bytes(&unsigned).is_err(), "no sig");
        for bad in [&[][..], b"\x80", b"\xa1\x63sig", b"\xbf"] {
            assert!(unsigned_commit_bytes(bad).is_err());
        }
        let mut trailing = signed.clone();
        trailing.push(0);
        assert!(unsigned_commit_bytes(&trailing).is_err());
    }
}
