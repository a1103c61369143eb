//! A stateful mock of the HubSpot CRM API, for tests (feature `testkit`).
//!
//! It keeps contacts, notes, associations, property groups and property
//! definitions in memory and implements what Tributary uses with HubSpot's
//! semantics: batch upsert by e-mail or by any unique property (same id and
//! `new: false` for an existing key), batch update, search on `EQ` filters,
//! default associations, the properties API (409 on a duplicate), reading a
//! contact by id (a merged id answers with the contact it went into) and
//! merging contacts (the merged contact's associations move to the primary
//! one, which lists the merged id in `hs_merged_object_ids`). Batch
//! results come back in reverse input order, as HubSpot does not promise
//! input order either.
//!
//! Every request body is checked against HubSpot's published OpenAPI files
//! (`shared/specs/hubspot`), and so is every answer the mock gives; a
//! request that does not fit gets a 400 naming the path of the problem, and
//! both kinds of mismatch are kept in [`MockHubSpot::spec_violations`].
//!
//! Faults are injected per request with [`MockHubSpot::fail_next`], record
//! validation with [`MockHubSpot::reject_value`], and the daily quota with
//! [`MockHubSpot::set_daily_remaining`].
//!
//! ```no_run
//! # async fn demo() {
//! use tributary_crm::hubspot::mock::{Fault, MockHubSpot, RateLimitPolicy};
//! let hubspot = MockHubSpot::start().await; // token "test-token"
//! let base_url = hubspot.base_url(); // -> HubSpotConfig::base_url
//! hubspot.fail_next(1, Fault::RateLimited { retry_after_secs: Some(1), policy: RateLimitPolicy::TenSecondlyRolling });
//! // ... run the code under test ...
//! assert!(hubspot.spec_violations().is_empty());
//! # }
//! ```

pub mod spec;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::Response,
};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use self::spec::{Matched, SpecSet};

/// The token [`MockHubSpot::start`] expects.
pub const DEFAULT_TOKEN: &str = "test-token";
const BATCH_LIMIT: usize = 100;
const DAILY_LIMIT: u64 = 250_000;
const TEN_SECONDLY_LIMIT: usize = 190;
const SEARCH_LIMIT: u64 = 200;

/// Which HubSpot limit a 429 names in its `policyName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitPolicy {
    TenSecondlyRolling,
    Daily,
}

impl RateLimitPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitPolicy::TenSecondlyRolling => "TEN_SECONDLY_ROLLING",
            RateLimitPolicy::Daily => "DAILY",
        }
    }
}

/// A failure the mock gives instead of (or on top of) its normal answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// 429 with HubSpot's rate-limit body (`status`, `message`,
    /// `errorType: RATE_LIMIT`, `correlationId`, `policyName`) and a
    /// `Retry-After` header when `retry_after_secs` is set. Nothing is applied.
    RateLimited { retry_after_secs: Option<u64>, policy: RateLimitPolicy },
    /// This status (e.g. 503) with an error body. Nothing is applied.
    ServerError(u16),
    /// The request IS applied, then the answer is held back this long: with
    /// a delay past the client's timeout, the client sees a timeout although
    /// the write happened, as with a real network.
    Delay(Duration),
}

/// A contact or note as the mock holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct MockObject {
    pub id: String,
    pub properties: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl MockObject {
    /// A property value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.properties.get(name).map(String::as_str)
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The JSON body; a body that is not JSON is kept as a JSON string.
    pub body: Option<Value>,
    /// When it arrived.
    pub received_at: Instant,
    /// The status the mock answered (0 while it is being handled).
    pub status: u16,
}

/// Whether a violation is in what the client sent or in what the mock answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// A request or answer that does not fit HubSpot's OpenAPI files.
#[derive(Debug, Clone)]
pub struct SpecViolation {
    pub direction: Direction,
    pub method: String,
    pub path: String,
    pub status: Option<u16>,
    /// One line per problem, each starting with its JSON path.
    pub problems: Vec<String>,
}

/// The running mock. Dropping it stops the server.
pub struct MockHubSpot {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MockHubSpot {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl std::fmt::Debug for MockHubSpot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockHubSpot").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl MockHubSpot {
    /// Starts a mock on 127.0.0.1 (any free port) expecting the token
    /// [`DEFAULT_TOKEN`]. Panics when the spec files cannot be loaded.
    pub async fn start() -> MockHubSpot {
        MockHubSpot::start_with_token(DEFAULT_TOKEN).await
    }

    /// Starts a mock that answers 401 unless `Authorization: Bearer <token>`.
    pub async fn start_with_token(token: &str) -> MockHubSpot {
        let specs = SpecSet::load(&spec::default_spec_dir()).unwrap_or_else(|error| panic!("mock HubSpot: {error}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|error| panic!("mock HubSpot: cannot bind 127.0.0.1: {error}"));
        let addr = listener.local_addr().unwrap_or_else(|error| panic!("mock HubSpot: no local address: {error}"));
        let shared = Arc::new(Shared { token: token.to_owned(), specs, state: Mutex::new(Store::new()) });
        let app =
            Router::new().fallback(serve).layer(DefaultBodyLimit::max(64 * 1024 * 1024)).with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("mock HubSpot stopped: {error}");
            }
        });
        MockHubSpot { shared, addr, server }
    }

    /// `http://127.0.0.1:<port>`, for `HubSpotConfig::base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token the mock accepts.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Every contact, by ascending id.
    pub fn contacts(&self) -> Vec<MockObject> {
        self.shared.lock().objects_of(CONTACTS)
    }

    /// The contact whose `property` equals `value` (e-mail case-insensitively).
    pub fn contact_by(&self, property: &str, value: &str) -> Option<MockObject> {
        let store = self.shared.lock();
        let id = store.find_by(CONTACTS, property, value)?;
        store.objects.get(CONTACTS)?.get(&id).map(|stored| stored.snapshot(id))
    }

    /// Every note, keyed by the value of the unique property it was upserted
    /// by (`tributary_key`), or by `id:<id>` when it has none.
    pub fn notes(&self) -> BTreeMap<String, MockObject> {
        keyed_notes(self.shared.lock().objects.get(NOTES))
    }

    /// Archived notes (the recycling bin), keyed like [`MockHubSpot::notes`].
    pub fn archived_notes(&self) -> BTreeMap<String, MockObject> {
        keyed_notes(self.shared.lock().archived.get(NOTES))
    }

    /// Every note-to-contact association, as (note id, contact id), sorted.
    pub fn associations(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .associations
            .iter()
            .filter(|(from_type, _, to_type, _)| *from_type == NOTES && *to_type == CONTACTS)
            .map(|(_, from, _, to)| (from.to_string(), to.to_string()))
            .collect()
    }

    /// A property definition (the `Property` JSON of the properties API).
    pub fn property(&self, object_type: &str, name: &str) -> Option<Value> {
        let object_type = object_type_of(object_type)?;
        self.shared.lock().properties.get(object_type)?.get(name).cloned()
    }

