//! The Twenty CRM sink.
//!
//! Twenty (<https://twenty.com>, source at `twentyhq/twenty`) serves a REST
//! API at `{base_url}/rest/...` (cloud: `https://api.twenty.com`; a
//! self-hosted server at its own URL) and takes an API key as
//! `Authorization: Bearer`. What this sink relies on, read in the server's
//! source (`packages/twenty-server/src/engine/api/rest/...`) and Twenty's
//! documentation (docs.twenty.com, "Import data via API"):
//!
//! - `POST /rest/batch/{objects}?upsert=true` takes a JSON array of records
//!   and answers 201 with `{"data": {"<objects>" | "create<Objects>": [...]}}`,
//!   the records in input order. With `upsert=true` a record updates the
//!   existing one matching its `id` or any unique field
//!   (`get-conflicting-fields.util.ts`); a person's `emails.primaryEmail` is
//!   unique (twentyhq/twenty#9920), and so is the identity field `setup`
//!   creates. The call is one transaction: one bad record fails it with a
//!   400, so a refused batch is split in halves until the bad record is
//!   alone, and the others land.
//! - A batch holds at most 60 records; a workspace may send about 100
//!   requests a minute, and a 429 says so (the shared [`HttpClient`]
//!   honours `Retry-After` and rate-limit headers and backs off otherwise).
//! - Errors are `{"statusCode": 400, "error": "BadRequestException",
//!   "messages": ["..."]}`; a refused record is `Rejected` with those
//!   messages.
//! - Contacts are people: by e-mail (`emails.primaryEmail`) when the
//!   platform gave one, else under a UUIDv5 of Tributary's identity key as
//!   the person `id`, with the identity in the unique field
//!   `<prefix>Identity`. The name of a person with an e-mail belongs to the
//!   CRM and is never written.
//! - An activity is a note (`title`, `bodyV2: {markdown}`: the rich text
//!   v1 `body` is refused by current servers, which convert the Markdown to
//!   their block format) under a UUIDv5 of the activity key, linked to its
//!   person by a noteTarget (`noteId`, `personId`) under a UUIDv5 of the
//!   pair. A replay upserts the same records and creates nothing.
//! - Archiving is `DELETE /rest/notes/{id}?soft_delete=true`, a soft
//!   delete (the answer says `softDelete: true`): the note leaves the
//!   timeline and can be restored. Current servers read `soft_delete`
//!   (`parse-soft-delete-rest-request.util.ts`): without `soft_delete=true`
//!   a REST `DELETE` destroys the record for good, so archiving names it;
//!   older servers ignore it and soft-delete anyway.
//! - Deleting for good (`delete_activities`) destroys the note's targets
//!   (`GET /rest/noteTargets?filter=noteId[eq]:"<id>"`, then
//!   `DELETE /rest/noteTargets/{id}?soft_delete=false` each), then the note
//!   (`DELETE /rest/notes/{id}?soft_delete=false`). A server answering
//!   `softDelete: true` only soft-deleted it (an older server): the note is
//!   rejected with a message rather than reported deleted. One already gone
//!   (404) is done.
//! - Rollups are written with `PATCH /rest/people/{id}`, one person a call,
//!   so that a person deleted in the CRM meanwhile is refused, not recreated
//!   empty by an upsert: the totals, the last contribution's link and
//!   excerpt (one line), the 90-day figures, the attention flag and, per
//!   platform, first and last sighting and contribution count, in the one
//!   call. A figure without a value is written `null`, so an earlier value
//!   never stays.
//! - Contact properties (for alert rules): `GET /rest/people/{id}`, answered
//!   `{"data": {"person": {...}}}`; a name may be a path into a composite
//!   field (`name.firstName`, `emails.primaryEmail`, `company.name`), and a
//!   related record reads as its `name`.
//! - Merging: current servers have `PATCH /rest/{objects}/merge` (`ids`,
//!   `conflictPriorityIndex`; `rest-api-merge-many.handler.ts`), but it is
//!   not in Twenty's REST documentation and older servers lack it, so this
//!   sink does not call it. `merge_contacts` reads both people: the merged
//!   one gone while the survivor exists is a merge made in Twenty, and is
//!   done; both present is [`CrmError::Unsupported`], saying how to merge
//!   them in Twenty.
//! - `setup` reads `GET /rest/metadata/objects` for the ids of the `person`
//!   and `note` objects and their fields, and creates what is missing with
//!   `POST /rest/metadata/fields` (`objectMetadataId`, `name`, `label`,
//!   `type` `TEXT` / `NUMBER` / `DATE_TIME`). Running it twice creates
//!   nothing.
//!
//! The API key never appears in errors, logs or `Debug` output.

mod fields;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};

use async_trait::async_trait;
use reqwest::{Method, header::ACCEPT};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tributary_sdk::{
    ActivityUpsert, ContactLookup, ContactUpsert, Crm, CrmError, HttpClient, HttpError, HttpOptions, HttpResponse,
    RecordOutcome, Rollup, SecretError, SecretRef, SetupReport,
};
use url::Url;
use uuid::Uuid;

