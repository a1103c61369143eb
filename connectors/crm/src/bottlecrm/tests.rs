//! The BottleCRM sink against a stateful wiremock BottleCRM answering in the
//! shapes a real django-crm 1.35 server gave: `POST /api/contacts/` ->
//! `{"error": false, "message": "Contact created Successfuly", "id": ".."}`,
//! refusals as 400 `{"error": true, "errors": {"field": ["message"]}}`, a
//! wrong token as 403 `{"detail": ".."}`, comments listed by
//! `POST`/`GET /api/contacts/{id}/`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tributary_sdk::{Contribution, PlatformRollup};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use super::*;

const TOKEN: &str = "bcrm_pat_s3cr3t0123456789abcdef";

#[derive(Default)]
struct State {
    next: u64,
    fields: Vec<String>,
    /// key -> field_type of the custom field definitions.
    field_types: BTreeMap<String, String>,
    contacts: BTreeMap<String, Value>,
    /// comment id -> (contact id, text)
    comments: BTreeMap<String, (String, String)>,
}

#[derive(Clone, Default)]
struct Bottle(Arc<Mutex<State>>);

fn answer(status: u16, body: Value) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(body)
}

fn uuid(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

impl Bottle {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn comments_of(state: &State, contact: &str) -> Value {
        let list: Vec<Value> = state
            .comments
            .iter()
            .filter(|(_, (c, _))| c == contact)
            .map(|(id, (c, text))| json!({ "id": id, "comment": text, "content_type": "contact", "object_id": c, "is_internal": false }))
            .collect();
        json!(list)
    }

    fn handle(&self, request: &Request) -> ResponseTemplate {
        let auth = request.headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            return answer(403, json!({ "detail": "Organization context is required. Please login again." }));
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let query: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        let path = request.url.path().trim_start_matches("/api/").to_owned();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let mut state = self.state();
        match (request.method.as_str(), segments.as_slice()) {
            ("GET", ["custom-fields"]) => {
                let definitions: Vec<Value> = state
                    .fields
                    .iter()
                    .map(|key| json!({ "id": uuid(1), "target_model": "Contact", "key": key, "is_active": true }))
                    .collect();
                answer(200, json!({ "definitions": definitions, "totals": null }))
            }
            ("POST", ["custom-fields"]) => {
                let key = body["key"].as_str().unwrap_or_default().to_owned();
                if state.fields.contains(&key) {
                    let message = format!("a Contact field with key '{key}' already exists");
                    return answer(400, json!({ "error": true, "errors": { "key": [message] } }));
                }
                let field_type = body["field_type"].as_str().unwrap_or_default().to_owned();
                if !["text", "textarea", "number", "checkbox", "date", "dropdown"].contains(&field_type.as_str()) {
                    return answer(400, json!({ "error": true, "errors": { "field_type": ["not a valid choice"] } }));
                }
                state.field_types.insert(key.clone(), field_type);
                state.fields.push(key);
                answer(201, body)
            }
            ("GET", ["contacts"]) => {
                let results: Vec<Value> = state
                    .contacts
                    .values()
                    .filter(|c| {
                        query.iter().all(|(k, v)| match k.as_str() {
                            "email" => {
                                c["email"].as_str().is_some_and(|e| e.to_lowercase().contains(&v.to_lowercase()))
                            }
                            "limit" => true,
                            cf => c["custom_fields"][cf.trim_start_matches("cf_")].as_str() == Some(v.as_str()),
                        })
                    })
                    .cloned()
                    .collect();
                answer(200, json!({ "count": results.len(), "results": results, "offset": 0 }))
            }
            ("POST", ["contacts"]) => {
                let mut errors = Map::new();
                for name in ["first_name", "last_name"] {
                    if body[name].as_str().is_none_or(|n| n.trim().is_empty()) {
                        errors.insert(name.into(), json!(["This field may not be blank."]));
                    }
                }
                let email = body["email"].as_str().map(str::to_lowercase);
                if let Some(email) = &email {
                    if !email.contains('@') {
                        errors.insert("email".into(), json!(["Enter a valid email address."]));
                    } else if state.contacts.values().any(|c| c["email"].as_str() == Some(email)) {
                        errors.insert("email".into(), json!(["Contact already exists with this email"]));
                    }
                }
                if !errors.is_empty() {
                    return answer(400, json!({ "error": true, "errors": errors }));
                }
                state.next += 1;
                let id = uuid(1000 + state.next);
                let mut fields = body["custom_fields"].as_object().cloned().unwrap_or_default();
                fields.retain(|k, _| state.fields.contains(k));
                state.contacts.insert(
                    id.clone(),
                    json!({ "id": id, "first_name": body["first_name"], "last_name": body["last_name"],
                            "email": email, "custom_fields": fields }),
                );
                answer(200, json!({ "error": false, "message": "Contact created Successfuly", "id": id }))
            }
            ("GET", ["contacts", id]) | ("POST", ["contacts", id]) | ("PATCH", ["contacts", id]) => {
                let id = (*id).to_owned();
                if !state.contacts.contains_key(&id) {
                    return answer(404, json!({ "detail": "No Contact matches the given query." }));
                }
                match request.method.as_str() {
                    "PATCH" => {
                        let known = state.fields.clone();
                        if let Some(contact) = state.contacts.get_mut(&id)
                            && let Some(fields) = body["custom_fields"].as_object()
                        {
                            for (k, v) in fields.iter().filter(|(k, _)| known.contains(k)) {
                                // As `common/custom_fields.py`: null or "" removes the value.
                                if v.is_null() || *v == json!("") {
                                    if let Some(stored) = contact["custom_fields"].as_object_mut() {
                                        stored.remove(k);
                                    }
                                } else {
                                    contact["custom_fields"][k] = v.clone();
                                }
                            }
                        }
                        answer(200, json!({ "error": false, "message": "Contact Updated Successfully" }))
                    }
                    method => {
                        if method == "POST" {
                            let text = body["comment"].as_str().unwrap_or_default().to_owned();
                            if text.chars().count() > 10_000 {
                                return answer(
                                    400,
                                    json!({ "error": true, "errors": {
                                    "comment": ["Ensure this field has no more than 10000 characters."] } }),
                                );
                            }
                            state.next += 1;
                            let comment = uuid(5000 + state.next);
                            state.comments.insert(comment, (id.clone(), text));
                        }
                        let comments = Self::comments_of(&state, &id);
                        answer(
                            200,
                            json!({ "contact_obj": state.contacts[&id], "comments": comments, "attachments": [] }),
                        )
                    }
                }
            }
            ("PATCH", ["contacts", "comment", id]) | ("DELETE", ["contacts", "comment", id]) => {
                let id = (*id).to_owned();
                if !state.comments.contains_key(&id) {
                    return answer(404, json!({ "detail": "No such Comment." }));
                }
                if request.method.as_str() == "DELETE" {
                    state.comments.remove(&id);
                    return answer(200, json!({ "error": false, "message": "Comment Deleted Successfully" }));
                }
                if let Some(entry) = state.comments.get_mut(&id) {
                    entry.1 = body["comment"].as_str().unwrap_or_default().to_owned();
                }
                answer(200, json!({ "error": false, "message": "Comment Updated" }))
            }
            _ => answer(404, json!({ "detail": "Not found." })),
        }
    }
}

struct Harness {
    server: MockServer,
    bottle: Bottle,
    crm: BottleCrm,
}

fn options() -> HttpOptions {
    HttpOptions {
        timeout: Duration::from_millis(500),
        backoff_base: Duration::from_millis(5),
        max_retries: 2,
        ..HttpOptions::default()
    }
}

fn build(server: &MockServer, token: &str) -> BottleCrm {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{token}\n")).unwrap();
    let config = BottleCrmConfig {
        base_url: Url::parse(&server.uri()).unwrap(),
        api_key: SecretRef::File(file.path().to_owned()),
    };
    BottleCrm::new(config, options()).unwrap()
}

async fn harness() -> Harness {
    let server = MockServer::start().await;
    let bottle = Bottle::default();
    let state = bottle.clone();
    Mock::given(wiremock::matchers::any())
        .respond_with(move |request: &Request| state.handle(request))
        .mount(&server)
        .await;
    let crm = build(&server, TOKEN);
    Harness { server, bottle, crm }
}

impl Harness {
    async fn posts(&self) -> usize {
        self.server.received_requests().await.unwrap().iter().filter(|r| r.method.as_str() == "POST").count()
    }
}

fn contact(id: &str, email: Option<&str>, handle: &str) -> ContactUpsert {
    ContactUpsert {
        identity: format!("forum:{id}"),
        email: email.map(str::to_owned),
        platform: "forum".into(),
        handle: Some(handle.into()),
        display_name: None,
        profile_url: Some(format!("https://community.example.com/u/{handle}")),
    }
}

fn activity(key: &str, contact_id: &str, existing_id: Option<&str>) -> ActivityUpsert {
    ActivityUpsert {
        key: key.into(),
        contact_id: contact_id.into(),
        contribution: Contribution::sample(),
        existing_id: existing_id.map(str::to_owned),
    }
}

fn done<T: Clone + std::fmt::Debug>(outcomes: &[RecordOutcome<T>]) -> Vec<T> {
    outcomes
        .iter()
        .map(|o| match o {
            RecordOutcome::Done(v) => v.clone(),
            RecordOutcome::Rejected(m) => panic!("rejected: {m}"),
        })
        .collect()
}

#[tokio::test]
async fn bottlecrm_first_sync_then_replay_creates_nothing_twice() {
    let h = harness().await;
    let contacts = [contact("1", Some("Maya@Example.com"), "maya"), contact("2", None, "rustacean_42")];
    let ids = done(&h.crm.upsert_contacts(&contacts).await.unwrap());
    assert_eq!(h.bottle.state().contacts.len(), 2);
    {
        let state = h.bottle.state();
        let anonymous = &state.contacts[&ids[1]];
        assert_eq!(anonymous["custom_fields"][IDENTITY_FIELD], "forum:2");
        assert_eq!(anonymous["first_name"], "rustacean_42");
        assert_eq!(anonymous["last_name"], "(forum)");
        assert_eq!(state.contacts[&ids[0]]["email"], "maya@example.com");
        assert_eq!(state.contacts[&ids[0]]["custom_fields"]["tributary_handle_forum"], "maya");
    }
    let activities = [activity("a1", &ids[0], None), activity("a2", &ids[1], None), activity("a3", &ids[0], None)];
    let comment_ids = done(&h.crm.upsert_activities(&activities).await.unwrap());
    assert_eq!(h.bottle.state().comments.len(), 3);
    assert!(h.bottle.state().comments[&comment_ids[0]].1.ends_with("[tributary-key:a1]"));

    // A replay, as after a crash that lost the outcomes: found, not created.
    let posts = h.posts().await;
    assert_eq!(done(&h.crm.upsert_contacts(&contacts).await.unwrap()), ids);
    assert_eq!(done(&h.crm.upsert_activities(&activities).await.unwrap()), comment_ids);
    // With the ledger's ids: updated in place.
    let known: Vec<_> =
        activities.iter().zip(&comment_ids).map(|(a, id)| activity(&a.key, &a.contact_id, Some(id))).collect();
    assert_eq!(done(&h.crm.upsert_activities(&known).await.unwrap()), comment_ids);
    assert_eq!(h.posts().await, posts, "a replay must not create anything");
    assert_eq!(h.bottle.state().contacts.len(), 2);
    assert_eq!(h.bottle.state().comments.len(), 3);

    // A comment deleted in BottleCRM is written again; archive deletes, twice is fine.
    h.bottle.state().comments.remove(&comment_ids[1]);
    let again = done(&h.crm.upsert_activities(&known[1..2]).await.unwrap());
    assert_ne!(again[0], comment_ids[1]);
    assert_eq!(h.bottle.state().comments.len(), 3);
    let archived = h.crm.archive_activities(&[again[0].clone(), again[0].clone()]).await.unwrap();
    assert_eq!(archived, vec![RecordOutcome::Done(()), RecordOutcome::Done(())]);
    assert_eq!(h.bottle.state().comments.len(), 2);

    // Lookups and rollups.
    assert_eq!(
        h.crm.find_contact(&ContactLookup::Email("maya@example.com".into())).await.unwrap(),
        Some(ids[0].clone())
    );
    let by_handle = ContactLookup::Handle { platform: "forum".into(), handle: "rustacean_42".into() };
    assert_eq!(h.crm.find_contact(&by_handle).await.unwrap(), Some(ids[1].clone()));
    let rollup = Rollup {
        contact_id: ids[0].clone(),
        last_contribution_at: chrono::Utc::now(),
        last_platform: "forum".into(),
        contribution_count: 2,
        platforms: vec!["forum".into()],
        sentiment_avg: 0.25,
        questions: 1,
        complaints: 0,
        ideas: 0,
        praise: 1,
        ..Default::default()
    };
    assert_eq!(h.crm.update_rollups(&[rollup]).await.unwrap(), vec![RecordOutcome::Done(())]);
    assert_eq!(h.bottle.state().contacts[&ids[0]]["custom_fields"]["tributary_contribution_count"], 2);
}

#[tokio::test]
async fn bottlecrm_refused_record_carries_the_servers_message_and_others_land() {
    let h = harness().await;
    let contacts = [contact("1", Some("not-an-email"), "bad"), contact("2", Some("ok@example.com"), "ok")];
    let outcomes = h.crm.upsert_contacts(&contacts).await.unwrap();
    match &outcomes[0] {
        RecordOutcome::Rejected(message) => assert_eq!(message, "email: Enter a valid email address."),
        other => panic!("{other:?}"),
    }
    assert!(matches!(outcomes[1], RecordOutcome::Done(_)));
    let missing = h.crm.upsert_activities(&[activity("a1", &uuid(999), None)]).await.unwrap();
    assert!(matches!(&missing[0], RecordOutcome::Rejected(m) if m.contains("no contact")), "{missing:?}");
}

#[tokio::test]
async fn bottlecrm_secrets_never_show() {
    let h = harness().await;
    assert!(!format!("{:?}", h.crm).contains(TOKEN));
    h.crm.check().await.unwrap();
    let wrong = build(&h.server, "bcrm_pat_wrong-token-value");
    let error = wrong.check().await.unwrap_err();
    assert!(matches!(error, CrmError::Auth(_)), "{error:?}");
    assert!(error.to_string().contains("Organization context is required"), "{error}");
    assert!(!error.to_string().contains("wrong-token-value"));

    // A server that echoes the token back in an error.
    Mock::given(wiremock::matchers::method("GET"))
        .respond_with(ResponseTemplate::new(500).set_body_string(format!("boom Bearer {TOKEN}")))
        .with_priority(1)
        .mount(&h.server)
        .await;
    let error = h.crm.check().await.unwrap_err();
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
}

#[test]
fn bottlecrm_config_refuses_unknown_fields_and_finds_the_api_root() {
    let parsed: Result<BottleCrmConfig, _> =
        serde_json::from_value(json!({ "base_url": "http://x", "api_key": { "env": "K" }, "org": "1" }));
    assert!(parsed.is_err());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), "bcrm_pat_x").unwrap();
    for (base, api) in [("http://h:8000", "http://h:8000/api/"), ("http://h/crm/api/", "http://h/crm/api/")] {
        let config =
            BottleCrmConfig { base_url: Url::parse(base).unwrap(), api_key: SecretRef::File(file.path().to_owned()) };
        assert_eq!(BottleCrm::new(config, HttpOptions::default()).unwrap().api.as_str(), api);
    }
}

