//! Rows → bulk SQL: one `INSERT … SELECT FROM UNNEST(…)` per table and batch, column arrays
//! built from the rows already sorted by key.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use crate::mapping::{Row, Table};

/// A column's SQL array type.
#[derive(Clone, Copy)]
enum Ty {
    Text,
    Json,
    Int8,
    Ts,
}

/// One cell.
enum Val<'a> {
    T(Option<&'a str>),
    J(Option<&'a Value>),
    I(Option<i64>),
    D(Option<DateTime<Utc>>),
}

/// A column: name, type, and the SELECT expression when it is not the plain column.
type ColSpec = (&'static str, Ty, Option<&'static str>);

const META: [ColSpec; 4] = [
    ("uri", Ty::Text, None),
    ("cid", Ty::Text, None),
    ("did", Ty::Text, None),
    ("created_at", Ty::Ts, None),
];

fn extra_cols(table: Table) -> &'static [ColSpec] {
    match table {
        Table::Posts => &[
            ("text", Ty::Text, None),
            ("reply_root_uri", Ty::Text, None),
            ("reply_root_cid", Ty::Text, None),
            ("reply_parent_uri", Ty::Text, None),
            ("reply_parent_cid", Ty::Text, None),
            ("quote_uri", Ty::Text, None),
            ("quote_cid", Ty::Text, None),
            ("embed", Ty::Json, None),
            ("langs", Ty::Text, Some("string_to_array(u.langs, ',')")),
            ("facets", Ty::Json, None),
            ("commit_seq", Ty::Int8, None),
            ("commit_time", Ty::Ts, None),
        ],
        Table::Likes | Table::Reposts => &[
            ("subject_uri", Ty::Text, None),
            ("subject_cid", Ty::Text, None),
        ],
        Table::Follows | Table::Blocks => &[("subject_did", Ty::Text, None)],
        Table::Lists => &[
            ("name", Ty::Text, None),
            ("purpose", Ty::Text, None),
            ("description", Ty::Text, None),
        ],
        Table::ListItems => &[
            ("list_uri", Ty::Text, None),
            ("subject_did", Ty::Text, None),
        ],
        Table::FeedGenerators => &[
            ("feed_did", Ty::Text, None),
            ("display_name", Ty::Text, None),
            ("description", Ty::Text, None),
        ],
        Table::StarterPacks => &[
            ("name", Ty::Text, None),
            ("list_uri", Ty::Text, None),
            ("description", Ty::Text, None),
        ],
        Table::Threadgates => &[("post_uri", Ty::Text, None), ("allow", Ty::Json, None)],
        Table::Postgates => &[("post_uri", Ty::Text, None), ("rules", Ty::Json, None)],
        Table::Profiles => &[
            ("display_name", Ty::Text, None),
            ("description", Ty::Text, None),
            ("avatar_cid", Ty::Text, None),
            ("banner_cid", Ty::Text, None),
        ],
        Table::Records => &[
            ("collection", Ty::Text, None),
            ("rkey", Ty::Text, None),
            ("value", Ty::Json, None),
        ],
    }
}

fn t(s: &Option<String>) -> Val<'_> {
    Val::T(s.as_deref())
}

fn s(s: &str) -> Val<'_> {
    Val::T(Some(s))
}

fn extra_vals(row: &Row) -> Vec<Val<'_>> {
    match row {
        Row::Post(p) => vec![
            s(&p.text),
            t(&p.reply_root_uri),
            t(&p.reply_root_cid),
            t(&p.reply_parent_uri),
            t(&p.reply_parent_cid),
            t(&p.quote_uri),
            t(&p.quote_cid),
            Val::J(p.embed.as_ref()),
            t(&p.langs),
            Val::J(p.facets.as_ref()),
            Val::I(Some(p.commit_seq)),
            Val::D(p.commit_time),
        ],
        Row::Like(r) | Row::Repost(r) => vec![s(&r.subject_uri), s(&r.subject_cid)],
        Row::Follow(r) | Row::Block(r) => vec![s(&r.subject_did)],
        Row::List(l) => vec![s(&l.name), s(&l.purpose), t(&l.description)],
        Row::ListItem(i) => vec![s(&i.list_uri), s(&i.subject_did)],
        Row::FeedGenerator(g) => vec![s(&g.feed_did), s(&g.display_name), t(&g.description)],
        Row::StarterPack(p) => vec![s(&p.name), s(&p.list_uri), t(&p.description)],
        Row::Threadgate(g) | Row::Postgate(g) => vec![s(&g.post_uri), Val::J(g.rules.as_ref())],
        Row::Profile(p) => vec![
            t(&p.display_name),
            t(&p.description),
            t(&p.avatar_cid),
            t(&p.banner_cid),
        ],
        Row::Generic {
            collection,
            rkey,
            value,
            ..
        } => vec![s(collection), s(rkey), Val::J(Some(value))],
    }
}

