//! The sink against a stateful mock org that answers as Salesforce's REST
//! and Tooling APIs document (shapes from the REST API Developer Guide).

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};
use tributary_sdk::{Author, Contribution, Intent, PlatformRollup, Signals};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::any};

use super::*;

const SECRET: &str = "s3cret-consumer-value";
const API: &str = "/services/data/v61.0";

#[derive(Debug, Clone)]
struct Record {
    id: String,
    fields: Map<String, Value>,
}

#[derive(Default)]
struct Org {
    tokens_issued: u32,
    /// The token the org accepts; `None` after a session expires.
    valid_token: Option<String>,
    /// Every token is refused (a revoked integration user).
    refuse_all_sessions: bool,
    contacts: Vec<Record>,
    /// Contacts in the Recycle Bin (deleted, or merged: `MasterRecordId` set).
    deleted_contacts: Vec<Record>,
    tasks: Vec<Record>,
    /// `Table.DeveloperName` of the custom fields.
    custom_fields: Vec<String>,
    /// The Tooling query lists nothing (creation then says duplicate).
    tooling_query_blind: bool,
    api_used: u64,
    api_max: u64,
    limit_exceeded: bool,
    next_id: u32,
}

impl Org {
    fn new() -> Org {
        Org { api_max: 100_000, ..Org::default() }
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{:015}", self.next_id)
    }
}

#[derive(Clone)]
struct FakeOrg(Arc<Mutex<Org>>);

fn errors(code: &str, message: &str) -> Value {
    json!([{ "message": message, "errorCode": code }])
}

fn failure(code: &str, message: &str, fields: &[&str]) -> Value {
    json!({ "success": false, "errors": [{ "statusCode": code, "message": message, "fields": fields }] })
}

/// The string literals of a SOQL text (escapes undone).
fn literals(soql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = soql.chars();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut literal = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => literal.extend(chars.next()),
                '\'' => break,
                c => literal.push(c),
            }
        }
        out.push(literal);
    }
    out
}

fn text(fields: &Map<String, Value>, name: &str) -> Option<String> {
    fields.get(name).and_then(Value::as_str).map(str::to_owned)
}

