//! The BottleCRM sink (PyPI `django-crm`, MicroPyramid's open-source Django
//! CRM; REST API under `/api/`).
//!
//! What it relies on, read from the package's source (`crm/urls.py`,
//! `common/urls.py`, `contacts/urls.py`, `contacts/views.py`,
//! `common/views/custom_field_views.py`, `common/pat_auth.py`) and checked
//! against a running server (django-crm 1.35):
//!
//! - **Auth**: a personal access token (`bcrm_pat_…`) in
//!   `Authorization: Bearer`. The token belongs to one profile of one
//!   organization: it carries the org, so no org header is needed. A wrong
//!   or revoked token is answered 403 (`{"detail": "..."}`), like 401.
//! - **Contacts**: `GET /api/contacts/?email=..` (a case-insensitive
//!   *contains* filter: the answer's `results[].email` is compared exactly)
//!   and `GET /api/contacts/?cf_<key>=<value>` (exact match in the contact's
//!   `custom_fields`); `POST /api/contacts/` with `first_name`, `last_name`
//!   (both required and not blank), `email`, `custom_fields` answers
//!   `{"error": false, "id": ".."}`; `PATCH /api/contacts/{id}/` with
//!   `custom_fields` merges them into the contact's. A refusal is 400
//!   `{"error": true, "errors": {"field": ["message"]}}`; the e-mail is
//!   unique per org (`Contact already exists with this email`).
//! - **Identity**: an author without e-mail is found by Tributary's
//!   identity (`platform:author id`) in the contact custom field
//!   `tributary_identity`; handles and profile URLs go to
//!   `tributary_handle_<platform>` and `tributary_profile_<platform>`.
//! - **Custom fields** are per-org definitions, `GET /api/custom-fields/?target_model=Contact`
//!   and `POST /api/custom-fields/` (`target_model`, `key`, `label`,
//!   `field_type`, `is_filterable`; org admins only). Values under a key
//!   without a definition are dropped by the server, so the sink creates
//!   what it needs before it writes (`setup`, or lazily on first use).
//! - **Activities** are comments on the contact: `POST /api/contacts/{id}/`
//!   with `comment` (plain text, at most 10 000 characters) answers the
//!   contact's comments (`comments[].id`, `comments[].comment`), and so does
//!   `GET /api/contacts/{id}/`. There is no upsert by key: the comment
//!   carries the key as a line `[tributary-key:KEY]`; with `existing_id` the
//!   comment is updated (`PATCH /api/contacts/comment/{id}/`; 404 means it
//!   was deleted, so it is looked for again and else written again);
//!   without it the contact's comments are read and one carrying the marker
//!   is updated instead of creating another. `POST` is never retried
//!   blindly (a 5xx may come after the write): the next delivery finds it.
//! - **Archive and delete**: comments have no archive; both are
//!   `DELETE /api/contacts/comment/{id}/` (`contacts/urls.py`:
//!   `comment/<uid:pk>/`), a deletion for good (404 is done).
//! - **Rollups**: number, date, checkbox and text custom fields on the
//!   contact (`tributary_contribution_count`, ..., and per platform
//!   `tributary_first_seen_<platform>`, `tributary_last_seen_<platform>`,
//!   `tributary_contributions_<platform>`), all written with one `PATCH` of
//!   `custom_fields` per contact. Dates are days (`date` fields take
//!   `YYYY-MM-DD` only); text is one line. A figure without a value is sent
//!   as `null`, which the server reads as "remove this value"
//!   (`common/custom_fields.py`), so an earlier value never stays. The
//!   per-platform fields of a platform not set up are created on first use,
//!   as the handle fields are.
//! - **Contact properties** (for alert rules): `GET /api/contacts/{id}/`,
//!   whose `contact_obj` holds the standard fields (`title`, `organization`,
//!   ...) and `custom_fields`; a name is looked up among the first, then the
//!   second.
//! - **Merge**: BottleCRM has no merge of contacts, neither in its API nor in
//!   its app. `merge_contacts` reads both contacts: the merged one gone while
//!   the survivor exists is done (an administrator deleted it); both present
//!   is [`CrmError::Unsupported`], saying what to do.

mod comment;

#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use reqwest::{
    Method,
    header::{ACCEPT, AUTHORIZATION, HeaderValue},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tributary_sdk::{
    ActivityUpsert, ContactLookup, ContactUpsert, Crm, CrmError, HttpClient, HttpError, HttpOptions, HttpResponse,
    RecordOutcome, Rollup, SecretError, SecretRef, SetupReport,
};
use url::Url;

