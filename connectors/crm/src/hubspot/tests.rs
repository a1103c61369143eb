//! The HubSpot sink against the mock HubSpot.

use std::time::Duration;

use chrono::DateTime;
use tributary_sdk::{Contribution, Intent, Signals};

use super::{
    mock::{Direction, Fault, MockHubSpot, RateLimitPolicy},
    *,
};

const PLATFORMS: [&str; 3] = ["forum", "social", "support"];
const TIMEOUT: Duration = Duration::from_millis(400);

fn fast_options() -> HttpOptions {
    HttpOptions { timeout: TIMEOUT, backoff_base: Duration::from_millis(5), max_retries: 3, ..HttpOptions::default() }
}

struct Harness {
    hubspot: MockHubSpot,
    crm: HubSpotCrm,
    _dir: tempfile::TempDir,
}

fn sink(hubspot: &MockHubSpot, token: &str) -> (HubSpotCrm, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("hubspot-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let config = HubSpotConfig {
        token: SecretRef::File(token_file),
        base_url: Url::parse(&hubspot.base_url()).unwrap(),
        property_prefix: "tributary_".into(),
    };
    (new(config, fast_options()).unwrap(), dir)
}

/// A mock with Tributary's properties set up, and a sink pointed at it.
async fn harness() -> Harness {
    let hubspot = MockHubSpot::start().await;
    let (crm, dir) = sink(&hubspot, hubspot.token());
    let platforms: Vec<String> = PLATFORMS.iter().map(|p| p.to_string()).collect();
    crm.setup(&platforms).await.unwrap();
    hubspot.clear_requests();
    Harness { hubspot, crm, _dir: dir }
}

impl Harness {
    /// No request and no answer broke HubSpot's OpenAPI files.
    fn assert_clean(&self) {
        let violations = self.hubspot.spec_violations();
        assert!(violations.is_empty(), "spec violations: {violations:#?}");
    }

    fn requests_to(&self, suffix: &str) -> Vec<mock::RecordedRequest> {
        self.hubspot.requests().into_iter().filter(|r| r.path.ends_with(suffix)).collect()
    }
}

fn contact(platform: &str, id: &str, email: Option<&str>, handle: &str, name: &str) -> ContactUpsert {
    ContactUpsert {
        identity: format!("{platform}:{id}"),
        email: email.map(str::to_owned),
        platform: platform.into(),
        handle: Some(handle.into()),
        display_name: Some(name.into()),
        profile_url: None,
    }
}

fn contribution(external_id: &str, title: &str, body: &str) -> Contribution {
    Contribution {
        platform: "forum".into(),
        external_id: external_id.into(),
        url: Some(format!("https://community.example.com/t/{external_id}")),
        title: Some(title.into()),
        body: body.into(),
        signals: Some(Signals { sentiment: -0.4, intent: Intent::Complaint, sentiment_skipped: None }),
        ..Contribution::sample()
    }
}

fn activity(contact_id: &str, contribution: Contribution) -> ActivityUpsert {
    ActivityUpsert { key: contribution.activity_key(), contact_id: contact_id.into(), contribution, existing_id: None }
}

fn done<T: std::fmt::Debug>(outcomes: Vec<RecordOutcome<T>>) -> Vec<T> {
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            RecordOutcome::Done(value) => value,
            RecordOutcome::Rejected(message) => panic!("rejected: {message}"),
        })
        .collect()
}

async fn one_contact(h: &Harness) -> String {
    let ids =
        done(h.crm.upsert_contacts(&[contact("forum", "7", Some("maya@example.com"), "mayac", "Maya")]).await.unwrap());
    ids[0].clone()
}

