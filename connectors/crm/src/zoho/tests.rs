//! The Zoho sink against a wiremock Zoho: every request body it sends is
//! checked against Zoho's OpenAPI request schemas.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use chrono::DateTime;
use serde_json::{Value, json};
use tributary_sdk::{
    ActivityUpsert, ContactLookup, ContactUpsert, Contribution, Crm, CrmError, HttpOptions, MemoryTokenStore,
    PlatformRollup, RecordOutcome, Rollup, SecretRef,
};
use wiremock::{
    Mock, MockServer, Request, ResponseTemplate,
    matchers::{header, method, path, query_param},
};

use super::{BuildError, ZohoConfig, ZohoCrm, spec::Specs};

const CLIENT_SECRET: &str = "zoho-client-s3cret";
const REFRESH_TOKEN: &str = "1000.refresh-s3cret";

struct Zoho {
    server: MockServer,
    crm: ZohoCrm,
    issued: Arc<AtomicU32>,
    _dir: tempfile::TempDir,
}

fn options() -> HttpOptions {
    HttpOptions {
        max_retries: 2,
        backoff_base: Duration::from_millis(1),
        max_inline_wait: Duration::from_secs(5),
        ..HttpOptions::default()
    }
}

fn config(server: &MockServer, dir: &tempfile::TempDir) -> ZohoConfig {
    std::fs::write(dir.path().join("secret"), CLIENT_SECRET).unwrap();
    std::fs::write(dir.path().join("refresh"), format!("{REFRESH_TOKEN}\n")).unwrap();
    ZohoConfig {
        api_domain: server.uri().parse().unwrap(),
        accounts_url: server.uri().parse().unwrap(),
        client_id: "1000.CLIENT".into(),
        client_secret: SecretRef::File(dir.path().join("secret")),
        refresh_token: SecretRef::File(dir.path().join("refresh")),
    }
}

/// A Zoho with a token endpoint handing out `access-N` for an hour.
async fn zoho_with(http: HttpOptions) -> Zoho {
    let server = MockServer::start().await;
    let issued = Arc::new(AtomicU32::new(0));
    let counter = issued.clone();
    Mock::given(method("POST"))
        .and(path("/oauth/v2/token"))
        .respond_with(move |_: &Request| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            ResponseTemplate::new(200).set_body_json(json!({
                "access_token": format!("access-{n}"), "api_domain": "https://www.zohoapis.com",
                "token_type": "Bearer", "expires_in": 3600,
            }))
        })
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let crm =
        ZohoCrm::new(config(&server, &dir), http).unwrap().with_token_store(Arc::new(MemoryTokenStore::default()));
    Zoho { server, crm, issued, _dir: dir }
}

async fn zoho() -> Zoho {
    zoho_with(options()).await
}

impl Zoho {
    /// The API requests received (not the token requests), as (method, path, body).
    async fn requests(&self) -> Vec<(String, String, Value)> {
        let received = self.server.received_requests().await.unwrap_or_default();
        received
            .iter()
            .filter(|r| r.url.path() != "/oauth/v2/token")
            .map(|r| {
                let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                (r.method.to_string(), r.url.path().to_owned(), body)
            })
            .collect()
    }

    /// Every body sent is valid for its operation in Zoho's spec, and every
    /// API request carries a `Zoho-oauthtoken`.
    async fn assert_valid(&self) {
        let specs = Specs::load();
        let received = self.server.received_requests().await.unwrap_or_default();
        for request in received.iter().filter(|r| r.url.path() != "/oauth/v2/token") {
            let auth = request.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            assert!(auth.starts_with("Zoho-oauthtoken access-"), "{} sent `{auth}`", request.url);
            // A contact's notes are a related list (`related_list.json`, not in the copy).
            if !is_notes_of_a_contact(request.url.path()) {
                let query: Vec<(String, String)> = request.url.query_pairs().into_owned().collect();
                let problems = specs.validate_query(request.method.as_str(), request.url.path(), &query);
                assert!(problems.is_empty(), "{}: {problems:?}", request.url);
            }
            if request.body.is_empty() {
                continue;
            }
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            let problems = specs.validate_request(request.method.as_str(), request.url.path(), &body);
            assert!(problems.is_empty(), "{} {}: {problems:?}\n{body:#}", request.method, request.url.path());
        }
    }
}

/// Zoho's answer for one record written.
fn ok(id: &str) -> Value {
    let user = json!({ "name": "Admin", "id": "1" });
    json!({ "code": "SUCCESS", "status": "success", "message": "record added", "details": {
        "id": id, "Created_Time": "2024-01-01T00:00:00+00:00", "Modified_Time": "2024-01-01T00:00:00+00:00",
        "Created_By": user, "Modified_By": user,
    }})
}

