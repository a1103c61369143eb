//! What a CRM sink implements.
//!
//! Every write carries a deterministic key (the contact's e-mail or identity
//! key, the activity key of a contribution), so replaying a batch after a
//! crash changes nothing.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{http::HttpError, model::Contribution};

/// Find an existing contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactLookup {
    Email(String),
    /// The handle kept in the contact's per-platform handle property.
    Handle {
        platform: String,
        handle: String,
    },
}

/// Create or update the contact of one author.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactUpsert {
    /// `platform:author id`: the unique key of authors without e-mail.
    pub identity: String,
    /// When set, the contact is matched (and created) by e-mail.
    pub email: Option<String>,
    pub platform: String,
    pub handle: Option<String>,
    pub display_name: Option<String>,
    pub profile_url: Option<String>,
}

/// Create or update the activity of one contribution on its contact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityUpsert {
    /// Deterministic: [`Contribution::activity_key`].
    pub key: String,
    pub contact_id: String,
    pub contribution: Contribution,
    /// The CRM id this activity was delivered under before, from the
    /// daemon's ledger: a CRM without an upsert by key updates this record
    /// instead of creating another. `None` for a first delivery (or one
    /// whose outcome was lost in a crash: search before creating).
    #[serde(default)]
    pub existing_id: Option<String>,
}

/// Figures about one contact, computed by the daemon from what it delivered.
/// They are absolute values, so writing them twice changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollup {
    pub contact_id: String,
    pub last_contribution_at: DateTime<Utc>,
    pub last_platform: String,
    pub contribution_count: u64,
    /// Every platform the person was seen on, sorted.
    pub platforms: Vec<String>,
    /// Mean sentiment over all scored contributions, -1..1.
    pub sentiment_avg: f64,
    pub questions: u64,
    pub complaints: u64,
    pub ideas: u64,
    pub praise: u64,
    /// Address of the last contribution.
    #[serde(default)]
    pub last_url: Option<String>,
    /// The start of the last contribution's text (at most 200 characters).
    #[serde(default)]
    pub last_excerpt: Option<String>,
    /// Contributions in the 90 days before the figures were taken.
    #[serde(default)]
    pub count_90d: u64,
    /// Mean sentiment of the scored contributions of those 90 days; `None`
    /// when none was scored.
    #[serde(default)]
    pub sentiment_avg_90d: Option<f64>,
    /// An unresolved complaint, or a sharp drop in sentiment: someone
    /// should look at this person.
    #[serde(default)]
    pub needs_attention: bool,
    /// Why `needs_attention` is set, in words.
    #[serde(default)]
    pub attention_reason: Option<String>,
    /// One entry per platform, sorted by platform.
    #[serde(default)]
    pub per_platform: Vec<PlatformRollup>,
}

/// What the person did on one platform.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlatformRollup {
    pub platform: String,
    pub handle: Option<String>,
    pub profile_url: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub contributions: u64,
}

/// The names of a [`Crm::contact_properties`] call: trimmed, without empty
/// ones, sorted and each once.
pub fn property_names(names: &[String]) -> Vec<&str> {
    let mut wanted: Vec<&str> = names.iter().map(|name| name.trim()).filter(|name| !name.is_empty()).collect();
    wanted.sort_unstable();
    wanted.dedup();
    wanted
}

/// Whether a name can be a field's API name: ASCII letters, digits and `_`.
pub fn is_api_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The CRM's answer for one record of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordOutcome<T> {
    Done(T),
    /// The CRM refused this record for good (validation); its own message.
    Rejected(String),
}

/// What `crm setup` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SetupReport {
    pub created: Vec<String>,
    pub existing: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CrmError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the CRM refused the credentials: {0}")]
    Auth(String),
    #[error("the CRM is rate limiting us; retry in {retry_after:?}")]
    RateLimited { retry_after: Duration },
    #[error("the CRM failed: {0}")]
    Transient(String),
    #[error("the CRM answered something this connector cannot read: {0}")]
    Decode(String),
    #[error("local CRM store: {0}")]
    Io(String),
    /// This sink cannot do what was asked; the message says what to do instead.
    #[error("{0}")]
    Unsupported(String),
}

impl From<crate::oauth::OAuthError> for CrmError {
    fn from(error: crate::oauth::OAuthError) -> CrmError {
        match error {
            crate::oauth::OAuthError::Http(error) => CrmError::Http(error),
            refused @ crate::oauth::OAuthError::Refused { .. } => CrmError::Auth(refused.to_string()),
            decode @ crate::oauth::OAuthError::Decode { .. } => CrmError::Decode(decode.to_string()),
        }
    }
}

impl CrmError {
    /// How long to wait at least before the next attempt, when the CRM said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CrmError::RateLimited { retry_after } => Some(*retry_after),
            CrmError::Http(HttpError::RateLimited { retry_after, .. }) => Some(*retry_after),
            _ => None,
        }
    }
}

/// The system of record. Tributary extends it, never replaces it.
#[async_trait]
pub trait Crm: Send + Sync {
    /// The CRM's name, e.g. `hubspot`.
    fn kind(&self) -> &'static str;

    /// Checks that the CRM answers and accepts the credentials.
    async fn check(&self) -> Result<(), CrmError>;

    /// Creates the custom fields Tributary writes; safe to run twice.
    async fn setup(&self, platforms: &[String]) -> Result<SetupReport, CrmError>;

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError>;

    /// One outcome per input, in input order; `Done` carries the contact id.
    async fn upsert_contacts(&self, contacts: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError>;

    /// One outcome per input, in input order; `Done` carries the activity id.
    /// Each activity is associated with its contact.
    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError>;

    /// Archives activities Tributary created (their contribution was
    /// deleted and its source says `on_delete = "archive"`): out of the
    /// contact's timeline, still recoverable in the CRM. Archiving one
    /// already archived or gone is done, not an error. One outcome per
    /// input, in input order.
    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError>;

    /// One outcome per input, in input order.
    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError>;

    /// Deletes activities Tributary created, for good (`tributary forget`
    /// with `forget_activities = "delete"`). Deleting one already gone is
    /// done. One outcome per input, in input order.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let _ = activity_ids;
        Err(CrmError::Unsupported(format!(
            "the {} sink cannot delete activities; use forget_activities = \"archive\"",
            self.kind()
        )))
    }

    /// Merges `merged` into `survivor`: the survivor keeps its id and gains
    /// the other's activities, which are moved, never copied; `merged` is
    /// gone afterwards. Merging a contact already merged into the survivor
    /// is done.
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let _ = (survivor, merged);
        Err(CrmError::Unsupported(format!(
            "the {} sink cannot merge contacts; merge them in the CRM itself",
            self.kind()
        )))
    }

    /// The values of the named properties of one contact (absent ones are
    /// left out), for alert rules on lifecycle stage, company and the like.
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, CrmError> {
        let _ = (contact_id, names);
        Err(CrmError::Unsupported(format!("the {} sink cannot read contact properties", self.kind())))
    }
}
