//! The Zoho CRM sink (REST API v8).
//!
//! What it relies on, from Zoho's OpenAPI files for v8 (`zoho/crm-oas`,
//! `v8.0/record.json`, `notes.json`, `fields.json`, `common.json`; copies in
//! `shared/specs/zoho`) and the CRM developer guide (zoho.com/crm/developer/
//! docs/api/v8: "Create Custom Fields", "API Limits"):
//!
//! - Auth: OAuth 2.0 with a refresh token from a self client or a server
//!   based client: `POST {accounts_url}/oauth/v2/token` with
//!   `grant_type=refresh_token`, `client_id`, `client_secret` and
//!   `refresh_token` in the form body, answered with `access_token`,
//!   `expires_in` (seconds), `api_domain` and `token_type: Bearer`. The SDK's
//!   [`OAuth2`] keeps the token; requests carry `Authorization:
//!   Zoho-oauthtoken <token>` (not `Bearer`), so the header is rebuilt here
//!   from the SDK's. A 401 (`INVALID_TOKEN`) gets one renewal and one retry.
//!   Requests go to the configured `api_domain` (the token answer's own is
//!   not followed: the data centre is configuration).
//! - Contacts: `POST /crm/v8/Contacts/upsert` (`Body_Wrapper`: `data`,
//!   `duplicate_check_fields`), at most 100 records. People with an e-mail
//!   are matched on `Email`; people without one on the unique custom field
//!   `Tributary_Identity` (one call per kind of match). `Last_Name` is
//!   mandatory for a creation: the display name, else the handle, else the
//!   identity. Each record gets `{code, details: {id}, message, status}` in
//!   `data[]`, in request order; a record refused is
//!   `Rejected("CODE: message")` while the rest lands.
//! - Activities: Notes (`Note_Title`, plain-text `Note_Content`,
//!   `Parent_Id: {module: {api_name: "Contacts"}, id}`). Zoho has no upsert
//!   for notes, so the content ends with a line `[tributary-key:KEY]`: with
//!   `existing_id` the note is updated (`PUT /crm/v8/Notes`, with `id`);
//!   without it, the contact's notes (`GET /crm/v8/Contacts/{id}/Notes`,
//!   every page) are searched for the marker first and a note found is
//!   updated; only then is one created (`POST /crm/v8/Notes`). 100 a call.
//!   A note given by `existing_id` that is gone (`INVALID_DATA`) is created
//!   again. No write is retried blindly (the HTTP client retries only 429
//!   and 5xx; a replay after an ambiguous failure goes through the search).
//! - Archiving and deleting: `DELETE /crm/v8/Notes?ids=a,b` (100 ids a call,
//!   `ids` its one parameter in `notes.json`); deleted notes go to the
//!   recycle bin, which Zoho empties after 60 days. A note already gone
//!   (`INVALID_DATA`) counts as done. The v8 files offer no deletion that
//!   skips the recycle bin, so `delete_activities` is the same call.
//! - Rollups: custom fields of Contacts, `PUT /crm/v8/Contacts` with `id`:
//!   the totals, the last contribution's link and excerpt (one line), the
//!   90-day figures, the attention checkbox and, per platform, first and
//!   last sighting and contribution count, in the one call. A figure
//!   without a value is written `null`, so an earlier value never stays.
//! - Contact properties (for alert rules): `GET /crm/v8/Contacts/{id}?fields=a,b`
//!   (`record.json`, "Get Record"), answered `{data: [record]}`; a lookup
//!   (`{name, id}`) reads as its name, a multi-select as its values joined
//!   by `; `. A field Zoho refuses as unknown (`INVALID_DATA` naming its
//!   `api_name`) is left out and the rest asked again.
//! - Merging: the v8 OpenAPI files have no merge operation for Contacts, so
//!   `merge_contacts` only reads both contacts (`GET /crm/v8/Contacts/{id}`):
//!   the merged one gone while the survivor exists is a merge done in Zoho
//!   CRM (whose merge moves the notes to the master record); both present
//!   is [`CrmError::Unsupported`], saying how to merge them in Zoho CRM.
//! - Limits: a 24-hour credit allowance and a concurrency limit per org.
//!   429 `TOO_MANY_REQUESTS` and `Retry-After` / `X-RateLimit-*` headers are
//!   honoured by the SDK's client. A spent credit allowance comes back as an
//!   error code in the body (`LIMIT_EXCEEDED`, `API_LIMIT_EXCEEDED` or a
//!   message about credits): [`CrmError::RateLimited`] for an hour, and the
//!   shared client holds every request meanwhile.
//! - `setup`: `GET /crm/v8/settings/fields?module=Contacts`, then
//!   `POST /crm/v8/settings/fields?module=Contacts` (`{fields: [{field_label,
//!   data_type, length}]}`) for each field missing. Zoho derives the API name
//!   from the label (spaces become `_`), so labels are chosen to give the
//!   names written here. `Tributary_Identity` is created unique.
//!
//! The client secret, the refresh token and the tokens are never in a log
//! line, an error or `Debug` output; text a server echoes is scrubbed.

mod fields;

