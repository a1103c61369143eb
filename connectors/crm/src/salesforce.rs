//! The Salesforce CRM sink (REST API, `api_version` `v61.0` by default).
//!
//! What it relies on, from Salesforce's REST API Developer Guide and Tooling
//! API guide (developer.salesforce.com, `api_rest` and `api_tooling`):
//!
//! - Auth: the OAuth 2.0 client credentials flow of a connected (or external
//!   client) app, `POST {instance_url}/services/oauth2/token` with
//!   `grant_type=client_credentials`, `client_id` and `client_secret` in the
//!   form body. The answer (`access_token`, `instance_url`, `token_type:
//!   Bearer`, no `expires_in`) is kept by the SDK's [`OAuth2`]; a request
//!   refused with 401 (`[{"errorCode": "INVALID_SESSION_ID"}]`, the session
//!   timed out) gets one new token and one retry.
//! - Contacts: sObject Collections upsert, `PATCH /services/data/vXX.X/
//!   composite/sobjects/Contact/Tributary_Identity__c` with `{"allOrNone":
//!   false, "records": [{"attributes": {"type": "Contact"}, ...}]}`, at most
//!   200 records, answered 200 with one `{id, success, created, errors:
//!   [{statusCode, message, fields}]}` per record, in request order.
//!   Salesforce cannot upsert on `Email`: authors with an e-mail are looked
//!   up first (`GET /query?q=SELECT Id, Email, Tributary_Identity__c FROM
//!   Contact WHERE Email IN (...)`, case-insensitive in SOQL). A match with
//!   an identity is upserted under it; a match without one is updated by
//!   id (Collections update) and given `email:<address>`; no match is
//!   created with the identity `email:<lowercased address>`. So one person
//!   is one Contact. `LastName` (required) is the display name or handle,
//!   written only when Tributary may create the record or owns it (people
//!   without e-mail): the name of a known contact belongs to the CRM.
//! - Activities: each contribution is a completed Task (`WhoId` = the
//!   contact, `Subject`, plain-text `Description`, `ActivityDate`) upserted
//!   on the External ID `Tributary_Key__c` the same way, so a replay updates
//!   the same Task. `existing_id` is not needed.
//! - Archiving and deleting: `DELETE /composite/sobjects?ids=...&allOrNone=false`
//!   (200 ids a call). Deleted Tasks go to the Recycle Bin, restorable there
//!   for 15 days, after which Salesforce purges them; `ENTITY_IS_DELETED` or
//!   `NOT_FOUND` counts as done. Emptying the Recycle Bin at once
//!   (`emptyRecycleBin`) is a SOAP and Apex call only: the REST API has no
//!   deletion that skips the bin, so `delete_activities` is the same call.
//! - Rollups: Collections update, `PATCH /composite/sobjects` with
//!   `attributes.type` and `id`: the totals, the last contribution's link and
//!   excerpt (one line), the 90-day figures, the attention checkbox and, per
//!   platform, first and last sighting and contribution count, all in the
//!   one call. A figure without a value is written `null`, so an earlier
//!   value never stays.
//! - Contact properties (for alert rules): `GET /sobjects/Contact/{id}?fields=a,b`.
//!   A name Salesforce does not know (`INVALID_FIELD`, "No such column 'x'")
//!   is left out and the rest asked again.
//! - Merging: Salesforce's REST API cannot merge records (merging is a SOAP
//!   and Apex call). `merge_contacts` reads both contacts with
//!   `GET /queryAll?q=SELECT Id, IsDeleted, MasterRecordId FROM Contact ...`
//!   (deleted records included): a merged contact deleted with the survivor
//!   as its `MasterRecordId` was merged in Salesforce (whose merge moves the
//!   Tasks to the master record), and that is done; a contact still alive
//!   gets [`CrmError::Unsupported`] saying how to merge it in Salesforce.
//! - Limits: every answer carries `Sforce-Limit-Info: api-usage=NNN/MMM`, the
//!   org's rolling 24-hour allocation; once spent no request leaves for an
//!   hour. Salesforce refuses calls past it with HTTP 403 and
//!   `[{"errorCode": "REQUEST_LIMIT_EXCEEDED", "message": ...}]` (not 429):
//!   that is [`CrmError::RateLimited`] with an hour's wait, and the shared
//!   client is held meanwhile.
//! - Errors: request-level errors are a JSON array of `{message, errorCode,
//!   fields}`; record-level ones ride in the results. A record refused is
//!   `Rejected("STATUS_CODE: message")` while the rest lands.
//! - `setup`: custom fields through the Tooling API, `POST /tooling/sobjects/
//!   CustomField` with `FullName` (`Contact.X__c`, `Activity.X__c` for Task
//!   fields) and `Metadata {type, label, length, externalId, unique}`,
//!   after `GET /tooling/query` of the `CustomField`s on Contact and
//!   Activity; `DUPLICATE_DEVELOPER_NAME` also counts as existing. Fields
//!   created so get no field-level security: grant the integration user
//!   edit access to them (a permission set) before the first sync.
//!
//! Requests go to the configured `instance_url` (the token answer's own
//! `instance_url` is not followed). The client secret and the tokens are
//! never in a log line, an error or `Debug` output.

mod fields;

