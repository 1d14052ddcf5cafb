//! Values PostgreSQL cannot take, made storable before they become rows (§6, "What PostgreSQL
//! cannot take"). Legal atproto data that PostgreSQL refuses would fail its whole batch; each
//! rule below changes the value instead, deterministically (a replay makes the same change),
//! and counts the change by kind ([`Fix`]):
//!
//! | value | PostgreSQL says | rule |
//! | --- | --- | --- |
//! | U+0000 in a text column | `22021` | removed |
//! | U+0000 in a jsonb string or key | `22P05` | removed (a key that then equals another key: the later one wins) |
//! | a reference (AT-URI or DID naming another record or account) over [`MAX_INDEXED_BYTES`] | `54000` (btree row size) | cut at a character boundary and [`CUT_MARK`] appended, [`MAX_INDEXED_BYTES`] in all |
//! | a datetime outside PostgreSQL's `timestamptz` range | `22008` | `NULL` |
//!
//! A record's own key (`uri`, `did`) is never changed: a changed key would no longer match the
//! record's later updates and deletes. Numbers are `i64` in `bigint` columns, so none can be
//! out of range. jsonb columns are not indexed: long strings in them are kept as they are.

use std::ops::AddAssign;

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

/// Longest reference stored (cut ones included). A btree entry holds at most 2,704 bytes; the
/// widest index (`notifications`' key: record URI, reason, recipient DID) must fit a record's
/// own URI next to a reference; and a valid reference to a record of a did:plc or did:web
/// account is at most about 800 bytes (253-byte domain, NSID, 512-byte record key).
pub const MAX_INDEXED_BYTES: usize = 1000;

/// Appended to a cut reference. No valid DID or AT-URI contains it (both are ASCII), so a cut
/// value never names a real record or account.
pub const CUT_MARK: &str = "\u{2026}";

/// A kind of change (the `kind` label of `atproto_ingest_sanitized_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    NulText,
    NulJson,
    LongReference,
    TimeOutOfRange,
}

impl Fix {
    pub const ALL: [Fix; 4] = [
        Fix::NulText,
        Fix::NulJson,
        Fix::LongReference,
        Fix::TimeOutOfRange,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Fix::NulText => "nul_text",
            Fix::NulJson => "nul_json",
            Fix::LongReference => "long_reference",
            Fix::TimeOutOfRange => "time_out_of_range",
        }
    }
}

/// Changes made, counted by kind (one per value changed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fixes([u64; 4]);

