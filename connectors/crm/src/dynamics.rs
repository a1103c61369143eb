//! The Microsoft Dynamics 365 / Dataverse sink (Web API v9.2).
//!
//! What it relies on, from Microsoft Learn's Dataverse developer guide
//! (learn.microsoft.com, `power-apps/developer/data-platform/webapi/...`:
//! "Update and delete table rows using the Web API", "Use an alternate key
//! to reference a record", "Create and update table definitions", "Service
//! protection API limits"):
//!
//! - Auth: OAuth 2.0 client credentials against Microsoft Entra ID, `POST
//!   {authority_url}/{tenant_id}/oauth2/v2.0/token` with `client_id`,
//!   `client_secret` and `scope={environment_url}/.default` in the form body.
//!   The app registration must be an *application user* of the environment
//!   with a security role. Tokens are kept by the SDK's [`OAuth2`]; a 401
//!   gets one new token and one retry.
//! - Every request goes to `{environment_url}/api/data/v9.2/` with
//!   `OData-Version: 4.0`. Errors are `{"error": {"code": "0x8004...",
//!   "message": "..."}}`; a record refused (400, 404, 409, 412) is
//!   `Rejected(message)`, 401/403 is [`CrmError::Auth`], the rest an error.
//! - Contacts: a `PATCH` on an alternate key is an upsert (create when
//!   absent, 201; update when present, 200 with `Prefer:
//!   return=representation`), so a replay updates the same row. Alternate
//!   key values with `/ < > * % & : \ ? +` cannot be used in Web API URLs
//!   ("Define alternate keys", as remembered: not re-checked), and every
//!   identity has a `:`; so the key column holds
//!   `{prefix}_identityhash`, 32 hex digits of SHA-256 of the lowercased
//!   identity, beside the readable `{prefix}_identity`:
//!   `PATCH contacts({prefix}_identityhash='…')`. Authors with an e-mail
//!   are looked up first (`GET contacts?$select=contactid,emailaddress1,
//!   {prefix}_identity&$filter=emailaddress1 eq '…' or …`, quotes doubled);
//!   a match is updated by id with `If-Match: *` (an update only, never a
//!   create) and, when it has no identity yet, given `email:<address>`; no
//!   match is upserted under `email:<address>`. `lastname` (required) is
//!   written only where Tributary may create the row: a known contact's
//!   name belongs to the CRM.
//! - Activities: each contribution is a note (`annotation`: `subject`,
//!   `notetext`, `objectid_contact@odata.bind: /contacts(<id>)`) whose
//!   primary key is a UUIDv5 of the activity key. `PATCH annotations(<id>)`
//!   is an upsert by primary key: a replay updates the same note.
//!   `existing_id` is not needed. The note text is shown as HTML by the
//!   Unified Interface timeline: it is escaped, lines joined by `<br>`.
//! - Archiving: `DELETE annotations(<id>)`; 404 counts as done. Dataverse
//!   notes have no inactive state: a deleted note is restorable only where
//!   the environment's recycle bin is turned on. `delete_activities` is the
//!   same request.
//! - Rollups: one `PATCH contacts(<id>)` with `If-Match: *` per contact,
//!   carrying every figure: the totals, the last contribution's URL and
//!   excerpt (one line), the 90-day count and sentiment, the attention flag
//!   (a Yes/No column) and its reason, and per platform the first and last
//!   sighting and the count, in columns named like the handle columns
//!   (`{prefix}_{platform}firstseen`). A figure without a value is written
//!   `null`, so an old value never stays. A contact that is gone is a 404,
//!   `Rejected`.
//! - Merging: the unbound `Merge` action (`POST Merge` with `Target`,
//!   `Subordinate` and `UpdateContent` typed `Microsoft.Dynamics.CRM.contact`
//!   by `@odata.type`, `PerformParentingChecks: false`; 204). Dataverse
//!   moves the subordinate's related rows, notes included, to the target
//!   and deactivates the subordinate, setting its `merged` and `masterid`
//!   (as remembered from the contact table's reference: not re-checked). The
//!   subordinate's state is read first, so merging again is done without a
//!   second `Merge`.
//! - Contact properties: `GET contacts(<id>)?$select=…` with `Prefer:
//!   odata.include-annotations="OData.Community.Display.V1.FormattedValue"`;
//!   a value's formatted text is preferred (a choice's label, a lookup's
//!   name).
//! - `$batch` is not used: a changeset is all-or-nothing (one refused record
//!   would roll back the others), each request inside a batch still counts
//!   against the service protection limits, and a batch shares one
//!   2-minute execution limit. Requests go one at a time, well under the
//!   52 concurrent requests allowed per user.
//! - Limits: service protection answers 429 with `Retry-After` (6,000
//!   requests and 20 minutes of execution time per user in a 5-minute
//!   sliding window); the SDK's client waits as told and holds every other
//!   request meanwhile. Answers carry `x-ms-ratelimit-burst-remaining-xrm-
//!   requests` and `x-ms-ratelimit-time-remaining-xrm-requests`: at 0 the
//!   client is held briefly, the next request's 429 then names the exact wait.
//! - `setup`: the contact columns through the metadata API, `GET
//!   EntityDefinitions(LogicalName='contact')/Attributes?$select=LogicalName&
//!   $filter=LogicalName eq '…' or …`, then `POST …/Attributes` with
//!   `StringAttributeMetadata`, `IntegerAttributeMetadata`,
//!   `DecimalAttributeMetadata`, `DateTimeAttributeMetadata` or
//!   `BooleanAttributeMetadata` (with its Yes/No option set) for each one
//!   missing, and the alternate key `POST …/Keys` (`KeyAttributes:
//!   [{prefix}_identityhash]`) when `GET …/Keys` does not list it. Dataverse
//!   builds the key's index in the background: upserts fail until its
//!   `EntityKeyIndexStatus` is `Active`. With `solution` set, the
//!   definitions are added to that unmanaged solution
//!   (`MSCRM.SolutionUniqueName`).
//!
//! The client secret and the tokens are never in a log line, an error or
//! `Debug` output.

#[cfg(test)]
mod tests;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, header::ACCEPT};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tributary_sdk::{
    ActivityUpsert, ContactLookup, ContactUpsert, Contribution, Crm, CrmError, HttpClient, HttpError, HttpOptions,
    HttpResponse, MemoryTokenStore, OAuth2, OAuthError, RecordOutcome, Rollup, SecretError, SecretRef, SetupReport,
    TokenStore,
    oauth::{ClientAuth, Grant, OAuth2Config},
    text::escape_html,
};
use url::Url;
use uuid::Uuid;