#[cfg(test)]
mod tests;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use reqwest::{Method, header::ACCEPT};
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
    DESCRIPTION_MAX, FieldSpec, IDENTITY, KEY, LAST_NAME_MAX, TEXT_MAX, cap, contact_fields, contributions_field,
    description, first_seen_field, handle_field, last_seen_field, one_line, profile_field, sentiment, soql_literal,
    subject, task_fields, timestamp, web_link,
};

/// Records per sObject Collections call.
const COLLECTION_LIMIT: usize = 200;
/// E-mail addresses per lookup query, keeping the URL short.
const EMAILS_PER_QUERY: usize = 50;
/// How long an exhausted daily allocation holds every request.
const LIMIT_WAIT: Duration = Duration::from_secs(3600);

/// Settings of the Salesforce sink (the `[crm]` table with `type = "salesforce"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConfig {
    /// The org's My Domain address, e.g. `https://acme.my.salesforce.com`:
    /// the token endpoint and the REST API live under it.
    pub instance_url: Url,
    /// REST API version, `vNN.N`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Consumer key of the connected app with the client credentials flow
    /// enabled (and a run-as integration user).
    pub client_id: String,
    /// Consumer secret of that app: `{ env = "SALESFORCE_CLIENT_SECRET" }`
    /// or `{ file = "salesforce" }`.
    pub client_secret: SecretRef,
}

fn default_api_version() -> String {
    "v61.0".to_owned()
}

/// Why a Salesforce sink cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("salesforce `instance_url` must be an http or https address with a host, not `{0}`")]
    InstanceUrl(String),
    #[error("salesforce `api_version` must look like `v61.0`, not `{0}`")]
    ApiVersion(String),
    #[error("salesforce `client_id` is empty")]
    ClientId,
    #[error("salesforce `client_secret`: {0}")]
    ClientSecret(#[from] SecretError),
    #[error("salesforce http client: {0}")]
    Http(#[from] HttpError),
}

/// The Salesforce sink. Cheap to share; holds one [`HttpClient`].
pub struct SalesforceCrm {
    http: HttpClient,
    oauth: OAuth2,
    /// `instance_url` without its trailing `/`.
    base: String,
    api_version: String,
    /// Kept to scrub it from any text a server might echo.
    client_secret: SecretString,
}

impl std::fmt::Debug for SalesforceCrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalesforceCrm")
            .field("instance_url", &self.base)
            .field("api_version", &self.api_version)
            .field("oauth", &self.oauth)
            .field("client_secret", &"[redacted]")
            .finish()
    }
}

/// One error of Salesforce's: request level (`errorCode`) or of a record (`statusCode`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiError {
    #[serde(default, alias = "statusCode")]
    error_code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    fields: Vec<String>,
}

impl ApiError {
    fn describe(&self) -> String {
        let mut text = match (self.error_code.is_empty(), self.message.is_empty()) {
            (false, false) => format!("{}: {}", self.error_code, self.message),
            (false, true) => self.error_code.clone(),
            (true, false) => self.message.clone(),
            (true, true) => "Salesforce refused this record without a message".into(),
        };
        if !self.fields.is_empty() {
            text.push_str(&format!(" (fields: {})", self.fields.join(", ")));
        }
        text
    }
}

