//! The HubSpot CRM sink.
//!
//! - Contacts are upserted with `POST /crm/v3/objects/contacts/batch/upsert`:
//!   by `email` when the platform gave one, else by the unique custom property
//!   `<prefix>identity` (`platform:user id`). Tributary writes only its own
//!   properties (a handle per platform) and, for people known only by a
//!   handle, `firstname`: the name of a contact with an e-mail belongs to the
//!   CRM and is never overwritten.
//! - Each contribution becomes a note, upserted by the unique note property
//!   `<prefix>key` (the contribution's activity key), then associated with
//!   its contact through the idempotent default association. Replaying a
//!   batch updates the same notes and creates nothing.
//! - Rollups go to the contact with `batch/update`: the totals, the last
//!   contribution's link and excerpt, the 90-day figures, the attention flag
//!   and, per platform, first and last sighting and contribution count.
//! - Contacts are merged with `POST /crm/v3/objects/contacts/merge`; HubSpot
//!   moves the merged contact's notes to the survivor.
//! - Deleting notes archives them: HubSpot's API has no other deletion (the
//!   recycling bin purges them after 90 days).
//! - `setup` creates the property group and the custom properties, reading
//!   first what exists, so it can run any number of times.
//!
//! Every request goes through the shared [`HttpClient`], which retries 429,
//! 5xx and timeouts and honours Retry-After. The token is sent as a Bearer
//! header only; it never appears in errors, logs or `Debug` output.

mod batch;
mod note;
mod properties;

#[cfg(feature = "testkit")]
pub mod mock;

#[cfg(all(test, feature = "testkit"))]
mod tests;

use std::{collections::HashMap, sync::Mutex, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, NaiveTime, Utc};
use reqwest::{Method, header::ACCEPT};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tributary_sdk::{
    ActivityUpsert, ContactLookup, ContactUpsert, Crm, CrmError, HttpClient, HttpError, HttpOptions, HttpResponse,
    RecordOutcome, Rollup, SecretError, SecretRef, SetupReport,
};
use url::Url;

use self::{
    batch::{BatchInput, Names, Written},
    properties::{
        PropertySpec, contact_properties, contributions_property, first_seen_property, handle_property,
        last_seen_property, note_properties, profile_property, user_id_property,
    },
};

const DEFAULT_BASE_URL: &str = "https://api.hubapi.com";
const DEFAULT_PREFIX: &str = "tributary_";
/// The object types Tributary writes, as the v3 paths name them.
const CONTACTS: &str = "contacts";
const NOTES: &str = "notes";
/// HubSpot's read-only contact property listing the ids merged into a contact.
const MERGED_IDS: &str = "hs_merged_object_ids";
/// Longest text written to a rollup's text properties (HubSpot allows 65,536).
const ROLLUP_TEXT_MAX: usize = 1_000;

/// Settings of the HubSpot sink (the `[crm]` table with `type = "hubspot"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSpotConfig {
    /// Access token of a HubSpot private app, sent as
    /// `Authorization: Bearer`: `{ env = "HUBSPOT_TOKEN" }` or
    /// `{ file = "/run/credentials/tributary.service/hubspot" }`. The app
    /// needs read and write access to contacts, notes and their properties
    /// (`crm.objects.contacts.read`, `crm.objects.contacts.write`,
    /// `crm.schemas.contacts.read`, `crm.schemas.contacts.write`).
    pub token: SecretRef,
    /// Root of the HubSpot API. Change it only for a proxy or a test mock.
    #[serde(default = "default_base_url")]
    pub base_url: Url,
    /// Prefix of every custom property Tributary creates and writes
    /// (lowercase letters, digits and `_`, starting with a letter); without
    /// its trailing `_` it also names their property group.
    #[serde(default = "default_prefix")]
    pub property_prefix: String,
}

fn default_base_url() -> Url {
    Url::parse(DEFAULT_BASE_URL).expect("the default base URL is a valid URL")
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

/// Why a HubSpot sink cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("hubspot token: {0}")]
    Secret(#[from] SecretError),
    #[error("hubspot base_url must be an http or https URL, not `{0}:`")]
    BaseUrl(String),
    #[error("hubspot property_prefix `{0}` must be 1 to 40 lowercase letters, digits or `_`, starting with a letter")]
    Prefix(String),
    #[error("hubspot http client: {0}")]
    Http(#[from] HttpError),
}

/// Builds the HubSpot sink: resolves the token and creates its HTTP client.
pub fn new(config: HubSpotConfig, http: HttpOptions) -> Result<HubSpotCrm, BuildError> {
    HubSpotCrm::new(config, http)
}

/// The HubSpot sink. Cheap to share; holds one [`HttpClient`].
pub struct HubSpotCrm {
    http: HttpClient,
    token: SecretString,
    base_url: Url,
    prefix: String,
    /// Set when HubSpot said the daily quota is spent: no request is sent
    /// before this instant.
    daily_quota_until: Mutex<Option<DateTime<Utc>>>,
}

impl std::fmt::Debug for HubSpotCrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSpotCrm")
            .field("base_url", &self.base_url.as_str())
            .field("prefix", &self.prefix)
            .field("token", &"[redacted]")
            .field("http", &self.http)
            .finish()
    }
}

