//! The sink against a stateful mock Dataverse environment that answers as the
//! Web API documents: upsert by alternate key or primary key with PATCH,
//! `If-Match: *` updates, `{"error": {"code", "message"}}` bodies, 429 with
//! `Retry-After`, Entra ID's token endpoint.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde_json::{Map, Value, json};
use tributary_sdk::{Contribution, Intent, PlatformRollup, Signals};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::any};

use super::*;

const SECRET: &str = "s3cret-entra-value";
const TENANT: &str = "contoso.onmicrosoft.com";
const API_PREFIX: &str = "/api/data/v9.2/";

#[derive(Default)]
struct Env {
    tokens_issued: u32,
    valid_token: Option<String>,
    /// Every token is refused (the application user was disabled).
    refuse_all: bool,
    /// The next requests get a 429 with `Retry-After: 1`.
    throttle_next: u32,
    burst_remaining: Option<u32>,
    contacts: Vec<Map<String, Value>>,
    notes: HashMap<String, Map<String, Value>>,
    note_creates: u32,
    /// Logical name → `@odata.type` of the contact's custom columns.
    attributes: HashMap<String, String>,
    keys: Vec<String>,
    definition_posts: u32,
    merges: u32,
    next_id: u128,
}

impl Env {
    fn id(&mut self) -> String {
        self.next_id += 1;
        Uuid::from_u128(0xc0de_0000_0000_0000_0000_0000_0000_0000 + self.next_id).hyphenated().to_string()
    }

    fn contact(&mut self, id: &str) -> Option<&mut Map<String, Value>> {
        self.contacts.iter_mut().find(|row| row["contactid"] == id)
    }
}

#[derive(Clone)]
struct FakeDataverse(Arc<Mutex<Env>>);

fn error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({ "error": { "code": code, "message": message } }))
}

/// The string literals of an OData `$filter` (doubled quotes undone).
fn literals(filter: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = filter.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut literal = String::new();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    literal.push('\'');
                } else {
                    break;
                }
            } else {
                literal.push(c);
            }
        }
        out.push(literal);
    }
    out
}

/// Standard contact columns the fake knows besides Tributary's.
const STANDARD_COLUMNS: &[&str] = &[
    "contactid",
    "statecode",
    "statuscode",
    "merged",
    "_masterid_value",
    "emailaddress1",
    "lastname",
    "jobtitle",
    "telephone1",
    "customertypecode",
    "_parentcustomerid_value",
    "createdon",
];

/// `name(inner)` → `inner`.
fn key_of<'a>(segment: &'a str, name: &str) -> Option<&'a str> {
    segment.strip_prefix(name)?.strip_prefix('(')?.strip_suffix(')')
}

