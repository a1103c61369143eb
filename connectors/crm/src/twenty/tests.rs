//! The Twenty sink against a stateful wiremock Twenty that follows the
//! server's documented shapes: batch upsert by id and unique fields in one
//! transaction, `{"data": {"create<Objects>": [...]}}` answers,
//! `{"statusCode", "error", "messages"}` refusals, soft deletes, the
//! metadata API.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tributary_sdk::{Author, Contribution, Crm, PlatformRollup};
use wiremock::{Mock, MockServer, Request, ResponseTemplate, matchers};

use super::*;

const KEY: &str = "tw-s3cr3t-api-key-0123456789";

#[derive(Default)]
struct State {
    people: Vec<Value>,
    notes: Vec<Value>,
    targets: Vec<Value>,
    /// (object metadata id, field name) created through the metadata API.
    fields: Vec<(String, String)>,
    next_id: u64,
    /// An older server: every REST `DELETE` is a soft delete, whatever
    /// `soft_delete` says.
    soft_delete_only: bool,
}

fn refusal(status: u16, error: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({ "statusCode": status, "error": error, "messages": [message] }))
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        for (name, value) in from {
            into.insert(name.clone(), value.clone());
        }
    }
}

fn lookup<'a>(record: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(record, |value, part| value.get(part))
}

impl State {
    fn table(&mut self, object: &str) -> Option<&mut Vec<Value>> {
        match object {
            "people" => Some(&mut self.people),
            "notes" => Some(&mut self.notes),
            "noteTargets" => Some(&mut self.targets),
            _ => None,
        }
    }

    /// `POST /rest/batch/{object}?upsert=true`: all records or none.
    fn batch(&mut self, object: &str, request: &Request) -> ResponseTemplate {
        if !request.url.query_pairs().any(|(name, value)| name == "upsert" && value == "true") {
            return refusal(400, "BadRequestException", "Record already exists");
        }
        let Ok(Value::Array(records)) = request.body_json::<Value>() else {
            return refusal(400, "BadRequestException", "Body must be an array");
        };
        if records.len() > BATCH_LIMIT {
            return refusal(400, "BadRequestException", "Maximum number of records to upsert is 60");
        }
        for record in &records {
            if let Some(email) = lookup(record, "emails.primaryEmail").and_then(Value::as_str)
                && !email.contains('@')
            {
                return refusal(400, "BadRequestException", &format!("Invalid email format: {email}"));
            }
        }
        let unique: &[&str] = match object {
            "people" => &["id", "emails.primaryEmail", "tributaryIdentity"],
            _ => &["id"],
        };
        let mut answer = Vec::new();
        for record in records {
            self.next_id += 1;
            let fresh = format!("00000000-0000-4000-8000-{:012}", self.next_id);
            let Some(table) = self.table(object) else {
                return refusal(400, "BadRequestException", "Object metadata not found");
            };
            let found = table.iter_mut().find(|existing| {
                unique.iter().any(|path| {
                    let wanted = lookup(&record, path).filter(|v| !v.is_null());
                    wanted.is_some() && lookup(existing, path) == wanted
                })
            });
            let stored = match found {
                Some(existing) => {
                    merge(existing, &record);
                    existing["deletedAt"] = Value::Null;
                    existing.clone()
                }
                None => {
                    let mut created = json!({ "id": fresh, "deletedAt": null });
                    merge(&mut created, &record);
                    table.push(created.clone());
                    created
                }
            };
            answer.push(stored);
        }
        let plural = format!("create{}{}", object[..1].to_uppercase(), &object[1..]);
        ResponseTemplate::new(201).set_body_json(json!({ "data": { plural: answer } }))
    }

