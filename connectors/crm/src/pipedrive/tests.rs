//! The Pipedrive sink against a stateful wiremock Pipedrive that answers in
//! Pipedrive's documented shapes: `{"success": true, "data": ...}`, errors as
//! `{"success": false, "error": ..., "error_info": ...}`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::TimeZone;
use tributary_sdk::{Contribution, Intent, PlatformRollup, Signals};
use wiremock::{
    Mock, MockServer, Request, ResponseTemplate,
    matchers::{body_string_contains, method, path},
};

use super::*;

const TOKEN: &str = "pd-s3cr3t-token-0123456789";
const TIMEOUT: Duration = Duration::from_millis(400);
const INFO: &str = "Please check developers.pipedrive.com for more information about Pipedrive API.";

#[derive(Default)]
struct State {
    next_id: u64,
    /// name -> (key, field_type)
    fields: BTreeMap<String, (String, String)>,
    /// name -> the options of an `enum` or `set` field, `{id, label}`.
    options: BTreeMap<String, Vec<Value>>,
    next_option: u64,
    persons: BTreeMap<u64, Map<String, Value>>,
    notes: BTreeMap<u64, Value>,
}

/// The mock's state, shared by the catch-all responder and fault mocks.
#[derive(Clone, Default)]
struct Pipedrive(Arc<Mutex<State>>);

fn ok(status: u16, data: Value) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .insert_header("x-ratelimit-limit", "40")
        .insert_header("x-ratelimit-remaining", "39")
        .insert_header("x-ratelimit-reset", "2")
        .insert_header("x-daily-requests-left", "9999")
        .set_body_json(json!({ "success": true, "data": data, "additional_data": {
            "pagination": { "start": 0, "limit": 500, "more_items_in_collection": false } } }))
}

fn fail(status: u16, error: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "success": false, "error": error, "error_info": INFO, "data": null, "additional_data": null,
    }))
}