impl FakeOrg {
    fn answer(&self, org: &mut Org, request: &Request) -> ResponseTemplate {
        let path = request.url.path().to_owned();
        let method = request.method.as_str().to_owned();
        if path == "/services/oauth2/token" {
            let body = String::from_utf8_lossy(&request.body).into_owned();
            let expected = format!("grant_type=client_credentials&client_id=cid-1&client_secret={SECRET}");
            if body != expected {
                return ResponseTemplate::new(400).set_body_json(
                    json!({ "error": "invalid_client", "error_description": "invalid client credentials" }),
                );
            }
            org.tokens_issued += 1;
            let token = format!("00Dxx!tok-{}", org.tokens_issued);
            org.valid_token = Some(token.clone());
            return ResponseTemplate::new(200).set_body_json(json!({
                "access_token": token, "signature": "sig", "instance_url": "https://acme.my.salesforce.com",
                "id": "https://login.salesforce.com/id/00Dxx/005xx", "token_type": "Bearer", "issued_at": "1700000000000",
            }));
        }
        let bearer = request.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let valid = org.valid_token.as_ref().is_some_and(|token| bearer == format!("Bearer {token}"));
        if !valid || org.refuse_all_sessions {
            return ResponseTemplate::new(401)
                .set_body_json(errors("INVALID_SESSION_ID", "Session expired or invalid"));
        }
        if org.limit_exceeded {
            return ResponseTemplate::new(403)
                .set_body_json(errors("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."));
        }
        org.api_used += 1;
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let query = |name: &str| request.url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
        let (status, answer) = match (method.as_str(), path.strip_prefix(API).unwrap_or(&path)) {
            ("GET", "/query") => (200, self.query(org, &query("q").unwrap_or_default())),
            ("GET", "/queryAll") => (200, self.query_all(org, &query("q").unwrap_or_default())),
            ("GET", path) if path.starts_with("/sobjects/Contact/") => {
                let id = path.trim_start_matches("/sobjects/Contact/");
                self.read_contact(org, id, &query("fields").unwrap_or_default())
            }
            ("GET", "/tooling/query") => {
                let records: Vec<Value> = if org.tooling_query_blind {
                    vec![]
                } else {
                    org.custom_fields
                        .iter()
                        .map(|full| {
                            let (table, name) = full.split_once('.').unwrap();
                            json!({ "attributes": { "type": "CustomField" }, "Id": "00Nxx", "DeveloperName": name, "TableEnumOrId": table })
                        })
                        .collect()
                };
                (200, json!({ "size": records.len(), "totalSize": records.len(), "done": true, "records": records }))
            }
            ("POST", "/tooling/sobjects/CustomField") => {
                let full = body["FullName"].as_str().unwrap().trim_end_matches("__c").to_owned();
                if org.custom_fields.contains(&full) {
                    (400, errors("DUPLICATE_DEVELOPER_NAME", "The developer name is already in use"))
                } else {
                    org.custom_fields.push(full);
                    (201, json!({ "id": "00Nxx0000001", "success": true, "errors": [] }))
                }
            }
            ("PATCH", collection) if body["allOrNone"] != json!(false) => {
                (400, errors("JSON_PARSER_ERROR", &format!("allOrNone missing on {collection}")))
            }
            ("PATCH", "/composite/sobjects/Contact/Tributary_Identity__c") => {
                (200, self.upsert(org, &body, true, IDENTITY))
            }
            ("PATCH", "/composite/sobjects/Task/Tributary_Key__c") => (200, self.upsert(org, &body, false, KEY)),
            ("PATCH", "/composite/sobjects") => {
                let results: Vec<Value> = body["records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|record| {
                        assert_eq!(record["attributes"]["type"], "Contact");
                        let id = record["id"].as_str().unwrap();
                        match org.contacts.iter_mut().find(|c| c.id == id) {
                            Some(contact) => {
                                for (name, value) in record.as_object().unwrap() {
                                    if name != "attributes" && name != "id" {
                                        contact.fields.insert(name.clone(), value.clone());
                                    }
                                }
                                json!({ "id": id, "success": true, "errors": [] })
                            }
                            None => failure("ENTITY_IS_DELETED", "entity is deleted", &[]),
                        }
                    })
                    .collect();
                (200, json!(results))
            }
            ("DELETE", "/composite/sobjects") => {
                assert_eq!(query("allOrNone").as_deref(), Some("false"));
                let ids = query("ids").unwrap_or_default();
                let results: Vec<Value> = ids
                    .split(',')
                    .map(|id| match org.tasks.iter().position(|t| t.id == id) {
                        Some(index) => {
                            org.tasks.remove(index);
                            json!({ "id": id, "success": true, "errors": [] })
                        }
                        None if id.starts_with("00T") => failure("ENTITY_IS_DELETED", "entity is deleted", &[]),
                        None => {
                            failure("INSUFFICIENT_ACCESS_OR_READONLY", "insufficient access rights on object id", &[])
                        }
                    })
                    .collect();
                (200, json!(results))
            }
            (method, path) => panic!("the mock org has no {method} {path}"),
        };
        ResponseTemplate::new(status).set_body_json(answer)
    }

    fn query(&self, org: &Org, soql: &str) -> Value {
        let values: Vec<String> = literals(soql).into_iter().map(|v| v.to_lowercase()).collect();
        let matching: Vec<&Record> = if soql.contains("WHERE Email") {
            org.contacts
                .iter()
                .filter(|c| text(&c.fields, "Email").is_some_and(|e| values.contains(&e.to_lowercase())))
                .collect()
        } else if let Some(field) = soql.split("WHERE ").nth(1).and_then(|rest| rest.split(' ').next()) {
            org.contacts
                .iter()
                .filter(|c| text(&c.fields, field).is_some_and(|v| values.contains(&v.to_lowercase())))
                .collect()
        } else {
            org.contacts.iter().take(1).collect()
        };
        let records: Vec<Value> = matching
            .iter()
            .map(|c| {
                json!({
                    "attributes": { "type": "Contact", "url": format!("{API}/sobjects/Contact/{}", c.id) },
                    "Id": c.id, "Email": c.fields.get("Email"), IDENTITY: c.fields.get(IDENTITY),
                })
            })
            .collect();
        json!({ "totalSize": records.len(), "done": true, "records": records })
    }

    /// `queryAll` of `SELECT Id, IsDeleted, MasterRecordId FROM Contact WHERE Id IN (...)`:
    /// deleted (and merged) contacts too.
    fn query_all(&self, org: &Org, soql: &str) -> Value {
        assert!(soql.starts_with("SELECT Id, IsDeleted, MasterRecordId FROM Contact WHERE Id IN ("), "{soql}");
        let ids = literals(soql);
        let records: Vec<Value> = org
            .contacts
            .iter()
            .chain(&org.deleted_contacts)
            .filter(|c| ids.iter().any(|id| id[..15] == c.id[..15]))
            .map(|c| {
                json!({
                    "attributes": { "type": "Contact" }, "Id": c.id,
                    "IsDeleted": org.deleted_contacts.iter().any(|d| d.id == c.id),
                    "MasterRecordId": c.fields.get("MasterRecordId").cloned().unwrap_or(Value::Null),
                })
            })
            .collect();
        json!({ "totalSize": records.len(), "done": true, "records": records })
    }

    /// `GET /sobjects/Contact/{id}?fields=a,b`: the first unknown field is
    /// refused as Salesforce does; names answer in their own case.
    fn read_contact(&self, org: &Org, id: &str, fields: &str) -> (u16, Value) {
        let Some(contact) = org.contacts.iter().find(|c| c.id == id) else {
            return (404, errors("NOT_FOUND", "The requested resource does not exist"));
        };
        let mut known: Vec<String> =
            ["Id", "Email", "FirstName", "LastName", "Title", "Description", "LeadSource", "AccountId"]
                .map(str::to_owned)
                .to_vec();
        known.extend(org.custom_fields.iter().filter_map(|f| f.strip_prefix("Contact.")).map(|f| format!("{f}__c")));
        known.extend(contact.fields.keys().cloned());
        let mut answer = Map::new();
        answer.insert("attributes".into(), json!({ "type": "Contact", "url": format!("{API}/sobjects/Contact/{id}") }));
        for name in fields.split(',') {
            let Some(canonical) = known.iter().find(|k| k.eq_ignore_ascii_case(name)) else {
                let message = format!(
                    "\n{fields}\n^\nERROR at Row:1:Column:1\nNo such column '{name}' on entity 'Contact'. If you are \
                     attempting to use a custom field, be sure to append the '__c' after the custom field name."
                );
                return (400, errors("INVALID_FIELD", &message));
            };
            answer.insert(canonical.clone(), contact.fields.get(canonical).cloned().unwrap_or(Value::Null));
        }
        (200, Value::Object(answer))
    }

    fn upsert(&self, org: &mut Org, body: &Value, contacts: bool, key: &str) -> Value {
        let mut results = Vec::new();
        for record in body["records"].as_array().unwrap() {
            let record = record.as_object().unwrap().clone();
            assert_eq!(record["attributes"]["type"], if contacts { "Contact" } else { "Task" });
            assert!(!record.contains_key("id") && !record.contains_key("Id"), "upserts name no record id");
            let value = text(&record, key).unwrap().to_lowercase();
            if let Some(email) = text(&record, "Email").filter(|e| !e.contains('@')) {
                results.push(failure(
                    "INVALID_EMAIL_ADDRESS",
                    &format!("Email: invalid email address: {email}"),
                    &["Email"],
                ));
                continue;
            }
            let prefix = if contacts { "003" } else { "00T" };
            let id = org.id(prefix);
            let table = if contacts { &mut org.contacts } else { &mut org.tasks };
            let mut fields = record.clone();
            fields.remove("attributes");
            match table.iter_mut().find(|r| text(&r.fields, key).is_some_and(|v| v.to_lowercase() == value)) {
                Some(existing) => {
                    existing.fields.extend(fields);
                    results.push(json!({ "id": existing.id, "success": true, "errors": [], "created": false }));
                }
                None if contacts && !fields.contains_key("LastName") => results.push(failure(
                    "REQUIRED_FIELD_MISSING",
                    "Required fields are missing: [LastName]",
                    &["LastName"],
                )),
                None => {
                    table.push(Record { id: id.clone(), fields });
                    results.push(json!({ "id": id, "success": true, "errors": [], "created": true }));
                }
            }
        }
        json!(results)
    }
}