impl HubSpotCrm {
    pub fn new(config: HubSpotConfig, http: HttpOptions) -> Result<HubSpotCrm, BuildError> {
        if !matches!(config.base_url.scheme(), "http" | "https") {
            return Err(BuildError::BaseUrl(config.base_url.scheme().to_owned()));
        }
        let prefix = config.property_prefix;
        let valid_prefix = prefix.len() <= 40
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_prefix {
            return Err(BuildError::Prefix(prefix));
        }
        let token = config.token.resolve()?;
        let token = SecretString::from(token.expose_secret().trim().to_owned());
        Ok(HubSpotCrm {
            http: HttpClient::new(http)?,
            token,
            base_url: config.base_url,
            prefix,
            daily_quota_until: Mutex::new(None),
        })
    }

    /// The name of one of Tributary's custom properties.
    fn property(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The property group holding Tributary's properties.
    fn group(&self) -> String {
        let group = self.prefix.trim_end_matches('_');
        if group.is_empty() { "tributary".into() } else { group.to_owned() }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base_url.as_str().trim_end_matches('/'))
    }

    /// Replaces the token, should a server ever echo it, in text bound for
    /// an error or a log line.
    fn scrub(&self, text: &str) -> String {
        tributary_sdk::secret::redact(text, [self.token.expose_secret()])
    }

    /// One authenticated request through the shared client. 401/403 become
    /// [`CrmError::Auth`], a 429 that reaches us [`CrmError::RateLimited`];
    /// every other status is the caller's to read.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<HttpResponse, CrmError> {
        self.check_daily_quota()?;
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(self.token.expose_secret())
            .header(ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = match self.http.send(request).await {
            Ok(response) => response,
            Err(HttpError::Status { target, status, attempts, body }) => {
                return Err(CrmError::Http(HttpError::Status { target, status, attempts, body: self.scrub(&body) }));
            }
            // The shared client gave up on a 429: its body says which limit.
            // A DAILY quota resets at midnight, unless the server named a
            // wait itself (longer than any backoff of the client's).
            Err(HttpError::RateLimited { target, retry_after, body }) => {
                if serde_json::from_str::<Value>(&body).is_ok_and(|b| b["policyName"] == "DAILY") {
                    let now = Utc::now();
                    let until = if retry_after >= self.http.options().max_inline_wait {
                        now + chrono::Duration::from_std(retry_after).unwrap_or(chrono::Duration::hours(1))
                    } else {
                        next_midnight_utc(now)
                    };
                    self.close_for_the_day(until);
                    return Err(self.check_daily_quota().err().unwrap_or(CrmError::RateLimited { retry_after }));
                }
                return Err(CrmError::Http(HttpError::RateLimited { target, retry_after, body: self.scrub(&body) }));
            }
            Err(error) => return Err(CrmError::Http(error)),
        };
        self.note_daily_quota(&response);
        match response.status.as_u16() {
            401 | 403 => {
                let error = ErrorBody::parse(&response);
                Err(CrmError::Auth(self.scrub(&format!(
                    "HTTP {}: {}",
                    response.status.as_u16(),
                    error.describe(&response)
                ))))
            }
            429 => Err(self.rate_limited(&response)),
            _ => Ok(response),
        }
    }

    /// A status this connector does not expect, as the shared client reports one.
    fn unexpected(&self, response: &HttpResponse) -> CrmError {
        CrmError::Http(HttpError::Status {
            target: response.target.clone(),
            status: response.status.as_u16(),
            attempts: 1,
            body: self.scrub(&response.body_snippet()),
        })
    }

    fn check_daily_quota(&self) -> Result<(), CrmError> {
        let until = *self.daily_quota_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match until {
            Some(until) if until > Utc::now() => {
                let retry_after = (until - Utc::now()).to_std().unwrap_or(Duration::from_secs(60));
                Err(CrmError::RateLimited { retry_after })
            }
            _ => Ok(()),
        }
    }

    fn close_for_the_day(&self, until: DateTime<Utc>) {
        let mut gate = self.daily_quota_until.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if gate.is_none_or(|current| current < until) {
            *gate = Some(until);
        }
        tracing::warn!(%until, "hubspot daily API quota spent; no request before it resets");
    }

