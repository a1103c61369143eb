//! The delivery worker: claims batches from the outbox, resolves authors,
//! upserts activities into the CRM and records how each row ended:
//! delivered (CRM ids kept), retried later with exponential backoff and
//! jitter (never sooner than the CRM's Retry-After), or dead-lettered with
//! the CRM's own message. Rollups of touched contacts follow.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tributary_sdk::{ActivityUpsert, Crm, CrmError, RecordOutcome, Rollup};

use crate::{
    alerts::Alerts,
    config::{OnDelete, UnknownAuthors},
    health::Health,
    identity::{self, IdentityError, Resolution},
    state::{Claimed, Delivery, Finished, StateStore},
};

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub batch_size: usize,
    pub max_attempts: u32,
    pub unknown_authors: UnknownAuthors,
    /// How long a claimed batch stays ours; a crashed worker's rows come back after it.
    pub lease: Duration,
    /// First retry delay; doubles per attempt up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Finished outbox rows older than this are pruned, once an hour.
    pub retention: Duration,
    /// Each source's `on_delete` (a source not named here: `mark`).
    pub on_delete: HashMap<String, OnDelete>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            batch_size: 100,
            max_attempts: 10,
            unknown_authors: UnknownAuthors::Create,
            lease: Duration::from_secs(300),
            base_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
            retention: Duration::from_secs(30 * 86_400),
            on_delete: HashMap::new(),
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub claimed: usize,
    pub delivered: usize,
    pub retried: usize,
    pub dead: usize,
    pub skipped: usize,
}

#[derive(Clone)]
pub struct Worker {
    store: Arc<dyn StateStore>,
    crm: Arc<dyn Crm>,
    settings: DeliverySettings,
    owner: String,
    health: Option<Arc<Health>>,
    /// Batches in a row that failed as a whole: the backoff of an outage.
    outage: Arc<AtomicU32>,
    /// Alert rules matched against what each batch delivered, and the
    /// sender to wake when some were queued.
    alerts: Option<(Arc<Alerts>, Arc<Notify>)>,
}

/// Whether a failure of a whole batch is the CRM's as a whole (down, rate
/// limiting, refusing the credentials, missing setup) rather than
/// something about these records.
fn is_outage(error: &CrmError) -> bool {
    match error {
        CrmError::Http(error) => error.is_transient(),
        CrmError::RateLimited { .. } | CrmError::Auth(_) | CrmError::Transient(_) | CrmError::Io(_) => true,
        CrmError::Decode(_) | CrmError::Unsupported(_) => false,
    }
}

impl Worker {
    pub fn new(
        store: Arc<dyn StateStore>,
        crm: Arc<dyn Crm>,
        settings: DeliverySettings,
        owner: String,
        health: Option<Arc<Health>>,
    ) -> Worker {
        Worker { store, crm, settings, owner, health, outage: Arc::new(AtomicU32::new(0)), alerts: None }
    }

    /// Matches every delivered contribution against the alert rules.
    pub fn with_alerts(mut self, alerts: Arc<Alerts>, wake: Arc<Notify>) -> Worker {
        if !alerts.is_empty() {
            self.alerts = Some((alerts, wake));
        }
        self
    }

