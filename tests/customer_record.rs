//! The social customer record, end to end with the real binary, the demo
//! source and the file CRM: one person across communities is one contact
//! with correct rollups, look-alikes wait for review and merge without
//! duplicates when approved, and a forgotten person leaves no trace.
//!
//! The demo's personas: Maya posts on the forum and opens tickets with one
//! e-mail; `rustacean_42` is only a handle; Priya is in support by e-mail
//! and on social by handle; Léa is on the forum and on social by handles.
//! Priya's and Léa's accounts share a display name: weak evidence.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Setup, read_json, stderr};
use serde_json::Value;

fn demo_config(total: u64) -> String {
    format!(
        r#"
[daemon]
state = "sqlite://{{dir}}/state.db"
[crm]
type = "file"
path = "{{dir}}/crm.json"
[sources.demo]
type = "demo"
schedule = "every 1h"
seed = 42
per_page = 20
total = {total}
drain = true
"#
    )
}

fn sync(setup: &Setup) {
    let out = setup.run(&["sync", "demo"], &[]);
    assert!(out.status.success(), "sync failed: {}", stderr(&out));
}

fn crm(setup: &Setup) -> Value {
    read_json(&setup.path("crm.json")).expect("crm.json")
}

fn contacts(crm: &Value) -> &serde_json::Map<String, Value> {
    crm["contacts"].as_object().expect("contacts")
}

/// Live (not archived, not deleted) activities per contact id.
fn activities_by_contact(crm: &Value) -> BTreeMap<String, Vec<Value>> {
    let mut by: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for activity in crm["activities"].as_object().expect("activities").values() {
        if activity["archived"] == true || activity["deleted"] == true {
            continue;
        }
        by.entry(activity["contact_id"].as_str().unwrap_or("").to_owned()).or_default().push(activity.clone());
    }
    by
}

/// The contact whose identity or e-mail is `who`.
fn contact_of(crm: &Value, who: impl Fn(&Value) -> bool) -> Vec<&Value> {
    contacts(crm).values().filter(|c| who(c)).collect()
}

