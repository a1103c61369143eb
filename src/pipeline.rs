//! One poll of one source: fetch pages, normalize and enrich every
//! contribution, and commit each page with its cursor in one transaction.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tributary_sdk::{Contribution, PollRequest, Source};

use crate::{
    enrich::enrich,
    state::{CommitStats, StateStore},
};

/// What one poll did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    pub pages: u64,
    pub commit: CommitStats,
}

/// How a poll ends when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("another poll of this source holds its lease")]
    Busy,
    #[error(transparent)]
    Source(#[from] tributary_sdk::SourceError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Where a poll starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    /// Do not go back further than this (on a first poll, or with `fresh`).
    pub since: Option<DateTime<Utc>>,
    /// Ignore the stored cursor: a backfill from `since` (`sync --since`).
    /// The pass stores its own cursor as it goes, like any other.
    pub fresh: bool,
}

/// Stamps the source name, then enriches.
pub fn normalize(source_name: &str, mut contribution: Contribution) -> Contribution {
    contribution.source = source_name.to_owned();
    enrich(&mut contribution);
    contribution
}

/// Polls `source` page after page until it has no more or `shutdown` is
/// set; a page is either committed whole with its cursor or not at all.
/// `on_page` sees every committed page (progress bars).
pub async fn poll_source(
    store: &dyn StateStore,
    name: &str,
    source: &Arc<dyn Source>,
    start: Start,
    owner: &str,
    shutdown: &CancellationToken,
    mut on_page: impl FnMut(&CommitStats),
) -> Result<PollStats, PollError> {
    // Never two polls of one source at once, across processes and replicas.
    let lease_name = format!("source:{name}");
    let lease_ttl = Duration::from_secs(120);
    if !store.acquire_lease(&lease_name, owner, lease_ttl).await? {
        return Err(PollError::Busy);
    }
    let outcome = poll_pages(store, name, source, start, owner, &lease_name, lease_ttl, shutdown, &mut on_page).await;
    if let Err(error) = store.release_lease(&lease_name, owner).await {
        tracing::warn!(error = %error, "cannot release the source lease; it expires by itself");
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn poll_pages(
    store: &dyn StateStore,
    name: &str,
    source: &Arc<dyn Source>,
    start: Start,
    owner: &str,
    lease_name: &str,
    lease_ttl: Duration,
    shutdown: &CancellationToken,
    on_page: &mut impl FnMut(&CommitStats),
) -> Result<PollStats, PollError> {
    let mut stats = PollStats::default();
    let mut cursor = if start.fresh { None } else { store.cursor(name).await? };
    loop {
        let request = PollRequest { cursor: cursor.clone(), since: start.since };
        // A slow fetch keeps the lease alive; the commit checks it is still ours.
        let page = {
            let fetch = source.poll(&request);
            tokio::pin!(fetch);
            loop {
                tokio::select! {
                    page = &mut fetch => break page?,
                    _ = tokio::time::sleep(lease_ttl / 3) => {
                        store.acquire_lease(lease_name, owner, lease_ttl).await?;
                    }
                }
            }
        };
        // Enrichment is CPU work: off the async workers, which serve /healthz.
        let source_name = name.to_owned();
        let contributions: Vec<Contribution> = tokio::task::spawn_blocking(move || {
            page.contributions.into_iter().map(|c| normalize(&source_name, c)).collect()
        })
        .await
        .map_err(|error| crate::state::StateError::Other(format!("enrichment failed: {error}")))?;
        if !store.acquire_lease(lease_name, owner, lease_ttl).await? {
            // Lost to another poller: this page is theirs to commit.
            return Err(PollError::Busy);
        }
        for item in &page.quarantined {
            tracing::warn!(external_id = ?item.external_id, reason = %item.reason, "item quarantined");
        }
        let next_cursor = page.next_cursor.clone();
        let commit = store.commit_page(name, contributions, page.quarantined, next_cursor.clone()).await?;
        metrics::counter!("tributary_contributions_total", "source" => name.to_owned(), "outcome" => "new")
            .increment(commit.new);
        metrics::counter!("tributary_contributions_total", "source" => name.to_owned(), "outcome" => "updated")
            .increment(commit.updated);
        metrics::counter!("tributary_contributions_total", "source" => name.to_owned(), "outcome" => "unchanged")
            .increment(commit.unchanged);
        metrics::counter!("tributary_contributions_total", "source" => name.to_owned(), "outcome" => "quarantined")
            .increment(commit.quarantined);
        stats.pages += 1;
        stats.commit.new += commit.new;
        stats.commit.updated += commit.updated;
        stats.commit.unchanged += commit.unchanged;
        stats.commit.quarantined += commit.quarantined;
        on_page(&commit);
        tracing::debug!(
            page = stats.pages,
            new = commit.new,
            updated = commit.updated,
            unchanged = commit.unchanged,
            "page committed"
        );
        if next_cursor.is_some() {
            cursor = next_cursor;
        }
        if !page.has_more || shutdown.is_cancelled() {
            break;
        }
    }
    Ok(stats)
}