#[test]
fn bottlecrm_error_messages_read_as_the_server_wrote_them() {
    let read = |status: u16, body: Value| {
        error_message(&HttpResponse {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: serde_json::to_vec(&body).unwrap(),
            target: "http://h/api/contacts/".into(),
        })
    };
    // As a real django-crm 1.35 answered a bad date in a custom field.
    let nested = json!({ "error": true, "errors": { "custom_fields": {
        "tributary_last_contribution_at": "must be a YYYY-MM-DD date" } } });
    assert_eq!(read(400, nested), "custom_fields.tributary_last_contribution_at: must be a YYYY-MM-DD date");
    let fields = json!({ "error": true, "errors": {
        "email": ["Enter a valid email address."], "last_name": ["This field is required."] } });
    assert_eq!(read(400, fields), "email: Enter a valid email address.; last_name: This field is required.");
    assert_eq!(read(404, json!({ "detail": "No such Comment." })), "No such Comment.");
    assert_eq!(
        read(403, json!({ "error": true, "errors": "You don't have permission to edit this Comment" })),
        "You don't have permission to edit this Comment"
    );
}

#[tokio::test]
async fn bottlecrm_setup_creates_the_rollup_fields_once() {
    let h = harness().await;
    let platforms = ["forum".to_owned(), "GitHub".to_owned()];
    let first = h.crm.setup(&platforms).await.unwrap();
    // Identity, per platform handle and profile, 15 rollups, per platform first and last seen and count.
    assert_eq!(first.created.len(), 1 + 2 * 2 + 15 + 2 * 3, "{first:?}");
    assert!(first.existing.is_empty(), "{first:?}");
    {
        let state = h.bottle.state();
        for (key, field_type) in [
            ("tributary_needs_attention", "checkbox"),
            ("tributary_last_excerpt", "text"),
            ("tributary_sentiment_90d", "number"),
            ("tributary_first_seen_github", "date"),
            ("tributary_last_seen_forum", "date"),
            ("tributary_contributions_forum", "number"),
        ] {
            assert_eq!(state.field_types.get(key).map(String::as_str), Some(field_type), "{key}");
        }
    }
    let posts = h.posts().await;
    let second = h.crm.setup(&platforms).await.unwrap();
    assert!(second.created.is_empty(), "{second:?}");
    assert_eq!(second.existing.len(), first.created.len());
    assert_eq!(h.posts().await, posts, "nothing created twice");
}