impl Respond for FakeOrg {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut org = self.0.lock().unwrap();
        let limit = format!("api-usage={}/{}", org.api_used + 1, org.api_max);
        self.answer(&mut org, request).insert_header("sforce-limit-info", limit.as_str())
    }
}

struct Fixture {
    server: MockServer,
    org: Arc<Mutex<Org>>,
    _dir: tempfile::TempDir,
    secret_file: std::path::PathBuf,
}

impl Fixture {
    async fn start(org: Org) -> Fixture {
        let server = MockServer::start().await;
        let org = Arc::new(Mutex::new(org));
        Mock::given(any()).respond_with(FakeOrg(org.clone())).mount(&server).await;
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("salesforce");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        Fixture { server, org, _dir: dir, secret_file }
    }

    fn config(&self) -> SalesforceConfig {
        serde_json::from_value(json!({
            "instance_url": self.server.uri(),
            "client_id": "cid-1",
            "client_secret": { "file": self.secret_file },
        }))
        .unwrap()
    }

    /// A new sink (a new process: no token in memory).
    fn crm(&self) -> SalesforceCrm {
        let options = HttpOptions { max_retries: 0, backoff_base: Duration::from_millis(1), ..HttpOptions::default() };
        SalesforceCrm::new(self.config(), options).unwrap()
    }

    async fn requests(&self) -> Vec<Request> {
        self.server.received_requests().await.unwrap()
    }

    /// `METHOD path` of every request but the token's.
    async fn calls(&self) -> Vec<String> {
        self.requests()
            .await
            .iter()
            .filter(|r| r.url.path() != "/services/oauth2/token")
            .map(|r| format!("{} {}", r.method, r.url.path().trim_start_matches(API)))
            .collect()
    }

    fn org(&self) -> std::sync::MutexGuard<'_, Org> {
        self.org.lock().unwrap()
    }
}

fn contact(identity: &str, email: Option<&str>, handle: &str) -> ContactUpsert {
    ContactUpsert {
        identity: identity.into(),
        email: email.map(str::to_owned),
        platform: "discourse".into(),
        handle: Some(handle.into()),
        display_name: None,
        profile_url: Some(format!("https://community.example.com/u/{handle}")),
    }
}

fn activity(external_id: &str, contact_id: &str) -> ActivityUpsert {
    let contribution = Contribution {
        external_id: external_id.into(),
        author: Author { id: "7".into(), handle: Some("mayac".into()), ..Author::default() },
        signals: Some(Signals { sentiment: -0.5, intent: Intent::Complaint, sentiment_skipped: None }),
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
        sentiment_avg: 0.12345,
        questions: 1,
        complaints: 1,
        ideas: 0,
        praise: 1,
        ..Default::default()
    }
}

/// Outcomes as `Ok(id)` / `Err(message)`, compared with `expected`
/// (`Ok("*")` is any id).
fn check<T: std::fmt::Debug>(outcomes: &[RecordOutcome<T>], expected: &[Result<&str, &str>]) -> Vec<String> {
    assert_eq!(outcomes.len(), expected.len(), "{outcomes:?}");
    let mut ids = Vec::new();
    for (outcome, expected) in outcomes.iter().zip(expected) {
        match (outcome, expected) {
            (RecordOutcome::Done(id), Ok(wanted)) => {
                let id = format!("{id:?}").trim_matches('"').to_owned();
                assert!(*wanted == "*" || id == *wanted, "{id} != {wanted}");
                ids.push(id);
            }
            (RecordOutcome::Rejected(message), Err(wanted)) => assert_eq!(message, wanted),
            (outcome, expected) => panic!("{outcome:?} is not {expected:?}"),
        }
    }
    ids
}

/// An org where a salesperson already created Maya, by e-mail.
fn org_with_maya() -> Org {
    let mut org = Org::new();
    let mut fields = Map::new();
    fields.insert("Email".into(), json!("Maya@Example.com"));
    fields.insert("LastName".into(), json!("Chen"));
    org.contacts.push(Record { id: "00300000000000MAYA".into(), fields });
    org
}

