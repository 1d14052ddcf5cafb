//! Row → columns: what a table's columns are (after the common `uri, cid, did, created_at`)
//! and the values a row puts in them, in the same order. Pure data; the writer binds it.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Fixes, Meta};

/// A column's SQL type (bound as an array of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Text,
    Json,
    Int8,
    Ts,
}

/// A column: its name, type, and the SELECT expression when it is not the plain `u.<name>`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Col {
    pub(crate) name: &'static str,
    pub(crate) ty: Ty,
    pub(crate) select: Option<&'static str>,
}

impl Col {
    pub(crate) const fn text(name: &'static str) -> Col {
        Col::of(name, Ty::Text)
    }

    pub(crate) const fn json(name: &'static str) -> Col {
        Col::of(name, Ty::Json)
    }

    pub(crate) const fn int8(name: &'static str) -> Col {
        Col::of(name, Ty::Int8)
    }

    pub(crate) const fn ts(name: &'static str) -> Col {
        Col::of(name, Ty::Ts)
    }

    /// The same column, read from the UNNEST row through `expr` instead of `u.<name>`.
    pub(crate) const fn select(self, expr: &'static str) -> Col {
        Col {
            select: Some(expr),
            ..self
        }
    }

    const fn of(name: &'static str, ty: Ty) -> Col {
        Col {
            name,
            ty,
            select: None,
        }
    }
}

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val<'a> {
    T(Option<&'a str>),
    J(Option<&'a Value>),
    I(Option<i64>),
    D(Option<DateTime<Utc>>),
}

#[cfg(test)]
impl Val<'_> {
    pub(crate) fn ty(&self) -> Ty {
        match self {
            Val::T(_) => Ty::Text,
            Val::J(_) => Ty::Json,
            Val::I(_) => Ty::Int8,
            Val::D(_) => Ty::Ts,
        }
    }
}

/// A text cell.
pub(crate) fn text(s: &str) -> Val<'_> {
    Val::T(Some(s))
}

/// A nullable text cell.
pub(crate) fn opt_text(s: &Option<String>) -> Val<'_> {
    Val::T(s.as_deref())
}

/// A nullable jsonb cell.
pub(crate) fn json(v: &Option<Value>) -> Val<'_> {
    Val::J(v.as_ref())
}

/// The columns every record table starts with.
pub(crate) const META: [Col; 4] = [
    Col::text("uri"),
    Col::text("cid"),
    Col::text("did"),
    Col::ts("created_at"),
];

impl Meta {
    /// The record's own `uri` and `did` are its keys and stay as they are (see `sanitize`).
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        f.time(&mut self.created_at);
    }

    /// The values of [`META`].
    pub(crate) fn values(&self) -> [Val<'_>; 4] {
        [
            text(&self.uri),
            text(&self.cid),
            text(&self.did),
            Val::D(self.created_at),
        ]
    }
}
