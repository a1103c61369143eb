//! The Pipedrive CRM sink (API v1: persons, notes, person fields).
//!
//! What it relies on, from Pipedrive's developer documentation
//! (developers.pipedrive.com/docs/api/v1, pipedrive.readme.io "Authentication",
//! "Rate limiting", "Custom fields", and the official `client-nodejs` API docs):
//!
//! - **Root**: `https://{company_domain}.pipedrive.com/api/v1`. Every answer
//!   is `{"success": true, "data": ...}`; a refusal is
//!   `{"success": false, "error": "...", "error_info": "..."}` with 400, 404,
//!   410 or 422; 401/403 refuse the token.
//! - **Auth**: the API token in the `x-api-token` header, never the
//!   `api_token` query parameter (a URL ends up in proxies' and our logs).
//!   The token belongs to one user and sees what that user sees.
//! - **Contacts** are persons. `GET /persons/search?term=..&fields=email&exact_match=true`
//!   finds one by e-mail, `fields=custom_fields` by Tributary's identity
//!   (`platform:author id`) kept in a custom field; answers are
//!   `data.items[].item.id`. The search runs on an index that may lag behind
//!   writes, so within one call the ids found or created are remembered.
//!   Then `POST /persons` (`name`, `email: [{value, primary}]`, custom
//!   fields by key) or `PUT /persons/{id}`. The name of a person matched by
//!   e-mail belongs to the CRM and is never overwritten.
//! - **Custom fields** are addressed by their generated 40-character `key`,
//!   read from `GET /personFields` (paged with `start`/`limit`,
//!   `additional_data.pagination.more_items_in_collection`) and cached by
//!   name. `setup` creates the missing ones with `POST /personFields`
//!   (`name`, `field_type`).
//! - **Activities** are notes on the person (`POST /notes` with `content`
//!   and `person_id`). `content` is HTML that Pipedrive sanitises and
//!   renders: every text is escaped (see [`note`]) and the note carries the
//!   activity key as a visible marker. There is no upsert by key: with the
//!   ledger's `existing_id` the note is updated (`PUT /notes/{id}`; a 404
//!   means someone deleted it, so it is written again); without it the
//!   person's notes are listed (`GET /notes?person_id=..`, a plain database
//!   list, not the lagging index) and a note carrying the marker is updated
//!   instead of creating another. That covers an ambiguous failure (a
//!   timeout after Pipedrive stored the note): `POST` is never retried
//!   blindly, only after a 429 (which Pipedrive answers before doing
//!   anything); a timeout or 5xx on a `POST` is returned as an error and the
//!   next delivery finds what it may have created.
//! - **Archive**: Pipedrive has no archive for notes, so archiving deletes
//!   them (`DELETE /notes/{id}`; Pipedrive keeps deleted items restorable
//!   for a while in its own recovery). A 404 or 410 is done.
//!   `delete_activities` does the same: deletion is all Pipedrive offers.
//! - **Rollups** are person custom fields, all written with one
//!   `PUT /persons/{id}`: the totals, the last contribution's URL and
//!   excerpt (large text, one line), the 90-day count and sentiment, the
//!   attention flag (an `enum` field with the options `Yes` and `No`, written
//!   by option id: Pipedrive has no yes/no type) and its reason, and per
//!   platform the first and last sighting and the count, in fields named like
//!   the handle fields. A figure without a value is written `null`, so an
//!   old value never stays.
//! - **Merging**: `PUT /persons/{merged}/merge` with `merge_with_id` set to
//!   the survivor. Per Pipedrive's "Merging two persons" tutorial, the
//!   person of `merge_with_id` is kept (its id, and its values where both
//!   have one) and the person in the path is removed; notes, activities,
//!   deals, e-mails and files move to the one kept. Merging again is done
//!   when the merged person is gone (or inactive) and the survivor is there.
//! - **Contact properties**: `GET /persons/{id}`, read by key (`org_name`,
//!   `owner_name`, `label`) or by a person field's name as shown in
//!   Pipedrive (built-in or custom); option ids become their labels.
//! - **No batch API**: one request per record; a record refused with
//!   400/422 is [`RecordOutcome::Rejected`] with Pipedrive's `error` and
//!   `error_info` while the others land.
//! - **Limits**: a burst limit per 2-second window (`x-ratelimit-limit`,
//!   `x-ratelimit-remaining`, `x-ratelimit-reset` in seconds) and 429 with
//!   `Retry-After`, both honoured by the shared [`HttpClient`]; and a daily
//!   budget of `POST`/`PUT` requests for API-token integrations, counted per
//!   UTC day, reported in `x-daily-requests-left`. At 0, this sink holds
//!   every request until the next 00:00 UTC (reads too: without writes the
//!   daemon cannot make progress anyway), and the caller gets
//!   [`CrmError`] with a `retry_after` until then.
//!
//! The token never appears in errors, logs or `Debug` output: it is sent as
//! a sensitive header, and any text a server echoes back is scrubbed.