    /// How many authorized requests tried to write: batch upserts, updates
    /// and creates, associations, property and group creations (answered
    /// with success or not).
    pub fn write_calls(&self) -> usize {
        self.shared.lock().write_calls
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the recorded requests (not the data).
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// The next `n` authorized requests meet `fault`.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut store = self.shared.lock();
        store.faults.extend(std::iter::repeat_n(fault, n));
    }

    /// Any record that sets a property (or upsert id) to `value`
    /// (case-insensitively) is refused: the whole batch gets HubSpot's
    /// 400 `VALIDATION_ERROR`, as a property validation rule would.
    pub fn reject_value(&self, value: &str) {
        self.shared.lock().rejections.push(value.to_owned());
    }

    /// [`MockHubSpot::reject_value`] for an e-mail address (answered as `INVALID_EMAIL`).
    pub fn reject_email(&self, email: &str) {
        self.reject_value(email);
    }

    /// Drops every rule of [`MockHubSpot::reject_value`].
    pub fn clear_rejections(&self) {
        self.shared.lock().rejections.clear();
    }

    /// Requests whose bodies, and answers of the mock, that do not fit the
    /// spec files. Tests should assert this is empty.
    pub fn spec_violations(&self) -> Vec<SpecViolation> {
        self.shared.lock().violations.clone()
    }

    /// Sets the daily quota left; each request uses one, the answers carry
    /// `X-HubSpot-RateLimit-Daily-Remaining`, and at zero every request gets
    /// a 429 with `policyName: DAILY`.
    pub fn set_daily_remaining(&self, remaining: u64) {
        self.shared.lock().daily_remaining = Some(remaining);
    }

    /// Sets a property of a contact as an administrator would in HubSpot
    /// (no validation); `false` when there is no contact `id`.
    pub fn set_contact_property(&self, id: &str, name: &str, value: &str) -> bool {
        let mut store = self.shared.lock();
        let contact = id.parse::<u64>().ok().and_then(|id| store.objects.get_mut(CONTACTS)?.get_mut(&id));
        match contact {
            Some(stored) => {
                stored.properties.insert(name.to_owned(), value.to_owned());
                true
            }
            None => false,
        }
    }

    /// The contact a merged contact id went into (following later merges).
    pub fn merged_into(&self, id: &str) -> Option<String> {
        let store = self.shared.lock();
        let id = id.parse::<u64>().ok()?;
        store.merged_into.contains_key(&id).then(|| store.resolve(CONTACTS, id)).flatten().map(|id| id.to_string())
    }

    /// With `true`, a merge gives the merged contact a new id, as HubSpot
    /// may do for some merges; off by default (the primary keeps its id).
    pub fn merge_gives_new_id(&self, new_id: bool) {
        self.shared.lock().merge_new_id = new_id;
    }

    /// With `true`, properties that were never created are accepted (as
    /// strings) and any `idProperty` counts as unique, so tests need not run
    /// `setup` first. Off by default: HubSpot refuses unknown properties.
    pub fn accept_unknown_properties(&self, accept: bool) {
        self.shared.lock().lenient = accept;
    }
}

const CONTACTS: &str = "contacts";
const NOTES: &str = "notes";