fn refused(code: &str, message: &str, details: Value) -> Value {
    json!({ "code": code, "status": "error", "message": message, "details": details })
}

/// The outcomes, as `Ok(id)` (`()` for unit outcomes) or `Err(message)`,
/// compared with `expected`; a rejection must contain the expected text.
fn check<T: std::fmt::Debug>(outcomes: &[RecordOutcome<T>], expected: &[Result<&str, &str>]) {
    assert_eq!(outcomes.len(), expected.len(), "{outcomes:?}");
    for (outcome, expected) in outcomes.iter().zip(expected) {
        match (outcome, expected) {
            (RecordOutcome::Done(value), Ok(id)) => assert_eq!(format!("{value:?}").trim_matches('"'), *id),
            (RecordOutcome::Rejected(message), Err(text)) => assert!(message.contains(text), "{message}"),
            (got, want) => panic!("got {got:?}, expected {want:?}"),
        }
    }
}

fn activity(key: &str, contact: &str, existing: Option<&str>) -> ActivityUpsert {
    ActivityUpsert {
        key: key.into(),
        contact_id: contact.into(),
        contribution: Contribution { external_id: key.into(), ..Contribution::sample() },
        existing_id: existing.map(str::to_owned),
    }
}

fn rollup(contact: &str) -> Rollup {
    Rollup {
        contact_id: contact.into(),
        last_contribution_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        last_platform: "discourse".into(),
        contribution_count: 3,
        platforms: vec!["discourse".into(), "github".into()],
        sentiment_avg: 0.25,
        questions: 2,
        complaints: 0,
        ideas: 1,
        praise: 0,
        ..Default::default()
    }
}

/// A stateful Notes module: `POST`/`PUT /crm/v8/Notes` and the contact's
/// related list. Notes `gone` are refused on update as Zoho does.
#[derive(Default)]
struct Notes {
    notes: Mutex<Vec<(String, String, String)>>, // (id, contact, content)
    next: AtomicU32,
}

async fn mount_notes(server: &MockServer, state: Arc<Notes>, first_post_delay: Option<Duration>) {
    let posts = Arc::new(AtomicU32::new(0));
    let create = state.clone();
    Mock::given(method("POST"))
        .and(path("/crm/v8/Notes"))
        .respond_with(move |request: &Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            let mut answers = Vec::new();
            for note in body["data"].as_array().unwrap() {
                let id = format!("n{}", 100 + create.next.fetch_add(1, Ordering::SeqCst));
                let contact = note["Parent_Id"]["id"].as_str().unwrap().to_owned();
                let content = note["Note_Content"].as_str().unwrap().to_owned();
                create.notes.lock().unwrap().push((id.clone(), contact, content));
                answers.push(ok(&id));
            }
            let template = ResponseTemplate::new(201).set_body_json(json!({ "data": answers }));
            match (posts.fetch_add(1, Ordering::SeqCst), first_post_delay) {
                (0, Some(delay)) => template.set_delay(delay),
                _ => template,
            }
        })
        .mount(server)
        .await;
    let update = state.clone();
    Mock::given(method("PUT"))
        .and(path("/crm/v8/Notes"))
        .respond_with(move |request: &Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            let mut notes = update.notes.lock().unwrap();
            let answers: Vec<Value> = body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|note| {
                    let id = note["id"].as_str().unwrap();
                    match notes.iter_mut().find(|(known, _, _)| known == id) {
                        Some(found) => {
                            found.2 = note["Note_Content"].as_str().unwrap().to_owned();
                            ok(id)
                        }
                        None => refused("INVALID_DATA", "the id given seems to be invalid", json!({ "id": id })),
                    }
                })
                .collect();
            ResponseTemplate::new(200).set_body_json(json!({ "data": answers }))
        })
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex_notes())
        .respond_with(move |request: &Request| {
            let contact = request.url.path().split('/').nth(4).unwrap_or_default().to_owned();
            let notes = state.notes.lock().unwrap();
            let data: Vec<Value> = notes
                .iter()
                .filter(|(_, owner, _)| *owner == contact)
                .map(|(id, _, content)| json!({ "id": id, "Note_Content": content }))
                .collect();
            if data.is_empty() {
                return ResponseTemplate::new(204);
            }
            ResponseTemplate::new(200).set_body_json(json!({ "data": data, "info": { "more_records": false } }))
        })
        .mount(server)
        .await;
}

const NOTES_OF_A_CONTACT: &str = r"^/crm/v8/Contacts/[0-9]+/Notes$";

fn path_regex_notes() -> wiremock::matchers::PathRegexMatcher {
    wiremock::matchers::path_regex(NOTES_OF_A_CONTACT)
}