    fn respond(&mut self, request: &Request) -> ResponseTemplate {
        let authorized = request
            .headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value == format!("Bearer {KEY}"));
        if !authorized {
            return refusal(401, "UnauthorizedException", "Token invalid.");
        }
        let path = request.url.path().to_owned();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (request.method.as_str(), parts.as_slice()) {
            ("POST", ["rest", "batch", object]) => self.batch(object, request),
            ("GET", ["rest", "people"]) => {
                let filter = request.url.query_pairs().find(|(name, _)| name == "filter").map(|(_, v)| v.to_string());
                let people: Vec<Value> = match filter.as_deref().and_then(|f| f.split_once("[eq]:")) {
                    Some((field, value)) => {
                        let value = value.trim_matches('"');
                        self.people
                            .iter()
                            .filter(|p| lookup(p, field).and_then(Value::as_str) == Some(value))
                            .cloned()
                            .collect()
                    }
                    None => self.people.iter().take(1).cloned().collect(),
                };
                ResponseTemplate::new(200)
                    .set_body_json(json!({ "data": { "people": people }, "totalCount": self.people.len() }))
            }
            ("PATCH", ["rest", "people", id]) => match self.people.iter_mut().find(|p| p["id"] == *id) {
                Some(person) => {
                    merge(person, &request.body_json::<Value>().unwrap_or_default());
                    ResponseTemplate::new(200).set_body_json(json!({ "data": { "updatePerson": person.clone() } }))
                }
                None => refusal(404, "NotFoundException", "Record not found"),
            },
            // As current servers do: a soft delete only with `soft_delete=true`,
            // else the record is destroyed (a soft-deleted one too).
            ("DELETE", ["rest", object @ ("notes" | "noteTargets"), id]) => {
                let soft = self.soft_delete_only
                    || request.url.query_pairs().any(|(name, value)| name == "soft_delete" && value == "true");
                let singular = if *object == "notes" { "Note" } else { "NoteTarget" };
                let Some(table) = self.table(object) else {
                    return refusal(404, "NotFoundException", "Cannot find route");
                };
                let Some(index) = table.iter().position(|n| n["id"] == *id && (!soft || n["deletedAt"].is_null()))
                else {
                    return refusal(404, "NotFoundException", "Record not found");
                };
                if soft {
                    table[index]["deletedAt"] = json!("2024-01-01T00:00:00.000Z");
                    return ResponseTemplate::new(200).set_body_json(
                        json!({ "data": { format!("delete{singular}"): { "id": id } }, "softDelete": true }),
                    );
                }
                table.remove(index);
                ResponseTemplate::new(200)
                    .set_body_json(json!({ "data": { format!("delete{singular}"): { "id": id } } }))
            }
            ("GET", ["rest", "noteTargets"]) => {
                let filter = request.url.query_pairs().find(|(name, _)| name == "filter").map(|(_, v)| v.to_string());
                let Some(note) = filter.as_deref().and_then(|f| f.strip_prefix("noteId[eq]:")) else {
                    return refusal(400, "BadRequestException", "filter expected");
                };
                let note = note.trim_matches('"');
                let targets: Vec<Value> =
                    self.targets.iter().filter(|t| t["noteId"] == note && t["deletedAt"].is_null()).cloned().collect();
                ResponseTemplate::new(200)
                    .set_body_json(json!({ "data": { "noteTargets": targets }, "totalCount": targets.len() }))
            }
            ("GET", ["rest", "people", id]) => {
                match self.people.iter().find(|p| p["id"] == *id && p["deletedAt"].is_null()) {
                    Some(person) => ResponseTemplate::new(200).set_body_json(json!({ "data": { "person": person } })),
                    None => refusal(404, "NotFoundException", "Record not found"),
                }
            }
            ("GET", ["rest", "metadata", "objects"]) => {
                let fields_of = |object: &str, standard: &[&str]| -> Vec<Value> {
                    let mut names: Vec<Value> = standard.iter().map(|name| json!({ "name": name })).collect();
                    names.extend(
                        self.fields.iter().filter(|(o, _)| o == object).map(|(_, name)| json!({ "name": name })),
                    );
                    names
                };
                let object = |id: &str, singular: &str, plural: &str, standard: &[&str]| {
                    let fields = fields_of(id, standard);
                    json!({ "id": id, "nameSingular": singular, "namePlural": plural, "fields": fields })
                };
                let objects = json!([
                    object("obj-company", "company", "companies", &["name"]),
                    object("obj-person", "person", "people", &["id", "name", "emails"]),
                    object("obj-note", "note", "notes", &["id", "title", "bodyV2"]),
                ]);
                ResponseTemplate::new(200).set_body_json(json!({ "data": { "objects": objects }, "totalCount": 3 }))
            }
            ("POST", ["rest", "metadata", "fields"]) => {
                let body = request.body_json::<Value>().unwrap_or_default();
                let object = body["objectMetadataId"].as_str().unwrap_or_default().to_owned();
                let name = body["name"].as_str().unwrap_or_default().to_owned();
                if self.fields.contains(&(object.clone(), name.clone())) {
                    return refusal(400, "BadRequestException", "Field already exists");
                }
                self.fields.push((object, name));
                ResponseTemplate::new(201).set_body_json(json!({ "data": { "createOneField": body } }))
            }
            _ => refusal(404, "NotFoundException", "Cannot find route"),
        }
    }
}

/// A fake Twenty and a sink pointed at it.
async fn fake_twenty() -> (MockServer, Arc<Mutex<State>>, TwentyCrm, tempfile::TempDir) {
    let server = MockServer::start().await;
    let state = Arc::new(Mutex::new(State::default()));
    let shared = state.clone();
    Mock::given(matchers::any())
        .respond_with(move |request: &Request| shared.lock().unwrap().respond(request))
        .mount(&server)
        .await;
    let (crm, dir) = sink(&server.uri());
    (server, state, crm, dir)
}

fn sink(base_url: &str) -> (TwentyCrm, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("twenty");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let config = TwentyConfig {
        api_key: SecretRef::File(key_file),
        base_url: Url::parse(base_url).unwrap(),
        field_prefix: "tributary".into(),
    };
    let options = HttpOptions {
        backoff_base: Duration::from_millis(5),
        max_retries: 2,
        max_inline_wait: Duration::from_secs(5),
        ..HttpOptions::default()
    };
    (TwentyCrm::new(config, options).unwrap(), dir)
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

fn contribution(external_id: &str, author: &str) -> Contribution {
    Contribution {
        external_id: external_id.into(),
        author: Author { id: author.into(), handle: Some(format!("user{author}")), ..Author::default() },
        ..Contribution::sample()
    }
}

fn activity(contribution: Contribution, contact_id: &str) -> ActivityUpsert {
    ActivityUpsert { key: contribution.activity_key(), contact_id: contact_id.into(), contribution, existing_id: None }
}

fn done<T: Clone + std::fmt::Debug>(outcomes: &[RecordOutcome<T>]) -> Vec<T> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            RecordOutcome::Done(value) => value.clone(),
            RecordOutcome::Rejected(message) => panic!("rejected: {message}"),
        })
        .collect()
}