/// The errors of a request-level failure: a JSON array, or one object.
fn api_errors(response: &HttpResponse) -> Vec<ApiError> {
    match serde_json::from_slice::<Value>(&response.body) {
        Ok(Value::Array(items)) => items.into_iter().filter_map(|item| serde_json::from_value(item).ok()).collect(),
        Ok(object @ Value::Object(_)) => serde_json::from_value(object).map(|e| vec![e]).unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn describe_errors(response: &HttpResponse) -> String {
    let errors = api_errors(response);
    if errors.is_empty() {
        return format!("HTTP {}: {}", response.status.as_u16(), response.body_snippet());
    }
    errors.iter().map(ApiError::describe).collect::<Vec<_>>().join("; ")
}

/// One record's result in a Collections answer (SaveResult, UpsertResult, DeleteResult).
#[derive(Debug, Deserialize)]
struct RecordResult {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<ApiError>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryAnswer {
    #[serde(default)]
    records: Vec<Value>,
    #[serde(default)]
    next_records_url: Option<String>,
}

/// What the e-mail lookup found for one address.
#[derive(Debug, Clone)]
struct Found {
    id: String,
    identity: Option<String>,
}

/// Records keyed by their upsert key (or id): a later record merges into
/// an earlier one with the same key, as Salesforce refuses a key twice.
/// External IDs are case-insensitive, record ids are not: callers pass
/// upsert keys lowercased and ids as they are.
struct Deduplicated {
    records: Vec<Map<String, Value>>,
    by_key: HashMap<String, usize>,
}

impl Deduplicated {
    fn new() -> Self {
        Deduplicated { records: Vec::new(), by_key: HashMap::new() }
    }

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

/// Where a record's outcome comes from.
enum Owner {
    Upsert(usize),
    Update(usize),
    Refused(String),
}

fn trimmed(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|value| !value.is_empty())
}

/// A Salesforce record id: 15 or 18 letters and digits.
fn is_record_id(id: &str) -> bool {
    matches!(id.len(), 15 | 18) && id.chars().all(|c| c.is_ascii_alphanumeric())
}

impl SalesforceCrm {
    pub fn new(config: SalesforceConfig, http: HttpOptions) -> Result<SalesforceCrm, BuildError> {
        let url = &config.instance_url;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || url.cannot_be_a_base() {
            return Err(BuildError::InstanceUrl(url.to_string()));
        }
        let version = config.api_version.trim();
        let valid_version =
            version.strip_prefix('v').and_then(|rest| rest.split_once('.')).is_some_and(|(major, minor)| {
                !major.is_empty()
                    && !minor.is_empty()
                    && major.chars().all(|c| c.is_ascii_digit())
                    && minor.chars().all(|c| c.is_ascii_digit())
            });
        if !valid_version {
            return Err(BuildError::ApiVersion(config.api_version.clone()));
        }
        let client_id = config.client_id.trim();
        if client_id.is_empty() {
            return Err(BuildError::ClientId);
        }
        let secret = config.client_secret.resolve()?;
        let client_secret = SecretString::from(secret.expose_secret().trim().to_owned());
        let base = url.as_str().trim_end_matches('/').to_owned();
        let token_url = Url::parse(&format!("{base}/services/oauth2/token"))
            .map_err(|_| BuildError::InstanceUrl(url.to_string()))?;
        let oauth = OAuth2::new(
            OAuth2Config {
                token_url,
                client_id: client_id.to_owned(),
                client_secret: Some(client_secret.clone()),
                client_auth: ClientAuth::Body,
                grant: Grant::ClientCredentials,
                scope: None,
            },
            Arc::new(MemoryTokenStore::default()),
        );
        Ok(SalesforceCrm { http: HttpClient::new(http)?, oauth, base, api_version: version.to_owned(), client_secret })
    }

    /// Keeps the access token in `store` (the daemon's state store), so a
    /// restart reuses it.
    pub fn with_token_store(self, store: Arc<dyn TokenStore>) -> SalesforceCrm {
        SalesforceCrm { oauth: self.oauth.with_store(store), ..self }
    }

    /// `/services/data/vXX.X` + `path`.
    fn api_path(&self, path: &str) -> String {
        format!("/services/data/{}{path}", self.api_version)
    }

    fn scrub(&self, text: &str) -> String {
        tributary_sdk::secret::redact(text, [self.client_secret.expose_secret()])
    }

    /// One authenticated request. 401 (after the one renewal) is
    /// [`CrmError::Auth`], 403 `REQUEST_LIMIT_EXCEEDED` is
    /// [`CrmError::RateLimited`] (and holds the client), any other 403
    /// [`CrmError::Auth`]; every other status is the caller's to read.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<HttpResponse, CrmError> {
        // Held for longer than the client would wait inline (an allocation
        // spent): no request, not even for a token.
        if let Some(wait) = self.http.held_for()
            && wait > self.http.options().max_inline_wait
        {
            return Err(CrmError::RateLimited { retry_after: wait });
        }
        let mut url = Url::parse(&format!("{}{}", self.base, self.api_path(path)))
            .map_err(|error| CrmError::Decode(format!("cannot build a request address: {error}")))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let build = || {
            let request = self.http.request(method.clone(), url.clone()).header(ACCEPT, "application/json");
            match body {
                Some(body) => request.json(body),
                None => request,
            }
        };
        let response = match self.oauth.send(&self.http, build).await {
            Ok(response) => response,
            Err(OAuthError::Http(HttpError::Status { target, status, attempts, body })) => {
                return Err(CrmError::Http(HttpError::Status { target, status, attempts, body: self.scrub(&body) }));
            }
            Err(error) => return Err(CrmError::from(error)),
        };
        self.note_limit_info(&response);
        match response.status.as_u16() {
            401 => Err(CrmError::Auth(self.scrub(&format!("HTTP 401: {}", describe_errors(&response))))),
            403 => {
                if api_errors(&response).iter().any(|error| error.error_code == "REQUEST_LIMIT_EXCEEDED") {
                    self.http.hold(LIMIT_WAIT);
                    tracing::warn!("salesforce API request limit exceeded; no request for an hour");
                    return Err(CrmError::RateLimited { retry_after: LIMIT_WAIT });
                }
                Err(CrmError::Auth(self.scrub(&format!("HTTP 403: {}", describe_errors(&response)))))
            }
            _ => Ok(response),
        }
    }

    /// `Sforce-Limit-Info: api-usage=NNN/MMM`: at the allocation, hold.
    fn note_limit_info(&self, response: &HttpResponse) {
        let Some(info) = response.header("sforce-limit-info") else { return };
        let usage = info
            .split(',')
            .filter_map(|part| part.trim().strip_prefix("api-usage="))
            .find_map(|usage| usage.split_once('/'))
            .and_then(|(used, max)| Some((used.trim().parse::<u64>().ok()?, max.trim().parse::<u64>().ok()?)));
        if let Some((used, max)) = usage
            && max > 0
            && used >= max
        {
            tracing::warn!(used, max, "salesforce daily API allocation spent; no request for an hour");
            self.http.hold(LIMIT_WAIT);
        }
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

    fn decode(&self, error: impl std::fmt::Display) -> CrmError {
        CrmError::Decode(self.scrub(&error.to_string()))
    }

    /// A SOQL query, following `nextRecordsUrl` to the end.
    async fn query(&self, soql: &str, tooling: bool) -> Result<Vec<Value>, CrmError> {
        self.query_at(if tooling { "/tooling/query" } else { "/query" }, soql).await
    }

    /// A SOQL query on `path` (`/query`, `/queryAll`, `/tooling/query`),
    /// following `nextRecordsUrl` to the end.
    async fn query_at(&self, path: &str, soql: &str) -> Result<Vec<Value>, CrmError> {
        let response = self.call(Method::GET, path, &[("q", soql)], None).await?;
        let mut records = Vec::new();
        let mut response = response;
        loop {
            if response.status.as_u16() == 400 {
                return Err(CrmError::Transient(self.scrub(&format!(
                    "Salesforce refused a query (has `tributary crm setup` run?): {}",
                    describe_errors(&response)
                ))));
            }
            if !response.status.is_success() {
                return Err(self.unexpected(&response));
            }
            let answer: QueryAnswer = response.json().map_err(|error| self.decode(error))?;
            records.extend(answer.records);
            // `/services/data/vXX.X/query/01g...-2000`: strip to our api path.
            let Some(next) = answer.next_records_url else { return Ok(records) };
            let prefix = self.api_path("");
            let Some(rest) = next.strip_prefix(&prefix) else {
                return Err(self.decode(format!("an unexpected nextRecordsUrl `{next}`")));
            };
            response = self.call(Method::GET, rest, &[], None).await?;
        }
    }

    /// Sends `records` to a Collections endpoint, 200 a call; one outcome
    /// per record, in order (Salesforce answers in request order).
    async fn write_collection(
        &self,
        path: &str,
        records: Vec<Map<String, Value>>,
    ) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let mut outcomes = Vec::with_capacity(records.len());
        for chunk in records.chunks(COLLECTION_LIMIT) {
            let body = json!({ "allOrNone": false, "records": chunk });
            let response = self.call(Method::PATCH, path, &[], Some(&body)).await?;
            outcomes.extend(self.read_results(&response, chunk.len())?);
        }
        Ok(outcomes)
    }

    /// One outcome per record of a Collections answer.
    fn read_results(&self, response: &HttpResponse, count: usize) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        match response.status.as_u16() {
            200 => {}
            400 => {
                return Err(CrmError::Transient(self.scrub(&format!(
                    "Salesforce refused the whole request (a field Tributary writes may be missing: \
                     run `tributary crm setup` and grant the integration user access to the fields): {}",
                    describe_errors(response)
                ))));
            }
            _ => return Err(self.unexpected(response)),
        }
        let results: Vec<RecordResult> = response.json().map_err(|error| self.decode(error))?;
        let mut outcomes: Vec<RecordOutcome<String>> = results
            .into_iter()
            .take(count)
            .map(|result| match (result.success, result.id) {
                (true, Some(id)) if !id.is_empty() => RecordOutcome::Done(id),
                (true, _) => RecordOutcome::Rejected("Salesforce's answer for this record has no id".into()),
                (false, _) => RecordOutcome::Rejected(self.scrub(&record_errors(&result.errors))),
            })
            .collect();
        outcomes.resize(count, RecordOutcome::Rejected("Salesforce answered nothing for this record".into()));
        Ok(outcomes)
    }

    /// The contacts matching `emails` (lowercased), the oldest first and one
    /// with an identity preferred.
    async fn contacts_by_email(&self, emails: &[String]) -> Result<HashMap<String, Found>, CrmError> {
        let mut found: HashMap<String, Found> = HashMap::new();
        for chunk in emails.chunks(EMAILS_PER_QUERY) {
            let list = chunk.iter().map(|email| soql_literal(email)).collect::<Vec<_>>().join(", ");
            let soql =
                format!("SELECT Id, Email, {IDENTITY} FROM Contact WHERE Email IN ({list}) ORDER BY CreatedDate ASC");
            for record in self.query(&soql, false).await? {
                let (Some(id), Some(email)) = (record["Id"].as_str(), record["Email"].as_str()) else { continue };
                let identity = trimmed(record[IDENTITY].as_str()).map(str::to_owned);
                let entry = found.entry(email.trim().to_lowercase());
                let candidate = Found { id: id.to_owned(), identity };
                match entry {
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(candidate);
                    }
                    std::collections::hash_map::Entry::Occupied(mut slot) => {
                        if slot.get().identity.is_none() && candidate.identity.is_some() {
                            slot.insert(candidate);
                        }
                    }
                }
            }
        }
        Ok(found)
    }

    /// The rollup fields of one contact.
    fn rollup_fields(rollup: &Rollup) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert("Tributary_Last_Contribution__c".into(), json!(timestamp(rollup.last_contribution_at)));
        fields.insert("Tributary_Last_Platform__c".into(), json!(cap(&rollup.last_platform, 80)));
        fields.insert("Tributary_Contribution_Count__c".into(), json!(rollup.contribution_count));
        fields.insert("Tributary_Platforms__c".into(), json!(cap(&rollup.platforms.join(";"), TEXT_MAX)));
        if let Some(value) = sentiment(rollup.sentiment_avg) {
            fields.insert("Tributary_Sentiment__c".into(), json!(value));
        }
        fields.insert("Tributary_Questions__c".into(), json!(rollup.questions));
        fields.insert("Tributary_Complaints__c".into(), json!(rollup.complaints));
        fields.insert("Tributary_Ideas__c".into(), json!(rollup.ideas));
        fields.insert("Tributary_Praise__c".into(), json!(rollup.praise));
        // A link cut short would lead nowhere: one longer than the field is left empty.
        let last_url = rollup.last_url.as_deref().and_then(web_link).filter(|url| url.chars().count() <= TEXT_MAX);
        fields.insert("Tributary_Last_Url__c".into(), json!(last_url));
        let excerpt = rollup.last_excerpt.as_deref().map(|text| one_line(text, TEXT_MAX)).filter(|t| !t.is_empty());
        fields.insert("Tributary_Last_Excerpt__c".into(), json!(excerpt));
        fields.insert("Tributary_Contributions_90d__c".into(), json!(rollup.count_90d));
        fields.insert("Tributary_Sentiment_90d__c".into(), json!(rollup.sentiment_avg_90d.and_then(sentiment)));
        fields.insert("Tributary_Needs_Attention__c".into(), json!(rollup.needs_attention));
        let reason = rollup.attention_reason.as_deref().map(|text| one_line(text, TEXT_MAX)).filter(|t| !t.is_empty());
        fields.insert("Tributary_Attention_Reason__c".into(), json!(reason));
        for platform in &rollup.per_platform {
            fields.insert(first_seen_field(&platform.platform), json!(timestamp(platform.first_seen)));
            fields.insert(last_seen_field(&platform.platform), json!(timestamp(platform.last_seen)));
            fields.insert(contributions_field(&platform.platform), json!(platform.contributions));
        }
        fields
    }

    /// `GET /sobjects/Contact/{id}?fields=...`; the field names Salesforce
    /// refused as unknown (`INVALID_FIELD`) in `Err`.
    async fn contact_fields(&self, id: &str, names: &[&str]) -> Result<Result<Value, Vec<String>>, CrmError> {
        let fields = names.join(",");
        let response =
            self.call(Method::GET, &format!("/sobjects/Contact/{id}"), &[("fields", fields.as_str())], None).await?;
        match response.status.as_u16() {
            200 => response.json().map(Ok).map_err(|error| self.decode(error)),
            400 => {
                let errors = api_errors(&response);
                let unknown: Vec<String> = errors
                    .iter()
                    .filter(|error| error.error_code == "INVALID_FIELD")
                    .flat_map(|error| quoted(&error.message))
                    .filter_map(|quoted| names.iter().find(|name| name.eq_ignore_ascii_case(&quoted)))
                    .map(|name| (*name).to_owned())
                    .collect();
                if unknown.is_empty() {
                    return Err(CrmError::Transient(
                        self.scrub(&format!("Salesforce refused to read contact {id}: {}", describe_errors(&response))),
                    ));
                }
                Ok(Err(unknown))
            }
            404 => Err(CrmError::Transient(
                self.scrub(&format!("Salesforce has no contact {id}: {}", describe_errors(&response))),
            )),
            _ => Err(self.unexpected(&response)),
        }
    }

    /// Creates one custom field; `false` when it already existed.
    async fn create_field(&self, spec: &FieldSpec) -> Result<bool, CrmError> {
        let body = spec.create_body();
        let response = self.call(Method::POST, "/tooling/sobjects/CustomField", &[], Some(&body)).await?;
        if response.status.is_success() {
            return Ok(true);
        }
        if api_errors(&response).iter().any(|error| error.error_code == "DUPLICATE_DEVELOPER_NAME") {
            return Ok(false);
        }
        Err(CrmError::Transient(self.scrub(&format!(
            "Salesforce refused to create {}: {}",
            spec.full_name(),
            describe_errors(&response)
        ))))
    }
}

