//! The webhook sink: for a CRM Tributary has no connector for, every batch
//! is POSTed as one signed JSON document to a URL of the user's choosing.
//!
//! # Identifiers
//!
//! A webhook keeps no CRM ids, so Tributary names records with its own
//! deterministic ids, the same on every delivery:
//!
//! - a contact is `email:<trimmed, lowercased e-mail>` when the platform gave
//!   an e-mail, else its identity key `<platform>:<author id>`;
//! - an activity is its activity key (a hash of platform, source and item
//!   id), which is also the id `upsert_activities` returns.
//!
//! `find_contact` cannot ask a receiver anything: an e-mail lookup answers
//! the deterministic `email:` id (the contact an upsert with that e-mail
//! writes), a handle lookup answers `None`. `setup` creates nothing.
//!
//! # Requests
//!
//! Each request is `POST <url>` with `Content-Type: application/json`, the
//! extra `headers` of the configuration, and:
//!
//! - `Idempotency-Key`: the lowercase hex SHA-256 of the envelope's `type`,
//!   a newline, and the JSON of its `items`. A replayed batch (after a crash,
//!   a timeout, a retry) carries the same key, whatever its `sent_at`, so a
//!   receiver may drop a key it has already processed. A batch Tributary
//!   split (see below) has other items, hence another key.
//! - `Tributary-Signature: t=<unix seconds>,v1=<hex>`, where `<hex>` is the
//!   lowercase hex HMAC-SHA256, keyed with the configured `secret` (its bytes
//!   as resolved), of `<t>.<body>`: the decimal timestamp, a dot, and the
//!   raw body bytes (the scheme of Stripe's webhooks).
//!
//! A receiver verifies a request so:
//!
//! 1. read the raw body bytes, before any JSON parsing;
//! 2. split the header on `,`; take `t` and every `v1` (ignore other keys,
//!    they are for future schemes);
//! 3. compute HMAC-SHA256(secret, `<t>` + `.` + body), hex-encode it, and
//!    compare it with a `v1` in constant time; refuse the request (401) when
//!    none matches;
//! 4. refuse a `t` too far from its clock. The HTTP client retries one
//!    request (5xx, 429, network errors) with the timestamp of its first
//!    attempt, for up to a few minutes: allow 10 minutes;
//! 5. drop a request whose `Idempotency-Key` it has already processed
//!    (answer 2xx or 409).
//!
//! # Body
//!
//! Every body is a versioned envelope:
//!
//! ```json
//! {"type": "tributary.contacts", "version": 1, "sent_at": "2024-05-01T12:00:00.000Z", "items": [...]}
//! ```
//!
//! `type` is one of the six below, `version` is `1` (a change that breaks
//! a receiver gets a new version; new fields and new types are added
//! within it, so a receiver ignores what it does not know), `sent_at` is
//! the RFC 3339 UTC time the request was built. Absent values are `null`;
//! times are RFC 3339 UTC.
//!
//! - `tributary.contacts`, one item per author:
//!   `id` (string, the deterministic contact id above), `identity` (string,
//!   `<platform>:<author id>`), `email` (string, trimmed and lowercased, or
//!   null), `platform` (string), `handle`, `display_name`, `profile_url`
//!   (string or null).
//! - `tributary.activities`, one item per contribution:
//!   `id` (string, the activity key), `contact_id` (string: the contact's
//!   `id`, or null for a contribution without an author), `platform`,
//!   `source`, `external_id` (string), `kind` (`post`, `comment`, `reply`,
//!   `review`, `ticket`, `ticket_comment`, `mention` or `message`), `url`
//!   (string or null), `title` (string or null), `body` (plain text),
//!   `language` (ISO 639-3 or null), `created_at` (time), `updated_at` (time
//!   or null), `parent_id`, `thread_id` (string or null), `tags` (array of
//!   strings), `score` (number or null), `edited`, `deleted` (booleans),
//!   `sentiment` (number -1..1 or null), `intent` (`question`, `complaint`,
//!   `idea`, `praise`, `other` or null). Sending an `id` again updates it.
//! - `tributary.rollups`, one item per contact, absolute values (a value
//!   missing now is `null`, and replaces an earlier one):
//!   `contact_id` (string), `last_contribution_at` (time), `last_platform`
//!   (string), `contribution_count` (integer), `platforms` (sorted array of
//!   strings), `sentiment_avg` (number -1..1), `questions`, `complaints`,
//!   `ideas`, `praise` (integers), `last_url` (string, the last
//!   contribution's address, or null), `last_excerpt` (string, the start of
//!   its text, at most 200 characters, or null), `count_90d` (integer,
//!   contributions in the 90 days before the figures were taken),
//!   `sentiment_avg_90d` (number -1..1, or null when none of those was
//!   scored), `needs_attention` (boolean: an unresolved complaint or a sharp
//!   drop in sentiment), `attention_reason` (string or null), `per_platform`
//!   (array sorted by platform of `{platform, handle, profile_url,
//!   first_seen, last_seen, contributions}`: string, string or null, string
//!   or null, time, time, integer).
//! - `tributary.archive`, one item per activity to take out of the contact's
//!   timeline (its contribution was deleted): `id` (string, the activity
//!   key). Archiving an unknown or archived id is expected to succeed.
//! - `tributary.delete`, one item per activity to delete for good (`tributary
//!   forget` with `forget_activities = "delete"`): `id` (string, the activity
//!   key). Deleting an unknown or deleted id is expected to succeed.
//! - `tributary.merge`, one item: `{"survivor": "<contact id>", "merged":
//!   "<contact id>"}`: the two contacts are one person; `merged`'s activities
//!   move to `survivor` (moved, never copied) and `merged` is gone. Merging a
//!   contact already merged into the survivor is expected to succeed. A
//!   refusal (a 4xx naming no other cause) is an error of the merge: nothing
//!   is merged in Tributary's records either.
//!
//! A webhook cannot be read, so `contact_properties` (alert rules on a
//! contact's fields) is unsupported.
//!
//! `check` sends `{"type":"tributary.ping","version":1}`, signed the same
//! way, and expects a 2xx.
//!
//! # Answers
//!
//! - 2xx: every item of the request is done; 409: already received, done.
//! - 400, 413, 422 and any other 4xx not named here: the request is
//!   refused. A 400 or 422 body may name the bad items by their position in
//!   `items` (the optional shape `{"errors": [{"index": 0, "message":
//!   "..."}]}`): those are rejected with their message and the rest is sent
//!   again in a new request. Without it, the batch is split in halves until
//!   the bad item is alone, which is rejected with the receiver's message
//!   (a JSON `message` or `error`, else the body's start).
//! - 401, 403: the receiver refuses the signature or the headers: an error,
//!   nothing is rejected. 404, 405, 410: there is no receiver at `url`: an
//!   error too.
//! - 429, 5xx and network errors: transient. The shared HTTP client
//!   retries with backoff and honours `Retry-After` (no request leaves
//!   before it); a wait longer than it may spend inline comes back as an
//!   error carrying the wait, and the daemon delivers again later. A 408
//!   comes back at once as a transient error, delivered again later too.
//!
//! The secret and secret header values never appear in logs, errors or
//! `Debug` output, and are scrubbed from whatever a receiver echoes back.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tributary_sdk::{
    ActivityUpsert, ContactLookup, ContactUpsert, Crm, CrmError, HttpClient, HttpError, HttpOptions, HttpResponse,
    RecordOutcome, Rollup, SecretError, SecretRef, SetupReport,
};
use url::Url;