/// Whether `actual` holds everything in `expected` (objects by subset,
/// arrays element by element).
fn holds(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(actual), Value::Object(expected)) => {
            expected.iter().all(|(name, value)| actual.get(name).is_some_and(|found| holds(found, value)))
        }
        (Value::Array(actual), Value::Array(expected)) => {
            actual.len() == expected.len() && actual.iter().zip(expected).all(|(a, e)| holds(a, e))
        }
        _ => actual == expected,
    }
}

/// The data-driven check of one request: method, path, query, the bearer
/// key, JSON headers and (a subset of) the body.
fn check(request: &Request, method: &str, path: &str, query: Option<&str>, body: Option<Value>) {
    let what = format!("{} {}", request.method, request.url);
    assert_eq!(request.method.as_str(), method, "{what}");
    assert_eq!(request.url.path(), path, "{what}");
    assert_eq!(request.url.query(), query, "{what}");
    let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert_eq!(header("authorization"), format!("Bearer {KEY}"), "{what}");
    assert_eq!(header("accept"), "application/json", "{what}");
    if let Some(expected) = body {
        assert_eq!(header("content-type"), "application/json", "{what}");
        let actual: Value = request.body_json().unwrap();
        assert!(holds(&actual, &expected), "{what}: {actual:#}\ndoes not hold {expected:#}");
    }
}

async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap_or_default()
}