    /// HubSpot reports the daily budget left on every answer; at zero, the
    /// next request would only earn a 429, so none is sent before midnight.
    fn note_daily_quota(&self, response: &HttpResponse) {
        let remaining =
            response.header("x-hubspot-ratelimit-daily-remaining").and_then(|value| value.trim().parse::<i64>().ok());
        if remaining.is_some_and(|remaining| remaining <= 0) {
            self.close_for_the_day(next_midnight_utc(Utc::now()));
        }
    }

    /// A 429 that came back to us (the shared client normally retries
    /// them): a `DAILY` policy waits for the quota reset.
    fn rate_limited(&self, response: &HttpResponse) -> CrmError {
        let error = ErrorBody::parse(response);
        let retry_after = response.retry_after();
        if error.policy_name.as_deref() == Some("DAILY") {
            let now = Utc::now();
            let until = match retry_after {
                Some(wait) => now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1)),
                None => next_midnight_utc(now),
            };
            self.close_for_the_day(until);
            let retry_after = (until - now).to_std().unwrap_or(Duration::from_secs(3600));
            return CrmError::RateLimited { retry_after };
        }
        CrmError::RateLimited { retry_after: retry_after.unwrap_or(Duration::from_secs(10)) }
    }

    /// `GET` a definition; `None` on 404.
    async fn get_optional(&self, path: &str) -> Result<Option<Value>, CrmError> {
        let response = self.call(Method::GET, path, None).await?;
        match response.status.as_u16() {
            200 => response.json().map(Some).map_err(|error| CrmError::Decode(error.to_string())),
            404 => Ok(None),
            _ => Err(self.unexpected(&response)),
        }
    }

    /// `POST` a definition; `true` when created, `false` when it existed (409).
    async fn create_definition(&self, path: &str, body: &Value) -> Result<bool, CrmError> {
        let response = self.call(Method::POST, path, Some(body)).await?;
        match response.status.as_u16() {
            200 | 201 => Ok(true),
            409 => Ok(false),
            _ => Err(self.unexpected(&response)),
        }
    }

    async fn setup_object(
        &self,
        object_type: &str,
        wanted: Vec<PropertySpec>,
        report: &mut SetupReport,
    ) -> Result<(), CrmError> {
        let group = self.group();
        let group_name = format!("{object_type}/groups/{group}");
        let group_path = format!("/crm/v3/properties/{object_type}/groups");
        if self.get_optional(&format!("{group_path}/{group}")).await?.is_some() {
            report.existing.push(group_name);
        } else {
            let body = json!({ "name": group, "label": "Tributary", "displayOrder": -1 });
            if self.create_definition(&group_path, &body).await? {
                report.created.push(group_name);
            } else {
                report.existing.push(group_name);
            }
        }

        let path = format!("/crm/v3/properties/{object_type}");
        let response = self.call(Method::GET, &path, None).await?;
        if response.status.as_u16() != 200 {
            return Err(self.unexpected(&response));
        }
        let listed: PropertyList = response.json().map_err(|error| CrmError::Decode(error.to_string()))?;
        let existing: HashMap<String, PropertyInfo> =
            listed.results.into_iter().map(|property| (property.name.clone(), property)).collect();
        for property in wanted {
            let name = format!("{object_type}/{}", property.name);
            if let Some(found) = existing.get(&property.name) {
                if property.unique && !found.has_unique_value {
                    tracing::warn!(
                        property = %name,
                        "exists without hasUniqueValue, so it cannot serve as an upsert key; \
                         delete it in HubSpot and run setup again"
                    );
                }
                report.existing.push(name);
                continue;
            }
            if self.create_definition(&path, &property.create_body(&group)).await? {
                report.created.push(name);
            } else {
                report.existing.push(name);
            }
        }
        Ok(())
    }

    /// The contact properties of one rollup. Every figure is written, empty
    /// when it has no value, so a value from an earlier rollup never stays.
    fn rollup_properties(&self, rollup: &Rollup) -> Map<String, Value> {
        let mut properties = Map::new();
        let mut set = |name: String, value: String| {
            properties.insert(name, Value::String(value));
        };
        let own = |name: &str| self.property(name);
        set(own("last_contribution_at"), note::timestamp(rollup.last_contribution_at));
        set(own("last_platform"), rollup.last_platform.clone());
        set(own("contribution_count"), rollup.contribution_count.to_string());
        set(own("platforms"), rollup.platforms.join(";"));
        if let Some(sentiment) = note::number(rollup.sentiment_avg) {
            set(own("sentiment_avg"), sentiment);
        }
        set(own("questions"), rollup.questions.to_string());
        set(own("complaints"), rollup.complaints.to_string());
        set(own("ideas"), rollup.ideas.to_string());
        set(own("praise"), rollup.praise.to_string());
        let last_url = rollup.last_url.as_deref().and_then(note::web_link).unwrap_or_default();
        set(own("last_url"), note::text_property(&last_url, ROLLUP_TEXT_MAX));
        let excerpt = rollup.last_excerpt.as_deref().unwrap_or_default();
        set(own("last_excerpt"), note::text_property(excerpt, ROLLUP_TEXT_MAX));
        set(own("contributions_90d"), rollup.count_90d.to_string());
        set(own("sentiment_90d"), rollup.sentiment_avg_90d.and_then(note::number).unwrap_or_default());
        set(own("needs_attention"), rollup.needs_attention.to_string());
        let reason = rollup.attention_reason.as_deref().unwrap_or_default();
        set(own("attention_reason"), note::text_property(reason, ROLLUP_TEXT_MAX));
        for platform in &rollup.per_platform {
            set(first_seen_property(&self.prefix, &platform.platform), note::timestamp(platform.first_seen));
            set(last_seen_property(&self.prefix, &platform.platform), note::timestamp(platform.last_seen));
            set(contributions_property(&self.prefix, &platform.platform), platform.contributions.to_string());
        }
        properties
    }

    /// Whether `merged` is already part of `survivor`, asked after HubSpot
    /// refused to merge them: yes when the survivor lists it among its
    /// merged ids, when HubSpot resolves its id to the survivor, or when it
    /// is gone while the survivor exists. `Err` when the survivor is not a
    /// contact of its own (unknown, or merged into another).
    async fn already_merged(&self, survivor: &str, merged: &str, refusal: &HttpResponse) -> Result<bool, CrmError> {
        let found = match self.contact(survivor, &[MERGED_IDS]).await? {
            Ok(found) => found,
            // HubSpot's own refusal says best what is wrong.
            Err(_) => return Err(self.unexpected(refusal)),
        };
        if found.id != survivor {
            return Err(CrmError::Unsupported(format!(
                "cannot merge HubSpot contact {merged} into {survivor}: {survivor} was itself merged into {}; \
                 link the person to {} instead",
                found.id, found.id
            )));
        }
        let listed = found.properties.get(MERGED_IDS).and_then(Value::as_str).unwrap_or_default();
        if listed.split(';').any(|id| id.trim() == merged) {
            return Ok(true);
        }
        match self.contact(merged, &[]).await? {
            // HubSpot answers for a merged id with the contact it went into.
            Ok(found) => Ok(found.id == survivor),
            Err(_) => {
                tracing::warn!(survivor, merged, "hubspot has no contact to merge; taking the merge as done");
                Ok(true)
            }
        }
    }

    /// `GET /crm/v3/objects/contacts/{id}` with the named properties; the
    /// 404 answer as `Ok(Err(_))`.
    async fn contact(&self, id: &str, properties: &[&str]) -> Result<Result<ContactAnswer, HttpResponse>, CrmError> {
        let id_segment: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
        let mut path = format!("/crm/v3/objects/contacts/{id_segment}");
        if !properties.is_empty() {
            let names: Vec<String> =
                properties.iter().map(|name| url::form_urlencoded::byte_serialize(name.as_bytes()).collect()).collect();
            path.push_str(&format!("?properties={}", names.join(",")));
        }
        let response = self.call(Method::GET, &path, None).await?;
        match response.status.as_u16() {
            200 => response.json().map(Ok).map_err(|error| CrmError::Decode(self.scrub(&error.to_string()))),
            404 => Ok(Err(response)),
            _ => Err(self.unexpected(&response)),
        }
    }

    /// Inputs of the contact upsert, one per upsert key (properties of
    /// duplicates merged); `owners[i]` is the input of contact `i`, or why
    /// it cannot be sent.
    fn contact_inputs(&self, contacts: &[ContactUpsert]) -> (Vec<BatchInput>, Vec<Result<usize, String>>) {
        let identity_property = self.property("identity");
        let mut inputs = Deduplicated::default();
        let mut owners = Vec::with_capacity(contacts.len());
        for contact in contacts {
            let email = contact.email.as_deref().map(str::trim).filter(|email| !email.is_empty());
            let (id_property, id) = match email {
                Some(email) => ("email".to_owned(), email.to_lowercase()),
                None => (identity_property.clone(), contact.identity.trim().to_owned()),
            };
            if id.is_empty() {
                owners.push(Err("the contact has neither an e-mail nor an identity".to_owned()));
                continue;
            }
            let mut properties = Map::new();
            // The person's identity on this platform, for identity resolution across platforms.
            if let Some(handle) = contact.handle.as_deref().map(str::trim).filter(|h| !h.is_empty()) {
                properties.insert(handle_property(&self.prefix, &contact.platform), json!(handle));
            }
            let platform_prefix = format!("{}:", contact.platform);
            if let Some(user_id) = contact.identity.trim().strip_prefix(&platform_prefix).filter(|id| !id.is_empty()) {
                properties.insert(user_id_property(&self.prefix, &contact.platform), json!(user_id));
            }
            if let Some(url) = contact.profile_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
                properties.insert(profile_property(&self.prefix, &contact.platform), json!(url));
            }
            if email.is_none() {
                properties.insert(identity_property.clone(), json!(id));
                if let Some(name) = contact.display_name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
                    properties.insert("firstname".into(), json!(name));
                }
            }
            let index = inputs.put((id_property.clone(), id.clone()), |trace, previous| {
                if let Some(earlier) = previous.and_then(|p| p.body["properties"].as_object()) {
                    let mut merged = earlier.clone();
                    merged.extend(properties);
                    properties = merged;
                }
                BatchInput {
                    body: json!({ "idProperty": id_property, "id": id, "properties": properties, "objectWriteTraceId": trace }),
                    names: Names::Unique { property: id_property, value: id, trace },
                }
            });
            owners.push(Ok(index));
        }
        (inputs.inputs, owners)
    }
}