impl FakeDataverse {
    fn answer(&self, env: &mut Env, request: &Request) -> ResponseTemplate {
        let path = request.url.path().to_owned();
        let method = request.method.as_str().to_owned();
        if path == format!("/{TENANT}/oauth2/v2.0/token") {
            let body = String::from_utf8_lossy(&request.body).into_owned();
            let pairs: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
            let scope_ok = pairs.get("scope").is_some_and(|scope| scope.ends_with("/.default"));
            if pairs.get("client_secret").map(String::as_str) != Some(SECRET)
                || pairs.get("client_id").map(String::as_str) != Some("cid-1")
                || pairs.get("grant_type").map(String::as_str) != Some("client_credentials")
                || !scope_ok
            {
                return ResponseTemplate::new(401).set_body_json(json!({
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided.",
                }));
            }
            env.tokens_issued += 1;
            let token = format!("eyJ0-tok-{}", env.tokens_issued);
            env.valid_token = Some(token.clone());
            return ResponseTemplate::new(200).set_body_json(json!({
                "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token,
            }));
        }
        let bearer = request.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let valid = env.valid_token.as_ref().is_some_and(|token| bearer == format!("Bearer {token}"));
        if !valid || env.refuse_all {
            // A server that echoes what it got must not leak it further.
            return error(401, "0x80072560", &format!("The user is not a member of the organization. ({SECRET})"));
        }
        if request.headers.get("odata-version").and_then(|v| v.to_str().ok()) != Some("4.0") {
            return error(400, "0x0", "OData-Version 4.0 expected");
        }
        if env.throttle_next > 0 {
            env.throttle_next -= 1;
            return error(
                429,
                "0x80072322",
                "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
            )
            .insert_header("Retry-After", "1");
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let query = |name: &str| request.url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
        let Some(route) = path.strip_prefix(API_PREFIX) else { return error(404, "0x0", "no such resource") };
        let update_only = header("if-match").as_deref() == Some("*");
        let represent = header("prefer").is_some_and(|prefer| prefer.contains("return=representation"));
        match (method.as_str(), route) {
            ("GET", "WhoAmI") => ResponseTemplate::new(200).set_body_json(json!({ "UserId": env.id() })),
            ("GET", "contacts") => {
                let filter = query("$filter").unwrap_or_default();
                let wanted = literals(&filter);
                let column = filter.split(' ').next().unwrap_or_default().to_owned();
                let active_only = filter.ends_with(" and statecode eq 0");
                let rows: Vec<Value> = env
                    .contacts
                    .iter()
                    .filter(|row| !active_only || row.get("statecode").and_then(Value::as_i64).unwrap_or(0) == 0)
                    .filter(|row| {
                        row.get(&column)
                            .and_then(Value::as_str)
                            .is_some_and(|value| wanted.iter().any(|w| w.eq_ignore_ascii_case(value)))
                    })
                    .map(|row| Value::Object(row.clone()))
                    .collect();
                ResponseTemplate::new(200).set_body_json(json!({ "value": rows }))
            }
            ("GET", route) if route.starts_with("contacts(") => {
                let id = key_of(route, "contacts").unwrap_or_default().to_owned();
                let formatted = header("prefer").is_some_and(|prefer| {
                    prefer.contains("odata.include-annotations=\"OData.Community.Display.V1.FormattedValue\"")
                });
                let known: Vec<String> = env.attributes.keys().cloned().collect();
                let Some(row) = env.contact(&id) else {
                    return error(404, "0x80040217", &format!("contact With Id = {id} Does Not Exist"));
                };
                let columns: Vec<String> = match query("$select") {
                    Some(select) => select.split(',').map(str::to_owned).collect(),
                    None => row.keys().filter(|key| !key.contains('@')).cloned().collect(),
                };
                let mut answer = Map::new();
                for column in columns {
                    let is_known = row.contains_key(&column)
                        || STANDARD_COLUMNS.contains(&column.as_str())
                        || known.contains(&column);
                    if !is_known {
                        return error(
                            400,
                            "0x80060888",
                            &format!(
                                "Could not find a property named '{column}' on type 'Microsoft.Dynamics.CRM.contact'."
                            ),
                        );
                    }
                    answer.insert(column.clone(), row.get(&column).cloned().unwrap_or(Value::Null));
                    let annotation = format!("{column}@OData.Community.Display.V1.FormattedValue");
                    if let Some(text) = row.get(&annotation).filter(|_| formatted) {
                        answer.insert(annotation, text.clone());
                    }
                }
                ResponseTemplate::new(200).set_body_json(Value::Object(answer))
            }
            ("POST", "Merge") => {
                let reference = |name: &str| {
                    let entity = &body[name];
                    (entity["@odata.type"] == "Microsoft.Dynamics.CRM.contact")
                        .then(|| entity["contactid"].as_str().map(str::to_owned))
                        .flatten()
                };
                let (Some(target), Some(subordinate)) = (reference("Target"), reference("Subordinate")) else {
                    return error(400, "0x80040203", "Target and Subordinate must be typed contact references");
                };
                if body["UpdateContent"]["@odata.type"] != "Microsoft.Dynamics.CRM.contact"
                    || !body["PerformParentingChecks"].is_boolean()
                {
                    return error(400, "0x80040203", "UpdateContent and PerformParentingChecks are required");
                }
                for id in [&target, &subordinate] {
                    match env.contact(id) {
                        None => return error(404, "0x80040217", &format!("contact With Id = {id} Does Not Exist")),
                        Some(row) if row.get("statecode").and_then(Value::as_i64).unwrap_or(0) != 0 => {
                            return error(400, "0x8004d21b", "An inactive record cannot be merged.");
                        }
                        Some(_) => {}
                    }
                }
                // The subordinate's notes go to the target; the subordinate is deactivated.
                let from = json!(format!("/contacts({subordinate})"));
                for note in env.notes.values_mut() {
                    if note.get("objectid_contact@odata.bind") == Some(&from) {
                        note.insert("objectid_contact@odata.bind".into(), json!(format!("/contacts({target})")));
                    }
                }
                let Some(row) = env.contact(&subordinate) else { return error(404, "0x0", "gone") };
                row.insert("statecode".into(), json!(1));
                row.insert("statuscode".into(), json!(2));
                row.insert("merged".into(), json!(true));
                row.insert("_masterid_value".into(), json!(target));
                env.merges += 1;
                ResponseTemplate::new(204)
            }
            ("PATCH", route) if route.starts_with("contacts(") => {
                let inner = key_of(route, "contacts").unwrap_or_default().to_owned();
                let (status, id) = if let Some((column, value)) = inner.split_once('=') {
                    let value = value.trim_matches('\'').to_owned();
                    let found = env.contacts.iter().find(|row| row.get(column) == Some(&json!(value)));
                    match found.and_then(|row| row["contactid"].as_str()).map(str::to_owned) {
                        Some(id) => (200, id),
                        None if update_only => return error(404, "0x80040217", "contact Does Not Exist"),
                        None => {
                            if body.get("lastname").is_none() {
                                return error(400, "0x80040200", "lastname: A value is required.");
                            }
                            let id = env.id();
                            let mut row = Map::new();
                            row.insert("contactid".into(), json!(id));
                            row.insert(column.to_owned(), json!(value));
                            env.contacts.push(row);
                            (201, id)
                        }
                    }
                } else {
                    match env.contact(&inner) {
                        Some(_) => (200, inner.clone()),
                        None => {
                            return error(404, "0x80040217", &format!("contact With Id = {inner} Does Not Exist"));
                        }
                    }
                };
                let row = env.contact(&id).expect("the row exists");
                if let Value::Object(fields) = body {
                    row.extend(fields);
                }
                if represent {
                    ResponseTemplate::new(status).set_body_json(Value::Object(row.clone()))
                } else {
                    ResponseTemplate::new(204)
                }
            }
            ("PATCH", route) if route.starts_with("annotations(") => {
                let id = key_of(route, "annotations").unwrap_or_default().to_owned();
                let bind = body["objectid_contact@odata.bind"].as_str().unwrap_or_default();
                let contact = key_of(bind, "/contacts").unwrap_or_default().to_owned();
                if env.contact(&contact).is_none() {
                    return error(404, "0x80040217", &format!("contact With Id = {contact} Does Not Exist"));
                }
                if !env.notes.contains_key(&id) {
                    env.note_creates += 1;
                }
                let Value::Object(fields) = body else { return error(400, "0x0", "a JSON object expected") };
                env.notes.insert(id, fields);
                ResponseTemplate::new(204)
            }
            ("DELETE", route) if route.starts_with("annotations(") => {
                let id = key_of(route, "annotations").unwrap_or_default();
                match env.notes.remove(id) {
                    Some(_) => ResponseTemplate::new(204),
                    None => error(404, "0x80040217", &format!("annotation With Id = {id} Does Not Exist")),
                }
            }
            ("GET", "EntityDefinitions(LogicalName='contact')/Attributes") => {
                let wanted = literals(&query("$filter").unwrap_or_default());
                let rows: Vec<Value> = wanted
                    .iter()
                    .filter(|name| env.attributes.contains_key(*name))
                    .map(|name| json!({ "LogicalName": name, "MetadataId": "00000000-0000-0000-0000-000000000001" }))
                    .collect();
                ResponseTemplate::new(200).set_body_json(json!({ "value": rows }))
            }
            ("POST", "EntityDefinitions(LogicalName='contact')/Attributes") => {
                env.definition_posts += 1;
                let name = body["SchemaName"].as_str().unwrap_or_default().to_lowercase();
                if env.attributes.contains_key(&name) {
                    return error(
                        400,
                        "0x80044363",
                        &format!("An attribute with the specified name {name} already exists"),
                    );
                }
                let kind = body["@odata.type"].as_str().unwrap_or_default().to_owned();
                env.attributes.insert(name, kind);
                ResponseTemplate::new(204).insert_header("OData-EntityId", "https://org/api/data/v9.2/x")
            }
            ("GET", "EntityDefinitions(LogicalName='contact')/Keys") => {
                let rows: Vec<Value> = env
                    .keys
                    .iter()
                    .map(|name| json!({ "LogicalName": name, "EntityKeyIndexStatus": "Active" }))
                    .collect();
                ResponseTemplate::new(200).set_body_json(json!({ "value": rows }))
            }
            ("POST", "EntityDefinitions(LogicalName='contact')/Keys") => {
                env.definition_posts += 1;
                let attributes = body["KeyAttributes"].as_array().cloned().unwrap_or_default();
                if attributes.iter().any(|a| !env.attributes.contains_key(a.as_str().unwrap_or_default())) {
                    return error(400, "0x0", "a key attribute does not exist");
                }
                env.keys.push(body["SchemaName"].as_str().unwrap_or_default().to_lowercase());
                ResponseTemplate::new(204)
            }
            _ => error(404, "0x80060888", &format!("Resource not found for the segment '{route}'.")),
        }
    }
}

impl Respond for FakeDataverse {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut env = self.0.lock().unwrap();
        let burst = env.burst_remaining.unwrap_or(5999).to_string();
        self.answer(&mut env, request)
            .insert_header("x-ms-ratelimit-burst-remaining-xrm-requests", burst.as_str())
            .insert_header("x-ms-ratelimit-time-remaining-xrm-requests", "1199000.00")
    }
}

