//! The batch's record-table SQL: the plan's final change per record, table by table in
//! (table, uri) order, and the purge of a deleted account's records. Every row really
//! removed or inserted is handed to the derived-table folding ([`Derived`]).

use std::collections::HashMap;

use chrono::Utc;
use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

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

/// One table's share of the plan: records to delete, to replace (another CID), to insert.
struct TableWrites<'p> {
    table: Table,
    deletes: Vec<&'p str>,
    replace: (Vec<&'p str>, Vec<&'p str>),
    puts: Vec<&'p Row>,
}

impl<'p> TableWrites<'p> {
    fn of(plan: &'p Plan, table: Table) -> Option<Self> {
        let mut w = TableWrites {
            table,
            deletes: Vec::new(),
            replace: (Vec::new(), Vec::new()),
            puts: Vec::new(),
        };
        let range = plan
            .changes
            .range((table, String::new())..)
            .take_while(|((t, _), _)| *t == table);
        for ((_, uri), change) in range {
            match change {
                Change::Delete => w.deletes.push(uri),
                Change::Put { row, replace: r } => {
                    if *r && table.has_derived() {
                        w.replace.0.push(uri);
                        w.replace.1.push(&row.meta().cid);
                    }
                    w.puts.push(row);
                }
            }
        }
        (!w.deletes.is_empty() || !w.puts.is_empty()).then_some(w)
    }
}

/// What a statement of [`write`] does to its table.
#[derive(Clone, Copy)]
enum Step {
    Delete,
    Replace,
    Insert,
}

/// Applies the plan's record changes: per table (in table order), deletes, replaced rows
/// (another CID), then inserts. None of these statements' parameters depends on another's
/// result, so they are all sent at once ([`super::in_order`]: one round trip for the whole
/// plan instead of one per statement) and PostgreSQL runs them in that order; what they return
/// is then folded into `derived` in the same order.
pub(super) async fn write(
    tx: &Transaction<'_>,
    plan: &Plan,
    derived: &mut Derived,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    let now = Utc::now();
    let t0 = std::time::Instant::now();
    let writes: Vec<TableWrites> = Table::ALL
        .into_iter()
        .filter_map(|table| TableWrites::of(plan, table))
        .collect();
    let inserts: Vec<Option<rows::Insert>> = writes
        .iter()
        .map(|w| (!w.puts.is_empty()).then(|| rows::insert(w.table, &w.puts)))
        .collect();
    let mut steps: Vec<(usize, Step)> = Vec::new();
    let mut sqls: Vec<String> = Vec::new();
    let mut params: Vec<Vec<&(dyn ToSql + Sync)>> = Vec::new();
    for (i, (w, ins)) in writes.iter().zip(&inserts).enumerate() {
        let name = w.table.name();
        let removed = rows::removed_columns(w.table);
        if !w.deletes.is_empty() {
            steps.push((i, Step::Delete));
            sqls.push(format!(
                "DELETE FROM {name} WHERE uri = ANY($1) RETURNING {removed}"
            ));
            params.push(vec![&w.deletes]);
        }
        if !w.replace.0.is_empty() {
            steps.push((i, Step::Replace));
            sqls.push(format!(
                "DELETE FROM {name} t USING UNNEST($1::text[], $2::text[]) AS n(uri, cid) \
                 WHERE t.uri = n.uri AND t.cid <> n.cid RETURNING {}",
                removed
                    .split(", ")
                    .map(|c| format!("t.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            params.push(vec![&w.replace.0, &w.replace.1]);
        }
        if let Some(ins) = ins {
            steps.push((i, Step::Insert));
            sqls.push(ins.sql.clone());
            params.push(ins.params());
        }
    }
    let statements: Vec<(&str, &[&(dyn ToSql + Sync)])> = sqls
        .iter()
        .zip(&params)
        .map(|(sql, p)| (sql.as_str(), p.as_slice()))
        .collect();
    let results = super::in_order(tx, &statements).await?;
    for ((i, step), returned) in steps.into_iter().zip(results) {
        let w = &writes[i];
        let (table, name) = (w.table, w.table.name());
        match step {
            Step::Delete | Step::Replace => {
                count(&mut applied.deleted, name, returned.len());
                derived::removed_rows(table, &returned, derived)?;
            }
            Step::Insert => {
                count(&mut applied.inserted, name, returned.len());
                if table.has_derived() && !returned.is_empty() {
                    let by_uri: HashMap<&str, &Row> =
                        w.puts.iter().map(|r| (r.meta().uri.as_str(), *r)).collect();
                    for r in &returned {
                        let uri: &str = r.try_get(0)?;
                        if let Some(row) = by_uri.get(uri) {
                            derived.inserted(row, now);
                        }
                    }
                }
            }
        }
    }
    applied.timed("records", t0);
    Ok(())
}