/// `/crm/v8/Contacts/{digits}/Notes`, as [`NOTES_OF_A_CONTACT`] matches.
fn is_notes_of_a_contact(path: &str) -> bool {
    path.strip_prefix("/crm/v8/Contacts/")
        .and_then(|rest| rest.strip_suffix("/Notes"))
        .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
}

/// Answers an upsert or update with `ok` for each record (the id from the
/// record, else `by_check` of the duplicate check field), or what `refuse`
/// says for a record.
fn echo(refuse: impl Fn(&Value) -> Option<Value> + Send + Sync + 'static) -> impl Fn(&Request) -> ResponseTemplate {
    move |request: &Request| {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let answers: Vec<Value> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, record)| {
                refuse(record).unwrap_or_else(|| match record["id"].as_str() {
                    Some(id) => ok(id),
                    None if record.get("Email").is_some() => ok(&format!("{}", 500 + i)),
                    None => ok(&format!("{}", 700 + i)),
                })
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(json!({ "data": answers }))
    }
}

#[tokio::test]
async fn zoho_first_sync_writes_contacts_notes_and_rollups() {
    let zoho = zoho().await;
    Mock::given(method("POST"))
        .and(path("/crm/v8/Contacts/upsert"))
        .respond_with(echo(|_| None))
        .mount(&zoho.server)
        .await;
    Mock::given(method("PUT")).and(path("/crm/v8/Contacts")).respond_with(echo(|_| None)).mount(&zoho.server).await;
    mount_notes(&zoho.server, Arc::new(Notes::default()), None).await;

    let contacts = [
        ContactUpsert {
            identity: "discourse:7".into(),
            email: Some(" Maya@Example.com ".into()),
            platform: "discourse".into(),
            handle: Some("mayac".into()),
            display_name: Some("Maya C".into()),
            profile_url: Some("https://community.example.com/u/mayac".into()),
        },
        ContactUpsert {
            identity: "github:9".into(),
            email: None,
            platform: "github".into(),
            handle: Some("octo".into()),
            display_name: None,
            profile_url: None,
        },
    ];
    check(&zoho.crm.upsert_contacts(&contacts).await.unwrap(), &[Ok("500"), Ok("700")]);
    let activities = [
        activity("k1", "500", None),
        activity("k2", "500", None),
        activity("k3", "700", None),
        activity("k1", "500", None),
    ];
    check(&zoho.crm.upsert_activities(&activities).await.unwrap(), &[Ok("n100"), Ok("n101"), Ok("n102"), Ok("n100")]);
    check(&zoho.crm.update_rollups(&[rollup("500"), rollup("700")]).await.unwrap(), &[Ok("()"), Ok("()")]);

    let requests = zoho.requests().await;
    let upserts: Vec<&Value> =
        requests.iter().filter(|(m, p, _)| m == "POST" && p == "/crm/v8/Contacts/upsert").map(|r| &r.2).collect();
    assert_eq!(upserts.len(), 2);
    assert_eq!(upserts[0]["duplicate_check_fields"], json!(["Tributary_Identity"]));
    assert_eq!(upserts[0]["data"][0]["Last_Name"], "octo");
    assert_eq!(upserts[0]["data"][0]["Tributary_Identity"], "github:9");
    assert_eq!(upserts[1]["duplicate_check_fields"], json!(["Email"]));
    assert_eq!(upserts[1]["data"][0]["Email"], "maya@example.com");
    assert_eq!(upserts[1]["data"][0]["Tributary_Discourse_Handle"], "mayac");
    let created = requests.iter().find(|(m, p, _)| m == "POST" && p == "/crm/v8/Notes").unwrap();
    assert_eq!(created.2["data"].as_array().map(Vec::len), Some(3), "`k1` twice is one note");
    let note = &created.2["data"][0];
    assert_eq!(note["Parent_Id"], json!({ "module": { "api_name": "Contacts" }, "id": "500" }));
    assert_eq!(note["Note_Title"], "Export to PDF?");
    assert!(note["Note_Content"].as_str().unwrap().ends_with("\n[tributary-key:k1]"));
    let rollups = requests.iter().find(|(m, p, _)| m == "PUT" && p == "/crm/v8/Contacts").unwrap();
    assert_eq!(rollups.2["data"][0]["Tributary_Last_Contribution"], "2023-11-14T22:13:20+00:00");
    assert_eq!(rollups.2["data"][0]["Tributary_Platforms"], "discourse;github");
    // Figures without a value are written empty, so none lingers.
    for field in
        ["Tributary_Last_Url", "Tributary_Last_Excerpt", "Tributary_Sentiment_90d", "Tributary_Attention_Reason"]
    {
        assert_eq!(rollups.2["data"][0][field], Value::Null, "{field}");
    }
    assert_eq!(rollups.2["data"][0]["Tributary_Needs_Attention"], false);
    assert_eq!(zoho.issued.load(Ordering::SeqCst), 1, "one token for the whole sync");
    let token_request = &zoho.server.received_requests().await.unwrap()[0];
    let form = String::from_utf8_lossy(&token_request.body);
    for part in ["grant_type=refresh_token", "client_id=1000.CLIENT", "refresh_token=1000.refresh-s3cret"] {
        assert!(form.contains(part), "{part} not in the token request");
    }
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_replay_updates_by_existing_id_or_marker_and_never_duplicates() {
    // The first delivery times out after Zoho stored the notes: no blind retry.
    let zoho = zoho_with(HttpOptions { timeout: Duration::from_millis(300), ..options() }).await;
    let notes = Arc::new(Notes::default());
    mount_notes(&zoho.server, notes.clone(), Some(Duration::from_millis(1_500))).await;
    let first = [activity("k1", "500", None), activity("k2", "500", None)];
    let error = zoho.crm.upsert_activities(&first).await.unwrap_err();
    assert!(matches!(error, CrmError::Http(_)), "{error:?}");
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(notes.notes.lock().unwrap().len(), 2, "Zoho stored both, and the POST was sent once");

    // Replay without ids (the outcome was lost): found by their markers.
    // `k` must not match `k1`'s marker; `k3` had an id whose note is gone.
    let replay = [
        activity("k1", "500", None),
        activity("k2", "500", Some("n101")),
        activity("k", "500", None),
        activity("k3", "500", Some("999")),
    ];
    check(&zoho.crm.upsert_activities(&replay).await.unwrap(), &[Ok("n100"), Ok("n101"), Ok("n102"), Ok("n103")]);
    let stored = notes.notes.lock().unwrap().clone();
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(stored[0].2.ends_with("[tributary-key:k1]") && stored[2].2.ends_with("[tributary-key:k]"));
    let requests = zoho.requests().await;
    let posts: Vec<&Value> =
        requests.iter().filter(|(m, p, _)| m == "POST" && p == "/crm/v8/Notes").map(|r| &r.2).collect();
    assert_eq!(posts.len(), 2, "the timed-out create, then one for `k` and `k3`");
    assert_eq!(posts[1]["data"].as_array().map(Vec::len), Some(2));
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_partial_failure_rejects_one_record_with_zohos_message() {
    let zoho = zoho().await;
    let refuse = |record: &Value| {
        (record["Email"] == "bad@example.com").then(|| {
            refused("INVALID_DATA", "invalid data", json!({ "api_name": "Email", "expected_data_type": "email" }))
        })
    };
    Mock::given(method("POST"))
        .and(path("/crm/v8/Contacts/upsert"))
        .respond_with(echo(refuse))
        .mount(&zoho.server)
        .await;
    let refuse_rollup = |record: &Value| {
        (record["id"] == "2").then(|| refused("INVALID_DATA", "record not found", json!({ "id": "2" })))
    };
    Mock::given(method("PUT"))
        .and(path("/crm/v8/Contacts"))
        .respond_with(echo(refuse_rollup))
        .mount(&zoho.server)
        .await;
    let person = |email: Option<&str>, identity: &str| ContactUpsert {
        identity: identity.into(),
        email: email.map(str::to_owned),
        platform: "discourse".into(),
        handle: None,
        display_name: None,
        profile_url: None,
    };
    let contacts = [
        person(Some("a@example.com"), "discourse:1"),
        person(Some("bad@example.com"), "discourse:2"),
        person(None, " "),
        person(Some("A@example.com"), "discourse:3"),
    ];
    check(
        &zoho.crm.upsert_contacts(&contacts).await.unwrap(),
        &[Ok("500"), Err("INVALID_DATA: invalid data (field: Email)"), Err("neither"), Ok("500")],
    );
    check(
        &zoho.crm.update_rollups(&[rollup("1"), rollup("2"), rollup("x")]).await.unwrap(),
        &[Ok("()"), Err("INVALID_DATA: record not found"), Err("not a Zoho contact id")],
    );
    let requests = zoho.requests().await;
    assert_eq!(requests[0].2["data"].as_array().unwrap().len(), 2, "one record per person");
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_429_is_honoured_and_spent_credits_hold_every_request() {
    let zoho = zoho().await;
    Mock::given(method("PUT"))
        .and(path("/crm/v8/Contacts"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1").set_body_json(refused(
            "TOO_MANY_REQUESTS",
            "too many requests",
            json!({}),
        )))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&zoho.server)
        .await;
    Mock::given(method("PUT")).and(path("/crm/v8/Contacts")).respond_with(echo(|_| None)).mount(&zoho.server).await;
    let started = std::time::Instant::now();
    check(&zoho.crm.update_rollups(&[rollup("1")]).await.unwrap(), &[Ok("()")]);
    assert!(started.elapsed() >= Duration::from_millis(900), "Retry-After honoured");

    Mock::given(method("POST"))
        .and(path("/crm/v8/Contacts/upsert"))
        .respond_with(ResponseTemplate::new(400).set_body_json(refused(
            "LIMIT_EXCEEDED",
            "API credits exceeded for the day",
            json!({}),
        )))
        .mount(&zoho.server)
        .await;
    let person = ContactUpsert {
        identity: "discourse:1".into(),
        email: None,
        platform: "discourse".into(),
        handle: None,
        display_name: None,
        profile_url: None,
    };
    let error = zoho.crm.upsert_contacts(std::slice::from_ref(&person)).await.unwrap_err();
    assert!(error.retry_after().is_some_and(|wait| wait >= Duration::from_secs(3000)), "{error:?}");
    let before = zoho.requests().await.len();
    let again = zoho.crm.upsert_contacts(&[person]).await.unwrap_err();
    assert!(again.retry_after().is_some(), "{again:?}");
    assert_eq!(zoho.requests().await.len(), before, "held: nothing sent");
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_expired_token_is_renewed_once() {
    let zoho = zoho().await;
    Mock::given(method("GET"))
        .and(path("/crm/v8/Contacts"))
        .and(header("authorization", "Zoho-oauthtoken access-2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "data": [], "info": {} })))
        .mount(&zoho.server)
        .await;
    let invalid = refused("INVALID_TOKEN", "invalid oauth token", json!({}));
    Mock::given(method("GET"))
        .and(path("/crm/v8/Contacts"))
        .respond_with(ResponseTemplate::new(401).set_body_json(invalid.clone()))
        .mount(&zoho.server)
        .await;
    zoho.crm.check().await.unwrap();
    assert_eq!(zoho.issued.load(Ordering::SeqCst), 2);
    Mock::given(method("GET"))
        .and(path("/crm/v8/Contacts/search"))
        .respond_with(ResponseTemplate::new(401).set_body_json(invalid))
        .mount(&zoho.server)
        .await;
    let error = zoho.crm.find_contact(&ContactLookup::Email("a@example.com".into())).await.unwrap_err();
    assert!(matches!(&error, CrmError::Auth(text) if text.contains("INVALID_TOKEN")), "{error:?}");
    assert_eq!(zoho.issued.load(Ordering::SeqCst), 3, "one renewal per request, no loop");
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_secrets_are_never_shown() {
    let zoho = zoho().await;
    let echoed = format!("bad client {CLIENT_SECRET} / {REFRESH_TOKEN}");
    Mock::given(method("DELETE"))
        .and(path("/crm/v8/Notes"))
        .respond_with(ResponseTemplate::new(500).set_body_string(echoed.clone()))
        .mount(&zoho.server)
        .await;
    let error = zoho.crm.archive_activities(&["1".into()]).await.unwrap_err();
    let dir = tempfile::tempdir().unwrap();
    let refused_grant = {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/oauth/v2/token"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "error": "invalid_client" })))
            .mount(&server)
            .await;
        let crm = ZohoCrm::new(config(&server, &dir), options()).unwrap();
        crm.check().await.unwrap_err()
    };
    assert!(matches!(refused_grant, CrmError::Auth(_)), "{refused_grant:?}");
    let texts = [
        error.to_string(),
        format!("{error:?}"),
        refused_grant.to_string(),
        format!("{:?}", zoho.crm),
        format!("{:?}", config(&zoho.server, &dir)),
    ];
    for text in texts {
        for secret in [CLIENT_SECRET, REFRESH_TOKEN, "access-1"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}

#[tokio::test]
async fn zoho_archive_deletes_notes_and_gone_counts_as_done() {
    let zoho = zoho().await;
    Mock::given(method("DELETE"))
        .and(path("/crm/v8/Notes"))
        .and(query_param("ids", "11,12"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "data": [
            refused("INVALID_DATA", "the id given seems to be invalid", json!({ "id": "12" })),
            { "code": "SUCCESS", "status": "success", "message": "record deleted", "details": { "id": "11" } },
        ]})))
        .mount(&zoho.server)
        .await;
    let outcomes = zoho.crm.archive_activities(&["11".into(), "12".into(), "x y".into()]).await.unwrap();
    check(&outcomes, &[Ok("()"), Ok("()"), Err("not a Zoho note id")]);
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_setup_creates_missing_fields_once() {
    let zoho = zoho().await;
    let created: Arc<Mutex<Vec<String>>> = Arc::default();
    let existing = created.clone();
    Mock::given(method("GET"))
        .and(path("/crm/v8/settings/fields"))
        .and(query_param("module", "Contacts"))
        .respond_with(move |_: &Request| {
            let mut fields = vec![json!({ "api_name": "Last_Name" }), json!({ "api_name": "Tributary_Identity" })];
            fields.extend(existing.lock().unwrap().iter().map(|name| json!({ "api_name": name })));
            ResponseTemplate::new(200).set_body_json(json!({ "fields": fields }))
        })
        .mount(&zoho.server)
        .await;
    let store = created.clone();
    Mock::given(method("POST"))
        .and(path("/crm/v8/settings/fields"))
        .and(query_param("module", "Contacts"))
        .respond_with(move |request: &Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            let label = body["fields"][0]["field_label"].as_str().unwrap().replace(' ', "_");
            store.lock().unwrap().push(label);
            ResponseTemplate::new(201).set_body_json(json!({ "fields": [
                { "code": "SUCCESS", "status": "success", "message": "field created", "details": { "id": "9" } },
            ]}))
        })
        .mount(&zoho.server)
        .await;
    let platforms = ["discourse".to_owned(), "github".to_owned()];
    let first = zoho.crm.setup(&platforms).await.unwrap();
    assert_eq!(first.existing, ["Contacts.Tributary_Identity"]);
    // Per platform handle and profile, 15 rollup figures, per platform first and last seen and count.
    assert_eq!(first.created.len(), 4 + 15 + 6, "{:?}", first.created);
    for name in ["Tributary_Github_Handle", "Tributary_Needs_Attention", "Tributary_Discourse_First_Seen"] {
        assert!(first.created.contains(&format!("Contacts.{name}")), "{name} not in {:?}", first.created);
    }
    let second = zoho.crm.setup(&platforms).await.unwrap();
    assert!(second.created.is_empty(), "{second:?}");
    assert_eq!(second.existing.len(), 26);
    assert_eq!(created.lock().unwrap().len(), 25, "nothing created twice");
    let requests = zoho.requests().await;
    let definition = |name: &str| {
        requests
            .iter()
            .find(|(m, _, body)| m == "POST" && body["fields"][0]["field_label"] == name)
            .map(|(_, _, body)| body["fields"][0].clone())
            .unwrap()
    };
    assert_eq!(
        definition("Tributary Needs Attention"),
        json!({ "field_label": "Tributary Needs Attention", "data_type": "boolean" })
    );
    assert_eq!(definition("Tributary Github Last Seen")["data_type"], "datetime");
    assert_eq!(definition("Tributary Discourse Contributions")["data_type"], "integer");
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_find_contact_by_email_and_handle() {
    let zoho = zoho().await;
    Mock::given(method("GET"))
        .and(path("/crm/v8/Contacts/search"))
        .and(query_param("email", "a@example.com"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "data": [{ "id": "41" }] })))
        .mount(&zoho.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/crm/v8/Contacts/search"))
        .and(query_param("criteria", r"(Tributary_Github_Handle:equals:a\,b\))"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&zoho.server)
        .await;
    assert_eq!(
        zoho.crm.find_contact(&ContactLookup::Email("a@example.com".into())).await.unwrap().as_deref(),
        Some("41")
    );
    let handle = ContactLookup::Handle { platform: "github".into(), handle: "a,b)".into() };
    assert_eq!(zoho.crm.find_contact(&handle).await.unwrap(), None);
    assert_eq!(zoho.crm.kind(), "zoho");
}

#[test]
fn zoho_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), CLIENT_SECRET).unwrap();
    let base = ZohoConfig {
        api_domain: "https://www.zohoapis.eu".parse().unwrap(),
        accounts_url: "https://accounts.zoho.eu".parse().unwrap(),
        client_id: "1000.CLIENT".into(),
        client_secret: SecretRef::File(dir.path().join("secret")),
        refresh_token: SecretRef::File(dir.path().join("missing")),
    };
    let cases: [(ZohoConfig, &str); 4] = [
        (base.clone(), "`refresh_token`"),
        (ZohoConfig { client_id: " ".into(), ..base.clone() }, "`client_id`"),
        (ZohoConfig { api_domain: "ftp://x.example".parse().unwrap(), ..base.clone() }, "`api_domain`"),
        (ZohoConfig { client_secret: SecretRef::File(dir.path().join("nope")), ..base.clone() }, "`client_secret`"),
    ];
    for (config, key) in cases {
        let error: BuildError = ZohoCrm::new(config, HttpOptions::default()).unwrap_err();
        assert!(error.to_string().contains(key), "{error}");
    }
    // The `[crm]` table as the daemon deserializes it (JSON here: no TOML
    // parser among this crate's dependencies); unknown keys are refused.
    let table = json!({
        "api_domain": "https://www.zohoapis.com", "accounts_url": "https://accounts.zoho.com", "client_id": "1000.X",
        "client_secret": { "env": "ZOHO_CLIENT_SECRET" }, "refresh_token": { "file": "zoho-refresh-token" },
    });
    let parsed: Result<ZohoConfig, _> = serde_json::from_value(table.clone());
    assert!(parsed.is_ok(), "{parsed:?}");
    let mut unknown = table;
    unknown["scope"] = json!("ZohoCRM.modules.ALL");
    assert!(serde_json::from_value::<ZohoConfig>(unknown).is_err());
}

#[tokio::test]
async fn zoho_rollups_carry_every_figure_in_the_same_update() {
    let zoho = zoho().await;
    Mock::given(method("PUT")).and(path("/crm/v8/Contacts")).respond_with(echo(|_| None)).mount(&zoho.server).await;
    let at = |seconds: i64| DateTime::from_timestamp(seconds, 0).unwrap();
    let full = Rollup {
        last_url: Some("https://community.example.com/t/42".into()),
        last_excerpt: Some("Is there a way?\nI looked in settings.".into()),
        count_90d: 2,
        sentiment_avg_90d: Some(-0.12345),
        needs_attention: true,
        attention_reason: Some("unresolved complaint".into()),
        per_platform: vec![PlatformRollup {
            platform: "discourse".into(),
            handle: Some("mayac".into()),
            profile_url: None,
            first_seen: at(1_600_000_000),
            last_seen: at(1_700_000_000),
            contributions: 3,
        }],
        ..rollup("500")
    };
    let long = Rollup {
        last_url: Some(format!("https://community.example.com/{}", "x".repeat(300))),
        last_excerpt: Some(format!("{}\n", "y".repeat(300))),
        ..rollup("700")
    };
    check(&zoho.crm.update_rollups(&[full, long]).await.unwrap(), &[Ok("()"), Ok("()")]);
    let requests = zoho.requests().await;
    let puts: Vec<&Value> = requests.iter().filter(|(m, _, _)| m == "PUT").map(|r| &r.2).collect();
    assert_eq!(puts.len(), 1, "every figure of every contact in one call");
    let record = &puts[0]["data"][0];
    for (field, value) in [
        ("id", json!("500")),
        ("Tributary_Contribution_Count", json!(3)),
        ("Tributary_Last_Url", json!("https://community.example.com/t/42")),
        ("Tributary_Last_Excerpt", json!("Is there a way? I looked in settings.")),
        ("Tributary_Contributions_90d", json!(2)),
        ("Tributary_Sentiment_90d", json!(-0.123)),
        ("Tributary_Needs_Attention", json!(true)),
        ("Tributary_Attention_Reason", json!("unresolved complaint")),
        ("Tributary_Discourse_First_Seen", json!("2020-09-13T12:26:40+00:00")),
        ("Tributary_Discourse_Last_Seen", json!("2023-11-14T22:13:20+00:00")),
        ("Tributary_Discourse_Contributions", json!(3)),
    ] {
        assert_eq!(record[field], value, "{field}");
    }
    let long = &puts[0]["data"][1];
    assert_eq!(long["Tributary_Last_Url"], Value::Null, "a link cut short would lead nowhere");
    let excerpt = long["Tributary_Last_Excerpt"].as_str().unwrap();
    assert!(excerpt.chars().count() == 255 && excerpt.ends_with('…'), "{excerpt}");
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_delete_removes_notes_and_gone_counts_as_done() {
    let zoho = zoho().await;
    Mock::given(method("DELETE"))
        .and(path("/crm/v8/Notes"))
        .and(query_param("ids", "21,22"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "data": [
            { "code": "SUCCESS", "status": "success", "message": "record deleted", "details": { "id": "21" } },
            refused("INVALID_DATA", "the id given seems to be invalid", json!({ "id": "22" })),
        ]})))
        .mount(&zoho.server)
        .await;
    let outcomes = zoho.crm.delete_activities(&["21".into(), " 22 ".into(), "n1".into()]).await.unwrap();
    check(&outcomes, &[Ok("()"), Ok("()"), Err("not a Zoho note id")]);
    let requests = zoho.requests().await;
    assert_eq!(requests.len(), 1);
    assert_eq!((requests[0].0.as_str(), requests[0].1.as_str()), ("DELETE", "/crm/v8/Notes"));
    zoho.assert_valid().await;
}

/// `GET /crm/v8/Contacts/{id}`: `500` and `600` exist, the others do not
/// (204); a field name outside `known` is refused as Zoho does.
async fn mount_contacts(server: &MockServer) {
    Mock::given(method("GET"))
        .and(wiremock::matchers::path_regex(r"^/crm/v8/Contacts/[0-9]+$"))
        .respond_with(|request: &Request| {
            let id = request.url.path().rsplit('/').next().unwrap_or_default().to_owned();
            let fields = request.url.query_pairs().find(|(k, _)| k == "fields").map(|(_, v)| v.into_owned());
            let fields = fields.unwrap_or_default();
            if id != "500" && id != "600" {
                return ResponseTemplate::new(204);
            }
            let record = json!({
                "id": id, "Last_Name": "Chen", "Email": null, "Lead_Source": "Web",
                "Account_Name": { "name": "Acme", "id": "4000" }, "Interests": ["Rust", "CRM"],
                "Tributary_Contribution_Count": 3, "Tributary_Needs_Attention": true, "Description": "",
            });
            let mut answer = serde_json::Map::new();
            for name in fields.split(',') {
                // Answered under the field's own API name.
                let found = record.as_object().and_then(|r| r.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)));
                match found {
                    Some((canonical, value)) => {
                        answer.insert(canonical.clone(), value.clone());
                    }
                    None => {
                        return ResponseTemplate::new(400).set_body_json(refused(
                            "INVALID_DATA",
                            "invalid data",
                            json!({ "api_name": name }),
                        ));
                    }
                }
            }
            answer.insert("id".into(), json!(id));
            ResponseTemplate::new(200).set_body_json(json!({ "data": [answer] }))
        })
        .mount(server)
        .await;
}