impl Pipedrive {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn handle(&self, request: &Request) -> ResponseTemplate {
        if request.headers.get("x-api-token").and_then(|v| v.to_str().ok()) != Some(TOKEN) {
            return fail(401, "unauthorized access");
        }
        let query: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        if query.contains_key("api_token") {
            return fail(400, "the token belongs in the x-api-token header in this mock");
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let segments: Vec<&str> = request.url.path().trim_start_matches("/api/v1/").split('/').collect();
        let mut state = self.state();
        let id = segments.get(1).and_then(|id| id.parse::<u64>().ok());
        match (request.method.as_str(), segments.as_slice()) {
            ("GET", ["users", "me"]) => ok(200, json!({ "id": 1, "name": "Tributary bot" })),
            ("GET", ["personFields"]) => {
                let mut list = vec![
                    json!({ "id": 1, "key": "name", "name": "Name", "field_type": "varchar" }),
                    json!({ "id": 2, "key": "email", "name": "Email", "field_type": "varchar" }),
                    json!({ "id": 3, "key": "phone", "name": "Phone", "field_type": "phone" }),
                    json!({ "id": 4, "key": "org_id", "name": "Organization", "field_type": "org" }),
                    json!({ "id": 5, "key": "owner_id", "name": "Owner", "field_type": "user" }),
                    json!({ "id": 6, "key": "label", "name": "Label", "field_type": "enum", "options": [
                        { "id": 5, "label": "Hot lead", "color": "red" },
                        { "id": 6, "label": "Customer", "color": "green" },
                    ] }),
                ];
                list.extend(state.fields.iter().map(|(name, (key, field_type))| {
                    let mut field = json!({ "id": 100, "key": key, "name": name, "field_type": field_type });
                    if let Some(options) = state.options.get(name) {
                        field["options"] = json!(options);
                    }
                    field
                }));
                ok(200, json!(list))
            }
            ("POST", ["personFields"]) => {
                let (Some(name), Some(field_type)) = (body["name"].as_str(), body["field_type"].as_str()) else {
                    return fail(400, "Name and field_type are required");
                };
                let key = hex::encode(sha2::Sha256::digest(name.as_bytes()))[..40].to_owned();
                state.fields.insert(name.to_owned(), (key.clone(), field_type.to_owned()));
                let labels: Vec<String> = body["options"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|option| option["label"].as_str().map(str::to_owned))
                    .collect();
                if matches!(field_type, "enum" | "set") && labels.is_empty() {
                    return fail(400, "Options are required for enum and set fields");
                }
                let mut options = Vec::new();
                for label in labels {
                    state.next_option += 1;
                    options.push(json!({ "id": 1000 + state.next_option, "label": label }));
                }
                state.options.insert(name.to_owned(), options.clone());
                ok(200, json!({ "id": 100, "key": key, "name": name, "field_type": field_type, "options": options }))
            }
            ("GET", ["persons", "search"]) => {
                let term = query.get("term").cloned().unwrap_or_default().to_lowercase();
                let custom: Vec<String> = state.fields.values().map(|(key, _)| key.clone()).collect();
                let items: Vec<Value> = state
                    .persons
                    .iter()
                    .filter(|(_, person)| match query.get("fields").map(String::as_str) {
                        Some("email") => person
                            .get("email")
                            .and_then(Value::as_array)
                            .is_some_and(|emails| emails.iter().any(|e| e["value"].as_str() == Some(term.as_str()))),
                        Some("custom_fields") => custom
                            .iter()
                            .any(|key| person.get(key).and_then(Value::as_str).map(str::to_lowercase) == Some(term.clone())),
                        _ => false,
                    })
                    .map(|(id, person)| json!({ "result_score": 1.0, "item": { "id": id, "type": "person", "name": person.get("name") } }))
                    .collect();
                ok(200, json!({ "items": items }))
            }
            ("GET", ["persons", _]) => match id.and_then(|id| state.persons.get(&id)) {
                Some(person) => ok(200, Value::Object(person.clone())),
                None => fail(404, "Person not found"),
            },
            ("POST", ["persons"]) => {
                if body["name"].as_str().is_none_or(str::is_empty) {
                    return fail(400, "Name must be given.");
                }
                state.next_id += 1;
                let id = state.next_id;
                let mut person = body.as_object().cloned().unwrap_or_default();
                person.insert("id".into(), json!(id));
                state.persons.insert(id, person.clone());
                ok(201, Value::Object(person))
            }
            ("PUT", ["persons", _]) => match id.and_then(|id| state.persons.get_mut(&id)) {
                Some(person) => {
                    person.extend(body.as_object().cloned().unwrap_or_default());
                    ok(200, Value::Object(person.clone()))
                }
                None => fail(404, "Person not found"),
            },
            ("PUT", ["persons", _, "merge"]) => {
                let (Some(id), Some(target)) = (id, body["merge_with_id"].as_u64()) else {
                    return fail(400, "merge_with_id is required");
                };
                if id == target {
                    return fail(400, "Cannot merge a person with itself");
                }
                if !state.persons.contains_key(&target) {
                    return fail(404, "Person not found");
                }
                let Some(merged) = state.persons.get(&id).cloned() else { return fail(404, "Person not found") };
                if merged.get("active_flag") == Some(&json!(false)) {
                    return fail(400, "Person is deleted");
                }
                state.persons.remove(&id);
                // The kept person's values win; its empty fields take the other's.
                let Some(kept) = state.persons.get_mut(&target) else { return fail(404, "Person not found") };
                for (field, value) in merged {
                    if field != "id" && kept.get(&field).is_none_or(Value::is_null) {
                        kept.insert(field, value);
                    }
                }
                let mut answer = kept.clone();
                answer.insert("merge_what_id".into(), json!(id));
                for note in state.notes.values_mut() {
                    if note["person_id"].as_u64() == Some(id) {
                        note["person_id"] = json!(target);
                    }
                }
                ok(200, Value::Object(answer))
            }
            ("GET", ["notes"]) => {
                let person: Option<u64> = query.get("person_id").and_then(|p| p.parse().ok());
                let notes: Vec<Value> =
                    state.notes.values().filter(|n| n["person_id"].as_u64() == person).cloned().collect();
                ok(200, json!(notes))
            }
            ("POST", ["notes"]) => {
                let person = body["person_id"].as_u64();
                if body["content"].as_str().is_none_or(str::is_empty) {
                    return fail(400, "Note content is required");
                }
                if person.is_none_or(|p| !state.persons.contains_key(&p)) {
                    return fail(400, "Person not found");
                }
                state.next_id += 1;
                let id = state.next_id;
                let note = json!({ "id": id, "content": body["content"], "person_id": person, "active_flag": true });
                state.notes.insert(id, note.clone());
                ok(201, note)
            }
            ("PUT", ["notes", _]) => match id.and_then(|id| state.notes.get_mut(&id)) {
                Some(note) => {
                    note["content"] = body["content"].clone();
                    note["person_id"] = body["person_id"].clone();
                    ok(200, note.clone())
                }
                None => fail(404, "Note not found"),
            },
            ("DELETE", ["notes", _]) => match id.and_then(|id| state.notes.remove(&id)) {
                Some(_) => ok(200, json!({ "id": id })),
                None => fail(404, "Note not found"),
            },
            _ => fail(404, "Unknown method ."),
        }
    }

    fn notes(&self) -> Vec<Value> {
        self.state().notes.values().cloned().collect()
    }

    fn person(&self, id: &str) -> Map<String, Value> {
        self.state().persons[&id.parse::<u64>().unwrap()].clone()
    }

    fn key(&self, field: &str) -> String {
        self.state().fields[field].0.clone()
    }
}

use sha2::Digest;

struct Harness {
    server: MockServer,
    /// Requests before this index are left out of `requests`.
    mark: std::sync::atomic::AtomicUsize,
    pipedrive: Pipedrive,
    crm: PipedriveCrm,
    _dir: tempfile::TempDir,
}

fn options() -> HttpOptions {
    HttpOptions { timeout: TIMEOUT, backoff_base: Duration::from_millis(5), max_retries: 3, ..HttpOptions::default() }
}

async fn start() -> Harness {
    let server = MockServer::start().await;
    let pipedrive = Pipedrive::default();
    let state = pipedrive.clone();
    Mock::given(wiremock::matchers::any())
        .respond_with(move |request: &Request| state.handle(request))
        .with_priority(10)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("pipedrive-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let config = PipedriveConfig {
        api_token: SecretRef::File(token_file),
        company_domain: None,
        base_url: Some(Url::parse(&format!("{}/api/v1", server.uri())).unwrap()),
    };
    let crm = new(config, options()).unwrap();
    Harness { server, mark: Default::default(), pipedrive, crm, _dir: dir }
}

/// A harness with Tributary's fields set up and the request log cleared.
async fn harness() -> Harness {
    let harness = start().await;
    harness.crm.setup(&["forum".into()]).await.unwrap();
    harness.mark().await;
    harness
}

impl Harness {
    /// Forgets the requests received so far.
    async fn mark(&self) {
        let seen = self.server.received_requests().await.unwrap().len();
        self.mark.store(seen, std::sync::atomic::Ordering::SeqCst);
    }

