//! The batch's record-table SQL: the plan's final change per record, table by table in
//! (table, uri) order, and the purge of a deleted account's records. Every row really
//! removed or inserted is handed to the derived-table folding ([`Derived`]).

use std::collections::HashMap;

use chrono::Utc;
use deadpool_postgres::Transaction;

use super::derived::{self, Derived};
use super::plan::{Change, Plan};
use super::{count, query, rows, Applied};
use crate::mapping::{Row, Table};

/// Deletes every record of the deleted account `did`.
pub(super) async fn purge(
    tx: &Transaction<'_>,
    did: &str,
    derived: &mut Derived,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    // URIs sort bytewise ("C" collation): all of `at://did/…` lies in [at://did/, at://did0).
    let lo = format!("at://{did}/");
    let hi = format!("at://{did}0");
    for table in Table::ALL {
        let sql = format!(
            "DELETE FROM {} WHERE uri >= $1 AND uri < $2 RETURNING {}",
            table.name(),
            rows::removed_columns(table)
        );
        let rows = query(tx, &sql, &[&lo, &hi]).await?;
        count(&mut applied.deleted, table.name(), rows.len());
        derived::removed_rows(table, &rows, derived)?;
    }
    Ok(())
}

/// Applies the plan's record changes: deletes, replaced rows (another CID), then inserts.
pub(super) async fn write(
    tx: &Transaction<'_>,
    plan: &Plan,
    derived: &mut Derived,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    let now = Utc::now();
    for table in Table::ALL {
        let name = table.name();
        let t0 = std::time::Instant::now();
        let range = plan
            .changes
            .range((table, String::new())..)
            .take_while(|((t, _), _)| *t == table);
        let mut deletes: Vec<&str> = Vec::new();
        let mut replace: (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        let mut puts: Vec<&Row> = Vec::new();
        for ((_, uri), change) in range {
            match change {
                Change::Delete => deletes.push(uri),
                Change::Put { row, replace: r } => {
                    if *r && table.has_derived() {
                        replace.0.push(uri);
                        replace.1.push(&row.meta().cid);
                    }
                    puts.push(row);
                }
            }
        }
        if !deletes.is_empty() {
            let sql = format!(
                "DELETE FROM {name} WHERE uri = ANY($1) RETURNING {}",
                rows::removed_columns(table)
            );
            let rows = query(tx, &sql, &[&deletes]).await?;
            count(&mut applied.deleted, name, rows.len());
            derived::removed_rows(table, &rows, derived)?;
        }
        if !replace.0.is_empty() {
            let sql = format!(
                "DELETE FROM {name} t USING UNNEST($1::text[], $2::text[]) AS n(uri, cid) \
                 WHERE t.uri = n.uri AND t.cid <> n.cid RETURNING {}",
                rows::removed_columns(table)
                    .split(", ")
                    .map(|c| format!("t.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let rows = query(tx, &sql, &[&replace.0, &replace.1]).await?;
            count(&mut applied.deleted, name, rows.len());
            derived::removed_rows(table, &rows, derived)?;
        }
        if !puts.is_empty() {
            let ins = rows::insert(table, &puts);
            let rows = query(tx, &ins.sql, &ins.params()).await?;
            count(&mut applied.inserted, name, rows.len());
            if table.has_derived() {
                let by_uri: HashMap<&str, &Row> =
                    puts.iter().map(|r| (r.meta().uri.as_str(), *r)).collect();
                for r in &rows {
                    let uri: &str = r.try_get(0)?;
                    if let Some(row) = by_uri.get(uri) {
                        derived.inserted(row, now);
                    }
                }
            }
        }
        applied.timed(name, t0);
    }
    Ok(())
}