#[tokio::test]
async fn bottlecrm_rollups_carry_every_figure_in_one_patch_and_clear_what_is_gone() {
    let h = harness().await;
    let id = done(&h.crm.upsert_contacts(&[contact("1", Some("maya@example.com"), "maya")]).await.unwrap()).remove(0);
    let at = |seconds: i64| chrono::DateTime::from_timestamp(seconds, 0).unwrap();
    let full = Rollup {
        contact_id: id.clone(),
        last_contribution_at: at(1_700_000_000),
        last_platform: "forum".into(),
        contribution_count: 4,
        platforms: vec!["forum".into(), "reddit".into()],
        sentiment_avg: 0.123456,
        questions: 1,
        last_url: Some("https://community.example.com/t/42".into()),
        last_excerpt: Some("Is there a way?\r\n\r\nI looked in settings.".into()),
        count_90d: 2,
        sentiment_avg_90d: Some(-0.5),
        needs_attention: true,
        attention_reason: Some("an unresolved complaint".into()),
        per_platform: vec![
            PlatformRollup {
                platform: "forum".into(),
                handle: Some("maya".into()),
                profile_url: None,
                first_seen: at(1_600_000_000),
                last_seen: at(1_700_000_000),
                contributions: 3,
            },
            // Not set up: its fields are created on first use.
            PlatformRollup {
                platform: "reddit".into(),
                handle: None,
                profile_url: None,
                first_seen: at(1_650_000_000),
                last_seen: at(1_650_000_000),
                contributions: 1,
            },
        ],
        ..Default::default()
    };
    let before = h.server.received_requests().await.unwrap().len();
    assert_eq!(h.crm.update_rollups(&[full]).await.unwrap(), vec![RecordOutcome::Done(())]);
    let requests = h.server.received_requests().await.unwrap();
    let patches: Vec<&Request> = requests[before..].iter().filter(|r| r.method.as_str() == "PATCH").collect();
    assert_eq!(patches.len(), 1, "one PATCH for every figure");
    let expected = json!({
        "tributary_last_contribution_at": "2023-11-14", "tributary_last_platform": "forum",
        "tributary_contribution_count": 4, "tributary_platforms": "forum, reddit", "tributary_sentiment_avg": 0.1235,
        "tributary_questions": 1, "tributary_complaints": 0, "tributary_ideas": 0, "tributary_praise": 0,
        "tributary_last_url": "https://community.example.com/t/42",
        "tributary_last_excerpt": "Is there a way? I looked in settings.", "tributary_contributions_90d": 2,
        "tributary_sentiment_90d": -0.5, "tributary_needs_attention": true,
        "tributary_attention_reason": "an unresolved complaint",
        "tributary_first_seen_forum": "2020-09-13", "tributary_last_seen_forum": "2023-11-14",
        "tributary_contributions_forum": 3,
        "tributary_first_seen_reddit": "2022-04-15", "tributary_last_seen_reddit": "2022-04-15",
        "tributary_contributions_reddit": 1,
    });
    assert_eq!(patches[0].body_json::<Value>().unwrap(), json!({ "custom_fields": expected }));
    assert_eq!(h.bottle.state().contacts[&id]["custom_fields"]["tributary_contributions_reddit"], 1);

    // Without those values: sent as null, removed by the server.
    let bare = Rollup { contact_id: id.clone(), last_contribution_at: at(1_700_000_000), ..Default::default() };
    assert_eq!(h.crm.update_rollups(&[bare]).await.unwrap(), vec![RecordOutcome::Done(())]);
    let state = h.bottle.state();
    let stored = state.contacts[&id]["custom_fields"].as_object().unwrap();
    for key in ["tributary_last_url", "tributary_last_excerpt", "tributary_sentiment_90d", "tributary_attention_reason"]
    {
        assert!(!stored.contains_key(key), "{key} lingers: {stored:?}");
    }
    assert_eq!(stored["tributary_needs_attention"], false);
}

