//! CRM faults: 429 with Retry-After, 5xx, timeouts, and a record the CRM
//! refuses. Everything else is delivered once; the refused record is a
//! dead letter with HubSpot's message until it is fixed and retried.

mod common;

use std::time::Duration;

use common::{Setup, hubspot_config, stderr};
use tributary_crm::hubspot::mock::{Fault, MockHubSpot, RateLimitPolicy};

const TOKEN: &str = "faults-test-token";
const TOTAL: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_retried_without_duplicates_and_refusals_are_dead_lettered_until_retried() {
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;
    let setup = Setup::new();
    let sources =
        format!("[sources.demo]\ntype = \"demo\"\nschedule = \"every 1h\"\nper_page = {TOTAL}\ntotal = {TOTAL}\n");
    setup.write_config(&hubspot_config(&hubspot.base_url(), "timeout = \"1s\"", &sources));
    let env = [("TEST_HUBSPOT_TOKEN", TOKEN)];
    let crm_setup = setup.run(&["crm", "setup"], &env);
    assert!(crm_setup.status.success(), "{}", common::stderr(&crm_setup));

    // Jonas's e-mail fails HubSpot's validation; the first requests meet a
    // 429 with Retry-After, two 503s and an answer slower than the timeout.
    hubspot.reject_email("jonas.weber@example.org");
    hubspot.fail_next(1, Fault::RateLimited { retry_after_secs: Some(2), policy: RateLimitPolicy::TenSecondlyRolling });
    hubspot.fail_next(2, Fault::ServerError(503));
    hubspot.fail_next(1, Fault::Delay(Duration::from_millis(1500)));

    let sync = setup.run(&["sync", "demo"], &env);
    assert!(sync.status.success(), "{}", stderr(&sync));
    eprintln!("sync: {}\n{}", String::from_utf8_lossy(&sync.stdout), stderr(&sync));

    // No request arrived before the Retry-After had passed.
    let requests = hubspot.requests();
    let limited = requests.iter().position(|r| r.status == 429).expect("the 429 was served");
    let next = &requests[limited + 1];
    assert!(
        next.received_at.duration_since(requests[limited].received_at) >= Duration::from_secs(2),
        "a request came {:?} after a Retry-After of 2 s",
        next.received_at.duration_since(requests[limited].received_at)
    );

    let jonas_items = hubspot_bodies_count(&setup);
    let notes = hubspot.notes();
    assert_eq!(notes.len() + jonas_items, TOTAL, "everything but Jonas's contributions landed");
    assert!(jonas_items > 0, "the demo stream has contributions of Jonas");

    let list = setup.run(&["dead-letters", "list"], &env);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert_eq!(listed.lines().count(), jonas_items, "{listed}");
    assert!(
        listed.contains("INVALID_EMAIL") || listed.contains("jonas.weber@example.org"),
        "the CRM's message is kept: {listed}"
    );

    // Fixed on the CRM side: a retry delivers them, once.
    hubspot.clear_rejections();
    let retry = setup.run(&["dead-letters", "retry", "--all"], &env);
    assert!(retry.status.success(), "{}", stderr(&retry));
    assert_eq!(
        hubspot.notes().len(),
        TOTAL,
        "{}\n{}",
        String::from_utf8_lossy(&retry.stdout),
        String::from_utf8_lossy(&setup.run(&["dead-letters", "list"], &env).stdout)
    );
    let writes = hubspot.write_calls();
    let again = setup.run(&["dead-letters", "retry", "--all"], &env);
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 dead letter(s)"));
    assert_eq!(hubspot.write_calls(), writes);
    assert!(hubspot.spec_violations().is_empty(), "{:#?}", hubspot.spec_violations());
}

/// How many contributions of the stream are Jonas's (from `status --json`'s dead letters).
fn hubspot_bodies_count(setup: &Setup) -> usize {
    let output = setup.run(&["status", "--json"], &[("TEST_HUBSPOT_TOKEN", TOKEN)]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    status["totals"]["dead_letters"].as_u64().unwrap() as usize
}