#[cfg(test)]
mod spec;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, sync::Arc, time::Duration};

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
    MemoryTokenStore, OAuth2, OAuthError, RecordOutcome, Rollup, SecretError, SecretRef, SetupReport, TokenStore,
    oauth::{ClientAuth, Grant, OAuth2Config},
};
use url::Url;

use self::fields::{
    IDENTITY, LAST_NAME_MAX, TEXT_MAX, cap, contact_fields, handle_field, marker, note_content, note_title,
    profile_field, rollup_fields,
};

/// What `GET /crm/v8/Contacts/{id}` found.
enum ContactRead {
    Found(Map<String, Value>),
    /// No such contact (204, or `INVALID_DATA` about the id).
    Missing,
    /// Zoho refused field names it does not know.
    UnknownFields(Vec<String>),
}

/// Records per write call (Zoho's limit).
const BATCH: usize = 100;
/// Notes per page of a contact's notes.
const NOTES_PER_PAGE: usize = 200;
/// Pages of a contact's notes searched at most for a marker.
const MAX_NOTE_PAGES: usize = 50;
/// How long a spent credit allowance holds every request.
const LIMIT_WAIT: Duration = Duration::from_secs(3600);

/// Settings of the Zoho CRM sink (the `[crm]` table with `type = "zoho"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZohoConfig {
    /// The API address of the account's data centre, e.g.
    /// `https://www.zohoapis.com`, `https://www.zohoapis.eu`,
    /// `https://www.zohoapis.in`.
    pub api_domain: Url,
    /// The accounts server of the same data centre, e.g.
    /// `https://accounts.zoho.com` (`.eu`, `.in`, ...): tokens come from
    /// `{accounts_url}/oauth/v2/token`.
    pub accounts_url: Url,
    /// Client id of the Zoho API client (API console, self client or server
    /// based application).
    pub client_id: String,
    /// Client secret of that client: `{ env = "ZOHO_CLIENT_SECRET" }` or
    /// `{ file = "zoho-client-secret" }`.
    pub client_secret: SecretRef,
    /// A refresh token issued to that client (offline access) with the
    /// scopes `ZohoCRM.modules.contacts.ALL`, `ZohoCRM.modules.notes.ALL`
    /// and `ZohoCRM.settings.fields.ALL`: `{ env = "ZOHO_REFRESH_TOKEN" }`.
    pub refresh_token: SecretRef,
}

/// Why a Zoho sink cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("zoho `api_domain` must be an http or https address with a host and no path, not `{0}`")]
    ApiDomain(String),
    #[error("zoho `accounts_url` must be an http or https address with a host, not `{0}`")]
    AccountsUrl(String),
    #[error("zoho `client_id` is empty")]
    ClientId,
    #[error("zoho `client_secret`: {0}")]
    ClientSecret(#[source] SecretError),
    #[error("zoho `refresh_token`: {0}")]
    RefreshToken(#[source] SecretError),
    #[error("zoho http client: {0}")]
    Http(#[from] HttpError),
}

/// The Zoho CRM sink. Cheap to share; holds one [`HttpClient`].
pub struct ZohoCrm {
    /// For requests safe to repeat: retries 429, 5xx and timeouts.
    http: HttpClient,
    /// For `POST`: no blind retry after a timeout or a 5xx (Zoho may have
    /// stored the note); repeated here only after a 429. Same rate budget.
    oauth: OAuth2,
    /// `api_domain` without its trailing `/`.
    base: String,
    /// Kept to scrub them from any text a server might echo.
    secrets: Vec<SecretString>,
}

impl std::fmt::Debug for ZohoCrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZohoCrm")
            .field("api_domain", &self.base)
            .field("oauth", &self.oauth)
            .field("client_secret", &"[redacted]")
            .field("refresh_token", &"[redacted]")
            .finish()
    }
}

/// One result of a write, or a request-level error.
#[derive(Debug, Default, Clone, Deserialize)]
struct ApiResult {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Value,
}

impl ApiResult {
    fn ok(&self) -> bool {
        self.status.eq_ignore_ascii_case("success") || self.code == "SUCCESS"
    }

    fn id(&self) -> Option<String> {
        self.details.get("id").and_then(Value::as_str).map(str::trim).filter(|id| !id.is_empty()).map(str::to_owned)
    }

    fn describe(&self) -> String {
        let mut text = match (self.code.is_empty(), self.message.is_empty()) {
            (false, false) => format!("{}: {}", self.code, self.message),
            (false, true) => self.code.clone(),
            (true, false) => self.message.clone(),
            (true, true) => "Zoho refused this record without a message".into(),
        };
        if let Some(field) = self.details.get("api_name").and_then(Value::as_str) {
            text.push_str(&format!(" (field: {field})"));
        }
        text
    }

    /// A spent daily credit allowance (as opposed to a per-record error).
    fn is_credit_limit(&self) -> bool {
        let message = self.message.to_lowercase();
        matches!(self.code.as_str(), "LIMIT_EXCEEDED" | "API_LIMIT_EXCEEDED" | "CREDITS_EXCEEDED")
            || (message.contains("credit") && (message.contains("exceed") || message.contains("limit")))
    }
}

