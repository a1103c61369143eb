//! The state store: cursors, the dedup ledger, the outbox, identity links,
//! quarantine, dead letters and leases. SQLite (WAL) is the embedded
//! default; the trait is what a PostgreSQL backend implements for several
//! replicas.
//!
//! The one rule everything else rests on: [`StateStore::commit_page`] stores
//! a page's items and moves the source's cursor in ONE transaction, so the
//! cursor never moves ahead of what is durably stored.

pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tributary_sdk::{Contribution, Cursor, Quarantined, Rollup};

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state store: {0}")]
    Other(String),
    #[error("unsupported state URL `{0}`: use sqlite:///absolute/path.db or sqlite://relative/path.db")]
    Url(String),
}

/// What one committed page changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CommitStats {
    pub new: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub quarantined: u64,
    /// Items of forgotten people: dropped, never stored.
    pub forgotten: u64,
}

/// An outbox row claimed for delivery.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub content_hash: String,
    pub attempts: u32,
    pub contribution: Contribution,
}

/// How the delivery of one claimed row ended.
#[derive(Debug, Clone)]
pub enum Delivery {
    Delivered {
        contact_id: String,
        activity_id: String,
    },
    /// Try again, no sooner than `at`. `counts` is false when the failure
    /// was the CRM's as a whole (down, rate limiting, refusing the
    /// credentials): such failures never use up a row's attempts.
    Retry {
        error: String,
        at: DateTime<Utc>,
        counts: bool,
    },
    Dead {
        error: String,
    },
    /// Not delivered on purpose (e.g. `unknown_authors = "skip"`).
    Skipped {
        reason: String,
    },
}

/// A finished row, with the content hash it was claimed with: if the row
/// was updated meanwhile (an edit arrived), it stays pending.
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: i64,
    pub content_hash: String,
    pub contribution: Contribution,
    pub delivery: Delivery,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub source: String,
    pub key: String,
    pub attempts: u32,
    pub error: String,
    pub failed_at: DateTime<Utc>,
}

/// What the store knows of a source, for `/status` and `tributary status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceState {
    pub name: String,
    pub last_poll_at: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    pub newest_item_at: Option<DateTime<Utc>>,
    pub backlog: u64,
    pub dead_letters: u64,
    pub delivered: u64,
    pub quarantined: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub backlog: u64,
    pub dead_letters: u64,
    pub delivered: u64,
    pub quarantined: u64,
    pub identities: u64,
    /// Pairs waiting in the identity review queue.
    pub pending_reviews: u64,
    /// Alerts queued, not sent yet.
    pub alerts_pending: u64,
    /// Alerts given up (the destination refused them).
    pub alerts_failed: u64,
}

/// A platform identity as last seen in a contribution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    /// `platform:user id`, as [`tributary_sdk::Contribution::identity_key`].
    pub identity: String,
    pub platform: String,
    pub user_id: String,
    pub handle: Option<String>,
    pub display_name: Option<String>,
    pub email: Option<String>,
    pub profile_url: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// The CRM contact the identity is linked to, once resolved.
    pub contact_id: Option<String>,
    /// Accounts (`platform:handle`) and websites the profile names.
    pub links: Vec<String>,
}

/// A pair of identities that may be one person, on weak evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Review {
    pub id: i64,
    pub a: Profile,
    pub b: Profile,
    /// Why the pair was queued, e.g. `same display name "Léa Martin"`.
    pub evidence: String,
    /// `pending`, `approved` or `rejected`.
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// What `erase_person` removed from the state store.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Erased {
    pub identities: u64,
    pub contributions: u64,
    pub outbox_rows: u64,
    pub quarantined: u64,
    pub reviews: u64,
    pub alerts: u64,
    /// CRM activity ids whose rows were erased: the caller archives or
    /// deletes them in the CRM.
    pub activity_ids: Vec<String>,
}

/// A handle as a platform stores it: without the `u/` or `/u/` of Reddit
/// or a leading `@`.
pub fn bare_handle(handle: &str) -> &str {
    let handle = handle.trim();
    let handle = handle.strip_prefix("/u/").or_else(|| handle.strip_prefix("u/")).unwrap_or(handle);
    handle.trim_start_matches('@')
}

/// The digest under which a forgotten identity or e-mail is remembered:
/// later polls recognise the person without the store keeping who it was.
pub fn forgotten_digest(kind: &str, value: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("tributary-forgotten\u{0}{kind}\u{0}{}", value.trim().to_lowercase())))
}

/// An alert waiting to be sent.
#[derive(Debug, Clone)]
pub struct PendingAlert {
    pub id: i64,
    pub rule: String,
    /// The contribution's key: one alert per rule and contribution, ever.
    pub key: String,
    pub payload: serde_json::Value,
    pub attempts: u32,
}