use self::fields::{
    FieldSpec, contributions_field, field_name, first_seen_field, handle_field, last_seen_field, note_fields, note_id,
    note_record, note_target_id, number, one_line, person_fields, person_id, profile_field, timestamp, user_id_field,
    web_link,
};

const DEFAULT_BASE_URL: &str = "https://api.twenty.com";
const DEFAULT_PREFIX: &str = "tributary";
/// Twenty's limit of records per batch call.
pub(crate) const BATCH_LIMIT: usize = 60;
const PEOPLE: &str = "people";
const NOTES: &str = "notes";
const NOTE_TARGETS: &str = "noteTargets";
/// Longest text written to a rollup's one-line text fields.
const ROLLUP_TEXT_MAX: usize = 1_000;

/// Settings of the Twenty sink (the `[crm]` table with `type = "twenty"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwentyConfig {
    /// A Twenty API key (Settings → APIs & Webhooks), sent as
    /// `Authorization: Bearer`: `{ env = "TWENTY_API_KEY" }` or
    /// `{ file = "/run/credentials/tributary.service/twenty" }`. Its role
    /// must read and write people, notes and note targets and, for
    /// `crm setup`, manage the data model (custom fields).
    pub api_key: SecretRef,
    /// Root of the Twenty server: `https://api.twenty.com` for Twenty's
    /// cloud, the server's own URL when self-hosted.
    #[serde(default = "default_base_url")]
    pub base_url: Url,
    /// Prefix of every custom field Tributary creates and writes (ASCII
    /// letters and digits, starting with a lowercase letter): with the
    /// default, `tributaryIdentity`, `tributaryHandleDiscourse`, ...
    #[serde(default = "default_prefix")]
    pub field_prefix: String,
}

fn default_base_url() -> Url {
    Url::parse(DEFAULT_BASE_URL).expect("the default base URL is a valid URL")
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

/// Why a Twenty sink cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("twenty `api_key`: {0}")]
    Secret(#[from] SecretError),
    #[error("twenty `base_url` must be an http or https URL, not `{0}:`")]
    BaseUrl(String),
    #[error("twenty `field_prefix` `{0}` must be 1 to 30 ASCII letters or digits, starting with a lowercase letter")]
    Prefix(String),
    #[error("twenty http client: {0}")]
    Http(#[from] HttpError),
}

/// The Twenty sink. Cheap to share; holds one [`HttpClient`].
pub struct TwentyCrm {
    http: HttpClient,
    api_key: SecretString,
    base_url: Url,
    prefix: String,
}

impl std::fmt::Debug for TwentyCrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwentyCrm")
            .field("base_url", &self.base_url.as_str())
            .field("prefix", &self.prefix)
            .field("api_key", &"[redacted]")
            .field("http", &self.http)
            .finish()
    }
}

/// One record of a batch call and how Twenty's answer names it.
#[derive(Debug, Clone)]
struct BatchInput {
    record: Value,
    names: Names,
}

#[derive(Debug, Clone, PartialEq)]
enum Names {
    /// The record's `id`.
    Id(String),
    /// A person upserted by `emails.primaryEmail` (lowercase).
    Email(String),
}

impl Names {
    fn is_result(&self, result: &Value) -> bool {
        match self {
            Names::Id(id) => {
                result.get("id").and_then(Value::as_str).is_some_and(|found| found.eq_ignore_ascii_case(id))
            }
            Names::Email(email) => result
                .get("emails")
                .and_then(|emails| emails.get("primaryEmail"))
                .and_then(Value::as_str)
                .is_some_and(|found| found.trim().eq_ignore_ascii_case(email)),
        }
    }
}

/// What became of one record of a batch.
#[derive(Debug, Clone, PartialEq)]
enum Written {
    /// The record as Twenty returned it.
    Done(Value),
    /// Twenty's message.
    Rejected(String),
}

/// Batch inputs with one input per key: a later record merges into an
/// earlier one with the same key (Twenty would refuse or double them).
#[derive(Default)]
struct Deduplicated {
    inputs: Vec<BatchInput>,
    by_key: HashMap<String, usize>,
}

impl Deduplicated {
    fn put(&mut self, key: String, record: Map<String, Value>, names: Names) -> usize {
        match self.by_key.get(&key) {
            Some(&index) => {
                if let Some(earlier) = self.inputs[index].record.as_object_mut() {
                    earlier.extend(record);
                }
                index
            }
            None => {
                self.inputs.push(BatchInput { record: Value::Object(record), names });
                self.by_key.insert(key, self.inputs.len() - 1);
                self.inputs.len() - 1
            }
        }
    }
}