    /// The requests received since the last `mark`.
    async fn requests(&self) -> Vec<Request> {
        let skip = self.mark.load(std::sync::atomic::Ordering::SeqCst);
        self.server.received_requests().await.unwrap().into_iter().skip(skip).collect()
    }

    /// (method, path) of every request since the last `mark`, in order.
    async fn calls(&self) -> Vec<(String, String)> {
        self.requests()
            .await
            .iter()
            .map(|r| (r.method.to_string(), r.url.path().trim_start_matches("/api/v1").to_owned()))
            .collect()
    }

    async fn count(&self, verb: &str, route: &str) -> usize {
        self.calls().await.iter().filter(|(m, p)| m == verb && p == route).count()
    }

    /// A fault answered before the stateful mock, `times` times.
    async fn fault(&self, verb: &str, route: &str, contains: &str, times: u64, answer: ResponseTemplate) {
        Mock::given(method(verb))
            .and(path(format!("/api/v1{route}")))
            .and(body_string_contains(contains))
            .respond_with(answer)
            .up_to_n_times(times)
            .with_priority(1)
            .mount(&self.server)
            .await;
    }
}

fn contact(id: &str, email: Option<&str>, handle: &str) -> ContactUpsert {
    ContactUpsert {
        identity: format!("forum:{id}"),
        email: email.map(str::to_owned),
        platform: "forum".into(),
        handle: Some(handle.into()),
        display_name: Some(format!("{handle} name")),
        profile_url: Some(format!("https://community.example.com/u/{handle}")),
    }
}

fn activity(external_id: &str, contact_id: &str, body: &str) -> ActivityUpsert {
    let contribution = Contribution {
        platform: "forum".into(),
        external_id: external_id.into(),
        url: Some(format!("https://community.example.com/t/{external_id}")),
        body: body.into(),
        signals: Some(Signals { sentiment: -0.4, intent: Intent::Complaint, sentiment_skipped: None }),
        ..Contribution::sample()
    };
    ActivityUpsert { key: contribution.activity_key(), contact_id: contact_id.into(), contribution, existing_id: None }
}

fn rollup(contact_id: &str, count: u64) -> Rollup {
    Rollup {
        contact_id: contact_id.into(),
        last_contribution_at: Utc.with_ymd_and_hms(2024, 3, 9, 10, 0, 0).unwrap(),
        last_platform: "forum".into(),
        contribution_count: count,
        platforms: vec!["forum".into(), "social".into()],
        sentiment_avg: -0.25,
        questions: 1,
        complaints: 2,
        ideas: 0,
        praise: 0,
        ..Default::default()
    }
}

fn done<T: std::fmt::Debug>(outcomes: &[RecordOutcome<T>]) -> Vec<&T> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            RecordOutcome::Done(value) => value,
            other => panic!("not done: {other:?}"),
        })
        .collect()
}

/// Checks one recorded request: method, path, header, and JSON body fields
/// (`pointer`, expected value).
async fn check(harness: &Harness, index: usize, verb: &str, route: &str, body: &[(&str, Value)]) {
    let requests = harness.requests().await;
    let request = &requests[index];
    assert_eq!(request.method.as_str(), verb, "request {index}");
    assert_eq!(request.url.path(), format!("/api/v1{route}"), "request {index}");
    assert_eq!(request.headers.get("x-api-token").unwrap(), TOKEN, "request {index}");
    assert!(!request.url.as_str().contains(TOKEN), "token in the URL: {}", request.url);
    let sent: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    for (pointer, expected) in body {
        assert_eq!(sent.pointer(pointer), Some(expected), "request {index} {verb} {route} {pointer}: {sent}");
    }
}

#[tokio::test]
async fn pipedrive_setup_creates_fields_once_and_is_idempotent() {
    let h = start().await;
    let first = h.crm.setup(&["forum".into(), "social".into()]).await.unwrap();
    let expected = fields::person_fields(&["forum".into(), "social".into()]);
    assert_eq!(first.created.len(), expected.len(), "{first:?}");
    assert_eq!(expected.len(), 1 + 2 * 5 + fields::ROLLUP_FIELDS.len());
    assert!(first.existing.is_empty());
    for name in [
        "Tributary handle (social)",
        fields::LAST_URL,
        fields::LAST_EXCERPT,
        fields::COUNT_90D,
        fields::SENTIMENT_90D,
        fields::NEEDS_ATTENTION,
        fields::ATTENTION_REASON,
        "Tributary first seen (forum)",
        "Tributary last seen (social)",
        "Tributary contributions (social)",
    ] {
        assert!(first.created.contains(&format!("personFields/{name}")), "{name} not in {first:?}");
    }
    {
        let state = h.pipedrive.state();
        let field_type = |name: &str| state.fields[name].1.clone();
        assert_eq!(field_type(fields::LAST_URL), "text");
        assert_eq!(field_type(fields::ATTENTION_REASON), "varchar");
        assert_eq!(field_type(fields::COUNT_90D), "double");
        assert_eq!(field_type("Tributary first seen (forum)"), "date");
        assert_eq!(field_type(fields::NEEDS_ATTENTION), "enum");
        let labels: Vec<&str> =
            state.options[fields::NEEDS_ATTENTION].iter().filter_map(|o| o["label"].as_str()).collect();
        assert_eq!(labels, ["Yes", "No"]);
    }
    check(&h, 0, "GET", "/personFields", &[]).await;
    check(&h, 1, "POST", "/personFields", &[("/name", json!("Tributary identity")), ("/field_type", json!("varchar"))])
        .await;
    let count = h.crm.setup(&["forum".into(), "social".into()]).await.unwrap();
    assert!(count.created.is_empty(), "{count:?}");
    assert_eq!(count.existing.len(), first.created.len());
    assert_eq!(h.count("POST", "/personFields").await, first.created.len(), "nothing created twice");
    assert_eq!(h.pipedrive.state().options[fields::NEEDS_ATTENTION].len(), 2);
    h.crm.check().await.unwrap();
}