/// How sending one alert ended.
#[derive(Debug, Clone)]
pub enum AlertOutcome {
    Sent,
    /// Try again no sooner than `at`.
    Retry {
        error: String,
        at: DateTime<Utc>,
    },
    /// Given up: the destination refused it for good.
    Failed {
        error: String,
    },
}

/// The token store of OAuth2 connectors is the state store: tokens outlive a restart.
#[async_trait]
pub trait StateStore: tributary_sdk::TokenStore + Send + Sync {
    /// Cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), StateError>;

    async fn cursor(&self, source: &str) -> Result<Option<Cursor>, StateError>;

    /// In one transaction: the ledger drops unchanged items, new and changed
    /// ones go to the outbox (an edit replaces a still-pending version),
    /// quarantined items are kept with their reason, and the cursor moves.
    async fn commit_page(
        &self,
        source: &str,
        contributions: Vec<Contribution>,
        quarantined: Vec<Quarantined>,
        cursor: Option<Cursor>,
    ) -> Result<CommitStats, StateError>;

    /// The cursor of an unfinished backfill of `source` from `since`
    /// (`sync --since`); a backfill from another date starts afresh.
    async fn backfill_cursor(&self, source: &str, since: Option<DateTime<Utc>>) -> Result<Option<Cursor>, StateError>;

    /// As [`StateStore::commit_page`], but the cursor moves in the backfill
    /// slot of `source`: the live cursor stays where the daemon left it.
    async fn commit_backfill_page(
        &self,
        source: &str,
        contributions: Vec<Contribution>,
        quarantined: Vec<Quarantined>,
        since: Option<DateTime<Utc>>,
        cursor: Option<Cursor>,
    ) -> Result<CommitStats, StateError>;

    /// Leases up to `limit` due rows to `owner` for `lease`.
    async fn claim(&self, owner: &str, limit: usize, lease: Duration) -> Result<Vec<Claimed>, StateError>;

    /// Extends the lease of every row `owner` has claimed (a batch in flight).
    async fn renew_claims(&self, owner: &str, lease: Duration) -> Result<(), StateError>;

    /// Records how each claimed row ended, in one transaction.
    async fn finish(&self, owner: &str, finished: Vec<Finished>) -> Result<(), StateError>;

    /// The contact and CRM activity of each of `keys` already delivered.
    async fn delivered_activities(
        &self,
        keys: &[String],
    ) -> Result<std::collections::HashMap<String, (String, String)>, StateError>;

    async fn identity(&self, identity: &str) -> Result<Option<String>, StateError>;
    async fn link_identity(&self, identity: &str, contact_id: &str, via: &str) -> Result<(), StateError>;

    /// Rollups of contacts whose activities changed since their last
    /// rollup, recomputed from the activity index; 90-day figures and
    /// `needs_attention` are taken at `now`.
    async fn pending_rollups(&self, limit: usize, now: DateTime<Utc>) -> Result<Vec<Rollup>, StateError>;
    /// Makes the rollup of every contact active since `since` due again:
    /// their 90-day figures move with time even when nothing new arrives.
    async fn refresh_rollups(&self, since: DateTime<Utc>) -> Result<u64, StateError>;
    /// Marks rollups written, unless the contact changed again meanwhile.
    async fn rollups_written(&self, rollups: &[Rollup]) -> Result<(), StateError>;
    /// The CRM refused a contact (deleted or merged there): no rollup is
    /// due for it any more, and identities linked to it are resolved again.
    async fn forget_contact(&self, contact_id: &str) -> Result<(), StateError>;

