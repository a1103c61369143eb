//! No secret value appears in logs (trace level), `/status` or `/metrics`,
//! on the happy path or when the CRM refuses the credentials.

mod common;

use std::time::Duration;

use common::{Setup, eventually, hubspot_config};
use tributary_crm::hubspot::mock::MockHubSpot;
use tributary_sdk::testkit::Fixture;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

const HUBSPOT_TOKEN: &str = "pat-na1-SECRET-hubspot-7f3a9c";
const DISCOURSE_KEY: &str = "SECRET-discourse-key-41d2e8";
const WRONG_TOKEN: &str = "pat-na1-SECRET-wrong-token-0b5e";

/// Runs the daemon for a while and returns everything it showed.
async fn observe(setup: &Setup, env: &[(&str, &str)], until: impl FnMut() -> bool) -> String {
    let mut daemon = setup.start(env);
    daemon.wait_healthy(Duration::from_secs(10)).await;
    eventually(Duration::from_secs(15), until).await;
    let mut seen = String::new();
    for endpoint in ["/status", "/metrics", "/readyz"] {
        seen.push_str(&daemon.get(endpoint).await.1);
    }
    assert!(daemon.terminate(Duration::from_secs(20)).success());
    seen + &setup.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_status_and_metrics() {
    let forum = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/posts.json"))
        .respond_with(Fixture::load("discourse", "posts_latest").response())
        .mount(&forum)
        .await;
    let hubspot = MockHubSpot::start_with_token(HUBSPOT_TOKEN).await;
    let setup = Setup::new();
    let key_file = setup.path("discourse.key");
    std::fs::write(&key_file, format!("{DISCOURSE_KEY}\n")).unwrap();
    let sources = format!(
        "[sources.forum]\ntype = \"discourse\"\nbase_url = \"{}\"\napi_key = {{ file = \"{}\" }}\nschedule = \"every 1s\"\nmax_pages_per_poll = 1\n",
        forum.uri(),
        key_file.display()
    );
    setup.write_config(&hubspot_config(&hubspot.base_url(), "", &sources));
    let trace = [("RUST_LOG", "trace")];
    let crm_setup = setup.run(&["crm", "setup"], &[("TEST_HUBSPOT_TOKEN", HUBSPOT_TOKEN)]);
    assert!(crm_setup.status.success(), "{}", common::stderr(&crm_setup));

    // Happy path: the forum's posts land in HubSpot.
    let env = [trace[0], ("TEST_HUBSPOT_TOKEN", HUBSPOT_TOKEN)];
    let happy = observe(&setup, &env, || hubspot.notes().len() >= 12).await;
    assert!(hubspot.notes().len() >= 12, "nothing was delivered:\n{happy}");
    assert!(happy.contains("TRACE") || happy.contains("trace"), "trace logging was not on");

    // HubSpot refuses the token: errors everywhere, still no secret.
    let env = [trace[0], ("TEST_HUBSPOT_TOKEN", WRONG_TOKEN)];
    std::fs::remove_file(setup.path("daemon.log")).unwrap();
    let mut posts = Fixture::load("discourse", "posts_latest").body;
    posts["latest_posts"][0]["id"] = serde_json::Value::from(1000);
    forum.reset().await;
    Mock::given(method("GET"))
        .and(path("/posts.json"))
        .respond_with(ResponseTemplate::new(200).set_body_json(&posts))
        .mount(&forum)
        .await;
    let refused = observe(&setup, &env, || setup.log().contains("refused the credentials")).await;
    assert!(refused.contains("refused the credentials"), "the refusal was not reported:\n{refused}");
    assert!(refused.contains("\"reachable\":false"), "/status does not show the CRM down:\n{refused}");

    for secret in [HUBSPOT_TOKEN, DISCOURSE_KEY, WRONG_TOKEN] {
        for (name, text) in [("happy path", &happy), ("refused", &refused)] {
            assert!(
                !text.contains(secret),
                "{name}: a secret leaked:\n{}",
                text.lines().filter(|l| l.contains(secret)).collect::<Vec<_>>().join("\n")
            );
        }
    }
}
