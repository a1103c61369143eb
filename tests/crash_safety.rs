//! SIGKILL at random points during a sync of 5,000 contributions, 20 times:
//! at the end every contribution is in the CRM exactly once.

mod common;

use std::time::Duration;

use common::{Setup, eventually, hubspot_config};
use tributary_crm::hubspot::mock::MockHubSpot;

const TOKEN: &str = "crash-test-token";
const TOTAL: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twenty_times_every_contribution_lands_exactly_once() {
    let hubspot = MockHubSpot::start_with_token(TOKEN).await;
    let setup = Setup::new();
    let sources = format!(
        "[sources.load]\ntype = \"demo\"\nschedule = \"every 1s\"\njitter = \"0s\"\nseed = 3\nper_page = 250\ntotal = {TOTAL}\ndrain = true\n"
    );
    setup.write_config(&hubspot_config(&hubspot.base_url(), "", &sources));
    let env = [("TEST_HUBSPOT_TOKEN", TOKEN)];
    let crm_setup = setup.run(&["crm", "setup"], &env);
    assert!(crm_setup.status.success(), "{}", common::stderr(&crm_setup));

    // A fixed seed: the same kill points on every run.
    let mut seed: u64 = 0x5eed;
    for round in 0..20 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let after = Duration::from_millis(150 + (seed >> 33) % 900);
        let mut daemon = setup.start(&env);
        daemon.wait_healthy(Duration::from_secs(10)).await;
        tokio::time::sleep(after).await;
        daemon.kill();
        eprintln!("round {round}: killed after {after:?}, {} notes so far", hubspot.notes().len());
    }

    let mut daemon = setup.start(&env);
    daemon.wait_healthy(Duration::from_secs(10)).await;
    let done = eventually(Duration::from_secs(120), || hubspot.notes().len() >= TOTAL).await;
    assert!(done, "only {} of {TOTAL} notes\n{}", hubspot.notes().len(), setup.log());
    // Let in-flight work settle, then look again: nothing more may appear.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, status) = daemon.get("/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(daemon.terminate(Duration::from_secs(30)).success());

    let notes = hubspot.notes();
    assert_eq!(notes.len(), TOTAL, "a contribution was written twice or lost");
    let ids: std::collections::BTreeSet<_> = notes.values().map(|n| n.id.clone()).collect();
    assert_eq!(ids.len(), TOTAL, "two keys share a note");
    // The demo's 5 personas use 7 identities that map to 7 contacts.
    assert_eq!(hubspot.contacts().len(), 7, "a contact was created twice");
    let associated: std::collections::BTreeSet<_> = hubspot.associations().into_iter().map(|(note, _)| note).collect();
    assert_eq!(associated.len(), TOTAL, "a note lost its contact");
    assert_eq!(status["totals"]["backlog"], 0, "{status}");
    assert_eq!(status["totals"]["delivered"], TOTAL as u64, "{status}");
    assert!(hubspot.spec_violations().is_empty());
}