    /// Identities of `platform` whose user id or handle is `id_or_handle`
    /// (case-insensitive, a leading `@` or `u/` ignored).
    async fn find_profiles(&self, platform: &str, id_or_handle: &str) -> Result<Vec<Profile>, StateError>;
    /// Identities whose profile names `account` (`platform:handle`, case-insensitive).
    async fn profiles_linking_to(&self, account: &str) -> Result<Vec<Profile>, StateError>;
    /// Identities that gave this e-mail (case-insensitive).
    async fn profiles_by_email(&self, email: &str) -> Result<Vec<Profile>, StateError>;
    /// Identities linked to a contact.
    async fn profiles_of_contact(&self, contact_id: &str) -> Result<Vec<Profile>, StateError>;
    /// Queues for review every identity on another platform that shares
    /// weak evidence with `identity` (same display name, same handle) and
    /// is not already the same contact or decided; returns how many.
    async fn suggest_reviews(&self, identity: &str) -> Result<u64, StateError>;
    /// The review queue; `status` filters (`pending`, `approved`, `rejected`).
    async fn reviews(&self, status: Option<&str>) -> Result<Vec<Review>, StateError>;
    /// One review, whatever its status.
    async fn review(&self, id: i64) -> Result<Option<Review>, StateError>;
    /// Records the decision on a review; `None` when there is no such id.
    async fn decide_review(&self, id: i64, approved: bool) -> Result<Option<Review>, StateError>;
    /// Every identity seen since `since`, with its link.
    async fn profiles_seen_since(&self, since: DateTime<Utc>) -> Result<Vec<Profile>, StateError>;
    /// One identity, with its link.
    async fn profile(&self, identity: &str) -> Result<Option<Profile>, StateError>;
    /// Queues a pair for review with the given evidence; false when the
    /// pair was queued or decided before.
    async fn queue_review(&self, a: &str, b: &str, evidence: &str) -> Result<bool, StateError>;
    /// Records an administrator's pair of identities as approved (a link
    /// between two identities neither of which has a contact yet).
    async fn approve_pair(&self, a: &str, b: &str, evidence: &str) -> Result<(), StateError>;
    /// The identities approved (by review or an administrator) as the same
    /// person as `identity`.
    async fn approved_partners(&self, identity: &str) -> Result<Vec<String>, StateError>;
    /// Two contacts are one person: identities, activities, outbox rows and
    /// alerts of `merged` move to `survivor`, whose rollup is due.
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), StateError>;

    /// Remembers digests of forgotten identities and e-mails, so later
    /// polls drop their contributions.
    async fn remember_forgotten(&self, digests: &[String]) -> Result<(), StateError>;
    /// The CRM activity ids of a person's delivered contributions.
    async fn person_activities(&self, identities: &[String], contacts: &[String]) -> Result<Vec<String>, StateError>;
    /// Removes every trace of a person: their identities and profiles,
    /// contributions (ledger, outbox, dead letters, activity index),
    /// quarantined items naming them, reviews, alerts and contacts' rollups.
    async fn erase_person(
        &self,
        identities: &[String],
        emails: &[String],
        contacts: &[String],
        needles: &[String],
    ) -> Result<Erased, StateError>;

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError>;
    /// Puts dead letters back in the outbox (all when `ids` is empty); returns how many.
    async fn retry_dead_letters(&self, ids: &[i64]) -> Result<u64, StateError>;
    /// Deletes dead letters (all when `ids` is empty); returns how many.
    async fn drop_dead_letters(&self, ids: &[i64]) -> Result<u64, StateError>;

    /// Takes or renews the named lease; false when another owner holds it.
    async fn acquire_lease(&self, name: &str, owner: &str, ttl: Duration) -> Result<bool, StateError>;
    async fn release_lease(&self, name: &str, owner: &str) -> Result<(), StateError>;
    /// Deletes delivered and skipped outbox rows, and quarantined items,
    /// finished before `older_than`; the ledger and the activity index stay,
    /// so nothing pruned is ever sent again. Returns how many rows went.
    async fn prune(&self, older_than: DateTime<Utc>) -> Result<u64, StateError>;
    /// Every owner holding a lease or a claimed outbox row.
    async fn owners(&self) -> Result<Vec<String>, StateError>;
    /// Frees everything `owner` holds (a process known to be dead); returns how much.
    async fn release_owner(&self, owner: &str) -> Result<u64, StateError>;

    /// Queues an alert of `rule` about the contribution `key`; false (and
    /// nothing queued) when that rule already has one for that key, sent or not.
    async fn enqueue_alert(
        &self,
        rule: &str,
        key: &str,
        contact_id: Option<&str>,
        payload: &serde_json::Value,
    ) -> Result<bool, StateError>;
    /// Alerts due now, oldest first; of one rule, or of any.
    async fn due_alerts(&self, rule: Option<&str>, limit: usize) -> Result<Vec<PendingAlert>, StateError>;
    /// Records how sending an alert ended.
    async fn alert_done(&self, id: i64, outcome: AlertOutcome) -> Result<(), StateError>;

    /// Remembers how a poll ended (the error must already be free of secrets).
    async fn record_poll(&self, source: &str, error: Option<&str>) -> Result<(), StateError>;
    async fn source_states(&self) -> Result<Vec<SourceState>, StateError>;
    async fn totals(&self) -> Result<Totals, StateError>;
}

/// Opens the store a `[daemon] state` URL names.
pub fn open(url: &str) -> Result<SqliteStore, StateError> {
    let path = url.strip_prefix("sqlite://").ok_or_else(|| StateError::Url(url.to_owned()))?;
    if path.is_empty() {
        return Err(StateError::Url(url.to_owned()));
    }
    SqliteStore::open(std::path::Path::new(path))
}