mod fields;
mod note;

#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, NaiveTime, Utc};
use reqwest::{
    Method,
    header::{ACCEPT, HeaderValue},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tributary_sdk::{
    ActivityUpsert, ContactLookup, ContactUpsert, Crm, CrmError, HttpClient, HttpError, HttpOptions, HttpResponse,
    RecordOutcome, Rollup, SecretError, SecretRef, SetupReport,
};
use url::Url;

use self::fields::{handle_field, person_fields, profile_field};

/// Page size of list requests (Pipedrive allows up to 500).
const PAGE_LIMIT: usize = 500;
/// A guard against a server that always says there is more.
const MAX_PAGES: usize = 200;
/// The most characters of the rollups' large-text fields (last URL and excerpt).
const ROLLUP_TEXT_MAX: usize = 1_000;
/// The most characters of a `varchar` field.
const VARCHAR_MAX: usize = 255;

/// Settings of the Pipedrive sink (the `[crm]` table with `type = "pipedrive"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipedriveConfig {
    /// The personal API token of the Pipedrive user Tributary writes as
    /// (Settings → Personal preferences → API), sent as the `x-api-token`
    /// header: `{ env = "PIPEDRIVE_API_TOKEN" }` or
    /// `{ file = "/run/credentials/tributary.service/pipedrive" }`. The user
    /// must be allowed to add and edit persons and notes, and to add custom
    /// fields for `crm setup` (an admin, or a permission set with
    /// "add custom fields").
    pub api_token: SecretRef,
    /// The company subdomain: `acme` for `https://acme.pipedrive.com`. The
    /// API root is then `https://acme.pipedrive.com/api/v1`. Give this or
    /// `base_url`.
    #[serde(default)]
    pub company_domain: Option<String>,
    /// An explicit API root such as `https://acme.pipedrive.com/api/v1`,
    /// for a proxy or a test mock; replaces `company_domain`.
    #[serde(default)]
    pub base_url: Option<Url>,
}