#[tokio::test]
async fn bottlecrm_delete_removes_comments_and_gone_ones_are_done() {
    let h = harness().await;
    let id = done(&h.crm.upsert_contacts(&[contact("1", None, "maya")]).await.unwrap()).remove(0);
    let comments =
        done(&h.crm.upsert_activities(&[activity("a1", &id, None), activity("a2", &id, None)]).await.unwrap());
    let outcomes = h.crm.delete_activities(&[comments[0].clone(), comments[0].clone(), "not an id".into()]).await;
    let outcomes = outcomes.unwrap();
    assert_eq!(&outcomes[..2], [RecordOutcome::Done(()), RecordOutcome::Done(())]);
    assert!(matches!(&outcomes[2], RecordOutcome::Rejected(m) if m.contains("not a BottleCRM comment id")));
    assert_eq!(h.bottle.state().comments.keys().cloned().collect::<Vec<_>>(), [comments[1].clone()]);
    let requests = h.server.received_requests().await.unwrap();
    let deletes: Vec<String> =
        requests.iter().filter(|r| r.method.as_str() == "DELETE").map(|r| r.url.path().to_owned()).collect();
    assert_eq!(deletes, vec![format!("/api/contacts/comment/{}/", comments[0]); 2]);
}

#[tokio::test]
async fn bottlecrm_contact_properties_read_standard_and_custom_fields() {
    let h = harness().await;
    let id = done(&h.crm.upsert_contacts(&[contact("1", Some("maya@example.com"), "maya")]).await.unwrap()).remove(0);
    {
        let mut state = h.bottle.state();
        let stored = state.contacts.get_mut(&id).unwrap();
        stored["title"] = json!("CTO");
        stored["organization"] = json!("");
        stored["account"] = json!({ "id": uuid(7), "name": "Acme" });
        stored["custom_fields"]["lifecycle_stage"] = json!("customer");
        stored["custom_fields"]["tributary_contribution_count"] = json!(3.0);
    }
    let names: Vec<String> = [
        "title",
        "organization",
        "account",
        "lifecycle_stage",
        "tributary_handle_forum",
        "tributary_contribution_count",
        "nothing",
    ]
    .map(str::to_owned)
    .to_vec();
    let found = h.crm.contact_properties(&id, &names).await.unwrap();
    let expected = [
        ("account", "Acme"),
        ("lifecycle_stage", "customer"),
        ("title", "CTO"),
        ("tributary_contribution_count", "3"),
        ("tributary_handle_forum", "maya"),
    ];
    assert_eq!(found, expected.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>());
    let error = h.crm.contact_properties(&uuid(999), &names).await.unwrap_err();
    assert!(error.to_string().contains("no contact"), "{error}");
    assert!(matches!(h.crm.contact_properties("x y", &names).await, Err(CrmError::Unsupported(_))));
}

