//! Rows → bulk SQL: one `INSERT … SELECT FROM UNNEST(…)` per table and batch, column arrays
//! built from the rows already sorted by key.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use crate::mapping::{Row, Table, Ty, Val, META};

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
pub(crate) struct Insert<'a> {
    pub(crate) sql: String,
    columns: Vec<Column<'a>>,
}

impl Insert<'_> {
    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.columns.iter().map(Column::as_param).collect()
    }
}

/// Builds the bulk insert. Tables that feed derived rows never overwrite (an existing row
/// with another CID was deleted first); the others upsert when the CID changed.
pub(crate) fn insert<'a>(table: Table, rows: &[&'a Row]) -> Insert<'a> {
    let specs: Vec<_> = META.iter().chain(table.columns()).collect();
    let mut columns: Vec<Column<'a>> = specs
        .iter()
        .map(|c| Column::new(c.ty, rows.len()))
        .collect();
    for row in rows {
        let vals = row.meta().values().into_iter().chain(row.values());
        for (col, val) in columns.iter_mut().zip(vals) {
            match (col, val) {
                (Column::Text(v), Val::T(x)) => v.push(x),
                (Column::Json(v), Val::J(x)) => v.push(x),
                (Column::Int8(v), Val::I(x)) => v.push(x),
                (Column::Ts(v), Val::D(x)) => v.push(x),
                // A table's columns and its rows' values are declared side by side in
                // `mapping`; a mismatch is a bug that the registry's unit test catches.
                _ => unreachable!("column spec and row value disagree for {}", table.name()),
            }
        }
    }
    let name = table.name();
    let col_names: Vec<&str> = specs.iter().map(|c| c.name).collect();
    let unnest: Vec<String> = specs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ty = match c.ty {
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
        .map(|c| {
            c.select
                .map_or_else(|| format!("u.{}", c.name), str::to_owned)
        })
        .collect();
    let key = table.key();
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
pub(crate) fn removed_columns(table: Table) -> &'static str {
    table.removed_columns()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Meta, SubjectDidRow};

    #[test]
    fn every_table_binds() {
        for table in Table::ALL {
            let specs = META.len() + table.columns().len();
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
