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

/// The recorded `ticket_with_stats_requester` (requester `dummyname@example.com`).
fn ticket() -> serde_json::Value {
    Fixture::load("freshdesk", "ticket_with_stats_requester").body
}

/// Serves `live` as the ticket list and `deleted` as `filter=deleted`, with
/// the recorded conversations of ticket 1.
async fn serve_freshdesk(server: &MockServer, live: Vec<serde_json::Value>, deleted: Vec<serde_json::Value>) {
    server.reset().await;
    Mock::given(method("GET"))
        .and(path("/api/v2/tickets"))
        .and(query_param("filter", "deleted"))
        .respond_with(ResponseTemplate::new(200).set_body_json(deleted))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/tickets"))
        .respond_with(ResponseTemplate::new(200).set_body_json(live))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v2/tickets/1/conversations"))
        .respond_with(Fixture::load("freshdesk", "ticket_conversations").response())
        .mount(server)
        .await;
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
    let support = MockServer::start().await;
    serve_freshdesk(&support, vec![ticket()], vec![]).await;
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
on_delete = "archive"
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

    // The ticket is updated: its activity is rewritten, not added.
    let ticket_activity = |crm: &serde_json::Value| {
        crm["activities"]
            .as_object()
            .unwrap()
            .values()
            .find(|a| a["platform"] == "freshdesk" && a["kind"] == "ticket")
            .cloned()
            .expect("the ticket's activity")
    };
    let activities = crm["activities"].as_object().unwrap().len();
    let mut updated = ticket();
    updated["description_text"] = "This is a sample ticket. Update: still broken after the upgrade.".into();
    updated["description"] = "<div>This is a sample ticket. Update: still broken after the upgrade.</div>".into();
    updated["updated_at"] = "2016-05-20T09:00:00Z".into();
    serve_freshdesk(&support, vec![updated.clone()], vec![]).await;
    let sync = setup.run(&["sync", "helpdesk"], &env);
    assert!(String::from_utf8_lossy(&sync.stdout).contains("1 updated"), "{}", String::from_utf8_lossy(&sync.stdout));
    let crm = read_json(&setup.path("crm.json")).unwrap();
    assert_eq!(crm["activities"].as_object().unwrap().len(), activities, "an update added an activity");
    let activity = ticket_activity(&crm);
    assert!(activity["body"].as_str().unwrap().contains("still broken"), "{activity:#}");
    assert_eq!(activity["revisions"], 1);

    // The ticket is deleted in Freshdesk: `on_delete = "archive"` archives its activity.
    updated["deleted"] = true.into();
    serve_freshdesk(&support, vec![], vec![updated]).await;
    let sync = setup.run(&["sync", "helpdesk"], &env);
    assert!(sync.status.success(), "{}", stderr(&sync));
    let crm = read_json(&setup.path("crm.json")).unwrap();
    let activity = ticket_activity(&crm);
    assert_eq!(activity["archived"], true, "{activity:#}");
    assert!(activity["body"].as_str().unwrap().contains("still broken"), "archived as it was");
    let person = crm["contacts"].as_object().unwrap().values().find(|c| c["id"] == activity["contact_id"]).unwrap();
    assert_eq!(person["rollup"]["contribution_count"].as_u64(), Some(platforms.len() as u64 - 1), "{person:#}");
}
