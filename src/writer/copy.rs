//! Binary `COPY … FROM STDIN` of rows no other row can conflict with: the records of a repo
//! written for the first time and their notifications and feed items (§12, `group`). Far
//! cheaper than `INSERT … ON CONFLICT` for PostgreSQL (no conflict check per row, no
//! `RETURNING`), but it fails on any duplicate key: the caller proves there is none.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use futures_util::pin_mut;
use serde_json::Value;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::derived::{FeedItem, Notification};
use crate::mapping::{Col, Row, Table, Ty, Val, META};

/// One cell as bound by `COPY`.
enum Cell<'a> {
    Text(Option<&'a str>),
    /// A text column stored as `text[]`, split on `,` as `string_to_array(x, ',')` does.
    List(Option<Vec<&'a str>>),
    Json(Option<&'a Value>),
    Int8(Option<i64>),
    Ts(Option<DateTime<Utc>>),
}

impl Cell<'_> {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Cell::Text(v) => v,
            Cell::List(v) => v,
            Cell::Json(v) => v,
            Cell::Int8(v) => v,
            Cell::Ts(v) => v,
        }
    }
}

/// How a column is sent: its type, and whether its text is split into a list. `None` for a
/// column whose `INSERT` expression `COPY` cannot reproduce.
fn copy_type(c: &Col) -> Option<(Type, bool)> {
    match (c.ty, c.select) {
        (Ty::Text, None) => Some((Type::TEXT, false)),
        (Ty::Json, None) => Some((Type::JSONB, false)),
        (Ty::Int8, None) => Some((Type::INT8, false)),
        (Ty::Ts, None) => Some((Type::TIMESTAMPTZ, false)),
        (Ty::Text, Some(expr)) if expr == format!("string_to_array(u.{}, ',')", c.name) => {
            Some((Type::TEXT_ARRAY, true))
        }
        _ => None,
    }
}

/// Whether [`rows`] can write `table` (every column has a `COPY` form).
pub(super) fn can_copy(table: Table) -> bool {
    META.iter()
        .chain(table.columns())
        .all(|c| copy_type(c).is_some())
}

/// `string_to_array(s, ',')`: an empty string is an empty array.
fn split(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').collect()
    }
}

/// Copies `rows` (all of `table`, none stored yet) into `table`. The caller checked
/// [`can_copy`]. Returns the rows written.
pub(super) async fn rows(
    tx: &Transaction<'_>,
    table: Table,
    rows: &[&Row],
) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let specs: Vec<&Col> = META.iter().chain(table.columns()).collect();
    let kinds: Vec<(Type, bool)> = specs
        .iter()
        .map(|c| copy_type(c).unwrap_or((Type::TEXT, false)))
        .collect();
    let names: Vec<&str> = specs.iter().map(|c| c.name).collect();
    let sql = format!(
        "COPY {} ({}) FROM STDIN (FORMAT binary)",
        table.name(),
        names.join(", ")
    );
    let types: Vec<Type> = kinds.iter().map(|(t, _)| t.clone()).collect();
    let sink = tx.copy_in(&sql).await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    let mut cells: Vec<Cell<'_>> = Vec::with_capacity(specs.len());
    for row in rows {
        cells.clear();
        let vals = row.meta().values().into_iter().chain(row.values());
        for ((_, list), val) in kinds.iter().zip(vals) {
            cells.push(match val {
                Val::T(x) if *list => Cell::List(x.map(split)),
                Val::T(x) => Cell::Text(x),
                Val::J(x) => Cell::Json(x),
                Val::I(x) => Cell::Int8(x),
                Val::D(x) => Cell::Ts(x),
            });
        }
        let refs: Vec<&(dyn ToSql + Sync)> = cells.iter().map(Cell::as_sql).collect();
        writer.as_mut().write(&refs).await?;
    }
    writer.finish().await
}

/// Copies notifications (of records stored for the first time, deduplicated).
pub(super) async fn notifications(
    tx: &Transaction<'_>,
    list: &[&Notification],
) -> Result<u64, tokio_postgres::Error> {
    if list.is_empty() {
        return Ok(0);
    }
    let sink = tx
        .copy_in(
            "COPY notifications (record_uri, reason, recipient_did, author_did, record_cid, \
             subject_uri, created_at) FROM STDIN (FORMAT binary)",
        )
        .await?;
    let t = Type::TEXT;
    let types = [
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t.clone(),
        t,
        Type::TIMESTAMPTZ,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for n in list {
        writer
            .as_mut()
            .write(&[
                &n.record_uri,
                &n.reason,
                &n.recipient,
                &n.author,
                &n.record_cid,
                &n.subject_uri,
                &n.created_at,
            ])
            .await?;
    }
    writer.finish().await
}

/// Copies feed items (of posts and reposts stored for the first time).
pub(super) async fn feed_items(
    tx: &Transaction<'_>,
    list: &[FeedItem],
) -> Result<u64, tokio_postgres::Error> {
    if list.is_empty() {
        return Ok(0);
    }
    let sink = tx
        .copy_in(
            "COPY feed_items (uri, post_uri, originator_did, type, sort_at) \
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    let t = Type::TEXT;
    let types = [t.clone(), t.clone(), t.clone(), t, Type::TIMESTAMPTZ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for f in list {
        writer
            .as_mut()
            .write(&[&f.uri, &f.post_uri, &f.originator, &f.kind, &f.sort_at])
            .await?;
    }
    writer.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_can_be_copied_and_lists_split_like_postgres() {
        for table in Table::ALL {
            assert!(can_copy(table), "{}", table.name());
        }
        assert_eq!(split(""), Vec::<&str>::new());
        assert_eq!(split("en"), ["en"]);
        assert_eq!(split("en,,fr"), ["en", "", "fr"]);
        assert!(copy_type(&Col::text("x").select("lower(u.x)")).is_none());
    }
}