#[tokio::test]
async fn pipedrive_first_sync_writes_contacts_notes_and_rollups() {
    let h = harness().await;
    let contacts = [contact("7", Some("Maya@Example.com"), "mayac"), contact("8", None, "lurker")];
    let ids = h.crm.upsert_contacts(&contacts).await.unwrap();
    let ids: Vec<String> = done(&ids).into_iter().cloned().collect();
    let identity = h.pipedrive.key(fields::IDENTITY);
    let handle = h.pipedrive.key("Tributary handle (forum)");
    check(&h, 0, "GET", "/persons/search", &[]).await;
    check(
        &h,
        1,
        "POST",
        "/persons",
        &[
            ("/email/0/value", json!("maya@example.com")),
            ("/email/0/primary", json!(true)),
            ("/name", json!("mayac name")),
            (&format!("/{handle}"), json!("mayac")),
        ],
    )
    .await;
    check(&h, 3, "POST", "/persons", &[(&format!("/{identity}"), json!("forum:8")), ("/name", json!("lurker name"))])
        .await;
    let searches = h.requests().await;
    let query = |i: usize| searches[i].url.query().unwrap_or_default().to_owned();
    assert!(query(0).contains("term=maya%40example.com") && query(0).contains("fields=email"), "{}", query(0));
    assert!(query(2).contains("fields=custom_fields") && query(2).contains("exact_match=true"), "{}", query(2));

    h.mark().await;
    let hostile = activity("1", &ids[0], "<script>alert(1)</script> export is broken");
    let key = hostile.key.clone();
    let notes = h.crm.upsert_activities(&[hostile, activity("2", &ids[1], "hello")]).await.unwrap();
    let notes = done(&notes);
    assert_eq!(h.pipedrive.notes().len(), 2);
    check(&h, 0, "GET", "/notes", &[]).await;
    check(&h, 1, "POST", "/notes", &[("/person_id", json!(ids[0].parse::<u64>().unwrap()))]).await;
    let content = h.pipedrive.notes()[0]["content"].as_str().unwrap().to_owned();
    assert!(content.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !content.contains("<script"), "{content}");
    assert!(content.contains(&format!("[tributary-key:{key}]")), "{content}");
    assert!(content.contains("<a href=\"https://community.example.com/t/1\">"), "{content}");

    h.mark().await;
    let rolled = h.crm.update_rollups(&[rollup(&ids[0], 2)]).await.unwrap();
    done(&rolled);
    let count_key = h.pipedrive.key(fields::CONTRIBUTION_COUNT);
    let date_key = h.pipedrive.key(fields::LAST_CONTRIBUTION_AT);
    check(
        &h,
        0,
        "PUT",
        &format!("/persons/{}", ids[0]),
        &[
            (&format!("/{count_key}"), json!(2)),
            (&format!("/{date_key}"), json!("2024-03-09")),
            (&format!("/{}", h.pipedrive.key(fields::PLATFORMS)), json!("forum, social")),
            (&format!("/{}", h.pipedrive.key(fields::SENTIMENT_AVG)), json!(-0.25)),
        ],
    )
    .await;
    assert_eq!(h.pipedrive.person(&ids[0])["name"], "mayac name");
    assert_eq!(notes.len(), 2);
}

#[tokio::test]
async fn pipedrive_replay_after_a_crash_writes_nothing_twice() {
    let h = harness().await;
    let contacts = [contact("7", Some("maya@example.com"), "mayac"), contact("8", None, "lurker")];
    let first = h.crm.upsert_contacts(&contacts).await.unwrap();
    let ids: Vec<String> = done(&first).into_iter().cloned().collect();
    let activities = [activity("1", &ids[0], "first"), activity("2", &ids[1], "second")];
    let notes = h.crm.upsert_activities(&activities).await.unwrap();
    let note_ids: Vec<String> = done(&notes).into_iter().cloned().collect();

    // The same batch again, with the ids the ledger kept.
    h.mark().await;
    let again = h.crm.upsert_contacts(&contacts).await.unwrap();
    assert_eq!(done(&again), done(&first), "the same persons are found");
    let replay: Vec<ActivityUpsert> = activities
        .iter()
        .zip(&note_ids)
        .map(|(a, id)| ActivityUpsert { existing_id: Some(id.clone()), ..a.clone() })
        .collect();
    let replayed = h.crm.upsert_activities(&replay).await.unwrap();
    assert_eq!(done(&replayed), done(&notes));
    assert_eq!(h.count("POST", "/persons").await + h.count("POST", "/notes").await, 0, "{:?}", h.calls().await);
    assert_eq!(h.count("PUT", &format!("/notes/{}", note_ids[0])).await, 1);
    assert_eq!(h.pipedrive.notes().len(), 2);

    // The same batch without ledger ids: the marker search finds the notes.
    let blind = h.crm.upsert_activities(&activities).await.unwrap();
    assert_eq!(done(&blind), done(&notes));
    assert_eq!(h.pipedrive.state().persons.len(), 2);
    assert_eq!(h.pipedrive.notes().len(), 2);
}