struct Fixture {
    env: Arc<Mutex<Env>>,
    crm: DynamicsCrm,
    server: MockServer,
    dir: tempfile::TempDir,
}

fn options() -> HttpOptions {
    HttpOptions {
        max_retries: 2,
        backoff_base: Duration::from_millis(10),
        max_inline_wait: Duration::from_secs(5),
        ..HttpOptions::default()
    }
}

fn settings(server: &MockServer, secret_file: &std::path::Path) -> Value {
    json!({
        "environment_url": server.uri(),
        "tenant_id": TENANT,
        "client_id": "cid-1",
        "client_secret": { "file": secret_file },
        "authority_url": server.uri(),
    })
}

async fn fixture() -> Fixture {
    let server = MockServer::start().await;
    let env = Arc::new(Mutex::new(Env::default()));
    Mock::given(any()).respond_with(FakeDataverse(env.clone())).mount(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("dynamics");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let config: DynamicsConfig = serde_json::from_value(settings(&server, &secret)).unwrap();
    let crm = DynamicsCrm::new(config, options()).unwrap().with_token_store(Arc::new(MemoryTokenStore::default()));
    Fixture { env, crm, server, dir }
}

/// The values of outcomes that must all be `Done`.
fn done<T: std::fmt::Debug>(outcomes: Vec<RecordOutcome<T>>) -> Vec<T> {
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            RecordOutcome::Done(value) => value,
            RecordOutcome::Rejected(message) => panic!("rejected: {message}"),
        })
        .collect()
}

fn contact(identity: &str, email: Option<&str>, handle: &str, name: Option<&str>) -> ContactUpsert {
    ContactUpsert {
        identity: identity.into(),
        email: email.map(str::to_owned),
        platform: "discourse".into(),
        handle: Some(handle.into()),
        display_name: name.map(str::to_owned),
        profile_url: Some(format!("https://community.example.com/u/{handle}")),
    }
}

fn activity(external_id: &str, contact_id: &str) -> ActivityUpsert {
    let contribution = Contribution {
        external_id: external_id.into(),
        body: "Is <b>PDF</b> export there?\nI looked & found nothing.".into(),
        signals: Some(Signals { sentiment: 0.25, intent: Intent::Question, sentiment_skipped: None }),
        ..Contribution::sample()
    };
    ActivityUpsert { key: contribution.activity_key(), contact_id: contact_id.into(), contribution, existing_id: None }
}

fn rollup(contact_id: &str) -> Rollup {
    Rollup {
        contact_id: contact_id.into(),
        last_contribution_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        last_platform: "discourse".into(),
        contribution_count: 3,
        platforms: vec!["discourse".into(), "github".into()],
        sentiment_avg: 0.123_456,
        questions: 2,
        complaints: 0,
        ideas: 1,
        praise: 0,
        ..Default::default()
    }
}