/// Batch inputs with one input per key: HubSpot refuses a batch naming the
/// same id twice. A later record replaces (or merges into) an earlier one.
struct Deduplicated<K> {
    inputs: Vec<BatchInput>,
    by_key: HashMap<K, usize>,
}

impl<K> Default for Deduplicated<K> {
    fn default() -> Self {
        Deduplicated { inputs: Vec::new(), by_key: HashMap::new() }
    }
}

impl<K: std::hash::Hash + Eq> Deduplicated<K> {
    /// Stores the input `make` builds from its trace id and the input it
    /// replaces, and returns its index.
    fn put(&mut self, key: K, make: impl FnOnce(String, Option<&BatchInput>) -> BatchInput) -> usize {
        let next = self.inputs.len();
        let index = *self.by_key.entry(key).or_insert(next);
        let input = make(format!("tributary-{index}"), self.inputs.get(index));
        if index == next {
            self.inputs.push(input);
        } else {
            self.inputs[index] = input;
        }
        index
    }
}

/// The next 00:00 UTC: HubSpot resets daily quotas at midnight in the
/// account's time zone, which this approximates.
fn next_midnight_utc(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive()
        .succ_opt()
        .map(|day| day.and_time(NaiveTime::MIN).and_utc())
        .unwrap_or(now + chrono::Duration::hours(24))
}