/// The Web API root under the environment's address.
const API: &str = "/api/data/v9.2";
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// E-mail addresses (or column names) per `$filter`, keeping URLs short.
const PER_FILTER: usize = 20;
/// How long a spent burst or execution-time budget holds every request.
const BURST_HOLD: Duration = Duration::from_secs(5);
/// The namespace of the notes' UUIDv5 ids (itself a UUIDv5 of a fixed name).
const NOTE_NAMESPACE_NAME: &str = "https://tributary.dev/crm/dynamics/annotation";

/// Sizes of the standard columns Tributary writes.
const LAST_NAME_MAX: usize = 50;
const EMAIL_MAX: usize = 100;
const SUBJECT_MAX: usize = 500;
/// `notetext` holds 100,000 characters; escaping grows text at most 6×.
const NOTE_TEXT_RAW_MAX: usize = 15_000;
const TEXT_MAX: usize = 255;
const PLATFORMS_MAX: usize = 1000;
/// The rollups' text columns: the last URL and excerpt, the attention reason.
const ROLLUP_TEXT_MAX: usize = 1000;
/// The annotation Dataverse adds with a value as the user sees it: a
/// choice's label, a lookup's name, `Yes`/`No`, a formatted number or date.
const FORMATTED: &str = "OData.Community.Display.V1.FormattedValue";
/// The `@odata.type` of a contact in an action's parameters.
const CONTACT_TYPE: &str = "Microsoft.Dynamics.CRM.contact";

/// Settings of the Dynamics 365 / Dataverse sink (the `[crm]` table with `type = "dynamics"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicsConfig {
    /// The environment's address, e.g. `https://org.crm.dynamics.com`: the
    /// Web API lives under it and the token's scope is `<it>/.default`.
    pub environment_url: Url,
    /// The Microsoft Entra tenant (directory) id, a GUID or a verified
    /// domain such as `contoso.onmicrosoft.com`.
    pub tenant_id: String,
    /// Application (client) id of the app registration that is an
    /// application user of the environment.
    pub client_id: String,
    /// A client secret of that app registration: `{ env = "DYNAMICS_CLIENT_SECRET" }`
    /// or `{ file = "dynamics" }`.
    pub client_secret: SecretRef,
    /// The Entra ID authority; default `https://login.microsoftonline.com`
    /// (e.g. `https://login.microsoftonline.us` for US Government clouds).
    #[serde(default)]
    pub authority_url: Option<Url>,
    /// Customization prefix of the publisher the columns belong to: the
    /// columns are named `<prefix>_identity` and so on. Default `tributary`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Unique name of an unmanaged solution `crm setup` adds the columns
    /// to; without it they go to the default solution.
    #[serde(default)]
    pub solution: Option<String>,
}

fn default_prefix() -> String {
    "tributary".to_owned()
}

/// Why a Dynamics sink cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("dynamics `environment_url` must be an https address with a host and no path, not `{0}`")]
    EnvironmentUrl(String),
    #[error("dynamics `authority_url` must be an http or https address with a host, not `{0}`")]
    AuthorityUrl(String),
    #[error("dynamics `tenant_id` must be a directory id or domain (letters, digits, `.` and `-`), not `{0}`")]
    TenantId(String),
    #[error("dynamics `client_id` is empty")]
    ClientId,
    #[error("dynamics `client_secret`: {0}")]
    ClientSecret(#[from] SecretError),
    #[error("dynamics `prefix` must be 2 to 16 lowercase letters or digits starting with a letter, not `{0}`")]
    Prefix(String),
    #[error("dynamics `solution` must be a solution's unique name (letters, digits and `_`), not `{0}`")]
    Solution(String),
    #[error("dynamics http client: {0}")]
    Http(#[from] HttpError),
}

/// The Dataverse sink. Cheap to share; holds one [`HttpClient`].
pub struct DynamicsCrm {
    http: HttpClient,
    oauth: OAuth2,
    /// `environment_url` without its trailing `/`.
    base: String,
    prefix: String,
    solution: Option<String>,
    /// Kept to scrub it from any text a server might echo.
    client_secret: SecretString,
}

impl std::fmt::Debug for DynamicsCrm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicsCrm")
            .field("environment_url", &self.base)
            .field("prefix", &self.prefix)
            .field("solution", &self.solution)
            .field("oauth", &self.oauth)
            .field("client_secret", &"[redacted]")
            .finish()
    }
}

/// Dataverse's error body: `{"error": {"code", "message"}}`.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: ApiError,
}

#[derive(Debug, Default, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

fn api_error(response: &HttpResponse) -> Option<ApiError> {
    serde_json::from_slice::<ErrorBody>(&response.body).ok().map(|body| body.error).filter(|e| !e.message.is_empty())
}

/// Dataverse's message, or the status and body when there is none.
fn describe(response: &HttpResponse) -> String {
    match api_error(response) {
        Some(error) => error.message,
        None => format!("HTTP {}: {}", response.status.as_u16(), response.body_snippet()),
    }
}

#[derive(Debug, Deserialize)]
struct Collection {
    #[serde(default)]
    value: Vec<Value>,
}

/// What the e-mail lookup found for one address.
#[derive(Debug, Clone)]
struct Found {
    id: String,
    identity: Option<String>,
}

/// An OData string literal: in single quotes, quotes doubled.
fn odata_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// At most `max` characters of `text`.
fn cap(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text.to_owned(),
    }
}

fn trimmed(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|value| !value.is_empty())
}

/// A Dataverse row id (a GUID), normalised; `None` for anything else.
fn row_id(id: &str) -> Option<String> {
    Uuid::parse_str(id.trim()).ok().map(|id| id.hyphenated().to_string())
}

/// The alternate key value of an identity: 32 hex digits of SHA-256 of it, lowercased.
fn identity_hash(identity: &str) -> String {
    let mut digest = hex::encode(Sha256::digest(identity.trim().to_lowercase().as_bytes()));
    digest.truncate(32);
    digest
}

/// The note id of an activity key: the same key is always the same note.
pub fn annotation_id(activity_key: &str) -> Uuid {
    let namespace = Uuid::new_v5(&Uuid::NAMESPACE_URL, NOTE_NAMESPACE_NAME.as_bytes());
    Uuid::new_v5(&namespace, activity_key.trim().as_bytes())
}

/// A platform name as part of a column name: lowercase ASCII letters and
/// digits, at most 20 (`Stack Exchange` becomes `stackexchange`).
fn platform_slug(platform: &str) -> String {
    let mut slug: String =
        platform.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).take(20).collect();
    if slug.is_empty() {
        slug.push_str("unknown");
    }
    slug
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A sentiment rounded to three decimals, in -1..=1; `None` for NaN or infinities.
fn sentiment(value: f64) -> Option<f64> {
    value.is_finite().then(|| (value.clamp(-1.0, 1.0) * 1000.0).round() / 1000.0)
}