fn record_errors(errors: &[ApiError]) -> String {
    if errors.is_empty() {
        return "Salesforce refused this record without a message".into();
    }
    errors.iter().map(ApiError::describe).collect::<Vec<_>>().join("; ")
}

fn attributes(object: &str) -> Value {
    json!({ "type": object })
}

/// The texts between single quotes in a message (`No such column 'X' on entity 'Contact'`).
fn quoted(message: &str) -> Vec<String> {
    message.split('\'').skip(1).step_by(2).map(str::to_owned).collect()
}

/// A field value as text: strings as they are, numbers and booleans
/// written out; `None` for null and empty values. A compound value (an
/// address) is its JSON.
fn property_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone()).filter(|text| !text.trim().is_empty()),
        Value::Bool(flag) => Some(flag.to_string()),
        Value::Number(number) => Some(number.to_string()),
        other => Some(other.to_string()),
    }
}

/// The first 15 characters of a record id: an 18-character id and its
/// 15-character form name the same record.
fn same_record(a: &str, b: &str) -> bool {
    let short = |id: &str| id.chars().take(15).collect::<String>();
    is_record_id(a) && is_record_id(b) && short(a) == short(b)
}

/// How to merge in Salesforce what its REST API cannot.
fn merge_in_salesforce(survivor: &str, merged: &str) -> CrmError {
    CrmError::Unsupported(format!(
        "Salesforce's REST API cannot merge contacts (merging is a SOAP and Apex call only): merge contact \
         {merged} into {survivor} in Salesforce (Contacts → Merge Contacts, keeping {survivor} as the master \
         record), then run the same `tributary identity link` (or `tributary identity approve`) again: \
         Tributary then sees the merge and moves its records to {survivor}"
    ))
}