/// The object id of a result.
fn result_id(result: &Value) -> Option<String> {
    match result.get("id") {
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        Some(Value::Number(id)) => Some(id.to_string()),
        _ => None,
    }
}

/// Spreads the outcomes of deduplicated inputs back over the records.
fn spread<T: Clone>(owners: &[Result<usize, String>], written: &[RecordOutcome<T>]) -> Vec<RecordOutcome<T>> {
    owners
        .iter()
        .map(|owner| match owner {
            Ok(index) => written
                .get(*index)
                .cloned()
                .unwrap_or_else(|| RecordOutcome::Rejected("no answer for this record".into())),
            Err(reason) => RecordOutcome::Rejected(reason.clone()),
        })
        .collect()
}

fn to_outcome(written: Written) -> RecordOutcome<String> {
    match written {
        Written::Done(result) => match result_id(&result) {
            Some(id) => RecordOutcome::Done(id),
            None => RecordOutcome::Rejected("HubSpot's answer for this record has no id".into()),
        },
        Written::Rejected(message) => RecordOutcome::Rejected(message),
    }
}

/// An error body as HubSpot sends them (the spec's `Error` plus the
/// `status`, `errorType` and `policyName` of real answers).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ErrorBody {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    policy_name: Option<String>,
    #[serde(default)]
    errors: Vec<ErrorDetail>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

impl ErrorBody {
    pub(crate) fn parse(response: &HttpResponse) -> ErrorBody {
        serde_json::from_slice(&response.body).unwrap_or_default()
    }

    /// HubSpot's message, or the body itself when it has none.
    pub(crate) fn describe(&self, response: &HttpResponse) -> String {
        match (&self.message, &self.category) {
            (Some(message), _) if !message.is_empty() => message.clone(),
            (_, Some(category)) if !category.is_empty() => category.clone(),
            _ => format!("HTTP {}: {}", response.status.as_u16(), response.body_snippet()),
        }
    }

    /// A refusal because a property does not exist: `crm setup` has not run.
    pub(crate) fn names_missing_property(&self) -> bool {
        const MISSING: &str = "PROPERTY_DOESNT_EXIST";
        self.message.as_deref().is_some_and(|m| m.contains(MISSING))
            || self.errors.iter().any(|detail| {
                detail.code.as_deref() == Some(MISSING)
                    || detail.message.as_deref().is_some_and(|m| m.contains(MISSING))
            })
    }
}

