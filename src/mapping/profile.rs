//! `app.bsky.actor.profile` (rkey `self`) → `profiles`, keyed by DID.

use atrium_api::app::bsky::actor::profile::RecordData;
use atrium_api::types::BlobRef;

use super::Meta;

#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    pub meta: Meta,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub avatar_cid: Option<String>,
    pub banner_cid: Option<String>,
}

pub fn map(meta: Meta, p: &RecordData) -> ProfileRow {
    ProfileRow {
        meta,
        display_name: p.display_name.clone(),
        description: p.description.clone(),
        avatar_cid: p.avatar.as_ref().map(blob_cid),
        banner_cid: p.banner.as_ref().map(blob_cid),
    }
}

fn blob_cid(b: &BlobRef) -> String {
    use atrium_api::types::TypedBlobRef;
    match b {
        BlobRef::Typed(TypedBlobRef::Blob(blob)) => blob.r#ref.0.to_string(),
        BlobRef::Untyped(u) => u.cid.clone(),
    }
}