#[tokio::test]
async fn first_sync_then_replay_writes_nothing_twice() {
    let f = fixture().await;
    let known = "0f0e0d0c-0000-4000-8000-000000000001";
    f.env.lock().unwrap().contacts.push(
        json!({ "contactid": known, "emailaddress1": "Maya@Example.com", "lastname": "Chen" })
            .as_object()
            .cloned()
            .unwrap(),
    );
    f.crm.check().await.unwrap();
    let contacts = [
        contact("discourse:7", None, "mayac", Some("Maya C")),
        contact("discourse:9", Some("new@example.com"), "newbie", None),
        contact("discourse:11", Some("maya@example.com"), "maya", Some("Maya")),
    ];
    let ids = done(f.crm.upsert_contacts(&contacts).await.unwrap());
    assert_eq!(ids[2], known, "matched by e-mail, case-insensitively");
    let activities = [activity("42", &ids[0]), activity("43", &ids[1])];
    let notes = done(f.crm.upsert_activities(&activities).await.unwrap());
    for (note, activity) in notes.iter().zip(&activities) {
        assert_eq!(*note, annotation_id(&activity.key).hyphenated().to_string());
    }
    done(f.crm.update_rollups(&[rollup(&ids[0])]).await.unwrap());
    {
        let env = f.env.lock().unwrap();
        assert_eq!(env.contacts.len(), 3);
        let row = |id: &str| env.contacts.iter().find(|row| row["contactid"] == id).unwrap().clone();
        let owned = row(&ids[0]);
        assert_eq!(owned["lastname"], "Maya C");
        assert_eq!(owned["tributary_identity"], "discourse:7");
        assert_eq!(owned["tributary_identityhash"], identity_hash("discourse:7"));
        assert_eq!(owned["tributary_discoursehandle"], "mayac");
        assert_eq!(owned["tributary_contributioncount"], 3);
        assert_eq!(owned["tributary_sentiment"], 0.123);
        assert_eq!(owned["tributary_platforms"], "discourse;github");
        let created = row(&ids[1]);
        assert_eq!(created["tributary_identity"], "email:new@example.com");
        assert_eq!(
            (created["emailaddress1"].as_str(), created["lastname"].as_str()),
            (Some("new@example.com"), Some("newbie"))
        );
        let matched = row(known);
        assert_eq!(matched["lastname"], "Chen", "a known contact's name belongs to the CRM");
        assert_eq!(matched["tributary_identity"], "email:maya@example.com");
        assert_eq!(env.notes.len(), 2);
        let note = &env.notes[&notes[0]];
        assert_eq!(note["objectid_contact@odata.bind"], format!("/contacts({})", ids[0]));
        assert_eq!(note["subject"], "Export to PDF?");
        let text = note["notetext"].as_str().unwrap();
        assert!(text.starts_with("Is &lt;b&gt;PDF&lt;/b&gt; export there?<br>I looked &amp; found nothing."), "{text}");
        assert!(text.ends_with("discourse · post · intent: question · sentiment: 0.25"), "{text}");
    }
    assert_eq!(
        f.crm.find_contact(&ContactLookup::Email("NEW@example.com".into())).await.unwrap(),
        Some(ids[1].clone())
    );
    let by_handle = ContactLookup::Handle { platform: "discourse".into(), handle: "mayac".into() };
    assert_eq!(f.crm.find_contact(&by_handle).await.unwrap(), Some(ids[0].clone()));
    assert_eq!(f.crm.find_contact(&ContactLookup::Email("nobody@example.com".into())).await.unwrap(), None);

    // The replay: same ids, same rows, nothing new.
    assert_eq!(done(f.crm.upsert_contacts(&contacts).await.unwrap()), ids);
    assert_eq!(done(f.crm.upsert_activities(&activities).await.unwrap()), notes);
    done(f.crm.update_rollups(&[rollup(&ids[0])]).await.unwrap());
    let env = f.env.lock().unwrap();
    assert_eq!((env.contacts.len(), env.notes.len(), env.note_creates), (3, 2, 2));
    assert_eq!(env.tokens_issued, 1, "one token for the whole sync");
}

#[tokio::test]
async fn one_refused_record_is_rejected_with_dataverse_message_and_the_rest_lands() {
    let f = fixture().await;
    let ids = done(f.crm.upsert_contacts(&[contact("discourse:7", None, "mayac", None)]).await.unwrap());
    let gone = "0f0e0d0c-0000-4000-8000-0000000000ff";
    let outcomes = f
        .crm
        .upsert_activities(&[
            activity("1", &ids[0]),
            activity("2", gone),
            activity("3", "003xx"),
            activity("4", &ids[0]),
        ])
        .await
        .unwrap();
    assert!(matches!(outcomes[0], RecordOutcome::Done(_)) && matches!(outcomes[3], RecordOutcome::Done(_)));
    assert_eq!(outcomes[1], RecordOutcome::Rejected(format!("contact With Id = {gone} Does Not Exist")));
    assert_eq!(outcomes[2], RecordOutcome::Rejected("`003xx` is not a Dataverse contact id".into()));

    let rollups = f.crm.update_rollups(&[rollup(gone), rollup(&ids[0])]).await.unwrap();
    assert_eq!(
        rollups,
        [RecordOutcome::Rejected(format!("contact With Id = {gone} Does Not Exist")), RecordOutcome::Done(())],
        "If-Match: * never creates a contact"
    );
    assert_eq!(f.env.lock().unwrap().contacts.len(), 1);

    let RecordOutcome::Done(note) = outcomes[0].clone() else { unreachable!() };
    let archived = f.crm.archive_activities(&[note.clone(), note, "nope".into()]).await.unwrap();
    assert_eq!(
        archived,
        [
            RecordOutcome::Done(()),
            RecordOutcome::Done(()),
            RecordOutcome::Rejected("`nope` is not a Dataverse note id".into())
        ],
        "a note already gone is done"
    );
    assert_eq!(f.env.lock().unwrap().notes.len(), 1);
}

