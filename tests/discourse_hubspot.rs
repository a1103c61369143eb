//! End to end: the binary against a mock Discourse replaying the recorded
//! `/posts.json` and a mock HubSpot that checks every body against the spec.

mod common;

use common::{Setup, hubspot_config, stderr};
use serde_json::Value;
use tributary_crm::hubspot::mock::MockHubSpot;
use tributary_sdk::testkit::Fixture;
use wiremock::ResponseTemplate;

const TOKEN: &str = "pat-na1-test-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cycle_lands_contacts_notes_and_associations_then_nothing_is_written_twice_and_edits_update() {
    let posts = Fixture::load("discourse", "posts_latest").body;
    let recorded = posts["latest_posts"].as_array().unwrap().clone();
    let users: std::collections::BTreeSet<_> =
        recorded.iter().map(|p| p["username"].as_str().unwrap().to_owned()).collect();
    let discourse = common::discourse(ResponseTemplate::new(200).set_body_json(&posts)).await;
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;

    let setup = Setup::new();
    let sources = format!(
        "[sources.community]\ntype = \"discourse\"\nbase_url = \"{}\"\napi_key = {{ env = \"TEST_DISCOURSE_KEY\" }}\nschedule = \"every 2m\"\n",
        discourse.uri()
    );
    setup.write_config(&hubspot_config(&hubspot.base_url(), "", &sources));
    let env = [("TEST_HUBSPOT_TOKEN", TOKEN), ("TEST_DISCOURSE_KEY", "discourse-key")];

    // The custom properties first, twice: the second run creates nothing.
    let first = setup.run(&["crm", "setup"], &env);
    assert!(first.status.success(), "{}", stderr(&first));
    let second = setup.run(&["crm", "setup"], &env);
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("0 created"),
        "{}",
        String::from_utf8_lossy(&second.stdout)
    );

    let sync = setup.run(&["sync", "community"], &env);
    assert!(sync.status.success(), "{}", stderr(&sync));
    let notes = hubspot.notes();
    assert_eq!(notes.len(), recorded.len(), "one note per post");
    assert_eq!(hubspot.contacts().len(), users.len(), "one contact per forum user");
    let associations = hubspot.associations();
    assert_eq!(associations.len(), recorded.len(), "every note associated: {associations:?}");
    // Post 29 (user d11) is on the note of d11's contact.
    let d11 =
        hubspot.contacts().into_iter().find(|c| c.properties.values().any(|v| v == "d11")).expect("contact of d11");
    let note_29 = notes
        .values()
        .find(|n| n.get("hs_note_body").is_some_and(|b| b.contains("Here is a mention")))
        .expect("note of post 29");
    assert!(associations.contains(&(note_29.id.clone(), d11.id.clone())), "{associations:?}");
    assert!(hubspot.spec_violations().is_empty(), "{:#?}", hubspot.spec_violations());

    // A second cycle with nothing new: zero CRM write calls.
    let writes = hubspot.write_calls();
    let again = setup.run(&["sync", "community"], &env);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(hubspot.write_calls(), writes, "unchanged posts were written again");

    // Post 29 is edited: its note is updated, no note is added.
    let mut edited = posts.clone();
    let post = &mut edited["latest_posts"][0];
    assert_eq!(post["id"], 29);
    post["cooked"] = Value::from("<p>Edited: the mention is gone.</p>");
    post["raw"] = Value::from("Edited: the mention is gone.");
    post["version"] = Value::from(2);
    post["updated_at"] = Value::from("2019-10-24T10:00:00.000Z");
    common::serve_discourse(&discourse, ResponseTemplate::new(200).set_body_json(&edited)).await;
    let third = setup.run(&["sync", "community"], &env);
    assert!(third.status.success(), "{}", stderr(&third));
    let notes_after = hubspot.notes();
    assert_eq!(notes_after.len(), recorded.len(), "the edit added a note");
    let updated = notes_after.values().find(|n| n.id == note_29.id).unwrap();
    assert!(updated.get("hs_note_body").unwrap().contains("Edited: the mention is gone."), "{updated:?}");
    assert!(hubspot.write_calls() > writes);
    assert!(hubspot.spec_violations().is_empty(), "{:#?}", hubspot.spec_violations());
}
