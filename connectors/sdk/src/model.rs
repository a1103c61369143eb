//! The normalized contribution: one struct for every post, comment, review
//! or ticket, whatever platform it came from.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What kind of contribution an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Post,
    Comment,
    Reply,
    Review,
    Ticket,
    TicketComment,
    Mention,
    Message,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Post => "post",
            Kind::Comment => "comment",
            Kind::Reply => "reply",
            Kind::Review => "review",
            Kind::Ticket => "ticket",
            Kind::TicketComment => "ticket_comment",
            Kind::Mention => "mention",
            Kind::Message => "message",
        }
    }
}

/// What the author of a contribution wants, as far as a rule set can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    Question,
    Complaint,
    Idea,
    Praise,
    Other,
}

impl Intent {
    pub fn as_str(self) -> &'static str {
        match self {
            Intent::Question => "question",
            Intent::Complaint => "complaint",
            Intent::Idea => "idea",
            Intent::Praise => "praise",
            Intent::Other => "other",
        }
    }
}

/// Who wrote a contribution, as the platform knows them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Author {
    /// The platform's stable user id (falls back to the handle where the
    /// platform has no ids). Empty when the platform names no author: such
    /// a contribution is attached to no contact.
    pub id: String,
    pub handle: Option<String>,
    pub display_name: Option<String>,
    /// Only when the platform gives it (support tools, staff APIs, feeds).
    pub email: Option<String>,
    pub profile_url: Option<String>,
    /// What the author's own profile links to, when the connector reads
    /// profiles: accounts elsewhere as `platform:handle` (e.g. `x:alice`)
    /// and websites as their `https://` address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<String>,
}

/// The signals a team can act on, added by enrichment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// VADER compound score, -1 (negative) to 1 (positive); 0 when
    /// `sentiment_skipped` says why it was not scored.
    pub sentiment: f64,
    pub intent: Intent,
    /// Why sentiment was not scored (a language the model does not cover);
    /// such a contribution is left out of sentiment averages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentiment_skipped: Option<String>,
}

impl Signals {
    /// The sentiment, unless it was skipped.
    pub fn scored_sentiment(&self) -> Option<f64> {
        self.sentiment_skipped.is_none().then_some(self.sentiment)
    }
}

/// One contribution, normalized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    /// Platform name, e.g. `discourse`.
    pub platform: String,
    /// Name of the configured source instance it came from.
    pub source: String,
    /// The platform's id for the item, unique within the source.
    pub external_id: String,
    pub url: Option<String>,
    pub kind: Kind,
    pub author: Author,
    pub title: Option<String>,
    /// Clean plain text: HTML stripped, entities decoded.
    pub body: String,
    /// ISO 639-3 code, when it could be detected.
    pub language: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: Option<DateTime<Utc>>,
    pub parent_id: Option<String>,
    pub thread_id: Option<String>,
    pub tags: Vec<String>,
    pub score: Option<f64>,
    pub edited: bool,
    pub deleted: bool,
    pub signals: Option<Signals>,
}

impl Contribution {
    /// The stable identity of this item across polls: platform, source and id.
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.platform, self.source, self.external_id)
    }

    /// The deterministic key under which the CRM keeps this item's activity:
    /// the same contribution always maps to the same activity.
    pub fn activity_key(&self) -> String {
        short_hash(&self.key())
    }

    /// The stable identity of the author on this platform.
    pub fn identity_key(&self) -> String {
        format!("{}:{}", self.platform, self.author.id)
    }

    /// A hash of the content: unchanged items have the same hash and are
    /// never sent again. The score (likes, votes) is left out: it moves all
    /// the time and would resend every rescanned item.
    pub fn content_hash(&self) -> String {
        // serde_json writes struct fields in declaration order, so this is stable.
        let bytes = serde_json::to_vec(&Contribution { score: None, ..self.clone() }).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

#[cfg(any(test, feature = "testkit"))]
impl Contribution {
    /// A plain forum post, for tests: change what a test is about with
    /// struct update syntax.
    pub fn sample() -> Contribution {
        Contribution {
            platform: "discourse".into(),
            source: "community".into(),
            external_id: "42".into(),
            url: Some("https://community.example.com/t/42".into()),
            kind: Kind::Post,
            author: Author { id: "7".into(), handle: Some("mayac".into()), ..Author::default() },
            title: Some("Export to PDF?".into()),
            body: "Is there a way?\nI looked in settings.".into(),
            language: Some("eng".into()),
            created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            updated_at: None,
            parent_id: None,
            thread_id: None,
            tags: vec![],
            score: None,
            edited: false,
            deleted: false,
            signals: Some(Signals { sentiment: 0.25, intent: Intent::Question, sentiment_skipped: None }),
        }
    }
}

/// The first 32 hex digits of SHA-256: short enough for CRM property values,
/// long enough never to collide in practice.
pub fn short_hash(value: &str) -> String {
    let mut digest = hex::encode(Sha256::digest(value.as_bytes()));
    digest.truncate(32);
    digest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_changes_with_content_and_keys_do_not() {
        let a = Contribution::sample();
        let mut b = Contribution::sample();
        assert_eq!(a.content_hash(), b.content_hash());
        b.body = "hello, edited".into();
        b.edited = true;
        assert_ne!(a.content_hash(), b.content_hash());
        let liked = Contribution { score: Some(12.0), ..Contribution::sample() };
        assert_eq!(liked.content_hash(), a.content_hash(), "a new score alone is not a change");
        assert_eq!(a.key(), b.key());
        assert_eq!(a.activity_key(), b.activity_key());
        assert_eq!(a.activity_key().len(), 32);
        assert_eq!(a.identity_key(), "discourse:7");
    }
}
