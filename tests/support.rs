//! Support tools through the whole daemon: a Freshdesk ticket's requester
//! e-mail lands on the same CRM contact as the forum posts of the person
//! with that e-mail (identity across communities), with the file CRM.

mod common;

use common::{Setup, read_json, stderr};
use tributary_sdk::testkit::Fixture;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path, query_param},
};

/// A Freshdesk whose one ticket (the recorded `ticket_with_stats_requester`,
/// requester `dummyname@example.com`) has the recorded conversations.
async fn freshdesk() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/tickets"))
        .and(query_param("filter", "deleted"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!([])))
        .mount(&server)
        .await;
    let ticket = Fixture::load("freshdesk", "ticket_with_stats_requester").body;
    Mock::given(method("GET"))
        .and(path("/api/v2/tickets"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!([ticket])))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/tickets/1/conversations"))
        .respond_with(Fixture::load("freshdesk", "ticket_conversations").response())
        .mount(&server)
        .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_and_forum_posts_with_one_email_land_on_one_contact() {
    let forum = common::discourse(Fixture::load("discourse", "posts_latest").response()).await;
    // Discourse's `GET /u/{username}/emails.json` (admin only) for the posts' author.
    Mock::given(method("GET"))
        .and(path("/u/d11/emails.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "email": "DummyName@example.com", "secondary_emails": [], "unconfirmed_emails": []
        })))
        .mount(&forum)
        .await;
    let support = freshdesk().await;
    let setup = Setup::new();
    setup.write_config(&format!(
        r#"
[daemon]
state = "sqlite://{{dir}}/state.db"
[crm]
type = "file"
path = "{{dir}}/crm.json"
[sources.forum]
type = "discourse"
base_url = "{forum}"
api_key = {{ env = "TEST_DISCOURSE_KEY" }}
lookup_emails = true
schedule = "every 10m"
[sources.helpdesk]
type = "freshdesk"
base_url = "{support}"
api_key = {{ env = "TEST_FRESHDESK_KEY" }}
schedule = "every 10m"
since = "2016-01-01"
"#,
        forum = forum.uri(),
        support = support.uri()
    ));
    let env = [("TEST_DISCOURSE_KEY", "discourse-admin-key"), ("TEST_FRESHDESK_KEY", "freshdesk-key")];
    for source in ["forum", "helpdesk"] {
        let sync = setup.run(&["sync", source], &env);
        assert!(sync.status.success(), "{source}: {}", stderr(&sync));
    }
    let crm = read_json(&setup.path("crm.json")).expect("the file CRM was written");
    let contacts = crm["contacts"].as_object().unwrap();
    let people: Vec<_> = contacts
        .values()
        .filter(|c| c["email"].as_str().is_some_and(|e| e.eq_ignore_ascii_case("dummyname@example.com")))
        .collect();
    assert_eq!(people.len(), 1, "one contact for one e-mail: {crm:#}");
    let person = people[0];
    let platforms: Vec<&str> = crm["activities"]
        .as_object()
        .unwrap()
        .values()
        .filter(|a| a["contact_id"] == person["id"])
        .map(|a| a["platform"].as_str().unwrap())
        .collect();
    assert!(platforms.contains(&"discourse") && platforms.contains(&"freshdesk"), "{platforms:?}\n{crm:#}");
    let rollup = &person["rollup"];
    assert_eq!(rollup["platforms"], serde_json::json!(["discourse", "freshdesk"]), "{crm:#}");
    assert_eq!(rollup["contribution_count"].as_u64(), Some(platforms.len() as u64));

    // Nothing new: a second round writes nothing.
    for source in ["forum", "helpdesk"] {
        let again = setup.run(&["sync", source], &env);
        let stdout = String::from_utf8_lossy(&again.stdout);
        assert!(stdout.contains("0 new, 0 updated"), "{source}: {stdout}");
    }
}