#[tokio::test]
async fn a_429_waits_for_retry_after_and_a_spent_burst_holds() {
    let f = fixture().await;
    f.crm.check().await.unwrap();
    f.env.lock().unwrap().throttle_next = 1;
    let started = Instant::now();
    let ids = done(f.crm.upsert_contacts(&[contact("discourse:7", None, "mayac", None)]).await.unwrap());
    assert!(started.elapsed() >= Duration::from_millis(900), "Retry-After honoured: {:?}", started.elapsed());
    assert_eq!((ids.len(), f.env.lock().unwrap().contacts.len()), (1, 1));

    assert!(f.crm.http.held_for().is_none());
    f.env.lock().unwrap().burst_remaining = Some(0);
    f.crm.check().await.unwrap();
    assert!(f.crm.http.held_for().is_some(), "a spent burst budget holds the next request");

    // Throttled past the retries: the error says when to come back.
    let f = fixture().await;
    f.env.lock().unwrap().throttle_next = 10;
    let error = f.crm.check().await.unwrap_err();
    assert_eq!(error.retry_after(), Some(Duration::from_secs(1)), "{error}");
}

#[tokio::test]
async fn an_expired_token_is_renewed_once_and_retried() {
    let f = fixture().await;
    f.crm.check().await.unwrap();
    f.env.lock().unwrap().valid_token = Some("expired-elsewhere".into());
    let ids = done(f.crm.upsert_contacts(&[contact("discourse:7", None, "mayac", None)]).await.unwrap());
    assert_eq!(ids.len(), 1);
    assert_eq!(f.env.lock().unwrap().tokens_issued, 2);

    f.env.lock().unwrap().refuse_all = true;
    let error = f.crm.check().await.unwrap_err();
    assert!(matches!(error, CrmError::Auth(_)), "{error:?}");
    assert_eq!(f.env.lock().unwrap().tokens_issued, 3, "one renewal, no loop");
    let text = error.to_string();
    assert!(!text.contains(SECRET) && text.contains("[redacted]"), "{text}");
}

#[tokio::test]
async fn secrets_and_tokens_are_never_shown() {
    let f = fixture().await;
    f.crm.check().await.unwrap();
    let debug = format!("{:?}", f.crm);
    for hidden in [SECRET, "eyJ0-tok"] {
        assert!(!debug.contains(hidden), "{hidden} in {debug}");
    }
    assert!(debug.contains("cid-1") && debug.contains("[redacted]"), "{debug}");

    let wrong = f.dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    let config: DynamicsConfig = serde_json::from_value(settings(&f.server, &wrong)).unwrap();
    let crm = DynamicsCrm::new(config, options()).unwrap();
    let error = crm.check().await.unwrap_err();
    let text = format!("{error} {error:?}");
    assert!(matches!(error, CrmError::Auth(_)), "{error:?}");
    assert!(text.contains("invalid_client"), "{text}");
    assert!(!text.contains("not-the-secret") && !text.contains(SECRET), "{text}");
}

#[tokio::test]
async fn setup_creates_the_columns_and_key_once() {
    let f = fixture().await;
    let platforms = ["discourse".to_owned(), "Stack Exchange".to_owned()];
    let first = f.crm.setup(&platforms).await.unwrap();
    assert!(first.existing.is_empty(), "{first:?}");
    for name in [
        "contact.tributary_identity",
        "contact.tributary_identityhash",
        "contact.tributary_stackexchangehandle",
        "contact.tributary_discourseprofile",
        "contact.tributary_sentiment",
        "contact key tributary_identitykey",
    ] {
        assert!(first.created.iter().any(|created| created == name), "{name} not in {first:?}");
    }
    let posts = {
        let env = f.env.lock().unwrap();
        assert_eq!(env.attributes["tributary_sentiment"], "Microsoft.Dynamics.CRM.DecimalAttributeMetadata");
        assert_eq!(env.attributes["tributary_lastcontribution"], "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata");
        assert_eq!(env.attributes["tributary_praise"], "Microsoft.Dynamics.CRM.IntegerAttributeMetadata");
        for (column, kind) in [
            ("tributary_lasturl", "StringAttributeMetadata"),
            ("tributary_lastexcerpt", "StringAttributeMetadata"),
            ("tributary_contributions90d", "IntegerAttributeMetadata"),
            ("tributary_sentiment90d", "DecimalAttributeMetadata"),
            ("tributary_needsattention", "BooleanAttributeMetadata"),
            ("tributary_attentionreason", "StringAttributeMetadata"),
            ("tributary_discoursefirstseen", "DateTimeAttributeMetadata"),
            ("tributary_stackexchangelastseen", "DateTimeAttributeMetadata"),
            ("tributary_stackexchangecontributions", "IntegerAttributeMetadata"),
        ] {
            assert_eq!(
                env.attributes.get(column).map(String::as_str),
                Some(&*format!("Microsoft.Dynamics.CRM.{kind}"))
            );
        }
        assert_eq!(env.keys, ["tributary_identitykey"]);
        env.definition_posts
    };
    assert_eq!(posts as usize, first.created.len());

    let second = f.crm.setup(&platforms).await.unwrap();
    assert!(second.created.is_empty(), "{second:?}");
    assert_eq!(second.existing, first.created);
    assert_eq!(f.env.lock().unwrap().definition_posts, posts, "nothing posted twice");
}