impl TwentyCrm {
    pub fn new(config: TwentyConfig, http: HttpOptions) -> Result<TwentyCrm, BuildError> {
        if !matches!(config.base_url.scheme(), "http" | "https") {
            return Err(BuildError::BaseUrl(config.base_url.scheme().to_owned()));
        }
        let prefix = config.field_prefix;
        let valid_prefix = (1..=30).contains(&prefix.len())
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix.chars().all(|c| c.is_ascii_alphanumeric());
        if !valid_prefix {
            return Err(BuildError::Prefix(prefix));
        }
        let api_key = config.api_key.resolve()?;
        let api_key = SecretString::from(api_key.expose_secret().trim().to_owned());
        Ok(TwentyCrm { http: HttpClient::new(http)?, api_key, base_url: config.base_url, prefix })
    }

    fn field(&self, name: &str) -> String {
        field_name(&self.prefix, name)
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base_url.as_str().trim_end_matches('/'))
    }

    /// Replaces the key, should a server ever echo it, in text bound for an
    /// error or a log line.
    fn scrub(&self, text: &str) -> String {
        tributary_sdk::secret::redact(text, [self.api_key.expose_secret()])
    }

    /// One authenticated request through the shared client. 401/403 become
    /// [`CrmError::Auth`], a 429 that reaches us [`CrmError::RateLimited`];
    /// every other status is the caller's to read.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<HttpResponse, CrmError> {
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(self.api_key.expose_secret())
            .header(ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = match self.http.send(request).await {
            Ok(response) => response,
            Err(HttpError::Status { target, status, attempts, body }) => {
                return Err(CrmError::Http(HttpError::Status { target, status, attempts, body: self.scrub(&body) }));
            }
            Err(HttpError::RateLimited { target, retry_after, body }) => {
                return Err(CrmError::Http(HttpError::RateLimited { target, retry_after, body: self.scrub(&body) }));
            }
            Err(error) => return Err(CrmError::Http(error)),
        };
        match response.status.as_u16() {
            401 | 403 => Err(CrmError::Auth(self.scrub(&format!(
                "HTTP {}: {}",
                response.status.as_u16(),
                error_message(&response)
            )))),
            429 => {
                let retry_after = response.retry_after().unwrap_or(std::time::Duration::from_secs(60));
                Err(CrmError::RateLimited { retry_after })
            }
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

    fn decode(&self, error: impl std::fmt::Display) -> CrmError {
        CrmError::Decode(self.scrub(&error.to_string()))
    }

    /// Twenty's message for a refused record, and whether it says that a
    /// field Tributary writes does not exist: `crm setup` has not run, an
    /// outage of every record rather than a refusal of one.
    fn refusal(&self, response: &HttpResponse) -> Result<String, CrmError> {
        let message = self.scrub(&error_message(response));
        let lower = message.to_lowercase();
        let names_ours = message.contains(&self.prefix);
        let missing = ["doesn't have", "does not have", "does not exist", "not found", "unknown", "invalid field"]
            .iter()
            .any(|marker| lower.contains(marker));
        if names_ours && missing {
            return Err(CrmError::Transient(format!(
                "Twenty does not know a field Tributary writes; run `tributary crm setup` \
                 (with every platform configured): {message}"
            )));
        }
        Ok(message)
    }

    /// Sends `inputs` to `POST /rest/batch/{object}?upsert=true` in calls of
    /// at most [`BATCH_LIMIT`] and returns one outcome per input, in order.
    async fn write_batch(&self, object: &str, inputs: &[BatchInput]) -> Result<Vec<Written>, CrmError> {
        let path = format!("/rest/batch/{object}?upsert=true");
        let mut outcomes: Vec<Option<Written>> = vec![None; inputs.len()];
        let mut pending: VecDeque<(usize, usize)> = (0..inputs.len())
            .step_by(BATCH_LIMIT)
            .map(|start| (start, (start + BATCH_LIMIT).min(inputs.len())))
            .collect();
        while let Some((start, end)) = pending.pop_front() {
            let slice = &inputs[start..end];
            let body = Value::Array(slice.iter().map(|input| input.record.clone()).collect());
            let response = self.call(Method::POST, &path, Some(&body)).await?;
            match response.status.as_u16() {
                200 | 201 => {
                    let answer: Value = response.json().map_err(|error| self.decode(error))?;
                    let records = records_in(&answer)
                        .ok_or_else(|| self.decode(format!("Twenty's answer to {path} holds no records")))?;
                    for (offset, written) in map_answer(&records, slice).into_iter().enumerate() {
                        outcomes[start + offset] = Some(written);
                    }
                }
                // A 404 is no refusal of a record: a wrong `base_url` or route.
                400 | 409 | 422 => {
                    let message = self.refusal(&response)?;
                    if slice.len() > 1 {
                        // Isolate the bad record(s): the halves go first,
                        // on their own.
                        let middle = start + slice.len() / 2;
                        pending.push_front((middle, end));
                        pending.push_front((start, middle));
                        tracing::debug!(object, records = slice.len(), "twenty refused a batch; splitting it");
                    } else {
                        tracing::debug!(object, %message, "twenty refused a record");
                        outcomes[start] = Some(Written::Rejected(message));
                    }
                }
                _ => return Err(self.unexpected(&response)),
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Written::Rejected("not sent".into())))
            .collect())
    }

    /// `GET` a list of records or metadata items.
    async fn get_list(&self, path: &str) -> Result<Vec<Value>, CrmError> {
        let response = self.call(Method::GET, path, None).await?;
        if response.status.as_u16() != 200 {
            return Err(self.unexpected(&response));
        }
        let answer: Value = response.json().map_err(|error| self.decode(error))?;
        records_in(&answer).ok_or_else(|| self.decode(format!("Twenty's answer to {path} holds no list")))
    }

    async fn setup_object(
        &self,
        objects: &[Value],
        name_singular: &str,
        wanted: Vec<FieldSpec>,
        report: &mut SetupReport,
    ) -> Result<(), CrmError> {
        let object = objects
            .iter()
            .find(|object| object.get("nameSingular").and_then(Value::as_str) == Some(name_singular))
            .ok_or_else(|| self.decode(format!("Twenty's data model has no `{name_singular}` object")))?;
        let object_id = object
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| self.decode(format!("the `{name_singular}` object has no id")))?;
        let existing: HashSet<String> = object
            .get("fields")
            .and_then(list_in)
            .unwrap_or_default()
            .iter()
            .filter_map(|field| field.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        for field in wanted {
            let name = format!("{name_singular}.{}", field.name);
            if existing.contains(&field.name) {
                report.existing.push(name);
                continue;
            }
            let response =
                self.call(Method::POST, "/rest/metadata/fields", Some(&field.create_body(object_id))).await?;
            match response.status.as_u16() {
                200 | 201 => report.created.push(name),
                400 | 409 | 422 => {
                    let message = self.scrub(&error_message(&response));
                    let lower = message.to_lowercase();
                    // A field created meanwhile, or one the listing left out.
                    if lower.contains("already exist") || lower.contains("not available") {
                        report.existing.push(name);
                    } else {
                        return Err(CrmError::Transient(format!(
                            "Twenty refused to create the field {name}: {message}"
                        )));
                    }
                }
                _ => return Err(self.unexpected(&response)),
            }
        }
        Ok(())
    }

    /// The people of the contact upsert, one per upsert key; `owners[i]` is
    /// the input of contact `i`, or why it cannot be sent.
    fn contact_inputs(&self, contacts: &[ContactUpsert]) -> (Vec<BatchInput>, Vec<Result<usize, String>>) {
        let mut inputs = Deduplicated::default();
        let mut owners = Vec::with_capacity(contacts.len());
        for contact in contacts {
            let email =
                contact.email.as_deref().map(str::trim).filter(|email| !email.is_empty()).map(str::to_lowercase);
            let identity = contact.identity.trim();
            let mut record = Map::new();
            let (key, names) = match &email {
                Some(email) => {
                    record.insert("emails".into(), json!({ "primaryEmail": email }));
                    (format!("email:{email}"), Names::Email(email.clone()))
                }
                None if !identity.is_empty() => {
                    let id = person_id(identity).to_string();
                    record.insert("id".into(), json!(id));
                    record.insert(self.field("identity"), json!(identity));
                    let name = [contact.display_name.as_deref(), contact.handle.as_deref()]
                        .into_iter()
                        .flatten()
                        .map(str::trim)
                        .find(|name| !name.is_empty());
                    if let Some(name) = name {
                        record.insert("name".into(), json!({ "firstName": name, "lastName": "" }));
                    }
                    (format!("id:{id}"), Names::Id(id))
                }
                None => {
                    owners.push(Err("the contact has neither an e-mail nor an identity".to_owned()));
                    continue;
                }
            };
            if let Some(handle) = contact.handle.as_deref().map(str::trim).filter(|h| !h.is_empty()) {
                record.insert(handle_field(&self.prefix, &contact.platform), json!(handle));
            }
            let platform_prefix = format!("{}:", contact.platform);
            if let Some(user_id) = identity.strip_prefix(&platform_prefix).filter(|id| !id.is_empty()) {
                record.insert(user_id_field(&self.prefix, &contact.platform), json!(user_id));
            }
            if let Some(url) = contact.profile_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
                record.insert(profile_field(&self.prefix, &contact.platform), json!(url));
            }
            owners.push(Ok(inputs.put(key, record, names)));
        }
        (inputs.inputs, owners)
    }

    fn rollup_fields(&self, rollup: &Rollup) -> Value {
        let mut record = Map::new();
        let mut set = |name: &str, value: Value| {
            record.insert(self.field(name), value);
        };
        set("lastContributionAt", json!(timestamp(rollup.last_contribution_at)));
        set("lastPlatform", json!(rollup.last_platform));
        set("contributionCount", json!(rollup.contribution_count));
        set("platforms", json!(rollup.platforms.join(";")));
        if let Some(sentiment) = number(rollup.sentiment_avg) {
            set("sentimentAvg", sentiment);
        }
        set("questions", json!(rollup.questions));
        set("complaints", json!(rollup.complaints));
        set("ideas", json!(rollup.ideas));
        set("praise", json!(rollup.praise));
        set("lastUrl", json!(rollup.last_url.as_deref().and_then(web_link)));
        let excerpt =
            rollup.last_excerpt.as_deref().map(|text| one_line(text, ROLLUP_TEXT_MAX)).filter(|t| !t.is_empty());
        set("lastExcerpt", json!(excerpt));
        set("contributions90d", json!(rollup.count_90d));
        set("sentiment90d", rollup.sentiment_avg_90d.and_then(number).unwrap_or(Value::Null));
        set("needsAttention", json!(rollup.needs_attention));
        let reason =
            rollup.attention_reason.as_deref().map(|text| one_line(text, ROLLUP_TEXT_MAX)).filter(|t| !t.is_empty());
        set("attentionReason", json!(reason));
        for platform in &rollup.per_platform {
            record.insert(first_seen_field(&self.prefix, &platform.platform), json!(timestamp(platform.first_seen)));
            record.insert(last_seen_field(&self.prefix, &platform.platform), json!(timestamp(platform.last_seen)));
            record.insert(contributions_field(&self.prefix, &platform.platform), json!(platform.contributions));
        }
        Value::Object(record)
    }

    /// `GET /rest/people/{id}`: the person, or `None` when Twenty has none
    /// (404, also for one deleted).
    async fn person(&self, id: &Uuid) -> Result<Option<Map<String, Value>>, CrmError> {
        let response = self.call(Method::GET, &format!("/rest/{PEOPLE}/{id}"), None).await?;
        match response.status.as_u16() {
            200 => {
                let answer: Value = response.json().map_err(|error| self.decode(error))?;
                let data = answer.get("data").and_then(Value::as_object);
                // `{"data": {"person": {...}}}`; a bare record under `data` is taken too.
                let person = data.and_then(|data| match data.get("person") {
                    Some(Value::Object(person)) => Some(person.clone()),
                    _ => data.contains_key("id").then(|| data.clone()),
                });
                person.map(Some).ok_or_else(|| self.decode(format!("Twenty's answer for person {id} holds no person")))
            }
            404 => Ok(None),
            400 | 422 if error_message(&response).to_lowercase().contains("not found") => Ok(None),
            _ => Err(self.unexpected(&response)),
        }
    }

    /// Destroys one record for good (`DELETE /rest/{object}/{id}?soft_delete=false`):
    /// `Ok(true)` when destroyed or already gone, `Ok(false)` when the server
    /// only soft-deleted it, `Err` with Twenty's message when refused.
    async fn destroy(&self, object: &str, id: &Uuid) -> Result<Result<bool, String>, CrmError> {
        let response = self.call(Method::DELETE, &format!("/rest/{object}/{id}?soft_delete=false"), None).await?;
        match response.status.as_u16() {
            200 | 204 => {
                let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                Ok(Ok(answer.get("softDelete").and_then(Value::as_bool) != Some(true)))
            }
            404 => Ok(Ok(true)),
            400 | 409 | 422 => {
                let message = self.scrub(&error_message(&response));
                Ok(if message.to_lowercase().contains("not found") { Ok(true) } else { Err(message) })
            }
            _ => Err(self.unexpected(&response)),
        }
    }

    /// Destroys a note's targets, then the note.
    async fn destroy_note(&self, id: &Uuid) -> Result<RecordOutcome<()>, CrmError> {
        let filter = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("filter", &format!("noteId[eq]:\"{id}\""))
            .append_pair("limit", &BATCH_LIMIT.to_string())
            .finish();
        let targets = self.get_list(&format!("/rest/{NOTE_TARGETS}?{filter}")).await?;
        for target in targets.iter().filter_map(record_id) {
            let Ok(target) = Uuid::parse_str(&target) else { continue };
            match self.destroy(NOTE_TARGETS, &target).await? {
                Ok(_) => {}
                Err(message) => {
                    return Ok(RecordOutcome::Rejected(format!("Twenty refused to delete the note's link: {message}")));
                }
            }
        }
        Ok(match self.destroy(NOTES, id).await? {
            Ok(true) => RecordOutcome::Done(()),
            Ok(false) => RecordOutcome::Rejected(
                "this Twenty server only soft-deleted the note (its REST API ignores `soft_delete=false`): \
                 destroy it in Twenty (Notes → Deleted), or upgrade Twenty, or use forget_activities = \"archive\""
                    .into(),
            ),
            Err(message) => RecordOutcome::Rejected(message),
        })
    }
}

