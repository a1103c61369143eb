//! The one-shot commands and the readiness check: `check --connect`,
//! `sync --dry-run`, `sync --since`, and `/readyz` when a source keeps failing.

mod common;

use std::time::Duration;

use common::{Setup, hubspot_config, stderr};
use tributary_crm::hubspot::mock::MockHubSpot;
use tributary_sdk::testkit::Fixture;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

const TOKEN: &str = "ops-token";

async fn forum() -> MockServer {
    common::discourse(Fixture::load("discourse", "posts_latest").response()).await
}

fn setup(forum: &MockServer, hubspot: &MockHubSpot) -> Setup {
    let setup = Setup::new();
    let sources =
        format!("[sources.forum]\ntype = \"discourse\"\nbase_url = \"{}\"\nschedule = \"every 2m\"\n", forum.uri());
    setup.write_config(&hubspot_config(&hubspot.base_url(), "", &sources));
    setup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_connect_tries_every_credential() {
    let forum = forum().await;
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;
    let setup = setup(&forum, &hubspot);

    let good = setup.run(&["check", "--connect"], &[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    let out = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{out}{}", stderr(&good));
    assert!(out.contains("crm (hubspot): ok") && out.contains("source forum (discourse): ok"), "{out}");

    let bad = setup.run(&["check", "--connect"], &[("TEST_HUBSPOT_TOKEN", "not-the-token")]);
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(69), "EX_UNAVAILABLE expected: {out}");
    assert!(out.contains("crm (hubspot): FAILED") && out.contains("refused the credentials"), "{out}");
    assert!(!out.contains("not-the-token") && !stderr(&bad).contains("not-the-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_what_would_be_written_and_stores_and_sends_nothing() {
    let forum = forum().await;
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;
    let setup = setup(&forum, &hubspot);
    let dry = setup.run(&["sync", "forum", "--dry-run"], &[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&dry.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 12);
    assert!(lines.iter().all(|c| c["signals"]["intent"].is_string() && c["source"] == "forum"));
    assert!(hubspot.requests().is_empty(), "a dry run talked to the CRM");
    let status = setup.run(&["status", "--json"], &[]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["totals"]["backlog"], 0);
    assert_eq!(status["sources"].as_array().map(Vec::len), Some(0), "a dry run stored a cursor: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_since_goes_back_no_further_than_the_date() {
    let forum = forum().await;
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;
    hubspot.accept_unknown_properties(true);
    let setup = setup(&forum, &hubspot);
    // Without the rescan, only the cursor decides what a later pass sees.
    let config = std::fs::read_to_string(setup.path("config.toml")).unwrap();
    std::fs::write(
        setup.path("config.toml"),
        config.replace("schedule = \"every 2m\"", "schedule = \"every 2m\"\nrescan_latest = false"),
    )
    .unwrap();
    // The recorded posts run from 2019-10-09 to 2019-10-23.
    let posts = Fixture::load("discourse", "posts_latest").body;
    let since = "2019-10-22T00:00:00Z";
    let expected =
        posts["latest_posts"].as_array().unwrap().iter().filter(|p| p["created_at"].as_str().unwrap() >= since).count();
    assert!(expected > 0 && expected < 12);
    let sync = setup.run(&["sync", "forum", "--since", since], &[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    assert!(sync.status.success(), "{}", stderr(&sync));
    assert_eq!(hubspot.notes().len(), expected, "{}", String::from_utf8_lossy(&sync.stdout));

    // A later backfill goes further back, past the stored cursor.
    let backfill = setup.run(&["sync", "forum", "--since", "2019-01-01"], &[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    assert!(backfill.status.success(), "{}", stderr(&backfill));
    assert_eq!(hubspot.notes().len(), 12, "{}", String::from_utf8_lossy(&backfill.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_a_source_fails_past_its_threshold() {
    let broken = MockServer::start().await;
    Mock::given(method("GET")).respond_with(ResponseTemplate::new(404)).mount(&broken).await;
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;
    let setup = Setup::new();
    let sources = format!(
        "[sources.forum]\ntype = \"discourse\"\nbase_url = \"{}\"\nschedule = \"every 1s\"\njitter = \"0s\"\n",
        broken.uri()
    );
    let config = hubspot_config(&hubspot.base_url(), "", &sources)
        .replace("max_attempts = 10", "max_attempts = 10\nfailure_threshold = 2");
    setup.write_config(&config);
    let mut daemon = setup.start(&[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    daemon.wait_healthy(Duration::from_secs(10)).await;
    let mut body = String::new();
    let mut failed = false;
    for _ in 0..50 {
        let (status, text) = daemon.get("/readyz").await;
        if status == 503 {
            failed = true;
            body = text;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(failed, "/readyz never failed\n{}", setup.log());
    assert!(body.contains("source `forum` failed"), "{body}");
    let (_, status) = daemon.get("/status").await;
    assert!(status.contains("HTTP 404"), "/status shows the error: {status}");
    assert_eq!(daemon.get("/healthz").await.0, 200, "alive while not ready");
    assert!(daemon.terminate(Duration::from_secs(20)).success());
}