/// The contact custom field holding Tributary's identity of an author.
pub const IDENTITY_FIELD: &str = "tributary_identity";
const ROLLUP_FIELDS: [(&str, &str, &str); 15] = [
    ("tributary_last_contribution_at", "Last contribution", "date"),
    ("tributary_last_platform", "Last platform", "text"),
    ("tributary_contribution_count", "Contributions", "number"),
    ("tributary_platforms", "Platforms", "text"),
    ("tributary_sentiment_avg", "Average sentiment", "number"),
    ("tributary_questions", "Questions", "number"),
    ("tributary_complaints", "Complaints", "number"),
    ("tributary_ideas", "Ideas", "number"),
    ("tributary_praise", "Praise", "number"),
    ("tributary_last_url", "Last contribution URL", "text"),
    ("tributary_last_excerpt", "Last contribution excerpt", "text"),
    ("tributary_contributions_90d", "Contributions (90 days)", "number"),
    ("tributary_sentiment_90d", "Sentiment (90 days)", "number"),
    ("tributary_needs_attention", "Needs attention", "checkbox"),
    ("tributary_attention_reason", "Attention reason", "text"),
];
/// Longest text written to a rollup's one-line text fields.
const ROLLUP_TEXT_MAX: usize = 1_000;
/// Page size of contact searches.
const SEARCH_LIMIT: &str = "100";

/// Settings of the BottleCRM sink (the `[crm]` table with `type = "bottlecrm"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BottleCrmConfig {
    /// The server's root, e.g. `https://crm.example.com` (the API is under
    /// `/api/` below it; a `base_url` that already ends in `/api` is taken
    /// as is).
    pub base_url: Url,
    /// A personal access token (`bcrm_pat_…`) of a BottleCRM user, sent as
    /// `Authorization: Bearer`: `{ env = "BOTTLECRM_API_KEY" }` or
    /// `{ file = "/run/credentials/tributary.service/bottlecrm" }`. The
    /// token names the organization written to. Its user must be allowed to
    /// add and edit contacts and comments; creating Tributary's custom
    /// fields (`crm setup`, or the first write) needs an org admin.
    pub api_key: SecretRef,
}