#[tokio::test]
async fn contacts_are_upserted_by_email_or_identity_and_found_again() {
    let h = harness().await;
    let contacts = [
        contact("forum", "7", Some("Maya.Chen@Example.com"), "mayac", "Maya Chen"),
        contact("social", "42", None, "rustacean_42", "rustacean_42"),
        contact("support", "9", Some("maya.chen@example.com"), "maya.chen@example.com", "Maya"),
    ];
    let mut contacts = contacts;
    contacts[1].profile_url = Some("https://social.example/@rustacean_42".into());
    let first = done(h.crm.upsert_contacts(&contacts).await.unwrap());
    // The same e-mail twice in one call is one contact.
    assert_eq!(first[0], first[2]);
    assert_ne!(first[0], first[1]);
    let second = done(h.crm.upsert_contacts(&contacts).await.unwrap());
    assert_eq!(first, second, "a second upsert must hit the same contacts");
    assert_eq!(h.hubspot.contacts().len(), 2);

    // (contact, property, expected value); None = must not be written.
    let maya = h.hubspot.contact_by("email", "maya.chen@example.com").unwrap();
    let rusty = h.hubspot.contact_by("tributary_identity", "social:42").unwrap();
    let checks: [(&mock::MockObject, &str, Option<&str>); 11] = [
        (&maya, "tributary_handle_forum", Some("mayac")),
        (&maya, "tributary_user_id_forum", Some("7")),
        (&maya, "tributary_user_id_support", Some("9")),
        (&rusty, "tributary_user_id_social", Some("42")),
        (&rusty, "tributary_profile_social", Some("https://social.example/@rustacean_42")),
        (&maya, "tributary_handle_support", Some("maya.chen@example.com")),
        (&maya, "firstname", None),
        (&maya, "tributary_identity", None),
        (&rusty, "tributary_identity", Some("social:42")),
        (&rusty, "tributary_handle_social", Some("rustacean_42")),
        (&rusty, "firstname", Some("rustacean_42")),
    ];
    for (object, property, expected) in checks {
        assert_eq!(object.get(property), expected, "{property} of {}", object.id);
    }
    assert_eq!(maya.id, first[0]);

    let lookups = [
        (ContactLookup::Email("MAYA.CHEN@example.com".into()), Some(first[0].clone())),
        (ContactLookup::Handle { platform: "social".into(), handle: "rustacean_42".into() }, Some(first[1].clone())),
        (ContactLookup::Handle { platform: "forum".into(), handle: "mayac".into() }, Some(first[0].clone())),
        (ContactLookup::Email("nobody@example.com".into()), None),
        (ContactLookup::Email(" ".into()), None),
    ];
    for (lookup, expected) in lookups {
        assert_eq!(h.crm.find_contact(&lookup).await.unwrap(), expected, "{lookup:?}");
    }
    for request in h.requests_to("/contacts/batch/upsert") {
        for input in request.body.as_ref().unwrap()["inputs"].as_array().unwrap() {
            if input["idProperty"] == "email" {
                assert!(input["properties"].get("firstname").is_none(), "the CRM owns the name: {input}");
            }
        }
    }
    h.assert_clean();
}

#[tokio::test]
async fn notes_are_upserted_associated_and_replays_change_nothing() {
    let h = harness().await;
    let contact_id = one_contact(&h).await;
    let activities = [
        activity(&contact_id, contribution("1", "Export to PDF?", "How do I export?")),
        activity(&contact_id, contribution("2", "Slow sync", "Sync takes an hour.")),
    ];
    let first = done(h.crm.upsert_activities(&activities).await.unwrap());
    assert_eq!(h.hubspot.notes().len(), 2);
    let mut expected_pairs: Vec<(String, String)> = first.iter().map(|id| (id.clone(), contact_id.clone())).collect();
    expected_pairs.sort();
    assert_eq!(h.hubspot.associations(), expected_pairs);

    let note = &h.hubspot.notes()[&activities[0].key];
    assert_eq!(note.id, first[0]);
    for (property, expected) in [
        ("tributary_key", activities[0].key.as_str()),
        ("tributary_platform", "forum"),
        ("tributary_intent", "complaint"),
        ("tributary_sentiment", "-0.4"),
        ("tributary_url", "https://community.example.com/t/1"),
        ("hs_timestamp", "2023-11-14T22:13:20.000Z"),
    ] {
        assert_eq!(note.get(property), Some(expected), "{property}");
    }

    // A replay (a crash after the write) finds the same notes.
    let writes = h.hubspot.write_calls();
    let replay = done(h.crm.upsert_activities(&activities).await.unwrap());
    assert_eq!(replay, first);
    assert_eq!(h.hubspot.notes().len(), 2);
    assert_eq!(h.hubspot.associations().len(), 2);
    assert_eq!(h.hubspot.write_calls(), writes + 2, "one upsert and one association call");

    // An edit updates its note in place.
    let mut edited = contribution("1", "Export to PDF?", "How do I export? Found it, thanks!");
    edited.edited = true;
    let again = done(h.crm.upsert_activities(&[activity(&contact_id, edited)]).await.unwrap());
    assert_eq!(again[0], first[0]);
    let note = &h.hubspot.notes()[&activities[0].key];
    let body = note.get("hs_note_body").unwrap();
    assert!(body.contains("Found it, thanks!") && body.contains("edited"), "{body}");
    assert_eq!(h.hubspot.notes().len(), 2);
    h.assert_clean();
}

#[tokio::test]
async fn archived_notes_go_to_the_recycling_bin_and_archiving_twice_is_done() {
    let h = harness().await;
    let contact_id = one_contact(&h).await;
    let activities = [
        activity(&contact_id, contribution("1", "Export to PDF?", "How do I export?")),
        activity(&contact_id, contribution("2", "Slow sync", "Sync takes an hour.")),
    ];
    let ids = done(h.crm.upsert_activities(&activities).await.unwrap());
    let archived = done(h.crm.archive_activities(&ids[..1]).await.unwrap());
    assert_eq!(archived.len(), 1);
    assert_eq!(h.hubspot.notes().keys().collect::<Vec<_>>(), [&activities[1].key], "the other note stays");
    assert_eq!(h.hubspot.archived_notes()[&activities[0].key].id, ids[0]);
    assert_eq!(h.hubspot.associations(), [(ids[1].clone(), contact_id.clone())]);
    // A replay after a crash: HubSpot answers 204 again, nothing else changes.
    done(h.crm.archive_activities(&ids[..1]).await.unwrap());
    assert_eq!(h.hubspot.archived_notes().len(), 1);
    let calls = h.requests_to("/batch/archive");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].body.as_ref().unwrap()["inputs"], serde_json::json!([{ "id": ids[0] }]));
    // More than a batch is sent in chunks of 100.
    let many: Vec<String> = (0..150).map(|n| (90_000 + n).to_string()).collect();
    assert_eq!(done(h.crm.archive_activities(&many).await.unwrap()).len(), 150);
    assert_eq!(h.requests_to("/batch/archive").len(), 4);
    h.assert_clean();
}