#[tokio::test]
async fn zoho_contact_properties_are_read_and_unknown_names_left_out() {
    let zoho = zoho().await;
    mount_contacts(&zoho.server).await;
    let names: Vec<String> = [
        "Lead_Source",
        "account_name",
        "Interests",
        "Email",
        "Description",
        "No_Such",
        "Tributary_Contribution_Count",
        "Tributary_Needs_Attention",
        "Account.Name",
    ]
    .map(str::to_owned)
    .to_vec();
    let found = zoho.crm.contact_properties("500", &names).await.unwrap();
    assert_eq!(
        found,
        std::collections::BTreeMap::from([
            ("Interests".to_owned(), "Rust; CRM".to_owned()),
            ("Lead_Source".to_owned(), "Web".to_owned()),
            ("Tributary_Contribution_Count".to_owned(), "3".to_owned()),
            ("Tributary_Needs_Attention".to_owned(), "true".to_owned()),
            ("account_name".to_owned(), "Acme".to_owned()),
        ])
    );
    let received = zoho.server.received_requests().await.unwrap();
    let reads: Vec<String> = received
        .iter()
        .filter(|r| r.url.path() == "/crm/v8/Contacts/500")
        .map(|r| r.url.query_pairs().find(|(k, _)| k == "fields").unwrap().1.into_owned())
        .collect();
    assert_eq!(reads.len(), 2, "asked again without the unknown name: {reads:?}");
    assert!(reads[0].contains("No_Such") && !reads[1].contains("No_Such"), "{reads:?}");
    let error = zoho.crm.contact_properties("999", &names).await.unwrap_err();
    assert!(error.to_string().contains("no contact 999"), "{error}");
    assert!(zoho.crm.contact_properties("500", &["a b".into()]).await.unwrap().is_empty());
    assert!(matches!(zoho.crm.contact_properties("x", &names).await, Err(CrmError::Unsupported(_))));
    zoho.assert_valid().await;
}