/// Twenty's message from an error body (`messages[]`, `message`, `error`,
/// or GraphQL-style `errors[].message`), or the body itself.
fn error_message(response: &HttpResponse) -> String {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    let texts = |value: Option<&Value>| -> Vec<String> {
        match value {
            Some(Value::String(text)) if !text.trim().is_empty() => vec![text.trim().to_owned()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|item| match item {
                    Value::String(text) => Some(text.trim().to_owned()),
                    other => other.get("message").and_then(Value::as_str).map(|text| text.trim().to_owned()),
                })
                .filter(|text| !text.is_empty())
                .collect(),
            _ => Vec::new(),
        }
    };
    for candidate in ["messages", "message", "errors", "error"] {
        let found = texts(body.get(candidate));
        if !found.is_empty() {
            return found.join("; ");
        }
    }
    format!("HTTP {}: {}", response.status.as_u16(), response.body_snippet())
}

/// The items of a list: an array, or `{"edges": [{"node": ...}]}`.
fn list_in(value: &Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) => Some(items.iter().map(|item| item.get("node").unwrap_or(item).clone()).collect()),
        Value::Object(fields) => fields.get("edges").and_then(list_in),
        _ => None,
    }
}

/// The records of an answer: `data` itself when it is a list, else the
/// first list under it (`{"data": {"people": [...]}}`,
/// `{"data": {"createPeople": [...]}}`, `{"data": {"objects": [...]}}`).
fn records_in(answer: &Value) -> Option<Vec<Value>> {
    let data = answer.get("data")?;
    list_in(data).or_else(|| data.as_object()?.values().find_map(list_in))
}