/// The envelope version this module writes.
pub const VERSION: u32 = 1;
/// The header carrying `t=<unix>,v1=<hex>`.
pub use tributary_sdk::signature::SIGNATURE_HEADER;
use tributary_sdk::signature::{MIN_SECRET_BYTES, Signer};
/// The header carrying the deterministic hash of a request's items.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

const CONTACTS: &str = "tributary.contacts";
const ACTIVITIES: &str = "tributary.activities";
const ROLLUPS: &str = "tributary.rollups";
const ARCHIVE: &str = "tributary.archive";
const DELETE: &str = "tributary.delete";
const MERGE: &str = "tributary.merge";
const PING: &str = "tributary.ping";

const DEFAULT_BATCH_SIZE: usize = 100;
const MAX_BATCH_SIZE: usize = 1000;
/// Headers Tributary sets itself (or the HTTP stack does).
const RESERVED_HEADERS: [&str; 7] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "tributary-signature",
    "idempotency-key",
];

/// Settings of the webhook sink (the `[crm]` table with `type = "webhook"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where every batch is POSTed (http or https; https unless the receiver
    /// is on the same host).
    pub url: Url,
    /// The HMAC-SHA256 key that signs every request (at least 16 bytes),
    /// shared with the receiver: `{ env = "TRIBUTARY_WEBHOOK_SECRET" }` or
    /// `{ file = "webhook-secret" }`.
    pub secret: SecretRef,
    /// The most items in one request (1 to 1000).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Extra headers sent with every request, e.g. an API key the
    /// receiver's gateway wants. A value is a string, or a secret reference
    /// (`{ env = "NAME" }`, `{ file = "/path" }`) for anything confidential.
    /// `Content-Type`, `Tributary-Signature` and `Idempotency-Key` are
    /// Tributary's own and cannot be set here.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderSetting>,
}

/// The value of one extra header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HeaderSetting {
    /// Written as is in the configuration: not a secret.
    Plain(String),
    /// Resolved when the sink is built; never shown.
    Secret(SecretRef),
}

fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}

/// Why a webhook sink cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("webhook `secret`: {0}")]
    Secret(#[source] SecretError),
    #[error("webhook `secret` must be at least {MIN_SECRET_BYTES} bytes long")]
    ShortSecret,
    #[error("webhook `url` must be an http or https URL, not `{0}:`")]
    Url(String),
    #[error("webhook `batch_size` must be 1 to {MAX_BATCH_SIZE}, not {0}")]
    BatchSize(usize),
    #[error("webhook `headers`: `{0}` is not a valid header name")]
    HeaderName(String),
    #[error("webhook `headers`: `{0}` is set by Tributary itself")]
    ReservedHeader(String),
    #[error("webhook `headers`: the value of `{0}` is not a valid header value")]
    HeaderValue(String),
    #[error("webhook `headers`: `{name}`: {source}")]
    HeaderSecret {
        name: String,
        #[source]
        source: SecretError,
    },
    #[error("webhook http client: {0}")]
    Http(#[from] HttpError),
}

/// The webhook sink. Cheap to share; holds one [`HttpClient`].
pub struct WebhookCrm {
    http: HttpClient,
    url: Url,
    /// Keyed with the secret.
    signer: Signer,
    batch_size: usize,
    /// The extra headers, values marked sensitive.
    headers: HeaderMap,
    /// The secret and secret header values, scrubbed from messages.
    secrets: Vec<SecretString>,
}

impl std::fmt::Debug for WebhookCrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCrm")
            .field("url", &safe_url(&self.url))
            .field("batch_size", &self.batch_size)
            .field("headers", &self.headers.keys().map(HeaderName::as_str).collect::<Vec<_>>())
            .field("secret", &"[redacted]")
            .field("http", &self.http)
            .finish()
    }
}

/// scheme://host:port/path: a query string may carry a token.
fn safe_url(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

/// What a receiver made of one request.
enum Answer {
    /// Every item done (2xx, 409).
    Accepted,
    /// The request refused; `items` are the per-item errors it named, by
    /// position in the request.
    Refused { message: String, items: Vec<(usize, String)> },
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    version: u32,
    sent_at: String,
    items: &'a [&'a Value],
}

#[derive(Serialize)]
struct ContactItem<'a> {
    id: String,
    identity: &'a str,
    email: Option<String>,
    platform: &'a str,
    handle: Option<&'a str>,
    display_name: Option<&'a str>,
    profile_url: Option<&'a str>,
}

#[derive(Serialize)]
struct ActivityItem<'a> {
    id: &'a str,
    contact_id: Option<&'a str>,
    platform: &'a str,
    source: &'a str,
    external_id: &'a str,
    kind: &'static str,
    url: Option<&'a str>,
    title: Option<&'a str>,
    body: &'a str,
    language: Option<&'a str>,
    created_at: DateTime<Utc>,
    updated_at: Option<DateTime<Utc>>,
    parent_id: Option<&'a str>,
    thread_id: Option<&'a str>,
    tags: &'a [String],
    score: Option<f64>,
    edited: bool,
    deleted: bool,
    sentiment: Option<f64>,
    intent: Option<&'static str>,
}

#[derive(Serialize)]
struct RollupItem<'a> {
    contact_id: &'a str,
    last_contribution_at: DateTime<Utc>,
    last_platform: &'a str,
    contribution_count: u64,
    platforms: &'a [String],
    sentiment_avg: f64,
    questions: u64,
    complaints: u64,
    ideas: u64,
    praise: u64,
    last_url: Option<&'a str>,
    last_excerpt: Option<&'a str>,
    count_90d: u64,
    sentiment_avg_90d: Option<f64>,
    needs_attention: bool,
    attention_reason: Option<&'a str>,
    per_platform: Vec<PlatformItem<'a>>,
}

#[derive(Serialize)]
struct PlatformItem<'a> {
    platform: &'a str,
    handle: Option<&'a str>,
    profile_url: Option<&'a str>,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    contributions: u64,
}

/// An item of `tributary.archive` and `tributary.delete`.
#[derive(Serialize)]
struct ArchiveItem<'a> {
    id: &'a str,
}

#[derive(Serialize)]
struct MergeItem<'a> {
    survivor: &'a str,
    merged: &'a str,
}

/// The deterministic id of a contact, or `None` when it has neither an
/// e-mail nor an identity.
fn contact_id(contact: &ContactUpsert) -> Option<String> {
    match contact.email.as_deref().map(str::trim).filter(|email| !email.is_empty()) {
        Some(email) => Some(email_id(email)),
        None => Some(contact.identity.trim().to_owned()).filter(|identity| !identity.is_empty()),
    }
}