#[tokio::test]
async fn pipedrive_ambiguous_timeout_then_replay_finds_the_note() {
    let h = harness().await;
    let ids = h.crm.upsert_contacts(&[contact("7", None, "mayac")]).await.unwrap();
    let person = done(&ids)[0].clone();
    // Pipedrive stores the note, but the answer comes too late.
    let state = h.pipedrive.clone();
    Mock::given(method("POST"))
        .and(path("/api/v1/notes"))
        .respond_with(move |request: &Request| state.handle(request).set_delay(TIMEOUT * 3))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&h.server)
        .await;
    let item = activity("1", &person, "slow");
    let error = h.crm.upsert_activities(std::slice::from_ref(&item)).await.unwrap_err();
    assert!(matches!(error, CrmError::Http(HttpError::Timeout { .. })), "{error:?}");
    assert_eq!(h.count("POST", "/notes").await, 1, "a POST is never retried blindly");
    assert_eq!(h.pipedrive.notes().len(), 1);

    // The daemon delivers again, without an id: nothing duplicated.
    let replayed = h.crm.upsert_activities(&[item]).await.unwrap();
    let stored = h.pipedrive.notes();
    assert_eq!(stored.len(), 1);
    assert_eq!(done(&replayed)[0], &stored[0]["id"].to_string());
    assert_eq!(h.count("POST", "/notes").await, 1);
}

#[tokio::test]
async fn pipedrive_partial_failure_rejects_one_record_with_pipedrives_message() {
    let h = harness().await;
    let ids = h.crm.upsert_contacts(&[contact("7", None, "mayac")]).await.unwrap();
    let person = done(&ids)[0].clone();
    h.fault("POST", "/notes", "poison", 1, fail(400, "Content is too long")).await;
    let batch = [activity("1", &person, "fine"), activity("2", &person, "poison"), activity("3", "abc", "x")];
    let outcomes = h.crm.upsert_activities(&batch).await.unwrap();
    assert!(matches!(&outcomes[0], RecordOutcome::Done(_)), "{outcomes:?}");
    assert_eq!(outcomes[1], RecordOutcome::Rejected(format!("Content is too long ({INFO})")));
    assert!(matches!(&outcomes[2], RecordOutcome::Rejected(m) if m.contains("not a Pipedrive person id")));
    assert_eq!(h.pipedrive.notes().len(), 1);

    // A rollup on a person deleted in Pipedrive, and archive with a gone note.
    let rolled = h.crm.update_rollups(&[rollup("999", 1), rollup(&person, 1)]).await.unwrap();
    assert_eq!(rolled[0], RecordOutcome::Rejected(format!("Person not found ({INFO})")));
    assert_eq!(rolled[1], RecordOutcome::Done(()));
    let note = done(&outcomes[..1])[0].clone();
    let archived = h.crm.archive_activities(&[note.clone(), note.clone(), "x".into()]).await.unwrap();
    assert_eq!(archived[..2], [RecordOutcome::Done(()), RecordOutcome::Done(())], "a 404 is done");
    assert!(matches!(&archived[2], RecordOutcome::Rejected(_)));
    assert!(h.pipedrive.notes().is_empty());
    assert_eq!(h.count("DELETE", &format!("/notes/{note}")).await, 2);
}

#[tokio::test]
async fn pipedrive_rate_limits_are_honoured() {
    let h = harness().await;
    let ids = h.crm.upsert_contacts(&[contact("7", None, "mayac")]).await.unwrap();
    let person = done(&ids)[0].clone();
    let over = |header: &str| {
        ResponseTemplate::new(429).insert_header(header, "1").set_body_json(json!({
            "success": false, "error": "Request over limit", "errorCode": 429, "error_info": INFO,
        }))
    };
    // A POST refused with 429 and Retry-After is sent again after the wait.
    h.fault("POST", "/notes", "", 1, over("retry-after")).await;
    let started = Instant::now();
    let outcomes = h.crm.upsert_activities(&[activity("1", &person, "a")]).await.unwrap();
    done(&outcomes);
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(h.count("POST", "/notes").await, 2);
    // A PUT refused with only the window's reset waits for it too.
    h.fault("PUT", &format!("/persons/{person}"), "", 1, over("x-ratelimit-reset")).await;
    let started = Instant::now();
    done(&h.crm.update_rollups(&[rollup(&person, 1)]).await.unwrap());
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());

    // The day's POST/PUT budget spent: nothing leaves before 00:00 UTC.
    let state = h.pipedrive.clone();
    Mock::given(method("PUT"))
        .respond_with(move |request: &Request| state.handle(request).insert_header("x-daily-requests-left", "0"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&h.server)
        .await;
    done(&h.crm.update_rollups(&[rollup(&person, 2)]).await.unwrap());
    let sent = h.calls().await.len();
    let error = h.crm.update_rollups(&[rollup(&person, 3)]).await.unwrap_err();
    let wait = error.retry_after().expect("a retry_after");
    let midnight = (next_midnight_utc(Utc::now()) - Utc::now()).to_std().unwrap();
    assert!(wait <= midnight + Duration::from_secs(1) && wait + Duration::from_secs(5) >= midnight, "{wait:?}");
    assert_eq!(h.calls().await.len(), sent, "no request while the day's budget is spent");
    assert!(!format!("{error} {error:?}").contains(TOKEN));
}