#[test]
fn settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let base = json!({
        "environment_url": "https://org.crm.dynamics.com",
        "tenant_id": "0b1c2d3e-0000-4000-8000-000000000000",
        "client_id": "cid-1",
        "client_secret": { "file": secret },
    });
    let check = |patch: Value, expected: Result<&str, &str>| {
        let mut settings = base.clone();
        settings.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        let built = serde_json::from_value::<DynamicsConfig>(settings)
            .map_err(|e| e.to_string())
            .and_then(|config| DynamicsCrm::new(config, HttpOptions::default()).map_err(|e| e.to_string()));
        match (built, expected) {
            (Ok(crm), Ok(prefix)) => assert_eq!(crm.identity_column(), format!("{prefix}_identity")),
            (Err(error), Err(fragment)) => {
                assert!(error.contains(fragment), "{error} lacks {fragment}");
                assert!(!error.contains(SECRET), "{error}");
            }
            (built, expected) => panic!("{patch}: {:?} instead of {expected:?}", built.map(|_| ())),
        }
    };
    check(json!({}), Ok("tributary"));
    check(json!({ "prefix": "acme", "solution": "Tributary_Columns" }), Ok("acme"));
    check(json!({ "environment_url": "https://org.crm.dynamics.com/" }), Ok("tributary"));
    check(json!({ "environment_url": "https://org.crm.dynamics.com/api/data" }), Err("`environment_url`"));
    check(json!({ "environment_url": "ftp://org" }), Err("`environment_url`"));
    check(json!({ "authority_url": "mailto:x@y" }), Err("`authority_url`"));
    check(json!({ "tenant_id": "a/b" }), Err("`tenant_id`"));
    check(json!({ "client_id": " " }), Err("`client_id`"));
    check(json!({ "prefix": "Tri_bu" }), Err("`prefix`"));
    check(json!({ "prefix": "9lives" }), Err("`prefix`"));
    check(json!({ "solution": "a b" }), Err("`solution`"));
    check(json!({ "client_secret": { "file": dir.path().join("missing") } }), Err("`client_secret`"));
    check(json!({ "api_key": "x" }), Err("unknown field `api_key`"));
}

#[test]
fn keys_literals_and_note_text() {
    assert_eq!(odata_literal("o'brien@x.io"), "'o''brien@x.io'");
    assert_eq!(literals("a eq 'o''b' or a eq 'c'"), ["o'b", "c"]);
    let key = Contribution::sample().activity_key();
    assert_eq!(annotation_id(&key), annotation_id(&key));
    assert_ne!(annotation_id(&key), annotation_id("other"));
    assert_eq!(annotation_id(&key).get_version_num(), 5);
    assert_eq!(identity_hash("GitHub:Octo"), identity_hash("github:octo"));
    assert_eq!(identity_hash("github:octo").len(), 32);
    assert_eq!(platform_slug("Stack Exchange"), "stackexchange");
    assert_eq!(platform_slug("--"), "unknown");
    assert_eq!(row_id("0F0E0D0C-0000-4000-8000-000000000001").as_deref(), Some("0f0e0d0c-0000-4000-8000-000000000001"));
    assert_eq!(row_id("contacts(1)"), None);
    let long = Contribution { body: "<".repeat(40_000), title: None, ..Contribution::sample() };
    let text = note_text(&long);
    assert!(text.chars().count() <= 100_000, "{}", text.chars().count());
    assert_eq!(subject(&long), "discourse post");
}

/// The Web API requests (not the token's) received since `from`: (method, path and query).
async fn api_calls(f: &Fixture, from: usize) -> Vec<(String, String)> {
    let requests = f.server.received_requests().await.unwrap();
    requests[from..]
        .iter()
        .filter(|r| r.url.path().starts_with(API_PREFIX))
        .map(|r| {
            let path = r.url.path().trim_start_matches(API_PREFIX).to_owned();
            (r.method.to_string(), path)
        })
        .collect()
}

async fn mark(f: &Fixture) -> usize {
    f.server.received_requests().await.unwrap().len()
}

