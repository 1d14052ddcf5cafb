//! Lists, list items and starter packs.

use atrium_api::app::bsky::graph::{list, listitem, starterpack};

use super::columns::{opt_text, text, Col, Val};
use super::{Fixes, Meta};

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ListRow {
    pub(crate) meta: Meta,
    pub(crate) name: String,
    pub(crate) purpose: String,
    pub(crate) description: Option<String>,
}

/// The columns of [`ListRow::values`].
pub(crate) const LIST: &[Col] = &[
    Col::text("name"),
    Col::text("purpose"),
    Col::text("description"),
];

impl ListRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.text(&mut self.name);
        f.text(&mut self.purpose);
        f.opt_text(&mut self.description);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![
            text(&self.name),
            text(&self.purpose),
            opt_text(&self.description),
        ]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ListItemRow {
    pub(crate) meta: Meta,
    pub(crate) list_uri: String,
    pub(crate) subject_did: String,
}

/// The columns of [`ListItemRow::values`].
pub(crate) const LIST_ITEM: &[Col] = &[Col::text("list_uri"), Col::text("subject_did")];

impl ListItemRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.reference(&mut self.list_uri);
        f.reference(&mut self.subject_did);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![text(&self.list_uri), text(&self.subject_did)]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StarterPackRow {
    pub(crate) meta: Meta,
    pub(crate) name: String,
    pub(crate) list_uri: String,
    pub(crate) description: Option<String>,
}

/// The columns of [`StarterPackRow::values`].
pub(crate) const STARTER_PACK: &[Col] = &[
    Col::text("name"),
    Col::text("list_uri"),
    Col::text("description"),
];

impl StarterPackRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.text(&mut self.name);
        f.reference(&mut self.list_uri);
        f.opt_text(&mut self.description);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![
            text(&self.name),
            text(&self.list_uri),
            opt_text(&self.description),
        ]
    }
}

pub(crate) fn list(meta: Meta, l: &list::RecordData) -> ListRow {
    ListRow {
        meta,
        name: l.name.clone(),
        purpose: l.purpose.clone(),
        description: l.description.clone(),
    }
}

pub(crate) fn list_item(meta: Meta, i: &listitem::RecordData) -> ListItemRow {
    ListItemRow {
        meta,
        list_uri: i.list.clone(),
        subject_did: i.subject.as_str().to_owned(),
    }
}

pub(crate) fn starter_pack(meta: Meta, s: &starterpack::RecordData) -> StarterPackRow {
    StarterPackRow {
        meta,
        name: s.name.clone(),
        list_uri: s.list.clone(),
        description: s.description.clone(),
    }
}