#[tokio::test]
async fn a_note_whose_contact_is_gone_is_refused_and_the_others_land() {
    let h = harness().await;
    let contact_id = one_contact(&h).await;
    let activities = [
        activity(&contact_id, contribution("1", "Kept", "This one lands.")),
        activity("99999999", contribution("2", "Orphan", "Its contact was deleted.")),
        activity("", contribution("3", "No contact", "The daemon sent no contact id.")),
    ];
    let outcomes = h.crm.upsert_activities(&activities).await.unwrap();
    assert!(matches!(&outcomes[0], RecordOutcome::Done(_)), "{outcomes:?}");
    for (index, expected) in [(1, "No contacts with ids 99999999 exist"), (2, "no contact id")] {
        match &outcomes[index] {
            RecordOutcome::Rejected(message) => assert!(message.contains(expected), "{message}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.hubspot.associations().len(), 1);
    h.assert_clean();
}

#[tokio::test]
async fn markup_from_a_contribution_reaches_hubspot_only_escaped() {
    let h = harness().await;
    let contact_id = one_contact(&h).await;
    let mut hostile = contribution("66", "<script>alert(1)</script>", "hi <script>alert(1)</script><ScRiPt>x</sCrIpT>");
    hostile.url = Some("javascript:alert(1)".into());
    hostile.deleted = true;
    done(h.crm.upsert_activities(&[activity(&contact_id, hostile.clone())]).await.unwrap());
    for request in h.hubspot.requests() {
        let body = request.body.map(|b| b.to_string()).unwrap_or_default().to_lowercase();
        assert!(!body.contains("<script"), "raw markup sent to {}: {body}", request.path);
        assert!(!body.contains("javascript:"), "script URL sent to {}: {body}", request.path);
    }
    let body = h.hubspot.notes()[&hostile.activity_key()].get("hs_note_body").unwrap().to_owned();
    assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{body}");
    assert!(body.starts_with("<p><em>[deleted on forum]</em></p>"), "{body}");
    h.assert_clean();
}

#[tokio::test]
async fn an_invalid_record_is_isolated_and_the_rest_of_the_batch_lands() {
    let h = harness().await;
    h.hubspot.reject_email("blocked@example.com");
    let contacts: Vec<ContactUpsert> = [
        Some("a@example.com"),
        Some("blocked@example.com"),
        Some("b@example.com"),
        Some("not-an-email"),
        None,
        Some("c@example.com"),
    ]
    .iter()
    .enumerate()
    .map(|(i, email)| contact("forum", &i.to_string(), *email, &format!("user{i}"), "User"))
    .collect();
    let outcomes = h.crm.upsert_contacts(&contacts).await.unwrap();
    for (index, expected) in [
        (0, None),
        (1, Some("Email address blocked@example.com is invalid")),
        (2, None),
        (3, Some("Email address not-an-email is invalid")),
        (4, None),
        (5, None),
    ] {
        match (&outcomes[index], expected) {
            (RecordOutcome::Done(_), None) => {}
            (RecordOutcome::Rejected(message), Some(expected)) => {
                assert!(message.starts_with("Property values were not valid"), "{message}");
                assert!(message.contains(expected), "{message}");
            }
            (outcome, expected) => panic!("record {index}: {outcome:?}, expected {expected:?}"),
        }
    }
    assert_eq!(h.hubspot.contacts().len(), 4);
    assert!(h.requests_to("/contacts/batch/upsert").len() > 1, "the batch was not split");

    // Once HubSpot accepts the value, the retry of the refused record lands.
    h.hubspot.clear_rejections();
    let retried = done(h.crm.upsert_contacts(&contacts[1..2]).await.unwrap());
    assert_eq!(h.hubspot.contact_by("email", "blocked@example.com").unwrap().id, retried[0]);
    h.assert_clean();
}

#[tokio::test]
async fn rollups_land_and_an_unknown_contact_is_refused_with_hubspots_message() {
    let h = harness().await;
    let contact_id = one_contact(&h).await;
    let rollup = |contact_id: &str| Rollup {
        contact_id: contact_id.into(),
        last_contribution_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
        last_platform: "forum".into(),
        contribution_count: 12,
        platforms: vec!["forum".into(), "support".into()],
        sentiment_avg: 0.125,
        questions: 3,
        complaints: 2,
        ideas: 1,
        praise: 4,
        ..Default::default()
    };
    let outcomes = h.crm.update_rollups(&[rollup("99999999"), rollup(&contact_id)]).await.unwrap();
    match &outcomes[0] {
        RecordOutcome::Rejected(message) => {
            assert!(message.contains("Could not get some CONTACT objects"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(outcomes[1], RecordOutcome::Done(()));
    let maya = h.hubspot.contacts().into_iter().find(|c| c.id == contact_id).unwrap();
    for (property, expected) in [
        ("tributary_last_contribution_at", "2023-11-14T22:13:20.000Z"),
        ("tributary_last_platform", "forum"),
        ("tributary_contribution_count", "12"),
        ("tributary_platforms", "forum;support"),
        ("tributary_sentiment_avg", "0.125"),
        ("tributary_questions", "3"),
        ("tributary_complaints", "2"),
        ("tributary_ideas", "1"),
        ("tributary_praise", "4"),
    ] {
        assert_eq!(maya.get(property), Some(expected), "{property}");
    }
    h.assert_clean();
}

#[tokio::test]
async fn no_request_arrives_before_retry_after_has_passed() {
    let h = harness().await;
    h.hubspot
        .fail_next(1, Fault::RateLimited { retry_after_secs: Some(1), policy: RateLimitPolicy::TenSecondlyRolling });
    one_contact(&h).await;
    let requests = h.requests_to("/contacts/batch/upsert");
    assert_eq!(requests.iter().map(|r| r.status).collect::<Vec<_>>(), [429, 200]);
    let waited = requests[1].received_at.duration_since(requests[0].received_at);
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    h.assert_clean();
}

#[tokio::test]
async fn a_long_retry_after_is_handed_back_and_holds_every_request() {
    let h = harness().await;
    h.hubspot.fail_next(1, Fault::RateLimited { retry_after_secs: Some(7200), policy: RateLimitPolicy::Daily });
    let error = h.crm.check().await.unwrap_err();
    // A DAILY 429 closes the sink for the wait HubSpot named.
    assert!(matches!(error, CrmError::RateLimited { .. }), "{error:?}");
    assert!(error.retry_after().is_some_and(|wait| wait.as_secs().abs_diff(7200) <= 1), "{error:?}");
    let sent = h.hubspot.requests().len();
    let error = h.crm.upsert_contacts(&[contact("forum", "1", Some("a@example.com"), "a", "A")]).await.unwrap_err();
    assert!(error.retry_after().is_some_and(|wait| wait > Duration::from_secs(7000)), "{error:?}");
    assert_eq!(h.hubspot.requests().len(), sent, "a request left before Retry-After");
    h.assert_clean();
}

#[tokio::test]
async fn no_request_is_sent_once_the_daily_quota_is_spent() {
    let h = harness().await;
    h.hubspot.set_daily_remaining(1);
    h.crm.check().await.unwrap();
    let sent = h.hubspot.requests().len();
    let error = h.crm.upsert_contacts(&[contact("forum", "1", Some("a@example.com"), "a", "A")]).await.unwrap_err();
    let wait = error.retry_after().unwrap_or_default();
    assert!(matches!(error, CrmError::RateLimited { .. }) && wait > Duration::ZERO, "{error:?}");
    assert!(wait <= Duration::from_secs(86_400), "{wait:?}");
    assert_eq!(h.hubspot.requests().len(), sent, "a request was sent past the daily quota");
    h.assert_clean();
}

#[tokio::test]
async fn server_errors_are_retried_and_persistent_ones_reported() {
    let h = harness().await;
    h.hubspot.fail_next(2, Fault::ServerError(503));
    one_contact(&h).await;
    let statuses: Vec<u16> = h.requests_to("/contacts/batch/upsert").iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);

    h.hubspot.fail_next(10, Fault::ServerError(502));
    let error = h.crm.check().await.unwrap_err();
    assert!(matches!(error, CrmError::Http(HttpError::Status { status: 502, .. })), "{error:?}");
    h.assert_clean();
}

#[tokio::test]
async fn a_timed_out_write_that_happened_is_not_written_twice() {
    let h = harness().await;
    let contact_id = one_contact(&h).await;
    h.hubspot.fail_next(1, Fault::Delay(TIMEOUT * 3));
    let item = activity(&contact_id, contribution("5", "Timeout", "The first answer never comes back."));
    let ids = done(h.crm.upsert_activities(std::slice::from_ref(&item)).await.unwrap());
    let upserts = h.requests_to("/notes/batch/upsert");
    assert_eq!(upserts.len(), 2, "the timed-out call was not retried");
    let notes = h.hubspot.notes();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[&item.key].id, ids[0]);
    assert_eq!(h.hubspot.associations(), [(ids[0].clone(), contact_id)]);
    h.assert_clean();
}

#[tokio::test]
async fn a_refused_token_is_an_auth_error_that_does_not_show_the_token() {
    let hubspot = MockHubSpot::start_with_token("the-right-token").await;
    let (crm, _dir) = sink(&hubspot, "pat-na1-wr0ng-t0ken");
    let failures = [
        crm.check().await.unwrap_err(),
        crm.upsert_contacts(&[contact("forum", "1", Some("a@example.com"), "a", "A")]).await.unwrap_err(),
        crm.setup(&[]).await.unwrap_err(),
    ];
    for error in failures {
        assert!(matches!(error, CrmError::Auth(_)), "{error:?}");
        let shown = format!("{error} {error:?} {crm:?}");
        assert!(!shown.contains("wr0ng"), "{shown}");
        assert!(shown.contains("Authentication credentials not found"), "{shown}");
    }
    assert!(hubspot.contacts().is_empty());
}

#[tokio::test]
async fn setup_creates_everything_once() {
    let hubspot = MockHubSpot::start().await;
    let (crm, _dir) = sink(&hubspot, hubspot.token());
    let platforms = vec!["forum".to_owned(), "Stack Exchange".to_owned()];
    let first = crm.setup(&platforms).await.unwrap();
    assert!(first.existing.is_empty(), "{first:?}");
    for name in [
        "contacts/groups/tributary",
        "contacts/tributary_identity",
        "contacts/tributary_handle_forum",
        "contacts/tributary_handle_stack_exchange",
        "contacts/tributary_user_id_stack_exchange",
        "contacts/tributary_profile_forum",
        "contacts/tributary_sentiment_avg",
        "notes/groups/tributary",
        "notes/tributary_key",
        "notes/tributary_intent",
    ] {
        assert!(first.created.iter().any(|created| created == name), "{name} not in {first:?}");
    }
    let writes = hubspot.write_calls();
    let second = crm.setup(&platforms).await.unwrap();
    assert!(second.created.is_empty(), "{second:?}");
    let (mut before, mut after) = (first.created.clone(), second.existing.clone());
    before.sort();
    after.sort();
    assert_eq!(before, after);
    assert_eq!(hubspot.write_calls(), writes, "the second run wrote");

    // (object, property, type, fieldType, hasUniqueValue)
    for (object, name, data_type, field_type, unique) in [
        ("contacts", "tributary_identity", "string", "text", true),
        ("contacts", "tributary_last_contribution_at", "datetime", "date", false),
        ("contacts", "tributary_contribution_count", "number", "number", false),
        ("contacts", "tributary_platforms", "string", "text", false),
        ("notes", "tributary_key", "string", "text", true),
        ("notes", "tributary_intent", "enumeration", "select", false),
        ("notes", "tributary_sentiment", "number", "number", false),
    ] {
        let property = hubspot.property(object, name).unwrap_or_else(|| panic!("{object}/{name}"));
        assert_eq!(property["type"], data_type, "{name}");
        assert_eq!(property["fieldType"], field_type, "{name}");
        assert_eq!(property["hasUniqueValue"], unique, "{name}");
        assert_eq!(property["groupName"], "tributary", "{name}");
    }
    crm.check().await.unwrap();
    assert!(hubspot.spec_violations().is_empty(), "{:#?}", hubspot.spec_violations());
}

#[tokio::test]
async fn without_setup_the_daemon_is_told_to_run_it() {
    let hubspot = MockHubSpot::start().await;
    let (crm, _dir) = sink(&hubspot, hubspot.token());
    let contacts: Vec<ContactUpsert> =
        (0..4).map(|i| contact("forum", &i.to_string(), Some(&format!("u{i}@example.com")), "u", "U")).collect();
    let error = crm.upsert_contacts(&contacts).await.unwrap_err();
    assert!(matches!(&error, CrmError::Transient(message) if message.contains("crm setup")), "{error:?}");
    assert_eq!(hubspot.requests().len(), 1, "a missing property is not a bad record: no split");
    assert!(hubspot.spec_violations().is_empty());
}

#[tokio::test]
async fn large_batches_are_sent_in_chunks_of_at_most_100() {
    let h = harness().await;
    let contacts: Vec<ContactUpsert> = (0..150)
        .map(|i| contact("forum", &i.to_string(), Some(&format!("person{i}@example.com")), &format!("p{i}"), "P"))
        .collect();
    let ids = done(h.crm.upsert_contacts(&contacts).await.unwrap());
    let sizes: Vec<usize> = h
        .requests_to("/contacts/batch/upsert")
        .iter()
        .map(|r| r.body.as_ref().unwrap()["inputs"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [100, 50]);
    assert_eq!(h.hubspot.contacts().len(), 150);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 150);
    // Outcomes are in input order.
    for (index, id) in [(0, &ids[0]), (149, &ids[149])] {
        let found = h.hubspot.contact_by("email", &format!("person{index}@example.com")).unwrap();
        assert_eq!(&found.id, id);
    }
    h.assert_clean();
}

#[tokio::test]
async fn the_mock_reports_bodies_that_break_the_spec() {
    let h = harness().await;
    let url = format!("{}/crm/v3/objects/contacts/batch/upsert", h.hubspot.base_url());
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(h.hubspot.token())
        .json(&json!({ "inputs": [{ "idProperty": "email", "properties": { "n": 1 } }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let message = response.json::<Value>().await.unwrap()["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("$.inputs[0]: missing required property `id`"), "{message}");
    let violations = h.hubspot.spec_violations();
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].direction, Direction::Request);
    assert!(violations[0].problems.iter().any(|p| p.contains("$.inputs[0].properties.n")), "{violations:?}");
}

#[tokio::test]
async fn a_daily_429_closes_the_sink_until_the_quota_resets() {
    let h = harness().await;
    let id = one_contact(&h).await;
    // More 429s than the client retries: the last one's body names DAILY.
    h.hubspot.fail_next(10, Fault::RateLimited { retry_after_secs: None, policy: RateLimitPolicy::Daily });
    let error = h.crm.upsert_activities(&[activity(&id, contribution("d1", "t", "b"))]).await.unwrap_err();
    let wait = error.retry_after().expect("a wait");
    assert!(wait > Duration::from_secs(60), "DAILY waits for the reset, not {wait:?}");
    let sent = h.hubspot.requests().len();
    let again = h.crm.upsert_activities(&[activity(&id, contribution("d2", "t", "b"))]).await.unwrap_err();
    assert!(matches!(again, CrmError::RateLimited { .. }), "{again:?}");
    assert_eq!(h.hubspot.requests().len(), sent, "a request was sent while the daily quota is spent");
}

fn at(seconds: i64) -> chrono::DateTime<chrono::Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

fn full_rollup(contact_id: &str) -> Rollup {
    Rollup {
        contact_id: contact_id.into(),
        last_contribution_at: at(1_700_000_000),
        last_platform: "forum".into(),
        contribution_count: 12,
        platforms: vec!["forum".into(), "support".into()],
        sentiment_avg: 0.125,
        questions: 3,
        complaints: 2,
        ideas: 1,
        praise: 4,
        last_url: Some("https://community.example.com/t/42".into()),
        last_excerpt: Some("Export <b>fails</b> & it's\r\nslow".into()),
        count_90d: 5,
        sentiment_avg_90d: Some(-0.25),
        needs_attention: true,
        attention_reason: Some("an unresolved complaint".into()),
        per_platform: vec![
            tributary_sdk::PlatformRollup {
                platform: "forum".into(),
                handle: Some("mayac".into()),
                profile_url: None,
                first_seen: at(1_600_000_000),
                last_seen: at(1_700_000_000),
                contributions: 9,
            },
            tributary_sdk::PlatformRollup {
                platform: "support".into(),
                handle: None,
                profile_url: None,
                first_seen: at(1_650_000_000),
                last_seen: at(1_690_000_000),
                contributions: 3,
            },
        ],
    }
}

#[tokio::test]
async fn rollup_figures_land_in_one_batch_update() {
    let h = harness().await;
    let maya = one_contact(&h).await;
    let rusty =
        done(h.crm.upsert_contacts(&[contact("social", "42", None, "rusty", "Rusty")]).await.unwrap())[0].clone();
    let quiet = Rollup {
        sentiment_avg_90d: None,
        needs_attention: false,
        attention_reason: None,
        last_url: Some("javascript:alert(1)".into()),
        last_excerpt: None,
        per_platform: Vec::new(),
        ..full_rollup(&rusty)
    };
    let outcomes = h.crm.update_rollups(&[full_rollup(&maya), quiet]).await.unwrap();
    assert_eq!(outcomes, [RecordOutcome::Done(()), RecordOutcome::Done(())]);
    let updates = h.requests_to("/contacts/batch/update");
    assert_eq!(updates.len(), 1, "one batch call for both rollups");
    assert_eq!(updates[0].body.as_ref().unwrap()["inputs"].as_array().unwrap().len(), 2);

    let contact = |id: &str| h.hubspot.contacts().into_iter().find(|c| c.id == id).unwrap();
    let (maya, rusty) = (contact(&maya), contact(&rusty));
    for (property, expected) in [
        ("tributary_contribution_count", "12"),
        ("tributary_last_url", "https://community.example.com/t/42"),
        // Plain text on one line, not HTML: HubSpot shows text properties as text.
        ("tributary_last_excerpt", "Export <b>fails</b> & it's slow"),
        ("tributary_contributions_90d", "5"),
        ("tributary_sentiment_90d", "-0.25"),
        ("tributary_needs_attention", "true"),
        ("tributary_attention_reason", "an unresolved complaint"),
        ("tributary_first_seen_forum", "2020-09-13T12:26:40.000Z"),
        ("tributary_last_seen_forum", "2023-11-14T22:13:20.000Z"),
        ("tributary_contributions_forum", "9"),
        ("tributary_first_seen_support", "2022-04-15T05:20:00.000Z"),
        ("tributary_last_seen_support", "2023-07-22T04:26:40.000Z"),
        ("tributary_contributions_support", "3"),
    ] {
        assert_eq!(maya.get(property), Some(expected), "{property}");
    }
    for (property, expected) in [
        ("tributary_sentiment_90d", Some("")),
        ("tributary_needs_attention", Some("false")),
        ("tributary_attention_reason", Some("")),
        ("tributary_last_excerpt", Some("")),
        ("tributary_last_url", Some("")),
        ("tributary_contributions_forum", None),
    ] {
        assert_eq!(rusty.get(property), expected, "{property}");
    }

    // A platform `setup` never saw: HubSpot refuses the property, and the
    // daemon is told to run setup again.
    let mut unknown = full_rollup(&maya.id);
    unknown.per_platform[0].platform = "mastodon".into();
    let error = h.crm.update_rollups(&[unknown]).await.unwrap_err();
    assert!(matches!(&error, CrmError::Transient(message) if message.contains("crm setup")), "{error:?}");
    h.assert_clean();
}

#[tokio::test]
async fn setup_creates_the_rollup_properties_once_and_new_platforms_later() {
    let hubspot = MockHubSpot::start().await;
    let (crm, _dir) = sink(&hubspot, hubspot.token());
    let first = crm.setup(&["forum".to_owned()]).await.unwrap();
    // (property, type, fieldType)
    let expected = [
        ("tributary_last_url", "string", "text"),
        ("tributary_last_excerpt", "string", "text"),
        ("tributary_contributions_90d", "number", "number"),
        ("tributary_sentiment_90d", "number", "number"),
        ("tributary_needs_attention", "bool", "booleancheckbox"),
        ("tributary_attention_reason", "string", "text"),
        ("tributary_first_seen_forum", "datetime", "date"),
        ("tributary_last_seen_forum", "datetime", "date"),
        ("tributary_contributions_forum", "number", "number"),
    ];
    for (name, data_type, field_type) in expected {
        assert!(first.created.contains(&format!("contacts/{name}")), "{name} not in {first:?}");
        let property = hubspot.property("contacts", name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!((property["type"].as_str(), property["fieldType"].as_str()), (Some(data_type), Some(field_type)));
        assert_eq!(property["groupName"], "tributary", "{name}");
    }
    let options = hubspot.property("contacts", "tributary_needs_attention").unwrap()["options"].clone();
    let values: Vec<&str> = options.as_array().unwrap().iter().filter_map(|o| o["value"].as_str()).collect();
    assert_eq!(values, ["true", "false"]);

    let writes = hubspot.write_calls();
    let second = crm.setup(&["forum".to_owned()]).await.unwrap();
    assert!(second.created.is_empty(), "{second:?}");
    assert_eq!(hubspot.write_calls(), writes, "the second run wrote");

    // A platform added later gets its own properties, and only those.
    let third = crm.setup(&["forum".to_owned(), "Stack Exchange".to_owned()]).await.unwrap();
    let mut created = third.created.clone();
    created.sort();
    assert_eq!(
        created,
        [
            "contacts/tributary_contributions_stack_exchange",
            "contacts/tributary_first_seen_stack_exchange",
            "contacts/tributary_handle_stack_exchange",
            "contacts/tributary_last_seen_stack_exchange",
            "contacts/tributary_profile_stack_exchange",
            "contacts/tributary_user_id_stack_exchange",
        ]
    );
    assert!(hubspot.spec_violations().is_empty(), "{:#?}", hubspot.spec_violations());
}

#[tokio::test]
async fn merging_moves_the_notes_to_the_survivor_and_merging_again_is_done() {
    let h = harness().await;
    let maya = one_contact(&h).await;
    let rusty =
        done(h.crm.upsert_contacts(&[contact("social", "42", None, "rusty", "Rusty")]).await.unwrap())[0].clone();
    let activities = [
        activity(&maya, contribution("1", "Export to PDF?", "How do I export?")),
        activity(&rusty, contribution("2", "Slow sync", "Sync takes an hour.")),
        activity(&rusty, contribution("3", "Dark mode", "Please add dark mode.")),
    ];
    let notes = done(h.crm.upsert_activities(&activities).await.unwrap());

    h.crm.merge_contacts(&maya, &rusty).await.unwrap();
    let merges = h.requests_to("/contacts/merge");
    assert_eq!(merges.len(), 1);
    assert_eq!(merges[0].body, Some(json!({ "primaryObjectId": maya, "objectIdToMerge": rusty })));
    let contacts = h.hubspot.contacts();
    assert_eq!(contacts.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [maya.as_str()], "the merged one is gone");
    assert_eq!(contacts[0].get("tributary_handle_social"), Some("rusty"), "the survivor gained the handle");
    assert_eq!(contacts[0].get("email"), Some("maya@example.com"));
    assert_eq!(h.hubspot.notes().len(), 3, "no note was copied");
    let mut expected: Vec<(String, String)> = notes.iter().map(|note| (note.clone(), maya.clone())).collect();
    expected.sort();
    assert_eq!(h.hubspot.associations(), expected, "every note is on the survivor, once");
    assert_eq!(h.hubspot.merged_into(&rusty), Some(maya.clone()));

    // A replay after a crash: HubSpot refuses, the merge is found done.
    h.crm.merge_contacts(&maya, &rusty).await.unwrap();
    assert_eq!(h.requests_to("/contacts/merge").iter().map(|r| r.status).collect::<Vec<_>>(), [200, 400]);
    assert_eq!(h.hubspot.contacts().len(), 1);
    assert_eq!(h.hubspot.associations(), expected);
    // Merging a contact into itself changes nothing and sends nothing.
    h.crm.merge_contacts(&maya, &maya).await.unwrap();
    assert_eq!(h.requests_to("/contacts/merge").len(), 2);

    // An unknown survivor is HubSpot's refusal, not a success.
    let other =
        done(h.crm.upsert_contacts(&[contact("social", "43", None, "other", "Other")]).await.unwrap())[0].clone();
    let error = h.crm.merge_contacts("99999999", &other).await.unwrap_err();
    assert!(matches!(&error, CrmError::Http(HttpError::Status { status: 404, .. })), "{error:?}");
    assert_eq!(h.hubspot.contacts().len(), 2);
    // The wrong way round: the survivor named was itself merged away.
    let error = h.crm.merge_contacts(&rusty, &maya).await.unwrap_err();
    assert!(
        matches!(&error, CrmError::Unsupported(message) if message.contains(&format!("itself merged into {maya}"))),
        "{error:?}"
    );
    // HubSpot merges into the contact a merged survivor id went into: the
    // result's id is not the survivor's, which is reported.
    let error = h.crm.merge_contacts(&rusty, &other).await.unwrap_err();
    assert!(matches!(&error, CrmError::Unsupported(message) if message.contains(&maya)), "{error:?}");
    assert_eq!(h.hubspot.contacts().len(), 1);
    h.assert_clean();
}

#[tokio::test]
async fn a_merge_that_gives_a_new_id_is_reported() {
    let h = harness().await;
    let maya = one_contact(&h).await;
    let rusty =
        done(h.crm.upsert_contacts(&[contact("social", "42", None, "rusty", "Rusty")]).await.unwrap())[0].clone();
    h.hubspot.merge_gives_new_id(true);
    let error = h.crm.merge_contacts(&maya, &rusty).await.unwrap_err();
    let new_id = h.hubspot.contacts()[0].id.clone();
    assert_ne!(new_id, maya);
    assert!(matches!(&error, CrmError::Unsupported(message) if message.contains(&new_id)), "{error:?}");
    h.assert_clean();
}

#[tokio::test]
async fn contact_properties_returns_the_values_that_are_set() {
    let h = harness().await;
    let maya = one_contact(&h).await;
    assert!(h.hubspot.set_contact_property(&maya, "lifecyclestage", "customer"));
    assert!(h.hubspot.set_contact_property(&maya, "company", "Acme & Co"));
    let names: Vec<String> =
        ["lifecyclestage", "company", "jobtitle", "tributary_handle_forum", "company"].map(String::from).to_vec();
    let found = h.crm.contact_properties(&maya, &names).await.unwrap();
    let expected: std::collections::BTreeMap<String, String> =
        [("company", "Acme & Co"), ("lifecyclestage", "customer"), ("tributary_handle_forum", "mayac")]
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .into();
    assert_eq!(found, expected);
    let reads = h.requests_to(&format!("/contacts/{maya}"));
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].query.as_deref(), Some("properties=company,jobtitle,lifecyclestage,tributary_handle_forum"));

    // No names, no request.
    assert!(h.crm.contact_properties(&maya, &[]).await.unwrap().is_empty());
    assert_eq!(h.requests_to(&format!("/contacts/{maya}")).len(), 1);
    // An unknown contact is an error, not an empty answer.
    let error = h.crm.contact_properties("99999999", &names).await.unwrap_err();
    assert!(matches!(&error, CrmError::Http(HttpError::Status { status: 404, .. })), "{error:?}");
    // A merged id reads as the contact it went into.
    let rusty =
        done(h.crm.upsert_contacts(&[contact("social", "42", None, "rusty", "Rusty")]).await.unwrap())[0].clone();
    h.crm.merge_contacts(&maya, &rusty).await.unwrap();
    let found = h.crm.contact_properties(&rusty, &names).await.unwrap();
    assert_eq!(found.get("company").map(String::as_str), Some("Acme & Co"));
    h.assert_clean();
}

#[tokio::test]
async fn deleting_notes_archives_them() {
    let h = harness().await;
    let contact_id = one_contact(&h).await;
    let activities = [
        activity(&contact_id, contribution("1", "Export to PDF?", "How do I export?")),
        activity(&contact_id, contribution("2", "Slow sync", "Sync takes an hour.")),
    ];
    let ids = done(h.crm.upsert_activities(&activities).await.unwrap());
    let deleted = done(h.crm.delete_activities(&ids).await.unwrap());
    assert_eq!(deleted.len(), 2);
    assert!(h.hubspot.notes().is_empty());
    assert_eq!(h.hubspot.archived_notes().len(), 2);
    assert!(h.hubspot.associations().is_empty());
    // Deleting them again (or ids HubSpot never had) is done.
    let again = done(h.crm.delete_activities(&[ids[0].clone(), "424242".into()]).await.unwrap());
    assert_eq!(again.len(), 2);
    let calls = h.requests_to("/notes/batch/archive");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].body.as_ref().unwrap()["inputs"], json!([{ "id": ids[0] }, { "id": ids[1] }]));
    h.assert_clean();
}