#[tokio::test]
async fn pipedrive_token_never_leaks_into_errors_debug_or_urls() {
    let h = harness().await;
    // A server that echoes the token back in its refusal.
    Mock::given(method("GET"))
        .and(path("/api/v1/users/me"))
        .respond_with(fail(401, &format!("invalid token {TOKEN}")))
        .with_priority(1)
        .mount(&h.server)
        .await;
    let error = h.crm.check().await.unwrap_err();
    assert!(matches!(error, CrmError::Auth(_)), "{error:?}");
    let shown = format!("{error} {error:?} {:?}", h.crm);
    assert!(!shown.contains(TOKEN) && shown.contains("[redacted]"), "{shown}");
    h.fault("POST", "/persons", "", 10, ResponseTemplate::new(500).set_body_string(TOKEN)).await;
    let error = h.crm.upsert_contacts(&[contact("9", None, "x")]).await.unwrap_err();
    assert!(!format!("{error} {error:?}").contains(TOKEN), "{error:?}");
    for request in h.requests().await {
        assert!(!request.url.as_str().contains(TOKEN), "{}", request.url);
    }
}

#[test]
fn pipedrive_config_reads_like_toml_and_building_checks_it() {
    let parsed: PipedriveConfig = serde_json::from_value(json!({
        "api_token": { "env": "PIPEDRIVE_API_TOKEN" }, "company_domain": "acme",
    }))
    .unwrap();
    assert_eq!(parsed.company_domain.as_deref(), Some("acme"));
    let unknown = serde_json::from_value::<PipedriveConfig>(json!({ "api_token": { "env": "T" }, "domain": "x" }));
    assert!(unknown.unwrap_err().to_string().contains("domain"));

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let config = |domain: Option<&str>, url: Option<&str>| PipedriveConfig {
        api_token: SecretRef::File(token_file.clone()),
        company_domain: domain.map(str::to_owned),
        base_url: url.map(|u| Url::parse(u).unwrap()),
    };
    let crm = new(config(Some("acme"), None), HttpOptions::default()).unwrap();
    assert_eq!(crm.kind(), "pipedrive");
    assert_eq!(crm.base_url.as_str(), "https://acme.pipedrive.com/api/v1");
    assert!(!format!("{crm:?}").contains(TOKEN));
    assert_eq!(crm.scrub(&format!("echo {TOKEN}")), "echo [redacted]");
    for (domain, url) in
        [(None, None), (Some("acme"), Some("https://x.example/api/v1")), (Some("acme.pipedrive.com"), None)]
    {
        let error = new(config(domain, url), HttpOptions::default()).unwrap_err();
        assert!(error.to_string().contains('`'), "{error}");
    }
    let ftp = new(config(None, Some("ftp://x.example/")), HttpOptions::default()).unwrap_err();
    assert!(ftp.to_string().contains("`base_url`"), "{ftp}");
    let missing = PipedriveConfig { api_token: SecretRef::File(dir.path().join("nope")), ..config(Some("a"), None) };
    assert!(new(missing, HttpOptions::default()).unwrap_err().to_string().contains("nope"));
    let now = Utc.with_ymd_and_hms(2024, 2, 28, 17, 30, 0).unwrap();
    assert_eq!(next_midnight_utc(now), Utc.with_ymd_and_hms(2024, 2, 29, 0, 0, 0).unwrap());
}

#[tokio::test]
async fn pipedrive_find_contact_by_email_and_by_handle_field() {
    let h = harness().await;
    let ids = h.crm.upsert_contacts(&[contact("7", Some("maya@example.com"), "mayac")]).await.unwrap();
    let maya = done(&ids)[0].clone();
    // Another person whose identity field holds the text searched as a handle.
    let mut other = contact("8", None, "someone");
    other.identity = "forum:8".into();
    done(&h.crm.upsert_contacts(&[other]).await.unwrap());
    for (lookup, expected) in [
        (ContactLookup::Email("MAYA@example.com".into()), Some(maya.clone())),
        (ContactLookup::Email("nobody@example.com".into()), None),
        (ContactLookup::Handle { platform: "forum".into(), handle: "mayac".into() }, Some(maya.clone())),
        (ContactLookup::Handle { platform: "forum".into(), handle: "forum:8".into() }, None),
        (ContactLookup::Handle { platform: "elsewhere".into(), handle: "mayac".into() }, None),
    ] {
        assert_eq!(h.crm.find_contact(&lookup).await.unwrap(), expected, "{lookup:?}");
    }
}

fn ids_of<T: Clone + std::fmt::Debug>(outcomes: &[RecordOutcome<T>]) -> Vec<T> {
    done(outcomes).into_iter().cloned().collect()
}

fn number(id: &str) -> u64 {
    id.parse().unwrap()
}