#[tokio::test]
async fn first_sync_writes_contacts_tasks_and_rollups() {
    let fixture = Fixture::start(org_with_maya()).await;
    let crm = fixture.crm();
    let contacts = [
        contact("discourse:7", Some(" MAYA@example.com "), "mayac"),
        contact("discourse:9", None, "bob"),
        contact("discourse:11", Some("ann@example.com"), "ann"),
    ];
    let ids = check(&crm.upsert_contacts(&contacts).await.unwrap(), &[Ok("00300000000000MAYA"), Ok("*"), Ok("*")]);

    let requests = fixture.requests().await;
    // The token: client credentials in the form body.
    assert_eq!(requests[0].url.path(), "/services/oauth2/token");
    // The e-mails are looked up first, lowercased and quoted.
    let lookup = &requests[1];
    assert_eq!((lookup.method.as_str(), lookup.url.path()), ("GET", "/services/data/v61.0/query"));
    assert_eq!(lookup.headers["authorization"], "Bearer 00Dxx!tok-1");
    let soql = lookup.url.query_pairs().find(|(k, _)| k == "q").unwrap().1.into_owned();
    assert_eq!(
        soql,
        "SELECT Id, Email, Tributary_Identity__c FROM Contact WHERE Email IN ('ann@example.com', \
         'maya@example.com') ORDER BY CreatedDate ASC"
    );
    // New people are upserted by identity; Maya, known without one, is updated by id.
    let upsert = &requests[2];
    assert_eq!(upsert.method.as_str(), "PATCH");
    assert_eq!(upsert.url.path(), "/services/data/v61.0/composite/sobjects/Contact/Tributary_Identity__c");
    assert_eq!(upsert.headers["content-type"], "application/json");
    let body: Value = upsert.body_json().unwrap();
    assert_eq!(
        body,
        json!({ "allOrNone": false, "records": [
            { "attributes": { "type": "Contact" }, "Tributary_Discourse_Handle__c": "bob",
              "Tributary_Discourse_Profile__c": "https://community.example.com/u/bob",
              "Tributary_Identity__c": "discourse:9", "LastName": "bob" },
            { "attributes": { "type": "Contact" }, "Tributary_Discourse_Handle__c": "ann",
              "Tributary_Discourse_Profile__c": "https://community.example.com/u/ann",
              "Tributary_Identity__c": "email:ann@example.com", "Email": "ann@example.com", "LastName": "ann" },
        ]})
    );
    let update: Value = requests[3].body_json().unwrap();
    assert_eq!(requests[3].url.path(), "/services/data/v61.0/composite/sobjects");
    assert_eq!(update["records"][0]["id"], "00300000000000MAYA");
    assert_eq!(update["records"][0]["Tributary_Identity__c"], "email:maya@example.com");
    assert!(update["records"][0].get("LastName").is_none(), "the CRM's name for Maya stays");
    {
        let org = fixture.org();
        assert_eq!(org.contacts.len(), 3, "one person is one contact");
        assert_eq!(text(&org.contacts[0].fields, "LastName").as_deref(), Some("Chen"));
    }

    let activities = [activity("42", &ids[0]), activity("43", &ids[1])];
    let task_ids = check(&crm.upsert_activities(&activities).await.unwrap(), &[Ok("*"), Ok("*")]);
    let requests = fixture.requests().await;
    let tasks = requests.last().unwrap();
    assert_eq!(tasks.url.path(), "/services/data/v61.0/composite/sobjects/Task/Tributary_Key__c");
    let body: Value = tasks.body_json().unwrap();
    let first = &body["records"][0];
    for (field, value) in [
        ("Tributary_Key__c", json!(activities[0].key)),
        ("WhoId", json!("00300000000000MAYA")),
        ("Subject", json!("Export to PDF?")),
        ("ActivityDate", json!("2023-11-14")),
        ("Status", json!("Completed")),
        ("Tributary_Intent__c", json!("complaint")),
        ("Tributary_Sentiment__c", json!(-0.5)),
    ] {
        assert_eq!(first[field], value, "{field}");
    }
    let description = first["Description"].as_str().unwrap();
    assert!(description.starts_with("Is there a way?\nI looked in settings.\n\nhttps://community.example.com/t/42"));

    let outcomes = crm.update_rollups(&[rollup(&ids[0]), rollup(&ids[1])]).await.unwrap();
    check(&outcomes, &[Ok("()"), Ok("()")]);
    let requests = fixture.requests().await;
    let body: Value = requests.last().unwrap().body_json().unwrap();
    assert_eq!(requests.last().unwrap().method.as_str(), "PATCH");
    assert_eq!(
        body["records"][0],
        json!({ "attributes": { "type": "Contact" }, "id": ids[0],
                "Tributary_Last_Contribution__c": "2023-11-14T22:13:20.000Z", "Tributary_Last_Platform__c": "discourse",
                "Tributary_Contribution_Count__c": 3, "Tributary_Platforms__c": "discourse;github",
                "Tributary_Sentiment__c": 0.123, "Tributary_Questions__c": 1, "Tributary_Complaints__c": 1,
                "Tributary_Ideas__c": 0, "Tributary_Praise__c": 1,
                // Figures without a value are written empty, so none lingers.
                "Tributary_Last_Url__c": null, "Tributary_Last_Excerpt__c": null, "Tributary_Contributions_90d__c": 0,
                "Tributary_Sentiment_90d__c": null, "Tributary_Needs_Attention__c": false,
                "Tributary_Attention_Reason__c": null })
    );
    let org = fixture.org();
    assert_eq!(org.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), task_ids);
    assert_eq!(org.contacts[0].fields["Tributary_Contribution_Count__c"], 3);
    assert_eq!(org.tokens_issued, 1);
}

#[tokio::test]
async fn a_replay_after_a_crash_writes_nothing_twice() {
    let fixture = Fixture::start(org_with_maya()).await;
    let contacts = [contact("discourse:7", Some("maya@example.com"), "mayac"), contact("discourse:9", None, "bob")];
    let first = fixture.crm();
    let ids = check(&first.upsert_contacts(&contacts).await.unwrap(), &[Ok("*"), Ok("*")]);
    let activities = [activity("42", &ids[0]), activity("43", &ids[1]), activity("42", &ids[0])];
    let task_ids = check(&first.upsert_activities(&activities).await.unwrap(), &[Ok("*"), Ok("*"), Ok("*")]);
    assert_eq!(task_ids[0], task_ids[2], "one key is one task, even twice in a batch");
    drop(first);

    // The process died before its ledger was written: everything again.
    let second = fixture.crm();
    let again = check(&second.upsert_contacts(&contacts).await.unwrap(), &[Ok("*"), Ok("*")]);
    assert_eq!(again, ids);
    let tasks_again = check(&second.upsert_activities(&activities).await.unwrap(), &[Ok("*"), Ok("*"), Ok("*")]);
    assert_eq!(tasks_again, task_ids);
    let counts = {
        let org = fixture.org();
        (org.contacts.len(), org.tasks.len())
    };
    assert_eq!(counts, (2, 2), "nothing written twice");
    // Maya now has an identity: the replay upserted her by it, never by id again.
    let calls = fixture.calls().await;
    assert_eq!(calls.iter().filter(|c| *c == "PATCH /composite/sobjects").count(), 1, "{calls:?}");
}