#[derive(Debug, Deserialize)]
struct PropertyList {
    #[serde(default)]
    results: Vec<PropertyInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PropertyInfo {
    name: String,
    #[serde(default)]
    has_unique_value: bool,
}

/// A contact as `GET /crm/v3/objects/contacts/{id}` and the merge answer it
/// (`SimplePublicObject`); HubSpot sends `null` for a requested property
/// without a value.
#[derive(Debug, Deserialize)]
struct ContactAnswer {
    id: String,
    #[serde(default)]
    properties: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct SearchAnswer {
    #[serde(default)]
    results: Vec<Value>,
}

#[async_trait]
impl Crm for HubSpotCrm {
    fn kind(&self) -> &'static str {
        "hubspot"
    }

    async fn check(&self) -> Result<(), CrmError> {
        let response = self.call(Method::GET, "/crm/v3/objects/contacts?limit=1&archived=false", None).await?;
        match response.status.as_u16() {
            200 => Ok(()),
            _ => Err(self.unexpected(&response)),
        }
    }

    async fn setup(&self, platforms: &[String]) -> Result<SetupReport, CrmError> {
        let mut report = SetupReport::default();
        self.setup_object(CONTACTS, contact_properties(&self.prefix, platforms), &mut report).await?;
        self.setup_object(NOTES, note_properties(&self.prefix), &mut report).await?;
        tracing::info!(created = report.created.len(), existing = report.existing.len(), "hubspot setup done");
        Ok(report)
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        let (property, value) = match lookup {
            ContactLookup::Email(email) => ("email".to_owned(), email.trim().to_owned()),
            ContactLookup::Handle { platform, handle } => {
                (handle_property(&self.prefix, platform), handle.trim().to_owned())
            }
        };
        if value.is_empty() {
            return Ok(None);
        }
        let body = json!({
            "filterGroups": [{ "filters": [{ "propertyName": property, "operator": "EQ", "value": value }] }],
            "properties": [property],
            "sorts": [],
            "limit": 1,
            "after": "0",
        });
        let response = self.call(Method::POST, "/crm/v3/objects/contacts/search", Some(&body)).await?;
        if response.status.as_u16() != 200 {
            return Err(self.unexpected(&response));
        }
        let answer: SearchAnswer = response.json().map_err(|error| CrmError::Decode(error.to_string()))?;
        Ok(answer.results.first().and_then(result_id))
    }

    async fn upsert_contacts(&self, contacts: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        if contacts.is_empty() {
            return Ok(Vec::new());
        }
        let (inputs, owners) = self.contact_inputs(contacts);
        let written = self.write_batch("/crm/v3/objects/contacts/batch/upsert", &inputs).await?;
        let written: Vec<RecordOutcome<String>> = written.into_iter().map(to_outcome).collect();
        Ok(spread(&owners, &written))
    }

    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        if activities.is_empty() {
            return Ok(Vec::new());
        }
        // One note per activity key (the last version wins), then one
        // association per (note, contact).
        let key_property = self.property("key");
        let mut notes = Deduplicated::default();
        let mut contact_of_note: Vec<String> = Vec::new();
        let mut owners = Vec::with_capacity(activities.len());
        for activity in activities {
            let key = activity.key.trim();
            if key.is_empty() {
                owners.push(Err("the activity has no key".to_owned()));
                continue;
            }
            if activity.contact_id.trim().is_empty() {
                owners.push(Err("the activity has no contact id".to_owned()));
                continue;
            }
            let properties = note::note_properties(&self.prefix, key, &activity.contribution);
            let index = notes.put(key, |trace, _| BatchInput {
                body: json!({ "idProperty": key_property, "id": key, "properties": properties, "objectWriteTraceId": trace }),
                names: Names::Unique { property: key_property.clone(), value: key.to_owned(), trace },
            });
            contact_of_note.resize(notes.inputs.len(), String::new());
            contact_of_note[index] = activity.contact_id.trim().to_owned();
            owners.push(Ok(index));
        }
        let notes = notes.inputs;

        let written = self.write_batch("/crm/v3/objects/notes/batch/upsert", &notes).await?;
        let mut outcomes: Vec<RecordOutcome<String>> = written.into_iter().map(to_outcome).collect();

