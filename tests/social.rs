//! A social source through the whole daemon: Hacker News search replayed
//! from the recorded Algolia answers, into the file CRM.

mod common;

use common::{Setup, read_json, stderr};
use tributary_sdk::testkit::Fixture;
use wiremock::{
    Mock, MockServer,
    matchers::{method, path, query_param},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hacker_news_mentions_land_on_contacts_in_the_crm() {
    let algolia = MockServer::start().await;
    for tag in ["story", "comment"] {
        Mock::given(method("GET"))
            .and(path("/search_by_date"))
            .and(query_param("tags", tag))
            .respond_with(Fixture::load("hackernews", &format!("search_by_date_{tag}")).response())
            .mount(&algolia)
            .await;
    }
    let setup = Setup::new();
    setup.write_config(&format!(
        r#"
[daemon]
state = "sqlite://{{dir}}/state.db"
[crm]
type = "file"
path = "{{dir}}/crm.json"
[sources.hn]
type = "hackernews"
base_url = "{}"
terms = ["acme"]
schedule = "every 10m"
"#,
        algolia.uri()
    ));
    let sync = setup.run(&["sync", "hn"], &[]);
    assert!(sync.status.success(), "{}", stderr(&sync));
    let crm = read_json(&setup.path("crm.json")).expect("the file CRM was written");
    let activities = crm["activities"].as_object().unwrap();
    assert_eq!(activities.len(), 2, "one story and one comment: {crm:#}");
    assert!(activities.values().all(|a| a["platform"] == "hackernews" && a["intent"].is_string()));
    let contacts = crm["contacts"].as_object().unwrap();
    assert!(contacts.values().all(|c| c["handles"]["hackernews"].is_string()), "{crm:#}");

    // Nothing new: a second sync writes nothing more.
    let again = setup.run(&["sync", "hn"], &[]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("0 new, 0 updated"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}