    /// Runs until `shutdown`: a batch whenever woken or every `interval`.
    /// A batch in flight is finished before the worker returns.
    pub async fn run(self, shutdown: CancellationToken, wake: Arc<Notify>, interval: Duration) {
        let span = tracing::info_span!("delivery", crm = self.crm.kind());
        async move {
            let mut pruned_at: Option<std::time::Instant> = None;
            let mut refreshed_at: Option<std::time::Instant> = None;
            loop {
                match self.drain(&shutdown).await {
                    Ok(_) => {}
                    Err(error) => tracing::error!(error = %error, "delivery failed; trying again later"),
                }
                if pruned_at.is_none_or(|at| at.elapsed() > Duration::from_secs(3600)) {
                    pruned_at = Some(std::time::Instant::now());
                    let cutoff = chrono::Duration::from_std(self.settings.retention)
                        .ok()
                        .and_then(|retention| Utc::now().checked_sub_signed(retention))
                        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
                    match self.store.prune(cutoff).await {
                        Ok(0) => {}
                        Ok(rows) => tracing::info!(rows, "pruned finished outbox rows past retention"),
                        Err(error) => tracing::warn!(error = %error, "pruning failed"),
                    }
                }
                // 90-day figures move with time: once a day, every contact active in the window is due.
                if refreshed_at.is_none_or(|at| at.elapsed() > Duration::from_secs(86_400)) {
                    refreshed_at = Some(std::time::Instant::now());
                    match self.store.refresh_rollups(Utc::now() - chrono::Duration::days(91)).await {
                        Ok(contacts) => tracing::debug!(contacts, "90-day rollups due again"),
                        Err(error) => tracing::warn!(error = %error, "making 90-day rollups due failed"),
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            tracing::info!("delivery worker stopped");
        }
        .instrument(span)
        .await
    }

    /// Delivers batches until nothing is due (or shutdown), then rollups.
    pub async fn drain(&self, shutdown: &CancellationToken) -> anyhow::Result<BatchStats> {
        let mut total = BatchStats::default();
        while !shutdown.is_cancelled() {
            let stats = self.deliver_batch().await?;
            total.claimed += stats.claimed;
            total.delivered += stats.delivered;
            total.retried += stats.retried;
            total.dead += stats.dead;
            total.skipped += stats.skipped;
            if stats.claimed == 0 {
                break;
            }
        }
        self.write_rollups().await?;
        Ok(total)
    }

    fn backoff(&self, attempts: u32, at_least: Option<Duration>) -> chrono::DateTime<Utc> {
        let exp = self.settings.base_backoff.saturating_mul(1u32 << attempts.min(20)).min(self.settings.max_backoff);
        let jittered = Duration::from_secs_f64(exp.as_secs_f64() * rand::rng().random_range(0.5..=1.0));
        let wait = jittered.max(at_least.unwrap_or(Duration::ZERO));
        Utc::now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1))
    }

    /// A failure that may be about this record: it uses up an attempt.
    fn failed(&self, row: &Claimed, error: String, retry_after: Option<Duration>) -> Delivery {
        if row.attempts + 1 >= self.settings.max_attempts {
            Delivery::Dead { error: format!("gave up after {} attempts: {error}", row.attempts + 1) }
        } else {
            Delivery::Retry { error, at: self.backoff(row.attempts, retry_after), counts: true }
        }
    }

    /// A failure of the whole batch: an outage backs off with the number
    /// of failed batches in a row and uses up no attempt, so a long CRM
    /// outage dead-letters nothing.
    fn batch_failed(&self, row: &Claimed, error: &CrmError) -> Delivery {
        if !is_outage(error) {
            return self.failed(row, error.to_string(), error.retry_after());
        }
        let streak = self.outage.load(Ordering::Relaxed);
        Delivery::Retry { error: error.to_string(), at: self.backoff(streak, error.retry_after()), counts: false }
    }

    fn batch_result(&self, error: Option<&CrmError>) {
        match error {
            Some(error) if is_outage(error) => {
                self.outage.fetch_add(1, Ordering::Relaxed);
            }
            _ => self.outage.store(0, Ordering::Relaxed),
        }
    }

    pub async fn deliver_batch(&self) -> anyhow::Result<BatchStats> {
        let claimed = self.store.claim(&self.owner, self.settings.batch_size, self.settings.lease).await?;
        if claimed.is_empty() {
            return Ok(BatchStats::default());
        }
        // A slow CRM keeps the batch ours: the claims are renewed while it works.
        let work = self.deliver_claimed(claimed);
        tokio::pin!(work);
        loop {
            tokio::select! {
                stats = &mut work => return stats,
                _ = tokio::time::sleep(self.settings.lease / 3) => {
                    self.store.renew_claims(&self.owner, self.settings.lease).await?;
                }
            }
        }
    }

    async fn deliver_claimed(&self, claimed: Vec<Claimed>) -> anyhow::Result<BatchStats> {
        let mut stats = BatchStats { claimed: claimed.len(), ..BatchStats::default() };
        let mut outcomes: Vec<Option<Delivery>> = vec![None; claimed.len()];

        // Deletions go by their source's `on_delete`; `mark` is an upsert like any other.
        let mut upserts = Vec::new();
        let mut archives = Vec::new();
        for (index, row) in claimed.iter().enumerate() {
            let policy = self.settings.on_delete.get(&row.contribution.source).copied().unwrap_or_default();
            match (row.contribution.deleted, policy) {
                (true, OnDelete::Keep) => {
                    outcomes[index] = Some(Delivery::Skipped {
                        reason: "deleted on the platform; on_delete = \"keep\" leaves its activity as it was".into(),
                    })
                }
                (true, OnDelete::Archive) => archives.push(index),
                _ => upserts.push(index),
            }
        }
        if !archives.is_empty() {
            self.archive(&claimed, &archives, &mut outcomes).await?;
        }

        let contributions: Vec<_> = upserts.iter().map(|index| &claimed[*index].contribution).collect();
        let resolutions =
            identity::resolve(&*self.store, &*self.crm, self.settings.unknown_authors, &contributions).await;
        let resolutions = match resolutions {
            Ok(resolutions) => resolutions,
            Err(IdentityError::State(error)) => return Err(error.into()),
            Err(refused @ IdentityError::Refused(_)) => return Err(refused.into()),
            Err(IdentityError::Crm(error)) => {
                self.crm_failed(&error.to_string());
                for index in &upserts {
                    outcomes[*index] = Some(self.batch_failed(&claimed[*index], &error));
                }
                self.batch_result(Some(&error));
                tracing::warn!(error = %error, rows = upserts.len(), "identity resolution failed; batch retried later");
                Vec::new()
            }
        };

        // CRMs without an upsert by key update what they were given before.
        let keys: Vec<String> = upserts.iter().map(|index| claimed[*index].contribution.key()).collect();
        let delivered =
            if keys.is_empty() { Default::default() } else { self.store.delivered_activities(&keys).await? };
        let mut activities = Vec::new();
        let mut activity_rows = Vec::new();
        for (index, resolution) in upserts.iter().copied().zip(resolutions) {
            let row = &claimed[index];
            match resolution {
                Resolution::Contact(contact_id) => {
                    activities.push(ActivityUpsert {
                        key: row.contribution.activity_key(),
                        contact_id,
                        contribution: row.contribution.clone(),
                        existing_id: delivered.get(&row.contribution.key()).map(|(_, activity_id)| activity_id.clone()),
                    });
                    activity_rows.push(index);
                }
                Resolution::Skip(reason) => outcomes[index] = Some(Delivery::Skipped { reason }),
                Resolution::Rejected(error) => {
                    outcomes[index] = Some(Delivery::Dead { error: format!("the CRM refused the contact: {error}") })
                }
            }
        }

        if !activities.is_empty() {
            match self.crm.upsert_activities(&activities).await {
                Ok(results) => {
                    self.crm_succeeded();
                    self.batch_result(None);
                    for ((index, activity), result) in activity_rows.iter().zip(&activities).zip(results) {
                        outcomes[*index] = Some(match result {
                            RecordOutcome::Done(activity_id) => {
                                Delivery::Delivered { contact_id: activity.contact_id.clone(), activity_id }
                            }
                            RecordOutcome::Rejected(error) => Delivery::Dead { error },
                        });
                    }
                }
                Err(error) => {
                    self.crm_failed(&error.to_string());
                    tracing::warn!(error = %error, rows = activity_rows.len(), "activity upsert failed; retried later");
                    for index in &activity_rows {
                        outcomes[*index] = Some(self.batch_failed(&claimed[*index], &error));
                    }
                    self.batch_result(Some(&error));
                }
            }
        }

        let mut finished = Vec::with_capacity(claimed.len());
        for (row, outcome) in claimed.iter().zip(outcomes) {
            let delivery = outcome.unwrap_or_else(|| self.failed(row, "no outcome".into(), None));
            match &delivery {
                Delivery::Delivered { .. } => stats.delivered += 1,
                Delivery::Retry { .. } => stats.retried += 1,
                Delivery::Dead { error } => {
                    tracing::warn!(key = %row.contribution.key(), error = %error, "contribution dead-lettered");
                    stats.dead += 1
                }
                Delivery::Skipped { .. } => stats.skipped += 1,
            }
            finished.push(self.finished(row, delivery));
        }
        let delivered: Vec<(tributary_sdk::Contribution, String)> = finished
            .iter()
            .filter_map(|f| match &f.delivery {
                Delivery::Delivered { contact_id, .. } if !f.contribution.deleted => {
                    Some((f.contribution.clone(), contact_id.clone()))
                }
                _ => None,
            })
            .collect();
        self.store.finish(&self.owner, finished).await?;
        if let Some((alerts, wake)) = &self.alerts
            && !delivered.is_empty()
        {
            match alerts.consider(&delivered).await {
                Ok(0) => {}
                Ok(queued) => {
                    tracing::info!(queued, "alerts queued");
                    wake.notify_one();
                }
                Err(error) => tracing::warn!(error = %error, "matching alert rules failed"),
            }
        }
        metrics::counter!("tributary_delivered_total", "outcome" => "delivered").increment(stats.delivered as u64);
        metrics::counter!("tributary_delivered_total", "outcome" => "retry").increment(stats.retried as u64);
        metrics::counter!("tributary_delivered_total", "outcome" => "dead").increment(stats.dead as u64);
        metrics::counter!("tributary_delivered_total", "outcome" => "skipped").increment(stats.skipped as u64);
        tracing::info!(
            claimed = stats.claimed,
            delivered = stats.delivered,
            retried = stats.retried,
            dead = stats.dead,
            skipped = stats.skipped,
            "batch delivered"
        );
        Ok(stats)
    }

    /// Archives the CRM activities of deleted contributions (`on_delete =
    /// "archive"`); one never delivered has nothing to archive.
    async fn archive(
        &self,
        claimed: &[Claimed],
        rows: &[usize],
        outcomes: &mut [Option<Delivery>],
    ) -> anyhow::Result<()> {
        let keys: Vec<String> = rows.iter().map(|index| claimed[*index].contribution.key()).collect();
        let delivered = self.store.delivered_activities(&keys).await?;
        let mut targets = Vec::new();
        for (index, key) in rows.iter().zip(&keys) {
            match delivered.get(key) {
                Some(ids) => targets.push((*index, ids.clone())),
                None => {
                    outcomes[*index] = Some(Delivery::Skipped {
                        reason: "deleted before it reached the CRM: nothing to archive".into(),
                    })
                }
            }
        }
        if targets.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = targets.iter().map(|(_, (_, activity_id))| activity_id.clone()).collect();
        match self.crm.archive_activities(&ids).await {
            Ok(results) => {
                self.crm_succeeded();
                self.batch_result(None);
                for ((index, (contact_id, activity_id)), result) in targets.into_iter().zip(results) {
                    outcomes[index] = Some(match result {
                        RecordOutcome::Done(()) => Delivery::Delivered { contact_id, activity_id },
                        RecordOutcome::Rejected(error) => Delivery::Dead { error },
                    });
                }
            }
            Err(error) => {
                self.crm_failed(&error.to_string());
                tracing::warn!(error = %error, rows = targets.len(), "archiving activities failed; retried later");
                for (index, _) in &targets {
                    outcomes[*index] = Some(self.batch_failed(&claimed[*index], &error));
                }
                self.batch_result(Some(&error));
            }
        }
        Ok(())
    }

    fn finished(&self, row: &Claimed, delivery: Delivery) -> Finished {
        Finished {
            id: row.id,
            content_hash: row.content_hash.clone(),
            contribution: row.contribution.clone(),
            delivery,
        }
    }

    /// Writes the figures of every contact whose activities changed.
    pub async fn write_rollups(&self) -> anyhow::Result<()> {
        let mut previous: Option<Vec<Rollup>> = None;
        loop {
            let rollups = self.store.pending_rollups(self.settings.batch_size, Utc::now()).await?;
            if rollups.is_empty() {
                return Ok(());
            }
            // The same figures due again right after they were written: leave them to the next round.
            if previous.as_ref() == Some(&rollups) {
                tracing::warn!(contacts = rollups.len(), "rollups still due after being written; next round");
                return Ok(());
            }
            previous = Some(rollups.clone());
            let results = match self.crm.update_rollups(&rollups).await {
                Ok(results) => results,
                Err(error) => {
                    tracing::warn!(error = %error, contacts = rollups.len(), "rollup update failed; kept for later");
                    return Ok(());
                }
            };
            let written: Vec<_> = rollups
                .iter()
                .zip(&results)
                .filter(|(_, result)| matches!(result, RecordOutcome::Done(())))
                .map(|(rollup, _)| rollup.clone())
                .collect();
            for (rollup, result) in rollups.iter().zip(&results) {
                if let RecordOutcome::Rejected(error) = result {
                    tracing::warn!(contact = %rollup.contact_id, error = %error, "rollup refused; the contact is forgotten");
                    self.store.forget_contact(&rollup.contact_id).await?;
                }
            }
            self.store.rollups_written(&written).await?;
        }
    }

    fn crm_succeeded(&self) {
        if let Some(health) = &self.health {
            health.crm_result(None);
        }
    }

    fn crm_failed(&self, error: &str) {
        if let Some(health) = &self.health {
            health.crm_result(Some(error.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use tributary_crm::file::{FileCrm, FileCrmConfig};
    use tributary_sdk::Contribution;

    use super::*;
    use crate::state::SqliteStore;

    fn worker(store: &Arc<SqliteStore>, crm_path: std::path::PathBuf) -> Worker {
        let settings =
            DeliverySettings { max_attempts: 2, base_backoff: Duration::ZERO, ..DeliverySettings::default() };
        let crm = Arc::new(FileCrm::new(FileCrmConfig { path: crm_path }).unwrap());
        Worker::new(store.clone(), crm, settings, "test".into(), None)
    }

    #[tokio::test]
    async fn a_crm_outage_uses_up_no_attempts_and_dead_letters_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        let contribution =
            crate::pipeline::normalize("s", tributary_demo::DemoSource::new("s", Default::default()).contribution(0));
        store.commit_page("s", vec![contribution], vec![], None).await.unwrap();

        // The CRM cannot write (a file stands where its folder goes): an outage.
        let worker = worker(&store, dir.path().join("crm/crm.json"));
        std::fs::write(dir.path().join("crm"), "").unwrap();
        for _ in 0..5 {
            let stats = worker.deliver_batch().await.unwrap();
            assert_eq!((stats.claimed, stats.retried, stats.dead), (1, 1, 0));
        }
        assert!(store.dead_letters().await.unwrap().is_empty(), "an outage dead-lettered a contribution");

        // The CRM is back: the contribution lands.
        std::fs::remove_file(dir.path().join("crm")).unwrap();
        let stats = worker.deliver_batch().await.unwrap();
        assert_eq!(stats.delivered, 1);
    }

    /// Delivers a contribution, then its deletion, under `policy`; returns
    /// the file CRM's activity and the contact's rollup count afterwards.
    async fn deletion_under(
        policy: OnDelete,
        delivered_first: bool,
    ) -> (Option<tributary_crm::file::FileActivity>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        let crm_path = dir.path().join("crm.json");
        let mut worker = worker(&store, crm_path.clone());
        worker.settings.on_delete = HashMap::from([("s".to_owned(), policy)]);
        let demo = tributary_demo::DemoSource::new("s", Default::default());
        let other = crate::pipeline::normalize("s", demo.contribution(1));
        let mut post = crate::pipeline::normalize("s", demo.contribution(0));
        post.author = other.author.clone();
        if delivered_first {
            store.commit_page("s", vec![post.clone(), other], vec![], None).await.unwrap();
            worker.drain(&CancellationToken::new()).await.unwrap();
        }
        let deleted =
            crate::pipeline::normalize("s", Contribution { deleted: true, body: String::new(), ..post.clone() });
        store.commit_page("s", vec![deleted], vec![], None).await.unwrap();
        worker.drain(&CancellationToken::new()).await.unwrap();
        let data = tributary_crm::file::FileCrmData::read(&crm_path).unwrap();
        let count = data.contacts.values().filter_map(|c| c.rollup.as_ref()).map(|r| r.contribution_count).sum();
        (data.activities.get(&post.activity_key()).cloned(), count)
    }

    #[tokio::test]
    async fn a_deletion_follows_the_sources_on_delete() {
        let (marked, count) = deletion_under(OnDelete::Mark, true).await;
        let marked = marked.expect("the activity stays");
        assert!(marked.deleted && !marked.archived && marked.body.is_empty(), "{marked:?}");
        assert_eq!(count, 1, "a deleted contribution leaves the rollup");

        let (archived, count) = deletion_under(OnDelete::Archive, true).await;
        let archived = archived.expect("archived, not erased");
        assert!(archived.archived && !archived.deleted && !archived.body.is_empty(), "{archived:?}");
        assert_eq!(count, 1);

        let (kept, count) = deletion_under(OnDelete::Keep, true).await;
        let kept = kept.expect("the activity stays");
        assert!(!kept.deleted && !kept.archived && !kept.body.is_empty(), "{kept:?}");
        assert_eq!(count, 2, "a kept activity still counts");

        // Deleted before it was ever delivered: nothing to archive, nothing created.
        let (never, _) = deletion_under(OnDelete::Archive, false).await;
        assert_eq!(never, None);
    }

    /// The rollup the file CRM holds for the only contact.
    async fn rollup_after(
        store: &Arc<SqliteStore>,
        worker: &Worker,
        crm_path: &std::path::Path,
        items: Vec<Contribution>,
    ) -> Rollup {
        let items = items.into_iter().map(|c| crate::pipeline::normalize("s", c)).collect();
        store.commit_page("s", items, vec![], None).await.unwrap();
        worker.drain(&CancellationToken::new()).await.unwrap();
        let data = tributary_crm::file::FileCrmData::read(crm_path).unwrap();
        assert_eq!(data.contacts.len(), 1);
        data.contacts.into_values().next().unwrap().rollup.expect("a rollup")
    }

    #[tokio::test]
    async fn an_edit_and_a_deletion_move_the_rollup() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        let crm_path = dir.path().join("crm.json");
        let worker = worker(&store, crm_path.clone());
        let recent = Utc::now() - chrono::Duration::days(2);
        let praise = Contribution {
            external_id: "1".into(),
            title: None,
            body: "Love the new editor, thank you so much, great job!".into(),
            created_at: recent,
            signals: None,
            language: None,
            ..Contribution::sample()
        };
        let question = Contribution {
            external_id: "2".into(),
            title: None,
            body: "How do I export dashboards to PDF?".into(),
            created_at: recent - chrono::Duration::days(1),
            signals: None,
            language: None,
            ..Contribution::sample()
        };
        let rollup = rollup_after(&store, &worker, &crm_path, vec![praise.clone(), question.clone()]).await;
        assert_eq!((rollup.contribution_count, rollup.praise, rollup.complaints, rollup.questions), (2, 1, 0, 1));
        assert_eq!(rollup.count_90d, 2);
        assert!(!rollup.needs_attention, "{rollup:?}");
        assert!(rollup.last_excerpt.as_deref().is_some_and(|e| e.starts_with("Love the new editor")));

        // The praise is edited into a complaint.
        let edited = Contribution {
            body: "Edit: the update broke everything, the editor crashes constantly. Terrible.".into(),
            edited: true,
            ..praise.clone()
        };
        let rollup = rollup_after(&store, &worker, &crm_path, vec![edited.clone()]).await;
        assert_eq!((rollup.contribution_count, rollup.praise, rollup.complaints, rollup.questions), (2, 0, 1, 1));
        assert!(rollup.needs_attention, "an unresolved complaint needs attention: {rollup:?}");
        assert!(rollup.attention_reason.as_deref().is_some_and(|r| r.contains("unresolved complaint")));
        assert!(rollup.sentiment_avg_90d.is_some_and(|s| s < 0.0), "{rollup:?}");
        assert!(rollup.last_excerpt.as_deref().is_some_and(|e| e.starts_with("Edit: the update broke")));

        // The complaint is deleted on the platform: it leaves the figures.
        let deleted = Contribution { deleted: true, body: String::new(), ..edited };
        let rollup = rollup_after(&store, &worker, &crm_path, vec![deleted]).await;
        assert_eq!((rollup.contribution_count, rollup.praise, rollup.complaints, rollup.questions), (1, 0, 0, 1));
        assert!(!rollup.needs_attention, "{rollup:?}");
        assert_eq!(rollup.per_platform.len(), 1);
        assert_eq!(rollup.per_platform[0].contributions, 1);
        assert_eq!(rollup.per_platform[0].handle.as_deref(), Some("mayac"));
    }
}
