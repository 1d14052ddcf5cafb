//! Likes and reposts (strongRef subject), follows and blocks (DID subject).

use atrium_api::com::atproto::repo::strong_ref;

use super::Meta;

/// `likes` / `reposts`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectRefRow {
    pub meta: Meta,
    pub subject_uri: String,
    pub subject_cid: String,
}

/// `follows` / `blocks`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectDidRow {
    pub meta: Meta,
    pub subject_did: String,
}

pub fn subject_ref(meta: Meta, subject: &strong_ref::Main) -> SubjectRefRow {
    SubjectRefRow {
        meta,
        subject_uri: subject.uri.clone(),
        subject_cid: subject.cid.as_ref().to_string(),
    }
}