fn email_id(email: &str) -> String {
    format!("email:{}", email.trim().to_lowercase())
}

fn non_empty(text: &Option<String>) -> Option<&str> {
    text.as_deref().map(str::trim).filter(|text| !text.is_empty())
}

/// The items of `tributary.archive` or `tributary.delete`.
fn id_items(activity_ids: &[String]) -> Vec<Result<Value, String>> {
    activity_ids
        .iter()
        .map(|id| match id.trim() {
            "" => Err("the activity id is empty".to_owned()),
            id => to_value(ArchiveItem { id }),
        })
        .collect()
}

fn to_value(item: impl Serialize) -> Result<Value, String> {
    serde_json::to_value(item).map_err(|error| format!("cannot encode this record: {error}"))
}

/// The `Idempotency-Key` of a request: its type and items, not its time.
fn idempotency_key(kind: &str, items: &[&Value]) -> Result<String, CrmError> {
    let encoded =
        serde_json::to_vec(items).map_err(|error| CrmError::Decode(format!("cannot encode items: {error}")))?;
    let mut hash = Sha256::new();
    hash.update(kind.as_bytes());
    hash.update(b"\n");
    hash.update(&encoded);
    Ok(hex::encode(hash.finalize()))
}

impl WebhookCrm {
    pub fn new(config: WebhookConfig, http: HttpOptions) -> Result<WebhookCrm, BuildError> {
        if !matches!(config.url.scheme(), "http" | "https") {
            return Err(BuildError::Url(config.url.scheme().to_owned()));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&config.batch_size) {
            return Err(BuildError::BatchSize(config.batch_size));
        }
        let secret = config.secret.resolve().map_err(BuildError::Secret)?;
        let signer = Signer::new(&secret).map_err(|_| BuildError::ShortSecret)?;
        let mut secrets = vec![secret];
        let mut headers = HeaderMap::new();
        for (name, setting) in &config.headers {
            let header =
                HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| BuildError::HeaderName(name.clone()))?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(BuildError::ReservedHeader(name.clone()));
            }
            let value = match setting {
                HeaderSetting::Plain(value) => value.clone(),
                HeaderSetting::Secret(reference) => {
                    let value = reference
                        .resolve()
                        .map_err(|source| BuildError::HeaderSecret { name: name.clone(), source })?;
                    let text = value.expose_secret().trim().to_owned();
                    secrets.push(value);
                    text
                }
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| BuildError::HeaderValue(name.clone()))?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        Ok(WebhookCrm {
            http: HttpClient::new(http)?,
            url: config.url,
            signer,
            batch_size: config.batch_size,
            headers,
            secrets,
        })
    }

    /// Replaces every secret, should a receiver echo one, in text bound for
    /// an error, a rejection or a log line.
    fn scrub(&self, text: &str) -> String {
        tributary_sdk::secret::redact(text, self.secrets.iter().map(|secret| secret.expose_secret().trim()))
    }

    /// `t=<unix>,v1=<hex hmac-sha256 of "<t>.<body>">`.
    fn signature(&self, timestamp: i64, body: &[u8]) -> String {
        self.signer.sign(timestamp, body)
    }

    /// One signed POST through the shared client (which retries 429, 5xx
    /// and network errors and honours Retry-After).
    async fn post(&self, body: Vec<u8>, idempotency_key: Option<&str>) -> Result<HttpResponse, CrmError> {
        let signature = self.signature(Utc::now().timestamp(), &body);
        let mut signature = HeaderValue::from_str(&signature)
            .map_err(|error| CrmError::Decode(format!("cannot build the signature header: {error}")))?;
        signature.set_sensitive(true);
        let mut request = self
            .http
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature);
        if let Some(key) = idempotency_key {
            request = request.header(IDEMPOTENCY_HEADER, key);
        }
        match self.http.send(request.body(body)).await {
            Ok(response) => Ok(response),
            Err(HttpError::Status { target, status, attempts, body }) => {
                Err(CrmError::Http(HttpError::Status { target, status, attempts, body: self.scrub(&body) }))
            }
            Err(HttpError::RateLimited { target, retry_after, body }) => {
                Err(CrmError::Http(HttpError::RateLimited { target, retry_after, body: self.scrub(&body) }))
            }
            Err(error) => Err(CrmError::Http(error)),
        }
    }

    /// An answer that is an outage, not a refusal of the items.
    fn failure(&self, response: &HttpResponse) -> CrmError {
        let status = response.status.as_u16();
        match status {
            401 | 403 => CrmError::Auth(self.scrub(&format!(
                "the webhook receiver answered HTTP {status} (check `secret` and `headers`): {}",
                describe(response)
            ))),
            408 => CrmError::Transient(
                self.scrub(&format!("the webhook receiver timed out (HTTP 408): {}", response.body_snippet())),
            ),
            429 => {
                let retry_after = response.retry_after().unwrap_or(Duration::from_secs(10));
                CrmError::RateLimited { retry_after }
            }
            _ => CrmError::Http(HttpError::Status {
                target: response.target.clone(),
                status,
                attempts: 1,
                body: self.scrub(&response.body_snippet()),
            }),
        }
    }

    /// Sends one envelope of `items` and reads the answer.
    async fn send_batch(&self, kind: &str, items: &[&Value]) -> Result<Answer, CrmError> {
        let key = idempotency_key(kind, items)?;
        let envelope = Envelope {
            kind,
            version: VERSION,
            sent_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            items,
        };
        let body =
            serde_json::to_vec(&envelope).map_err(|error| CrmError::Decode(format!("cannot encode items: {error}")))?;
        let response = self.post(body, Some(&key)).await?;
        let status = response.status.as_u16();
        match status {
            200..=299 | 409 => Ok(Answer::Accepted),
            401 | 403 | 404 | 405 | 408 | 410 | 429 => Err(self.failure(&response)),
            400..=499 => {
                let message = self.scrub(&describe(&response));
                let items = if matches!(status, 400 | 422) {
                    item_errors(&response, status)
                        .into_iter()
                        .map(|(index, message)| (index, self.scrub(&message)))
                        .collect()
                } else {
                    Vec::new()
                };
                Ok(Answer::Refused { message, items })
            }
            _ => Err(self.failure(&response)),
        }
    }

    /// Delivers `items` (each encoded, or why it cannot be) in batches and
    /// returns one outcome per item, in order: `Ok(())` or the message of
    /// its rejection.
    async fn deliver(
        &self,
        kind: &str,
        items: Vec<Result<Value, String>>,
    ) -> Result<Vec<Result<(), String>>, CrmError> {
        let mut outcomes: Vec<Option<Result<(), String>>> = vec![None; items.len()];
        let mut ready = Vec::new();
        for (index, item) in items.iter().enumerate() {
            match item {
                Ok(_) => ready.push(index),
                Err(message) => outcomes[index] = Some(Err(message.clone())),
            }
        }
        let mut pending: VecDeque<Vec<usize>> = ready.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        while let Some(group) = pending.pop_front() {
            let batch: Vec<&Value> = group.iter().filter_map(|&index| items[index].as_ref().ok()).collect();
            match self.send_batch(kind, &batch).await? {
                Answer::Accepted => {
                    for &index in &group {
                        outcomes[index] = Some(Ok(()));
                    }
                }
                Answer::Refused { message, items: named } => {
                    let named: BTreeMap<usize, String> =
                        named.into_iter().filter(|(position, _)| *position < group.len()).collect();
                    if !named.is_empty() {
                        // The receiver named the bad items: they are
                        // rejected, the rest goes again on its own.
                        for (position, message) in &named {
                            tracing::debug!(kind, %message, "the webhook receiver refused an item");
                            outcomes[group[*position]] = Some(Err(message.clone()));
                        }
                        let rest: Vec<usize> = group
                            .iter()
                            .enumerate()
                            .filter(|(position, _)| !named.contains_key(position))
                            .map(|(_, &index)| index)
                            .collect();
                        if !rest.is_empty() {
                            pending.push_front(rest);
                        }
                    } else if group.len() > 1 {
                        tracing::debug!(
                            kind,
                            items = group.len(),
                            "the webhook receiver refused a batch; splitting it to isolate the bad item"
                        );
                        let (first, second) = group.split_at(group.len() / 2);
                        pending.push_front(second.to_vec());
                        pending.push_front(first.to_vec());
                    } else {
                        tracing::debug!(kind, %message, "the webhook receiver refused an item");
                        outcomes[group[0]] = Some(Err(message));
                    }
                }
            }
        }
        Ok(outcomes.into_iter().map(|outcome| outcome.unwrap_or_else(|| Err("not sent".into()))).collect())
    }
}