#[tokio::test]
async fn one_refused_record_does_not_stop_the_batch() {
    let fixture = Fixture::start(org_with_maya()).await;
    let crm = fixture.crm();
    let contacts = [
        contact("discourse:1", None, "ok-1"),
        contact("discourse:2", Some("not-an-email"), "bad"),
        contact("", None, "nobody"),
        contact("discourse:3", None, "ok-2"),
    ];
    let outcomes = crm.upsert_contacts(&contacts).await.unwrap();
    let ids = check(
        &outcomes,
        &[
            Ok("*"),
            Err("INVALID_EMAIL_ADDRESS: Email: invalid email address: not-an-email (fields: Email)"),
            Err("the contact has neither an e-mail nor an identity"),
            Ok("*"),
        ],
    );
    assert_eq!(fixture.org().contacts.len(), 3);
    let outcomes = crm.update_rollups(&[rollup(&ids[0]), rollup("00300000000000GONE"), rollup("")]).await.unwrap();
    check(&outcomes, &[Ok("()"), Err("ENTITY_IS_DELETED: entity is deleted"), Err("the rollup has no contact id")]);
}

#[tokio::test]
async fn contacts_go_in_collections_of_200() {
    let fixture = Fixture::start(Org::new()).await;
    let crm = fixture.crm();
    let contacts: Vec<ContactUpsert> =
        (0..450).map(|n| contact(&format!("discourse:{n}"), None, &format!("user{n}"))).collect();
    let outcomes = crm.upsert_contacts(&contacts).await.unwrap();
    assert!(outcomes.iter().all(|o| matches!(o, RecordOutcome::Done(_))));
    let sizes: Vec<usize> = fixture
        .requests()
        .await
        .iter()
        .filter(|r| r.method.as_str() == "PATCH")
        .map(|r| r.body_json::<Value>().unwrap()["records"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [200, 200, 50]);
}

#[tokio::test]
async fn archiving_deletes_tasks_and_gone_ones_are_done() {
    let fixture = Fixture::start(Org::new()).await;
    let crm = fixture.crm();
    let ids = check(&crm.upsert_contacts(&[contact("discourse:9", None, "bob")]).await.unwrap(), &[Ok("*")]);
    let tasks = check(&crm.upsert_activities(&[activity("1", &ids[0])]).await.unwrap(), &[Ok("*")]);
    let archive = [tasks[0].clone(), "00T00000000000GONE".into(), "00100000000000ACCT".into(), "x,y".into()];
    let outcomes = crm.archive_activities(&archive).await.unwrap();
    check(
        &outcomes,
        &[
            Ok("()"),
            Ok("()"),
            Err("INSUFFICIENT_ACCESS_OR_READONLY: insufficient access rights on object id"),
            Err("`x,y` is not a Salesforce id"),
        ],
    );
    let requests = fixture.requests().await;
    let delete = requests.last().unwrap();
    assert_eq!((delete.method.as_str(), delete.url.path()), ("DELETE", "/services/data/v61.0/composite/sobjects"));
    assert_eq!(
        delete.url.query(),
        Some(&*format!("ids={}%2C00T00000000000GONE%2C00100000000000ACCT&allOrNone=false", tasks[0]))
    );
    assert!(fixture.org().tasks.is_empty());
}

/// Each way Salesforce says the allocation is spent: an error of its own
/// and no request at all while held.
#[tokio::test]
async fn a_spent_allocation_holds_every_request() {
    for (exceeded, used) in [(true, 0), (false, 5_000)] {
        let mut org = Org::new();
        org.limit_exceeded = exceeded;
        org.api_used = used;
        org.api_max = 5_000;
        let fixture = Fixture::start(org).await;
        let crm = fixture.crm();
        let first = crm.upsert_contacts(&[contact("discourse:9", None, "bob")]).await;
        if exceeded {
            let error = first.unwrap_err();
            assert!(matches!(error, CrmError::RateLimited { retry_after } if retry_after == LIMIT_WAIT), "{error:?}");
        } else {
            // The header said the last call used the allocation up.
            first.unwrap();
        }
        let sent = fixture.requests().await.len();
        fixture.org().limit_exceeded = false;
        let error = crm.update_rollups(&[rollup("00300000000000MAYA")]).await.unwrap_err();
        let wait = error.retry_after().unwrap();
        assert!(wait > Duration::from_secs(3500) && wait <= LIMIT_WAIT, "{wait:?}");
        assert_eq!(fixture.requests().await.len(), sent, "no request while held");
    }
}

#[tokio::test]
async fn an_expired_session_is_renewed_once_and_the_call_retried() {
    let fixture = Fixture::start(Org::new()).await;
    let crm = fixture.crm();
    crm.check().await.unwrap();
    fixture.org().valid_token = None;
    check(&crm.upsert_contacts(&[contact("discourse:9", None, "bob")]).await.unwrap(), &[Ok("*")]);
    assert_eq!(fixture.org().tokens_issued, 2);
    let calls = fixture.calls().await;
    let patch = "PATCH /composite/sobjects/Contact/Tributary_Identity__c";
    assert_eq!(calls, ["GET /query", patch, patch]);
    let requests = fixture.requests().await;
    assert_eq!(requests.last().unwrap().headers["authorization"], "Bearer 00Dxx!tok-2");

    // Refused again after the renewal: an Auth error, no loop.
    fixture.org().refuse_all_sessions = true;
    let error = crm.check().await.unwrap_err();
    assert!(
        matches!(&error, CrmError::Auth(m) if m.contains("INVALID_SESSION_ID: Session expired or invalid")),
        "{error:?}"
    );
    assert_eq!(fixture.org().tokens_issued, 3, "one renewal per call");
}

#[tokio::test]
async fn the_secret_and_tokens_never_show() {
    let fixture = Fixture::start(Org::new()).await;
    let crm = fixture.crm();
    crm.check().await.unwrap();
    let shown = format!("{crm:?}");
    assert!(shown.contains("cid-1"), "{shown}");
    // A wrong secret: the token endpoint refuses, naming only its error.
    std::fs::write(&fixture.secret_file, "wrong-secret-value").unwrap();
    let wrong = fixture.crm();
    let error = wrong.check().await.unwrap_err();
    assert!(matches!(error, CrmError::Auth(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("invalid_client"), "{message}");
    for text in [shown, message, format!("{error:?}"), format!("{wrong:?}")] {
        for secret in [SECRET, "wrong-secret-value", "tok-1", "tok-2"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
    assert_eq!(crm.scrub(&format!("echo {SECRET}")), "echo [redacted]");
}

#[tokio::test]
async fn setup_creates_the_fields_once() {
    let mut org = Org::new();
    org.custom_fields.push("Contact.Tributary_Identity".into());
    let fixture = Fixture::start(org).await;
    let crm = fixture.crm();
    let platforms = ["discourse".to_owned(), "GitHub".to_owned()];
    let first = crm.setup(&platforms).await.unwrap();
    assert_eq!(first.existing, ["Contact.Tributary_Identity__c"]);
    assert!(first.created.contains(&"Contact.Tributary_Github_Handle__c".to_owned()));
    assert!(first.created.contains(&"Activity.Tributary_Key__c".to_owned()));
    // Per platform handle and profile, the rollups, per platform the rollup figures, the Task fields.
    assert_eq!(first.created.len(), 4 + 15 + 6 + 5, "{:?}", first.created);
    for name in [
        "Contact.Tributary_Needs_Attention__c",
        "Contact.Tributary_Github_First__c",
        "Contact.Tributary_Discourse_Count__c",
    ] {
        assert!(first.created.contains(&name.to_owned()), "{name} not in {:?}", first.created);
    }
    let requests = fixture.requests().await;
    let tooling = &requests[1];
    assert_eq!(tooling.url.path(), "/services/data/v61.0/tooling/query");
    let create =
        requests.iter().find(|r| r.method.as_str() == "POST" && r.url.path().ends_with("CustomField")).unwrap();
    let key = requests
        .iter()
        .filter_map(|r| r.body_json::<Value>().ok())
        .find(|b| b["FullName"] == "Activity.Tributary_Key__c")
        .unwrap();
    assert_eq!(create.url.path(), "/services/data/v61.0/tooling/sobjects/CustomField");
    assert_eq!(
        key["Metadata"],
        json!({ "type": "Text", "label": "Tributary Key", "length": 64, "externalId": true, "unique": true,
                "caseSensitive": false,
                "description": "Deterministic key of the contribution: Tributary's upsert key for tasks." })
    );
    let field = |full_name: &str| {
        requests.iter().filter_map(|r| r.body_json::<Value>().ok()).find(|b| b["FullName"] == full_name).unwrap()
    };
    assert_eq!(field("Contact.Tributary_Needs_Attention__c")["Metadata"]["type"], "Checkbox");
    assert_eq!(field("Contact.Tributary_Needs_Attention__c")["Metadata"]["defaultValue"], "false");
    assert_eq!(field("Contact.Tributary_Github_Last__c")["Metadata"]["type"], "DateTime");
    assert_eq!(field("Contact.Tributary_Github_Count__c")["Metadata"]["precision"], 18);
    assert_eq!(field("Contact.Tributary_Sentiment_90d__c")["Metadata"]["scale"], 3);

    let sent = requests.len();
    let second = crm.setup(&platforms).await.unwrap();
    assert!(second.created.is_empty(), "{second:?}");
    assert_eq!(second.existing.len(), first.created.len() + 1);
    assert_eq!(fixture.requests().await.len(), sent + 1, "only the Tooling query");

    // A query that misses them: creation says DUPLICATE_DEVELOPER_NAME, still existing.
    fixture.org().tooling_query_blind = true;
    let third = crm.setup(&platforms).await.unwrap();
    assert!(third.created.is_empty() && third.existing.len() == second.existing.len(), "{third:?}");
}

#[tokio::test]
async fn lookups_escape_their_values() {
    let fixture = Fixture::start(org_with_maya()).await;
    let crm = fixture.crm();
    let found = crm.find_contact(&ContactLookup::Email("maya@example.com".into())).await.unwrap();
    assert_eq!(found.as_deref(), Some("00300000000000MAYA"));
    let lookup = ContactLookup::Handle { platform: "discourse".into(), handle: "o'brien\\".into() };
    assert_eq!(crm.find_contact(&lookup).await.unwrap(), None);
    let requests = fixture.requests().await;
    let soql = requests.last().unwrap().url.query_pairs().find(|(k, _)| k == "q").unwrap().1.into_owned();
    assert_eq!(
        soql,
        "SELECT Id FROM Contact WHERE Tributary_Discourse_Handle__c = 'o\\'brien\\\\' ORDER BY CreatedDate ASC LIMIT 1"
    );
}

#[test]
fn config_reads_as_written_and_names_bad_keys() {
    let parsed: SalesforceConfig = serde_json::from_value(json!({
        "instance_url": "https://acme.my.salesforce.com", "client_id": "cid",
        "client_secret": { "env": "SALESFORCE_CLIENT_SECRET" },
    }))
    .unwrap();
    assert_eq!(parsed.api_version, "v61.0");
    let error = serde_json::from_value::<SalesforceConfig>(json!({
        "instance_url": "https://x", "client_id": "c", "client_secret": { "env": "S" }, "token": "x",
    }))
    .unwrap_err();
    assert!(error.to_string().contains("token"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "value").unwrap();
    let config = |url: &str, version: &str, id: &str, secret: SecretRef| SalesforceConfig {
        instance_url: Url::parse(url).unwrap(),
        api_version: version.into(),
        client_id: id.into(),
        client_secret: secret,
    };
    for (bad, key) in [
        (config("ftp://acme.my.salesforce.com", "v61.0", "c", SecretRef::File(file.clone())), "`instance_url`"),
        (config("https://acme.my.salesforce.com", "61", "c", SecretRef::File(file.clone())), "`api_version`"),
        (config("https://acme.my.salesforce.com", "v61.0", " ", SecretRef::File(file.clone())), "`client_id`"),
        (
            config("https://acme.my.salesforce.com", "v61.0", "c", SecretRef::File(dir.path().join("no"))),
            "`client_secret`",
        ),
    ] {
        let error = SalesforceCrm::new(bad, HttpOptions::default()).unwrap_err().to_string();
        assert!(error.contains(key), "{error}");
    }
    let crm = SalesforceCrm::new(
        config("https://acme.my.salesforce.com/", "v61.0", "c", SecretRef::File(file)),
        HttpOptions::default(),
    )
    .unwrap()
    .with_token_store(Arc::new(MemoryTokenStore::default()));
    assert_eq!(crm.kind(), "salesforce");
    assert!(!format!("{crm:?}").contains("value\""));
}

#[tokio::test]
async fn rollups_carry_every_figure_in_the_same_update() {
    let fixture = Fixture::start(org_with_maya()).await;
    let crm = fixture.crm();
    let at = |seconds: i64| chrono::DateTime::from_timestamp(seconds, 0).unwrap();
    let full = Rollup {
        last_url: Some("https://community.example.com/t/42".into()),
        last_excerpt: Some("Is there a way?\n\nI looked\tin settings.".into()),
        count_90d: 2,
        sentiment_avg_90d: Some(-0.45678),
        needs_attention: true,
        attention_reason: Some("an unresolved complaint\n(3 days old)".into()),
        per_platform: vec![
            PlatformRollup {
                platform: "discourse".into(),
                handle: Some("mayac".into()),
                profile_url: None,
                first_seen: at(1_600_000_000),
                last_seen: at(1_700_000_000),
                contributions: 2,
            },
            PlatformRollup {
                platform: "Stack Exchange".into(),
                handle: None,
                profile_url: None,
                first_seen: at(1_650_000_000),
                last_seen: at(1_650_000_000),
                contributions: 1,
            },
        ],
        ..rollup("00300000000000MAYA")
    };
    let long_url = Rollup {
        last_url: Some(format!("https://community.example.com/t/{}", "x".repeat(300))),
        last_excerpt: Some("y".repeat(400)),
        ..rollup("00300000000000MAYA")
    };
    check(&crm.update_rollups(&[full]).await.unwrap(), &[Ok("()")]);
    let requests = fixture.requests().await;
    let patches: Vec<&Request> = requests.iter().filter(|r| r.method.as_str() == "PATCH").collect();
    assert_eq!(patches.len(), 1, "one Collections update for every figure");
    let body: Value = patches[0].body_json().unwrap();
    assert_eq!(body["records"].as_array().unwrap().len(), 1);
    let record = &body["records"][0];
    for (field, value) in [
        ("Tributary_Contribution_Count__c", json!(3)),
        ("Tributary_Last_Url__c", json!("https://community.example.com/t/42")),
        ("Tributary_Last_Excerpt__c", json!("Is there a way? I looked in settings.")),
        ("Tributary_Contributions_90d__c", json!(2)),
        ("Tributary_Sentiment_90d__c", json!(-0.457)),
        ("Tributary_Needs_Attention__c", json!(true)),
        ("Tributary_Attention_Reason__c", json!("an unresolved complaint (3 days old)")),
        ("Tributary_Discourse_First__c", json!("2020-09-13T12:26:40.000Z")),
        ("Tributary_Discourse_Last__c", json!("2023-11-14T22:13:20.000Z")),
        ("Tributary_Discourse_Count__c", json!(2)),
        ("Tributary_Stack_Exchange_First__c", json!("2022-04-15T05:20:00.000Z")),
        ("Tributary_Stack_Exchange_Count__c", json!(1)),
    ] {
        assert_eq!(record[field], value, "{field}");
    }
    assert_eq!(fixture.org().contacts[0].fields["Tributary_Needs_Attention__c"], true);

    // A link longer than the field is left empty; text is cut with an
    // ellipsis; figures without a value are emptied.
    check(&crm.update_rollups(&[long_url]).await.unwrap(), &[Ok("()")]);
    let org = fixture.org();
    let maya = &org.contacts[0].fields;
    assert_eq!(maya["Tributary_Last_Url__c"], Value::Null);
    let excerpt = maya["Tributary_Last_Excerpt__c"].as_str().unwrap();
    assert!(excerpt.chars().count() == 255 && excerpt.ends_with('…'), "{excerpt}");
    assert_eq!(maya["Tributary_Needs_Attention__c"], false);
    assert_eq!(maya["Tributary_Attention_Reason__c"], Value::Null);
    assert_eq!(maya["Tributary_Sentiment_90d__c"], Value::Null);
}

#[tokio::test]
async fn deleting_tasks_uses_the_collections_delete_and_gone_ones_are_done() {
    let fixture = Fixture::start(Org::new()).await;
    let crm = fixture.crm();
    let ids = check(&crm.upsert_contacts(&[contact("discourse:9", None, "bob")]).await.unwrap(), &[Ok("*")]);
    let tasks = check(
        &crm.upsert_activities(&[activity("1", &ids[0]), activity("2", &ids[0])]).await.unwrap(),
        &[Ok("*"), Ok("*")],
    );
    let outcomes = crm.delete_activities(&[tasks[0].clone(), "00T00000000000GONE".into(), "".into()]).await.unwrap();
    check(&outcomes, &[Ok("()"), Ok("()"), Err("`` is not a Salesforce id")]);
    // Deleting again: already gone, done.
    check(&crm.delete_activities(std::slice::from_ref(&tasks[0])).await.unwrap(), &[Ok("()")]);
    let requests = fixture.requests().await;
    let deletes: Vec<&Request> = requests.iter().filter(|r| r.method.as_str() == "DELETE").collect();
    assert_eq!(deletes.len(), 2);
    assert_eq!(deletes[0].url.path(), "/services/data/v61.0/composite/sobjects");
    assert_eq!(deletes[0].url.query(), Some(&*format!("ids={}%2C00T00000000000GONE&allOrNone=false", tasks[0])));
    let org = fixture.org();
    assert_eq!(org.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), [tasks[1].clone()]);
}

#[tokio::test]
async fn contact_properties_are_read_and_unknown_names_left_out() {
    let mut org = org_with_maya();
    org.custom_fields.push("Contact.Lifecycle_Stage".into());
    let fields = &mut org.contacts[0].fields;
    fields.insert("Title".into(), json!("VP Engineering"));
    fields.insert("Lifecycle_Stage__c".into(), json!("customer"));
    fields.insert("Tributary_Contribution_Count__c".into(), json!(3));
    fields.insert("Tributary_Needs_Attention__c".into(), json!(true));
    fields.insert("Description".into(), json!(""));
    let fixture = Fixture::start(org).await;
    let crm = fixture.crm();
    let names: Vec<String> = [
        "title",
        "Lifecycle_Stage__c",
        "Description",
        "LeadSource",
        "No_Such__c",
        "Tributary_Contribution_Count__c",
        "Tributary_Needs_Attention__c",
        "Account.Name",
        "title",
    ]
    .map(str::to_owned)
    .to_vec();
    let found = crm.contact_properties("00300000000000MAYA", &names).await.unwrap();
    assert_eq!(
        found,
        std::collections::BTreeMap::from([
            ("Lifecycle_Stage__c".to_owned(), "customer".to_owned()),
            ("Tributary_Contribution_Count__c".to_owned(), "3".to_owned()),
            ("Tributary_Needs_Attention__c".to_owned(), "true".to_owned()),
            ("title".to_owned(), "VP Engineering".to_owned()),
        ])
    );
    let requests = fixture.requests().await;
    let reads: Vec<&Request> = requests.iter().filter(|r| r.url.path().contains("/sobjects/Contact/")).collect();
    assert_eq!(reads.len(), 2, "asked again without the unknown field");
    assert_eq!(reads[0].url.path(), "/services/data/v61.0/sobjects/Contact/00300000000000MAYA");
    let asked = |request: &Request| request.url.query_pairs().find(|(k, _)| k == "fields").unwrap().1.into_owned();
    assert_eq!(
        asked(reads[0]),
        "Description,LeadSource,Lifecycle_Stage__c,No_Such__c,Tributary_Contribution_Count__c,\
         Tributary_Needs_Attention__c,title"
    );
    assert!(!asked(reads[1]).contains("No_Such__c"), "{}", asked(reads[1]));

    // Nothing to ask: no request. An unknown contact: an error.
    assert!(crm.contact_properties("00300000000000MAYA", &["bad name".into()]).await.unwrap().is_empty());
    assert_eq!(fixture.requests().await.len(), requests.len());
    let error = crm.contact_properties("00300000000000NONE", &names).await.unwrap_err();
    assert!(error.to_string().contains("no contact 00300000000000NONE"), "{error}");
}

#[tokio::test]
async fn merging_is_done_in_salesforce_and_seen_afterwards() {
    let survivor = "00300000000000MAYA";
    let mut org = org_with_maya();
    org.contacts.push(Record { id: "00300000000000DUPE".into(), fields: Map::new() });
    let fixture = Fixture::start(org).await;
    let crm = fixture.crm();

    // Both alive: Salesforce's REST API cannot merge them; the message says how.
    let error = crm.merge_contacts(survivor, "00300000000000DUPE").await.unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, CrmError::Unsupported(_)), "{error:?}");
    for part in
        ["SOAP and Apex", "Contacts → Merge Contacts", "keeping 00300000000000MAYA", "`tributary identity link`"]
    {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    let requests = fixture.requests().await;
    let lookup = requests.last().unwrap();
    assert_eq!(lookup.url.path(), "/services/data/v61.0/queryAll");
    assert_eq!(
        lookup.url.query_pairs().find(|(k, _)| k == "q").unwrap().1,
        "SELECT Id, IsDeleted, MasterRecordId FROM Contact WHERE Id IN ('00300000000000MAYA', '00300000000000DUPE')"
    );
    assert!(requests.iter().all(|r| r.method.as_str() == "GET" || r.url.path().ends_with("token")), "nothing written");

    // An administrator merged them in Salesforce (15-character ids name them too): done.
    {
        let mut org = fixture.org();
        let mut dupe = org.contacts.remove(1);
        dupe.fields.insert("MasterRecordId".into(), json!(survivor));
        org.deleted_contacts.push(dupe);
    }
    crm.merge_contacts(survivor, "00300000000000DUPE").await.unwrap();
    crm.merge_contacts(&survivor[..15], "00300000000000DUPE").await.unwrap();

    // Merged into another contact: the message names it.
    fixture.org().deleted_contacts[0].fields.insert("MasterRecordId".into(), json!("00300000000000ANNA"));
    let error = crm.merge_contacts(survivor, "00300000000000DUPE").await.unwrap_err().to_string();
    assert!(error.contains("merged contact 00300000000000DUPE into 00300000000000ANNA"), "{error}");
    // Gone without a trace (purged): nothing left to move, done.
    crm.merge_contacts(survivor, "00300000000000PRGD").await.unwrap();
    // A survivor that was itself merged away, or never existed: an error.
    let error = crm.merge_contacts("00300000000000DUPE", survivor).await.unwrap_err().to_string();
    assert!(error.contains("was itself merged into 00300000000000ANNA"), "{error}");
    let error = crm.merge_contacts("00300000000000NONE", survivor).await.unwrap_err().to_string();
    assert!(error.contains("has no contact 00300000000000NONE"), "{error}");
    // One contact, or ids that cannot be Salesforce's: no request.
    let sent = fixture.requests().await.len();
    crm.merge_contacts(survivor, survivor).await.unwrap();
    assert!(crm.merge_contacts(survivor, "x").await.is_err());
    assert_eq!(fixture.requests().await.len(), sent);
}
