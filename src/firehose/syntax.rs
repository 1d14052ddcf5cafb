//! atproto identifier syntax checks (DID, handle, NSID, record key, AT-URI, datetime).
//! DID, handle, NSID, record key and datetime rules come from atrium-api's validated string
//! types; the AT-URI check (restricted syntax of the spec) is written here.

use atrium_api::types::string::{Datetime, Did, Handle, Nsid, RecordKey, Tid};

/// Longest AT-URI the spec allows.
const MAX_AT_URI: usize = 8 * 1024;

pub fn is_did(s: &str) -> bool {
    s.parse::<Did>().is_ok()
}

pub fn is_handle(s: &str) -> bool {
    s.parse::<Handle>().is_ok()
}

pub fn is_nsid(s: &str) -> bool {
    s.parse::<Nsid>().is_ok()
}

pub fn is_record_key(s: &str) -> bool {
    s.parse::<RecordKey>().is_ok()
}

pub fn is_tid(s: &str) -> bool {
    s.parse::<Tid>().is_ok()
}

/// The timestamp of a TID (µs since the Unix epoch): its top 53 bits after the zero bit.
/// `None` when `s` is not a TID.
pub fn tid_micros(s: &str) -> Option<i64> {
    const ALPHABET: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";
    if !is_tid(s) {
        return None;
    }
    // 13 base32-sortable digits; the first is below 16, so the value fits in 64 bits.
    let mut v: u64 = 0;
    for b in s.bytes() {
        let digit = ALPHABET.iter().position(|c| *c == b)?;
        v = (v << 5) | digit as u64;
    }
    i64::try_from(v >> 10).ok()
}

/// CID string syntax as the atproto spec defines it (8–256 chars of `[a-zA-Z0-9+=]`, no CIDv0
/// `Qmb…`); whether it decodes to a CID is a separate, stricter question (`cid::Cid::from_str`).
pub fn is_cid_syntax(s: &str) -> bool {
    (8..=256).contains(&s.len())
        && !s.starts_with("Qmb")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'=')
}

pub fn is_datetime(s: &str) -> bool {
    s.parse::<Datetime>().is_ok()
}

/// Restricted AT-URI: `at://AUTHORITY[/COLLECTION[/RKEY]]`, authority a DID or handle,
/// collection an NSID, rkey a record key; no query, no trailing slash. A fragment
/// (`#/json/pointer`) is allowed after the path.
pub fn is_at_uri(s: &str) -> bool {
    if s.len() > MAX_AT_URI {
        return false;
    }
    let Some(rest) = s.strip_prefix("at://") else {
        return false;
    };
    let (path, fragment) = match rest.split_once('#') {
        Some((p, f)) => (p, Some(f)),
        None => (rest, None),
    };
    if let Some(f) = fragment {
        let ok = f.starts_with('/')
            && f.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~:@!$&')(*+,;=-[]/\\".contains(&b));
        if !ok {
            return false;
        }
    }
    let mut parts = path.split('/');
    let authority = parts.next().unwrap_or_default();
    if !(is_did(authority) || is_handle(authority)) {
        return false;
    }
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => true,
        (Some(c), None, _) => is_nsid(c),
        (Some(c), Some(r), None) => is_nsid(c) && is_record_key(r),
        _ => false,
    }
}

/// Splits a valid AT-URI into (authority, collection, rkey).
pub fn split_at_uri(s: &str) -> Option<(&str, Option<&str>, Option<&str>)> {
    let rest = s.strip_prefix("at://")?;
    let rest = rest.split('#').next().unwrap_or(rest);
    let mut parts = rest.splitn(3, '/');
    let authority = parts.next()?;
    Some((authority, parts.next(), parts.next()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads an interop syntax vector file: non-empty lines that are not comments.
    fn vectors(name: &str) -> Vec<String> {
        let path = format!(
            "{}/fixtures/interop/syntax/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    fn check(name: &str, f: fn(&str) -> bool) {
        let valid = vectors(&format!("{name}_syntax_valid.txt"));
        let invalid = vectors(&format!("{name}_syntax_invalid.txt"));
        assert!(!valid.is_empty() && !invalid.is_empty());
        for v in &valid {
            assert!(f(v), "{name}: should be valid: {v:?}");
        }
        for v in &invalid {
            assert!(!f(v), "{name}: should be invalid: {v:?}");
        }
    }

    #[test]
    fn interop_did() {
        check("did", is_did);
    }
    #[test]
    fn interop_handle() {
        check("handle", is_handle);
    }
    #[test]
    fn interop_nsid() {
        check("nsid", is_nsid);
    }
    #[test]
    fn interop_record_key() {
        check("recordkey", is_record_key);
    }
    #[test]
    fn interop_datetime() {
        check("datetime", is_datetime);
    }
    #[test]
    fn interop_tid() {
        check("tid", is_tid);
    }
    #[test]
    fn a_tid_gives_back_its_time() {
        use atrium_api::types::LimitedU32;
        let t = chrono::DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        for clock in [0u32, 1023] {
            let tid = Tid::from_datetime(LimitedU32::try_from(clock).unwrap(), t);
            assert_eq!(tid_micros(tid.as_str()), Some(t.timestamp_micros()));
        }
        assert_eq!(tid_micros("not-a-tid"), None);
    }
    #[test]
    fn interop_cid() {
        check("cid", is_cid_syntax);
        // Every valid base32 CIDv1 in the vectors decodes and prints back identically.
        for v in vectors("cid_syntax_valid.txt")
            .iter()
            .filter(|v| v.starts_with("bafy"))
        {
            let cid: cid::Cid = v.parse().unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(&cid.to_string(), v);
            assert_eq!(
                cid::Cid::try_from(cid.to_bytes().as_slice()).ok(),
                Some(cid)
            );
        }
    }
    #[test]
    fn interop_at_uri() {
        check("aturi", is_at_uri);
    }
}
