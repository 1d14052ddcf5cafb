//! Lists, list items and starter packs.

use atrium_api::app::bsky::graph::{list, listitem, starterpack};

use super::Meta;

#[derive(Debug, Clone, PartialEq)]
pub struct ListRow {
    pub meta: Meta,
    pub name: String,
    pub purpose: String,
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListItemRow {
    pub meta: Meta,
    pub list_uri: String,
    pub subject_did: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StarterPackRow {
    pub meta: Meta,
    pub name: String,
    pub list_uri: String,
    pub description: Option<String>,
}

pub fn list(meta: Meta, l: &list::RecordData) -> ListRow {
    ListRow {
        meta,
        name: l.name.clone(),
        purpose: l.purpose.clone(),
        description: l.description.clone(),
    }
}

pub fn list_item(meta: Meta, i: &listitem::RecordData) -> ListItemRow {
    ListItemRow {
        meta,
        list_uri: i.list.clone(),
        subject_did: i.subject.as_str().to_owned(),
    }
}

pub fn starter_pack(meta: Meta, s: &starterpack::RecordData) -> StarterPackRow {
    StarterPackRow {
        meta,
        name: s.name.clone(),
        list_uri: s.list.clone(),
        description: s.description.clone(),
    }
}