/// Why a BottleCRM sink cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("bottlecrm `api_key`: {0}")]
    Secret(#[from] SecretError),
    #[error("bottlecrm `api_key` holds characters that cannot be sent in an HTTP header")]
    TokenFormat,
    #[error("bottlecrm `base_url` must be an http or https URL, not `{0}:`")]
    BaseUrl(String),
    #[error("bottlecrm http client: {0}")]
    Http(#[from] HttpError),
}

/// The BottleCRM sink. Its two HTTP clients share one rate budget.
pub struct BottleCrm {
    /// For requests safe to repeat (GET, PATCH, DELETE).
    http: HttpClient,
    /// For `POST`: no blind retry.
    token: SecretString,
    auth_header: HeaderValue,
    /// The API root, ending in `/api/`.
    api: Url,
    /// Keys of the contact custom fields known to exist.
    fields: Mutex<Option<Arc<HashSet<String>>>>,
}

impl std::fmt::Debug for BottleCrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BottleCrm")
            .field("api", &self.api.as_str())
            .field("api_key", &"[redacted]")
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

/// How BottleCRM answered a request about one record.
enum Answer {
    Data(Value),
    /// 400 (or a record-level 403): BottleCRM's message.
    Refused(String),
    /// 404.
    Missing(String),
}

impl BottleCrm {
    pub fn new(config: BottleCrmConfig, http: HttpOptions) -> Result<BottleCrm, BuildError> {
        let base = config.base_url;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(BuildError::BaseUrl(base.scheme().to_owned()));
        }
        let mut api = base.clone();
        let path = base.path().trim_end_matches('/');
        let path = if path.ends_with("/api") { format!("{path}/") } else { format!("{path}/api/") };
        api.set_path(&path);
        api.set_query(None);
        let token = config.api_key.resolve()?;
        let token = SecretString::from(token.expose_secret().trim().to_owned());
        let mut auth_header =
            HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).map_err(|_| BuildError::TokenFormat)?;
        auth_header.set_sensitive(true);
        Ok(BottleCrm { http: HttpClient::new(http)?, token, auth_header, api, fields: Mutex::new(None) })
    }

    fn scrub(&self, text: &str) -> String {
        tributary_sdk::secret::redact(text, [self.token.expose_secret()])
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, CrmError> {
        let mut url = self.api.join(path).map_err(|error| CrmError::Decode(format!("bad request URL: {error}")))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// One authenticated request. 401, and a 403 that is not a record-level
    /// refusal, become [`CrmError::Auth`]; a 429 [`CrmError::RateLimited`].
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
            .header(AUTHORIZATION, self.auth_header.clone())
            .header(ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        // A create that may have reached the server is not sent twice (the
        // next delivery searches first); one refused with a 429 is.
        let sent =
            if method == Method::POST { self.http.send_once(request).await } else { self.http.send(request).await };
        let response = sent.map_err(|error| self.scrub_error(error))?;
        match response.status.as_u16() {
            401 => Err(CrmError::Auth(self.scrub(&format!("HTTP 401: {}", error_message(&response))))),
            403 if !record_refusal(&response) => {
                Err(CrmError::Auth(self.scrub(&format!("HTTP 403: {}", error_message(&response)))))
            }
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

    fn unexpected(&self, response: &HttpResponse) -> CrmError {
        CrmError::Http(HttpError::Status {
            target: response.target.clone(),
            status: response.status.as_u16(),
            attempts: 1,
            body: self.scrub(&response.body_snippet()),
        })
    }

    fn answer(&self, response: &HttpResponse) -> Result<Answer, CrmError> {
        match response.status.as_u16() {
            200..=299 => {
                if response.body.iter().all(u8::is_ascii_whitespace) {
                    return Ok(Answer::Data(Value::Null));
                }
                let body: Value = response.json().map_err(|error| CrmError::Decode(self.scrub(&error.to_string())))?;
                if body.get("error").and_then(Value::as_bool) == Some(true) {
                    return Ok(Answer::Refused(self.scrub(&error_message(response))));
                }
                Ok(Answer::Data(body))
            }
            400 | 403 | 409 | 413 | 422 => Ok(Answer::Refused(self.scrub(&error_message(response)))),
            404 | 410 => Ok(Answer::Missing(self.scrub(&error_message(response)))),
            _ => Err(self.unexpected(response)),
        }
    }

    async fn get_ok(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, CrmError> {
        let response = self.call(Method::GET, path, query, None).await?;
        if !response.status.is_success() {
            return Err(self.unexpected(&response));
        }
        response.json().map_err(|error| CrmError::Decode(self.scrub(&error.to_string())))
    }

    /// Keys of the contact custom fields, cached; `refresh` reads them again.
    async fn field_keys(&self, refresh: bool) -> Result<Arc<HashSet<String>>, CrmError> {
        if !refresh && let Some(keys) = self.fields.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(keys);
        }
        let body = self.get_ok("custom-fields/", &[("target_model", "Contact"), ("include_counts", "false")]).await?;
        let Some(definitions) = body.get("definitions").and_then(Value::as_array) else {
            return Err(CrmError::Decode("custom-fields: no `definitions` list".into()));
        };
        let keys: HashSet<String> = definitions
            .iter()
            .filter(|d| d.get("is_active").and_then(Value::as_bool) != Some(false))
            .filter_map(|d| d.get("key")?.as_str().map(str::to_owned))
            .collect();
        let keys = Arc::new(keys);
        *self.fields.lock().unwrap_or_else(|p| p.into_inner()) = Some(keys.clone());
        Ok(keys)
    }

    /// Creates the contact custom fields in `wanted` that do not exist yet.
    async fn ensure_fields(
        &self,
        wanted: &[(String, String, &'static str)],
        report: &mut SetupReport,
    ) -> Result<Arc<HashSet<String>>, CrmError> {
        let mut keys = self.field_keys(false).await?;
        if wanted.iter().all(|(key, _, _)| keys.contains(key)) {
            wanted.iter().for_each(|(key, _, _)| report.existing.push(format!("custom-fields/Contact/{key}")));
            return Ok(keys);
        }
        keys = self.field_keys(true).await?;
        for (key, label, field_type) in wanted {
            let name = format!("custom-fields/Contact/{key}");
            if keys.contains(key) {
                report.existing.push(name);
                continue;
            }
            let body = json!({
                "target_model": "Contact",
                "key": key,
                "label": label,
                "field_type": field_type,
                "is_filterable": key == IDENTITY_FIELD || key.starts_with("tributary_handle_"),
            });
            let response = self.call(Method::POST, "custom-fields/", &[], Some(&body)).await?;
            match self.answer(&response)? {
                Answer::Data(_) => report.created.push(name),
                // Created meanwhile by another writer.
                Answer::Refused(message) if message.contains("already exists") => report.existing.push(name),
                Answer::Refused(message) | Answer::Missing(message) => {
                    return Err(CrmError::Transient(format!(
                        "BottleCRM refused to create the contact custom field `{key}` (its user must be an org admin, \
                         or run `tributary crm setup` as one): {message}"
                    )));
                }
            }
        }
        self.field_keys(true).await
    }

    /// Ids of the contacts a query finds, filtered by `keep`.
    async fn search_contacts(
        &self,
        query: &[(&str, &str)],
        keep: impl Fn(&Value) -> bool,
    ) -> Result<Vec<String>, CrmError> {
        let mut paged = query.to_vec();
        paged.push(("limit", SEARCH_LIMIT));
        let body = self.get_ok("contacts/", &paged).await?;
        let Some(results) = body.get("results").and_then(Value::as_array) else {
            return Err(CrmError::Decode("contacts: no `results` list".into()));
        };
        Ok(results.iter().filter(|c| keep(c)).filter_map(|c| c.get("id")?.as_str().map(str::to_owned)).collect())
    }

    async fn find_by_email(&self, email: &str) -> Result<Option<String>, CrmError> {
        let found = self
            .search_contacts(&[("email", email)], |c| {
                c.get("email").and_then(Value::as_str).is_some_and(|e| e.trim().eq_ignore_ascii_case(email))
            })
            .await?;
        Ok(found.into_iter().next())
    }

    async fn find_by_field(&self, key: &str, value: &str) -> Result<Option<String>, CrmError> {
        let param = format!("cf_{key}");
        let found = self
            .search_contacts(&[(param.as_str(), value)], |c| {
                c.get("custom_fields").and_then(|f| f.get(key)).and_then(Value::as_str) == Some(value)
            })
            .await?;
        Ok(found.into_iter().next())
    }

    async fn upsert_contact(
        &self,
        contact: &ContactUpsert,
        known: &mut HashMap<String, String>,
    ) -> Result<RecordOutcome<String>, CrmError> {
        let email = contact.email.as_deref().map(str::trim).filter(|e| !e.is_empty()).map(str::to_lowercase);
        let identity = contact.identity.trim();
        if email.is_none() && identity.is_empty() {
            return Ok(RecordOutcome::Rejected("the contact has neither an e-mail nor an identity".into()));
        }
        let platform = contact.platform.trim();
        let mut wanted = vec![(IDENTITY_FIELD.to_owned(), "Tributary identity".to_owned(), "text")];
        if !platform.is_empty() {
            wanted.push((handle_field(platform), format!("{platform} handle"), "text"));
            wanted.push((profile_field(platform), format!("{platform} profile"), "text"));
        }
        let keys = self.ensure_fields(&wanted, &mut SetupReport::default()).await?;
        let mut fields = Map::new();
        let mut put = |key: String, value: Option<&str>| {
            if let Some(value) = value.map(str::trim).filter(|v| !v.is_empty())
                && keys.contains(&key)
            {
                fields.insert(key, json!(value));
            }
        };
        if !platform.is_empty() {
            put(handle_field(platform), contact.handle.as_deref());
            put(profile_field(platform), contact.profile_url.as_deref());
        }
        let (memo, found) = match &email {
            Some(email) => {
                let memo = format!("email:{email}");
                let found = match known.get(&memo) {
                    Some(id) => Some(id.clone()),
                    None => self.find_by_email(email).await?,
                };
                (memo, found)
            }
            None => {
                let memo = format!("identity:{identity}");
                let found = match known.get(&memo) {
                    Some(id) => Some(id.clone()),
                    None => self.find_by_field(IDENTITY_FIELD, identity).await?,
                };
                (memo, found)
            }
        };
        if let Some(id) = found {
            if fields.is_empty() {
                known.insert(memo, id.clone());
                return Ok(RecordOutcome::Done(id));
            }
            let body = json!({ "custom_fields": fields });
            let response = self.call(Method::PATCH, &format!("contacts/{id}/"), &[], Some(&body)).await?;
            match self.answer(&response)? {
                Answer::Data(_) => {
                    known.insert(memo, id.clone());
                    return Ok(RecordOutcome::Done(id));
                }
                Answer::Refused(message) => return Ok(RecordOutcome::Rejected(message)),
                Answer::Missing(_) => {}
            }
        }
        if keys.contains(IDENTITY_FIELD) && !identity.is_empty() {
            fields.insert(IDENTITY_FIELD.into(), json!(identity));
        }
        let (first_name, last_name) = names(contact, email.as_deref(), identity);
        let mut body = json!({ "first_name": first_name, "last_name": last_name, "custom_fields": fields });
        if let Some(email) = &email {
            body["email"] = json!(email);
        }
        let response = self.call(Method::POST, "contacts/", &[], Some(&body)).await?;
        Ok(match self.answer(&response)? {
            Answer::Data(data) => match data.get("id").and_then(Value::as_str) {
                Some(id) => {
                    known.insert(memo, id.to_owned());
                    RecordOutcome::Done(id.to_owned())
                }
                None => RecordOutcome::Rejected("BottleCRM's answer for this contact has no id".into()),
            },
            Answer::Refused(message) => {
                // Created by an earlier attempt whose answer was lost.
                if let Some(email) = &email
                    && message.contains("already exists")
                    && let Some(id) = self.find_by_email(email).await?
                {
                    known.insert(memo, id.clone());
                    return Ok(RecordOutcome::Done(id));
                }
                RecordOutcome::Rejected(message)
            }
            Answer::Missing(message) => RecordOutcome::Rejected(message),
        })
    }

    /// The contact's comments, or `None` when the contact is gone.
    async fn comments(&self, contact_id: &str) -> Result<Option<Vec<Value>>, CrmError> {
        let response = self.call(Method::GET, &format!("contacts/{contact_id}/"), &[], None).await?;
        match self.answer(&response)? {
            Answer::Data(body) => Ok(Some(body.get("comments").and_then(Value::as_array).cloned().unwrap_or_default())),
            Answer::Missing(_) => Ok(None),
            Answer::Refused(message) => Err(CrmError::Transient(message)),
        }
    }

    /// The contact (`contact_obj` of `GET /api/contacts/{id}/`), or `None`
    /// when it is gone.
    async fn contact(&self, id: &str) -> Result<Option<Map<String, Value>>, CrmError> {
        let response = self.call(Method::GET, &format!("contacts/{id}/"), &[], None).await?;
        match self.answer(&response)? {
            Answer::Data(body) => match body.get("contact_obj") {
                Some(Value::Object(contact)) => Ok(Some(contact.clone())),
                _ => Err(CrmError::Decode(format!("contacts/{id}/: no `contact_obj`"))),
            },
            Answer::Missing(_) => Ok(None),
            Answer::Refused(message) => Err(CrmError::Transient(message)),
        }
    }

    async fn patch_comment(&self, id: &str, text: &str) -> Result<Answer, CrmError> {
        let body = json!({ "comment": text });
        let response = self.call(Method::PATCH, &format!("contacts/comment/{id}/"), &[], Some(&body)).await?;
        self.answer(&response)
    }

    async fn upsert_activity(
        &self,
        activity: &ActivityUpsert,
        listed: &mut HashMap<String, Option<Vec<Value>>>,
    ) -> Result<RecordOutcome<String>, CrmError> {
        let key = activity.key.trim();
        if key.is_empty() {
            return Ok(RecordOutcome::Rejected("the activity has no key".into()));
        }
        let contact_id = activity.contact_id.trim();
        if contact_id.is_empty() || !contact_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Ok(RecordOutcome::Rejected(format!("contact id `{contact_id}` is not a BottleCRM contact id")));
        }
        let text = comment::text(key, &activity.contribution);
        let existing_id = activity.existing_id.as_deref().map(str::trim).filter(|id| !id.is_empty());
        if let Some(id) = existing_id {
            match self.patch_comment(id, &text).await? {
                Answer::Data(_) => return Ok(RecordOutcome::Done(id.to_owned())),
                Answer::Refused(message) => return Ok(RecordOutcome::Rejected(message)),
                Answer::Missing(_) => {}
            }
        }
        if !listed.contains_key(contact_id) {
            let comments = self.comments(contact_id).await?;
            listed.insert(contact_id.to_owned(), comments);
        }
        let Some(Some(comments)) = listed.get(contact_id) else {
            return Ok(RecordOutcome::Rejected(format!("BottleCRM has no contact `{contact_id}`")));
        };
        let marker = comment::marker(key);
        let found = comments
            .iter()
            .find(|c| c.get("comment").and_then(Value::as_str).is_some_and(|t| t.contains(&marker)))
            .and_then(|c| Some((c.get("id")?.as_str()?.to_owned(), c.get("comment")?.as_str()?.to_owned())));
        if let Some((id, current)) = found
            && Some(id.as_str()) != existing_id
        {
            if current == text {
                return Ok(RecordOutcome::Done(id));
            }
            match self.patch_comment(&id, &text).await? {
                Answer::Data(_) => return Ok(RecordOutcome::Done(id)),
                Answer::Refused(message) => return Ok(RecordOutcome::Rejected(message)),
                Answer::Missing(_) => {}
            }
        }
        let body = json!({ "comment": text });
        let response = self.call(Method::POST, &format!("contacts/{contact_id}/"), &[], Some(&body)).await?;
        Ok(match self.answer(&response)? {
            Answer::Data(data) => {
                let comments = data.get("comments").and_then(Value::as_array).cloned().unwrap_or_default();
                let id = comments
                    .iter()
                    .find(|c| c.get("comment").and_then(Value::as_str).is_some_and(|t| t.contains(&marker)))
                    .and_then(|c| c.get("id")?.as_str().map(str::to_owned));
                listed.insert(contact_id.to_owned(), Some(comments));
                match id {
                    Some(id) => RecordOutcome::Done(id),
                    None => RecordOutcome::Rejected("BottleCRM's answer does not list the new comment".into()),
                }
            }
            Answer::Refused(message) | Answer::Missing(message) => RecordOutcome::Rejected(message),
        })
    }
}

/// The contact custom field of a platform's handle.
pub fn handle_field(platform: &str) -> String {
    format!("tributary_handle_{}", slug(platform))
}

/// The contact custom field of a platform's profile URL.
pub fn profile_field(platform: &str) -> String {
    format!("tributary_profile_{}", slug(platform))
}

/// The contact custom field of the day a person was first seen on a platform.
pub fn first_seen_field(platform: &str) -> String {
    format!("tributary_first_seen_{}", slug(platform))
}

/// The contact custom field of the day a person was last seen on a platform.
pub fn last_seen_field(platform: &str) -> String {
    format!("tributary_last_seen_{}", slug(platform))
}

/// The contact custom field of how many contributions a person made on a platform.
pub fn contributions_field(platform: &str) -> String {
    format!("tributary_contributions_{}", slug(platform))
}

/// The rollup fields of one platform: (key, label, field type).
fn platform_rollup_fields(platform: &str) -> [(String, String, &'static str); 3] {
    [
        (first_seen_field(platform), format!("First seen on {platform}"), "date"),
        (last_seen_field(platform), format!("Last seen on {platform}"), "date"),
        (contributions_field(platform), format!("Contributions on {platform}"), "number"),
    ]
}

use tributary_sdk::text::one_line;

/// The URL when it is an absolute http(s) URL.
fn web_link(url: &str) -> Option<String> {
    let parsed = Url::parse(url.trim()).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

/// A field value as text: strings as they are, numbers and booleans
/// written out (BottleCRM stores every number as a float: a whole one reads
/// `3`, not `3.0`), a related record as its `name`, a list joined by `; `;
/// `None` for null and empty values.
fn property_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(text) => text.clone(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => match number.as_f64() {
            Some(float) if number.is_f64() && float.fract() == 0.0 && float.abs() < 9.0e15 => format!("{float:.0}"),
            _ => number.to_string(),
        },
        Value::Array(items) => items.iter().filter_map(property_text).collect::<Vec<_>>().join("; "),
        Value::Object(fields) => match fields.get("name") {
            Some(name) => return property_text(name),
            None => value.to_string(),
        },
    };
    Some(text).filter(|text| !text.trim().is_empty())
}

/// A finite number rounded to four decimals.
fn rounded(value: f64) -> Option<f64> {
    value.is_finite().then(|| (value * 10_000.0).round() / 10_000.0)
}

/// A BottleCRM id: a UUID (hex digits and `-`).
fn is_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

fn slug(text: &str) -> String {
    let slug: String =
        text.trim().to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(40).collect();
    if slug.is_empty() { "unknown".into() } else { slug }
}

/// First and last name of a new contact; BottleCRM requires both. A single
/// word (a handle) gets the platform as its last name, e.g. `rustacean_42`
/// `(github)`.
fn names(contact: &ContactUpsert, email: Option<&str>, identity: &str) -> (String, String) {
    let local = email.and_then(|e| e.split('@').next());
    let name = [contact.display_name.as_deref(), contact.handle.as_deref(), local, Some(identity)]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|n| !n.is_empty())
        .unwrap_or("Community member");
    let cap = |text: &str| text.chars().take(255).collect::<String>();
    match name.split_once(char::is_whitespace) {
        Some((first, last)) if !last.trim().is_empty() => (cap(first), cap(last.trim())),
        _ => {
            let platform = contact.platform.trim();
            let last = if platform.is_empty() { "-".to_owned() } else { format!("({platform})") };
            (cap(name), cap(&last))
        }
    }
}

/// A 403 about one record (`{"error": true, ...}`), not about the token.
fn record_refusal(response: &HttpResponse) -> bool {
    serde_json::from_slice::<Value>(&response.body)
        .ok()
        .is_some_and(|body| body.get("error").and_then(Value::as_bool) == Some(true))
}

/// BottleCRM's `errors` (field messages, nested for custom fields), its
/// `detail`, or the body itself.
fn error_message(response: &HttpResponse) -> String {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    let mut parts = Vec::new();
    if let Some(errors) = body.get("errors") {
        flatten("", errors, &mut parts);
    }
    if parts.is_empty() {
        for name in ["detail", "message"] {
            if let Some(value) = body.get(name) {
                flatten("", value, &mut parts);
            }
            if !parts.is_empty() {
                break;
            }
        }
    }
    if parts.is_empty() {
        return format!("HTTP {}: {}", response.status.as_u16(), response.body_snippet());
    }
    parts.join("; ")
}

/// `field.sub: message` for every message in a DRF error structure.
fn flatten(at: &str, value: &Value, out: &mut Vec<String>) {
    let say = |message: &str| if at.is_empty() { message.to_owned() } else { format!("{at}: {message}") };
    match value {
        Value::String(text) if !text.trim().is_empty() => out.push(say(text.trim())),
        Value::Array(items) => items.iter().for_each(|item| flatten(at, item, out)),
        Value::Object(fields) => {
            for (field, value) in fields {
                let at = if at.is_empty() { field.clone() } else { format!("{at}.{field}") };
                flatten(&at, value, out);
            }
        }
        Value::Null | Value::String(_) => {}
        other => out.push(say(&other.to_string())),
    }
}

#[async_trait]
impl Crm for BottleCrm {
    fn kind(&self) -> &'static str {
        "bottlecrm"
    }

    /// `GET /api/contacts/?limit=1`: 200 with the token, 403 without.
    async fn check(&self) -> Result<(), CrmError> {
        self.get_ok("contacts/", &[("limit", "1")]).await.map(|_| ())
    }

    async fn setup(&self, platforms: &[String]) -> Result<SetupReport, CrmError> {
        let mut wanted = vec![(IDENTITY_FIELD.to_owned(), "Tributary identity".to_owned(), "text")];
        for platform in platforms.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            wanted.push((handle_field(platform), format!("{platform} handle"), "text"));
            wanted.push((profile_field(platform), format!("{platform} profile"), "text"));
        }
        wanted.extend(ROLLUP_FIELDS.iter().map(|(key, label, kind)| ((*key).to_owned(), (*label).to_owned(), *kind)));
        for platform in platforms.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            wanted.extend(platform_rollup_fields(platform));
        }
        let mut report = SetupReport::default();
        self.ensure_fields(&wanted, &mut report).await?;
        tracing::info!(created = report.created.len(), existing = report.existing.len(), "bottlecrm setup done");
        Ok(report)
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        match lookup {
            ContactLookup::Email(email) => {
                let email = email.trim().to_lowercase();
                if email.is_empty() {
                    return Ok(None);
                }
                self.find_by_email(&email).await
            }
            ContactLookup::Handle { platform, handle } => {
                let handle = handle.trim();
                let key = handle_field(platform);
                if handle.is_empty() || !self.field_keys(false).await?.contains(&key) {
                    return Ok(None);
                }
                self.find_by_field(&key, handle).await
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

    /// `DELETE /api/contacts/comment/{id}/`: comments have no archive.
    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut outcomes = Vec::with_capacity(activity_ids.len());
        for id in activity_ids {
            let id = id.trim();
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                outcomes.push(RecordOutcome::Rejected(format!("`{id}` is not a BottleCRM comment id")));
                continue;
            }
            let response = self.call(Method::DELETE, &format!("contacts/comment/{id}/"), &[], None).await?;
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
        let mut wanted: Vec<_> =
            ROLLUP_FIELDS.iter().map(|(key, label, kind)| ((*key).to_owned(), (*label).to_owned(), *kind)).collect();
        // The per-platform fields of every platform named, created on first use.
        let mut platforms: Vec<&str> = rollups
            .iter()
            .flat_map(|rollup| rollup.per_platform.iter().map(|p| p.platform.trim()))
            .filter(|p| !p.is_empty())
            .collect();
        platforms.sort_unstable();
        platforms.dedup();
        for platform in platforms {
            wanted.extend(platform_rollup_fields(platform));
        }
        let keys = self.ensure_fields(&wanted, &mut SetupReport::default()).await?;
        let mut outcomes = Vec::with_capacity(rollups.len());
        for rollup in rollups {
            let id = rollup.contact_id.trim();
            if !is_id(id) {
                outcomes.push(RecordOutcome::Rejected(format!("contact id `{id}` is not a BottleCRM contact id")));
                continue;
            }
            let text =
                |text: Option<&str>| text.map(|text| one_line(text, ROLLUP_TEXT_MAX)).filter(|text| !text.is_empty());
            let mut fields = json!({
                "tributary_last_contribution_at": rollup.last_contribution_at.format("%Y-%m-%d").to_string(),
                "tributary_last_platform": rollup.last_platform,
                "tributary_contribution_count": rollup.contribution_count,
                "tributary_platforms": rollup.platforms.join(", "),
                "tributary_questions": rollup.questions,
                "tributary_complaints": rollup.complaints,
                "tributary_ideas": rollup.ideas,
                "tributary_praise": rollup.praise,
                // `null` removes a value: none from an earlier rollup stays.
                "tributary_last_url": rollup.last_url.as_deref().and_then(web_link),
                "tributary_last_excerpt": text(rollup.last_excerpt.as_deref()),
                "tributary_contributions_90d": rollup.count_90d,
                "tributary_sentiment_90d": rollup.sentiment_avg_90d.and_then(rounded),
                "tributary_needs_attention": rollup.needs_attention,
                "tributary_attention_reason": text(rollup.attention_reason.as_deref()),
            });
            if let Some(sentiment) = rounded(rollup.sentiment_avg) {
                fields["tributary_sentiment_avg"] = json!(sentiment);
            }
            for platform in rollup.per_platform.iter().filter(|p| !p.platform.trim().is_empty()) {
                let name = platform.platform.trim();
                fields[first_seen_field(name)] = json!(platform.first_seen.format("%Y-%m-%d").to_string());
                fields[last_seen_field(name)] = json!(platform.last_seen.format("%Y-%m-%d").to_string());
                fields[contributions_field(name)] = json!(platform.contributions);
            }
            // A key without a definition would be dropped by the server anyway.
            if let Some(fields) = fields.as_object_mut() {
                fields.retain(|key, _| keys.contains(key));
            }
            let body = json!({ "custom_fields": fields });
            let response = self.call(Method::PATCH, &format!("contacts/{id}/"), &[], Some(&body)).await?;
            outcomes.push(match self.answer(&response)? {
                Answer::Data(_) => RecordOutcome::Done(()),
                Answer::Refused(message) | Answer::Missing(message) => RecordOutcome::Rejected(message),
            });
        }
        Ok(outcomes)
    }

    /// The same `DELETE /api/contacts/comment/{id}/` as
    /// [`Crm::archive_activities`]: a comment deleted is gone for good.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        self.archive_activities(activity_ids).await
    }

    /// BottleCRM cannot merge contacts: this reads both, and takes the merge
    /// as done when `merged` is gone while `survivor` exists.
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let (survivor, merged) = (survivor.trim(), merged.trim());
        if !is_id(survivor) || !is_id(merged) {
            return Err(CrmError::Unsupported(format!(
                "cannot merge BottleCRM contacts `{survivor}` and `{merged}`: not BottleCRM contact ids"
            )));
        }
        if survivor.eq_ignore_ascii_case(merged) {
            return Ok(());
        }
        if self.contact(survivor).await?.is_none() {
            return Err(CrmError::Unsupported(format!(
                "cannot merge BottleCRM contact {merged} into {survivor}: BottleCRM has no contact {survivor}"
            )));
        }
        if self.contact(merged).await?.is_none() {
            tracing::info!(survivor, merged, "the contact to merge is gone from bottlecrm; taking the merge as done");
            return Ok(());
        }
        Err(CrmError::Unsupported(format!(
            "BottleCRM has no merge of contacts (neither its API nor its app), so Tributary cannot move contact \
             {merged}'s comments to {survivor}: copy what matters from {merged} to {survivor} and delete {merged} in \
             BottleCRM, then run the same `tributary identity link` (or `tributary identity approve`) again: \
             Tributary then links {merged}'s identities to {survivor} (its comments are not moved)"
        )))
    }

    /// `GET /api/contacts/{id}/`: the named fields of `contact_obj` that have
    /// a value, else the named custom fields.
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, CrmError> {
        let wanted = tributary_sdk::crm::property_names(names);
        if wanted.is_empty() {
            return Ok(Default::default());
        }
        let id = contact_id.trim();
        if !is_id(id) {
            return Err(CrmError::Unsupported(format!(
                "cannot read the properties of `{id}`: not a BottleCRM contact id"
            )));
        }
        let Some(contact) = self.contact(id).await? else {
            return Err(CrmError::Transient(format!("BottleCRM has no contact {id}")));
        };
        let custom = contact.get("custom_fields").and_then(Value::as_object);
        Ok(wanted
            .iter()
            .filter_map(|name| {
                let standard = contact.get(*name).filter(|_| *name != "custom_fields").and_then(property_text);
                let value = standard.or_else(|| custom.and_then(|fields| fields.get(*name)).and_then(property_text))?;
                Some(((*name).to_owned(), value))
            })
            .collect())
    }
}