/// A non-empty string of a JSON answer.
fn text(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).map(str::trim).filter(|text| !text.is_empty())
}

/// The receiver's message: a JSON `message` or `error`, the per-item
/// messages, or the start of the body.
fn describe(response: &HttpResponse) -> String {
    let status = response.status.as_u16();
    if let Ok(body) = serde_json::from_slice::<Value>(&response.body) {
        if let Some(message) = text(body.get("message"))
            .or_else(|| text(body.get("error")))
            .or_else(|| text(body.get("error").and_then(|error| error.get("message"))))
        {
            return message.to_owned();
        }
        let listed: Vec<&str> = body
            .get("errors")
            .and_then(Value::as_array)
            .map(|errors| errors.iter().filter_map(|error| text(error.get("message"))).collect())
            .unwrap_or_default();
        if !listed.is_empty() {
            return listed.join("; ");
        }
    }
    match response.body_snippet() {
        snippet if snippet.is_empty() => format!("the webhook receiver answered HTTP {status} without a message"),
        snippet => snippet,
    }
}

/// The optional per-item errors of a 400/422:
/// `{"errors": [{"index": n, "message": ".."}]}`.
fn item_errors(response: &HttpResponse, status: u16) -> Vec<(usize, String)> {
    let Ok(body) = serde_json::from_slice::<Value>(&response.body) else {
        return Vec::new();
    };
    let Some(errors) = body.get("errors").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut seen = BTreeSet::new();
    errors
        .iter()
        .filter_map(|error| {
            let index = usize::try_from(error.get("index")?.as_u64()?).ok()?;
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|message| !message.is_empty())
                .map_or_else(|| format!("the webhook receiver refused this item (HTTP {status})"), str::to_owned);
            seen.insert(index).then_some((index, message))
        })
        .collect()
}

fn done_with<T>(outcomes: Vec<Result<(), String>>, ids: Vec<T>) -> Vec<RecordOutcome<T>> {
    outcomes
        .into_iter()
        .zip(ids)
        .map(|(outcome, id)| match outcome {
            Ok(()) => RecordOutcome::Done(id),
            Err(message) => RecordOutcome::Rejected(message),
        })
        .collect()
}

#[async_trait]
impl Crm for WebhookCrm {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    async fn check(&self) -> Result<(), CrmError> {
        let body = serde_json::to_vec(&serde_json::json!({ "type": PING, "version": VERSION }))
            .map_err(|error| CrmError::Decode(error.to_string()))?;
        let response = self.post(body, None).await?;
        if response.status.is_success() { Ok(()) } else { Err(self.failure(&response)) }
    }

    async fn setup(&self, _platforms: &[String]) -> Result<SetupReport, CrmError> {
        Ok(SetupReport {
            created: vec![],
            existing: vec!["(a webhook has no custom fields: the receiver reads the documented JSON schema)".into()],
        })
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        Ok(match lookup {
            ContactLookup::Email(email) if !email.trim().is_empty() => Some(email_id(email)),
            ContactLookup::Email(_) | ContactLookup::Handle { .. } => None,
        })
    }