/// What one answer of a write holds.
enum Answer {
    Records(Vec<ApiResult>),
    Request(ApiResult),
    Unreadable,
}

fn read_answer(response: &HttpResponse) -> Answer {
    let Ok(body) = serde_json::from_slice::<Value>(&response.body) else { return Answer::Unreadable };
    if let Some(items) = body.get("data").and_then(Value::as_array) {
        return Answer::Records(
            items.iter().map(|item| serde_json::from_value(item.clone()).unwrap_or_default()).collect(),
        );
    }
    if body.get("code").is_some() || body.get("message").is_some() {
        return Answer::Request(serde_json::from_value(body).unwrap_or_default());
    }
    Answer::Unreadable
}

fn trimmed(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|value| !value.is_empty())
}

/// A Zoho record id: digits only.
fn is_record_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 30 && id.chars().all(|c| c.is_ascii_digit())
}

/// A field value as text: strings as they are, numbers and booleans
/// written out, a lookup or user (`{name, id}`) as its name, a multi-select
/// as its values joined by `; `; `None` for null and empty values.
fn property_text(value: &Value) -> Option<String> {
    let text = match value {
        Value::Null => return None,
        Value::String(text) => text.clone(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        Value::Array(items) => items.iter().filter_map(property_text).collect::<Vec<_>>().join("; "),
        Value::Object(fields) => match fields.get("name").and_then(Value::as_str) {
            Some(name) => name.to_owned(),
            None => value.to_string(),
        },
    };
    Some(text).filter(|text| !text.trim().is_empty())
}

/// How to merge in Zoho CRM what its API (as the v8 files describe it) cannot.
fn merge_in_zoho(survivor: &str, merged: &str) -> CrmError {
    CrmError::Unsupported(format!(
        "Zoho CRM's API (v8) has no merge of contacts: merge contact {merged} into {survivor} in Zoho CRM (open \
         contact {survivor}, … → Find and Merge, keeping {survivor} as the master record), then run the same \
         `tributary identity link` (or `tributary identity approve`) again: Tributary then sees the merge and moves \
         its records to {survivor}"
    ))
}

/// Escapes a value of a search `criteria` (`(`, `)` and `,` are syntax).
fn criteria_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '(' | ')' | ',' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn http_base(url: &Url) -> Option<String> {
    (matches!(url.scheme(), "http" | "https") && url.host_str().is_some() && !url.cannot_be_a_base())
        .then(|| url.as_str().trim_end_matches('/').to_owned())
}

/// Records merged by key: Zoho must not see the same person twice in a call.
#[derive(Default)]
struct Deduplicated {
    records: Vec<Map<String, Value>>,
    by_key: HashMap<String, usize>,
}

impl Deduplicated {
    fn put(&mut self, key: &str, record: Map<String, Value>) -> usize {
        match self.by_key.get(key) {
            Some(&index) => {
                self.records[index].extend(record);
                index
            }
            None => {
                self.by_key.insert(key.to_owned(), self.records.len());
                self.records.push(record);
                self.records.len() - 1
            }
        }
    }
}

impl ZohoCrm {
    pub fn new(config: ZohoConfig, http: HttpOptions) -> Result<ZohoCrm, BuildError> {
        let base = http_base(&config.api_domain)
            .filter(|_| config.api_domain.path() == "/" || config.api_domain.path().is_empty())
            .ok_or_else(|| BuildError::ApiDomain(config.api_domain.to_string()))?;
        let accounts =
            http_base(&config.accounts_url).ok_or_else(|| BuildError::AccountsUrl(config.accounts_url.to_string()))?;
        let client_id = config.client_id.trim();
        if client_id.is_empty() {
            return Err(BuildError::ClientId);
        }
        let client_secret = config.client_secret.resolve().map_err(BuildError::ClientSecret)?;
        let client_secret = SecretString::from(client_secret.expose_secret().trim().to_owned());
        let refresh_token = config.refresh_token.resolve().map_err(BuildError::RefreshToken)?;
        let refresh_token = SecretString::from(refresh_token.expose_secret().trim().to_owned());
        let token_url = Url::parse(&format!("{accounts}/oauth/v2/token"))
            .map_err(|_| BuildError::AccountsUrl(config.accounts_url.to_string()))?;
        let oauth = OAuth2::new(
            OAuth2Config {
                token_url,
                client_id: client_id.to_owned(),
                client_secret: Some(client_secret.clone()),
                client_auth: ClientAuth::Body,
                grant: Grant::RefreshToken(refresh_token.clone()),
                scope: None,
            },
            Arc::new(MemoryTokenStore::default()),
        );
        Ok(ZohoCrm { http: HttpClient::new(http)?, oauth, base, secrets: vec![client_secret, refresh_token] })
    }

    /// Keeps the access token in `store` (the daemon's state store), so a
    /// restart reuses it.
    pub fn with_token_store(self, store: Arc<dyn TokenStore>) -> ZohoCrm {
        ZohoCrm { oauth: self.oauth.with_store(store), ..self }
    }

    fn scrub(&self, text: &str) -> String {
        tributary_sdk::secret::redact(text, self.secrets.iter().map(|secret| secret.expose_secret()))
    }

    fn decode(&self, error: impl std::fmt::Display) -> CrmError {
        CrmError::Decode(self.scrub(&error.to_string()))
    }

    /// A status this connector does not expect.
    fn unexpected(&self, response: &HttpResponse) -> CrmError {
        CrmError::Http(HttpError::Status {
            target: response.target.clone(),
            status: response.status.as_u16(),
            attempts: 1,
            body: self.scrub(&response.body_snippet()),
        })
    }

    /// `Zoho-oauthtoken <token>` from the SDK's `Bearer <token>`, sensitive.
    fn zoho_header(bearer: &HeaderValue) -> Result<HeaderValue, CrmError> {
        let token = bearer
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| CrmError::Decode("the access token is not a valid header value".into()))?;
        let mut value = HeaderValue::from_str(&format!("Zoho-oauthtoken {token}"))
            .map_err(|_| CrmError::Decode("the access token is not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// An HTTP failure with any echoed secret scrubbed.
    fn http_error(&self, error: HttpError) -> CrmError {
        CrmError::Http(error.map_text(|text| self.scrub(text)))
    }

    fn oauth_error(&self, error: OAuthError) -> CrmError {
        match error {
            OAuthError::Http(error) => self.http_error(error),
            other => {
                let error = CrmError::from(other);
                match error {
                    CrmError::Auth(text) => CrmError::Auth(self.scrub(&text)),
                    CrmError::Decode(text) => CrmError::Decode(self.scrub(&text)),
                    other => other,
                }
            }
        }
    }

    /// One authenticated request. 401 (after one renewal) is
    /// [`CrmError::Auth`]; a spent credit allowance is
    /// [`CrmError::RateLimited`] (and holds the client); every other status
    /// is the caller's to read.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<HttpResponse, CrmError> {
        if let Some(wait) = self.http.held_for()
            && wait > self.http.options().max_inline_wait
        {
            return Err(CrmError::RateLimited { retry_after: wait });
        }
        let mut url = Url::parse(&format!("{}{path}", self.base))
            .map_err(|error| CrmError::Decode(format!("cannot build a request address: {error}")))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let (method, url) = (&method, &url);
        let send = |auth: HeaderValue| async move {
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .header(ACCEPT, "application/json")
                .header(AUTHORIZATION, auth);
            if let Some(body) = body {
                request = request.json(body);
            }
            // A create that may have reached Zoho is not sent twice (the next
            // delivery searches first); one refused with a 429 is.
            let sent =
                if method == Method::POST { self.http.send_once(request).await } else { self.http.send(request).await };
            sent.map_err(|error| self.http_error(error))
        };
        let bearer = self.oauth.bearer(&self.http).await.map_err(|error| self.oauth_error(error))?;
        let mut response = send(Self::zoho_header(&bearer)?).await?;
        if response.status.as_u16() == 401 {
            tracing::info!("zoho refused the access token; renewing it once");
            let renewed = self.oauth.renew(&self.http, &bearer).await.map_err(|error| self.oauth_error(error))?;
            response = send(Self::zoho_header(&renewed)?).await?;
        }
        if response.status.as_u16() == 401 {
            let detail = match read_answer(&response) {
                Answer::Request(error) => error.describe(),
                _ => response.body_snippet(),
            };
            return Err(CrmError::Auth(self.scrub(&format!("HTTP 401: {detail}"))));
        }
        if !response.status.is_success()
            && let Answer::Request(error) = read_answer(&response)
            && error.is_credit_limit()
        {
            self.http.hold(LIMIT_WAIT);
            tracing::warn!(code = %error.code, "zoho API credits spent; no request for an hour");
            return Err(CrmError::RateLimited { retry_after: LIMIT_WAIT });
        }
        Ok(response)
    }

    /// Sends `records` to a write endpoint, [`BATCH`] a call; one outcome per
    /// record, in order, with the record's id when done.
    async fn write(
        &self,
        method: Method,
        path: &str,
        records: &[Map<String, Value>],
        extra: &[(&str, Value)],
    ) -> Result<Vec<Result<String, ApiResult>>, CrmError> {
        let mut outcomes = Vec::with_capacity(records.len());
        for chunk in records.chunks(BATCH) {
            let mut body = Map::new();
            body.insert("data".into(), json!(chunk));
            for (name, value) in extra {
                body.insert((*name).to_owned(), value.clone());
            }
            let response = self.call(method.clone(), path, &[], Some(&Value::Object(body))).await?;
            outcomes.extend(self.read_results(&response, chunk.len())?);
        }
        Ok(outcomes)
    }

    /// One outcome per record of a write answer.
    fn read_results(&self, response: &HttpResponse, count: usize) -> Result<Vec<Result<String, ApiResult>>, CrmError> {
        let results = match read_answer(response) {
            Answer::Records(results) => results,
            Answer::Request(error) if response.status.is_client_error() => {
                return Err(CrmError::Transient(self.scrub(&format!(
                    "Zoho refused the whole request (has `tributary crm setup` run?): {}",
                    error.describe()
                ))));
            }
            _ => return Err(self.unexpected(response)),
        };
        let mut outcomes: Vec<Result<String, ApiResult>> = results
            .into_iter()
            .take(count)
            .map(|result| match (result.ok(), result.id()) {
                (true, Some(id)) => Ok(id),
                (true, None) => Err(ApiResult { message: "Zoho's answer for this record has no id".into(), ..result }),
                (false, _) => Err(result),
            })
            .collect();
        while outcomes.len() < count {
            outcomes.push(Err(ApiResult {
                message: "Zoho answered nothing for this record".into(),
                ..ApiResult::default()
            }));
        }
        Ok(outcomes)
    }

    fn rejected<T>(&self, error: &ApiResult) -> RecordOutcome<T> {
        RecordOutcome::Rejected(self.scrub(&error.describe()))
    }

    /// The notes of `contact_id` carrying a marker: marker line → note id.
    async fn marked_notes(&self, contact_id: &str) -> Result<HashMap<String, String>, CrmError> {
        let mut found = HashMap::new();
        let path = format!("/crm/v8/Contacts/{contact_id}/Notes");
        let per_page = NOTES_PER_PAGE.to_string();
        for page in 1..=MAX_NOTE_PAGES {
            let page = page.to_string();
            let query = [("fields", "Note_Content"), ("per_page", per_page.as_str()), ("page", page.as_str())];
            let response = self.call(Method::GET, &path, &query, None).await?;
            if response.status.as_u16() == 204 {
                break;
            }
            if !response.status.is_success() {
                return Err(self.unexpected(&response));
            }
            let body: Value = response.json().map_err(|error| self.decode(error))?;
            for note in body["data"].as_array().into_iter().flatten() {
                let (Some(id), Some(content)) = (note["id"].as_str(), note["Note_Content"].as_str()) else { continue };
                for line in content.lines().map(str::trim).filter(|line| line.starts_with("[tributary-key:")) {
                    found.entry(line.to_owned()).or_insert_with(|| id.to_owned());
                }
            }
            if body["info"]["more_records"].as_bool() != Some(true) {
                break;
            }
        }
        Ok(found)
    }

    async fn search_contact(&self, query: &[(&str, &str)]) -> Result<Option<String>, CrmError> {
        let response = self.call(Method::GET, "/crm/v8/Contacts/search", query, None).await?;
        match response.status.as_u16() {
            204 => Ok(None),
            200 => {
                let body: Value = response.json().map_err(|error| self.decode(error))?;
                Ok(body["data"]
                    .as_array()
                    .and_then(|items| items.first())
                    .and_then(|c| c["id"].as_str())
                    .map(str::to_owned))
            }
            400 => {
                match read_answer(&response) {
                    Answer::Request(error) => Err(CrmError::Transient(self.scrub(&format!(
                        "Zoho refused a search (has `tributary crm setup` run?): {}",
                        error.describe()
                    )))),
                    _ => Err(self.unexpected(&response)),
                }
            }
            _ => Err(self.unexpected(&response)),
        }
    }

    /// `GET /crm/v8/Contacts/{id}?fields=...`.
    async fn read_contact(&self, id: &str, names: &[&str]) -> Result<ContactRead, CrmError> {
        let fields = names.join(",");
        let path = format!("/crm/v8/Contacts/{id}");
        let response = self.call(Method::GET, &path, &[("fields", fields.as_str())], None).await?;
        if response.status.as_u16() == 204 {
            return Ok(ContactRead::Missing);
        }
        if response.status.is_success() {
            let body: Value = response.json().map_err(|error| self.decode(error))?;
            return Ok(match body["data"].as_array().and_then(|items| items.first()) {
                Some(Value::Object(record)) => ContactRead::Found(record.clone()),
                _ => ContactRead::Missing,
            });
        }
        if !response.status.is_client_error() {
            return Err(self.unexpected(&response));
        }
        let refusal = match read_answer(&response) {
            // An error about the record may ride in `data[]`.
            Answer::Records(records) => records.into_iter().next().unwrap_or_default(),
            Answer::Request(error) => error,
            Answer::Unreadable => return Err(self.unexpected(&response)),
        };
        let named = refusal.details.get("api_name").and_then(Value::as_str);
        if refusal.code == "INVALID_DATA" {
            if let Some(field) = named.and_then(|named| names.iter().find(|name| name.eq_ignore_ascii_case(named))) {
                return Ok(ContactRead::UnknownFields(vec![(*field).to_owned()]));
            }
            if named.is_none() || named == Some("id") {
                return Ok(ContactRead::Missing);
            }
        }
        Err(CrmError::Transient(self.scrub(&format!("Zoho refused to read contact {id}: {}", refusal.describe()))))
    }

    /// Creates one custom field; `false` when it already existed.
    async fn create_field(&self, spec: &fields::FieldSpec) -> Result<bool, CrmError> {
        let body = json!({ "fields": [spec.create_body()] });
        let response =
            self.call(Method::POST, "/crm/v8/settings/fields", &[("module", "Contacts")], Some(&body)).await?;
        let answer = match serde_json::from_slice::<Value>(&response.body) {
            Ok(body) => body,
            Err(_) if response.status.is_success() => return Ok(true),
            Err(_) => return Err(self.unexpected(&response)),
        };
        let result: ApiResult = answer["fields"]
            .as_array()
            .and_then(|items| items.first())
            .or(Some(&answer))
            .and_then(|item| serde_json::from_value(item.clone()).ok())
            .unwrap_or_default();
        if response.status.is_success() && (result.ok() || result.code.is_empty()) {
            return Ok(true);
        }
        if matches!(result.code.as_str(), "DUPLICATE_DATA" | "ALREADY_EXISTS" | "DUPLICATE_FIELD_LABEL") {
            return Ok(false);
        }
        Err(CrmError::Transient(self.scrub(&format!(
            "Zoho refused to create the field `{}`: {}",
            spec.api_name,
            result.describe()
        ))))
    }
}

#[async_trait]
impl Crm for ZohoCrm {
    fn kind(&self) -> &'static str {
        "zoho"
    }

    async fn check(&self) -> Result<(), CrmError> {
        let query = [("fields", "Last_Name"), ("per_page", "1")];
        let response = self.call(Method::GET, "/crm/v8/Contacts", &query, None).await?;
        if response.status.is_success() { Ok(()) } else { Err(self.unexpected(&response)) }
    }

    async fn setup(&self, platforms: &[String]) -> Result<SetupReport, CrmError> {
        let response = self.call(Method::GET, "/crm/v8/settings/fields", &[("module", "Contacts")], None).await?;
        if !response.status.is_success() {
            return Err(self.unexpected(&response));
        }
        let existing: Vec<String> = if response.status.as_u16() == 204 {
            Vec::new()
        } else {
            let body: Value = response.json().map_err(|error| self.decode(error))?;
            body["fields"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|field| field["api_name"].as_str())
                .map(str::to_lowercase)
                .collect()
        };
        let mut report = SetupReport::default();
        for spec in contact_fields(platforms) {
            let name = format!("Contacts.{}", spec.api_name);
            if existing.contains(&spec.api_name.to_lowercase()) || !self.create_field(&spec).await? {
                report.existing.push(name);
            } else {
                report.created.push(name);
            }
        }
        tracing::info!(created = report.created.len(), existing = report.existing.len(), "zoho setup done");
        Ok(report)
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        match lookup {
            ContactLookup::Email(email) => match trimmed(Some(email)) {
                Some(email) => self.search_contact(&[("email", email)]).await,
                None => Ok(None),
            },
            ContactLookup::Handle { platform, handle } => match trimmed(Some(handle)) {
                Some(handle) => {
                    let criteria = format!("({}:equals:{})", handle_field(platform), criteria_value(handle));
                    self.search_contact(&[("criteria", &criteria)]).await
                }
                None => Ok(None),
            },
        }
    }

    async fn upsert_contacts(&self, contacts: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let mut by_email = Deduplicated::default();
        let mut by_identity = Deduplicated::default();
        let mut owners: Vec<Result<(bool, usize), String>> = Vec::with_capacity(contacts.len());
        for contact in contacts {
            let mut record = Map::new();
            if let Some(handle) = trimmed(contact.handle.as_deref()) {
                record.insert(handle_field(&contact.platform), json!(cap(handle, TEXT_MAX)));
            }
            if let Some(url) = trimmed(contact.profile_url.as_deref()) {
                record.insert(profile_field(&contact.platform), json!(cap(url, TEXT_MAX)));
            }
            let identity = contact.identity.trim();
            let last_name = trimmed(contact.display_name.as_deref())
                .or(trimmed(contact.handle.as_deref()))
                .or(trimmed(Some(identity)))
                .map(|name| cap(name, LAST_NAME_MAX));
            match (trimmed(contact.email.as_deref()).map(str::to_lowercase), last_name) {
                (_, None) => owners.push(Err("the contact has neither an e-mail, a name nor an identity".into())),
                (Some(email), Some(name)) => {
                    record.insert("Email".into(), json!(email));
                    record.insert("Last_Name".into(), json!(name));
                    owners.push(Ok((true, by_email.put(&email, record))));
                }
                (None, Some(name)) if !identity.is_empty() => {
                    record.insert(IDENTITY.into(), json!(identity));
                    record.insert("Last_Name".into(), json!(name));
                    owners.push(Ok((false, by_identity.put(&identity.to_lowercase(), record))));
                }
                (None, Some(_)) => owners.push(Err("the contact has neither an e-mail nor an identity".into())),
            }
        }
        let mut written = [Vec::new(), Vec::new()];
        for (slot, (records, field)) in [(&by_identity, IDENTITY), (&by_email, "Email")].into_iter().enumerate() {
            if !records.records.is_empty() {
                let extra = [("duplicate_check_fields", json!([field]))];
                written[slot] = self.write(Method::POST, "/crm/v8/Contacts/upsert", &records.records, &extra).await?;
            }
        }
        Ok(owners
            .into_iter()
            .map(|owner| match owner {
                Ok((email, index)) => match written[usize::from(email)].get(index) {
                    Some(Ok(id)) => RecordOutcome::Done(id.clone()),
                    Some(Err(error)) => self.rejected(error),
                    None => RecordOutcome::Rejected("no answer for this record".into()),
                },
                Err(reason) => RecordOutcome::Rejected(reason),
            })
            .collect())
    }

    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let mut outcomes: Vec<Option<RecordOutcome<String>>> = vec![None; activities.len()];
        // (input index, note id) to update, and input indexes to create.
        let mut updates: Vec<(usize, String)> = Vec::new();
        let mut unknown: Vec<usize> = Vec::new();
        let mut notes: Vec<Map<String, Value>> = Vec::with_capacity(activities.len());
        // A key twice in one batch: one note, written with the later content.
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let mut aliases: Vec<(usize, usize)> = Vec::new();
        for (index, activity) in activities.iter().enumerate() {
            let key = activity.key.trim();
            let contact_id = activity.contact_id.trim();
            let mut note = Map::new();
            if let Some(&first) = first_of.get(key) {
                note.insert("Note_Title".into(), json!(note_title(&activity.contribution)));
                note.insert("Note_Content".into(), json!(note_content(key, &activity.contribution)));
                if let Some(earlier) = notes.get_mut(first)
                    && !earlier.is_empty()
                {
                    earlier.extend(note.clone());
                }
                aliases.push((index, first));
                notes.push(Map::new());
                continue;
            }
            first_of.insert(key.to_owned(), index);
            if key.is_empty() {
                outcomes[index] = Some(RecordOutcome::Rejected("the activity has no key".into()));
            } else if !is_record_id(contact_id) {
                outcomes[index] =
                    Some(RecordOutcome::Rejected(format!("`{}` is not a Zoho contact id", cap(contact_id, 40))));
            } else {
                note.insert("Note_Title".into(), json!(note_title(&activity.contribution)));
                note.insert("Note_Content".into(), json!(note_content(key, &activity.contribution)));
                note.insert("Parent_Id".into(), json!({ "module": { "api_name": "Contacts" }, "id": contact_id }));
                match trimmed(activity.existing_id.as_deref()).filter(|id| is_record_id(id)) {
                    Some(id) => updates.push((index, id.to_owned())),
                    None => unknown.push(index),
                }
            }
            notes.push(note);
        }
        // Without an id: search the contact's notes for the marker first.
        let mut searched: HashMap<String, HashMap<String, String>> = HashMap::new();
        let mut creates: Vec<usize> = Vec::new();
        for index in unknown {
            let contact_id = activities[index].contact_id.trim();
            if !searched.contains_key(contact_id) {
                let found = self.marked_notes(contact_id).await?;
                searched.insert(contact_id.to_owned(), found);
            }
            match searched.get(contact_id).and_then(|found| found.get(&marker(&activities[index].key))) {
                Some(id) => updates.push((index, id.clone())),
                None => creates.push(index),
            }
        }
        if !updates.is_empty() {
            let records: Vec<Map<String, Value>> = updates
                .iter()
                .map(|(index, id)| {
                    let mut record = notes[*index].clone();
                    record.insert("id".into(), json!(id));
                    record
                })
                .collect();
            let written = self.write(Method::PUT, "/crm/v8/Notes", &records, &[]).await?;
            for ((index, _), result) in updates.iter().zip(written) {
                outcomes[*index] = Some(match result {
                    Ok(id) => RecordOutcome::Done(id),
                    // The note is gone (deleted in the CRM): write it again.
                    Err(error)
                        if error.code == "INVALID_DATA" && error.details.get("api_name").is_none_or(|f| f == "id") =>
                    {
                        creates.push(*index);
                        continue;
                    }
                    Err(error) => self.rejected(&error),
                });
            }
        }
        if !creates.is_empty() {
            creates.sort_unstable();
            let records: Vec<Map<String, Value>> = creates.iter().map(|index| notes[*index].clone()).collect();
            let written = self.write(Method::POST, "/crm/v8/Notes", &records, &[]).await?;
            for (index, result) in creates.iter().zip(written) {
                outcomes[*index] = Some(match result {
                    Ok(id) => RecordOutcome::Done(id),
                    Err(error) => self.rejected(&error),
                });
            }
        }
        for (index, first) in aliases {
            outcomes[index] = outcomes[first].clone();
        }
        Ok(outcomes.into_iter().map(|o| o.unwrap_or_else(|| RecordOutcome::Rejected("not sent".into()))).collect())
    }

    /// Deletes the notes (into the recycle bin); one already gone counts as done.
    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut outcomes: Vec<Option<RecordOutcome<()>>> = vec![None; activity_ids.len()];
        let mut valid: Vec<(usize, &str)> = Vec::new();
        for (index, id) in activity_ids.iter().enumerate() {
            let id = id.trim();
            if is_record_id(id) {
                valid.push((index, id));
            } else {
                outcomes[index] = Some(RecordOutcome::Rejected(format!("`{}` is not a Zoho note id", cap(id, 40))));
            }
        }
        for chunk in valid.chunks(BATCH) {
            let ids = chunk.iter().map(|(_, id)| *id).collect::<Vec<_>>().join(",");
            let response = self.call(Method::DELETE, "/crm/v8/Notes", &[("ids", &ids)], None).await?;
            let results = match read_answer(&response) {
                Answer::Records(results) => results,
                _ => return Err(self.unexpected(&response)),
            };
            for (position, (index, id)) in chunk.iter().enumerate() {
                // Matched by id when Zoho names it, else by position.
                let result = results
                    .iter()
                    .find(|result| result.id().as_deref() == Some(*id))
                    .or_else(|| results.get(position).filter(|result| result.id().is_none()));
                outcomes[*index] = Some(match result {
                    Some(result) if result.ok() || result.code == "INVALID_DATA" => RecordOutcome::Done(()),
                    Some(result) => self.rejected(result),
                    None => RecordOutcome::Rejected("Zoho answered nothing for this record".into()),
                });
            }
        }
        Ok(outcomes.into_iter().map(|o| o.unwrap_or_else(|| RecordOutcome::Rejected("not sent".into()))).collect())
    }

    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut records = Deduplicated::default();
        let mut owners = Vec::with_capacity(rollups.len());
        for rollup in rollups {
            let id = rollup.contact_id.trim();
            if !is_record_id(id) {
                owners.push(Err(format!("`{}` is not a Zoho contact id", cap(id, 40))));
                continue;
            }
            let mut record = Map::new();
            record.insert("id".into(), json!(id));
            record.extend(rollup_fields(rollup));
            owners.push(Ok(records.put(id, record)));
        }
        let written = if records.records.is_empty() {
            Vec::new()
        } else {
            self.write(Method::PUT, "/crm/v8/Contacts", &records.records, &[]).await?
        };
        Ok(owners
            .into_iter()
            .map(|owner| match owner.map(|index| written.get(index)) {
                Ok(Some(Ok(_))) => RecordOutcome::Done(()),
                Ok(Some(Err(error))) => self.rejected(error),
                Ok(None) => RecordOutcome::Rejected("no answer for this record".into()),
                Err(reason) => RecordOutcome::Rejected(reason),
            })
            .collect())
    }

    /// The same `DELETE /crm/v8/Notes?ids=...` as [`Crm::archive_activities`]:
    /// Zoho keeps deleted notes in its recycle bin for 60 days, and the v8
    /// files offer no deletion that skips it.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        self.archive_activities(activity_ids).await
    }

    /// Zoho's v8 API has no merge of contacts: this reads both, and takes
    /// the merge as done when `merged` is gone while `survivor` exists (a
    /// merge made in Zoho CRM deletes the merged record).
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let (survivor, merged) = (survivor.trim(), merged.trim());
        for id in [survivor, merged] {
            if !is_record_id(id) {
                return Err(CrmError::Unsupported(format!(
                    "cannot merge Zoho contacts: `{}` is not a Zoho contact id",
                    cap(id, 40)
                )));
            }
        }
        if survivor == merged {
            return Ok(());
        }
        if matches!(self.read_contact(survivor, &["Last_Name"]).await?, ContactRead::Missing) {
            return Err(CrmError::Unsupported(format!(
                "cannot merge Zoho contact {merged} into {survivor}: Zoho has no contact {survivor}"
            )));
        }
        match self.read_contact(merged, &["Last_Name"]).await? {
            ContactRead::Missing => {
                tracing::info!(survivor, merged, "the contact to merge is gone from zoho; taking the merge as done");
                Ok(())
            }
            ContactRead::Found(_) | ContactRead::UnknownFields(_) => Err(merge_in_zoho(survivor, merged)),
        }
    }

    /// `GET /crm/v8/Contacts/{id}?fields=...`: the requested fields that
    /// have a value, under the names asked for. Names Zoho does not know are
    /// left out.
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, CrmError> {
        let contact_id = contact_id.trim();
        // Field API names are letters, digits and `_`; anything else cannot be one.
        let mut wanted: Vec<&str> = tributary_sdk::crm::property_names(names)
            .into_iter()
            .filter(|n| tributary_sdk::crm::is_api_name(n))
            .collect();
        if wanted.is_empty() {
            return Ok(Default::default());
        }
        if !is_record_id(contact_id) {
            return Err(CrmError::Unsupported(format!(
                "cannot read the properties of Zoho contact `{}`: not a Zoho contact id",
                cap(contact_id, 40)
            )));
        }
        let record = loop {
            match self.read_contact(contact_id, &wanted).await? {
                ContactRead::Found(record) => break record,
                ContactRead::Missing => {
                    return Err(CrmError::Transient(format!("Zoho has no contact {contact_id}")));
                }
                ContactRead::UnknownFields(unknown) => {
                    tracing::debug!(contact = contact_id, ?unknown, "zoho does not know these contact fields");
                    wanted.retain(|name| !unknown.iter().any(|gone| gone == name));
                    if wanted.is_empty() {
                        return Ok(Default::default());
                    }
                }
            }
        };
        Ok(wanted
            .iter()
            .filter_map(|name| {
                let value =
                    record.iter().find(|(field, _)| field.eq_ignore_ascii_case(name)).map(|(_, value)| value)?;
                Some(((*name).to_owned(), property_text(value)?))
            })
            .collect())
    }
}