#[tokio::test]
async fn merge_moves_the_notes_to_the_survivor_and_merging_again_is_done() {
    let f = fixture().await;
    let contacts = [
        contact("discourse:7", None, "mayac", Some("Maya")),
        contact("discourse:8", None, "maya2", Some("Maya C")),
        contact("discourse:9", None, "other", Some("Other")),
    ];
    let ids = done(f.crm.upsert_contacts(&contacts).await.unwrap());
    let (survivor, merged, other) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    let activities = [activity("1", &survivor), activity("2", &merged), activity("3", &merged)];
    let notes = done(f.crm.upsert_activities(&activities).await.unwrap());

    let from = mark(&f).await;
    f.crm.merge_contacts(&survivor, &merged).await.unwrap();
    let calls = api_calls(&f, from).await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0], ("GET".into(), format!("contacts({merged})")));
    assert_eq!(calls[1], ("POST".into(), "Merge".into()));
    let requests = f.server.received_requests().await.unwrap();
    let merge = requests[from..].iter().find(|r| r.url.path().ends_with("/Merge")).unwrap();
    let sent: Value = serde_json::from_slice(&merge.body).unwrap();
    assert_eq!(
        sent,
        json!({
            "Target": { "@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": survivor },
            "Subordinate": { "@odata.type": "Microsoft.Dynamics.CRM.contact", "contactid": merged },
            "UpdateContent": { "@odata.type": "Microsoft.Dynamics.CRM.contact" },
            "PerformParentingChecks": false,
        })
    );
    {
        let mut env = f.env.lock().unwrap();
        // Moved, not copied: the same three notes, all on the survivor.
        assert_eq!((env.notes.len(), env.note_creates, env.merges), (3, 3, 1));
        for note in &notes {
            assert_eq!(env.notes[note]["objectid_contact@odata.bind"], format!("/contacts({survivor})"));
        }
        let row = env.contact(&merged).unwrap();
        assert_eq!((&row["statecode"], &row["merged"]), (&json!(1), &json!(true)));
        assert_eq!(row["_masterid_value"], json!(survivor));
        assert_eq!(env.contact(&survivor).unwrap().get("statecode"), None, "the survivor stays as it was");
    }
    // The merged contact, inactive now, is no longer found by its handle.
    let lookup = ContactLookup::Handle { platform: "discourse".into(), handle: "maya2".into() };
    assert_eq!(f.crm.find_contact(&lookup).await.unwrap(), None);
    let lookup = ContactLookup::Handle { platform: "discourse".into(), handle: "mayac".into() };
    assert_eq!(f.crm.find_contact(&lookup).await.unwrap(), Some(survivor.clone()));

    // Merging again: the subordinate says it went into the survivor; no second Merge.
    let from = mark(&f).await;
    f.crm.merge_contacts(&survivor, &merged).await.unwrap();
    assert_eq!(api_calls(&f, from).await, [("GET".to_owned(), format!("contacts({merged})"))]);
    assert_eq!(f.env.lock().unwrap().merges, 1);

    // Merged into another contact: not this merge, an error that says so.
    let error = f.crm.merge_contacts(&other, &merged).await.unwrap_err();
    assert!(matches!(&error, CrmError::Unsupported(m) if m.contains(&format!("merged into {survivor}"))), "{error}");
    // A subordinate gone while the survivor is active: nothing left to move.
    let gone = "0f0e0d0c-0000-4000-8000-0000000000ff";
    f.crm.merge_contacts(&survivor, gone).await.unwrap();
    // A survivor that does not exist: Dataverse refuses, the error says why.
    let error = f.crm.merge_contacts(gone, &other).await.unwrap_err();
    assert!(matches!(&error, CrmError::Unsupported(m) if m.contains("does not exist")), "{error}");
    // A survivor that was itself merged away.
    let error = f.crm.merge_contacts(&merged, &other).await.unwrap_err();
    assert!(matches!(&error, CrmError::Unsupported(m) if m.contains("itself merged into")), "{error}");
    assert_eq!(f.env.lock().unwrap().merges, 1);
    assert_eq!(f.env.lock().unwrap().contact(&other).unwrap().get("merged"), None);

    f.crm.merge_contacts(&survivor, &survivor.to_uppercase()).await.unwrap();
    let error = f.crm.merge_contacts("003xx", &survivor).await.unwrap_err();
    assert!(matches!(error, CrmError::Unsupported(_)), "{error:?}");
}

#[tokio::test]
async fn delete_activities_deletes_the_notes_and_one_already_gone_is_done() {
    let f = fixture().await;
    let ids = done(f.crm.upsert_contacts(&[contact("discourse:7", None, "mayac", None)]).await.unwrap());
    let notes = done(f.crm.upsert_activities(&[activity("1", &ids[0]), activity("2", &ids[0])]).await.unwrap());
    let from = mark(&f).await;
    let deleted = f.crm.delete_activities(&[notes[0].clone(), notes[0].clone(), "nope".into()]).await.unwrap();
    assert_eq!(
        deleted,
        [
            RecordOutcome::Done(()),
            RecordOutcome::Done(()),
            RecordOutcome::Rejected("`nope` is not a Dataverse note id".into())
        ]
    );
    let delete = ("DELETE".to_owned(), format!("annotations({})", notes[0]));
    assert_eq!(api_calls(&f, from).await, [delete.clone(), delete]);
    let env = f.env.lock().unwrap();
    assert_eq!(env.notes.keys().collect::<Vec<_>>(), [&notes[1]]);
}

#[tokio::test]
async fn contact_properties_gives_formatted_values_and_reads_lookups() {
    let f = fixture().await;
    let ids = done(f.crm.upsert_contacts(&[contact("discourse:7", None, "mayac", None)]).await.unwrap());
    let id = ids[0].clone();
    {
        let mut env = f.env.lock().unwrap();
        let row = env.contact(&id).unwrap();
        for (column, value) in [
            ("customertypecode", json!(3)),
            ("customertypecode@OData.Community.Display.V1.FormattedValue", json!("Customer")),
            ("jobtitle", json!(" CTO ")),
            ("telephone1", Value::Null),
            ("_parentcustomerid_value", json!("0f0e0d0c-0000-4000-8000-0000000000aa")),
            ("_parentcustomerid_value@OData.Community.Display.V1.FormattedValue", json!("Acme Corp")),
        ] {
            row.insert(column.into(), value);
        }
    }
    let names = |list: &[&str]| list.iter().map(|name| name.to_string()).collect::<Vec<_>>();
    let expect = |pairs: &[(&str, &str)]| {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()
    };

    let from = mark(&f).await;
    let read = f
        .crm
        .contact_properties(
            &id,
            &names(&["customertypecode", "JobTitle", "telephone1", "tributary_identity", "bad name!", ""]),
        )
        .await
        .unwrap();
    assert_eq!(
        read,
        expect(&[("JobTitle", "CTO"), ("customertypecode", "Customer"), ("tributary_identity", "discourse:7")])
    );
    let requests = f.server.received_requests().await.unwrap();
    let api: Vec<&Request> = requests[from..].iter().filter(|r| r.url.path().starts_with(API_PREFIX)).collect();
    assert_eq!(api.len(), 1, "one read");
    let select = api[0].url.query_pairs().find(|(k, _)| k == "$select").map(|(_, v)| v.into_owned());
    assert_eq!(select.as_deref(), Some("customertypecode,jobtitle,telephone1,tributary_identity"));
    let prefer = api[0].headers.get("prefer").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert_eq!(prefer, "odata.include-annotations=\"OData.Community.Display.V1.FormattedValue\"");

    // A lookup named plainly: the $select is refused, the whole row is read.
    let from = mark(&f).await;
    let read = f.crm.contact_properties(&id, &names(&["parentcustomerid", "jobtitle", "nosuchcolumn"])).await.unwrap();
    assert_eq!(read, expect(&[("jobtitle", "CTO"), ("parentcustomerid", "Acme Corp")]));
    let calls = api_calls(&f, from).await;
    assert_eq!(calls, [("GET".to_owned(), format!("contacts({id})")), ("GET".to_owned(), format!("contacts({id})"))]);

    assert!(f.crm.contact_properties(&id, &[]).await.unwrap().is_empty());
    let gone = "0f0e0d0c-0000-4000-8000-0000000000ff";
    let error = f.crm.contact_properties(gone, &names(&["jobtitle"])).await.unwrap_err();
    assert!(matches!(error, CrmError::Http(HttpError::Status { status: 404, .. })), "{error:?}");
    let error = f.crm.contact_properties("x", &names(&["jobtitle"])).await.unwrap_err();
    assert!(matches!(error, CrmError::Unsupported(_)), "{error:?}");
}

