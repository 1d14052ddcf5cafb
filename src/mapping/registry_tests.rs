//! Every registered collection round-trips: a real record of it from the bundled fixture
//! decodes to its typed record, maps to a row of its table whose values fit the table's
//! columns, and that table, with every one of those columns, exists in the migrations.

use std::collections::BTreeMap;

use super::*;
use crate::firehose::fixture::{self, FrameReader, RawFrame};
use crate::firehose::frame::{self, DEFAULT_MAX_FRAME_BYTES};
use crate::firehose::{EventKind, OpRecord};
use crate::mapping::{columns::Ty, GenericRow, META};

/// The first record of each table found in `small.frames`, mapped to its row.
fn fixture_rows() -> BTreeMap<Table, Row> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/firehose/small.frames"
    );
    let reader = fixture::open(std::path::Path::new(path)).unwrap();
    let mut rows = BTreeMap::new();
    for raw in FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES) {
        let RawFrame::Message(msg) = raw.unwrap() else {
            continue;
        };
        let ev = frame::decode(&msg).unwrap().event;
        let EventKind::Commit(c) = &ev.kind else {
            continue;
        };
        let origin = Origin {
            did: &c.repo,
            seq: ev.seq,
            time: crate::mapping::parse_time(&c.time),
        };
        for op in &c.ops {
            let uri = op.uri(&c.repo);
            let cid = op.cid.map(|c| c.to_string()).unwrap_or_default();
            let table = Table::for_collection(&op.collection);
            let row = match &op.record {
                OpRecord::Known(k) => known(origin, uri, cid, k),
                OpRecord::Generic(v) => Row::Generic(GenericRow {
                    meta: Meta {
                        uri,
                        cid,
                        did: c.repo.clone(),
                        created_at: None,
                    },
                    collection: op.collection.clone(),
                    rkey: op.rkey.clone(),
                    value: v.clone(),
                }),
                _ => continue,
            };
            rows.entry(table).or_insert(row);
        }
    }
    rows
}

/// `CREATE TABLE name (…);` bodies of every migration, by table name.
fn migration_tables() -> BTreeMap<String, String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
    let mut sql = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sql") {
            sql.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let mut tables = BTreeMap::new();
    for part in sql.split("CREATE TABLE ").skip(1) {
        let (name, rest) = part.split_once(" (").unwrap();
        let body = rest.split("\n);").next().unwrap();
        tables.insert(name.trim().to_owned(), body.to_owned());
    }
    tables
}

fn has_column(body: &str, column: &str) -> bool {
    body.lines()
        .any(|l| l.split_whitespace().next() == Some(column))
}

#[test]
fn every_collection_round_trips_from_the_fixture() {
    let rows = fixture_rows();
    let tables = migration_tables();
    for table in Table::ALL {
        let row = rows
            .get(&table)
            .unwrap_or_else(|| panic!("no {} record in small.frames", table.name()));
        assert_eq!(row.table(), table);
        if let Some(nsid) = table.nsid() {
            assert_eq!(Table::for_collection(nsid), table);
            assert!(is_known(nsid));
            assert!(!matches!(row, Row::Generic(_)), "{nsid} mapped as generic");
        } else {
            assert!(matches!(row, Row::Generic(_)));
        }
        // The row's values fit the table's columns, one for one and type for type.
        let cols: Vec<Ty> = META.iter().chain(table.columns()).map(|c| c.ty).collect();
        let vals: Vec<Ty> = row
            .meta()
            .values()
            .iter()
            .chain(&row.values())
            .map(Val::ty)
            .collect();
        assert_eq!(cols, vals, "{}", table.name());
        // The table and every column the writer fills exist in the schema.
        let body = tables
            .get(table.name())
            .unwrap_or_else(|| panic!("no CREATE TABLE {} in migrations", table.name()));
        for col in META.iter().chain(table.columns()) {
            assert!(has_column(body, col.name), "{}.{}", table.name(), col.name);
        }
        assert!(has_column(body, table.key()), "{}", table.name());
        for col in table.removed_columns().split(", ") {
            assert!(has_column(body, col), "{}.{col}", table.name());
        }
    }
}