/// The object types the mock knows, by any of their names.
fn object_type_of(name: &str) -> Option<&'static str> {
    match name.to_ascii_lowercase().as_str() {
        "contacts" | "contact" | "0-1" => Some(CONTACTS),
        "notes" | "note" | "0-46" => Some(NOTES),
        _ => None,
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn time_text(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn correlation_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("5a1c0c5e-7b1d-4c3e-9f00-{:012x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

struct Shared {
    token: String,
    specs: SpecSet,
    state: Mutex<Store>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Notes keyed by their upsert key (`tributary_key`), or `id:<id>` without one.
fn keyed_notes(notes: Option<&BTreeMap<u64, Stored>>) -> BTreeMap<String, MockObject> {
    notes
        .into_iter()
        .flatten()
        .map(|(id, stored)| {
            let key = stored.upsert_key.clone().unwrap_or_else(|| format!("id:{id}"));
            (key, stored.snapshot(*id))
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Stored {
    properties: BTreeMap<String, String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// The `idProperty` value it was last upserted by.
    upsert_key: Option<String>,
}

impl Stored {
    fn snapshot(&self, id: u64) -> MockObject {
        MockObject {
            id: id.to_string(),
            properties: self.properties.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// An answer before it becomes an HTTP response.
struct Reply {
    status: u16,
    body: Value,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply { status, body, headers: Vec::new() }
    }

    /// HubSpot's error body: the spec's `Error` plus `status: "error"`.
    fn error(status: u16, category: &str, message: impl Into<String>) -> Reply {
        Reply::json(
            status,
            json!({
                "status": "error",
                "message": message.into(),
                "correlationId": correlation_id(),
                "category": category,
            }),
        )
    }

    fn with_context(mut self, context: Value) -> Reply {
        self.body["context"] = context;
        self
    }

    /// The 400 of a batch with invalid property values, as HubSpot words it.
    fn invalid_values(invalid: &[Invalid]) -> Reply {
        let details: Vec<Value> = invalid
            .iter()
            .map(|bad| json!({ "isValid": false, "message": bad.message, "error": bad.error, "name": bad.name }))
            .collect();
        let list = serde_json::to_string(&details).unwrap_or_default();
        Reply::error(400, "VALIDATION_ERROR", format!("Property values were not valid: {list}"))
    }
}

/// One invalid property value.
#[derive(Debug, Clone)]
struct Invalid {
    name: String,
    error: &'static str,
    message: String,
}

impl Invalid {
    fn new(name: &str, error: &'static str, message: String) -> Invalid {
        Invalid { name: name.to_owned(), error, message }
    }
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = Instant::now();
    let (reply, delay) = shared.handle(received_at, &method, &uri, &headers, &body);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let text = if reply.status == 204 { String::new() } else { serde_json::to_string(&reply.body).unwrap_or_default() };
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json;charset=utf-8");
    for (name, value) in &reply.headers {
        builder = builder.header(*name, value.as_str());
    }
    builder.body(Body::from(text)).unwrap_or_else(|_| {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response
    })
}

fn is_write(method: &Method, path: &str) -> bool {
    match *method {
        Method::POST => !(path.ends_with("/search") || path.ends_with("/batch/read") || path.contains("/usage/")),
        Method::PUT | Method::PATCH | Method::DELETE => true,
        _ => false,
    }
}

impl Shared {
    fn handle(
        &self,
        received_at: Instant,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        raw: &[u8],
    ) -> (Reply, Option<Duration>) {
        let path = uri.path().to_owned();
        let query = uri.query().map(str::to_owned);
        let parsed: Result<Option<Value>, String> = if raw.is_empty() {
            Ok(None)
        } else {
            serde_json::from_slice(raw).map(Some).map_err(|error| error.to_string())
        };
        let mut store = self.lock();
        let index = store.requests.len();
        store.requests.push(RecordedRequest {
            method: method.as_str().to_owned(),
            path: path.clone(),
            query: query.clone(),
            body: match &parsed {
                Ok(body) => body.clone(),
                Err(_) => Some(Value::String(String::from_utf8_lossy(raw).into_owned())),
            },
            received_at,
            status: 0,
        });
        let (mut reply, delay) = self.respond(&mut store, method, &path, query.as_deref(), headers, parsed);
        reply.headers.extend(store.rate_limit_headers(received_at));
        if let Some(entry) = store.requests.get_mut(index) {
            entry.status = reply.status;
        }
        (reply, delay)
    }

    fn respond(
        &self,
        store: &mut Store,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        parsed: Result<Option<Value>, String>,
    ) -> (Reply, Option<Duration>) {
        let expected = format!("Bearer {}", self.token);
        let authorization = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
        if authorization != Some(expected.as_str()) {
            let message = "Authentication credentials not found. This API supports OAuth 2.0 authentication and you \
                           can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview";
            return (Reply::error(401, "INVALID_AUTHENTICATION", message), None);
        }
        if is_write(method, path) {
            store.write_calls += 1;
        }
        if let Some(remaining) = store.daily_remaining.as_mut() {
            if *remaining == 0 {
                return (rate_limited(None, RateLimitPolicy::Daily), None);
            }
            *remaining -= 1;
        }
        let mut delay = None;
        match store.faults.pop_front() {
            Some(Fault::RateLimited { retry_after_secs, policy }) => {
                return (rate_limited(retry_after_secs, policy), None);
            }
            Some(Fault::ServerError(status)) => {
                let reply = Reply::error(status, "INTERNAL_ERROR", "Sorry, the server could not handle this request");
                return (reply, None);
            }
            Some(Fault::Delay(wait)) => delay = Some(wait),
            None => {}
        }
        let body = match parsed {
            Ok(body) => body,
            Err(error) => {
                store.violations.push(SpecViolation {
                    direction: Direction::Request,
                    method: method.as_str().to_owned(),
                    path: path.to_owned(),
                    status: None,
                    problems: vec![format!("$: the body is not JSON: {error}")],
                });
                return (Reply::error(400, "VALIDATION_ERROR", format!("Invalid input JSON: {error}")), delay);
            }
        };
        let method_name = method.as_str();
        let matched = match self.specs.validate_request(method_name, path, body.as_ref()) {
            Ok(matched) => matched,
            Err(problems) => {
                let known = self.specs.find(method_name, path).is_some();
                store.violations.push(SpecViolation {
                    direction: Direction::Request,
                    method: method_name.to_owned(),
                    path: path.to_owned(),
                    status: None,
                    problems: problems.clone(),
                });
                let reply = if known {
                    Reply::error(400, "VALIDATION_ERROR", format!("Invalid input: {}", problems.join("; ")))
                } else {
                    Reply::error(404, "OBJECT_NOT_FOUND", format!("No route for {method_name} {path}"))
                };
                return (reply, delay);
            }
        };
        let reply = store.route(method_name, &matched, path, query, body.unwrap_or(Value::Null));
        if let Err(problems) = self.specs.validate_response(method_name, path, reply.status, &reply.body) {
            store.violations.push(SpecViolation {
                direction: Direction::Response,
                method: method_name.to_owned(),
                path: path.to_owned(),
                status: Some(reply.status),
                problems,
            });
        }
        (reply, delay)
    }
}

/// HubSpot's 429. Its body is not the spec's `Error` (no `category`), so
/// the mock does not check it against the spec.
fn rate_limited(retry_after_secs: Option<u64>, policy: RateLimitPolicy) -> Reply {
    let message = match policy {
        RateLimitPolicy::Daily => "You have reached your daily limit.",
        RateLimitPolicy::TenSecondlyRolling => "You have reached your ten_secondly_rolling limit.",
    };
    let mut reply = Reply::json(
        429,
        json!({
            "status": "error",
            "message": message,
            "errorType": "RATE_LIMIT",
            "correlationId": correlation_id(),
            "policyName": policy.as_str(),
        }),
    );
    if let Some(seconds) = retry_after_secs {
        reply.headers.push(("retry-after", seconds.to_string()));
    }
    reply
}

/// The mock's data and controls.
struct Store {
    next_id: u64,
    objects: BTreeMap<&'static str, BTreeMap<u64, Stored>>,
    /// The recycling bin.
    archived: BTreeMap<&'static str, BTreeMap<u64, Stored>>,
    /// (from type, from id, to type, to id)
    associations: BTreeSet<(&'static str, u64, &'static str, u64)>,
    properties: BTreeMap<&'static str, BTreeMap<String, Value>>,
    groups: BTreeMap<&'static str, BTreeMap<String, Value>>,
    faults: VecDeque<Fault>,
    rejections: Vec<String>,
    requests: Vec<RecordedRequest>,
    violations: Vec<SpecViolation>,
    write_calls: usize,
    daily_remaining: Option<u64>,
    lenient: bool,
    /// Contact id -> the contact it was merged into.
    merged_into: BTreeMap<u64, u64>,
    merge_new_id: bool,
}

/// A HubSpot-defined property.
fn builtin_property(name: &str, label: &str, data_type: &str, field_type: &str, group: &str, read_only: bool) -> Value {
    let at = time_text(now());
    json!({
        "name": name,
        "label": label,
        "type": data_type,
        "fieldType": field_type,
        "groupName": group,
        "description": "",
        "options": [],
        "displayOrder": -1,
        "hasUniqueValue": false,
        "hidden": false,
        "formField": !read_only,
        "calculated": false,
        "externalOptions": false,
        "hubspotDefined": true,
        "archived": false,
        "createdAt": at,
        "updatedAt": at,
        "modificationMetadata": { "archivable": false, "readOnlyDefinition": true, "readOnlyValue": read_only },
    })
}

fn group_json(name: &str, label: &str, display_order: i64) -> Value {
    json!({ "name": name, "label": label, "displayOrder": display_order, "archived": false })
}

impl Store {
    fn new() -> Store {
        let mut properties = BTreeMap::new();
        let contact_defaults = [
            ("email", "Email", "string", "text", false),
            ("firstname", "First Name", "string", "text", false),
            ("lastname", "Last Name", "string", "text", false),
            ("hs_object_id", "Record ID", "number", "number", true),
            ("createdate", "Create Date", "datetime", "date", true),
            ("lastmodifieddate", "Last Modified Date", "datetime", "date", true),
            ("company", "Company Name", "string", "text", false),
            ("lifecyclestage", "Lifecycle Stage", "enumeration", "radio", false),
            ("hs_merged_object_ids", "Merged Contact IDs", "enumeration", "checkbox", true),
        ];
        properties.insert(
            CONTACTS,
            contact_defaults
                .iter()
                .map(|(name, label, data_type, field, read_only)| {
                    (
                        name.to_string(),
                        builtin_property(name, label, data_type, field, "contactinformation", *read_only),
                    )
                })
                .collect(),
        );
        if let Some(stage) =
            properties.get_mut(CONTACTS).and_then(|c: &mut BTreeMap<String, Value>| c.get_mut("lifecyclestage"))
        {
            let stages = [
                "subscriber",
                "lead",
                "marketingqualifiedlead",
                "salesqualifiedlead",
                "opportunity",
                "customer",
                "evangelist",
                "other",
            ];
            stage["options"] = stages
                .iter()
                .enumerate()
                .map(|(order, value)| json!({ "label": value, "value": value, "displayOrder": order, "hidden": false }))
                .collect();
        }
        let note_defaults = [
            ("hs_note_body", "Note body", "string", "html", false),
            ("hs_timestamp", "Activity date", "datetime", "date", false),
            ("hs_object_id", "Record ID", "number", "number", true),
            ("hs_createdate", "Create date", "datetime", "date", true),
            ("hs_lastmodifieddate", "Last modified date", "datetime", "date", true),
        ];
        properties.insert(
            NOTES,
            note_defaults
                .iter()
                .map(|(name, label, data_type, field, read_only)| {
                    (name.to_string(), builtin_property(name, label, data_type, field, "noteinformation", *read_only))
                })
                .collect(),
        );
        let mut groups = BTreeMap::new();
        groups.insert(
            CONTACTS,
            BTreeMap::from([(
                "contactinformation".to_owned(),
                group_json("contactinformation", "Contact information", 0),
            )]),
        );
        groups.insert(
            NOTES,
            BTreeMap::from([("noteinformation".to_owned(), group_json("noteinformation", "Note information", 0))]),
        );
        Store {
            next_id: 1001,
            objects: BTreeMap::from([(CONTACTS, BTreeMap::new()), (NOTES, BTreeMap::new())]),
            archived: BTreeMap::new(),
            associations: BTreeSet::new(),
            properties,
            groups,
            faults: VecDeque::new(),
            rejections: Vec::new(),
            requests: Vec::new(),
            violations: Vec::new(),
            write_calls: 0,
            daily_remaining: None,
            lenient: false,
            merged_into: BTreeMap::new(),
            merge_new_id: false,
        }
    }

    fn rate_limit_headers(&self, at: Instant) -> Vec<(&'static str, String)> {
        let window = Duration::from_secs(10);
        let recent =
            self.requests.iter().rev().take_while(|request| at.duration_since(request.received_at) < window).count();
        let daily_remaining =
            self.daily_remaining.unwrap_or_else(|| DAILY_LIMIT.saturating_sub(self.requests.len() as u64));
        vec![
            ("x-hubspot-ratelimit-daily", DAILY_LIMIT.to_string()),
            ("x-hubspot-ratelimit-daily-remaining", daily_remaining.to_string()),
            ("x-hubspot-ratelimit-interval-milliseconds", "10000".into()),
            ("x-hubspot-ratelimit-max", TEN_SECONDLY_LIMIT.to_string()),
            ("x-hubspot-ratelimit-remaining", TEN_SECONDLY_LIMIT.saturating_sub(recent).to_string()),
        ]
    }

    fn objects_of(&self, object_type: &str) -> Vec<MockObject> {
        self.objects
            .get(object_type)
            .map(|objects| objects.iter().map(|(id, stored)| stored.snapshot(*id)).collect())
            .unwrap_or_default()
    }

    fn property_def(&self, object_type: &str, name: &str) -> Option<&Value> {
        self.properties.get(object_type)?.get(name)
    }

    /// Whether `name` holds unique values (e-mail, or `hasUniqueValue`).
    fn is_unique(&self, object_type: &str, name: &str) -> bool {
        (object_type == CONTACTS && name == "email")
            || self.property_def(object_type, name).and_then(|def| def["hasUniqueValue"].as_bool()).unwrap_or(false)
    }

    /// Whether `name` can serve as an upsert/update `idProperty`; in lenient
    /// mode any property never created can.
    fn can_be_id_property(&self, object_type: &str, name: &str) -> bool {
        self.is_unique(object_type, name) || (self.lenient && self.property_def(object_type, name).is_none())
    }

    /// The object whose `property` is `value`: e-mail and search-like
    /// comparisons are case-insensitive, as in HubSpot.
    fn find_by(&self, object_type: &str, property: &str, value: &str) -> Option<u64> {
        let objects = self.objects.get(object_type)?;
        if property == "hs_object_id" {
            return value.parse::<u64>().ok().filter(|id| objects.contains_key(id));
        }
        objects
            .iter()
            .find(|(_, stored)| {
                stored.properties.get(property).is_some_and(|found| {
                    if property == "email" { found.eq_ignore_ascii_case(value) } else { found == value }
                })
            })
            .map(|(id, _)| *id)
    }

    /// Checks one property value as HubSpot would.
    fn check_value(&self, object_type: &str, name: &str, value: &str) -> Result<(), Invalid> {
        if self.rejections.iter().any(|rejected| rejected.eq_ignore_ascii_case(value)) {
            return Err(if name == "email" {
                Invalid::new(name, "INVALID_EMAIL", format!("Email address {value} is invalid"))
            } else {
                Invalid::new(
                    name,
                    "INVALID_PROPERTY_VALIDATION_RULE",
                    format!("{value} does not meet the validation rules of {name}"),
                )
            });
        }
        let Some(definition) = self.property_def(object_type, name) else {
            return if self.lenient {
                Ok(())
            } else {
                Err(Invalid::new(name, "PROPERTY_DOESNT_EXIST", format!("Property \"{name}\" does not exist")))
            };
        };
        if definition["modificationMetadata"]["readOnlyValue"].as_bool() == Some(true) {
            return Err(Invalid::new(
                name,
                "READ_ONLY_VALUE",
                format!("\"{name}\" is a read only property; its value cannot be set."),
            ));
        }
        if name == "email" && !valid_email(value) {
            return Err(Invalid::new(name, "INVALID_EMAIL", format!("Email address {value} is invalid")));
        }
        let ok = match definition["type"].as_str().unwrap_or("string") {
            "number" => value.is_empty() || value.trim().parse::<f64>().is_ok_and(f64::is_finite),
            "datetime" | "date" => {
                value.is_empty() || value.parse::<i64>().is_ok() || DateTime::parse_from_rfc3339(value).is_ok()
            }
            "bool" => matches!(value, "" | "true" | "false"),
            "enumeration" => {
                let options: BTreeSet<&str> = definition["options"]
                    .as_array()
                    .map(|options| options.iter().filter_map(|o| o["value"].as_str()).collect())
                    .unwrap_or_default();
                value.is_empty() || value.split(';').all(|part| options.contains(part))
            }
            _ => value.chars().count() <= 65_536,
        };
        if ok {
            Ok(())
        } else {
            let data_type = definition["type"].as_str().unwrap_or("string");
            Err(Invalid::new(name, "INVALID_VALUE", format!("{value:?} is not a valid {data_type} value for {name}")))
        }
    }

    fn route(&mut self, method: &str, matched: &Matched, path: &str, query: Option<&str>, body: Value) -> Reply {
        let template = matched.template.as_str();
        // /crm/v3/objects/<type>/...
        let path_type = path.split('/').filter(|s| !s.is_empty()).nth(3).and_then(object_type_of);
        let param_type = |name: &str| matched.params.get(name).and_then(|value| object_type_of(value));
        let object_route = template.starts_with("/crm/v3/objects/");
        match (method, template) {
            ("POST", _) if object_route && template.ends_with("/batch/upsert") => {
                with_type(path_type, |t| self.batch_write(t, &body, true))
            }
            ("POST", _) if object_route && template.ends_with("/batch/update") => {
                with_type(path_type, |t| self.batch_write(t, &body, false))
            }
            ("POST", "/crm/v3/objects/notes/batch/archive") => with_type(path_type, |t| self.batch_archive(t, &body)),
            ("POST", "/crm/v3/objects/contacts/merge") => self.merge_contacts(&body),
            ("POST", _) if object_route && template.ends_with("/search") => {
                with_type(path_type, |t| self.search(t, &body))
            }
            ("GET", "/crm/v3/objects/contacts" | "/crm/v3/objects/notes") => {
                with_type(path_type, |t| self.list(t, query))
            }
            ("GET", "/crm/v3/objects/contacts/{contactId}" | "/crm/v3/objects/notes/{noteId}") => {
                let id = matched.params.values().next().cloned().unwrap_or_default();
                with_type(path_type, |t| self.read(t, &id, query))
            }
            ("POST", "/crm/v4/associations/{fromObjectType}/{toObjectType}/batch/associate/default") => {
                match (param_type("fromObjectType"), param_type("toObjectType")) {
                    (Some(from), Some(to)) => self.associate(from, to, &body),
                    _ => Reply::error(400, "VALIDATION_ERROR", "Unknown object type"),
                }
            }
            ("GET", "/crm/v3/properties/{objectType}") => with_type(param_type("objectType"), |t| {
                let results: Vec<Value> =
                    self.properties.get(t).map(|p| p.values().cloned().collect()).unwrap_or_default();
                Reply::json(200, json!({ "results": results }))
            }),
            ("POST", "/crm/v3/properties/{objectType}") => {
                with_type(param_type("objectType"), |t| self.create_property(t, &body))
            }
            ("GET", "/crm/v3/properties/{objectType}/{propertyName}") => with_type(param_type("objectType"), |t| {
                let name = matched.params.get("propertyName").cloned().unwrap_or_default();
                match self.property_def(t, &name) {
                    Some(definition) => Reply::json(200, definition.clone()),
                    None => Reply::error(404, "OBJECT_NOT_FOUND", format!("Unable to find property {name}")),
                }
            }),
            ("GET", "/crm/v3/properties/{objectType}/groups") => with_type(param_type("objectType"), |t| {
                let results: Vec<Value> = self.groups.get(t).map(|g| g.values().cloned().collect()).unwrap_or_default();
                Reply::json(200, json!({ "results": results }))
            }),
            ("POST", "/crm/v3/properties/{objectType}/groups") => {
                with_type(param_type("objectType"), |t| self.create_group(t, &body))
            }
            ("GET", "/crm/v3/properties/{objectType}/groups/{groupName}") => with_type(param_type("objectType"), |t| {
                let name = matched.params.get("groupName").cloned().unwrap_or_default();
                match self.groups.get(t).and_then(|groups| groups.get(&name)) {
                    Some(group) => Reply::json(200, group.clone()),
                    None => Reply::error(404, "OBJECT_NOT_FOUND", format!("Unable to find group {name}")),
                }
            }),
            _ => Reply::error(501, "NOT_IMPLEMENTED", format!("The mock does not implement {method} {template}")),
        }
    }

    /// The live object an id names, following merges.
    fn resolve(&self, object_type: &str, mut id: u64) -> Option<u64> {
        let objects = self.objects.get(object_type)?;
        for _ in 0..64 {
            if objects.contains_key(&id) {
                return Some(id);
            }
            id = *self.merged_into.get(&id)?;
        }
        None
    }

    /// `POST /crm/v3/objects/contacts/merge`: the primary keeps its values
    /// and gains the ones it lacks, the merged contact's associations move
    /// to it, and the merged contact is gone (its id now reads as the
    /// primary). Unknown ids are a 404, ids that are (or were merged into)
    /// the same contact a 400.
    fn merge_contacts(&mut self, body: &Value) -> Reply {
        let primary_text = body["primaryObjectId"].as_str().unwrap_or_default();
        let merged_text = body["objectIdToMerge"].as_str().unwrap_or_default();
        let live = |store: &Store, text: &str| text.parse::<u64>().ok().and_then(|id| store.resolve(CONTACTS, id));
        let (primary, merged) = match (live(self, primary_text), live(self, merged_text)) {
            (Some(primary), Some(merged)) => (primary, merged),
            (None, _) => return Reply::error(404, "OBJECT_NOT_FOUND", format!("Object not found: {primary_text}")),
            (_, None) => return Reply::error(404, "OBJECT_NOT_FOUND", format!("Object not found: {merged_text}")),
        };
        if primary == merged {
            return Reply::error(
                400,
                "VALIDATION_ERROR",
                format!("Cannot merge {merged_text} into {primary_text}: they are the same object ({primary})"),
            );
        }
        let Some(gone) = self.objects.get_mut(CONTACTS).and_then(|contacts| contacts.remove(&merged)) else {
            return Reply::error(404, "OBJECT_NOT_FOUND", format!("Object not found: {merged_text}"));
        };
        let moved: Vec<_> = self
            .associations
            .iter()
            .filter(|(from_type, from, to_type, to)| {
                (*to_type == CONTACTS && *to == merged) || (*from_type == CONTACTS && *from == merged)
            })
            .copied()
            .collect();
        for (from_type, from, to_type, to) in moved {
            self.associations.remove(&(from_type, from, to_type, to));
            let swap = |id: u64, object_type: &str| if object_type == CONTACTS && id == merged { primary } else { id };
            self.associations.insert((from_type, swap(from, from_type), to_type, swap(to, to_type)));
        }
        for target in self.merged_into.values_mut() {
            if *target == merged {
                *target = primary;
            }
        }
        self.merged_into.insert(merged, primary);
        let mut final_id = primary;
        if self.merge_new_id {
            final_id = self.next_id;
            self.next_id += 1;
        }
        let Some(mut stored) = self.objects.get_mut(CONTACTS).and_then(|contacts| contacts.remove(&primary)) else {
            return Reply::error(404, "OBJECT_NOT_FOUND", format!("Object not found: {primary_text}"));
        };
        let mut merged_ids: Vec<String> = stored
            .properties
            .get("hs_merged_object_ids")
            .into_iter()
            .chain(gone.properties.get("hs_merged_object_ids"))
            .flat_map(|ids| ids.split(';').map(str::to_owned))
            .filter(|id| !id.is_empty())
            .collect();
        merged_ids.push(merged.to_string());
        if final_id != primary {
            merged_ids.push(primary.to_string());
        }
        let system = ["hs_object_id", "createdate", "lastmodifieddate", "hs_merged_object_ids"];
        for (name, value) in gone.properties {
            if system.contains(&name.as_str()) || value.is_empty() {
                continue;
            }
            let held = stored.properties.get(&name).is_some_and(|held| !held.is_empty());
            if !held {
                stored.properties.insert(name, value);
            }
        }
        let at = now();
        stored.properties.insert("hs_merged_object_ids".into(), merged_ids.join(";"));
        stored.properties.insert("hs_object_id".into(), final_id.to_string());
        stored.properties.insert("lastmodifieddate".into(), time_text(at));
        stored.updated_at = at;
        let answer = self.object_json(CONTACTS, final_id, &stored, &[]);
        self.objects.entry(CONTACTS).or_default().insert(final_id, stored);
        if final_id != primary {
            let moved: Vec<_> = self
                .associations
                .iter()
                .filter(|(_, _, to_type, to)| *to_type == CONTACTS && *to == primary)
                .copied()
                .collect();
            for (from_type, from, to_type, to) in moved {
                self.associations.remove(&(from_type, from, to_type, to));
                self.associations.insert((from_type, from, to_type, final_id));
            }
            for target in self.merged_into.values_mut() {
                if *target == primary {
                    *target = final_id;
                }
            }
            self.merged_into.insert(primary, final_id);
        }
        Reply::json(200, answer)
    }

    /// Batch archive: the objects move to the recycling bin (204 whether
    /// or not they were there).
    fn batch_archive(&mut self, object_type: &'static str, body: &Value) -> Reply {
        let inputs = body["inputs"].as_array().cloned().unwrap_or_default();
        if inputs.len() > BATCH_LIMIT {
            return Reply::error(
                400,
                "VALIDATION_ERROR",
                format!("Too many inputs: {} were given, the limit is {BATCH_LIMIT}", inputs.len()),
            );
        }
        for input in inputs {
            let Some(id) = input["id"].as_str().and_then(|id| id.parse::<u64>().ok()) else { continue };
            if let Some(stored) = self.objects.get_mut(object_type).and_then(|objects| objects.remove(&id)) {
                self.archived.entry(object_type).or_default().insert(id, stored);
                self.associations.retain(|(from_type, from, _, _)| !(*from_type == object_type && *from == id));
            }
        }
        Reply::json(204, Value::Null)
    }

    /// Batch upsert (`upsert = true`) or update. Invalid values refuse the
    /// whole batch with a 400; an update of an unknown id is a 207 error.
    fn batch_write(&mut self, object_type: &'static str, body: &Value, upsert: bool) -> Reply {
        let inputs = body["inputs"].as_array().cloned().unwrap_or_default();
        if inputs.len() > BATCH_LIMIT {
            return Reply::error(
                400,
                "VALIDATION_ERROR",
                format!("Too many inputs: {} were given, the limit is {BATCH_LIMIT}", inputs.len()),
            );
        }
        struct Planned {
            target: Option<u64>,
            id_property: String,
            properties: BTreeMap<String, String>,
            key: Option<String>,
            trace: Option<String>,
        }
        let mut seen = BTreeSet::new();
        let mut planned = Vec::new();
        let mut invalid = Vec::new();
        let mut not_found = Vec::new();
        for input in &inputs {
            let id = input["id"].as_str().unwrap_or_default().to_owned();
            let id_property = input["idProperty"].as_str().unwrap_or("hs_object_id").to_owned();
            let id = if id_property == "email" { id.trim().to_lowercase() } else { id };
            if !seen.insert((id_property.clone(), id.clone())) {
                return Reply::error(
                    400,
                    "VALIDATION_ERROR",
                    format!("Duplicate IDs found in batch input: [{id}]. IDs must be unique"),
                )
                .with_context(json!({ "ids": [id] }));
            }
            if id_property != "hs_object_id" && !self.can_be_id_property(object_type, &id_property) {
                return Reply::error(
                    400,
                    "VALIDATION_ERROR",
                    format!("Unable to perform update/upsert by non-unique property {id_property}"),
                );
            }
            let mut properties: BTreeMap<String, String> = input["properties"]
                .as_object()
                .map(|fields| {
                    fields
                        .iter()
                        .map(|(name, value)| (name.clone(), value.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            if id_property != "hs_object_id" {
                if let Err(bad) = self.check_value(object_type, &id_property, &id) {
                    invalid.push(bad);
                }
                properties.insert(id_property.clone(), id.clone());
            }
            for (name, value) in &properties {
                if name == &id_property {
                    continue;
                }
                if let Err(bad) = self.check_value(object_type, name, value) {
                    invalid.push(bad);
                }
            }
            let target = self.find_by(object_type, &id_property, &id);
            if target.is_none() && (!upsert || id_property == "hs_object_id") {
                not_found.push(id.clone());
                continue;
            }
            planned.push(Planned {
                target,
                id_property: id_property.clone(),
                properties,
                key: (id_property != "hs_object_id").then_some(id),
                trace: input["objectWriteTraceId"].as_str().map(str::to_owned),
            });
        }
        // Unique values may be held by one object only.
        let mut claimed: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (index, plan) in planned.iter().enumerate() {
            // New objects have no id yet: stand-ins that cannot clash with ids.
            let owner = plan.target.unwrap_or(u64::MAX - index as u64);
            for (name, value) in &plan.properties {
                let unique_here = self.is_unique(object_type, name) || (self.lenient && name == &plan.id_property);
                if value.is_empty() || !unique_here {
                    continue;
                }
                let value_key = if name == "email" { value.to_lowercase() } else { value.clone() };
                let clash_stored =
                    self.find_by(object_type, name, value).is_some_and(|holder| Some(holder) != plan.target);
                let clash_batch = claimed.insert((name.clone(), value_key), owner).is_some_and(|other| other != owner);
                if clash_stored || clash_batch {
                    invalid.push(Invalid::new(
                        name,
                        "INVALID_UNIQUE_VALUE",
                        format!("A record already has the value {value} for the unique property {name}"),
                    ));
                }
            }
        }
        if !invalid.is_empty() {
            return Reply::invalid_values(&invalid);
        }
        let started = time_text(now());
        let mut results = Vec::new();
        for plan in planned {
            let at = now();
            let objects = self.objects.entry(object_type).or_default();
            let (id, created) = match plan.target {
                Some(id) => (id, false),
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    let mut properties = BTreeMap::new();
                    properties.insert("hs_object_id".to_owned(), id.to_string());
                    let (created, modified) = if object_type == NOTES {
                        ("hs_createdate", "hs_lastmodifieddate")
                    } else {
                        ("createdate", "lastmodifieddate")
                    };
                    properties.insert(created.to_owned(), time_text(at));
                    properties.insert(modified.to_owned(), time_text(at));
                    objects.insert(id, Stored { properties, created_at: at, updated_at: at, upsert_key: None });
                    (id, true)
                }
            };
            let Some(stored) = objects.get_mut(&id) else { continue };
            stored.properties.extend(plan.properties);
            stored.updated_at = at;
            let modified = if object_type == NOTES { "hs_lastmodifieddate" } else { "lastmodifieddate" };
            stored.properties.insert(modified.to_owned(), time_text(at));
            if plan.key.is_some() {
                stored.upsert_key = plan.key;
            }
            let mut result = json!({
                "id": id.to_string(),
                "properties": stored.properties,
                "createdAt": time_text(stored.created_at),
                "updatedAt": time_text(stored.updated_at),
                "archived": false,
            });
            if upsert {
                result["new"] = json!(created);
            }
            if let Some(trace) = plan.trace {
                result["objectWriteTraceId"] = json!(trace);
            }
            results.push(result);
        }
        results.reverse();
        let mut answer = json!({
            "status": "COMPLETE",
            "results": results,
            "requestedAt": started,
            "startedAt": started,
            "completedAt": time_text(now()),
        });
        if not_found.is_empty() {
            return Reply::json(200, answer);
        }
        let noun = if object_type == NOTES { "NOTE" } else { "CONTACT" };
        answer["numErrors"] = json!(1);
        answer["errors"] = json!([{
            "status": "error",
            "category": "OBJECT_NOT_FOUND",
            "message": format!("Could not get some {noun} objects, they may be deleted or not exist. Check that ids are valid."),
            "context": { "ids": not_found },
            "errors": [],
            "links": {},
        }]);
        Reply::json(207, answer)
    }

    fn object_json(&self, object_type: &str, id: u64, stored: &Stored, wanted: &[String]) -> Value {
        let defaults = ["hs_object_id", "createdate", "lastmodifieddate", "hs_createdate", "hs_lastmodifieddate"];
        let properties: Map<String, Value> = stored
            .properties
            .iter()
            .filter(|(name, _)| {
                defaults.contains(&name.as_str())
                    || wanted.iter().any(|w| w == *name)
                    || (wanted.is_empty()
                        && object_type == CONTACTS
                        && ["email", "firstname", "lastname"].contains(&name.as_str()))
            })
            .map(|(name, value)| (name.clone(), Value::String(value.clone())))
            .collect();
        json!({
            "id": id.to_string(),
            "properties": properties,
            "createdAt": time_text(stored.created_at),
            "updatedAt": time_text(stored.updated_at),
            "archived": false,
        })
    }

    fn search(&self, object_type: &'static str, body: &Value) -> Reply {
        let limit = body["limit"].as_u64().unwrap_or(10);
        if limit > SEARCH_LIMIT {
            return Reply::error(400, "VALIDATION_ERROR", format!("limit must be at most {SEARCH_LIMIT}"));
        }
        let after = match body["after"].as_str().unwrap_or("") {
            "" => 0,
            text => match text.parse::<usize>() {
                Ok(offset) => offset,
                Err(_) => return Reply::error(400, "VALIDATION_ERROR", format!("Invalid paging cursor {text:?}")),
            },
        };
        let groups = body["filterGroups"].as_array().cloned().unwrap_or_default();
        for filter in groups.iter().flat_map(|group| group["filters"].as_array().cloned().unwrap_or_default()) {
            let operator = filter["operator"].as_str().unwrap_or_default();
            if !matches!(operator, "EQ" | "NEQ" | "HAS_PROPERTY" | "NOT_HAS_PROPERTY" | "IN") {
                return Reply::error(
                    400,
                    "VALIDATION_ERROR",
                    format!("The mock does not implement operator {operator}"),
                );
            }
            let name = filter["propertyName"].as_str().unwrap_or_default();
            if !self.lenient && self.property_def(object_type, name).is_none() {
                return Reply::error(400, "VALIDATION_ERROR", format!("Property \"{name}\" does not exist"));
            }
        }
        let matches_filter = |stored: &Stored, filter: &Value| {
            let name = filter["propertyName"].as_str().unwrap_or_default();
            let found = stored.properties.get(name).filter(|value| !value.is_empty());
            let wanted = filter["value"].as_str().unwrap_or_default();
            match filter["operator"].as_str().unwrap_or_default() {
                "EQ" => found.is_some_and(|value| value.eq_ignore_ascii_case(wanted)),
                "NEQ" => !found.is_some_and(|value| value.eq_ignore_ascii_case(wanted)),
                "HAS_PROPERTY" => found.is_some(),
                "NOT_HAS_PROPERTY" => found.is_none(),
                "IN" => found.is_some_and(|value| {
                    filter["values"].as_array().is_some_and(|values| {
                        values.iter().filter_map(Value::as_str).any(|v| v.eq_ignore_ascii_case(value))
                    })
                }),
                _ => false,
            }
        };
        let wanted: Vec<String> = body["properties"]
            .as_array()
            .map(|p| p.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let hits: Vec<(u64, &Stored)> = self
            .objects
            .get(object_type)
            .map(|objects| {
                objects
                    .iter()
                    .filter(|(_, stored)| {
                        groups.is_empty()
                            || groups.iter().any(|group| {
                                group["filters"]
                                    .as_array()
                                    .is_some_and(|filters| filters.iter().all(|filter| matches_filter(stored, filter)))
                            })
                    })
                    .map(|(id, stored)| (*id, stored))
                    .collect()
            })
            .unwrap_or_default();
        let total = hits.len();
        let page: Vec<Value> = hits
            .iter()
            .skip(after)
            .take(limit as usize)
            .map(|(id, stored)| self.object_json(object_type, *id, stored, &wanted))
            .collect();
        let mut answer = json!({ "total": total, "results": page });
        let next = after + limit as usize;
        if next < total {
            answer["paging"] = json!({ "next": { "after": next.to_string() } });
        }
        Reply::json(200, answer)
    }

    fn list(&self, object_type: &'static str, query: Option<&str>) -> Reply {
        let mut limit = 10usize;
        let mut after = 0usize;
        let mut wanted = Vec::new();
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "limit" => limit = value.parse().unwrap_or(10).min(100),
                "after" => after = value.parse().unwrap_or(0),
                "properties" => wanted.extend(value.split(',').map(str::to_owned)),
                _ => {}
            }
        }
        let objects = self.objects.get(object_type);
        let all: Vec<(u64, &Stored)> = objects.map(|o| o.iter().map(|(id, s)| (*id, s)).collect()).unwrap_or_default();
        let page: Vec<Value> = all
            .iter()
            .skip(after)
            .take(limit)
            .map(|(id, stored)| self.object_json(object_type, *id, stored, &wanted))
            .collect();
        let mut answer = json!({ "results": page });
        if after + limit < all.len() {
            let next = (after + limit).to_string();
            answer["paging"] = json!({ "next": { "after": next, "link": format!("?after={next}") } });
        }
        Reply::json(200, answer)
    }

    fn read(&self, object_type: &'static str, id: &str, query: Option<&str>) -> Reply {
        let mut id_property = "hs_object_id".to_owned();
        let mut wanted = Vec::new();
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "idProperty" => id_property = value.into_owned(),
                "properties" => wanted.extend(value.split(',').map(str::to_owned)),
                _ => {}
            }
        }
        let mut found_id = self.find_by(object_type, &id_property, id);
        if found_id.is_none() && id_property == "hs_object_id" {
            // HubSpot answers for a merged id with the contact it went into.
            found_id = id.parse::<u64>().ok().and_then(|id| self.resolve(object_type, id));
        }
        let found = found_id.and_then(|found| self.objects.get(object_type)?.get(&found).map(|stored| (found, stored)));
        match found {
            Some((found, stored)) => Reply::json(200, self.object_json(object_type, found, stored, &wanted)),
            None => {
                Reply::error(404, "OBJECT_NOT_FOUND", format!("Object not found.  objectId are usually numeric: {id}"))
            }
        }
    }

    fn associate(&mut self, from: &'static str, to: &'static str, body: &Value) -> Reply {
        let started = time_text(now());
        let mut results = Vec::new();
        let mut missing_from = Vec::new();
        let mut missing_to = Vec::new();
        let exists = |store: &Store, object_type: &str, id: &str| -> Option<u64> {
            let id = id.parse::<u64>().ok()?;
            store.objects.get(object_type)?.contains_key(&id).then_some(id)
        };
        for input in body["inputs"].as_array().into_iter().flatten() {
            let from_id = input["from"]["id"].as_str().unwrap_or_default();
            let to_id = input["to"]["id"].as_str().unwrap_or_default();
            let (Some(from_key), Some(to_key)) = (exists(self, from, from_id), exists(self, to, to_id)) else {
                if exists(self, from, from_id).is_none() {
                    missing_from.push(from_id.to_owned());
                }
                if exists(self, to, to_id).is_none() {
                    missing_to.push(to_id.to_owned());
                }
                continue;
            };
            self.associations.insert((from, from_key, to, to_key));
            let type_id = if (from, to) == (NOTES, CONTACTS) { 202 } else { 1 };
            results.push(json!({
                "from": { "id": from_id },
                "to": { "id": to_id },
                "associationSpec": { "associationCategory": "HUBSPOT_DEFINED", "associationTypeId": type_id },
            }));
        }
        let mut errors = Vec::new();
        for (side, object_type, ids) in [("fromObjectId", from, missing_from), ("toObjectId", to, missing_to)] {
            if ids.is_empty() {
                continue;
            }
            errors.push(json!({
                "status": "error",
                "category": "VALIDATION_ERROR",
                "message": format!("No {object_type} with ids {} exist", ids.join(", ")),
                "context": { side: ids },
                "errors": [],
                "links": {},
            }));
        }
        let mut answer = json!({
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": time_text(now()),
        });
        if !errors.is_empty() {
            answer["numErrors"] = json!(errors.len());
            answer["errors"] = Value::Array(errors);
        }
        Reply::json(200, answer)
    }

    fn create_property(&mut self, object_type: &'static str, body: &Value) -> Reply {
        let name = body["name"].as_str().unwrap_or_default().to_owned();
        let valid_name = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_name {
            return Reply::error(400, "VALIDATION_ERROR", format!("Invalid property name {name:?}"));
        }
        if self.property_def(object_type, &name).is_some() {
            return Reply::error(409, "OBJECT_ALREADY_EXISTS", format!("Property named '{name}' already exists."));
        }
        let group = body["groupName"].as_str().unwrap_or_default();
        if !self.groups.get(object_type).is_some_and(|groups| groups.contains_key(group)) {
            return Reply::error(400, "VALIDATION_ERROR", format!("Property group '{group}' does not exist"));
        }
        let options: Vec<Value> = body["options"].as_array().cloned().unwrap_or_default();
        if body["type"] == "enumeration" && options.is_empty() {
            return Reply::error(400, "VALIDATION_ERROR", "Enumeration properties need options");
        }
        let at = time_text(now());
        let property = json!({
            "name": name,
            "label": body["label"],
            "type": body["type"],
            "fieldType": body["fieldType"],
            "groupName": group,
            "description": body["description"].as_str().unwrap_or(""),
            "options": options,
            "displayOrder": body["displayOrder"].as_i64().unwrap_or(-1),
            "hasUniqueValue": body["hasUniqueValue"].as_bool().unwrap_or(false),
            "hidden": body["hidden"].as_bool().unwrap_or(false),
            "formField": body["formField"].as_bool().unwrap_or(false),
            "calculated": false,
            "externalOptions": false,
            "archived": false,
            "createdAt": at,
            "updatedAt": at,
            "modificationMetadata": { "archivable": true, "readOnlyDefinition": false, "readOnlyValue": false },
        });
        self.properties.entry(object_type).or_default().insert(name, property.clone());
        Reply::json(201, property)
    }

    fn create_group(&mut self, object_type: &'static str, body: &Value) -> Reply {
        let name = body["name"].as_str().unwrap_or_default().to_owned();
        if name.is_empty() {
            return Reply::error(400, "VALIDATION_ERROR", "A property group needs a name");
        }
        let groups = self.groups.entry(object_type).or_default();
        if groups.contains_key(&name) {
            return Reply::error(409, "OBJECT_ALREADY_EXISTS", format!("Property group '{name}' already exists."));
        }
        let label = body["label"].as_str().unwrap_or(&name).to_owned();
        let group = group_json(&name, &label, body["displayOrder"].as_i64().unwrap_or(-1));
        groups.insert(name, group.clone());
        Reply::json(201, group)
    }
}

fn with_type(object_type: Option<&'static str>, then: impl FnOnce(&'static str) -> Reply) -> Reply {
    match object_type {
        Some(object_type) => then(object_type),
        None => Reply::error(400, "VALIDATION_ERROR", "Unable to infer object type"),
    }
}

/// HubSpot's own check is RFC 2822 plus a known TLD; this is close enough
/// for tests: one `@`, no spaces or quotes, a dotted domain with a
/// letters-only TLD.
fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let tld = domain.rsplit('.').next().unwrap_or_default();
    !local.is_empty()
        && !email.chars().any(|c| c.is_whitespace() || c == '"' || c == ',')
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && tld.len() >= 2
        && tld.chars().all(|c| c.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_check() {
        for (email, ok) in [
            ("a@example.com", true),
            ("first.last+tag@sub.example.co", true),
            ("not-an-email", false),
            ("a@b", false),
            ("a b@example.com", false),
            ("a@example.c0m", false),
            ("@example.com", false),
        ] {
            assert_eq!(valid_email(email), ok, "{email}");
        }
    }
}