#[async_trait]
impl Crm for SalesforceCrm {
    fn kind(&self) -> &'static str {
        "salesforce"
    }

    async fn check(&self) -> Result<(), CrmError> {
        let response = self.call(Method::GET, "/query", &[("q", "SELECT Id FROM Contact LIMIT 1")], None).await?;
        if response.status.is_success() { Ok(()) } else { Err(self.unexpected(&response)) }
    }

    async fn setup(&self, platforms: &[String]) -> Result<SetupReport, CrmError> {
        let soql = "SELECT Id, DeveloperName, TableEnumOrId FROM CustomField \
                    WHERE TableEnumOrId IN ('Contact', 'Activity')";
        let existing: Vec<String> = self
            .query(soql, true)
            .await?
            .iter()
            .filter_map(|record| {
                let table = record["TableEnumOrId"].as_str()?;
                let name = record["DeveloperName"].as_str()?;
                Some(format!("{table}.{name}__c").to_lowercase())
            })
            .collect();
        let mut report = SetupReport::default();
        for spec in contact_fields(platforms).into_iter().chain(task_fields()) {
            let full_name = spec.full_name();
            if existing.contains(&full_name.to_lowercase()) || !self.create_field(&spec).await? {
                report.existing.push(full_name);
            } else {
                report.created.push(full_name);
            }
        }
        tracing::info!(created = report.created.len(), existing = report.existing.len(), "salesforce setup done");
        Ok(report)
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        let (field, value) = match lookup {
            ContactLookup::Email(email) => ("Email".to_owned(), email.trim().to_owned()),
            ContactLookup::Handle { platform, handle } => (handle_field(platform), handle.trim().to_owned()),
        };
        if value.is_empty() {
            return Ok(None);
        }
        let soql =
            format!("SELECT Id FROM Contact WHERE {field} = {} ORDER BY CreatedDate ASC LIMIT 1", soql_literal(&value));
        let records = self.query(&soql, false).await?;
        Ok(records.first().and_then(|record| record["Id"].as_str()).map(str::to_owned))
    }

    async fn upsert_contacts(&self, contacts: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        if contacts.is_empty() {
            return Ok(Vec::new());
        }
        let emails: Vec<Option<String>> =
            contacts.iter().map(|c| trimmed(c.email.as_deref()).map(str::to_lowercase)).collect();
        let mut wanted: Vec<String> = emails.iter().flatten().cloned().collect();
        wanted.sort();
        wanted.dedup();
        let found = if wanted.is_empty() { HashMap::new() } else { self.contacts_by_email(&wanted).await? };

        let mut upserts = Deduplicated::new();
        let mut updates = Deduplicated::new();
        let mut owners = Vec::with_capacity(contacts.len());
        for (contact, email) in contacts.iter().zip(&emails) {
            let mut record = Map::new();
            if let Some(handle) = trimmed(contact.handle.as_deref()) {
                record.insert(handle_field(&contact.platform), json!(cap(handle, TEXT_MAX)));
            }
            if let Some(url) = trimmed(contact.profile_url.as_deref()) {
                record.insert(profile_field(&contact.platform), json!(cap(url, TEXT_MAX)));
            }
            let last_name = trimmed(contact.display_name.as_deref())
                .or(trimmed(contact.handle.as_deref()))
                .or(trimmed(Some(&contact.identity)))
                .map(|name| cap(name, LAST_NAME_MAX));
            match (email, email.as_ref().and_then(|email| found.get(email))) {
                (None, _) => {
                    let identity = contact.identity.trim();
                    if identity.is_empty() {
                        owners.push(Owner::Refused("the contact has neither an e-mail nor an identity".into()));
                        continue;
                    }
                    record.insert(IDENTITY.into(), json!(identity));
                    if let Some(name) = last_name {
                        record.insert("LastName".into(), json!(name));
                    }
                    owners.push(Owner::Upsert(upserts.put(&identity.to_lowercase(), record)));
                }
                (Some(_), Some(Found { identity: Some(identity), .. })) => {
                    record.insert(IDENTITY.into(), json!(identity));
                    owners.push(Owner::Upsert(upserts.put(&identity.to_lowercase(), record)));
                }
                (Some(email), Some(Found { id, identity: None })) => {
                    record.insert(IDENTITY.into(), json!(format!("email:{email}")));
                    record.insert("id".into(), json!(id));
                    owners.push(Owner::Update(updates.put(id, record)));
                }
                (Some(email), None) => {
                    let identity = format!("email:{email}");
                    record.insert(IDENTITY.into(), json!(identity));
                    record.insert("Email".into(), json!(email));
                    if let Some(name) = last_name {
                        record.insert("LastName".into(), json!(name));
                    }
                    owners.push(Owner::Upsert(upserts.put(&identity, record)));
                }
            }
        }
        let with_type = |records: Vec<Map<String, Value>>| -> Vec<Map<String, Value>> {
            records
                .into_iter()
                .map(|fields| {
                    let mut record = Map::new();
                    record.insert("attributes".into(), attributes("Contact"));
                    record.extend(fields);
                    record
                })
                .collect()
        };
        let upserted = if upserts.records.is_empty() {
            Vec::new()
        } else {
            let path = format!("/composite/sobjects/Contact/{IDENTITY}");
            self.write_collection(&path, with_type(upserts.records)).await?
        };
        let updated = if updates.records.is_empty() {
            Vec::new()
        } else {
            self.write_collection("/composite/sobjects", with_type(updates.records)).await?
        };
        let missing = || RecordOutcome::Rejected("no answer for this record".into());
        Ok(owners
            .into_iter()
            .map(|owner| match owner {
                Owner::Upsert(index) => upserted.get(index).cloned().unwrap_or_else(missing),
                Owner::Update(index) => updated.get(index).cloned().unwrap_or_else(missing),
                Owner::Refused(reason) => RecordOutcome::Rejected(reason),
            })
            .collect())
    }

    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        if activities.is_empty() {
            return Ok(Vec::new());
        }
        let mut tasks = Deduplicated::new();
        let mut owners = Vec::with_capacity(activities.len());
        for activity in activities {
            let key = activity.key.trim();
            let contact_id = activity.contact_id.trim();
            if key.is_empty() {
                owners.push(Err("the activity has no key".to_owned()));
                continue;
            }
            if contact_id.is_empty() {
                owners.push(Err("the activity has no contact id".to_owned()));
                continue;
            }
            let contribution = &activity.contribution;
            let mut record = Map::new();
            record.insert("attributes".into(), attributes("Task"));
            record.insert(KEY.into(), json!(key));
            record.insert("WhoId".into(), json!(contact_id));
            record.insert("Subject".into(), json!(subject(contribution)));
            record.insert("Description".into(), json!(cap(&description(contribution), DESCRIPTION_MAX)));
            record.insert("ActivityDate".into(), json!(contribution.created_at.date_naive().to_string()));
            record.insert("Status".into(), json!("Completed"));
            record.insert("Tributary_Platform__c".into(), json!(cap(&contribution.platform, 80)));
            if let Some(url) = trimmed(contribution.url.as_deref()) {
                record.insert("Tributary_Url__c".into(), json!(cap(url, TEXT_MAX)));
            }
            if let Some(found) = &contribution.signals {
                record.insert("Tributary_Intent__c".into(), json!(found.intent.as_str()));
                if let Some(value) = sentiment(found.sentiment) {
                    record.insert("Tributary_Sentiment__c".into(), json!(value));
                }
            }
            owners.push(Ok(tasks.put(&key.to_lowercase(), record)));
        }
        let written = if tasks.records.is_empty() {
            Vec::new()
        } else {
            self.write_collection(&format!("/composite/sobjects/Task/{KEY}"), tasks.records).await?
        };
        Ok(owners
            .into_iter()
            .map(|owner| match owner {
                Ok(index) => written
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| RecordOutcome::Rejected("no answer for this record".into())),
                Err(reason) => RecordOutcome::Rejected(reason),
            })
            .collect())
    }

    /// Deletes the Tasks (into the Recycle Bin); one already deleted or
    /// gone counts as done.
    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut outcomes: Vec<Option<RecordOutcome<()>>> = vec![None; activity_ids.len()];
        let mut valid: Vec<(usize, &str)> = Vec::new();
        for (index, id) in activity_ids.iter().enumerate() {
            let id = id.trim();
            if is_record_id(id) {
                valid.push((index, id));
            } else {
                outcomes[index] = Some(RecordOutcome::Rejected(format!("`{}` is not a Salesforce id", cap(id, 40))));
            }
        }
        for chunk in valid.chunks(COLLECTION_LIMIT) {
            let ids = chunk.iter().map(|(_, id)| *id).collect::<Vec<_>>().join(",");
            let response = self
                .call(Method::DELETE, "/composite/sobjects", &[("ids", &ids), ("allOrNone", "false")], None)
                .await?;
            if response.status.as_u16() != 200 {
                return Err(self.unexpected(&response));
            }
            let results: Vec<RecordResult> = response.json().map_err(|error| self.decode(error))?;
            for (position, (index, _)) in chunk.iter().enumerate() {
                let outcome = match results.get(position) {
                    Some(result) if result.success => RecordOutcome::Done(()),
                    Some(result)
                        if result
                            .errors
                            .iter()
                            .any(|e| matches!(e.error_code.as_str(), "ENTITY_IS_DELETED" | "NOT_FOUND")) =>
                    {
                        RecordOutcome::Done(())
                    }
                    Some(result) => RecordOutcome::Rejected(self.scrub(&record_errors(&result.errors))),
                    None => RecordOutcome::Rejected("Salesforce answered nothing for this record".into()),
                };
                outcomes[*index] = Some(outcome);
            }
        }
        Ok(outcomes.into_iter().map(|o| o.unwrap_or_else(|| RecordOutcome::Rejected("not sent".into()))).collect())
    }

    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        if rollups.is_empty() {
            return Ok(Vec::new());
        }
        let mut records = Deduplicated::new();
        let mut owners = Vec::with_capacity(rollups.len());
        for rollup in rollups {
            let id = rollup.contact_id.trim();
            if id.is_empty() {
                owners.push(Err("the rollup has no contact id".to_owned()));
                continue;
            }
            let mut record = Map::new();
            record.insert("attributes".into(), attributes("Contact"));
            record.insert("id".into(), json!(id));
            record.extend(Self::rollup_fields(rollup));
            owners.push(Ok(records.put(id, record)));
        }
        let written = if records.records.is_empty() {
            Vec::new()
        } else {
            self.write_collection("/composite/sobjects", records.records).await?
        };
        Ok(owners
            .into_iter()
            .map(|owner| match owner.map(|index| written.get(index)) {
                Ok(Some(RecordOutcome::Done(_))) => RecordOutcome::Done(()),
                Ok(Some(RecordOutcome::Rejected(message))) => RecordOutcome::Rejected(message.clone()),
                Ok(None) => RecordOutcome::Rejected("no answer for this record".into()),
                Err(reason) => RecordOutcome::Rejected(reason),
            })
            .collect())
    }

    /// The same Collections delete as [`Crm::archive_activities`]: the REST
    /// API deletes into the Recycle Bin only, which Salesforce purges after
    /// 15 days (`emptyRecycleBin` is a SOAP and Apex call).
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        self.archive_activities(activity_ids).await
    }

    /// Salesforce's REST API cannot merge; this reads both contacts
    /// (deleted ones too) and takes the merge as done when Salesforce made
    /// it: `merged` deleted with `survivor` as its master record. A merged
    /// contact that is gone without a master (deleted, or purged from the
    /// Recycle Bin) has nothing left to move: done too, with a warning.
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let (survivor, merged) = (survivor.trim(), merged.trim());
        for id in [survivor, merged] {
            if !is_record_id(id) {
                return Err(CrmError::Unsupported(format!(
                    "cannot merge Salesforce contacts: `{}` is not a Salesforce id",
                    cap(id, 40)
                )));
            }
        }
        if same_record(survivor, merged) {
            return Ok(());
        }
        let soql = format!(
            "SELECT Id, IsDeleted, MasterRecordId FROM Contact WHERE Id IN ({}, {})",
            soql_literal(survivor),
            soql_literal(merged)
        );
        let records = self.query_at("/queryAll", &soql).await?;
        let find =
            |id: &str| records.iter().find(|record| record["Id"].as_str().is_some_and(|found| same_record(found, id)));
        let master = |record: &Value| trimmed(record["MasterRecordId"].as_str()).map(str::to_owned);
        match find(survivor) {
            Some(record) if record["IsDeleted"] != json!(true) => {}
            Some(record) => {
                return Err(CrmError::Unsupported(match master(record) {
                    Some(master) => format!(
                        "cannot merge Salesforce contact {merged} into {survivor}: {survivor} was itself merged into \
                         {master}; link the person to {master} instead"
                    ),
                    None => format!("cannot merge Salesforce contact {merged} into {survivor}: {survivor} is deleted"),
                }));
            }
            None => {
                return Err(CrmError::Unsupported(format!(
                    "cannot merge Salesforce contact {merged} into {survivor}: Salesforce has no contact {survivor}"
                )));
            }
        }
        match find(merged) {
            Some(record) if record["IsDeleted"] != json!(true) => Err(merge_in_salesforce(survivor, merged)),
            Some(record) => match master(record) {
                Some(master) if same_record(&master, survivor) => {
                    tracing::info!(survivor, merged, "the contacts were merged in salesforce");
                    Ok(())
                }
                Some(master) => Err(CrmError::Unsupported(format!(
                    "Salesforce merged contact {merged} into {master}, not into {survivor}: link the person to \
                     {master} instead"
                ))),
                None => {
                    tracing::warn!(
                        survivor,
                        merged,
                        "salesforce deleted the contact to merge; taking the merge as done"
                    );
                    Ok(())
                }
            },
            None => {
                tracing::warn!(survivor, merged, "salesforce has no contact to merge; taking the merge as done");
                Ok(())
            }
        }
    }

    /// `GET /sobjects/Contact/{id}?fields=...`: the requested fields that
    /// have a value, under the names asked for (Salesforce's names are not
    /// case-sensitive). Names Salesforce does not know are left out.
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
                "cannot read the properties of Salesforce contact `{}`: not a Salesforce id",
                cap(contact_id, 40)
            )));
        }
        // Each round leaves out the names Salesforce refused as unknown.
        let record = loop {
            match self.contact_fields(contact_id, &wanted).await? {
                Ok(record) => break record,
                Err(unknown) => {
                    tracing::debug!(contact = contact_id, ?unknown, "salesforce does not know these contact fields");
                    wanted.retain(|name| !unknown.iter().any(|gone| gone == name));
                    if wanted.is_empty() {
                        return Ok(Default::default());
                    }
                }
            }
        };
        let Some(fields) = record.as_object() else {
            return Err(self.decode("the contact is not a JSON object"));
        };
        Ok(wanted
            .iter()
            .filter_map(|name| {
                let value =
                    fields.iter().find(|(field, _)| field.eq_ignore_ascii_case(name)).map(|(_, value)| value)?;
                Some(((*name).to_owned(), property_text(value)?))
            })
            .collect())
    }
}