/// A contact's rollup holds exactly what its activities say.
fn check_rollup(contact: &Value, activities: &[Value]) {
    let rollup = &contact["rollup"];
    assert_eq!(rollup["contribution_count"], activities.len() as u64, "count of {contact}");
    let intents = |name: &str| activities.iter().filter(|a| a["intent"] == name).count() as u64;
    assert_eq!(rollup["questions"], intents("question"));
    assert_eq!(rollup["complaints"], intents("complaint"));
    assert_eq!(rollup["ideas"], intents("idea"));
    assert_eq!(rollup["praise"], intents("praise"));
    let mut per_platform: BTreeMap<String, u64> = BTreeMap::new();
    for activity in activities {
        *per_platform.entry(activity["platform"].as_str().unwrap_or("").to_owned()).or_default() += 1;
    }
    let written: BTreeMap<String, u64> = rollup["per_platform"]
        .as_array()
        .expect("per_platform")
        .iter()
        .map(|p| (p["platform"].as_str().unwrap_or("").to_owned(), p["contributions"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(written, per_platform, "per-platform counts of {contact}");
    for platform in rollup["per_platform"].as_array().expect("per_platform") {
        assert!(platform["handle"].is_string(), "each platform names the handle: {platform}");
        assert!(platform["profile_url"].is_string(), "and the profile: {platform}");
        assert!(platform["first_seen"].as_str() <= platform["last_seen"].as_str());
    }
    let last = activities.iter().max_by_key(|a| a["created_at"].as_str().unwrap_or("").to_owned()).expect("one");
    assert_eq!(rollup["last_url"], last["url"]);
    assert_eq!(rollup["last_platform"], last["platform"]);
    assert!(rollup["last_excerpt"].as_str().is_some_and(|e| !e.is_empty()));
}

fn pending(setup: &Setup) -> Vec<Value> {
    let out = setup.run(&["identity", "pending", "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("json")
}

fn display_names(review: &Value) -> (String, String) {
    (
        review["a"]["display_name"].as_str().unwrap_or("").to_owned(),
        review["b"]["display_name"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn one_person_across_communities_is_one_contact_and_lookalikes_wait_for_review() {
    let setup = Setup::new();
    setup.write_config(&demo_config(60));
    sync(&setup);

    let record = crm(&setup);
    let by_contact = activities_by_contact(&record);
    // Maya: forum and support with one e-mail, one contact with both.
    let maya = contact_of(&record, |c| c["email"] == "maya.chen@example.com");
    assert_eq!(maya.len(), 1);
    let maya_id = maya[0]["id"].as_str().expect("id");
    let platforms: BTreeSet<&str> = by_contact[maya_id].iter().map(|a| a["platform"].as_str().unwrap_or("")).collect();
    assert_eq!(platforms, BTreeSet::from(["demo-forum", "demo-support"]));
    // Every contact's rollup is what its activities say.
    for contact in contacts(&record).values() {
        let id = contact["id"].as_str().expect("id");
        check_rollup(contact, by_contact.get(id).map(Vec::as_slice).unwrap_or(&[]));
    }
    // A handle alone stays its own contact, and is nobody's look-alike.
    let rustacean = contact_of(&record, |c| c["handles"]["demo-social"] == "rustacean_42");
    assert_eq!(rustacean.len(), 1);
    assert!(rustacean[0]["email"].is_null());

    // Same display names on two platforms: queued, never merged.
    let queued = pending(&setup);
    let names: BTreeSet<(String, String)> = queued.iter().map(display_names).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            ("Léa Martin".to_owned(), "Léa Martin".to_owned()),
            ("Priya Natarajan".to_owned(), "Priya Natarajan".to_owned())
        ]),
        "{queued:#?}"
    );
    assert!(queued.iter().all(|r| r["evidence"].as_str().is_some_and(|e| e.contains("same display name"))));
    let priya = contact_of(&record, |c| c["name"] == "Priya Natarajan");
    assert_eq!(priya.len(), 2, "not merged before a person decides");
    let status = setup.run(&["status"], &[]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("identity pairs to review 2"), "{status:?}");
    let activities_before = activities_by_contact(&record).values().map(Vec::len).sum::<usize>();

    // Approving Priya's pair merges the contacts; the activities move, none is copied.
    let priya_review = queued.iter().find(|r| display_names(r).0 == "Priya Natarajan").expect("priya");
    let out = setup.run(&["identity", "approve", &priya_review["id"].to_string()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let record = crm(&setup);
    let by_contact = activities_by_contact(&record);
    let priya = contact_of(&record, |c| c["name"] == "Priya Natarajan");
    assert_eq!(priya.len(), 1, "one contact left");
    let priya_id = priya[0]["id"].as_str().expect("id");
    let platforms: BTreeSet<&str> = by_contact[priya_id].iter().map(|a| a["platform"].as_str().unwrap_or("")).collect();
    assert_eq!(platforms, BTreeSet::from(["demo-social", "demo-support"]));
    assert_eq!(by_contact.values().map(Vec::len).sum::<usize>(), activities_before, "no activity duplicated");
    check_rollup(priya[0], &by_contact[priya_id]);

    // Léa's pair is rejected: never queued again, her contacts stay apart.
    let lea_review = queued.iter().find(|r| display_names(r).0 == "Léa Martin").expect("lea");
    let out = setup.run(&["identity", "reject", &lea_review["id"].to_string()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Later contributions follow the links: Priya's land on the survivor.
    setup.write_config(&demo_config(120));
    sync(&setup);
    let record = crm(&setup);
    let by_contact = activities_by_contact(&record);
    assert_eq!(contact_of(&record, |c| c["name"] == "Priya Natarajan").len(), 1);
    assert_eq!(contact_of(&record, |c| c["name"] == "Léa Martin").len(), 2);
    assert!(pending(&setup).is_empty(), "decided pairs are not queued again");
    for contact in contacts(&record).values() {
        let id = contact["id"].as_str().expect("id");
        check_rollup(contact, by_contact.get(id).map(Vec::as_slice).unwrap_or(&[]));
    }
    assert_eq!(by_contact.values().map(Vec::len).sum::<usize>(), 120, "each contribution exactly once");
}

#[test]
fn an_administrator_links_a_handle_to_a_contact_before_it_is_seen() {
    let setup = Setup::new();
    setup.write_config(&demo_config(20));
    sync(&setup);
    let record = crm(&setup);
    let maya = contact_of(&record, |c| c["email"] == "maya.chen@example.com")[0]["id"].as_str().expect("id").to_owned();
    // A links file: rustacean_42 is Maya (said so by the company); a bad line names its line.
    std::fs::write(setup.path("links.txt"), format!("# who is who\ndemo-social:@rustacean_42   file:{maya}\n"))
        .unwrap();
    let out = setup.run(&["identity", "link", "--file", setup.path("links.txt").to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(setup.path("bad.txt"), "\n\nreddit:alice\n").unwrap();
    let out = setup.run(&["identity", "link", "--file", setup.path("bad.txt").to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bad.txt:3"), "{}", stderr(&out));

    setup.write_config(&demo_config(80));
    sync(&setup);
    let record = crm(&setup);
    let with_handle = contact_of(&record, |c| c["handles"]["demo-social"] == "rustacean_42");
    assert_eq!(with_handle.len(), 1);
    assert_eq!(with_handle[0]["id"], maya.as_str(), "rustacean_42 is Maya's contact");
    let platforms: BTreeSet<String> =
        activities_by_contact(&record)[&maya].iter().map(|a| a["platform"].as_str().unwrap_or("").to_owned()).collect();
    assert!(platforms.contains("demo-social"), "rustacean_42's contributions land on Maya's contact: {platforms:?}");
    check_rollup(with_handle[0], &activities_by_contact(&record)[&maya]);
}

/// Every value of every row of every table, as text.
fn every_value(db: &std::path::Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(db).expect("open state");
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.len() >= 15, "every table: {tables:?}");
    let mut values = Vec::new();
    for table in tables {
        let mut statement = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let columns = statement.column_count();
        let mut rows = statement.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for column in 0..columns {
                let text = match row.get_ref(column).unwrap() {
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        String::from_utf8_lossy(t).into_owned()
                    }
                    rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                    rusqlite::types::ValueRef::Real(f) => f.to_string(),
                    rusqlite::types::ValueRef::Null => continue,
                };
                values.push((table.clone(), text));
            }
        }
    }
    values
}

#[test]
fn a_forgotten_person_leaves_no_trace_and_is_not_brought_back() {
    let setup = Setup::new();
    setup.write_config(&demo_config(60));
    sync(&setup);
    let record = crm(&setup);
    let maya = contact_of(&record, |c| c["email"] == "maya.chen@example.com")[0]["id"].as_str().expect("id").to_owned();
    let maya_activities = activities_by_contact(&record)[&maya].clone();
    assert!(maya_activities.len() >= 5);
    // What would betray her: her e-mail, handle, name, identities and the addresses of her posts.
    let needles: Vec<String> = vec![
        "maya.chen@example.com".into(),
        "mayac".into(),
        "Maya Chen".into(),
        "maya-forum".into(),
        "maya-support".into(),
    ];
    // Addresses as JSON strings or whole values: `/items/3` must not match `/items/30`.
    let urls: Vec<String> = maya_activities.iter().map(|a| a["url"].as_str().expect("url").to_owned()).collect();
    let betrays = |value: &str| -> Option<String> {
        needles
            .iter()
            .find(|n| value.contains(n.as_str()))
            .cloned()
            .or_else(|| urls.iter().find(|u| value == u.as_str() || value.contains(&format!("\"{u}\""))).cloned())
    };
    let before = every_value(&setup.path("state.db"));
    assert!(
        needles.iter().chain(&urls).all(|n| before.iter().any(|(_, v)| v.contains(n.as_str()))),
        "the store knew her before"
    );

    let out = setup.run(&["forget", "Maya.Chen@example.com"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("forgot 2 identit"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let check_no_trace = |when: &str| {
        for (table, value) in every_value(&setup.path("state.db")) {
            if let Some(needle) = betrays(&value) {
                panic!("{when}: `{needle}` still in table {table}: {value}");
            }
        }
    };
    check_no_trace("after forget");
    // Her activities left the CRM's timeline; the contact stays, without Tributary's figures.
    let record = crm(&setup);
    assert!(!activities_by_contact(&record).contains_key(&maya));
    assert_eq!(contacts(&record)[&maya]["rollup"]["contribution_count"], 0);

    // Later polls (the same items again and new ones) do not bring her back.
    setup.write_config(&demo_config(120));
    sync(&setup);
    check_no_trace("after polling again");
    let record = crm(&setup);
    assert!(!activities_by_contact(&record).contains_key(&maya), "nothing new on her contact");
    assert!(contact_of(&record, |c| c["email"] == "maya.chen@example.com").len() <= 1, "no second contact for her");
}

/// Each alert the mock webhook received: (post address, intent, platform).
async fn alerts_received(hook: &wiremock::MockServer) -> Vec<(String, String, String)> {
    hook.received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|request| {
            let body: Value = serde_json::from_slice(&request.body).expect("alert json");
            let c = &body["contribution"];
            assert_eq!(body["rule"], "unhappy_support");
            assert!(body["contact"]["url"].as_str().is_some_and(|u| u.starts_with("https://crm.example/contacts/")));
            (
                c["url"].as_str().unwrap_or("").to_owned(),
                c["intent"].as_str().unwrap_or("").to_owned(),
                c["platform"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fires_once_per_matching_contribution_across_restarts() {
    let hook = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/hooks/alerts"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&hook)
        .await;
    let setup = Setup::new();
    let config = |total: u64| {
        demo_config(total).replace(
            "[sources.demo]",
            r#"contact_url = "https://crm.example/contacts/{contact_id}"

[alerts.unhappy_support]
destination = "webhook"
url = { env = "ALERT_HOOK_URL" }
intent = ["complaint"]
platforms = ["demo-support"]
max_per_hour = 1000

[sources.demo]"#,
        )
    };
    let url = format!("{}/hooks/alerts", hook.uri());
    let env = [("ALERT_HOOK_URL", url.as_str())];
    let mut expected_total = 0;
    // Three processes: the first items, then more (a restart), then the same again.
    for total in [40, 80, 80] {
        setup.write_config(&config(total));
        let out = setup.run(&["sync", "demo"], &env);
        assert!(out.status.success(), "{}", stderr(&out));
        let record = crm(&setup);
        let expected: BTreeSet<String> = record["activities"]
            .as_object()
            .expect("activities")
            .values()
            .filter(|a| a["platform"] == "demo-support" && a["intent"] == "complaint")
            .map(|a| a["url"].as_str().unwrap_or("").to_owned())
            .collect();
        let received = alerts_received(&hook).await;
        let urls: BTreeSet<String> = received.iter().map(|(url, _, _)| url.clone()).collect();
        assert_eq!(urls.len(), received.len(), "at most once per contribution: {received:?}");
        assert_eq!(urls, expected, "every matching contribution, and only those");
        assert!(received.iter().all(|(_, intent, platform)| intent == "complaint" && platform == "demo-support"));
        assert!(expected.len() >= expected_total);
        expected_total = expected.len();
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&url), "the hook's address is a secret");
        assert!(!stderr(&out).contains("/hooks/alerts"), "the hook's address is a secret");
    }
    assert!(expected_total >= 3, "the demo has unhappy tickets: {expected_total}");
}
