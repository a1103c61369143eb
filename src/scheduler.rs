//! One task per source: poll on its schedule (interval or cron, with
//! jitter), never twice at once, and stop at the shutdown signal after the
//! page in hand is committed.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    pipeline::{self, PollError},
    registry::BuiltSource,
    state::StateStore,
};

pub async fn run_source(
    built: BuiltSource,
    store: Arc<dyn StateStore>,
    owner: String,
    wake_delivery: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("source", source = %built.name, platform = built.source.platform());
    async move {
        let start = pipeline::Start { since: built.config.common.since.map(|s| s.0), fresh: false };
        loop {
            let started = std::time::Instant::now();
            // A poll in flight finishes its current page: commit_page is one
            // transaction, and the poll checks `shutdown` between pages.
            let outcome =
                pipeline::poll_source(&*store, &built.name, &built.source, start, &owner, &shutdown, |_| {}).await;
            let elapsed = started.elapsed();
            metrics::histogram!("tributary_poll_duration_seconds", "source" => built.name.clone())
                .record(elapsed.as_secs_f64());
            match outcome {
                Ok(stats) => {
                    metrics::counter!("tributary_polls_total", "source" => built.name.clone(), "outcome" => "ok")
                        .increment(1);
                    tracing::info!(
                        pages = stats.pages,
                        new = stats.commit.new,
                        updated = stats.commit.updated,
                        unchanged = stats.commit.unchanged,
                        quarantined = stats.commit.quarantined,
                        elapsed_ms = elapsed.as_millis() as u64,
                        "poll done"
                    );
                    if let Err(error) = store.record_poll(&built.name, None).await {
                        tracing::warn!(error = %error, "cannot record the poll");
                    }
                    if stats.commit.new + stats.commit.updated > 0 {
                        wake_delivery.notify_one();
                    }
                }
                Err(PollError::Busy) => tracing::info!("another poll of this source is running; skipped"),
                Err(error) => {
                    metrics::counter!("tributary_polls_total", "source" => built.name.clone(), "outcome" => "error")
                        .increment(1);
                    let message = error.to_string();
                    tracing::warn!(error = %message, "poll failed");
                    if let Err(error) = store.record_poll(&built.name, Some(&message)).await {
                        tracing::warn!(error = %error, "cannot record the poll");
                    }
                }
            }

            let now = Utc::now();
            let next = built.config.common.schedule.next_after(now);
            let mut wait = (next - now).to_std().unwrap_or(Duration::ZERO);
            let jitter = built.config.common.jitter.0;
            if !jitter.is_zero() {
                wait += Duration::from_secs_f64(rand::rng().random_range(0.0..jitter.as_secs_f64()));
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!("source stopped");
    }
    .instrument(span)
    .await
}
