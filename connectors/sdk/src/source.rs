//! What a source connector implements.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    http::{HttpError, HttpResponse},
    model::Contribution,
};

/// Opaque progress marker of a source, owned by its connector. The daemon
/// stores it in the same transaction as the items it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor(pub String);

impl Cursor {
    pub fn from_json<T: Serialize>(value: &T) -> Cursor {
        Cursor(serde_json::to_string(value).unwrap_or_default())
    }

    /// Decodes a cursor written by [`Cursor::from_json`]; a cursor that no
    /// longer parses (an older format) is treated as absent.
    pub fn to_json<T: for<'de> Deserialize<'de>>(&self) -> Option<T> {
        serde_json::from_str(&self.0).ok()
    }
}

/// The connector state a cursor holds: `None` when there is none yet, and
/// for a cursor that no longer parses (an older format), which is logged;
/// the connector then starts over as on a first poll.
pub fn decode_cursor<T: for<'de> Deserialize<'de>>(cursor: Option<&Cursor>) -> Option<T> {
    let decoded = cursor?.to_json();
    if decoded.is_none() {
        tracing::warn!("unreadable cursor; starting over");
    }
    decoded
}

/// One call to [`Source::poll`].
#[derive(Debug, Clone, Default)]
pub struct PollRequest {
    /// Where the last committed page left off; `None` on the first poll.
    pub cursor: Option<Cursor>,
    /// Do not go back further than this (first poll and backfills).
    pub since: Option<DateTime<Utc>>,
}

/// An item the connector could not turn into a contribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantined {
    pub external_id: Option<String>,
    pub reason: String,
    /// The start of the raw item, for a human to look at (at most 4 KiB).
    pub raw: String,
}

impl Quarantined {
    pub const MAX_RAW: usize = 4096;

    pub fn new(external_id: Option<String>, reason: impl Into<String>, raw: &str) -> Quarantined {
        let mut end = raw.len().min(Self::MAX_RAW);
        while !raw.is_char_boundary(end) {
            end -= 1;
        }
        Quarantined { external_id, reason: reason.into(), raw: raw[..end].to_owned() }
    }
}

impl PollRequest {
    /// The connector state of [`PollRequest::cursor`]; see [`decode_cursor`].
    pub fn stored<T: for<'de> Deserialize<'de>>(&self) -> Option<T> {
        decode_cursor(self.cursor.as_ref())
    }
}

/// One page of a poll.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub contributions: Vec<Contribution>,
    pub quarantined: Vec<Quarantined>,
    /// The cursor to store with this page. `None` keeps the old one.
    pub next_cursor: Option<Cursor>,
    /// Poll again right away with `next_cursor`: more pages are waiting.
    pub has_more: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the platform refused the credentials: {0}")]
    Auth(String),
    #[error("the platform answered something this connector cannot read: {0}")]
    Decode(String),
    #[error("the platform answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    /// Part of a page could not be completed (an author look-up failed):
    /// the page is not committed and is fetched again by the next poll.
    #[error("the page is incomplete and will be fetched again: {0}")]
    Incomplete(String),
}

impl From<crate::oauth::OAuthError> for SourceError {
    fn from(error: crate::oauth::OAuthError) -> SourceError {
        match error {
            crate::oauth::OAuthError::Http(error) => SourceError::Http(error),
            refused @ crate::oauth::OAuthError::Refused { .. } => SourceError::Auth(refused.to_string()),
            decode @ crate::oauth::OAuthError::Decode { .. } => SourceError::Decode(decode.to_string()),
        }
    }
}

/// `base` with `segments` appended as path segments (each percent-encoded),
/// without `base`'s query or fragment: the one way connectors build API URLs.
pub fn endpoint(base: &url::Url, segments: &[&str]) -> url::Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// What a source makes of a final answer: 2xx goes on, 401/403 are
/// refused credentials, anything else is an error naming the status.
pub fn check_status(response: &HttpResponse) -> Result<(), SourceError> {
    let status = response.status.as_u16();
    match status {
        200..=299 => Ok(()),
        401 | 403 => {
            Err(SourceError::Auth(format!("{} answered HTTP {status}: {}", response.target, response.body_snippet())))
        }
        _ => Err(SourceError::Status { status, message: format!("{}: {}", response.target, response.body_snippet()) }),
    }
}

/// A place where customers talk, that can be polled for contributions.
#[async_trait]
pub trait Source: Send + Sync {
    /// The platform name written on every contribution, e.g. `discourse`.
    fn platform(&self) -> &'static str;

    /// Fetches the next page after `request.cursor`. A malformed item is
    /// returned in [`Page::quarantined`]; it never fails the whole page.
    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError>;

    /// Checks that the platform answers and accepts the credentials.
    async fn check(&self) -> Result<(), SourceError>;
}