fn rollup(contact_id: &str, count: u64) -> Rollup {
    Rollup {
        contact_id: contact_id.into(),
        last_contribution_at: DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap(),
        last_platform: "discourse".into(),
        contribution_count: count,
        platforms: vec!["discourse".into(), "github".into()],
        sentiment_avg: 0.125,
        questions: 1,
        complaints: 0,
        ideas: 0,
        praise: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn first_sync_writes_people_notes_targets_and_rollups() {
    let (server, state, crm, _dir) = fake_twenty().await;
    let contacts = [contact("discourse:1", Some(" Maya@Example.com "), "mayac"), contact("discourse:7", None, "sam")];
    let people = done(&crm.upsert_contacts(&contacts).await.unwrap());
    let anonymous = fields::person_id("discourse:7").to_string();
    assert_eq!(people[1], anonymous, "an e-mail-less author lands under the UUIDv5 of its identity");

    let first = contribution("100", "1");
    let second = contribution("101", "7");
    let activities = [activity(first.clone(), &people[0]), activity(second.clone(), &people[1])];
    let notes = done(&crm.upsert_activities(&activities).await.unwrap());
    assert_eq!(
        notes,
        [fields::note_id(&first.activity_key()).to_string(), fields::note_id(&second.activity_key()).to_string()]
    );
    done(&crm.update_rollups(&[rollup(&people[0], 3), rollup(&people[1], 1)]).await.unwrap());

    let sent = requests(&server).await;
    assert_eq!(sent.len(), 5, "one batch per object, one PATCH per person");
    check(
        &sent[0],
        "POST",
        "/rest/batch/people",
        Some("upsert=true"),
        Some(json!([
            { "emails": { "primaryEmail": "maya@example.com" }, "tributaryHandleDiscourse": "mayac",
              "tributaryUserIdDiscourse": "1", "tributaryProfileDiscourse": "https://community.example.com/u/mayac" },
            { "id": anonymous, "tributaryIdentity": "discourse:7", "name": { "firstName": "sam", "lastName": "" },
              "tributaryHandleDiscourse": "sam" },
        ])),
    );
    let people_sent: Value = sent[0].body_json().unwrap();
    assert!(people_sent[0].get("id").is_none() && people_sent[0].get("name").is_none(), "{people_sent}");
    check(
        &sent[1],
        "POST",
        "/rest/batch/notes",
        Some("upsert=true"),
        Some(json!([
            { "id": notes[0], "title": "Export to PDF?", "tributaryKey": first.activity_key(),
              "tributaryPlatform": "discourse", "tributaryUrl": "https://community.example.com/t/42",
              "tributaryIntent": "question", "tributarySentiment": 0.25 },
            { "id": notes[1], "tributaryKey": second.activity_key() },
        ])),
    );
    let note_sent: Value = sent[1].body_json().unwrap();
    let markdown = note_sent[0]["bodyV2"]["markdown"].as_str().unwrap();
    assert!(markdown.starts_with("Is there a way?\n\nI looked in settings."), "{markdown}");
    check(
        &sent[2],
        "POST",
        "/rest/batch/noteTargets",
        Some("upsert=true"),
        Some(json!([{ "noteId": notes[0], "personId": people[0] }, { "noteId": notes[1], "personId": people[1] }])),
    );
    let target_sent: Value = sent[2].body_json().unwrap();
    assert!(Uuid::parse_str(target_sent[0]["id"].as_str().unwrap()).is_ok());
    for (request, person, count) in [(&sent[3], &people[0], 3), (&sent[4], &people[1], 1)] {
        check(
            request,
            "PATCH",
            &format!("/rest/people/{person}"),
            None,
            Some(json!({
                "tributaryLastContributionAt": "2023-11-14T22:13:20.000Z", "tributaryLastPlatform": "discourse",
                "tributaryContributionCount": count, "tributaryPlatforms": "discourse;github",
                "tributarySentimentAvg": 0.125, "tributaryQuestions": 1, "tributaryPraise": 1,
                // Figures without a value are written empty, so none lingers.
                "tributaryLastUrl": null, "tributaryLastExcerpt": null, "tributaryContributions90d": 0,
                "tributarySentiment90d": null, "tributaryNeedsAttention": false, "tributaryAttentionReason": null,
            })),
        );
    }
    let state = state.lock().unwrap();
    assert_eq!((state.people.len(), state.notes.len(), state.targets.len()), (2, 2, 2));
    assert_eq!(state.people[0]["tributaryContributionCount"], 3);
}

#[tokio::test]
async fn a_replay_after_a_crash_lands_on_the_same_records() {
    let (server, state, crm, _dir) = fake_twenty().await;
    // An author known by hand in the CRM, with another id than ours.
    state.lock().unwrap().people.push(
        json!({ "id": "11111111-1111-4111-8111-111111111111", "emails": { "primaryEmail": "maya@example.com" } }),
    );
    let contacts = [contact("discourse:1", Some("maya@example.com"), "mayac"), contact("discourse:7", None, "sam")];
    let mut runs = Vec::new();
    for _ in 0..2 {
        // The daemon crashed before it kept the outcomes: it sends everything
        // again, without `existing_id`.
        let people = done(&crm.upsert_contacts(&contacts).await.unwrap());
        let activities =
            [activity(contribution("100", "1"), &people[0]), activity(contribution("101", "7"), &people[1])];
        let notes = done(&crm.upsert_activities(&activities).await.unwrap());
        runs.push((people, notes));
    }
    assert_eq!(runs[0], runs[1], "the same ids both times");
    assert_eq!(runs[0].0[0], "11111111-1111-4111-8111-111111111111", "matched by e-mail");
    assert_eq!(requests(&server).await.len(), 6);
    let state = state.lock().unwrap();
    assert_eq!((state.people.len(), state.notes.len(), state.targets.len()), (2, 2, 2), "nothing twice");
}

#[tokio::test]
async fn a_refused_record_is_rejected_with_twentys_message_and_the_rest_lands() {
    let (server, state, crm, _dir) = fake_twenty().await;
    let contacts = [
        contact("discourse:1", Some("a@example.com"), "a"),
        contact("discourse:2", Some("not-an-email"), "b"),
        contact("discourse:3", None, "c"),
        contact("discourse:4", Some("d@example.com"), "d"),
        contact(" ", None, "e"),
    ];
    let outcomes = crm.upsert_contacts(&contacts).await.unwrap();
    assert!(matches!(&outcomes[0], RecordOutcome::Done(_)), "{outcomes:?}");
    assert_eq!(outcomes[1], RecordOutcome::Rejected("Invalid email format: not-an-email".into()));
    assert_eq!(outcomes[2], RecordOutcome::Done(fields::person_id("discourse:3").to_string()));
    assert!(matches!(&outcomes[3], RecordOutcome::Done(_)), "{outcomes:?}");
    assert!(matches!(&outcomes[4], RecordOutcome::Rejected(m) if m.contains("neither")), "{outcomes:?}");
    assert_eq!(state.lock().unwrap().people.len(), 3);
    // The 4 records refused; [a, bad] refused; a alone landed, bad alone refused; [c, d] landed.
    assert_eq!(requests(&server).await.len(), 5);

    // An activity for a contact id Twenty cannot have is refused here; the other lands.
    let activities = [
        activity(contribution("1", "1"), "not-a-uuid"),
        activity(contribution("2", "3"), &fields::person_id("discourse:3").to_string()),
    ];
    let outcomes = crm.upsert_activities(&activities).await.unwrap();
    assert!(matches!(&outcomes[0], RecordOutcome::Rejected(m) if m.contains("not-a-uuid")), "{outcomes:?}");
    assert!(matches!(&outcomes[1], RecordOutcome::Done(_)), "{outcomes:?}");
    // A rollup for a person deleted in Twenty: Twenty's message.
    let outcomes = crm.update_rollups(&[rollup("22222222-2222-4222-8222-222222222222", 1)]).await.unwrap();
    assert_eq!(outcomes, [RecordOutcome::Rejected("Record not found".into())]);
}

#[tokio::test]
async fn the_rate_limit_signal_is_honoured() {
    let (server, _state, crm, _dir) = fake_twenty().await;
    Mock::given(matchers::method("POST"))
        .respond_with(refusal(429, "ThrottlerException", "Too many requests").insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    let started = Instant::now();
    let outcomes = crm.upsert_contacts(&[contact("discourse:7", None, "sam")]).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "a request left before Retry-After");
    assert_eq!(done(&outcomes).len(), 1);
    assert_eq!(requests(&server).await.len(), 2);

    // A wait longer than the client may spend inline goes back to the daemon.
    Mock::given(matchers::method("POST"))
        .respond_with(
            refusal(429, "ThrottlerException", &format!("slow down {KEY}")).insert_header("retry-after", "3600"),
        )
        .with_priority(1)
        .mount(&server)
        .await;
    let error = crm.upsert_contacts(&[contact("discourse:7", None, "sam")]).await.unwrap_err();
    assert!(error.retry_after().is_some_and(|wait| wait >= Duration::from_secs(3600)), "{error:?}");
    assert!(!format!("{error} {error:?}").contains(KEY), "{error:?}");
}

#[tokio::test]
async fn the_key_never_shows_in_errors_or_debug() {
    let server = MockServer::start().await;
    Mock::given(matchers::path("/rest/people"))
        .respond_with(refusal(401, "UnauthorizedException", &format!("Token invalid: {KEY}")))
        .mount(&server)
        .await;
    Mock::given(matchers::path("/rest/batch/people"))
        .respond_with(ResponseTemplate::new(500).set_body_string(format!("boom Bearer {KEY}")))
        .mount(&server)
        .await;
    let (crm, _dir) = sink(&server.uri());
    let auth = crm.check().await.unwrap_err();
    assert!(matches!(auth, CrmError::Auth(_)), "{auth:?}");
    let outage = crm.upsert_contacts(&[contact("discourse:7", None, "sam")]).await.unwrap_err();
    assert!(matches!(outage, CrmError::Http(HttpError::Status { status: 500, .. })), "{outage:?}");
    for shown in [format!("{auth} {auth:?}"), format!("{outage} {outage:?}"), format!("{crm:?}")] {
        assert!(!shown.contains(KEY), "{shown}");
    }
    assert!(format!("{auth}").contains("[redacted]"));
}

#[tokio::test]
async fn setup_is_idempotent() {
    let (server, state, crm, _dir) = fake_twenty().await;
    let platforms = ["discourse".to_owned(), "GitHub".to_owned()];
    let first = crm.setup(&platforms).await.unwrap();
    assert!(first.existing.is_empty(), "{first:?}");
    // Identity, per platform handle, id and profile, 15 rollups, per platform
    // first and last seen and count, the note fields.
    assert_eq!(first.created.len(), 1 + 2 * 3 + 15 + 2 * 3 + 5, "{first:?}");
    assert!(first.created.contains(&"person.tributaryHandleGithub".to_owned()));
    for name in ["tributaryNeedsAttention", "tributaryFirstSeenGithub", "tributaryContributionsDiscourse"] {
        assert!(first.created.contains(&format!("person.{name}")), "{name} not in {first:?}");
    }
    assert!(first.created.contains(&"note.tributaryKey".to_owned()));
    let sent = requests(&server).await;
    check(&sent[0], "GET", "/rest/metadata/objects", None, None);
    check(
        &sent[1],
        "POST",
        "/rest/metadata/fields",
        None,
        Some(json!({ "objectMetadataId": "obj-person", "type": "TEXT", "name": "tributaryIdentity",
                     "label": "Tributary identity", "isNullable": true, "isUnique": true })),
    );
    let at =
        sent.iter().find(|r| r.body_json::<Value>().is_ok_and(|b| b["name"] == "tributaryLastContributionAt")).unwrap();
    check(
        at,
        "POST",
        "/rest/metadata/fields",
        None,
        Some(json!({ "objectMetadataId": "obj-person", "type": "DATE_TIME" })),
    );
    let flag =
        sent.iter().find(|r| r.body_json::<Value>().is_ok_and(|b| b["name"] == "tributaryNeedsAttention")).unwrap();
    check(
        flag,
        "POST",
        "/rest/metadata/fields",
        None,
        Some(json!({ "objectMetadataId": "obj-person", "type": "BOOLEAN", "defaultValue": false })),
    );
    let seen =
        sent.iter().find(|r| r.body_json::<Value>().is_ok_and(|b| b["name"] == "tributaryLastSeenGithub")).unwrap();
    check(
        seen,
        "POST",
        "/rest/metadata/fields",
        None,
        Some(json!({ "type": "DATE_TIME", "label": "Last seen on GitHub" })),
    );
    let key = sent.iter().find(|r| r.body_json::<Value>().is_ok_and(|b| b["name"] == "tributaryKey")).unwrap();
    check(key, "POST", "/rest/metadata/fields", None, Some(json!({ "objectMetadataId": "obj-note", "type": "TEXT" })));

    let second = crm.setup(&platforms).await.unwrap();
    assert!(second.created.is_empty(), "{second:?}");
    assert_eq!(second.existing.len(), first.created.len());
    assert_eq!(requests(&server).await.len(), sent.len() + 1, "the second run only reads");
    assert_eq!(state.lock().unwrap().fields.len(), first.created.len());
}

#[tokio::test]
async fn archiving_soft_deletes_notes_and_a_missing_one_is_done() {
    let (server, state, crm, _dir) = fake_twenty().await;
    let person = done(&crm.upsert_contacts(&[contact("discourse:7", None, "sam")]).await.unwrap()).remove(0);
    let notes = done(&crm.upsert_activities(&[activity(contribution("1", "7"), &person)]).await.unwrap());
    let missing = "33333333-3333-4333-8333-333333333333".to_owned();
    let ids = [notes[0].clone(), missing.clone(), notes[0].clone(), "nope".to_owned()];
    let outcomes = crm.archive_activities(&ids).await.unwrap();
    assert_eq!(&outcomes[..3], [RecordOutcome::Done(()), RecordOutcome::Done(()), RecordOutcome::Done(())]);
    assert!(matches!(&outcomes[3], RecordOutcome::Rejected(_)), "{outcomes:?}");
    let sent = requests(&server).await;
    check(&sent[3], "DELETE", &format!("/rest/notes/{}", notes[0]), Some("soft_delete=true"), None);
    check(&sent[4], "DELETE", &format!("/rest/notes/{missing}"), Some("soft_delete=true"), None);
    assert_eq!(sent.len(), 6, "no request for an id Twenty cannot have");
    assert!(!state.lock().unwrap().notes[0]["deletedAt"].is_null(), "soft-deleted, still there");
}

#[tokio::test]
async fn contacts_are_found_by_email_or_handle() {
    let (server, _state, crm, _dir) = fake_twenty().await;
    let people = done(
        &crm.upsert_contacts(&[
            contact("discourse:1", Some("maya@example.com"), "mayac"),
            contact("discourse:7", None, "sam"),
        ])
        .await
        .unwrap(),
    );
    let by_email = crm.find_contact(&ContactLookup::Email("Maya@Example.com".into())).await.unwrap();
    assert_eq!(by_email.as_ref(), Some(&people[0]));
    let handle = ContactLookup::Handle { platform: "discourse".into(), handle: "sam".into() };
    assert_eq!(crm.find_contact(&handle).await.unwrap().as_ref(), Some(&people[1]));
    let nobody = ContactLookup::Handle { platform: "discourse".into(), handle: "nobody".into() };
    assert_eq!(crm.find_contact(&nobody).await.unwrap(), None);
    let quoted = ContactLookup::Handle { platform: "discourse".into(), handle: "a\"b".into() };
    assert_eq!(crm.find_contact(&quoted).await.unwrap(), None);
    let sent = requests(&server).await;
    assert_eq!(sent.len(), 4, "no request for a value the filter cannot quote");
    check(
        &sent[1],
        "GET",
        "/rest/people",
        Some("filter=emails.primaryEmail%5Beq%5D%3A%22maya%40example.com%22&limit=1"),
        None,
    );
    check(&sent[2], "GET", "/rest/people", Some("filter=tributaryHandleDiscourse%5Beq%5D%3A%22sam%22&limit=1"), None);
}

#[test]
fn config_reads_like_toml_and_build_errors_name_the_key() {
    let parsed: TwentyConfig = serde_json::from_value(json!({ "api_key": { "env": "TWENTY_API_KEY" } })).unwrap();
    assert_eq!(parsed.base_url.as_str(), "https://api.twenty.com/");
    assert_eq!(parsed.field_prefix, "tributary");
    for field in ["type", "token", "requests_per_second"] {
        let error = serde_json::from_value::<TwentyConfig>(json!({ "api_key": { "env": "T" }, field: "x" }))
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{error}");
    }
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, KEY).unwrap();
    let config = |prefix: &str, base: &str, key: &std::path::Path| TwentyConfig {
        api_key: SecretRef::File(key.to_path_buf()),
        base_url: Url::parse(base).unwrap(),
        field_prefix: prefix.into(),
    };
    for (prefix, base, key, named) in [
        ("", "https://api.twenty.com", key_file.clone(), "`field_prefix`"),
        ("Trib", "https://api.twenty.com", key_file.clone(), "`field_prefix`"),
        ("t_x", "https://api.twenty.com", key_file.clone(), "`field_prefix`"),
        ("tributary", "ftp://api.twenty.com", key_file.clone(), "`base_url`"),
        ("tributary", "https://api.twenty.com", dir.path().join("nope"), "`api_key`"),
    ] {
        let error = TwentyCrm::new(config(prefix, base, &key), HttpOptions::default()).unwrap_err().to_string();
        assert!(error.contains(named), "{prefix:?} {base}: {error}");
        assert!(!error.contains(KEY));
    }
    let crm = TwentyCrm::new(config("crm2", "http://localhost:3000", &key_file), HttpOptions::default()).unwrap();
    assert_eq!(crm.kind(), "twenty");
    assert_eq!(crm.url("/rest/people"), "http://localhost:3000/rest/people");
    assert_eq!(crm.scrub(&format!("echo {KEY}")), "echo [redacted]");
}

#[test]
fn answers_map_onto_inputs() {
    let input = |names: Names| BatchInput { record: json!({}), names };
    let inputs =
        [input(Names::Email("a@x.io".into())), input(Names::Id("id-2".into())), input(Names::Id("id-3".into()))];
    let outcome_ids = |records: Value| -> Vec<Option<String>> {
        let records = records_in(&records).unwrap();
        map_answer(&records, &inputs)
            .into_iter()
            .map(|written| match written {
                Written::Done(record) => record_id(&record),
                Written::Rejected(_) => None,
            })
            .collect()
    };
    let some = |ids: [&str; 3]| ids.map(|id| Some(id.to_owned())).to_vec();
    // By id and e-mail, whatever the order and the list's name.
    assert_eq!(
        outcome_ids(json!({ "data": { "people": [
                { "id": "id-3" }, { "id": "p1", "emails": { "primaryEmail": "A@x.io" } }, { "id": "id-2" },
            ] } })),
        some(["p1", "id-2", "id-3"])
    );
    // By position when nothing names them.
    assert_eq!(
        outcome_ids(json!({ "data": { "createPeople": [{ "id": "x" }, { "id": "id-2" }, { "id": "id-3" }] } })),
        some(["x", "id-2", "id-3"])
    );
    // A record missing from the answer is not silently Done.
    assert_eq!(outcome_ids(json!({ "data": [{ "id": "id-2" }] })), vec![None, Some("id-2".into()), None]);
    assert_eq!(
        records_in(&json!({ "data": { "objects": { "edges": [{ "node": { "id": "o" } }] } } })).unwrap(),
        [json!({ "id": "o" })]
    );
}

#[tokio::test]
async fn rollups_carry_every_figure_in_the_same_patch() {
    let (server, state, crm, _dir) = fake_twenty().await;
    let person = done(&crm.upsert_contacts(&[contact("discourse:7", None, "sam")]).await.unwrap()).remove(0);
    let at = |seconds: i64| DateTime::<Utc>::from_timestamp(seconds, 0).unwrap();
    let full = Rollup {
        last_url: Some("https://community.example.com/t/42".into()),
        last_excerpt: Some("Is there a way?\n\nI looked\tin settings.".into()),
        count_90d: 2,
        sentiment_avg_90d: Some(-0.123456),
        needs_attention: true,
        attention_reason: Some("an unresolved complaint".into()),
        per_platform: vec![PlatformRollup {
            platform: "discourse".into(),
            handle: Some("sam".into()),
            profile_url: None,
            first_seen: at(1_600_000_000),
            last_seen: at(1_700_000_000),
            contributions: 3,
        }],
        ..rollup(&person, 3)
    };
    done(&crm.update_rollups(&[full]).await.unwrap());
    let sent = requests(&server).await;
    assert_eq!(sent.len(), 2, "one PATCH for every figure");
    check(
        &sent[1],
        "PATCH",
        &format!("/rest/people/{person}"),
        None,
        Some(json!({
            "tributaryContributionCount": 3, "tributaryLastUrl": "https://community.example.com/t/42",
            "tributaryLastExcerpt": "Is there a way? I looked in settings.", "tributaryContributions90d": 2,
            "tributarySentiment90d": -0.1235, "tributaryNeedsAttention": true,
            "tributaryAttentionReason": "an unresolved complaint",
            "tributaryFirstSeenDiscourse": "2020-09-13T12:26:40.000Z",
            "tributaryLastSeenDiscourse": "2023-11-14T22:13:20.000Z", "tributaryContributionsDiscourse": 3,
        })),
    );
    // The next rollup without those values empties them.
    done(&crm.update_rollups(&[rollup(&person, 4)]).await.unwrap());
    let state = state.lock().unwrap();
    let stored = &state.people[0];
    assert_eq!(stored["tributaryNeedsAttention"], false);
    assert_eq!(stored["tributaryLastUrl"], Value::Null);
    assert_eq!(stored["tributaryAttentionReason"], Value::Null);
}

#[tokio::test]
async fn deleting_destroys_notes_and_their_targets_and_a_gone_one_is_done() {
    let (server, state, crm, _dir) = fake_twenty().await;
    let person = done(&crm.upsert_contacts(&[contact("discourse:7", None, "sam")]).await.unwrap()).remove(0);
    let activities = [activity(contribution("1", "7"), &person), activity(contribution("2", "7"), &person)];
    let notes = done(&crm.upsert_activities(&activities).await.unwrap());
    // One archived (soft-deleted) before: deleting destroys it too.
    done(&crm.archive_activities(&notes[1..]).await.unwrap());
    let before = requests(&server).await.len();
    let missing = "33333333-3333-4333-8333-333333333333".to_owned();
    let outcomes = crm.delete_activities(&[notes[0].clone(), notes[1].clone(), missing.clone(), "nope".into()]).await;
    let outcomes = outcomes.unwrap();
    assert_eq!(&outcomes[..3], [RecordOutcome::Done(()), RecordOutcome::Done(()), RecordOutcome::Done(())]);
    assert!(matches!(&outcomes[3], RecordOutcome::Rejected(m) if m.contains("nope")), "{outcomes:?}");
    {
        let state = state.lock().unwrap();
        assert!(state.notes.is_empty(), "destroyed, not soft-deleted: {:?}", state.notes);
        assert!(state.targets.is_empty(), "the links went first: {:?}", state.targets);
    }
    let sent = requests(&server).await;
    let target = fields::note_target_id(&Uuid::parse_str(&notes[0]).unwrap(), &Uuid::parse_str(&person).unwrap());
    let filter = format!("filter=noteId%5Beq%5D%3A%22{}%22&limit=60", notes[0]);
    check(&sent[before], "GET", "/rest/noteTargets", Some(&filter), None);
    check(&sent[before + 1], "DELETE", &format!("/rest/noteTargets/{target}"), Some("soft_delete=false"), None);
    check(&sent[before + 2], "DELETE", &format!("/rest/notes/{}", notes[0]), Some("soft_delete=false"), None);
    check(&sent[sent.len() - 1], "DELETE", &format!("/rest/notes/{missing}"), Some("soft_delete=false"), None);
    // Again: all gone, all done.
    let again = crm.delete_activities(&notes).await.unwrap();
    assert_eq!(again, [RecordOutcome::Done(()), RecordOutcome::Done(())]);
}

#[tokio::test]
async fn a_server_that_only_soft_deletes_is_not_taken_for_a_deletion() {
    let (_server, state, crm, _dir) = fake_twenty().await;
    let person = done(&crm.upsert_contacts(&[contact("discourse:7", None, "sam")]).await.unwrap()).remove(0);
    let notes = done(&crm.upsert_activities(&[activity(contribution("1", "7"), &person)]).await.unwrap());
    state.lock().unwrap().soft_delete_only = true;
    let outcomes = crm.delete_activities(&notes).await.unwrap();
    assert!(
        matches!(&outcomes[0], RecordOutcome::Rejected(m) if m.contains("only soft-deleted") && m.contains("archive")),
        "{outcomes:?}"
    );
    assert!(!state.lock().unwrap().notes[0]["deletedAt"].is_null());
}

#[tokio::test]
async fn contact_properties_read_fields_paths_and_related_records() {
    let (server, state, crm, _dir) = fake_twenty().await;
    let id = "44444444-4444-4444-8444-444444444444";
    state.lock().unwrap().people.push(json!({
        "id": id, "deletedAt": null, "jobTitle": "CTO", "city": "",
        "name": { "firstName": "Maya", "lastName": "Chen" },
        "emails": { "primaryEmail": "maya@example.com", "additionalEmails": null },
        "company": { "id": "c1", "name": "Acme" }, "lifecycleStage": "CUSTOMER",
        "tributaryContributionCount": 3, "tributaryNeedsAttention": true, "tributaryLastUrl": null,
        "tags": ["vip", "beta"],
    }));
    let names: Vec<String> = [
        "jobTitle",
        "city",
        "name",
        "name.firstName",
        "emails.primaryEmail",
        "company",
        "company.name",
        "LifecycleStage",
        "tributaryContributionCount",
        "tributaryNeedsAttention",
        "tributaryLastUrl",
        "noSuchField",
        "tags",
    ]
    .map(str::to_owned)
    .to_vec();
    let found = crm.contact_properties(id, &names).await.unwrap();
    let expected = [
        ("LifecycleStage", "CUSTOMER"),
        ("company", "Acme"),
        ("company.name", "Acme"),
        ("emails.primaryEmail", "maya@example.com"),
        ("jobTitle", "CTO"),
        ("name", "Maya Chen"),
        ("name.firstName", "Maya"),
        ("tags", "vip; beta"),
        ("tributaryContributionCount", "3"),
        ("tributaryNeedsAttention", "true"),
    ];
    assert_eq!(
        found,
        expected.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<std::collections::BTreeMap<_, _>>()
    );
    let sent = requests(&server).await;
    assert_eq!(sent.len(), 1, "one read");
    check(&sent[0], "GET", &format!("/rest/people/{id}"), None, None);
    let error = crm.contact_properties("55555555-5555-4555-8555-555555555555", &names).await.unwrap_err();
    assert!(error.to_string().contains("no person"), "{error}");
    assert!(matches!(crm.contact_properties("x", &names).await, Err(CrmError::Unsupported(_))));
}

#[tokio::test]
async fn merging_is_done_in_twenty_and_seen_afterwards() {
    let (server, state, crm, _dir) = fake_twenty().await;
    let people = done(
        &crm.upsert_contacts(&[contact("discourse:1", None, "maya"), contact("discourse:2", None, "maya2")])
            .await
            .unwrap(),
    );
    let error = crm.merge_contacts(&people[0], &people[1]).await.unwrap_err();
    assert!(matches!(error, CrmError::Unsupported(_)), "{error:?}");
    let message = error.to_string();
    for part in ["no documented merge", "Merge records", "`tributary identity link`", people[0].as_str()] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    // Merged in Twenty: the merged person is (soft-)deleted.
    state.lock().unwrap().people[1]["deletedAt"] = json!("2024-01-01T00:00:00.000Z");
    crm.merge_contacts(&people[0], &people[1]).await.unwrap();
    let error = crm.merge_contacts(&people[1], &people[0]).await.unwrap_err();
    assert!(error.to_string().contains("has no person"), "{error}");
    let sent = requests(&server).await.len();
    crm.merge_contacts(&people[0], &people[0]).await.unwrap();
    assert!(crm.merge_contacts(&people[0], "nope").await.is_err());
    assert_eq!(requests(&server).await.len(), sent, "no request for one person or a bad id");
    assert!(
        requests(&server).await.iter().skip(1).all(|r| r.method.as_str() == "GET"),
        "nothing but reads after the upsert"
    );
}