/// Column vectors for one table's rows, ready to bind as UNNEST parameters.
enum Column<'a> {
    Text(Vec<Option<&'a str>>),
    Json(Vec<Option<&'a Value>>),
    Int8(Vec<Option<i64>>),
    Ts(Vec<Option<DateTime<Utc>>>),
}

impl Column<'_> {
    fn new(ty: Ty, n: usize) -> Self {
        match ty {
            Ty::Text => Column::Text(Vec::with_capacity(n)),
            Ty::Json => Column::Json(Vec::with_capacity(n)),
            Ty::Int8 => Column::Int8(Vec::with_capacity(n)),
            Ty::Ts => Column::Ts(Vec::with_capacity(n)),
        }
    }

    fn as_param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Column::Text(v) => v,
            Column::Json(v) => v,
            Column::Int8(v) => v,
            Column::Ts(v) => v,
        }
    }
}

/// An INSERT for `rows` (all of `table`, sorted by key) and its parameters.
pub struct Insert<'a> {
    pub sql: String,
    columns: Vec<Column<'a>>,
}

impl Insert<'_> {
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.columns.iter().map(Column::as_param).collect()
    }
}

/// Builds the bulk insert. Tables that feed derived rows never overwrite (an existing row
/// with another CID was deleted first); the others upsert when the CID changed.
pub fn insert<'a>(table: Table, rows: &[&'a Row]) -> Insert<'a> {
    let specs: Vec<ColSpec> = META.iter().chain(extra_cols(table)).copied().collect();
    let mut columns: Vec<Column<'a>> = specs.iter().map(|c| Column::new(c.1, rows.len())).collect();
    for row in rows {
        let m = row.meta();
        let vals = [s(&m.uri), s(&m.cid), s(&m.did), Val::D(m.created_at)]
            .into_iter()
            .chain(extra_vals(row));
        for (col, val) in columns.iter_mut().zip(vals) {
            match (col, val) {
                (Column::Text(v), Val::T(x)) => v.push(x),
                (Column::Json(v), Val::J(x)) => v.push(x),
                (Column::Int8(v), Val::I(x)) => v.push(x),
                (Column::Ts(v), Val::D(x)) => v.push(x),
                // Specs and values are written side by side above; a mismatch is a bug that
                // the unit test `every_table_binds` catches.
                _ => unreachable!("column spec and row value disagree for {}", table.name()),
            }
        }
    }
    let name = table.name();
    let col_names: Vec<&str> = specs.iter().map(|c| c.0).collect();
    let unnest: Vec<String> = specs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ty = match c.1 {
                Ty::Text => "text[]",
                Ty::Json => "jsonb[]",
                Ty::Int8 => "int8[]",
                Ty::Ts => "timestamptz[]",
            };
            format!("${}::{ty}", i + 1)
        })
        .collect();
    let exprs: Vec<String> = specs
        .iter()
        .map(|c| c.2.map_or_else(|| format!("u.{}", c.0), str::to_owned))
        .collect();
    let key = if table == Table::Profiles {
        "did"
    } else {
        "uri"
    };
    let conflict = if table.has_derived() {
        format!("ON CONFLICT ({key}) DO NOTHING")
    } else {
        let sets: Vec<String> = col_names
            .iter()
            .filter(|c| **c != key)
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        format!(
            "ON CONFLICT ({key}) DO UPDATE SET {} WHERE {name}.cid IS DISTINCT FROM excluded.cid",
            sets.join(", ")
        )
    };
    let sql = format!(
        "INSERT INTO {name} ({}) SELECT {} FROM UNNEST({}) AS u({}) {conflict} RETURNING uri",
        col_names.join(", "),
        exprs.join(", "),
        unnest.join(", "),
        col_names.join(", "),
    );
    Insert { sql, columns }
}

/// Columns a removed row must return so derived tables can follow.
pub fn removed_columns(table: Table) -> &'static str {
    match table {
        Table::Posts => "uri, did, reply_parent_uri, quote_uri",
        Table::Likes | Table::Reposts => "uri, did, subject_uri",
        Table::Follows => "uri, did, subject_did",
        _ => "uri",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Meta, SubjectDidRow};

    #[test]
    fn every_table_binds() {
        for table in Table::ALL {
            let specs = META.len() + extra_cols(table).len();
            let ins = insert(table, &[]);
            assert_eq!(ins.params().len(), specs, "{}", table.name());
            assert!(ins.sql.contains(&format!("${specs}::")), "{}", ins.sql);
        }
        let row = Row::Follow(SubjectDidRow {
            meta: Meta {
                uri: "at://did:plc:a/app.bsky.graph.follow/1".into(),
                cid: "c".into(),
                did: "did:plc:a".into(),
                created_at: None,
            },
            subject_did: "did:plc:b".into(),
        });
        let ins = insert(Table::Follows, &[&row]);
        assert_eq!(ins.params().len(), 5);
    }
}