/// A count as a whole-number column value (a 32-bit integer in Dataverse).
fn count(value: u64) -> i64 {
    value.min(i32::MAX as u64) as i64
}

fn web_link(url: &str) -> Option<String> {
    let parsed = Url::parse(url.trim()).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

use tributary_sdk::text::one_line;

/// A text column's value: the text on one line, `null` when empty (so a
/// value from an earlier write never stays).
fn text_value(text: Option<&str>, max: usize) -> Value {
    let line = one_line(text.unwrap_or_default(), max);
    if line.is_empty() { Value::Null } else { json!(line) }
}

/// A column of a contact row as text: Dataverse's formatted value where it
/// sent one, else the value itself; `None` when empty.
fn shown_value(row: &Map<String, Value>, column: &str) -> Option<String> {
    let formatted = row.get(&format!("{column}@{FORMATTED}")).and_then(Value::as_str).map(str::trim);
    let text = match (formatted, row.get(column)?) {
        (Some(formatted), _) if !formatted.is_empty() => formatted.to_owned(),
        (_, Value::String(text)) => text.trim().to_owned(),
        (_, Value::Number(number)) => number.to_string(),
        (_, Value::Bool(flag)) => flag.to_string(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

/// A column's logical name as a query may name it: lowercase ASCII letters,
/// digits and `_`, starting with a letter or `_`.
fn logical_name(name: &str) -> Option<String> {
    let name = name.trim().to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 100
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    valid.then_some(name)
}

/// Whether a contact was merged, and into which, from `statecode`,
/// `merged` and `_masterid_value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MergeState {
    active: bool,
    /// The contact it was merged into, when `merged` is set.
    merged_into: Option<String>,
}

/// The note's subject: the title, or `<platform> <kind>`.
fn subject(contribution: &Contribution) -> String {
    let title = trimmed(contribution.title.as_deref());
    let subject = match title {
        Some(title) => title.to_owned(),
        None => format!("{} {}", contribution.platform, contribution.kind.as_str()),
    };
    cap(&subject.replace(['\r', '\n'], " "), SUBJECT_MAX)
}

/// The note's text: the body, the link and the signals, HTML-escaped with
/// lines joined by `<br>`.
fn note_text(contribution: &Contribution) -> String {
    let mut body = contribution.body.trim().to_owned();
    if body.chars().count() > NOTE_TEXT_RAW_MAX {
        body = cap(&body, NOTE_TEXT_RAW_MAX - 1) + "…";
    }
    let mut text = body;
    if let Some(url) = contribution.url.as_deref().and_then(web_link) {
        text.push_str(&format!("\n\n{url}"));
    }
    let mut signals = vec![contribution.platform.clone(), contribution.kind.as_str().to_owned()];
    if let Some(found) = &contribution.signals {
        signals.push(format!("intent: {}", found.intent.as_str()));
        if let Some(value) = sentiment(found.sentiment) {
            signals.push(format!("sentiment: {value}"));
        }
    }
    if contribution.deleted {
        signals.push("deleted".into());
    }
    if contribution.edited {
        signals.push("edited".into());
    }
    text.push_str(&format!("\n{}", signals.join(" · ")));
    escape_html(&text).replace("\r\n", "\n").replace('\n', "<br>")
}

/// How a Tributary column is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Text(u32),
    Whole,
    Sentiment,
    DateTime,
    /// Yes/No (a Boolean column).
    Flag,
}

/// One contact column as `setup` creates it.
#[derive(Debug, Clone, PartialEq)]
struct Column {
    /// Logical (and schema) name, prefix included.
    name: String,
    label: String,
    description: String,
    kind: ColumnKind,
}

fn label(text: &str) -> Value {
    json!({
        "@odata.type": "Microsoft.Dynamics.CRM.Label",
        "LocalizedLabels": [{ "@odata.type": "Microsoft.Dynamics.CRM.LocalizedLabel", "Label": text, "LanguageCode": 1033 }],
    })
}

impl Column {
    fn new(name: String, label: &str, kind: ColumnKind, description: &str) -> Column {
        Column { name, label: label.to_owned(), description: description.to_owned(), kind }
    }

    /// The body of `POST EntityDefinitions(LogicalName='contact')/Attributes`.
    fn create_body(&self) -> Value {
        let mut body = json!({
            "SchemaName": self.name,
            "DisplayName": label(&self.label),
            "Description": label(&self.description),
            "RequiredLevel": { "Value": "None", "CanBeChanged": true, "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings" },
        });
        let extra = match self.kind {
            ColumnKind::Text(length) => json!({
                "@odata.type": "Microsoft.Dynamics.CRM.StringAttributeMetadata",
                "AttributeType": "String", "AttributeTypeName": { "Value": "StringType" },
                "FormatName": { "Value": "Text" }, "MaxLength": length,
            }),
            ColumnKind::Whole => json!({
                "@odata.type": "Microsoft.Dynamics.CRM.IntegerAttributeMetadata",
                "AttributeType": "Integer", "AttributeTypeName": { "Value": "IntegerType" },
                "Format": "None", "MinValue": 0, "MaxValue": i32::MAX,
            }),
            ColumnKind::Sentiment => json!({
                "@odata.type": "Microsoft.Dynamics.CRM.DecimalAttributeMetadata",
                "AttributeType": "Decimal", "AttributeTypeName": { "Value": "DecimalType" },
                "Precision": 3, "MinValue": -1, "MaxValue": 1,
            }),
            ColumnKind::DateTime => json!({
                "@odata.type": "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata",
                "AttributeType": "DateTime", "AttributeTypeName": { "Value": "DateTimeType" },
                "Format": "DateAndTime", "DateTimeBehavior": { "Value": "UserLocal" },
            }),
            ColumnKind::Flag => json!({
                "@odata.type": "Microsoft.Dynamics.CRM.BooleanAttributeMetadata",
                "AttributeType": "Boolean", "AttributeTypeName": { "Value": "BooleanType" },
                "DefaultValue": false,
                "OptionSet": {
                    "@odata.type": "Microsoft.Dynamics.CRM.BooleanOptionSetMetadata",
                    "TrueOption": { "Value": 1, "Label": label("Yes") },
                    "FalseOption": { "Value": 0, "Label": label("No") },
                },
            }),
        };
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        body
    }
}

impl DynamicsCrm {
    pub fn new(config: DynamicsConfig, http: HttpOptions) -> Result<DynamicsCrm, BuildError> {
        let url = &config.environment_url;
        let plain_root = url.path().trim_end_matches('/').is_empty() && url.query().is_none();
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || !plain_root {
            return Err(BuildError::EnvironmentUrl(url.to_string()));
        }
        let authority = match &config.authority_url {
            Some(authority) => {
                if !matches!(authority.scheme(), "http" | "https")
                    || authority.host_str().is_none()
                    || authority.cannot_be_a_base()
                {
                    return Err(BuildError::AuthorityUrl(authority.to_string()));
                }
                authority.as_str().trim_end_matches('/').to_owned()
            }
            None => DEFAULT_AUTHORITY.to_owned(),
        };
        let tenant = config.tenant_id.trim();
        if tenant.is_empty() || !tenant.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
            return Err(BuildError::TenantId(config.tenant_id.clone()));
        }
        let client_id = config.client_id.trim();
        if client_id.is_empty() {
            return Err(BuildError::ClientId);
        }
        let prefix = config.prefix.trim();
        let valid_prefix = (2..=16).contains(&prefix.len())
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !valid_prefix {
            return Err(BuildError::Prefix(config.prefix.clone()));
        }
        let solution = match config.solution.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(name) if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => Some(name.to_owned()),
            Some(name) => return Err(BuildError::Solution(name.to_owned())),
        };
        let secret = config.client_secret.resolve()?;
        let client_secret = SecretString::from(secret.expose_secret().trim().to_owned());
        let base = url.as_str().trim_end_matches('/').to_owned();
        let token_url = Url::parse(&format!("{authority}/{tenant}/oauth2/v2.0/token"))
            .map_err(|_| BuildError::AuthorityUrl(authority.clone()))?;
        let oauth = OAuth2::new(
            OAuth2Config {
                token_url,
                client_id: client_id.to_owned(),
                client_secret: Some(client_secret.clone()),
                client_auth: ClientAuth::Body,
                grant: Grant::ClientCredentials,
                scope: Some(format!("{base}/.default")),
            },
            Arc::new(MemoryTokenStore::default()),
        );
        Ok(DynamicsCrm {
            http: HttpClient::new(http)?,
            oauth,
            base,
            prefix: prefix.to_owned(),
            solution,
            client_secret,
        })
    }

    /// Keeps the access token in `store` (the daemon's state store), so a
    /// restart reuses it.
    pub fn with_token_store(self, store: Arc<dyn TokenStore>) -> DynamicsCrm {
        DynamicsCrm { oauth: self.oauth.with_store(store), ..self }
    }

    fn column(&self, name: &str) -> String {
        format!("{}_{name}", self.prefix)
    }

    fn identity_column(&self) -> String {
        self.column("identity")
    }

    fn hash_column(&self) -> String {
        self.column("identityhash")
    }

    fn key_name(&self) -> String {
        self.column("identitykey")
    }

    fn handle_column(&self, platform: &str) -> String {
        self.column(&format!("{}handle", platform_slug(platform)))
    }

    fn profile_column(&self, platform: &str) -> String {
        self.column(&format!("{}profile", platform_slug(platform)))
    }

    fn first_seen_column(&self, platform: &str) -> String {
        self.column(&format!("{}firstseen", platform_slug(platform)))
    }

    fn last_seen_column(&self, platform: &str) -> String {
        self.column(&format!("{}lastseen", platform_slug(platform)))
    }

    fn contributions_column(&self, platform: &str) -> String {
        self.column(&format!("{}contributions", platform_slug(platform)))
    }

    /// The contact columns: identity and its hash, per platform handle and
    /// profile, rollups, then per platform the rollup figures.
    fn columns(&self, platforms: &[String]) -> Vec<Column> {
        use ColumnKind::*;
        let mut columns = vec![
            Column::new(
                self.identity_column(),
                "Tributary Identity",
                Text(255),
                "platform:user id (or email:address) of the person, as Tributary knows them.",
            ),
            Column::new(
                self.hash_column(),
                "Tributary Identity Key",
                Text(32),
                "SHA-256 of the lowercased identity (32 hex digits): Tributary's alternate key for contacts.",
            ),
        ];
        let mut slugs: Vec<(String, &str)> = platforms.iter().map(|p| (platform_slug(p), p.as_str())).collect();
        slugs.sort();
        slugs.dedup_by(|a, b| a.0 == b.0);
        for (_, platform) in &slugs {
            columns.push(Column::new(
                self.handle_column(platform),
                &format!("Handle on {platform}"),
                Text(255),
                &format!("The person's handle on {platform}, as Tributary saw it."),
            ));
            columns.push(Column::new(
                self.profile_column(platform),
                &format!("Profile on {platform}"),
                Text(255),
                &format!("Address of the person's profile on {platform}."),
            ));
        }
        columns.extend([
            Column::new(
                self.column("lastcontribution"),
                "Last Community Contribution",
                DateTime,
                "When the person last posted in a community Tributary follows.",
            ),
            Column::new(self.column("lastplatform"), "Last Community Platform", Text(100), "Where."),
            Column::new(
                self.column("contributioncount"),
                "Community Contributions",
                Whole,
                "How many contributions Tributary delivered for this person.",
            ),
            Column::new(
                self.column("platforms"),
                "Community Platforms",
                Text(PLATFORMS_MAX as u32),
                "Every platform the person was seen on, separated by `;`.",
            ),
            Column::new(
                self.column("sentiment"),
                "Community Sentiment",
                Sentiment,
                "Mean sentiment of the person's contributions, from -1 (negative) to 1 (positive).",
            ),
            Column::new(self.column("questions"), "Community Questions", Whole, "Questions."),
            Column::new(self.column("complaints"), "Community Complaints", Whole, "Complaints."),
            Column::new(self.column("ideas"), "Community Ideas", Whole, "Ideas."),
            Column::new(self.column("praise"), "Community Praise", Whole, "Praise."),
            Column::new(
                self.column("lasturl"),
                "Last Contribution URL",
                Text(ROLLUP_TEXT_MAX as u32),
                "Link to the person's last contribution.",
            ),
            Column::new(
                self.column("lastexcerpt"),
                "Last Contribution Excerpt",
                Text(ROLLUP_TEXT_MAX as u32),
                "The start of the person's last contribution.",
            ),
            Column::new(
                self.column("contributions90d"),
                "Community Contributions (90 Days)",
                Whole,
                "How many contributions the person made in the last 90 days.",
            ),
            Column::new(
                self.column("sentiment90d"),
                "Community Sentiment (90 Days)",
                Sentiment,
                "Mean sentiment of the last 90 days' contributions, from -1 to 1; empty when none was scored.",
            ),
            Column::new(
                self.column("needsattention"),
                "Needs Attention",
                Flag,
                "An unresolved complaint or a sharp drop in sentiment: someone should look at this person.",
            ),
            Column::new(
                self.column("attentionreason"),
                "Attention Reason",
                Text(ROLLUP_TEXT_MAX as u32),
                "Why the person needs attention, in words.",
            ),
        ]);
        for (_, platform) in &slugs {
            columns.push(Column::new(
                self.first_seen_column(platform),
                &format!("First Seen on {platform}"),
                DateTime,
                &format!("When the person's first contribution on {platform} was posted."),
            ));
            columns.push(Column::new(
                self.last_seen_column(platform),
                &format!("Last Seen on {platform}"),
                DateTime,
                &format!("When the person's last contribution on {platform} was posted."),
            ));
            columns.push(Column::new(
                self.contributions_column(platform),
                &format!("Contributions on {platform}"),
                Whole,
                &format!("How many contributions Tributary delivered for the person from {platform}."),
            ));
        }
        columns
    }

    fn scrub(&self, text: &str) -> String {
        tributary_sdk::secret::redact(text, [self.client_secret.expose_secret()])
    }

    /// One authenticated request to `{environment_url}/api/data/v9.2/{path}`
    /// (`path` needs no encoding: names, GUIDs and hex digits only). 401
    /// (after the one renewal) and 403 are [`CrmError::Auth`]; every other
    /// status is the caller's to read.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<HttpResponse, CrmError> {
        if let Some(wait) = self.http.held_for()
            && wait > self.http.options().max_inline_wait
        {
            return Err(CrmError::RateLimited { retry_after: wait });
        }
        let mut url = Url::parse(&format!("{}{API}/{path}", self.base))
            .map_err(|error| CrmError::Decode(format!("cannot build a request address: {error}")))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let build = || {
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .header(ACCEPT, "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
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
            Err(OAuthError::Http(HttpError::RateLimited { target, retry_after, body })) => {
                return Err(CrmError::Http(HttpError::RateLimited { target, retry_after, body: self.scrub(&body) }));
            }
            Err(error) => return Err(CrmError::from(error)),
        };
        self.note_limit_headers(&response);
        match response.status.as_u16() {
            401 => Err(CrmError::Auth(self.scrub(&format!("HTTP 401: {}", describe(&response))))),
            403 => Err(CrmError::Auth(self.scrub(&format!(
                "HTTP 403 (does the application user have a security role with these privileges?): {}",
                describe(&response)
            )))),
            _ => Ok(response),
        }
    }

    /// `x-ms-ratelimit-*-remaining-xrm-requests` at 0: hold every request briefly.
    fn note_limit_headers(&self, response: &HttpResponse) {
        for name in ["x-ms-ratelimit-burst-remaining-xrm-requests", "x-ms-ratelimit-time-remaining-xrm-requests"] {
            let left = response.header(name).and_then(|value| value.trim().parse::<f64>().ok());
            if left.is_some_and(|left| left <= 0.0) {
                tracing::warn!(header = name, "dataverse service protection budget spent; holding requests");
                self.http.hold(BURST_HOLD);
            }
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

    /// The answer to a write of one record: `Ok(Ok)` on success,
    /// `Ok(Err(message))` when Dataverse refused this record, `Err` otherwise.
    fn record_answer(&self, response: HttpResponse) -> Result<Result<HttpResponse, String>, CrmError> {
        if response.status.is_success() {
            return Ok(Ok(response));
        }
        if !matches!(response.status.as_u16(), 400 | 404 | 409 | 412 | 413) {
            return Err(self.unexpected(&response));
        }
        let error = api_error(&response);
        // A column or key Tributary writes is missing: no record can land.
        if let Some(error) = &error
            && (error.code == "0x80060888" || error.message.contains("Invalid property"))
        {
            return Err(CrmError::Transient(self.scrub(&format!(
                "Dataverse does not know a column Tributary writes (run `tributary crm setup`): {}",
                error.message
            ))));
        }
        Ok(Err(self.scrub(&describe(&response))))
    }

    /// A GET of a collection; an error status is an error.
    async fn collection(&self, path: &str, query: &[(&str, &str)]) -> Result<Vec<Value>, CrmError> {
        let response = self.call(Method::GET, path, query, &[], None).await?;
        if response.status.as_u16() == 400 {
            return Err(CrmError::Transient(self.scrub(&format!(
                "Dataverse refused a query (has `tributary crm setup` run?): {}",
                describe(&response)
            ))));
        }
        if !response.status.is_success() {
            return Err(self.unexpected(&response));
        }
        let answer: Collection = response.json().map_err(|error| self.decode(error))?;
        Ok(answer.value)
    }

    /// The contacts matching `emails` (lowercased), the oldest first and one
    /// with an identity preferred.
    async fn contacts_by_email(&self, emails: &[String]) -> Result<HashMap<String, Found>, CrmError> {
        let identity_column = self.identity_column();
        let select = format!("contactid,emailaddress1,{identity_column}");
        let mut found: HashMap<String, Found> = HashMap::new();
        for chunk in emails.chunks(PER_FILTER) {
            let filter =
                chunk.iter().map(|email| format!("emailaddress1 eq {}", odata_literal(email))).collect::<Vec<_>>();
            let filter = filter.join(" or ");
            let query = [("$select", select.as_str()), ("$filter", filter.as_str()), ("$orderby", "createdon asc")];
            for row in self.collection("contacts", &query).await? {
                let (Some(id), Some(email)) = (row["contactid"].as_str(), row["emailaddress1"].as_str()) else {
                    continue;
                };
                let candidate = Found {
                    id: id.to_owned(),
                    identity: trimmed(row[identity_column.as_str()].as_str()).map(str::to_owned),
                };
                match found.entry(email.trim().to_lowercase()) {
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

    /// Writes one contact row: `path` is `contacts(<key>)`; `Done` carries its id.
    async fn write_contact(
        &self,
        path: &str,
        update_only: bool,
        record: &Map<String, Value>,
    ) -> Result<RecordOutcome<String>, CrmError> {
        let mut headers = vec![("Prefer", "return=representation")];
        if update_only {
            headers.push(("If-Match", "*"));
        }
        let body = Value::Object(record.clone());
        let response = self.call(Method::PATCH, path, &[("$select", "contactid")], &headers, Some(&body)).await?;
        let response = match self.record_answer(response)? {
            Ok(response) => response,
            Err(message) => return Ok(RecordOutcome::Rejected(message)),
        };
        let from_body = serde_json::from_slice::<Value>(&response.body)
            .ok()
            .and_then(|row| row["contactid"].as_str().and_then(row_id));
        // Without a representation: `OData-EntityId: …/contacts(<id>)`.
        let from_header = || {
            let entity = response.header("odata-entityid")?;
            let inner = entity.rsplit_once('(')?.1.strip_suffix(')')?;
            row_id(inner)
        };
        match from_body.or_else(from_header) {
            Some(id) => Ok(RecordOutcome::Done(id)),
            None => Err(self.decode("Dataverse's answer to a contact upsert names no contactid")),
        }
    }

    /// The rollup columns of one contact, for one `PATCH`. Every figure is
    /// written, `null` when it has no value, so a value from an earlier
    /// rollup never stays.
    fn rollup_fields(&self, rollup: &Rollup) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert(self.column("lastcontribution"), json!(timestamp(rollup.last_contribution_at)));
        fields.insert(self.column("lastplatform"), json!(cap(&rollup.last_platform, 100)));
        fields.insert(self.column("contributioncount"), json!(count(rollup.contribution_count)));
        fields.insert(self.column("platforms"), json!(cap(&rollup.platforms.join(";"), PLATFORMS_MAX)));
        if let Some(value) = sentiment(rollup.sentiment_avg) {
            fields.insert(self.column("sentiment"), json!(value));
        }
        fields.insert(self.column("questions"), json!(count(rollup.questions)));
        fields.insert(self.column("complaints"), json!(count(rollup.complaints)));
        fields.insert(self.column("ideas"), json!(count(rollup.ideas)));
        fields.insert(self.column("praise"), json!(count(rollup.praise)));
        let last_url = rollup.last_url.as_deref().and_then(web_link);
        fields.insert(self.column("lasturl"), text_value(last_url.as_deref(), ROLLUP_TEXT_MAX));
        fields.insert(self.column("lastexcerpt"), text_value(rollup.last_excerpt.as_deref(), ROLLUP_TEXT_MAX));
        fields.insert(self.column("contributions90d"), json!(count(rollup.count_90d)));
        let sentiment_90d = rollup.sentiment_avg_90d.and_then(sentiment);
        fields.insert(self.column("sentiment90d"), sentiment_90d.map_or(Value::Null, |value| json!(value)));
        fields.insert(self.column("needsattention"), json!(rollup.needs_attention));
        fields.insert(self.column("attentionreason"), text_value(rollup.attention_reason.as_deref(), ROLLUP_TEXT_MAX));
        for platform in &rollup.per_platform {
            fields.insert(self.first_seen_column(&platform.platform), json!(timestamp(platform.first_seen)));
            fields.insert(self.last_seen_column(&platform.platform), json!(timestamp(platform.last_seen)));
            fields.insert(self.contributions_column(&platform.platform), json!(count(platform.contributions)));
        }
        fields
    }

    /// `GET contacts(<id>)` of the merge columns; `None` when there is no such contact.
    async fn merge_state(&self, id: &str) -> Result<Option<MergeState>, CrmError> {
        let query = [("$select", "contactid,statecode,merged,_masterid_value")];
        let response = self.call(Method::GET, &format!("contacts({id})"), &query, &[], None).await?;
        match response.status.as_u16() {
            404 => Ok(None),
            200..=299 => {
                let row: Value = response.json().map_err(|error| self.decode(error))?;
                let merged = row["merged"].as_bool() == Some(true);
                Ok(Some(MergeState {
                    active: row["statecode"].as_i64().is_none_or(|state| state == 0),
                    merged_into: row["_masterid_value"].as_str().and_then(row_id).filter(|_| merged),
                }))
            }
            _ => Err(self.unexpected(&response)),
        }
    }

    /// Why `survivor` cannot take another contact: it is gone, merged
    /// into another or inactive; `None` when it is an active contact.
    async fn survivor_problem(&self, survivor: &str) -> Result<Option<String>, CrmError> {
        Ok(match self.merge_state(survivor).await? {
            None => Some("it does not exist".to_owned()),
            Some(MergeState { merged_into: Some(master), .. }) => {
                Some(format!("it was itself merged into {master}; link the person to {master} instead"))
            }
            Some(MergeState { active: false, .. }) => Some("it is inactive".to_owned()),
            Some(MergeState { active: true, merged_into: None }) => None,
        })
    }

    /// Whether the merge of `merged` into `survivor` has happened already:
    /// `merged` carries `merged = true` and `masterid` = the survivor, or
    /// it is gone while the survivor is an active contact. `Err` when it
    /// went into another contact, or is gone and the survivor cannot take it.
    async fn merged_already(&self, survivor: &str, merged: &str) -> Result<bool, CrmError> {
        match self.merge_state(merged).await? {
            Some(MergeState { merged_into: Some(master), .. }) if master == survivor => Ok(true),
            Some(MergeState { merged_into: Some(master), .. }) => Err(CrmError::Unsupported(format!(
                "Dataverse contact {merged} was merged into {master}, not {survivor}; link the person to {master}"
            ))),
            Some(_) => Ok(false),
            None => match self.survivor_problem(survivor).await? {
                None => Ok(true),
                Some(why) => Err(CrmError::Unsupported(format!(
                    "cannot merge Dataverse contact {merged} into {survivor}: {merged} is gone and {why}"
                ))),
            },
        }
    }

    fn setup_headers(&self) -> Vec<(&str, &str)> {
        match &self.solution {
            Some(solution) => vec![("MSCRM.SolutionUniqueName", solution.as_str())],
            None => Vec::new(),
        }
    }

    /// Creates one definition; `false` when Dataverse says it exists already.
    async fn create_definition(&self, path: &str, what: &str, body: &Value) -> Result<bool, CrmError> {
        let response = self.call(Method::POST, path, &[], &self.setup_headers(), Some(body)).await?;
        if response.status.is_success() {
            return Ok(true);
        }
        let message = describe(&response);
        if matches!(response.status.as_u16(), 400 | 409 | 412)
            && (message.contains("already exists") || message.contains("not unique"))
        {
            return Ok(false);
        }
        Err(CrmError::Transient(self.scrub(&format!("Dataverse refused to create {what}: {message}"))))
    }
}

const CONTACT_DEFINITION: &str = "EntityDefinitions(LogicalName='contact')";

#[async_trait]
impl Crm for DynamicsCrm {
    fn kind(&self) -> &'static str {
        "dynamics"
    }

    async fn check(&self) -> Result<(), CrmError> {
        let response = self.call(Method::GET, "WhoAmI", &[], &[], None).await?;
        if response.status.is_success() { Ok(()) } else { Err(self.unexpected(&response)) }
    }

    async fn setup(&self, platforms: &[String]) -> Result<SetupReport, CrmError> {
        let columns = self.columns(platforms);
        let attributes = format!("{CONTACT_DEFINITION}/Attributes");
        let mut existing: Vec<String> = Vec::new();
        for chunk in columns.chunks(PER_FILTER) {
            let filter = chunk
                .iter()
                .map(|column| format!("LogicalName eq {}", odata_literal(&column.name)))
                .collect::<Vec<_>>()
                .join(" or ");
            let rows = self.collection(&attributes, &[("$select", "LogicalName"), ("$filter", &filter)]).await?;
            existing.extend(rows.iter().filter_map(|row| row["LogicalName"].as_str()).map(str::to_lowercase));
        }
        let mut report = SetupReport::default();
        for column in &columns {
            let name = format!("contact.{}", column.name);
            if existing.contains(&column.name)
                || !self.create_definition(&attributes, &name, &column.create_body()).await?
            {
                report.existing.push(name);
            } else {
                report.created.push(name);
            }
        }
        let keys_path = format!("{CONTACT_DEFINITION}/Keys");
        let key_name = self.key_name();
        let keys = self.collection(&keys_path, &[("$select", "LogicalName,EntityKeyIndexStatus")]).await?;
        let key = keys.iter().find(|key| key["LogicalName"].as_str() == Some(key_name.as_str()));
        let key_label = format!("contact key {key_name}");
        match key {
            Some(key) => {
                if let Some(status) = key["EntityKeyIndexStatus"].as_str().filter(|status| *status != "Active") {
                    tracing::warn!(key = %key_name, status, "the contact alternate key is not active yet");
                }
                report.existing.push(key_label);
            }
            None => {
                let body = json!({
                    "SchemaName": key_name,
                    "DisplayName": label("Tributary Identity Key"),
                    "KeyAttributes": [self.hash_column()],
                });
                if self.create_definition(&keys_path, &key_label, &body).await? {
                    tracing::info!(key = %key_name, "alternate key created; Dataverse activates it in the background");
                    report.created.push(key_label);
                } else {
                    report.existing.push(key_label);
                }
            }
        }
        tracing::info!(created = report.created.len(), existing = report.existing.len(), "dynamics setup done");
        Ok(report)
    }

    async fn find_contact(&self, lookup: &ContactLookup) -> Result<Option<String>, CrmError> {
        let (column, value) = match lookup {
            ContactLookup::Email(email) => ("emailaddress1".to_owned(), email.trim().to_owned()),
            ContactLookup::Handle { platform, handle } => (self.handle_column(platform), handle.trim().to_owned()),
        };
        if value.is_empty() {
            return Ok(None);
        }
        // Active contacts only: a merged one stays behind, inactive, with its old handle.
        let filter = format!("{column} eq {} and statecode eq 0", odata_literal(&value));
        let query =
            [("$select", "contactid"), ("$filter", filter.as_str()), ("$orderby", "createdon asc"), ("$top", "1")];
        let rows = self.collection("contacts", &query).await?;
        Ok(rows.first().and_then(|row| row["contactid"].as_str()).and_then(row_id))
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
        let mut outcomes = Vec::with_capacity(contacts.len());
        for (contact, email) in contacts.iter().zip(&emails) {
            let mut record = Map::new();
            if let Some(handle) = trimmed(contact.handle.as_deref()) {
                record.insert(self.handle_column(&contact.platform), json!(cap(handle, TEXT_MAX)));
            }
            if let Some(url) = trimmed(contact.profile_url.as_deref()) {
                record.insert(self.profile_column(&contact.platform), json!(cap(url, TEXT_MAX)));
            }
            let last_name = trimmed(contact.display_name.as_deref())
                .or(trimmed(contact.handle.as_deref()))
                .or(trimmed(Some(&contact.identity)))
                .map(|name| cap(name, LAST_NAME_MAX));
            let outcome = match (email, email.as_ref().and_then(|email| found.get(email))) {
                (None, _) => {
                    let identity = contact.identity.trim();
                    if identity.is_empty() {
                        outcomes
                            .push(RecordOutcome::Rejected("the contact has neither an e-mail nor an identity".into()));
                        continue;
                    }
                    record.insert(self.identity_column(), json!(cap(identity, TEXT_MAX)));
                    if let Some(name) = last_name {
                        record.insert("lastname".into(), json!(name));
                    }
                    let path = format!("contacts({}='{}')", self.hash_column(), identity_hash(identity));
                    self.write_contact(&path, false, &record).await?
                }
                (Some(email), Some(found)) => {
                    let Some(id) = row_id(&found.id) else {
                        outcomes.push(RecordOutcome::Rejected("Dataverse gave a contact id that is not a GUID".into()));
                        continue;
                    };
                    if found.identity.is_none() {
                        let identity = format!("email:{email}");
                        record.insert(self.hash_column(), json!(identity_hash(&identity)));
                        record.insert(self.identity_column(), json!(cap(&identity, TEXT_MAX)));
                    }
                    if record.is_empty() {
                        outcomes.push(RecordOutcome::Done(id));
                        continue;
                    }
                    self.write_contact(&format!("contacts({id})"), true, &record).await?
                }
                (Some(email), None) => {
                    let identity = format!("email:{email}");
                    record.insert(self.identity_column(), json!(cap(&identity, TEXT_MAX)));
                    record.insert("emailaddress1".into(), json!(cap(email, EMAIL_MAX)));
                    if let Some(name) = last_name {
                        record.insert("lastname".into(), json!(name));
                    }
                    let path = format!("contacts({}='{}')", self.hash_column(), identity_hash(&identity));
                    self.write_contact(&path, false, &record).await?
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn upsert_activities(&self, activities: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
        let mut outcomes = Vec::with_capacity(activities.len());
        for activity in activities {
            let key = activity.key.trim();
            if key.is_empty() {
                outcomes.push(RecordOutcome::Rejected("the activity has no key".into()));
                continue;
            }
            let Some(contact_id) = row_id(&activity.contact_id) else {
                outcomes.push(RecordOutcome::Rejected(format!(
                    "`{}` is not a Dataverse contact id",
                    cap(activity.contact_id.trim(), 40)
                )));
                continue;
            };
            let id = annotation_id(key).hyphenated().to_string();
            let body = json!({
                "subject": subject(&activity.contribution),
                "notetext": note_text(&activity.contribution),
                "objectid_contact@odata.bind": format!("/contacts({contact_id})"),
            });
            let response = self.call(Method::PATCH, &format!("annotations({id})"), &[], &[], Some(&body)).await?;
            outcomes.push(match self.record_answer(response)? {
                Ok(_) => RecordOutcome::Done(id),
                Err(message) => RecordOutcome::Rejected(message),
            });
        }
        Ok(outcomes)
    }

    /// Deletes the notes; one already gone counts as done.
    async fn archive_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut outcomes = Vec::with_capacity(activity_ids.len());
        for id in activity_ids {
            let Some(id) = row_id(id) else {
                outcomes.push(RecordOutcome::Rejected(format!("`{}` is not a Dataverse note id", cap(id.trim(), 40))));
                continue;
            };
            let response = self.call(Method::DELETE, &format!("annotations({id})"), &[], &[], None).await?;
            outcomes.push(match response.status.as_u16() {
                404 => RecordOutcome::Done(()),
                _ => match self.record_answer(response)? {
                    Ok(_) => RecordOutcome::Done(()),
                    Err(message) => RecordOutcome::Rejected(message),
                },
            });
        }
        Ok(outcomes)
    }

    async fn update_rollups(&self, rollups: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        let mut outcomes = Vec::with_capacity(rollups.len());
        for rollup in rollups {
            let Some(id) = row_id(&rollup.contact_id) else {
                outcomes.push(RecordOutcome::Rejected(format!(
                    "`{}` is not a Dataverse contact id",
                    cap(rollup.contact_id.trim(), 40)
                )));
                continue;
            };
            let body = Value::Object(self.rollup_fields(rollup));
            let response =
                self.call(Method::PATCH, &format!("contacts({id})"), &[], &[("If-Match", "*")], Some(&body)).await?;
            outcomes.push(match self.record_answer(response)? {
                Ok(_) => RecordOutcome::Done(()),
                Err(message) => RecordOutcome::Rejected(message),
            });
        }
        Ok(outcomes)
    }

    /// Deletes the notes (`DELETE annotations(<id>)`), as archiving does:
    /// Dataverse notes have no other end. One already gone is done.
    async fn delete_activities(&self, activity_ids: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
        self.archive_activities(activity_ids).await
    }

    /// The unbound `Merge` action with the survivor as `Target` and the
    /// other as `Subordinate`, `PerformParentingChecks: false`. Dataverse
    /// moves the subordinate's related rows (Tributary's notes among them)
    /// to the target, which keeps its id, then deactivates the subordinate
    /// with `merged = true` and `masterid` naming the target. That state is
    /// read first, so merging again sends nothing; a subordinate gone while
    /// the survivor is active is done too.
    async fn merge_contacts(&self, survivor: &str, merged: &str) -> Result<(), CrmError> {
        let (Some(survivor), Some(merged)) = (row_id(survivor), row_id(merged)) else {
            return Err(CrmError::Unsupported(format!(
                "merging Dataverse contacts needs two contact ids (GUIDs), not `{}` and `{}`",
                cap(survivor.trim(), 40),
                cap(merged.trim(), 40)
            )));
        };
        if survivor == merged {
            return Ok(());
        }
        if self.merged_already(&survivor, &merged).await? {
            tracing::info!(%survivor, %merged, "dataverse contacts were already merged");
            return Ok(());
        }
        let body = json!({
            "Target": { "@odata.type": CONTACT_TYPE, "contactid": survivor },
            "Subordinate": { "@odata.type": CONTACT_TYPE, "contactid": merged },
            "UpdateContent": { "@odata.type": CONTACT_TYPE },
            "PerformParentingChecks": false,
        });
        let response = self.call(Method::POST, "Merge", &[], &[], Some(&body)).await?;
        if response.status.is_success() {
            tracing::info!(%survivor, %merged, "dataverse contacts merged");
            return Ok(());
        }
        if !matches!(response.status.as_u16(), 400 | 404 | 409 | 412) {
            return Err(self.unexpected(&response));
        }
        // Merged meanwhile (a concurrent run), or a survivor that cannot take it.
        if self.merged_already(&survivor, &merged).await? {
            tracing::info!(%survivor, %merged, "dataverse contacts were already merged");
            return Ok(());
        }
        if let Some(why) = self.survivor_problem(&survivor).await? {
            return Err(CrmError::Unsupported(format!(
                "cannot merge Dataverse contact {merged} into {survivor}: {why}"
            )));
        }
        tracing::debug!(%survivor, %merged, message = %self.scrub(&describe(&response)), "dataverse refused a merge");
        Err(self.unexpected(&response))
    }

    /// `GET contacts(<id>)?$select=…` with formatted values: each name is a
    /// column's logical name; a choice, lookup, yes/no, number or date is
    /// given as Dataverse formats it (`Customer`, the account's name), other
    /// values as they are. A lookup may be named without its `_…_value`
    /// form (`parentcustomerid`). When Dataverse refuses the `$select` (a
    /// name it does not know, or a lookup so named), the whole row is read
    /// instead. Names that are not logical names are left out; an unknown
    /// contact is an error.
    async fn contact_properties(
        &self,
        contact_id: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>, CrmError> {
        let mut wanted: Vec<(&str, String)> =
            names.iter().map(|name| name.trim()).filter_map(|name| Some((name, logical_name(name)?))).collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(Default::default());
        }
        let Some(id) = row_id(contact_id) else {
            return Err(CrmError::Unsupported(format!(
                "`{}` is not a Dataverse contact id",
                cap(contact_id.trim(), 40)
            )));
        };
        let path = format!("contacts({id})");
        let prefer = format!("odata.include-annotations=\"{FORMATTED}\"");
        let headers = [("Prefer", prefer.as_str())];
        let mut columns: Vec<&str> = wanted.iter().map(|(_, column)| column.as_str()).collect();
        columns.sort_unstable();
        columns.dedup();
        let select = columns.join(",");
        let mut response = self.call(Method::GET, &path, &[("$select", select.as_str())], &headers, None).await?;
        if response.status.as_u16() == 400 {
            tracing::debug!(message = %self.scrub(&describe(&response)), "dataverse refused a $select; reading the whole row");
            response = self.call(Method::GET, &path, &[], &headers, None).await?;
        }
        if !response.status.is_success() {
            return Err(self.unexpected(&response));
        }
        let row: Map<String, Value> = response.json().map_err(|error| self.decode(error))?;
        Ok(wanted
            .into_iter()
            .filter_map(|(name, column)| {
                let value = shown_value(&row, &column).or_else(|| shown_value(&row, &format!("_{column}_value")))?;
                Some((name.to_owned(), value))
            })
            .collect())
    }
}