        let mut pairs: Vec<BatchInput> = Vec::new();
        let mut pair_of: HashMap<(String, String), usize> = HashMap::new();
        let mut note_pair: Vec<Option<usize>> = vec![None; outcomes.len()];
        for (index, outcome) in outcomes.iter().enumerate() {
            let RecordOutcome::Done(note_id) = outcome else { continue };
            let contact_id = &contact_of_note[index];
            if contact_id.is_empty() {
                continue;
            }
            let key = (note_id.clone(), contact_id.clone());
            let pair = *pair_of.entry(key).or_insert_with(|| {
                pairs.push(BatchInput {
                    body: json!({ "from": { "id": note_id }, "to": { "id": contact_id } }),
                    names: Names::Pair { from: note_id.clone(), to: contact_id.clone() },
                });
                pairs.len() - 1
            });
            note_pair[index] = Some(pair);
        }
        let associated =
            self.write_batch("/crm/v4/associations/notes/contacts/batch/associate/default", &pairs).await?;
        for (index, outcome) in outcomes.iter_mut().enumerate() {
            if !matches!(outcome, RecordOutcome::Done(_)) {
                continue;
            }
            match note_pair[index].and_then(|pair| associated.get(pair)) {
                Some(Written::Done(_)) => {}
                Some(Written::Rejected(message)) => {
                    *outcome = RecordOutcome::Rejected(format!("the note was written but not associated: {message}"));
                }
                None => *outcome = RecordOutcome::Rejected("the note was written but not associated".into()),
            }
        }
        Ok(spread(&owners, &outcomes))
    }

    /// `POST /crm/v3/objects/notes/batch/archive` (204, into the recycling
    /// bin), 100 ids a call; HubSpot answers 204 for ids already archived.
    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        for chunk in activity_ids.chunks(batch::BATCH_LIMIT) {
            let inputs: Vec<Value> = chunk.iter().map(|id| json!({ "id": id })).collect();
            let body = json!({ "inputs": inputs });
            let response = self.call(reqwest::Method::POST, "/crm/v3/objects/notes/batch/archive", Some(&body)).await?;
            if !response.status.is_success() {
                return Err(self.unexpected(&response));
            }
        }
        Ok(vec![RecordOutcome::Done(()); activity_ids.len()])
    }

    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        if rollups.is_empty() {
            return Ok(Vec::new());
        }
        let mut inputs = Deduplicated::default();
        let mut owners = Vec::with_capacity(rollups.len());
        for rollup in rollups {
            let id = rollup.contact_id.trim();
            if id.is_empty() {
                owners.push(Err("the rollup has no contact id".to_owned()));
                continue;
            }
            let properties = self.rollup_properties(rollup);
            let index = inputs.put(id, |trace, _| BatchInput {
                body: json!({ "id": id, "properties": properties, "objectWriteTraceId": trace }),
                names: Names::Id { id: id.to_owned(), trace },
            });
            owners.push(Ok(index));
        }
        let inputs = inputs.inputs;
        let written = self.write_batch("/crm/v3/objects/contacts/batch/update", &inputs).await?;
        let written: Vec<RecordOutcome<()>> = written
            .into_iter()
            .map(|written| match written {
                Written::Done(_) => RecordOutcome::Done(()),
                Written::Rejected(message) => RecordOutcome::Rejected(message),
            })
            .collect();
        Ok(spread(&owners, &written))
    }

    /// Archives the notes, as [`Crm::archive_activities`] does: HubSpot's
    /// API deletes notes only into the recycling bin, which HubSpot purges
    /// for good after 90 days (an administrator can empty it sooner). There
    /// is no permanent deletion through the API; GDPR deletion exists for
    /// contacts only.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        self.archive_activities(activity_ids).await
    }

    /// `POST /crm/v3/objects/contacts/merge` with the survivor as
    /// `primaryObjectId`. HubSpot moves the merged contact's associations
    /// (Tributary's notes among them) to the survivor. A refusal is taken
    /// as done when the merge already happened (see `already_merged`).
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let (survivor, merged) = (survivor.trim(), merged.trim());
        if survivor.is_empty() || merged.is_empty() {
            return Err(CrmError::Unsupported("merging HubSpot contacts needs two contact ids".into()));
        }
        if survivor == merged {
            return Ok(());
        }
        let body = json!({ "primaryObjectId": survivor, "objectIdToMerge": merged });
        let response = self.call(Method::POST, "/crm/v3/objects/contacts/merge", Some(&body)).await?;
        match response.status.as_u16() {
            200 | 201 => {
                let result: ContactAnswer =
                    response.json().map_err(|error| CrmError::Decode(self.scrub(&error.to_string())))?;
                if result.id != survivor {
                    return Err(CrmError::Unsupported(format!(
                        "HubSpot merged contact {merged} into {survivor} but the result has the id {}; \
                         Tributary's links still name {survivor}: link the person to {} again",
                        result.id, result.id
                    )));
                }
                tracing::info!(survivor, merged, "hubspot contacts merged");
                Ok(())
            }
            400 | 404 | 409 => {
                if self.already_merged(survivor, merged, &response).await? {
                    tracing::info!(survivor, merged, "hubspot contacts were already merged");
                    return Ok(());
                }
                let message = self.scrub(&ErrorBody::parse(&response).describe(&response));
                tracing::debug!(survivor, merged, %message, "hubspot refused a merge");
                Err(self.unexpected(&response))
            }
            _ => Err(self.unexpected(&response)),
        }
    }

    /// `GET /crm/v3/objects/contacts/{id}?properties=...`: the requested
    /// properties that have a value (HubSpot sends `null` or nothing for the
    /// others). An unknown contact is an error.
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, CrmError> {
        let contact_id = contact_id.trim();
        let mut wanted: Vec<&str> = names.iter().map(|name| name.trim()).filter(|name| !name.is_empty()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(Default::default());
        }
        if contact_id.is_empty() {
            return Err(CrmError::Unsupported("reading HubSpot contact properties needs a contact id".into()));
        }
        let found = match self.contact(contact_id, &wanted).await? {
            Ok(found) => found,
            Err(not_found) => return Err(self.unexpected(&not_found)),
        };
        Ok(wanted
            .iter()
            .filter_map(|name| {
                let value = found.properties.get(*name)?.as_str()?;
                (!value.is_empty()).then(|| ((*name).to_owned(), value.to_owned()))
            })
            .collect())
    }
}