#[tokio::test]
async fn pipedrive_merge_moves_notes_to_the_survivor_and_merging_again_is_done() {
    let h = harness().await;
    let contacts = [contact("7", Some("maya@example.com"), "mayac"), contact("8", None, "maya_alt")];
    let ids = ids_of(&h.crm.upsert_contacts(&contacts).await.unwrap());
    let (survivor, merged) = (ids[0].clone(), ids[1].clone());
    let batch = [activity("1", &survivor, "one"), activity("2", &merged, "two"), activity("3", &merged, "three")];
    let mut notes = ids_of(&h.crm.upsert_activities(&batch).await.unwrap());
    notes.sort();

    h.mark().await;
    h.crm.merge_contacts(&survivor, &merged).await.unwrap();
    check(&h, 0, "PUT", &format!("/persons/{merged}/merge"), &[("/merge_with_id", json!(number(&survivor)))]).await;
    assert_eq!(h.calls().await.len(), 1, "one request: {:?}", h.calls().await);
    // The notes moved, none was copied: the same ids, all on the survivor.
    let stored = h.pipedrive.notes();
    let mut stored_ids: Vec<String> = stored.iter().map(|n| n["id"].to_string()).collect();
    stored_ids.sort();
    assert_eq!(stored_ids, notes);
    assert!(stored.iter().all(|n| n["person_id"] == json!(number(&survivor))), "{stored:?}");
    assert!(!h.pipedrive.state().persons.contains_key(&number(&merged)));
    assert_eq!(h.pipedrive.person(&survivor)["name"], "mayac name", "the survivor's values are kept");

    // Merging again: the merged person is gone and the survivor is there.
    h.mark().await;
    h.crm.merge_contacts(&survivor, &merged).await.unwrap();
    let calls = h.calls().await;
    let expected = [
        ("PUT", format!("/persons/{merged}/merge")),
        ("GET", format!("/persons/{survivor}")),
        ("GET", format!("/persons/{merged}")),
    ];
    assert_eq!(calls, expected.map(|(m, p)| (m.to_owned(), p)), "{calls:?}");
    assert_eq!(h.pipedrive.notes().len(), 3);

    // A person already deleted (inactive) counts as merged too.
    let inactive = 500u64;
    h.pipedrive.state().persons.insert(
        inactive,
        json!({ "id": inactive, "name": "gone", "active_flag": false }).as_object().cloned().unwrap(),
    );
    h.crm.merge_contacts(&survivor, &inactive.to_string()).await.unwrap();

    // A survivor that does not exist: Pipedrive's refusal, nothing changed.
    let error = h.crm.merge_contacts("999", &survivor).await.unwrap_err();
    assert!(matches!(error, CrmError::Http(HttpError::Status { status: 404, .. })), "{error:?}");
    assert!(h.pipedrive.state().persons.contains_key(&number(&survivor)));
    assert_eq!(h.pipedrive.notes().len(), 3);
    h.crm.merge_contacts(&survivor, &survivor).await.unwrap();
    let error = h.crm.merge_contacts("abc", &survivor).await.unwrap_err();
    assert!(matches!(error, CrmError::Unsupported(_)), "{error:?}");
}

#[tokio::test]
async fn pipedrive_delete_activities_deletes_notes_and_one_already_gone_is_done() {
    let h = harness().await;
    let person = ids_of(&h.crm.upsert_contacts(&[contact("7", None, "mayac")]).await.unwrap())[0].clone();
    let batch = [activity("1", &person, "one"), activity("2", &person, "two"), activity("3", &person, "three")];
    let notes = ids_of(&h.crm.upsert_activities(&batch).await.unwrap());
    h.mark().await;
    let deleted = h.crm.delete_activities(&[notes[0].clone(), notes[0].clone(), notes[1].clone(), "n/a".into()]).await;
    let deleted = deleted.unwrap();
    assert_eq!(deleted[..3], [RecordOutcome::Done(()), RecordOutcome::Done(()), RecordOutcome::Done(())]);
    assert!(matches!(&deleted[3], RecordOutcome::Rejected(m) if m.contains("not a Pipedrive note id")), "{deleted:?}");
    assert_eq!(h.count("DELETE", &format!("/notes/{}", notes[0])).await, 2);
    let left: Vec<String> = h.pipedrive.notes().iter().map(|n| n["id"].to_string()).collect();
    assert_eq!(left, [notes[2].clone()]);
}