#[tokio::test]
async fn zoho_merge_is_made_in_zoho_crm_and_seen_afterwards() {
    // The v8 files have no merge operation for Contacts: nothing is asked of one.
    let specs = Specs::load();
    for method in ["POST", "PUT"] {
        let problems = specs.validate_request(method, "/crm/v8/Contacts/500/actions/merge", &json!({}));
        assert!(problems.iter().any(|p| p.contains("no operation")), "{problems:?}");
    }
    let zoho = zoho().await;
    mount_contacts(&zoho.server).await;
    let error = zoho.crm.merge_contacts("500", "600").await.unwrap_err();
    assert!(matches!(error, CrmError::Unsupported(_)), "{error:?}");
    let message = error.to_string();
    for part in ["no merge of contacts", "Find and Merge", "keeping 500 as the master", "`tributary identity link`"] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    // Merged in Zoho CRM: the merged contact is gone, the survivor is there.
    zoho.crm.merge_contacts("500", "700").await.unwrap();
    let error = zoho.crm.merge_contacts("999", "500").await.unwrap_err();
    assert!(error.to_string().contains("no contact 999"), "{error}");
    let sent = zoho.requests().await.len();
    zoho.crm.merge_contacts("500", "500").await.unwrap();
    assert!(zoho.crm.merge_contacts("500", "abc").await.is_err());
    assert_eq!(zoho.requests().await.len(), sent, "no request for one contact or a bad id");
    assert!(zoho.requests().await.iter().all(|(m, _, _)| m == "GET"), "only reads");
    zoho.assert_valid().await;
}
