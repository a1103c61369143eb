//! Throughput: demo contributions through normalize -> state (SQLite) ->
//! the mock HubSpot over loopback HTTP (bodies checked against the spec).
//! Prints contributions per second, CRM calls per 100 contributions and
//! peak memory (of this process, mock included).
//!
//!     cargo bench --bench throughput            # 5,000 contributions
//!     TRIBUTARY_BENCH_N=20000 cargo bench --bench throughput

use std::{sync::Arc, time::Instant};

use tokio_util::sync::CancellationToken;
use tributary::{
    delivery::{DeliverySettings, Worker},
    pipeline::normalize,
    state::{SqliteStore, StateStore},
};
use tributary_crm::hubspot::{HubSpotConfig, HubSpotCrm, mock::MockHubSpot};
use tributary_demo::{DemoConfig, DemoSource};
use tributary_sdk::{Crm, Cursor, HttpOptions, SecretRef};

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::var("TRIBUTARY_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench(n))
}

async fn bench(n: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let source = DemoSource::new("bench", DemoConfig { total: n, per_page: 250, ..DemoConfig::default() });

    // 1. normalize + enrich alone.
    let started = Instant::now();
    let normalized: Vec<_> = (0..n).map(|i| normalize("bench", source.contribution(i))).collect();
    let normalize_secs = started.elapsed().as_secs_f64();

    // 2. state: pages of 250, each one transaction with its cursor.
    let store = Arc::new(SqliteStore::open(&dir.path().join("state.db"))?);
    let started = Instant::now();
    for (page, chunk) in normalized.chunks(250).enumerate() {
        store.commit_page("bench", chunk.to_vec(), vec![], Some(Cursor(page.to_string()))).await?;
    }
    let state_secs = started.elapsed().as_secs_f64();

    // 3. delivery to the mock HubSpot.
    let hubspot = MockHubSpot::start_with_token("bench-token").await;
    // SAFETY: single-threaded at this point of the benchmark; nothing else reads the environment.
    unsafe { std::env::set_var("TRIBUTARY_BENCH_TOKEN", "bench-token") };
    let config: HubSpotConfig = serde_json::from_value(serde_json::json!({
        "token": SecretRef::Env("TRIBUTARY_BENCH_TOKEN".into()),
        "base_url": hubspot.base_url(),
    }))?;
    let crm: Arc<dyn Crm> = Arc::new(HubSpotCrm::new(config, HttpOptions::default())?);
    crm.setup(&tributary_demo::PLATFORMS.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()).await?;
    hubspot.clear_requests();
    let worker = Worker::new(store.clone(), crm, DeliverySettings::default(), "bench".into(), None);
    let started = Instant::now();
    let stats = worker.drain(&CancellationToken::new()).await?;
    let deliver_secs = started.elapsed().as_secs_f64();
    let calls = hubspot.requests().len() as f64;
    anyhow::ensure!(stats.delivered as u64 == n, "delivered {} of {n}", stats.delivered);
    anyhow::ensure!(hubspot.notes().len() as u64 == n, "the mock holds {} notes", hubspot.notes().len());

    let total = normalize_secs + state_secs + deliver_secs;
    println!("contributions:                 {n}");
    println!("normalize + enrich:            {:>10.0} contributions/s", n as f64 / normalize_secs);
    println!("state commit (pages of 250):   {:>10.0} contributions/s", n as f64 / state_secs);
    println!("delivery to mock HubSpot:      {:>10.0} contributions/s", n as f64 / deliver_secs);
    println!("end to end:                    {:>10.0} contributions/s ({total:.2} s)", n as f64 / total);
    println!("CRM calls per 100:             {:>10.2}", calls / n as f64 * 100.0);
    println!("peak memory (VmHWM):           {:>10} KiB", peak_rss_kib());
    Ok(())
}