#[tokio::test]
async fn pipedrive_contact_properties_reads_keys_and_field_names_as_text() {
    let h = start().await;
    {
        // Two custom fields of the account, with options.
        let mut state = h.pipedrive.state();
        state.fields.insert("Lifecycle stage".into(), ("a1b2c3lifecycle".into(), "enum".into()));
        state.options.insert(
            "Lifecycle stage".into(),
            vec![json!({ "id": 31, "label": "Lead" }), json!({ "id": 32, "label": "Customer" })],
        );
        state.fields.insert("Interests".into(), ("d4e5f6interests".into(), "set".into()));
        state.options.insert(
            "Interests".into(),
            vec![json!({ "id": 41, "label": "Exports" }), json!({ "id": 42, "label": "API" })],
        );
    }
    h.crm.setup(&["forum".into()]).await.unwrap();
    let person = ids_of(&h.crm.upsert_contacts(&[contact("7", Some("maya@example.com"), "mayac")]).await.unwrap());
    let person = person[0].clone();
    {
        let mut state = h.pipedrive.state();
        let row = state.persons.get_mut(&number(&person)).unwrap();
        for (key, value) in [
            ("org_name", json!("Acme Corp")),
            ("org_id", json!({ "name": "Acme Corp", "people_count": 3, "value": 41 })),
            ("owner_id", json!({ "id": 9, "name": "Sam Seller", "email": "sam@acme.example", "value": 9 })),
            ("label", json!(6)),
            (
                "email",
                json!([{ "value": "old@example.com", "primary": false }, { "value": "maya@example.com", "primary": true }]),
            ),
            ("phone", json!([{ "value": "", "primary": true }])),
            ("a1b2c3lifecycle", json!("32")),
            ("d4e5f6interests", json!("41,42")),
            ("visible_to", json!("3")),
        ] {
            row.insert(key.into(), value);
        }
    }
    h.mark().await;
    let names: Vec<String> = [
        "org_name",
        "Organization",
        "owner_id",
        "Label",
        "label",
        "Email",
        "phone",
        "Lifecycle stage",
        "INTERESTS",
        "Tributary handle (forum)",
        "visible_to",
        "nope",
        " ",
    ]
    .map(str::to_owned)
    .to_vec();
    let read = h.crm.contact_properties(&person, &names).await.unwrap();
    let expected: BTreeMap<String, String> = [
        ("INTERESTS", "Exports, API"),
        ("Email", "maya@example.com"),
        ("Label", "Customer"),
        ("Lifecycle stage", "Customer"),
        ("Organization", "Acme Corp"),
        ("Tributary handle (forum)", "mayac"),
        ("label", "Customer"),
        ("org_name", "Acme Corp"),
        ("owner_id", "Sam Seller"),
        ("visible_to", "3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(read, expected);
    assert_eq!(h.calls().await, [("GET".to_owned(), format!("/persons/{person}"))], "the fields come from the cache");

    assert!(h.crm.contact_properties(&person, &[]).await.unwrap().is_empty());
    let error = h.crm.contact_properties("999", &names).await.unwrap_err();
    assert!(matches!(error, CrmError::Http(HttpError::Status { status: 404, .. })), "{error:?}");
    let error = h.crm.contact_properties("x", &names).await.unwrap_err();
    assert!(matches!(error, CrmError::Unsupported(_)), "{error:?}");
}

#[tokio::test]
async fn pipedrive_rollup_writes_the_new_figures_in_one_update_and_clears_stale_ones() {
    let h = harness().await;
    let person = ids_of(&h.crm.upsert_contacts(&[contact("7", None, "mayac")]).await.unwrap())[0].clone();
    let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 10, 0, 0).unwrap();
    let platform = |name: &str, contributions| PlatformRollup {
        platform: name.into(),
        handle: Some("mayac".into()),
        profile_url: None,
        first_seen: at(2023, 1, 2),
        last_seen: at(2024, 3, 9),
        contributions,
    };
    let full = Rollup {
        last_url: Some("https://community.example.com/t/1".into()),
        last_excerpt: Some("  Export\nis   broken\r\nagain ".into()),
        count_90d: 4,
        sentiment_avg_90d: Some(-0.612_345),
        needs_attention: true,
        attention_reason: Some(format!("an unresolved complaint\n{}", "x".repeat(400))),
        // `social` has no fields in this account (setup saw only `forum`).
        per_platform: vec![platform("forum", 5), platform("social", 2)],
        ..rollup(&person, 7)
    };
    let option = |label: &str| {
        let state = h.pipedrive.state();
        let options = &state.options[fields::NEEDS_ATTENTION];
        options.iter().find(|o| o["label"] == label).map(|o| o["id"].clone()).unwrap()
    };
    let (yes, no) = (option("Yes"), option("No"));
    let key = |name: &str| format!("/{}", h.pipedrive.key(name));

    h.mark().await;
    done(&h.crm.update_rollups(std::slice::from_ref(&full)).await.unwrap());
    assert_eq!(h.calls().await, [("PUT".to_owned(), format!("/persons/{person}"))], "one update");
    check(
        &h,
        0,
        "PUT",
        &format!("/persons/{person}"),
        &[
            (&key(fields::CONTRIBUTION_COUNT), json!(7)),
            (&key(fields::LAST_URL), json!("https://community.example.com/t/1")),
            (&key(fields::LAST_EXCERPT), json!("Export is broken again")),
            (&key(fields::COUNT_90D), json!(4)),
            (&key(fields::SENTIMENT_90D), json!(-0.6123)),
            (&key(fields::NEEDS_ATTENTION), yes.clone()),
            (&key("Tributary first seen (forum)"), json!("2023-01-02")),
            (&key("Tributary last seen (forum)"), json!("2024-03-09")),
            (&key("Tributary contributions (forum)"), json!(5)),
        ],
    )
    .await;
    let sent: Value = serde_json::from_slice(&h.requests().await[0].body).unwrap();
    assert_eq!(sent.as_object().unwrap().len(), fields::ROLLUP_FIELDS.len() + 3, "{sent}");
    let reason = sent[h.pipedrive.key(fields::ATTENTION_REASON)].as_str().unwrap().to_owned();
    assert!(reason.starts_with("an unresolved complaint xxx") && reason.ends_with('…'), "{reason}");
    assert!(reason.chars().count() <= 255 && !reason.contains('\n'), "{reason}");

    // Without the optional figures: the old values are cleared, not kept.
    h.mark().await;
    done(&h.crm.update_rollups(&[rollup(&person, 8)]).await.unwrap());
    check(
        &h,
        0,
        "PUT",
        &format!("/persons/{person}"),
        &[
            (&key(fields::LAST_URL), Value::Null),
            (&key(fields::LAST_EXCERPT), Value::Null),
            (&key(fields::COUNT_90D), json!(0)),
            (&key(fields::SENTIMENT_90D), Value::Null),
            (&key(fields::NEEDS_ATTENTION), no.clone()),
            (&key(fields::ATTENTION_REASON), Value::Null),
        ],
    )
    .await;
    let stored = h.pipedrive.person(&person);
    assert_eq!(stored[&h.pipedrive.key(fields::LAST_URL)], Value::Null);
    assert_eq!(stored[&h.pipedrive.key(fields::NEEDS_ATTENTION)], no);
    assert_eq!(stored[&h.pipedrive.key("Tributary contributions (forum)")], json!(5), "per platform: as last sent");
}