#[cfg(test)]
mod unit_tests {
    use chrono::TimeZone;

    use super::*;

    fn config(token_file: &std::path::Path) -> HubSpotConfig {
        HubSpotConfig {
            token: SecretRef::File(token_file.to_path_buf()),
            base_url: default_base_url(),
            property_prefix: default_prefix(),
        }
    }

    #[test]
    fn config_reads_from_toml_like_json_and_rejects_unknown_fields() {
        let parsed: HubSpotConfig = serde_json::from_value(json!({ "token": { "env": "HUBSPOT_TOKEN" } })).unwrap();
        assert_eq!(parsed.base_url.as_str(), "https://api.hubapi.com/");
        assert_eq!(parsed.property_prefix, "tributary_");
        for field in ["type", "unknown_authors", "requests_per_second"] {
            let error = serde_json::from_value::<HubSpotConfig>(json!({ "token": { "env": "T" }, field: "x" }))
                .unwrap_err()
                .to_string();
            assert!(error.contains(field), "{error}");
        }
    }

    #[test]
    fn building_checks_prefix_and_url_and_never_shows_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "pat-na1-s3cr3t-value\n").unwrap();
        let crm = new(config(&token_file), HttpOptions::default()).unwrap();
        assert_eq!(crm.kind(), "hubspot");
        assert_eq!(crm.group(), "tributary");
        let shown = format!("{crm:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert_eq!(crm.scrub("echo pat-na1-s3cr3t-value"), "echo [redacted]");

        for prefix in ["", "Trib_", "1x_", "a-b_"] {
            let mut bad = config(&token_file);
            bad.property_prefix = prefix.into();
            assert!(matches!(new(bad, HttpOptions::default()), Err(BuildError::Prefix(_))), "{prefix:?}");
        }
        let mut bad = config(&token_file);
        bad.base_url = Url::parse("ftp://api.hubapi.com").unwrap();
        assert!(matches!(new(bad, HttpOptions::default()), Err(BuildError::BaseUrl(_))));
        let missing = new(config(&dir.path().join("nope")), HttpOptions::default()).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[test]
    fn daily_quota_resets_at_the_next_midnight() {
        let now = Utc.with_ymd_and_hms(2024, 2, 28, 17, 30, 0).unwrap();
        assert_eq!(next_midnight_utc(now), Utc.with_ymd_and_hms(2024, 2, 29, 0, 0, 0).unwrap());
    }

    #[test]
    fn a_rate_limit_answer_is_read_by_policy() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "t0k3n").unwrap();
        let crm = new(config(&token_file), HttpOptions::default()).unwrap();
        let answer = |policy: &str, retry_after: Option<&str>| {
            let mut headers = reqwest::header::HeaderMap::new();
            if let Some(value) = retry_after {
                headers.insert("retry-after", value.parse().unwrap());
            }
            HttpResponse {
                status: reqwest::StatusCode::TOO_MANY_REQUESTS,
                headers,
                body: serde_json::to_vec(&json!({
                    "status": "error", "message": "You have reached your limit.", "errorType": "RATE_LIMIT",
                    "correlationId": "c", "policyName": policy,
                }))
                .unwrap(),
                target: "https://api.hubapi.com/x".into(),
            }
        };
        let secondly = crm.rate_limited(&answer("TEN_SECONDLY_ROLLING", Some("2")));
        assert_eq!(secondly.retry_after(), Some(Duration::from_secs(2)));
        assert!(crm.check_daily_quota().is_ok());
        let daily = crm.rate_limited(&answer("DAILY", None));
        let wait = daily.retry_after().unwrap();
        assert!(wait <= Duration::from_secs(86_400) && wait > Duration::ZERO, "{wait:?}");
        assert!(matches!(crm.check_daily_quota(), Err(CrmError::RateLimited { .. })));
    }
}