/// Maps the records of a 201 onto `inputs`: by id or e-mail, then, for
/// records naming nothing we sent, by position (Twenty answers in order).
fn map_answer(records: &[Value], inputs: &[BatchInput]) -> Vec<Written> {
    let mut outcomes: Vec<Option<Written>> = vec![None; inputs.len()];
    let mut claimed = vec![false; records.len()];
    for (input, outcome) in inputs.iter().zip(outcomes.iter_mut()) {
        let found =
            records.iter().enumerate().find(|(index, record)| !claimed[*index] && input.names.is_result(record));
        if let Some((index, record)) = found {
            claimed[index] = true;
            *outcome = Some(Written::Done(record.clone()));
        }
    }
    let unmatched: Vec<usize> = (0..inputs.len()).filter(|i| outcomes[*i].is_none()).collect();
    let unclaimed: Vec<usize> = (0..records.len()).filter(|i| !claimed[*i]).collect();
    if !unmatched.is_empty() && unmatched.len() == unclaimed.len() {
        for (input, record) in unmatched.iter().zip(&unclaimed) {
            outcomes[*input] = Some(Written::Done(records[*record].clone()));
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| {
            outcome.unwrap_or_else(|| Written::Rejected("Twenty's answer holds no record for this input".into()))
        })
        .collect()
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

/// A field value as text: strings as they are, numbers and booleans
/// written out, a related record as its `name`, a full name as its parts,
/// a list of values joined by `; `; `None` for null and empty values.
fn property_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(text) => text.clone(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        Value::Array(items) => items.iter().filter_map(property_text).collect::<Vec<_>>().join("; "),
        Value::Object(fields) => match fields.get("name") {
            Some(name) => return property_text(name),
            None if fields.contains_key("firstName") || fields.contains_key("lastName") => {
                let parts =
                    ["firstName", "lastName"].map(|part| fields.get(part).and_then(Value::as_str).unwrap_or(""));
                parts.iter().map(|part| part.trim()).filter(|part| !part.is_empty()).collect::<Vec<_>>().join(" ")
            }
            None => value.to_string(),
        },
    };
    Some(text).filter(|text| !text.trim().is_empty())
}

/// The value at a dotted path of a record (`emails.primaryEmail`), each
/// step matched exactly, else ignoring case.
fn value_at<'a>(record: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let step = |fields: &'a Map<String, Value>, part: &str| {
        fields.get(part).or_else(|| fields.iter().find(|(name, _)| name.eq_ignore_ascii_case(part)).map(|(_, v)| v))
    };
    let mut value = step(record, parts.next()?)?;
    for part in parts {
        value = step(value.as_object()?, part)?;
    }
    Some(value)
}