    async fn upsert_contacts(&self, contacts: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let ids: Vec<String> = contacts.iter().map(|contact| contact_id(contact).unwrap_or_default()).collect();
        let items = contacts
            .iter()
            .zip(&ids)
            .map(|(contact, id)| {
                if id.is_empty() {
                    return Err("the contact has neither an e-mail nor an identity".to_owned());
                }
                to_value(ContactItem {
                    id: id.clone(),
                    identity: contact.identity.trim(),
                    email: non_empty(&contact.email).map(str::to_lowercase),
                    platform: &contact.platform,
                    handle: non_empty(&contact.handle),
                    display_name: non_empty(&contact.display_name),
                    profile_url: non_empty(&contact.profile_url),
                })
            })
            .collect();
        Ok(done_with(self.deliver(CONTACTS, items).await?, ids))
    }

    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let items = activities
            .iter()
            .map(|activity| {
                if activity.key.trim().is_empty() {
                    return Err("the activity has no key".to_owned());
                }
                let contribution = &activity.contribution;
                to_value(ActivityItem {
                    id: activity.key.trim(),
                    contact_id: Some(activity.contact_id.trim()).filter(|id| !id.is_empty()),
                    platform: &contribution.platform,
                    source: &contribution.source,
                    external_id: &contribution.external_id,
                    kind: contribution.kind.as_str(),
                    url: contribution.url.as_deref(),
                    title: contribution.title.as_deref(),
                    body: &contribution.body,
                    language: contribution.language.as_deref(),
                    created_at: contribution.created_at,
                    updated_at: contribution.updated_at,
                    parent_id: contribution.parent_id.as_deref(),
                    thread_id: contribution.thread_id.as_deref(),
                    tags: &contribution.tags,
                    score: contribution.score.filter(|score| score.is_finite()),
                    edited: contribution.edited,
                    deleted: contribution.deleted,
                    sentiment: contribution.signals.as_ref().map(|signals| signals.sentiment),
                    intent: contribution.signals.as_ref().map(|signals| signals.intent.as_str()),
                })
            })
            .collect();
        let ids = activities.iter().map(|activity| activity.key.trim().to_owned()).collect();
        Ok(done_with(self.deliver(ACTIVITIES, items).await?, ids))
    }

    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        Ok(done_with(self.deliver(ARCHIVE, id_items(activity_ids)).await?, vec![(); activity_ids.len()]))
    }

    /// `tributary.delete`, one item per activity.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        Ok(done_with(self.deliver(DELETE, id_items(activity_ids)).await?, vec![(); activity_ids.len()]))
    }

    /// `tributary.merge` with one item `{survivor, merged}`; the receiver
    /// moves the activities. A refusal is an error: Tributary then merges
    /// nothing in its own records either.
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let (survivor, merged) = (survivor.trim(), merged.trim());
        if survivor.is_empty() || merged.is_empty() {
            return Err(CrmError::Unsupported("merging webhook contacts needs two contact ids".into()));
        }
        if survivor == merged {
            return Ok(());
        }
        let item = to_value(MergeItem { survivor, merged });
        match self.deliver(MERGE, vec![item]).await?.pop() {
            Some(Ok(())) => Ok(()),
            Some(Err(message)) => Err(CrmError::Unsupported(format!(
                "the webhook receiver refused to merge contact {merged} into {survivor}: {message}"
            ))),
            None => Err(CrmError::Decode("the merge was not sent".into())),
        }
    }

    /// A webhook cannot be read.
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, CrmError> {
        let _ = (contact_id, names);
        Err(CrmError::Unsupported(
            "the webhook sink cannot read contact properties (a webhook only sends): alert rules with contact \
             conditions need a CRM sink Tributary can read from"
                .into(),
        ))
    }

    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let items = rollups
            .iter()
            .map(|rollup| {
                if rollup.contact_id.trim().is_empty() {
                    return Err("the rollup names no contact".to_owned());
                }
                to_value(RollupItem {
                    contact_id: rollup.contact_id.trim(),
                    last_contribution_at: rollup.last_contribution_at,
                    last_platform: &rollup.last_platform,
                    contribution_count: rollup.contribution_count,
                    platforms: &rollup.platforms,
                    sentiment_avg: if rollup.sentiment_avg.is_finite() { rollup.sentiment_avg } else { 0.0 },
                    questions: rollup.questions,
                    complaints: rollup.complaints,
                    ideas: rollup.ideas,
                    praise: rollup.praise,
                    last_url: non_empty(&rollup.last_url),
                    last_excerpt: non_empty(&rollup.last_excerpt),
                    count_90d: rollup.count_90d,
                    sentiment_avg_90d: rollup.sentiment_avg_90d.filter(|value| value.is_finite()),
                    needs_attention: rollup.needs_attention,
                    attention_reason: non_empty(&rollup.attention_reason),
                    per_platform: rollup
                        .per_platform
                        .iter()
                        .map(|platform| PlatformItem {
                            platform: &platform.platform,
                            handle: non_empty(&platform.handle),
                            profile_url: non_empty(&platform.profile_url),
                            first_seen: platform.first_seen,
                            last_seen: platform.last_seen,
                            contributions: platform.contributions,
                        })
                        .collect(),
                })
            })
            .collect();
        Ok(done_with(self.deliver(ROLLUPS, items).await?, vec![(); rollups.len()]))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
        time::Instant,
    };

    use chrono::TimeZone;
    use serde_json::json;
    use tributary_sdk::{Contribution, Intent, PlatformRollup, Signals};
    use wiremock::{
        Mock, MockServer, Request, ResponseTemplate,
        matchers::{method, path},
    };

    use super::*;

    const SECRET: &str = "whsec_0123456789abcdef_test";

    thread_local! {
        /// The test's secret files, removed when its thread ends.
        static SECRET_FILES: std::cell::RefCell<Vec<tempfile::TempPath>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn secret_file(value: &str) -> SecretRef {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(value.as_bytes()).unwrap();
        let path = file.into_temp_path();
        let reference = SecretRef::File(path.to_path_buf());
        SECRET_FILES.with(|files| files.borrow_mut().push(path));
        reference
    }

    fn config(url: &str, batch_size: usize) -> WebhookConfig {
        WebhookConfig {
            url: Url::parse(url).unwrap(),
            secret: secret_file(SECRET),
            batch_size,
            headers: BTreeMap::from([("X-Team".to_owned(), HeaderSetting::Plain("growth".into()))]),
        }
    }

    fn options() -> HttpOptions {
        HttpOptions { max_retries: 2, backoff_base: Duration::from_millis(5), ..HttpOptions::default() }
    }

    fn crm(server: &MockServer, batch_size: usize) -> WebhookCrm {
        WebhookCrm::new(config(&format!("{}/hook", server.uri()), batch_size), options()).unwrap()
    }

    fn contact(identity: &str, email: Option<&str>) -> ContactUpsert {
        ContactUpsert {
            identity: identity.into(),
            email: email.map(str::to_owned),
            platform: identity.split(':').next().unwrap_or_default().into(),
            handle: Some(format!("h{}", identity.len())),
            display_name: None,
            profile_url: None,
        }
    }

    fn contacts(count: usize) -> Vec<ContactUpsert> {
        (0..count).map(|i| contact(&format!("discourse:{i}"), None)).collect()
    }

    async fn bodies(server: &MockServer) -> Vec<Value> {
        server.received_requests().await.unwrap().iter().map(|request| request.body_json().unwrap()).collect()
    }

    fn header(request: &Request, name: &str) -> String {
        request.headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned()
    }

    /// What a receiver does: recompute the HMAC of `<t>.<body>` with its
    /// copy of the secret and compare it in constant time.
    fn receiver_accepts(secret: &str, request: &Request) -> bool {
        let signature = header(request, SIGNATURE_HEADER);
        let mut timestamp = None;
        let mut candidates = Vec::new();
        for part in signature.split(',') {
            match part.split_once('=') {
                Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
                Some(("v1", value)) => candidates.extend(hex::decode(value).ok()),
                _ => {}
            }
        }
        let Some(timestamp) = timestamp else { return false };
        if (Utc::now().timestamp() - timestamp).abs() > 600 {
            return false;
        }
        candidates.iter().any(|candidate| {
            use hmac::Mac;
            // Checked independently of the signer under test.
            let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
            mac.update(format!("{timestamp}.").as_bytes());
            mac.update(&request.body);
            mac.verify_slice(candidate).is_ok()
        })
    }

    async fn always(server: &MockServer, status: u16, body: Value) {
        Mock::given(method("POST"))
            .and(path("/hook"))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(server)
            .await;
    }

    fn rendered<T: std::fmt::Debug>(outcomes: &[RecordOutcome<T>]) -> Vec<String> {
        outcomes
            .iter()
            .map(|outcome| match outcome {
                RecordOutcome::Done(id) => format!("done {id:?}"),
                RecordOutcome::Rejected(message) => format!("rejected {message}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_first_sync_posts_one_signed_envelope_per_kind() {
        let server = MockServer::start().await;
        always(&server, 200, json!({})).await;
        let crm = crm(&server, 100);
        let at = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();

        let people = [
            ContactUpsert {
                display_name: Some("Maya C".into()),
                profile_url: Some("https://community.example.com/u/mayac".into()),
                ..contact("discourse:7", Some(" Maya@Example.com "))
            },
            contact("reddit:t2_x", None),
            contact(" ", None),
        ];
        let outcomes = crm.upsert_contacts(&people).await.unwrap();
        assert_eq!(
            outcomes,
            vec![
                RecordOutcome::Done("email:maya@example.com".into()),
                RecordOutcome::Done("reddit:t2_x".into()),
                RecordOutcome::Rejected("the contact has neither an e-mail nor an identity".into()),
            ]
        );

        let contribution = Contribution {
            created_at: at,
            signals: Some(Signals { sentiment: 0.5, intent: Intent::Question, sentiment_skipped: None }),
            tags: vec!["export".into()],
            ..Contribution::sample()
        };
        let key = contribution.activity_key();
        let activity = ActivityUpsert {
            key: key.clone(),
            contact_id: "email:maya@example.com".into(),
            contribution,
            existing_id: None,
        };
        let outcomes = crm.upsert_activities(std::slice::from_ref(&activity)).await.unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Done(key.clone())], "the key is the activity id");

        let rollup = Rollup {
            contact_id: "email:maya@example.com".into(),
            last_contribution_at: at,
            last_platform: "discourse".into(),
            contribution_count: 3,
            platforms: vec!["discourse".into(), "reddit".into()],
            sentiment_avg: 0.25,
            questions: 2,
            complaints: 0,
            ideas: 1,
            praise: 0,
            last_url: Some("https://community.example.com/t/42".into()),
            last_excerpt: Some("Is there a way?".into()),
            count_90d: 2,
            sentiment_avg_90d: Some(f64::NAN),
            needs_attention: true,
            attention_reason: Some("unresolved complaint".into()),
            per_platform: vec![
                PlatformRollup {
                    platform: "discourse".into(),
                    handle: Some("mayac".into()),
                    profile_url: None,
                    first_seen: Utc.with_ymd_and_hms(2024, 4, 1, 12, 0, 0).unwrap(),
                    last_seen: at,
                    contributions: 2,
                },
                PlatformRollup {
                    platform: "reddit".into(),
                    handle: Some(" ".into()),
                    profile_url: Some("https://reddit.com/u/maya".into()),
                    first_seen: Utc.with_ymd_and_hms(2024, 4, 15, 0, 0, 0).unwrap(),
                    last_seen: Utc.with_ymd_and_hms(2024, 4, 15, 0, 0, 0).unwrap(),
                    contributions: 1,
                },
            ],
        };
        assert_eq!(crm.update_rollups(&[rollup]).await.unwrap(), vec![RecordOutcome::Done(())]);
        assert_eq!(crm.archive_activities(std::slice::from_ref(&key)).await.unwrap(), vec![RecordOutcome::Done(())]);

        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 4, "one request per kind; the refused contact was never sent");
        for request in &requests {
            assert_eq!(header(request, "content-type"), "application/json");
            assert_eq!(header(request, "x-team"), "growth", "the extra headers ride along");
            assert_eq!(header(request, IDEMPOTENCY_HEADER).len(), 64);
            assert!(receiver_accepts(SECRET, request));
        }
        let bodies = bodies(&server).await;
        for (body, kind) in bodies.iter().zip([CONTACTS, ACTIVITIES, ROLLUPS, ARCHIVE]) {
            assert_eq!(body["type"], kind);
            assert_eq!(body["version"], 1);
            let sent_at = body["sent_at"].as_str().unwrap();
            assert!(DateTime::parse_from_rfc3339(sent_at).is_ok(), "{sent_at}");
        }
        assert_eq!(
            bodies[0]["items"],
            json!([
                {"id": "email:maya@example.com", "identity": "discourse:7", "email": "maya@example.com",
                 "platform": "discourse", "handle": "h11", "display_name": "Maya C",
                 "profile_url": "https://community.example.com/u/mayac"},
                {"id": "reddit:t2_x", "identity": "reddit:t2_x", "email": null, "platform": "reddit",
                 "handle": "h11", "display_name": null, "profile_url": null},
            ])
        );
        assert_eq!(
            bodies[1]["items"],
            json!([{
                "id": key, "contact_id": "email:maya@example.com", "platform": "discourse",
                "source": "community", "external_id": "42", "kind": "post",
                "url": "https://community.example.com/t/42", "title": "Export to PDF?",
                "body": "Is there a way?\nI looked in settings.", "language": activity.contribution.language,
                "created_at": "2024-05-01T12:00:00Z", "updated_at": null, "parent_id": null, "thread_id": null,
                "tags": ["export"], "score": activity.contribution.score, "edited": false, "deleted": false,
                "sentiment": 0.5, "intent": "question",
            }])
        );
        assert_eq!(
            bodies[2]["items"],
            json!([{
                "contact_id": "email:maya@example.com", "last_contribution_at": "2024-05-01T12:00:00Z",
                "last_platform": "discourse", "contribution_count": 3, "platforms": ["discourse", "reddit"],
                "sentiment_avg": 0.25, "questions": 2, "complaints": 0, "ideas": 1, "praise": 0,
                "last_url": "https://community.example.com/t/42", "last_excerpt": "Is there a way?",
                "count_90d": 2, "sentiment_avg_90d": null, "needs_attention": true,
                "attention_reason": "unresolved complaint",
                "per_platform": [
                    {"platform": "discourse", "handle": "mayac", "profile_url": null,
                     "first_seen": "2024-04-01T12:00:00Z", "last_seen": "2024-05-01T12:00:00Z", "contributions": 2},
                    {"platform": "reddit", "handle": null, "profile_url": "https://reddit.com/u/maya",
                     "first_seen": "2024-04-15T00:00:00Z", "last_seen": "2024-04-15T00:00:00Z", "contributions": 1},
                ],
            }])
        );
        assert_eq!(bodies[3]["items"], json!([{ "id": key }]));
    }

    #[tokio::test]
    async fn the_signature_verifies_like_a_receiver_would_and_fails_with_a_wrong_secret() {
        let server = MockServer::start().await;
        always(&server, 204, json!({})).await;
        let crm = crm(&server, 100);
        crm.upsert_contacts(&contacts(2)).await.unwrap();
        let requests = server.received_requests().await.unwrap();
        let request = &requests[0];
        let signature = header(request, SIGNATURE_HEADER);
        assert!(signature.starts_with("t=") && signature.contains(",v1="), "{signature}");
        assert!(receiver_accepts(SECRET, request));
        assert!(!receiver_accepts("whsec_someone_elses_secret", request), "a wrong secret fails");
        let mut tampered = request.clone();
        tampered.body = request.body.iter().map(|byte| if *byte == b'0' { b'1' } else { *byte }).collect();
        assert!(!receiver_accepts(SECRET, &tampered), "a changed body fails");
    }

    #[tokio::test]
    async fn a_replayed_batch_carries_the_same_idempotency_key() {
        let server = MockServer::start().await;
        always(&server, 200, json!({})).await;
        let crm = crm(&server, 100);
        crm.upsert_contacts(&contacts(3)).await.unwrap();
        // A later second, so `t` and `sent_at` differ.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        crm.upsert_contacts(&contacts(3)).await.unwrap();
        crm.upsert_contacts(&contacts(2)).await.unwrap();
        let requests = server.received_requests().await.unwrap();
        let keys: Vec<String> = requests.iter().map(|request| header(request, IDEMPOTENCY_HEADER)).collect();
        let stamps: Vec<String> = requests.iter().map(|request| header(request, SIGNATURE_HEADER)).collect();
        assert_ne!(stamps[0], stamps[1], "signed at another time");
        assert_ne!(bodies(&server).await[0]["sent_at"], bodies(&server).await[1]["sent_at"]);
        assert_eq!(keys[0], keys[1], "the replay has the same key");
        assert_ne!(keys[0], keys[2], "other items, another key");
        assert!(requests.iter().all(|request| receiver_accepts(SECRET, request)));
    }

    #[tokio::test]
    async fn per_item_errors_reject_only_the_named_items() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(422).set_body_json(json!({
                "errors": [{"index": 1, "message": "handle too long"}, {"index": 3}, {"index": 99, "message": "?"}]
            })))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        always(&server, 200, json!({})).await;
        let crm = crm(&server, 100);
        let outcomes = crm.upsert_contacts(&contacts(4)).await.unwrap();
        assert_eq!(
            rendered(&outcomes),
            [
                "done \"discourse:0\"",
                "rejected handle too long",
                "done \"discourse:2\"",
                "rejected the webhook receiver refused this item (HTTP 422)",
            ]
        );
        let bodies = bodies(&server).await;
        assert_eq!(bodies.len(), 2);
        let resent: Vec<&Value> = bodies[1]["items"].as_array().unwrap().iter().map(|item| &item["id"]).collect();
        assert_eq!(resent, [&json!("discourse:0"), &json!("discourse:2")], "the rest went again on its own");
    }

    #[tokio::test]
    async fn a_refused_batch_is_split_until_the_bad_item_is_alone() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(|request: &Request| {
                let body: Value = request.body_json().unwrap();
                let bad = body["items"].as_array().unwrap().iter().any(|item| item["id"] == "discourse:5");
                if bad {
                    ResponseTemplate::new(400).set_body_json(json!({"message": "discourse:5 is banned"}))
                } else {
                    ResponseTemplate::new(200)
                }
            })
            .mount(&server)
            .await;
        let crm = crm(&server, 4);
        let outcomes = crm.upsert_contacts(&contacts(10)).await.unwrap();
        let rejected: Vec<usize> = (0..10).filter(|i| matches!(outcomes[*i], RecordOutcome::Rejected(_))).collect();
        assert_eq!(rejected, [5]);
        assert_eq!(outcomes[5], RecordOutcome::Rejected("discourse:5 is banned".into()));
        assert_eq!(outcomes[9], RecordOutcome::Done("discourse:9".into()));
        let sizes: Vec<usize> =
            bodies(&server).await.iter().map(|body| body["items"].as_array().unwrap().len()).collect();
        // Batches of 4; the one holding the bad item split 4 -> 2 (-> 1 + 1) + 2.
        assert_eq!(sizes, [4, 4, 2, 1, 1, 2, 2]);
    }

    /// One answer to a batch of two contacts, and what becomes of it.
    async fn check(status: u16, body: Value, expected: Result<[&str; 2], &str>) {
        let server = MockServer::start().await;
        always(&server, status, body).await;
        let crm = crm(&server, 100);
        let outcome = crm.upsert_contacts(&contacts(2)).await;
        match (outcome, expected) {
            (Ok(outcomes), Ok(expected)) => assert_eq!(rendered(&outcomes), expected, "HTTP {status}"),
            (Err(error), Err(expected)) => {
                let shown = format!("{error:?} {error}");
                assert!(shown.contains(expected), "HTTP {status}: {shown}");
            }
            (outcome, expected) => panic!("HTTP {status}: {outcome:?}, expected {expected:?}"),
        }
    }

    #[tokio::test]
    async fn answers_map_to_outcomes_and_errors() {
        check(200, json!({}), Ok(["done \"discourse:0\"", "done \"discourse:1\""])).await;
        check(409, json!({"message": "seen"}), Ok(["done \"discourse:0\"", "done \"discourse:1\""])).await;
        check(422, json!({"error": "nope"}), Ok(["rejected nope", "rejected nope"])).await;
        check(413, json!({}), Ok(["rejected {}", "rejected {}"])).await;
        check(401, json!({"message": "bad signature"}), Err("Auth(\"the webhook receiver answered HTTP 401")).await;
        check(403, json!({}), Err("Auth(")).await;
        check(404, json!({}), Err("status: 404")).await;
        check(408, json!({}), Err("Transient(")).await;
        check(503, json!({"message": "down"}), Err("status: 503, attempts: 3")).await;
    }

    #[tokio::test]
    async fn retry_after_is_honoured_and_a_long_one_comes_back_as_an_error() {
        let server = MockServer::start().await;
        let seen = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let log = seen.clone();
        Mock::given(method("POST"))
            .respond_with(move |_: &Request| {
                let mut seen = log.lock().unwrap();
                seen.push(Instant::now());
                if seen.len() == 1 {
                    ResponseTemplate::new(429).insert_header("retry-after", "1")
                } else {
                    ResponseTemplate::new(200)
                }
            })
            .mount(&server)
            .await;
        let crm = crm(&server, 100);
        let outcomes = crm.upsert_contacts(&contacts(1)).await.unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Done("discourse:0".into())]);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert!(seen[1] - seen[0] >= Duration::from_millis(990), "no request before Retry-After");

        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3600"))
            .mount(&server)
            .await;
        let crm = self::crm(&server, 100);
        let error = crm.upsert_contacts(&contacts(1)).await.unwrap_err();
        assert_eq!(error.retry_after(), Some(Duration::from_secs(3600)), "{error:?}");
        let again = crm.archive_activities(&["k".into()]).await.unwrap_err();
        assert!(again.retry_after().is_some_and(|wait| wait > Duration::from_secs(3500)), "{again:?}");
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "no request while told to wait");
    }

    #[tokio::test]
    async fn the_secret_never_shows_in_errors_rejections_or_debug() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(|request: &Request| {
                let body: Value = request.body_json().unwrap();
                let status = if body["type"] == CONTACTS { 400 } else { 500 };
                ResponseTemplate::new(status).set_body_json(json!({"message": format!("wrong key {SECRET}")}))
            })
            .mount(&server)
            .await;
        let mut config = config(&format!("{}/hook?token=query-secret-value", server.uri()), 100);
        config.headers.insert("X-Api-Key".into(), HeaderSetting::Secret(secret_file("gateway-secret-value")));
        let crm = WebhookCrm::new(config.clone(), options()).unwrap();
        let rejected = crm.upsert_contacts(&contacts(1)).await.unwrap();
        let error = crm
            .update_rollups(&[Rollup {
                contact_id: "x".into(),
                last_contribution_at: Utc::now(),
                last_platform: "x".into(),
                contribution_count: 1,
                platforms: vec![],
                sentiment_avg: 0.0,
                questions: 0,
                complaints: 0,
                ideas: 0,
                praise: 0,
                ..Default::default()
            }])
            .await
            .unwrap_err();
        let requests = server.received_requests().await.unwrap();
        assert_eq!(header(&requests[0], "x-api-key"), "gateway-secret-value");
        // The configuration holds references only (a URL's query is the
        // user's own plain text: tokens belong in secret `headers`).
        let shown = format!("{rejected:?} {error} {error:?} {crm:?}");
        for secret in [SECRET, "gateway-secret-value", "query-secret-value"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        for secret in [SECRET, "gateway-secret-value"] {
            assert!(!format!("{config:?}").contains(secret), "{secret} leaked: {config:?}");
        }
        assert!(shown.contains("wrong key [redacted]"), "{shown}");
    }

    #[tokio::test]
    async fn check_pings_and_lookups_answer_deterministic_ids() {
        let server = MockServer::start().await;
        always(&server, 200, json!({})).await;
        let crm = crm(&server, 100);
        assert_eq!(crm.kind(), "webhook");
        crm.check().await.unwrap();
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests[0].body, br#"{"type":"tributary.ping","version":1}"#);
        assert!(receiver_accepts(SECRET, &requests[0]));
        let email = ContactLookup::Email(" Maya@Example.com".into());
        assert_eq!(crm.find_contact(&email).await.unwrap().as_deref(), Some("email:maya@example.com"));
        let handle = ContactLookup::Handle { platform: "discourse".into(), handle: "mayac".into() };
        assert_eq!(crm.find_contact(&handle).await.unwrap(), None);
        let report = crm.setup(&["discourse".into()]).await.unwrap();
        assert!(report.created.is_empty() && report.existing.len() == 1, "{report:?}");
        assert_eq!(crm.upsert_contacts(&[]).await.unwrap(), vec![]);
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "setup, lookups and nothing send nothing");

        let refusing = MockServer::start().await;
        always(&refusing, 401, json!({"message": "bad signature"})).await;
        let error = self::crm(&refusing, 100).check().await.unwrap_err();
        assert!(matches!(error, CrmError::Auth(_)), "{error:?}");
    }

    #[test]
    fn config_reads_and_build_errors_name_the_key() {
        let config: WebhookConfig = serde_json::from_value(json!({
            "url": "https://crm.example.com/tributary",
            "secret": {"env": "TRIBUTARY_WEBHOOK_SECRET"},
            "headers": {"X-Team": "growth", "X-Api-Key": {"file": "gateway-key"}},
        }))
        .unwrap();
        assert_eq!(config.batch_size, 100);
        assert_eq!(config.headers["X-Api-Key"], HeaderSetting::Secret(SecretRef::File("gateway-key".into())));
        assert!(
            serde_json::from_value::<WebhookConfig>(
                json!({"url": "https://x.io", "secret": {"env": "S"}, "retries": 1})
            )
            .is_err()
        );

        let build = |change: fn(&mut WebhookConfig)| {
            let mut config = config_for_errors();
            change(&mut config);
            WebhookCrm::new(config, HttpOptions::default()).err().map(|error| error.to_string()).unwrap_or_default()
        };
        assert!(build(|c| c.url = Url::parse("ftp://x.io").unwrap()).contains("`url`"));
        assert!(build(|c| c.batch_size = 0).contains("`batch_size`"));
        assert!(build(|c| c.batch_size = 5000).contains("`batch_size`"));
        assert!(build(|c| c.secret = secret_file("short")).contains("`secret`"));
        assert!(build(|c| c.secret = SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into())).contains("`secret`"));
        let reserved = build(|c| {
            c.headers.insert("Idempotency-Key".into(), HeaderSetting::Plain("x".into()));
        });
        assert!(reserved.contains("`headers`") && reserved.contains("Idempotency-Key"), "{reserved}");
        assert!(
            build(|c| {
                c.headers.insert("bad name".into(), HeaderSetting::Plain("x".into()));
            })
            .contains("`headers`")
        );
        assert!(
            build(|c| {
                c.headers.insert("X-Ok".into(), HeaderSetting::Plain("line\nbreak".into()));
            })
            .contains("`headers`")
        );
        assert_eq!(build(|_| {}), "", "the base config builds");
    }

    fn config_for_errors() -> WebhookConfig {
        config("https://crm.example.com/tributary", 100)
    }

    #[tokio::test]
    async fn delete_and_merge_are_signed_events_of_their_own() {
        let server = MockServer::start().await;
        always(&server, 200, json!({})).await;
        let crm = crm(&server, 100);
        let outcomes = crm.delete_activities(&["k1".into(), " ".into(), "k2".into()]).await.unwrap();
        assert_eq!(rendered(&outcomes), ["done ()", "rejected the activity id is empty", "done ()"]);
        crm.merge_contacts(" email:maya@example.com ", "discourse:7").await.unwrap();
        // One contact: nothing to merge, nothing sent.
        crm.merge_contacts("discourse:7", "discourse:7").await.unwrap();
        assert!(matches!(crm.merge_contacts("", "discourse:7").await, Err(CrmError::Unsupported(_))));

        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 2);
        for request in &requests {
            assert!(receiver_accepts(SECRET, request));
            assert_eq!(header(request, IDEMPOTENCY_HEADER).len(), 64);
        }
        let bodies = bodies(&server).await;
        assert_eq!(bodies[0]["type"], DELETE);
        assert_eq!(bodies[0]["version"], 1);
        assert_eq!(bodies[0]["items"], json!([{ "id": "k1" }, { "id": "k2" }]));
        assert_eq!(bodies[1]["type"], MERGE);
        assert_eq!(bodies[1]["items"], json!([{ "survivor": "email:maya@example.com", "merged": "discourse:7" }]));

        // A replayed merge carries the same key; a refused one is an error.
        crm.merge_contacts("email:maya@example.com", "discourse:7").await.unwrap();
        let requests = server.received_requests().await.unwrap();
        assert_eq!(header(&requests[1], IDEMPOTENCY_HEADER), header(&requests[2], IDEMPOTENCY_HEADER));
        let refusing = MockServer::start().await;
        always(&refusing, 422, json!({ "message": "unknown contact discourse:7" })).await;
        let error = self::crm(&refusing, 100).merge_contacts("email:maya@example.com", "discourse:7").await;
        let error = error.unwrap_err();
        assert!(matches!(&error, CrmError::Unsupported(m) if m.contains("unknown contact discourse:7")), "{error:?}");
        let gone = MockServer::start().await;
        always(&gone, 404, json!({})).await;
        let error = self::crm(&gone, 100).delete_activities(&["k1".into()]).await.unwrap_err();
        assert!(error.to_string().contains("404"), "{error}");
    }

    #[tokio::test]
    async fn contact_properties_cannot_be_read_from_a_webhook() {
        let server = MockServer::start().await;
        let crm = crm(&server, 100);
        let error = crm.contact_properties("email:maya@example.com", &["lifecyclestage".into()]).await.unwrap_err();
        assert!(
            matches!(&error, CrmError::Unsupported(m) if m.contains("cannot read contact properties")),
            "{error:?}"
        );
        assert!(server.received_requests().await.unwrap().is_empty());
    }
}
