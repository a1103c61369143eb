//! Bad input from a platform: malformed JSON, invalid UTF-8, HTML with
//! scripts, a 10 MB body. A clear error or a quarantine, never a panic; the
//! rest of the page goes on; no script reaches the CRM unescaped.

mod common;

use common::{Setup, discourse, hubspot_bodies, hubspot_config, stderr};
use serde_json::Value;
use tributary_crm::hubspot::mock::MockHubSpot;
use tributary_sdk::testkit::Fixture;
use wiremock::{MockServer, ResponseTemplate};

const TOKEN: &str = "bad-input-token";

fn setup_for(discourse: &MockServer, hubspot: &MockHubSpot) -> Setup {
    let setup = Setup::new();
    let sources =
        format!("[sources.forum]\ntype = \"discourse\"\nbase_url = \"{}\"\nschedule = \"every 2m\"\n", discourse.uri());
    setup.write_config(&hubspot_config(&hubspot.base_url(), "", &sources));
    let crm_setup = setup.run(&["crm", "setup"], &[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    assert!(crm_setup.status.success(), "{}", stderr(&crm_setup));
    setup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_items_are_quarantined_scripts_are_escaped_and_the_rest_lands() {
    let mut posts = Fixture::load("discourse", "posts_latest").body;
    let list = posts["latest_posts"].as_array_mut().unwrap();
    let total = list.len();
    // One post without an id, one with a date that is no date, one full of script.
    list[1].as_object_mut().unwrap().remove("id");
    list[2]["created_at"] = Value::from("yesterday-ish");
    list[3]["cooked"] = Value::from(
        "<p>Nice <script>alert('xss')</script><img src=x onerror=\"alert(1)\"> &lt;script&gt;fetch('//evil')&lt;/script&gt;</p>",
    );
    let forum = discourse(ResponseTemplate::new(200).set_body_json(&posts)).await;
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;
    let setup = setup_for(&forum, &hubspot);

    let sync = setup.run(&["sync", "forum"], &[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    assert!(sync.status.success(), "{}", stderr(&sync));
    let stdout = String::from_utf8_lossy(&sync.stdout);
    assert!(stdout.contains("2 quarantined"), "{stdout}");
    assert_eq!(hubspot.notes().len(), total - 2, "the rest of the page went on");

    let bodies = hubspot_bodies(&hubspot);
    assert!(!bodies.to_lowercase().contains("<script"), "a script tag reached HubSpot");
    assert!(!bodies.contains("<img"), "markup from the platform reached HubSpot");
    // The text that *looked like* a script is still there, escaped.
    assert!(bodies.contains("&lt;script&gt;fetch"), "escaped text missing");
    let status = setup.run(&["status", "--json"], &[]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["totals"]["quarantined"], 2);
}

/// A whole response that cannot be read: the sync fails with a clear
/// message, does not panic, stores nothing and moves no cursor.
async fn check_unreadable(response: ResponseTemplate, expected: &str) {
    let forum = discourse(response).await;
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;
    let setup = setup_for(&forum, &hubspot);
    let sync = setup.run(&["sync", "forum"], &[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    let err = stderr(&sync);
    assert_eq!(sync.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(expected), "expected {expected:?} in {err}");
    assert!(hubspot.notes().is_empty());
    let status = setup.run(&["status", "--json"], &[]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["totals"]["backlog"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_responses_are_clear_errors() {
    check_unreadable(
        ResponseTemplate::new(200).set_body_raw(b"{\"latest_posts\": [{\"id\": 1,".to_vec(), "application/json"),
        "cannot read",
    )
    .await;
    check_unreadable(
        ResponseTemplate::new(200).set_body_raw(b"{\"latest_posts\": \"\xff\xfe\"}".to_vec(), "application/json"),
        "cannot read",
    )
    .await;
    check_unreadable(
        ResponseTemplate::new(200).set_body_raw(vec![b' '; 10 * 1024 * 1024], "application/json"),
        "larger than",
    )
    .await;
}