#[test]
fn registry_facts() {
    assert_eq!(Table::ALL.last(), Some(&Table::Records));
    assert_eq!(Table::for_collection("com.example.status"), Table::Records);
    assert!(!is_known("app.bsky.feed.nope"));
    let derived: Vec<&str> = Table::ALL
        .iter()
        .filter(|t| t.has_derived())
        .map(|t| t.name())
        .collect();
    assert_eq!(derived, ["posts", "likes", "reposts", "follows"]);
    assert_eq!(Table::Profiles.key(), "did");
    assert_eq!(Table::Blocks.removed_columns(), "uri");
    // Names are unique: one table per collection.
    let mut names: Vec<&str> = Table::ALL.iter().map(|t| t.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Table::ALL.len());
}

/// Makes a record's JSON hostile but lexicon-valid: U+0000 in every free-text field, every
/// AT-URI stretched to 7 KB with a fragment (legal: AT-URIs may have 8 KB).
fn poison(v: &mut serde_json::Value, key: Option<&str>) {
    use serde_json::Value;
    match v {
        Value::String(s) if s.starts_with("at://") && !s.contains('#') => {
            s.push_str("#/");
            while s.len() < 7000 {
                s.push_str("x9");
            }
        }
        Value::String(s)
            if matches!(
                key,
                Some("text" | "displayName" | "description" | "name" | "title")
            ) =>
        {
            s.insert(0, '\0');
        }
        Value::Array(items) => items.iter_mut().for_each(|i| poison(i, key)),
        Value::Object(map) => map.iter_mut().for_each(|(k, i)| poison(i, Some(k))),
        _ => {}
    }
}

/// Every table's row, from a real record of the fixture made hostile ([`poison`]), is storable
/// once sanitized: no U+0000 in any text or JSON cell, no text cell over the index limit. A
/// mapping that forgets a column fails here.
#[test]
fn sanitized_rows_of_hostile_records_are_storable() {
    use super::super::sanitize::{Fix, MAX_INDEXED_BYTES};
    // (U+0000 in JSON cells: `sanitize`'s own tests and tests/it/hostile_data.rs.)
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/firehose/small.frames"
    );
    let reader = fixture::open(std::path::Path::new(path)).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut fixes = Fixes::default();
    for raw in FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES) {
        let RawFrame::Message(msg) = raw.unwrap() else {
            continue;
        };
        let ev = frame::decode(&msg).unwrap().event;
        let EventKind::Commit(c) = &ev.kind else {
            continue;
        };
        for op in &c.ops {
            let table = Table::for_collection(&op.collection);
            let OpRecord::Known(k) = &op.record else {
                continue;
            };
            if seen.contains(&table) {
                continue;
            }
            let mut json = serde_json::to_value(&**k).unwrap();
            poison(&mut json, None);
            // A record the poison pushed over a lexicon limit: try the next one.
            let Some(Ok(hostile)) = known_from_json(&op.collection, &op.rkey, &json) else {
                continue;
            };
            let origin = Origin {
                did: &c.repo,
                seq: ev.seq,
                time: None,
            };
            let mut row = known(origin, op.uri(&c.repo), "cid".into(), &hostile);
            row.sanitize(&mut fixes);
            let vals: Vec<Val<'_>> = row
                .meta()
                .values()
                .into_iter()
                .chain(row.values())
                .collect();
            for (col, val) in META.iter().chain(table.columns()).zip(vals) {
                let at = format!("{}.{}", table.name(), col.name);
                match val {
                    Val::T(Some(s)) => {
                        assert!(!s.contains('\0'), "{at}: {s:?}");
                        assert!(s.len() <= MAX_INDEXED_BYTES, "{at}: {} bytes", s.len());
                    }
                    Val::J(Some(j)) => assert!(!j.to_string().contains("\\u0000"), "{at}: {j}"),
                    _ => {}
                }
            }
            seen.insert(table);
        }
    }
    let known_tables = Table::ALL.iter().filter(|t| t.nsid().is_some()).count();
    assert_eq!(seen.len(), known_tables, "{seen:?}");
    for fix in [Fix::NulText, Fix::LongReference] {
        assert!(fixes.get(fix) > 0, "{fix:?}: {fixes:?}");
    }
}