impl Fixes {
    pub fn get(&self, fix: Fix) -> u64 {
        self.0[fix as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    fn add(&mut self, fix: Fix) {
        self.0[fix as usize] += 1;
    }

    /// Removes U+0000 from a text cell.
    pub(crate) fn text(&mut self, s: &mut String) {
        if s.contains('\0') {
            s.retain(|c| c != '\0');
            self.add(Fix::NulText);
        }
    }

    pub(crate) fn opt_text(&mut self, s: &mut Option<String>) {
        if let Some(s) = s {
            self.text(s);
        }
    }

    /// A reference in an indexed column: U+0000 removed, then cut to [`MAX_INDEXED_BYTES`]
    /// (mark included).
    pub(crate) fn reference(&mut self, s: &mut String) {
        self.text(s);
        if s.len() > MAX_INDEXED_BYTES {
            let mut end = MAX_INDEXED_BYTES - CUT_MARK.len();
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push_str(CUT_MARK);
            self.add(Fix::LongReference);
        }
    }

    pub(crate) fn opt_reference(&mut self, s: &mut Option<String>) {
        if let Some(s) = s {
            self.reference(s);
        }
    }

    /// Removes U+0000 from every string and key of a jsonb value (counted once per value).
    pub(crate) fn json(&mut self, v: &mut Value) {
        if strip_json(v) {
            self.add(Fix::NulJson);
        }
    }

    pub(crate) fn opt_json(&mut self, v: &mut Option<Value>) {
        if let Some(v) = v {
            self.json(v);
        }
    }

    /// A datetime PostgreSQL cannot store becomes `NULL`.
    pub(crate) fn time(&mut self, t: &mut Option<DateTime<Utc>>) {
        if t.is_some_and(|t| !in_pg_range(t)) {
            *t = None;
            self.add(Fix::TimeOutOfRange);
        }
    }
}

impl AddAssign for Fixes {
    fn add_assign(&mut self, other: Fixes) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }
}

/// Whether `timestamptz` holds `t`: 4713 BC to 294276 AD (chrono's own range ends sooner).
fn in_pg_range(t: DateTime<Utc>) -> bool {
    // 4713 BC is year -4712 in chrono's proleptic numbering.
    NaiveDate::from_ymd_opt(-4712, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .is_some_and(|min| t.naive_utc() >= min)
}

/// Removes U+0000 from strings and keys in place; whether anything changed.
fn strip_json(v: &mut Value) -> bool {
    match v {
        Value::String(s) => {
            let had = s.contains('\0');
            if had {
                s.retain(|c| c != '\0');
            }
            had
        }
        Value::Array(items) => items.iter_mut().fold(false, |acc, i| strip_json(i) | acc),
        Value::Object(map) => {
            let mut changed = false;
            if map.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(map);
                for (mut k, val) in old {
                    k.retain(|c| c != '\0');
                    map.insert(k, val);
                }
                changed = true;
            }
            map.values_mut().fold(changed, |acc, i| strip_json(i) | acc)
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_is_removed_from_text_and_counted_once_per_value() {
        let mut f = Fixes::default();
        let mut s = "a\0b\0c".to_owned();
        f.text(&mut s);
        assert_eq!(s, "abc");
        let mut clean = "abc".to_owned();
        f.text(&mut clean);
        let mut none: Option<String> = None;
        f.opt_text(&mut none);
        assert_eq!(f.get(Fix::NulText), 1);
        assert_eq!(f.total(), 1);
    }

    #[test]
    fn nul_is_removed_from_json_strings_and_keys_at_any_depth() {
        let mut f = Fixes::default();
        let mut v = json!({"te\u{0}xt": "a\u{0}b", "list": [{"k": ["x\u{0}"]}], "n": 1});
        f.json(&mut v);
        assert_eq!(v, json!({"text": "ab", "list": [{"k": ["x"]}], "n": 1}));
        assert_eq!(f.get(Fix::NulJson), 1);
        let mut clean = json!({"a": ["b", 2, null, true]});
        f.json(&mut clean);
        assert_eq!(f.get(Fix::NulJson), 1);
    }

    #[test]
    fn long_references_are_cut_at_a_char_boundary_and_marked() {
        let mut f = Fixes::default();
        let mut short = "at://did:plc:a/app.bsky.feed.post/1".to_owned();
        f.reference(&mut short);
        assert_eq!(short, "at://did:plc:a/app.bsky.feed.post/1");
        let exact = "x".repeat(MAX_INDEXED_BYTES);
        let mut same = exact.clone();
        f.reference(&mut same);
        assert_eq!(same, exact);
        assert_eq!(f.total(), 0);
        // A 3-byte character straddles the cut: the cut falls before it.
        let keep = MAX_INDEXED_BYTES - CUT_MARK.len() - 1;
        let mut long = format!("{}€{}", "x".repeat(keep), "y".repeat(7000));
        f.reference(&mut long);
        assert_eq!(long, format!("{}{CUT_MARK}", "x".repeat(keep)));
        assert!(long.len() <= MAX_INDEXED_BYTES);
        // Cutting again changes nothing: replays store the same value.
        let before = long.clone();
        f.reference(&mut long);
        assert_eq!(long, before);
        assert_eq!(f.get(Fix::LongReference), 1);
    }

    #[test]
    fn times_outside_postgres_become_null() {
        let mut f = Fixes::default();
        let ok = "0000-01-01T00:00:00Z".parse::<DateTime<Utc>>().ok();
        let mut t = ok;
        f.time(&mut t);
        assert_eq!(t, ok);
        let mut far = NaiveDate::from_ymd_opt(-5000, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc());
        assert!(far.is_some());
        f.time(&mut far);
        assert_eq!(far, None);
        let mut max = Some(DateTime::<Utc>::MAX_UTC);
        f.time(&mut max);
        assert!(
            max.is_some(),
            "chrono's maximum is inside PostgreSQL's range"
        );
        assert_eq!(f.get(Fix::TimeOutOfRange), 1);
    }
}
