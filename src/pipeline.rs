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

/// One committed page, for progress bars.
#[derive(Debug, Clone, Copy)]
pub struct PageDone {
    pub commit: CommitStats,
    /// Creation times of the oldest and newest contribution of the page.
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
}

/// Where a poll starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    /// Do not go back further than this (on a first poll, or with `fresh`).
    pub since: Option<DateTime<Utc>>,
    /// A backfill from `since` (`sync --since`). When the source already
    /// has a live cursor, the backfill walks with a cursor of its own (and
    /// resumes it when run again from the same date), under a lease of its
    /// own: the daemon's live polling goes on undisturbed. On a source never
    /// polled, it is simply the first pass.
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
    mut on_page: impl FnMut(&PageDone),
) -> Result<PollStats, PollError> {
    let backfill = start.fresh && store.cursor(name).await?.is_some();
    // Never two polls of one source at once, across processes and replicas
    // (nor two backfills).
    let lease_name = if backfill { format!("backfill:{name}") } else { format!("source:{name}") };
    let lease_ttl = Duration::from_secs(120);
    if !store.acquire_lease(&lease_name, owner, lease_ttl).await? {
        return Err(PollError::Busy);
    }
    let lease = Lease { name: &lease_name, owner, ttl: lease_ttl };
    let outcome = poll_pages(store, name, source, start, backfill, &lease, shutdown, &mut on_page).await;
    if let Err(error) = store.release_lease(&lease_name, owner).await {
        tracing::warn!(error = %error, "cannot release the source lease; it expires by itself");
    }
    outcome
}

/// The lease a poll holds while it runs.
struct Lease<'a> {
    name: &'a str,
    owner: &'a str,
    ttl: Duration,
}

#[allow(clippy::too_many_arguments)]
async fn poll_pages(
    store: &dyn StateStore,
    name: &str,
    source: &Arc<dyn Source>,
    start: Start,
    backfill: bool,
    lease: &Lease<'_>,
    shutdown: &CancellationToken,
    on_page: &mut impl FnMut(&PageDone),
) -> Result<PollStats, PollError> {
    let (lease_name, owner, lease_ttl) = (lease.name, lease.owner, lease.ttl);
    let mut stats = PollStats::default();
    let mut cursor = match (backfill, start.fresh) {
        (true, _) => store.backfill_cursor(name, start.since).await?,
        (false, true) => None,
        (false, false) => store.cursor(name).await?,
    };
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
        let oldest = contributions.iter().map(|c| c.created_at).min();
        let newest = contributions.iter().map(|c| c.created_at).max();
        let next_cursor = page.next_cursor.clone();
        let commit = if backfill {
            store.commit_backfill_page(name, contributions, page.quarantined, start.since, next_cursor.clone()).await?
        } else {
            store.commit_page(name, contributions, page.quarantined, next_cursor.clone()).await?
        };
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
        on_page(&PageDone { commit, oldest, newest });
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

#[cfg(test)]
mod tests {
    use tributary_demo::{DemoConfig, DemoSource};

    use super::*;
    use crate::state::SqliteStore;

    fn demo(total: u64) -> Arc<dyn Source> {
        Arc::new(DemoSource::new("demo", DemoConfig { per_page: 10, total, drain: true, ..DemoConfig::default() }))
    }

    async fn poll(store: &SqliteStore, source: &Arc<dyn Source>, start: Start) -> PollStats {
        poll_source(store, "demo", source, start, "test-owner", &CancellationToken::new(), |_| {}).await.unwrap()
    }

    #[tokio::test]
    async fn a_backfill_walks_with_its_own_cursor_and_leaves_the_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let since = Some(Utc::now() - chrono::Duration::days(30));
        // Never polled: `sync --since` is the first pass, on the live cursor.
        let first = poll(&store, &demo(20), Start { since, fresh: true }).await;
        assert_eq!(first.commit.new, 20);
        let live = store.cursor("demo").await.unwrap().expect("the first pass moved the live cursor");
        assert_eq!(store.backfill_cursor("demo", since).await.unwrap(), None);
        // Later: a backfill walks history again with a cursor of its own.
        let backfill = poll(&store, &demo(35), Start { since, fresh: true }).await;
        assert_eq!((backfill.commit.new, backfill.commit.unchanged), (15, 20), "only history not yet seen is new");
        assert_eq!(store.cursor("demo").await.unwrap(), Some(live.clone()), "the live cursor did not move");
        let resumed = store.backfill_cursor("demo", since).await.unwrap().expect("the backfill kept its cursor");
        assert_ne!(resumed, live);
        // Run again from the same date, it resumes; from another, it starts over.
        assert_eq!(poll(&store, &demo(35), Start { since, fresh: true }).await.commit.unchanged, 0);
        let other = Some(Utc::now() - chrono::Duration::days(7));
        assert_eq!(store.backfill_cursor("demo", other).await.unwrap(), None);
        assert_eq!(poll(&store, &demo(35), Start { since: other, fresh: true }).await.commit.unchanged, 35);
        // The live poll goes on from where it was.
        let live_poll = poll(&store, &demo(35), Start::default()).await;
        assert_eq!(live_poll.commit.unchanged, 15, "the live pass resumed at its own cursor");
    }
}
