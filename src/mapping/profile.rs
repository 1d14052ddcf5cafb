//! `app.bsky.actor.profile` (rkey `self`) → `profiles`, keyed by DID.

use atrium_api::app::bsky::actor::profile::RecordData;
use atrium_api::types::BlobRef;

use super::columns::{opt_text, Col, Val};
use super::{Fixes, Meta};

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProfileRow {
    pub(crate) meta: Meta,
    pub(crate) display_name: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) avatar_cid: Option<String>,
    pub(crate) banner_cid: Option<String>,
}

pub(crate) fn map(meta: Meta, p: &RecordData) -> ProfileRow {
    ProfileRow {
        meta,
        display_name: p.display_name.clone(),
        description: p.description.clone(),
        avatar_cid: p.avatar.as_ref().map(blob_cid),
        banner_cid: p.banner.as_ref().map(blob_cid),
    }
}

/// The columns of [`ProfileRow::values`].
pub(crate) const COLUMNS: &[Col] = &[
    Col::text("display_name"),
    Col::text("description"),
    Col::text("avatar_cid"),
    Col::text("banner_cid"),
];

impl ProfileRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.opt_text(&mut self.display_name);
        f.opt_text(&mut self.description);
        f.opt_text(&mut self.avatar_cid);
        f.opt_text(&mut self.banner_cid);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![
            opt_text(&self.display_name),
            opt_text(&self.description),
            opt_text(&self.avatar_cid),
            opt_text(&self.banner_cid),
        ]
    }
}

fn blob_cid(b: &BlobRef) -> String {
    use atrium_api::types::TypedBlobRef;
    match b {
        BlobRef::Typed(TypedBlobRef::Blob(blob)) => blob.r#ref.0.to_string(),
        BlobRef::Untyped(u) => u.cid.clone(),
    }
}