#[tokio::test]
async fn rollups_write_the_new_figures_in_one_patch_and_clear_stale_ones() {
    let f = fixture().await;
    let ids = done(f.crm.upsert_contacts(&[contact("discourse:7", None, "mayac", None)]).await.unwrap());
    let id = ids[0].clone();
    let at = |seconds| chrono::DateTime::from_timestamp(seconds, 0).unwrap();
    let platform = |name: &str, contributions| PlatformRollup {
        platform: name.into(),
        handle: Some("mayac".into()),
        profile_url: None,
        first_seen: at(1_600_000_000),
        last_seen: at(1_700_000_000),
        contributions,
    };
    let full = Rollup {
        last_url: Some("https://community.example.com/t/42".into()),
        last_excerpt: Some("  Export\nis   broken\r\nagain ".into()),
        count_90d: 4,
        sentiment_avg_90d: Some(-0.612_345),
        needs_attention: true,
        attention_reason: Some(format!("an unresolved complaint\n{}", "x".repeat(2000))),
        per_platform: vec![platform("discourse", 2), platform("GitHub", 1)],
        ..rollup(&id)
    };
    let from = mark(&f).await;
    done(f.crm.update_rollups(std::slice::from_ref(&full)).await.unwrap());
    assert_eq!(api_calls(&f, from).await, [("PATCH".to_owned(), format!("contacts({id})"))], "one write");
    {
        let mut env = f.env.lock().unwrap();
        let row = env.contact(&id).unwrap().clone();
        assert_eq!(row["tributary_contributioncount"], 3);
        assert_eq!(row["tributary_lasturl"], "https://community.example.com/t/42");
        assert_eq!(row["tributary_lastexcerpt"], "Export is broken again");
        assert_eq!(row["tributary_contributions90d"], 4);
        assert_eq!(row["tributary_sentiment90d"], -0.612);
        assert_eq!(row["tributary_needsattention"], true);
        let reason = row["tributary_attentionreason"].as_str().unwrap();
        assert!(reason.starts_with("an unresolved complaint xxx") && reason.ends_with('…'), "{reason}");
        assert!(reason.chars().count() <= 1000 && !reason.contains('\n'));
        assert_eq!(row["tributary_discoursefirstseen"], "2020-09-13T12:26:40Z");
        assert_eq!(row["tributary_discourselastseen"], "2023-11-14T22:13:20Z");
        assert_eq!(row["tributary_discoursecontributions"], 2);
        assert_eq!(row["tributary_githubcontributions"], 1);
    }

    // Without the optional figures: the old values are cleared.
    done(f.crm.update_rollups(&[rollup(&id)]).await.unwrap());
    let mut env = f.env.lock().unwrap();
    let row = env.contact(&id).unwrap();
    for column in ["tributary_lasturl", "tributary_lastexcerpt", "tributary_sentiment90d", "tributary_attentionreason"]
    {
        assert_eq!(row[column], Value::Null, "{column}");
    }
    assert_eq!((&row["tributary_needsattention"], &row["tributary_contributions90d"]), (&json!(false), &json!(0)));
}

#[test]
fn the_yes_no_column_is_a_boolean_with_its_two_options() {
    let column = Column::new("t_flag".into(), "Flag", ColumnKind::Flag, "A flag.");
    let body = column.create_body();
    assert_eq!(body["@odata.type"], "Microsoft.Dynamics.CRM.BooleanAttributeMetadata");
    assert_eq!(body["OptionSet"]["@odata.type"], "Microsoft.Dynamics.CRM.BooleanOptionSetMetadata");
    assert_eq!(body["OptionSet"]["TrueOption"]["Value"], 1);
    assert_eq!(body["OptionSet"]["FalseOption"]["Value"], 0);
    assert_eq!(body["SchemaName"], "t_flag");
    assert_eq!(one_line(" a\n\tb ", 10), "a b");
    assert_eq!(one_line("abcdef ghijkl", 9), "abcdef g…");
    assert_eq!(logical_name(" JobTitle "), Some("jobtitle".into()));
    assert_eq!(logical_name("_parentcustomerid_value").as_deref(), Some("_parentcustomerid_value"));
    for bad in ["", "a b", "x,y", "9a", "a'b"] {
        assert_eq!(logical_name(bad), None, "{bad:?}");
    }
}