#[tokio::test]
async fn bottlecrm_cannot_merge_and_says_what_to_do() {
    let h = harness().await;
    let ids = done(
        &h.crm
            .upsert_contacts(&[contact("1", Some("maya@example.com"), "maya"), contact("2", None, "maya2")])
            .await
            .unwrap(),
    );
    let error = h.crm.merge_contacts(&ids[0], &ids[1]).await.unwrap_err();
    assert!(matches!(error, CrmError::Unsupported(_)), "{error:?}");
    let message = error.to_string();
    for part in ["no merge of contacts", "delete", "`tributary identity link`", ids[0].as_str()] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    // The administrator deleted the duplicate: done.
    h.bottle.state().contacts.remove(&ids[1]);
    h.crm.merge_contacts(&ids[0], &ids[1]).await.unwrap();
    let error = h.crm.merge_contacts(&ids[1], &ids[0]).await.unwrap_err();
    assert!(error.to_string().contains("has no contact"), "{error}");
    h.crm.merge_contacts(&ids[0], &ids[0]).await.unwrap();
    let writes = h.server.received_requests().await.unwrap();
    let after_upsert = writes.iter().rposition(|r| r.method.as_str() != "GET").unwrap();
    assert!(writes[after_upsert].url.path().ends_with("/contacts/"), "merging only reads");
}
