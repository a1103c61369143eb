//! The quick start: the demo config on a bare machine.

mod common;

use std::time::Duration;

use common::{Setup, eventually, read_json};

#[tokio::test]
async fn the_demo_config_fills_the_file_crm_within_15_seconds_and_every_endpoint_answers() {
    let setup = Setup::new();
    // The shipped demo config, with its paths and port moved into a temporary folder.
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml")).unwrap();
    let demo = demo
        .replace("sqlite://tributary-demo/state.db", "sqlite://{dir}/state.db")
        .replace("\"tributary-demo/crm.json\"", "\"{dir}/crm.json\"")
        .replace("127.0.0.1:9464", "127.0.0.1:{port}");
    setup.write_config(&demo);
    let mut daemon = setup.start(&[]);
    daemon.wait_healthy(Duration::from_secs(10)).await;

    let crm_path = setup.path("crm.json");
    let filled = eventually(Duration::from_secs(15), || {
        read_json(&crm_path).is_some_and(|crm| {
            let contacts = crm["contacts"].as_object().map_or(0, |c| c.len());
            let activities = crm["activities"].as_object().map_or(0, |a| a.len());
            let rollups =
                crm["contacts"].as_object().map_or(0, |c| c.values().filter(|c| !c["rollup"].is_null()).count());
            contacts >= 5 && activities >= 20 && rollups == contacts
        })
    })
    .await;
    assert!(filled, "file CRM not filled in time: {:?}\n{}", read_json(&crm_path), setup.log());

    let crm = read_json(&crm_path).unwrap();
    // Maya writes on the forum and in support with one e-mail: one contact, two platforms.
    let maya: Vec<_> =
        crm["contacts"].as_object().unwrap().values().filter(|c| c["email"] == "maya.chen@example.com").collect();
    assert_eq!(maya.len(), 1);
    assert_eq!(maya[0]["rollup"]["platforms"].as_array().unwrap().len(), 2);
    let activity = crm["activities"].as_object().unwrap().values().next().unwrap();
    assert!(activity["intent"].is_string() && activity["sentiment"].is_number() && activity["language"] == "eng");

    let (status, body) = daemon.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = daemon.get("/status").await;
    assert_eq!(status, 200);
    let status_json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status_json["sources"][0]["name"], "demo");
    assert!(status_json["sources"][0]["delivered"].as_u64().unwrap() >= 20, "{body}");
    let (status, metrics) = daemon.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("tributary_delivered_total{outcome=\"delivered\"}"), "{metrics}");
    assert!(metrics.contains("tributary_outbox_backlog"), "{metrics}");

    let exit = daemon.terminate(Duration::from_secs(20));
    assert!(exit.success(), "SIGTERM must drain and exit 0, got {exit}\n{}", setup.log());
    assert!(setup.log().contains("stopped"));
}

#[tokio::test]
async fn sighup_reloads_the_configuration_without_stopping() {
    let setup = Setup::new();
    let config = r#"
[daemon]
state = "sqlite://{dir}/state.db"
listen = "127.0.0.1:{port}"
delivery_interval = "200ms"
[crm]
type = "file"
path = "{dir}/crm.json"
[sources.first]
type = "demo"
schedule = "every 1s"
jitter = "0s"
total = 10
"#;
    setup.write_config(config);
    let mut daemon = setup.start(&[]);
    daemon.wait_healthy(Duration::from_secs(10)).await;
    let crm_path = setup.path("crm.json");
    assert!(
        eventually(Duration::from_secs(10), || read_json(&crm_path)
            .is_some_and(|c| c["activities"].as_object().map_or(0, |a| a.len()) == 10))
        .await
    );

    // Add a second source, then SIGHUP.
    setup.write_config(
        &(config.to_owned() + "[sources.second]\ntype = \"demo\"\nschedule = \"every 1s\"\nseed = 7\ntotal = 5\n"),
    );
    daemon.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || read_json(&crm_path)
            .is_some_and(|c| c["activities"].as_object().map_or(0, |a| a.len()) == 15))
        .await,
        "the reloaded source did not deliver\n{}",
        setup.log()
    );
    // An invalid config on reload is refused and the daemon keeps running.
    std::fs::write(setup.path("config.toml"), "[daemon\n").unwrap();
    daemon.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(daemon.get("/healthz").await.0, 200);
    assert!(setup.log().contains("keeping the old one"), "{}", setup.log());
    assert!(daemon.terminate(Duration::from_secs(20)).success());
}
