//! Likes and reposts (strongRef subject), follows and blocks (DID subject).

use atrium_api::com::atproto::repo::strong_ref;

use super::columns::{text, Col, Val};
use super::{Fixes, Meta};

/// `likes` / `reposts`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SubjectRefRow {
    pub(crate) meta: Meta,
    pub(crate) subject_uri: String,
    pub(crate) subject_cid: String,
}

/// The columns of [`SubjectRefRow::values`].
pub(crate) const SUBJECT_REF: &[Col] = &[Col::text("subject_uri"), Col::text("subject_cid")];

impl SubjectRefRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.reference(&mut self.subject_uri);
        f.text(&mut self.subject_cid);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![text(&self.subject_uri), text(&self.subject_cid)]
    }
}

/// `follows` / `blocks`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SubjectDidRow {
    pub(crate) meta: Meta,
    pub(crate) subject_did: String,
}

/// The columns of [`SubjectDidRow::values`].
pub(crate) const SUBJECT_DID: &[Col] = &[Col::text("subject_did")];

impl SubjectDidRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.reference(&mut self.subject_did);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![text(&self.subject_did)]
    }
}

pub(crate) fn subject_ref(meta: Meta, subject: &strong_ref::Main) -> SubjectRefRow {
    SubjectRefRow {
        meta,
        subject_uri: subject.uri.clone(),
        subject_cid: subject.cid.as_ref().to_string(),
    }
}

pub(crate) fn subject_did(meta: Meta, subject: &atrium_api::types::string::Did) -> SubjectDidRow {
    SubjectDidRow {
        meta,
        subject_did: subject.as_str().to_owned(),
    }
}