/// Why a Pipedrive sink cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("pipedrive `api_token`: {0}")]
    Secret(#[from] SecretError),
    #[error("pipedrive `api_token` holds characters that cannot be sent in an HTTP header")]
    TokenFormat,
    #[error("pipedrive: set exactly one of `company_domain` and `base_url`")]
    Root,
    #[error("pipedrive `company_domain` `{0}` must be the subdomain alone (letters, digits, `-`), e.g. `acme`")]
    CompanyDomain(String),
    #[error("pipedrive `base_url` must be an http or https URL, not `{0}:`")]
    BaseUrl(String),
    #[error("pipedrive http client: {0}")]
    Http(#[from] HttpError),
}

/// The Pipedrive sink. Cheap to share; its two HTTP clients share one
/// rate budget.
pub struct PipedriveCrm {
    /// For requests safe to repeat (GET, PUT, DELETE): retries 429, 5xx, timeouts.
    http: HttpClient,
    /// For `POST`: no blind retry (see the module documentation).
    token: SecretString,
    token_header: HeaderValue,
    base_url: Url,
    /// The person fields, read from `GET /personFields`.
    fields: Mutex<Option<Arc<FieldIndex>>>,
}

/// What `GET /personFields` says about the person fields.
#[derive(Debug, Default)]
struct FieldIndex {
    /// Field name -> key.
    keys: Arc<HashMap<String, String>>,
    /// Field key -> option id -> label, for `enum` and `set` fields
    /// (the built-in `label` among them).
    options: HashMap<String, HashMap<String, String>>,
}

impl FieldIndex {
    fn read(listed: &[Value]) -> FieldIndex {
        let mut keys = HashMap::new();
        let mut options = HashMap::new();
        for field in listed {
            let (Some(name), Some(key)) = (field["name"].as_str(), field["key"].as_str()) else { continue };
            keys.insert(name.to_owned(), key.to_owned());
            let labels: HashMap<String, String> = field["options"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|option| Some((scalar_text(&option["id"])?, option["label"].as_str()?.to_owned())))
                .collect();
            if !labels.is_empty() {
                options.insert(key.to_owned(), labels);
            }
        }
        FieldIndex { keys: Arc::new(keys), options }
    }

    /// The key of the field named `name`, the exact name first, else
    /// ignoring case.
    fn key_of(&self, name: &str) -> Option<&str> {
        self.keys
            .get(name)
            .or_else(|| self.keys.iter().find(|(field, _)| field.eq_ignore_ascii_case(name)).map(|(_, key)| key))
            .map(String::as_str)
    }

    /// The id of the option labelled `label` of the field with `key`.
    fn option_id(&self, key: &str, label: &str) -> Option<&str> {
        let options = self.options.get(key)?;
        options.iter().find(|(_, text)| text.trim().eq_ignore_ascii_case(label)).map(|(id, _)| id.as_str())
    }
}

impl std::fmt::Debug for PipedriveCrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipedriveCrm")
            .field("base_url", &self.base_url.as_str())
            .field("api_token", &"[redacted]")
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

/// Builds the Pipedrive sink: resolves the token and creates its HTTP clients.
pub fn new(config: PipedriveConfig, http: HttpOptions) -> Result<PipedriveCrm, BuildError> {
    PipedriveCrm::new(config, http)
}

/// How Pipedrive answered one record's request.
enum Answer {
    /// 2xx with `success: true`: the `data`.
    Data(Value),
    /// 400/422 or `success: false`: Pipedrive's message.
    Refused(String),
    /// 404/410: the record is not there.
    Missing(String),
}

impl PipedriveCrm {
    pub fn new(config: PipedriveConfig, http: HttpOptions) -> Result<PipedriveCrm, BuildError> {
        let base_url = match (config.company_domain, config.base_url) {
            (Some(domain), None) => {
                let domain = domain.trim().to_owned();
                let valid = !domain.is_empty()
                    && domain.len() <= 63
                    && !domain.starts_with('-')
                    && domain.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
                if !valid {
                    return Err(BuildError::CompanyDomain(domain));
                }
                Url::parse(&format!("https://{domain}.pipedrive.com/api/v1"))
                    .map_err(|_| BuildError::CompanyDomain(domain))?
            }
            (None, Some(url)) => {
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(BuildError::BaseUrl(url.scheme().to_owned()));
                }
                url
            }
            _ => return Err(BuildError::Root),
        };
        let token = config.api_token.resolve()?;
        let token = SecretString::from(token.expose_secret().trim().to_owned());
        let mut token_header = HeaderValue::from_str(token.expose_secret()).map_err(|_| BuildError::TokenFormat)?;
        token_header.set_sensitive(true);
        Ok(PipedriveCrm { http: HttpClient::new(http)?, token, token_header, base_url, fields: Mutex::new(None) })
    }

    /// Replaces the token, should a server ever echo it, in text bound for
    /// an error or a log line.
    fn scrub(&self, text: &str) -> String {
        tributary_sdk::secret::redact(text, [self.token.expose_secret()])
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, CrmError> {
        let text = format!("{}{path}", self.base_url.as_str().trim_end_matches('/'));
        let mut url = Url::parse(&text).map_err(|error| CrmError::Decode(format!("bad request URL: {error}")))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// One authenticated request. 401/403 become [`CrmError::Auth`], a 429
    /// that reaches us [`CrmError::RateLimited`]; every other status is the
    /// caller's to read. `POST` goes through the client that never retries
    /// on its own; it is repeated here only after a 429.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<HttpResponse, CrmError> {
        let url = self.url(path, query)?;
        let mut request = self
            .http
            .request(method.clone(), url)
            .header("x-api-token", self.token_header.clone())
            .header(ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        // A create that may have reached Pipedrive is not sent twice (the
        // next delivery searches first); one refused with a 429 is.
        let sent =
            if method == Method::POST { self.http.send_once(request).await } else { self.http.send(request).await };
        let response = sent.map_err(|error| self.scrub_error(error))?;
        self.note_daily_budget(&response);
        match response.status.as_u16() {
            401 | 403 => Err(CrmError::Auth(self.scrub(&format!(
                "HTTP {}: {}",
                response.status.as_u16(),
                error_message(&response)
            )))),
            429 => {
                let retry_after = response.retry_after().unwrap_or(Duration::from_secs(2));
                Err(CrmError::RateLimited { retry_after })
            }
            _ => Ok(response),
        }
    }

    fn scrub_error(&self, error: HttpError) -> CrmError {
        CrmError::Http(error.map_text(|text| self.scrub(text)))
    }

    /// `x-daily-requests-left: 0`: the day's POST/PUT budget is spent; no
    /// request leaves before the next 00:00 UTC, when Pipedrive resets it.
    fn note_daily_budget(&self, response: &HttpResponse) {
        let left = response.header("x-daily-requests-left").and_then(|value| value.trim().parse::<i64>().ok());
        if left.is_some_and(|left| left <= 0) {
            let now = Utc::now();
            let wait = (next_midnight_utc(now) - now).to_std().unwrap_or(Duration::from_secs(3600));
            tracing::warn!(wait_secs = wait.as_secs(), "pipedrive daily request budget spent; holding until 00:00 UTC");
            self.http.hold(wait);
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

    /// Reads the answer to a request about one record.
    fn answer(&self, response: &HttpResponse) -> Result<Answer, CrmError> {
        let status = response.status.as_u16();
        match status {
            200..=299 => {
                let body: Value = response.json().map_err(|error| CrmError::Decode(error.to_string()))?;
                if body.get("success").and_then(Value::as_bool) == Some(false) {
                    return Ok(Answer::Refused(self.scrub(&error_message(response))));
                }
                Ok(Answer::Data(body.get("data").cloned().unwrap_or(Value::Null)))
            }
            400 | 422 => Ok(Answer::Refused(self.scrub(&error_message(response)))),
            404 | 410 => Ok(Answer::Missing(self.scrub(&error_message(response)))),
            _ => Err(self.unexpected(response)),
        }
    }

    /// `GET` that must succeed; returns the whole body.
    async fn get_ok(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, CrmError> {
        let response = self.call(Method::GET, path, query, None).await?;
        if !response.status.is_success() {
            return Err(self.unexpected(&response));
        }
        response.json().map_err(|error| CrmError::Decode(error.to_string()))
    }

    /// Every item of a paged list.
    async fn list_all(&self, path: &str, query: &[(&str, &str)]) -> Result<Vec<Value>, CrmError> {
        let mut items = Vec::new();
        let mut start = 0usize;
        let limit = PAGE_LIMIT.to_string();
        for _ in 0..MAX_PAGES {
            let start_text = start.to_string();
            let mut paged: Vec<(&str, &str)> = query.to_vec();
            paged.extend([("start", start_text.as_str()), ("limit", limit.as_str())]);
            let body = self.get_ok(path, &paged).await?;
            let page = match body.get("data") {
                Some(Value::Array(page)) => page.clone(),
                Some(Value::Null) | None => Vec::new(),
                Some(_) => return Err(CrmError::Decode(format!("{path}: `data` is not a list"))),
            };
            let count = page.len();
            items.extend(page);
            let pagination = &body["additional_data"]["pagination"];
            if pagination["more_items_in_collection"].as_bool() != Some(true) || count == 0 {
                return Ok(items);
            }
            start = pagination["next_start"].as_u64().map_or(start + count, |next| next as usize);
        }
        Ok(items)
    }

    /// The person fields, cached; `refresh` reads them again.
    async fn field_index(&self, refresh: bool) -> Result<Arc<FieldIndex>, CrmError> {
        if !refresh && let Some(index) = self.fields.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(index);
        }
        let listed = self.list_all("/personFields", &[]).await?;
        let index = Arc::new(FieldIndex::read(&listed));
        *self.fields.lock().unwrap_or_else(|p| p.into_inner()) = Some(index.clone());
        Ok(index)
    }

    /// Person field name -> key, cached; `refresh` reads them again.
    async fn field_keys(&self, refresh: bool) -> Result<Arc<HashMap<String, String>>, CrmError> {
        Ok(self.field_index(refresh).await?.keys.clone())
    }

    /// The fields, once all of `names` are known, reading them again once
    /// if one is unknown; an error naming `crm setup` when it is still missing.
    async fn require_fields(&self, names: &[&str]) -> Result<Arc<FieldIndex>, CrmError> {
        let index = self.field_index(false).await?;
        if names.iter().all(|name| index.keys.contains_key(*name)) {
            return Ok(index);
        }
        let index = self.field_index(true).await?;
        match names.iter().find(|name| !index.keys.contains_key(**name)) {
            Some(missing) => Err(CrmError::Transient(format!(
                "the Pipedrive person field `{missing}` does not exist; run `tributary crm setup`"
            ))),
            None => Ok(index),
        }
    }

    /// Ids of the persons whose `fields` match `term` exactly, best first.
    async fn search_persons(&self, term: &str, fields: &str) -> Result<Vec<u64>, CrmError> {
        let body = self
            .get_ok("/persons/search", &[("term", term), ("fields", fields), ("exact_match", "true"), ("limit", "10")])
            .await?;
        let items = body["data"]["items"].as_array().cloned().unwrap_or_default();
        Ok(items.iter().filter_map(|item| item["item"]["id"].as_u64()).collect())
    }

    /// The custom fields Tributary writes about a contact on its platform.
    fn contact_fields(&self, keys: &HashMap<String, String>, contact: &ContactUpsert) -> Map<String, Value> {
        let mut out = Map::new();
        let mut put = |field: String, value: Option<&str>| {
            let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else { return };
            match keys.get(&field) {
                Some(key) => {
                    out.insert(key.clone(), json!(value));
                }
                None => tracing::debug!(%field, "pipedrive person field absent; run `crm setup` for this platform"),
            }
        };
        put(handle_field(&contact.platform), contact.handle.as_deref());
        put(profile_field(&contact.platform), contact.profile_url.as_deref());
        out
    }

    /// Finds or creates one contact, then writes Tributary's fields.
    async fn upsert_contact(
        &self,
        contact: &ContactUpsert,
        known: &mut HashMap<String, u64>,
    ) -> Result<RecordOutcome<String>, CrmError> {
        let email = contact.email.as_deref().map(str::trim).filter(|e| !e.is_empty()).map(str::to_lowercase);
        let identity = contact.identity.trim();
        if email.is_none() && identity.is_empty() {
            return Ok(RecordOutcome::Rejected("the contact has neither an e-mail nor an identity".into()));
        }
        let index = self.require_fields(&[fields::IDENTITY]).await?;
        let keys = &*index.keys;
        let identity_key = keys.get(fields::IDENTITY).cloned().unwrap_or_default();
        let mut body = self.contact_fields(keys, contact);
        let (memo, found) = match &email {
            Some(email) => {
                let memo = format!("email:{email}");
                let found = match known.get(&memo) {
                    Some(id) => Some(*id),
                    None => self.search_persons(email, "email").await?.first().copied(),
                };
                (memo, found)
            }
            None => {
                // A person known only by a handle: its name and identity are Tributary's.
                body.insert(identity_key, json!(identity));
                if let Some(name) = contact.display_name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
                    body.insert("name".into(), json!(name));
                }
                let memo = format!("identity:{identity}");
                let found = match known.get(&memo) {
                    Some(id) => Some(*id),
                    None => self.search_persons(identity, "custom_fields").await?.first().copied(),
                };
                (memo, found)
            }
        };
        if let Some(id) = found {
            if body.is_empty() {
                known.insert(memo, id);
                return Ok(RecordOutcome::Done(id.to_string()));
            }
            let sent = Value::Object(body.clone());
            let response = self.call(Method::PUT, &format!("/persons/{id}"), &[], Some(&sent)).await?;
            match self.answer(&response)? {
                Answer::Data(_) => {
                    known.insert(memo, id);
                    return Ok(RecordOutcome::Done(id.to_string()));
                }
                Answer::Refused(message) => return Ok(RecordOutcome::Rejected(message)),
                // Deleted since the search indexed it: create it again below.
                Answer::Missing(_) => {}
            }
        }
        if let Some(email) = &email {
            body.insert("email".into(), json!([{ "value": email, "primary": true }]));
        }
        if !body.contains_key("name") {
            let name = [contact.display_name.as_deref(), contact.handle.as_deref(), email.as_deref(), Some(identity)]
                .into_iter()
                .flatten()
                .map(str::trim)
                .find(|n| !n.is_empty())
                .unwrap_or("Community member");
            body.insert("name".into(), json!(name));
        }
        let response = self.call(Method::POST, "/persons", &[], Some(&Value::Object(body))).await?;
        Ok(match self.answer(&response)? {
            Answer::Data(data) => match data["id"].as_u64() {
                Some(id) => {
                    known.insert(memo, id);
                    RecordOutcome::Done(id.to_string())
                }
                None => RecordOutcome::Rejected("Pipedrive's answer for this person has no id".into()),
            },
            Answer::Refused(message) | Answer::Missing(message) => RecordOutcome::Rejected(message),
        })
    }

    /// The id of the person's note carrying `key`'s marker, if any.
    async fn find_note(
        &self,
        person_id: u64,
        key: &str,
        listed: &mut HashMap<u64, Vec<Value>>,
    ) -> Result<Option<u64>, CrmError> {
        let notes = match listed.entry(person_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let person = person_id.to_string();
                entry.insert(self.list_all("/notes", &[("person_id", person.as_str())]).await?)
            }
        };
        let marker = note::marker(key);
        Ok(notes
            .iter()
            .find(|n| n["content"].as_str().is_some_and(|c| c.contains(&marker)))
            .and_then(|n| n["id"].as_u64()))
    }

    async fn upsert_activity(
        &self,
        activity: &ActivityUpsert,
        listed: &mut HashMap<u64, Vec<Value>>,
    ) -> Result<RecordOutcome<String>, CrmError> {
        let key = activity.key.trim();
        if key.is_empty() {
            return Ok(RecordOutcome::Rejected("the activity has no key".into()));
        }
        let Ok(person_id) = activity.contact_id.trim().parse::<u64>() else {
            return Ok(RecordOutcome::Rejected(format!(
                "contact id `{}` is not a Pipedrive person id",
                activity.contact_id.trim()
            )));
        };
        let content = note::note_content(key, &activity.contribution);
        let body = json!({ "content": content, "person_id": person_id });
        let existing = match activity.existing_id.as_deref().map(str::trim).and_then(|id| id.parse::<u64>().ok()) {
            Some(id) => Some(id),
            None => self.find_note(person_id, key, listed).await?,
        };
        if let Some(id) = existing {
            let response = self.call(Method::PUT, &format!("/notes/{id}"), &[], Some(&body)).await?;
            match self.answer(&response)? {
                Answer::Data(_) => return Ok(RecordOutcome::Done(id.to_string())),
                Answer::Refused(message) => return Ok(RecordOutcome::Rejected(message)),
                Answer::Missing(_) => {
                    // Deleted in Pipedrive since: look for another copy, else write it again.
                    if activity.existing_id.is_some()
                        && let Some(found) = self.find_note(person_id, key, listed).await?
                        && found != id
                    {
                        let response = self.call(Method::PUT, &format!("/notes/{found}"), &[], Some(&body)).await?;
                        return Ok(match self.answer(&response)? {
                            Answer::Data(_) => RecordOutcome::Done(found.to_string()),
                            Answer::Refused(message) | Answer::Missing(message) => RecordOutcome::Rejected(message),
                        });
                    }
                }
            }
        }
        let response = self.call(Method::POST, "/notes", &[], Some(&body)).await?;
        Ok(match self.answer(&response)? {
            Answer::Data(data) => match data["id"].as_u64() {
                Some(id) => {
                    if let Some(notes) = listed.get_mut(&person_id) {
                        notes.push(json!({ "id": id, "content": content }));
                    }
                    RecordOutcome::Done(id.to_string())
                }
                None => RecordOutcome::Rejected("Pipedrive's answer for this note has no id".into()),
            },
            Answer::Refused(message) | Answer::Missing(message) => RecordOutcome::Rejected(message),
        })
    }

    /// The person fields of one rollup, for one `PUT /persons/{id}`. Every
    /// figure is written, `null` when it has no value, so a value from an
    /// earlier rollup never stays. Fields missing in Pipedrive (a platform
    /// `crm setup` did not see) are left out.
    fn rollup_body(index: &FieldIndex, rollup: &Rollup) -> Value {
        let mut body = Map::new();
        let mut put = |name: &str, value: Value| match index.keys.get(name) {
            Some(key) => {
                body.insert(key.clone(), value);
            }
            None => tracing::debug!(field = name, "pipedrive person field absent; run `crm setup` for this platform"),
        };
        let date = |at: DateTime<Utc>| json!(at.format("%Y-%m-%d").to_string());
        let text = |value: Option<&str>, max: usize| {
            let line = note::one_line(value.unwrap_or_default(), max);
            if line.is_empty() { Value::Null } else { json!(line) }
        };
        put(fields::LAST_CONTRIBUTION_AT, date(rollup.last_contribution_at));
        put(fields::LAST_PLATFORM, json!(rollup.last_platform));
        put(fields::CONTRIBUTION_COUNT, json!(rollup.contribution_count));
        put(fields::PLATFORMS, json!(rollup.platforms.join(", ")));
        if let Some(sentiment) = figure(rollup.sentiment_avg) {
            put(fields::SENTIMENT_AVG, json!(sentiment));
        }
        put(fields::QUESTIONS, json!(rollup.questions));
        put(fields::COMPLAINTS, json!(rollup.complaints));
        put(fields::IDEAS, json!(rollup.ideas));
        put(fields::PRAISE, json!(rollup.praise));
        let last_url = rollup.last_url.as_deref().and_then(note::web_link);
        put(fields::LAST_URL, text(last_url.as_deref(), ROLLUP_TEXT_MAX));
        put(fields::LAST_EXCERPT, text(rollup.last_excerpt.as_deref(), ROLLUP_TEXT_MAX));
        put(fields::COUNT_90D, json!(rollup.count_90d));
        put(fields::SENTIMENT_90D, rollup.sentiment_avg_90d.and_then(figure).map_or(Value::Null, |s| json!(s)));
        let flag = if rollup.needs_attention { fields::YES } else { fields::NO };
        match index.keys.get(fields::NEEDS_ATTENTION).and_then(|key| index.option_id(key, flag)) {
            Some(id) => put(fields::NEEDS_ATTENTION, id.parse::<u64>().map_or_else(|_| json!(id), |id| json!(id))),
            None => tracing::debug!(option = flag, "pipedrive `{}` lacks this option", fields::NEEDS_ATTENTION),
        }
        put(fields::ATTENTION_REASON, text(rollup.attention_reason.as_deref(), VARCHAR_MAX));
        for platform in &rollup.per_platform {
            put(&fields::first_seen_field(&platform.platform), date(platform.first_seen));
            put(&fields::last_seen_field(&platform.platform), date(platform.last_seen));
            put(&fields::contributions_field(&platform.platform), json!(platform.contributions));
        }
        Value::Object(body)
    }

    /// Whether `merged` is already part of `survivor`, asked after
    /// Pipedrive refused to merge them: yes when `merged` is gone (merged,
    /// so deleted) while the survivor is an active person. `Err` with
    /// Pipedrive's refusal when the survivor is not there.
    async fn already_merged(&self, survivor: u64, merged: u64, refusal: &HttpResponse) -> Result<bool, CrmError> {
        let found = self.call(Method::GET, &format!("/persons/{survivor}"), &[], None).await?;
        match self.answer(&found)? {
            Answer::Data(person) if person["active_flag"].as_bool() != Some(false) => {}
            _ => return Err(self.unexpected(refusal)),
        }
        let found = self.call(Method::GET, &format!("/persons/{merged}"), &[], None).await?;
        Ok(match self.answer(&found)? {
            Answer::Missing(_) => true,
            Answer::Data(person) => person["active_flag"].as_bool() == Some(false),
            Answer::Refused(_) => false,
        })
    }
}

/// A figure as written to a `double` field: four decimals at most; `None`
/// for NaN or infinities.
fn figure(value: f64) -> Option<f64> {
    note::number(value).and_then(|text| text.parse::<f64>().ok())
}

/// A JSON scalar as text: strings as they are, numbers and booleans written out.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// A person's value as [`Crm::contact_properties`] gives it: option ids as
/// their labels (a `set` field's comma-separated ids joined by `, `), an
/// organization or owner by its name, e-mail and phone by their primary
/// value; `None` when empty.
fn display_value(value: &Value, options: Option<&HashMap<String, String>>) -> Option<String> {
    let label = |text: &str| -> String {
        let text = text.trim();
        options.and_then(|options| options.get(text)).cloned().unwrap_or_else(|| text.to_owned())
    };
    let text = match value {
        Value::Null => return None,
        Value::Object(object) => {
            let inner = ["name", "value"].into_iter().filter_map(|key| object.get(key)).find(|v| !v.is_null())?;
            return display_value(inner, options);
        }
        Value::Array(items) => {
            let primary = items.iter().find(|item| item["primary"].as_bool() == Some(true));
            if let Some(primary) = primary {
                return display_value(primary, options);
            }
            let shown: Vec<String> = items.iter().filter_map(|item| display_value(item, options)).collect();
            shown.join(", ")
        }
        Value::String(text) => match options {
            Some(options) if text.split(',').all(|id| options.contains_key(id.trim())) => {
                text.split(',').map(label).collect::<Vec<_>>().join(", ")
            }
            _ => text.trim().to_owned(),
        },
        scalar => label(&scalar_text(scalar)?),
    };
    (!text.trim().is_empty()).then(|| text.trim().to_owned())
}

/// Pipedrive's `error` and `error_info`, or the body itself when it has neither.
fn error_message(response: &HttpResponse) -> String {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    let text = |name: &str| body.get(name).and_then(Value::as_str).map(str::trim).filter(|t| !t.is_empty());
    match (text("error"), text("error_info")) {
        (Some(error), Some(info)) => format!("{error} ({info})"),
        (Some(error), None) => error.to_owned(),
        (None, Some(info)) => info.to_owned(),
        (None, None) => format!("HTTP {}: {}", response.status.as_u16(), response.body_snippet()),
    }
}

/// The next 00:00 UTC, when Pipedrive's daily POST/PUT budget resets.
fn next_midnight_utc(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive()
        .succ_opt()
        .map(|day| day.and_time(NaiveTime::MIN).and_utc())
        .unwrap_or(now + chrono::Duration::hours(24))
}

#[async_trait]
impl Crm for PipedriveCrm {
    fn kind(&self) -> &'static str {
        "pipedrive"
    }

    /// `GET /users/me`: answers with the token's user, or 401.
    async fn check(&self) -> Result<(), CrmError> {
        self.get_ok("/users/me", &[]).await.map(|_| ())
    }

    async fn setup(&self, platforms: &[String]) -> Result<SetupReport, CrmError> {
        let mut report = SetupReport::default();
        let existing = self.field_keys(true).await?;
        for field in person_fields(platforms) {
            let name = format!("personFields/{}", field.name);
            if existing.contains_key(&field.name) {
                report.existing.push(name);
                continue;
            }
            let mut body = json!({ "name": field.name, "field_type": field.field_type });
            if !field.options.is_empty() {
                body["options"] = field.options.iter().map(|label| json!({ "label": label })).collect();
            }
            let response = self.call(Method::POST, "/personFields", &[], Some(&body)).await?;
            match self.answer(&response)? {
                Answer::Data(_) => report.created.push(name),
                Answer::Refused(message) | Answer::Missing(message) => {
                    return Err(CrmError::Transient(format!(
                        "Pipedrive refused to create `{}`: {message}",
                        field.name
                    )));
                }
            }
        }
        self.field_keys(true).await?;
        tracing::info!(created = report.created.len(), existing = report.existing.len(), "pipedrive setup done");
        Ok(report)
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        match lookup {
            ContactLookup::Email(email) => {
                let email = email.trim();
                if email.is_empty() {
                    return Ok(None);
                }
                Ok(self.search_persons(email, "email").await?.first().map(u64::to_string))
            }
            ContactLookup::Handle { platform, handle } => {
                let handle = handle.trim();
                let keys = self.field_keys(false).await?;
                let Some(key) = keys.get(&handle_field(platform)) else { return Ok(None) };
                if handle.is_empty() {
                    return Ok(None);
                }
                // The search matches any custom field: keep a person whose
                // handle field for this platform holds the handle.
                for id in self.search_persons(handle, "custom_fields").await?.into_iter().take(3) {
                    let person = self.get_ok(&format!("/persons/{id}"), &[]).await?;
                    if person["data"][key].as_str().is_some_and(|value| value.trim() == handle) {
                        return Ok(Some(id.to_string()));
                    }
                }
                Ok(None)
            }
        }
    }

    async fn upsert_contacts(&self, contacts: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let mut known = HashMap::new();
        let mut outcomes = Vec::with_capacity(contacts.len());
        for contact in contacts {
            outcomes.push(self.upsert_contact(contact, &mut known).await?);
        }
        Ok(outcomes)
    }

    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let mut listed = HashMap::new();
        let mut outcomes = Vec::with_capacity(activities.len());
        for activity in activities {
            outcomes.push(self.upsert_activity(activity, &mut listed).await?);
        }
        Ok(outcomes)
    }

    /// `DELETE /notes/{id}`: Pipedrive has no archive for notes.
    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut outcomes = Vec::with_capacity(activity_ids.len());
        for id in activity_ids {
            let Ok(id) = id.trim().parse::<u64>() else {
                outcomes.push(RecordOutcome::Rejected(format!("`{}` is not a Pipedrive note id", id.trim())));
                continue;
            };
            let response = self.call(Method::DELETE, &format!("/notes/{id}"), &[], None).await?;
            outcomes.push(match self.answer(&response)? {
                Answer::Data(_) | Answer::Missing(_) => RecordOutcome::Done(()),
                Answer::Refused(message) => RecordOutcome::Rejected(message),
            });
        }
        Ok(outcomes)
    }

    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        if rollups.is_empty() {
            return Ok(Vec::new());
        }
        let index = self.require_fields(&fields::ROLLUP_FIELDS).await?;
        let mut outcomes = Vec::with_capacity(rollups.len());
        for rollup in rollups {
            let Ok(id) = rollup.contact_id.trim().parse::<u64>() else {
                outcomes.push(RecordOutcome::Rejected(format!(
                    "contact id `{}` is not a Pipedrive person id",
                    rollup.contact_id.trim()
                )));
                continue;
            };
            let body = Self::rollup_body(&index, rollup);
            let response = self.call(Method::PUT, &format!("/persons/{id}"), &[], Some(&body)).await?;
            outcomes.push(match self.answer(&response)? {
                Answer::Data(_) => RecordOutcome::Done(()),
                Answer::Refused(message) | Answer::Missing(message) => RecordOutcome::Rejected(message),
            });
        }
        Ok(outcomes)
    }

    /// `DELETE /notes/{id}`, as archiving does; a note already gone is done.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        self.archive_activities(activity_ids).await
    }

    /// `PUT /persons/{merged}/merge` with `merge_with_id: survivor`: the
    /// person in the path is merged into `merge_with_id`, which keeps its id
    /// (and its values where both have one) and gains the other's notes,
    /// activities and deals; the merged person is deleted. A refusal is
    /// done when the merge already happened (`merged` gone, the survivor
    /// there).
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let parse = |id: &str| id.trim().parse::<u64>().ok();
        let (Some(survivor), Some(merged)) = (parse(survivor), parse(merged)) else {
            return Err(CrmError::Unsupported(format!(
                "merging Pipedrive persons needs two person ids, not `{}` and `{}`",
                survivor.trim(),
                merged.trim()
            )));
        };
        if survivor == merged {
            return Ok(());
        }
        let body = json!({ "merge_with_id": survivor });
        let response = self.call(Method::PUT, &format!("/persons/{merged}/merge"), &[], Some(&body)).await?;
        match self.answer(&response)? {
            Answer::Data(data) => {
                if let Some(id) = data["id"].as_u64()
                    && id != survivor
                {
                    return Err(CrmError::Unsupported(format!(
                        "Pipedrive merged person {merged} into {survivor} but the result has the id {id}; \
                         Tributary's links still name {survivor}: link the person to {id} again"
                    )));
                }
                tracing::info!(survivor, merged, "pipedrive persons merged");
                Ok(())
            }
            Answer::Refused(message) | Answer::Missing(message) => {
                if self.already_merged(survivor, merged, &response).await? {
                    tracing::info!(survivor, merged, "pipedrive persons were already merged");
                    return Ok(());
                }
                tracing::debug!(survivor, merged, %message, "pipedrive refused a merge");
                Err(self.unexpected(&response))
            }
        }
    }

    /// `GET /persons/{id}`: each name is a key of the answer (`org_name`,
    /// `owner_name`, `label`, a custom field's hash) or a person field's
    /// name as Pipedrive shows it (`Organization`, `Label`, a custom
    /// field's name), matched ignoring case. Values are text: option ids
    /// as their labels, an organization or owner by name, the primary
    /// e-mail or phone. An unknown person is an error.
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, CrmError> {
        let wanted = tributary_sdk::crm::property_names(names);
        if wanted.is_empty() {
            return Ok(Default::default());
        }
        let Ok(id) = contact_id.trim().parse::<u64>() else {
            return Err(CrmError::Unsupported(format!("`{}` is not a Pipedrive person id", contact_id.trim())));
        };
        let index = self.field_index(false).await?;
        let body = self.get_ok(&format!("/persons/{id}"), &[]).await?;
        let Some(person) = body["data"].as_object() else {
            return Err(CrmError::Decode(format!("Pipedrive's answer for person {id} has no `data` object")));
        };
        Ok(wanted
            .into_iter()
            .filter_map(|name| {
                let key = if person.contains_key(name) { name } else { index.key_of(name)? };
                let value = display_value(person.get(key)?, index.options.get(key))?;
                Some((name.to_owned(), value))
            })
            .collect())
    }
}