fn record_id(record: &Value) -> Option<String> {
    record.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()).map(str::to_owned)
}

/// A filter value as Twenty's REST filter reads it (quoted; quotes inside
/// cannot be escaped, so such a value finds nothing).
fn filter_value(value: &str) -> Option<String> {
    (!value.is_empty() && !value.contains(['"', '\'', '\\'])).then(|| format!("\"{value}\""))
}

#[async_trait]
impl Crm for TwentyCrm {
    fn kind(&self) -> &'static str {
        "twenty"
    }

    async fn check(&self) -> Result<(), CrmError> {
        let response = self.call(Method::GET, "/rest/people?limit=1", None).await?;
        match response.status.as_u16() {
            200 => Ok(()),
            _ => Err(self.unexpected(&response)),
        }
    }

    async fn setup(&self, platforms: &[String]) -> Result<SetupReport, CrmError> {
        let objects = self.get_list("/rest/metadata/objects").await?;
        let mut report = SetupReport::default();
        self.setup_object(&objects, "person", person_fields(&self.prefix, platforms), &mut report).await?;
        self.setup_object(&objects, "note", note_fields(&self.prefix), &mut report).await?;
        tracing::info!(created = report.created.len(), existing = report.existing.len(), "twenty setup done");
        Ok(report)
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        let (field, value) = match lookup {
            ContactLookup::Email(email) => ("emails.primaryEmail".to_owned(), email.trim().to_lowercase()),
            ContactLookup::Handle { platform, handle } => {
                (handle_field(&self.prefix, platform), handle.trim().to_owned())
            }
        };
        let Some(value) = filter_value(&value) else {
            return Ok(None);
        };
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("filter", &format!("{field}[eq]:{value}"))
            .append_pair("limit", "1")
            .finish();
        let people = self.get_list(&format!("/rest/people?{query}")).await?;
        Ok(people.first().and_then(record_id))
    }

    async fn upsert_contacts(&self, contacts: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        if contacts.is_empty() {
            return Ok(Vec::new());
        }
        let (inputs, owners) = self.contact_inputs(contacts);
        let written: Vec<RecordOutcome<String>> = self
            .write_batch(PEOPLE, &inputs)
            .await?
            .into_iter()
            .map(|written| match written {
                Written::Done(record) => match record_id(&record) {
                    Some(id) => RecordOutcome::Done(id),
                    None => RecordOutcome::Rejected("Twenty's answer for this person has no id".into()),
                },
                Written::Rejected(message) => RecordOutcome::Rejected(message),
            })
            .collect();
        Ok(spread(&owners, &written))
    }

    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        if activities.is_empty() {
            return Ok(Vec::new());
        }
        // One note per note id (the last version wins), then one target per
        // (note, person).
        let mut notes = Deduplicated::default();
        let mut person_of_note: Vec<Uuid> = Vec::new();
        let mut owners = Vec::with_capacity(activities.len());
        for activity in activities {
            let key = activity.key.trim();
            if key.is_empty() {
                owners.push(Err("the activity has no key".to_owned()));
                continue;
            }
            let Ok(person) = Uuid::parse_str(activity.contact_id.trim()) else {
                owners.push(Err(format!("the contact id `{}` is not a Twenty record id", activity.contact_id.trim())));
                continue;
            };
            // The id it was delivered under before, else the deterministic one.
            let id = activity
                .existing_id
                .as_deref()
                .and_then(|id| Uuid::parse_str(id.trim()).ok())
                .unwrap_or_else(|| note_id(key));
            let Value::Object(record) = note_record(&self.prefix, &id, key, &activity.contribution) else {
                owners.push(Err("the note could not be built".to_owned()));
                continue;
            };
            let index = notes.put(id.to_string(), record, Names::Id(id.to_string()));
            person_of_note.resize(notes.inputs.len(), Uuid::nil());
            person_of_note[index] = person;
            owners.push(Ok(index));
        }
        let written = self.write_batch(NOTES, &notes.inputs).await?;
        let mut outcomes: Vec<RecordOutcome<String>> = written
            .into_iter()
            .map(|written| match written {
                Written::Done(record) => match record_id(&record) {
                    Some(id) => RecordOutcome::Done(id),
                    None => RecordOutcome::Rejected("Twenty's answer for this note has no id".into()),
                },
                Written::Rejected(message) => RecordOutcome::Rejected(message),
            })
            .collect();

        let mut targets = Deduplicated::default();
        let mut target_of_note: Vec<Option<usize>> = vec![None; outcomes.len()];
        for (index, outcome) in outcomes.iter().enumerate() {
            let RecordOutcome::Done(note) = outcome else { continue };
            let Ok(note) = Uuid::parse_str(note) else { continue };
            let person = person_of_note[index];
            let id = note_target_id(&note, &person).to_string();
            let mut record = Map::new();
            record.insert("id".into(), json!(id));
            record.insert("noteId".into(), json!(note.to_string()));
            record.insert("personId".into(), json!(person.to_string()));
            target_of_note[index] = Some(targets.put(id.clone(), record, Names::Id(id)));
        }
        let linked = self.write_batch(NOTE_TARGETS, &targets.inputs).await?;
        for (index, outcome) in outcomes.iter_mut().enumerate() {
            if !matches!(outcome, RecordOutcome::Done(_)) {
                continue;
            }
            match target_of_note[index].and_then(|target| linked.get(target)) {
                Some(Written::Done(_)) => {}
                Some(Written::Rejected(message)) => {
                    *outcome = RecordOutcome::Rejected(format!(
                        "the note was written but not linked to its person: {message}"
                    ));
                }
                None => *outcome = RecordOutcome::Rejected("the note was written but not linked to its person".into()),
            }
        }
        Ok(spread(&owners, &outcomes))
    }

    /// `DELETE /rest/notes/{id}?soft_delete=true`, a soft delete; a note
    /// already gone is done.
    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut outcomes = Vec::with_capacity(activity_ids.len());
        for id in activity_ids {
            let Ok(id) = Uuid::parse_str(id.trim()) else {
                outcomes.push(RecordOutcome::Rejected(format!("`{}` is not a Twenty record id", id.trim())));
                continue;
            };
            let response = self.call(Method::DELETE, &format!("/rest/{NOTES}/{id}?soft_delete=true"), None).await?;
            let outcome = match response.status.as_u16() {
                200 | 204 | 404 => RecordOutcome::Done(()),
                400 | 409 | 422 => {
                    let message = self.scrub(&error_message(&response));
                    if message.to_lowercase().contains("not found") {
                        RecordOutcome::Done(())
                    } else {
                        RecordOutcome::Rejected(message)
                    }
                }
                _ => return Err(self.unexpected(&response)),
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// `PATCH /rest/people/{id}`, one person a call (Twenty's REST API has
    /// no batch update of different values).
    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        // The last rollup of a person wins; it is sent once.
        let mut last: HashMap<String, usize> = HashMap::new();
        for (index, rollup) in rollups.iter().enumerate() {
            last.insert(rollup.contact_id.trim().to_owned(), index);
        }
        let mut sent: HashMap<String, RecordOutcome<()>> = HashMap::new();
        let mut outcomes = Vec::with_capacity(rollups.len());
        for rollup in rollups {
            let id = rollup.contact_id.trim();
            let Ok(uuid) = Uuid::parse_str(id) else {
                outcomes.push(RecordOutcome::Rejected(format!("the contact id `{id}` is not a Twenty record id")));
                continue;
            };
            if let Some(outcome) = sent.get(id) {
                outcomes.push(outcome.clone());
                continue;
            }
            let latest = last.get(id).and_then(|index| rollups.get(*index)).unwrap_or(rollup);
            let body = self.rollup_fields(latest);
            let response = self.call(Method::PATCH, &format!("/rest/{PEOPLE}/{uuid}"), Some(&body)).await?;
            let outcome = match response.status.as_u16() {
                200 | 201 | 204 => RecordOutcome::Done(()),
                400 | 404 | 409 | 422 => RecordOutcome::Rejected(self.refusal(&response)?),
                _ => return Err(self.unexpected(&response)),
            };
            sent.insert(id.to_owned(), outcome.clone());
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Destroys the notes Tributary created, their targets first (see the
    /// module documentation); a note already gone is done.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut outcomes = Vec::with_capacity(activity_ids.len());
        for id in activity_ids {
            let Ok(id) = Uuid::parse_str(id.trim()) else {
                outcomes.push(RecordOutcome::Rejected(format!("`{}` is not a Twenty record id", id.trim())));
                continue;
            };
            outcomes.push(self.destroy_note(&id).await?);
        }
        Ok(outcomes)
    }

    /// Twenty's documented REST API has no merge: this reads both people,
    /// and takes the merge as done when `merged` is gone while `survivor`
    /// exists (a merge made in Twenty deletes the merged person and moves
    /// its notes to the one kept).
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let (survivor, merged) = (survivor.trim(), merged.trim());
        let (Ok(survivor_id), Ok(merged_id)) = (Uuid::parse_str(survivor), Uuid::parse_str(merged)) else {
            return Err(CrmError::Unsupported(format!(
                "cannot merge Twenty people `{survivor}` and `{merged}`: not Twenty record ids"
            )));
        };
        if survivor_id == merged_id {
            return Ok(());
        }
        if self.person(&survivor_id).await?.is_none() {
            return Err(CrmError::Unsupported(format!(
                "cannot merge Twenty person {merged} into {survivor}: Twenty has no person {survivor}"
            )));
        }
        if self.person(&merged_id).await?.is_none() {
            tracing::info!(survivor, merged, "the person to merge is gone from twenty; taking the merge as done");
            return Ok(());
        }
        Err(CrmError::Unsupported(format!(
            "Twenty's REST API has no documented merge: merge person {merged} into {survivor} in Twenty (People → \
             select both → Merge records, keeping {survivor}), then run the same `tributary identity link` (or \
             `tributary identity approve`) again: Tributary then sees the merge and moves its records to {survivor}"
        )))
    }

    /// `GET /rest/people/{id}`: the named fields that have a value. A name
    /// may be a path into a composite field or a related record
    /// (`emails.primaryEmail`, `company.name`).
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, CrmError> {
        let wanted = tributary_sdk::crm::property_names(names);
        if wanted.is_empty() {
            return Ok(Default::default());
        }
        let Ok(id) = Uuid::parse_str(contact_id.trim()) else {
            return Err(CrmError::Unsupported(format!(
                "cannot read the properties of `{}`: not a Twenty record id",
                contact_id.trim()
            )));
        };
        let Some(person) = self.person(&id).await? else {
            return Err(CrmError::Transient(format!("Twenty has no person {id}")));
        };
        Ok(wanted
            .iter()
            .filter_map(|name| Some(((*name).to_owned(), property_text(value_at(&person, name)?)?)))
            .collect())
    }
}
