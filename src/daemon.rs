//! The commands: `run` (the daemon) and the one-shot operations.

use std::{collections::BTreeMap, io::Write, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use tokio::{sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tributary_sdk::{Crm, PollRequest};

use crate::{
    alerts::Alerts,
    cli::{Command, CrmCommand, DeadLetters, IdentityCommand},
    config::{Config, ConfigErrors, Secrets},
    delivery::{DeliverySettings, Worker},
    health::{self, Health},
    identity, pipeline,
    privacy::{self, ForgetActivities},
    registry, scheduler, shutdown,
    state::{self, StateStore},
    telemetry,
};

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

/// Whether a process exists: `kill(pid, 0)`, where EPERM (another user's
/// process, as under `DynamicUser=`) counts as alive. Unlike a look at
/// /proc, this sees through `ProtectProc=invisible`.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A name for this process in leases: `host/pid/random`.
pub fn owner_id() -> String {
    format!("{}/{}/{:08x}", hostname(), std::process::id(), rand::random::<u32>())
}

/// Frees the leases and claims of processes of this host that died without
/// releasing them (SIGKILL, power loss), so a restart resumes at once
/// instead of waiting for their leases to expire. Owners on other hosts are
/// left to their leases' expiry.
pub async fn release_dead_owners(store: &dyn StateStore) -> anyhow::Result<()> {
    let host = hostname();
    for owner in store.owners().await? {
        let mut parts = owner.split('/');
        let (Some(owner_host), Some(pid)) = (parts.next(), parts.next().and_then(|p| p.parse::<u32>().ok())) else {
            continue;
        };
        if owner_host == host && !process_alive(pid) {
            let released = store.release_owner(&owner).await?;
            tracing::info!(%owner, released, "released the leases of a process that is gone");
        }
    }
    Ok(())
}

pub fn load_config(path: &Path) -> Result<Config, ConfigErrors> {
    Config::load(path)
}

fn open_store(config: &Config) -> anyhow::Result<Arc<dyn StateStore>> {
    let store = state::open(&config.daemon.state)
        .with_context(|| format!("cannot open the state store `{}`", config.daemon.state))?;
    Ok(Arc::new(store))
}

fn delivery_settings(config: &Config) -> DeliverySettings {
    DeliverySettings {
        batch_size: config.daemon.batch_size,
        max_attempts: config.daemon.max_attempts,
        unknown_authors: config.crm.common.unknown_authors,
        retention: config.daemon.retention.0,
        on_delete: config.sources.iter().map(|(name, source)| (name.clone(), source.common.on_delete)).collect(),
        ..DeliverySettings::default()
    }
}

pub async fn execute(command: Command, config_path: &Path) -> anyhow::Result<()> {
    // Reading the state store needs no credentials.
    let secrets = match &command {
        Command::Status { .. }
        | Command::DeadLetters(DeadLetters::List | DeadLetters::Drop { .. })
        | Command::Identity(IdentityCommand::Pending { .. } | IdentityCommand::Reject { .. }) => Secrets::Ignore,
        _ => Secrets::Check,
    };
    let config = Config::load_with(config_path, secrets)?;
    match command {
        Command::Run => run(config).await,
        Command::Check { connect } => check(&config, connect).await,
        Command::Sync { source, since, dry_run } => sync(&config, &source, since.map(|s| s.0), dry_run).await,
        Command::Status { json } => status(&config, json).await,
        Command::DeadLetters(command) => dead_letters(&config, command).await,
        Command::Crm(CrmCommand::Setup) => crm_setup(&config).await,
        Command::Identity(command) => identity_command(&config, command).await,
        Command::Forget { person, activities } => {
            forget(&config, &person, activities.unwrap_or(config.privacy.forget_activities)).await
        }
    }
}

/// Sources, the delivery worker and the CRM checker of one configuration:
/// a reload stops one generation (finishing work in flight) and starts the next.
struct Generation {
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Generation {
    fn start(
        config: &Config,
        store: &Arc<dyn StateStore>,
        health: &Arc<Health>,
        owner: &str,
    ) -> anyhow::Result<Generation> {
        let crm = registry::build_crm(&config.crm, store.clone())?;
        let sources = registry::build_sources(config, store.clone())?;
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let wake = Arc::new(Notify::new());
        health.set_sources(
            sources
                .iter()
                .map(|s| (s.name.clone(), (s.source.platform().to_owned(), s.config.common.schedule.to_string())))
                .collect::<BTreeMap<_, _>>(),
        );
        for built in sources {
            tasks.spawn(scheduler::run_source(built, store.clone(), owner.to_owned(), wake.clone(), cancel.clone()));
        }
        let mut worker =
            Worker::new(store.clone(), crm.clone(), delivery_settings(config), owner.to_owned(), Some(health.clone()));
        if let Some(alerts) = build_alerts(config, store, &crm)? {
            let alerts_wake = Arc::new(Notify::new());
            worker = worker.with_alerts(alerts.clone(), alerts_wake.clone());
            tasks.spawn(alerts.run(cancel.clone(), alerts_wake, Duration::from_secs(5)));
        }
        tasks.spawn(worker.run(cancel.clone(), wake, config.daemon.delivery_interval.0));
        tasks.spawn(check_crm_periodically(crm.clone(), health.clone(), cancel.clone()));
        tasks.spawn(maintain_identities(
            store.clone(),
            crm,
            config.identity.links_file.clone(),
            config.identity.crm_recheck.0,
            cancel.clone(),
        ));
        Ok(Generation { cancel, tasks })
    }

    /// Stops every task after its work in hand; gives up after `timeout`.
    async fn stop(mut self, timeout: Duration) {
        self.cancel.cancel();
        let drained = tokio::time::timeout(timeout, async { while self.tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(?timeout, "tasks still busy after the shutdown timeout; aborting them");
            self.tasks.abort_all();
        }
    }
}

/// The enabled alert rules, when there are any.
fn build_alerts(
    config: &Config,
    store: &Arc<dyn StateStore>,
    crm: &Arc<dyn Crm>,
) -> anyhow::Result<Option<Arc<Alerts>>> {
    if config.alerts.is_empty() {
        return Ok(None);
    }
    let alerts = Alerts::new(&config.alerts, config.crm.common.contact_url.clone(), store.clone(), crm.clone())?;
    Ok((!alerts.is_empty()).then(|| Arc::new(alerts)))
}

/// Sends what the alert rules queued, for one-shot commands.
async fn send_alerts(alerts: Option<&Arc<Alerts>>) -> anyhow::Result<()> {
    if let Some(alerts) = alerts {
        let stats = alerts.send_due().await?;
        if stats.sent + stats.failed + stats.retried + stats.deferred > 0 {
            println!(
                "alerts: {} sent, {} to retry, {} failed, {} held by the rate limit",
                stats.sent, stats.retried, stats.failed, stats.deferred
            );
        }
    }
    Ok(())
}

/// Applies the links file when the daemon starts, and reads the CRM's
/// handle fields back every `recheck` (never when zero).
async fn maintain_identities(
    store: Arc<dyn StateStore>,
    crm: Arc<dyn Crm>,
    links_file: Option<std::path::PathBuf>,
    recheck: Duration,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("identity");
    if let Some(path) = links_file {
        let applied = tokio::select! {
            _ = cancel.cancelled() => return,
            applied = apply_links_file(&*store, &*crm, &path) => applied,
        };
        match applied {
            Ok(done) => tracing::info!(parent: &span, links = done.len(), "links file applied"),
            Err(error) => tracing::error!(parent: &span, error = %format!("{error:#}"), "links file not applied"),
        }
    }
    if recheck.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(recheck) => {}
        }
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = identity::recheck_handles(&*store, &*crm) => result,
        };
        match result {
            Ok((linked, queued)) => tracing::info!(parent: &span, linked, queued, "CRM handle fields read back"),
            Err(error) => tracing::warn!(parent: &span, error = %error, "reading CRM handle fields back failed"),
        }
    }
}

async fn check_crm_periodically(crm: Arc<dyn Crm>, health: Arc<Health>, cancel: CancellationToken) {
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = crm.check() => result,
        };
        health.crm_result(result.err().map(|e| e.to_string()));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

async fn run(mut config: Config) -> anyhow::Result<()> {
    telemetry::init_logs(config.daemon.log_format);
    let metrics = telemetry::init_metrics();
    let mut signals = shutdown::Signals::install().context("cannot install signal handlers")?;
    let store = open_store(&config)?;
    release_dead_owners(&*store).await?;
    let owner = owner_id();
    let health = Arc::new(Health::new(config.crm.kind_name(), config.daemon.failure_threshold));
    let listener = tokio::net::TcpListener::bind(config.daemon.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.daemon.listen))?;
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(health::serve(
        listener,
        health::router(store.clone(), health.clone(), metrics),
        server_stop.clone(),
    ));
    let mut generation = Generation::start(&config, &store, &health, &owner)?;
    let watchdog = tokio::spawn(shutdown::watchdog(store.clone(), server_stop.clone()));
    tracing::info!(listen = %config.daemon.listen, sources = config.sources.len(), crm = config.crm.kind_name(), "tributary running");
    shutdown::ready();

    loop {
        let request = tokio::select! {
            request = signals.next() => request,
            // Every task runs until cancelled: one that ends on its own has
            // panicked. Exit non-zero so systemd restarts a whole daemon
            // rather than leave a source or the delivery silently stopped.
            Some(ended) = generation.tasks.join_next() => {
                let reason = match ended {
                    Err(error) if error.is_panic() => "panicked",
                    _ => "ended unexpectedly",
                };
                tracing::error!(reason, "a task of the daemon {reason}; stopping so that the service manager restarts it");
                generation.stop(config.daemon.shutdown_timeout.0).await;
                server_stop.cancel();
                anyhow::bail!("a task of the daemon {reason}");
            }
        };
        match request {
            shutdown::Request::Stop => break,
            shutdown::Request::Reload => {
                shutdown::reloading();
                match load_config(&config.path) {
                    Ok(new_config) => {
                        tracing::info!("reloading the configuration");
                        let (old, new) = (&config.daemon, &new_config.daemon);
                        let restart_only = [
                            ("state", old.state != new.state),
                            ("listen", old.listen != new.listen),
                            ("log_format", old.log_format != new.log_format),
                            ("failure_threshold", old.failure_threshold != new.failure_threshold),
                        ];
                        for (key, changed) in restart_only {
                            if changed {
                                tracing::warn!(
                                    key,
                                    "`daemon.{key}` changed: it takes effect at the next restart, not on reload"
                                );
                            }
                        }
                        generation.stop(config.daemon.shutdown_timeout.0).await;
                        generation = match Generation::start(&new_config, &store, &health, &owner) {
                            Ok(next) => {
                                config = new_config;
                                next
                            }
                            Err(error) => {
                                tracing::error!(error = %format!("{error:#}"), "the new configuration cannot start; keeping the old one");
                                Generation::start(&config, &store, &health, &owner)?
                            }
                        };
                    }
                    Err(problems) => {
                        tracing::error!(problems = %problems, "the new configuration is invalid; keeping the old one");
                    }
                }
                shutdown::ready();
            }
        }
    }

    tracing::info!("stopping: finishing work in flight");
    shutdown::stopping();
    generation.stop(config.daemon.shutdown_timeout.0).await;
    server_stop.cancel();
    let _ = watchdog.await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(error = %error, "the HTTP server ended with an error"),
        Err(error) => tracing::warn!(error = %error, "the HTTP server task failed"),
    }
    tracing::info!("stopped");
    Ok(())
}

async fn check(config: &Config, connect: bool) -> anyhow::Result<()> {
    println!(
        "{}: configuration is valid ({} source(s), CRM `{}`)",
        config.path.display(),
        config.sources.len(),
        config.crm.kind_name()
    );
    if !connect {
        return Ok(());
    }
    let mut failures = 0;
    let tokens: Arc<dyn tributary_sdk::TokenStore> = Arc::new(tributary_sdk::MemoryTokenStore::default());
    let crm = registry::build_crm(&config.crm, tokens.clone())?;
    match crm.check().await {
        Ok(()) => println!("crm ({}): ok", crm.kind()),
        Err(error) => {
            failures += 1;
            println!("crm ({}): FAILED: {error}", crm.kind());
        }
    }
    for built in registry::build_sources(config, tokens)? {
        match built.source.check().await {
            Ok(()) => println!("source {} ({}): ok", built.name, built.source.platform()),
            Err(error) => {
                failures += 1;
                println!("source {} ({}): FAILED: {error}", built.name, built.source.platform());
            }
        }
    }
    if failures > 0 {
        bail!(Unavailable(format!("{failures} connection check(s) failed")));
    }
    Ok(())
}

/// A dependency could not be reached (sysexits EX_UNAVAILABLE, 69).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

async fn sync(
    config: &Config,
    name: &str,
    since: Option<chrono::DateTime<chrono::Utc>>,
    dry_run: bool,
) -> anyhow::Result<()> {
    telemetry::init_logs(config.daemon.log_format);
    let Some(source_config) = config.sources.get(name) else {
        let known: Vec<_> = config.sources.keys().cloned().collect();
        bail!("no source named `{name}` (configured: {})", known.join(", "));
    };
    let store = open_store(config)?;
    let services = registry::SourceServices::new(store.clone(), &[(name, source_config)]);
    let source = registry::build_source(name, source_config, &services)?;
    // `--since` is a backfill that ignores the cursor; the config's `since`
    // only bounds a first poll.
    let start = pipeline::Start { since: since.or(source_config.common.since.map(|s| s.0)), fresh: since.is_some() };
    // With a date to go back to, a bar of the time covered; else a spinner.
    let (progress, template) = match start.since {
        Some(_) => (indicatif::ProgressBar::new(1000), "{spinner} {elapsed} [{bar:30}] {percent:>3}% {msg}"),
        None => (indicatif::ProgressBar::new_spinner(), "{spinner} {elapsed} {msg}"),
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    progress.enable_steady_tick(Duration::from_millis(120));

    if dry_run {
        // Start where the daemon would, store nothing, print what would go out.
        let mut cursor = if start.fresh { None } else { store.cursor(name).await? };
        let mut stdout = std::io::stdout().lock();
        let mut count = 0u64;
        loop {
            let page = source.poll(&PollRequest { cursor: cursor.clone(), since: start.since }).await?;
            for contribution in page.contributions {
                let contribution = pipeline::normalize(name, contribution);
                serde_json::to_writer(&mut stdout, &contribution)?;
                writeln!(stdout)?;
                count += 1;
            }
            for item in page.quarantined {
                eprintln!("quarantined {:?}: {}", item.external_id, item.reason);
            }
            progress.set_message(format!("{count} contribution(s)"));
            if page.next_cursor.is_some() {
                cursor = page.next_cursor;
            }
            if !page.has_more {
                break;
            }
        }
        progress.finish_and_clear();
        eprintln!("dry run: {count} contribution(s) would be considered; nothing was stored or sent");
        return Ok(());
    }

    release_dead_owners(&*store).await?;
    let owner = owner_id();
    let cancel = CancellationToken::new();
    let stop_on_signal = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        })
    };
    let mut seen = 0u64;
    // (oldest, newest) of the first page with items, and of all so far.
    let mut first = None;
    let mut reached: Option<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = None;
    let started_at = chrono::Utc::now();
    let stats = pipeline::poll_source(&*store, name, &source, start, &owner, &cancel, |page| {
        let commit = &page.commit;
        seen += commit.new + commit.updated + commit.unchanged + commit.quarantined;
        if let (Some(oldest), Some(newest)) = (page.oldest, page.newest) {
            first = first.or(Some((oldest, newest)));
            reached = Some(reached.map_or((oldest, newest), |(o, n)| (o.min(oldest), n.max(newest))));
        }
        match (start.since, first, reached) {
            (Some(since), Some(first), Some(reached)) => {
                progress.set_position(covered_permille(since, started_at, first, reached));
                progress.set_message(format!(
                    "{seen} item(s), {} to {}",
                    reached.0.format("%Y-%m-%d"),
                    reached.1.format("%Y-%m-%d")
                ));
            }
            _ => progress.set_message(format!("{seen} item(s) fetched")),
        }
    })
    .await?;
    store.record_poll(name, None).await?;
    progress.set_message("delivering to the CRM");
    let crm = registry::build_crm(&config.crm, store.clone())?;
    let alerts = build_alerts(config, &store, &crm)?;
    let mut worker = Worker::new(store.clone(), crm, delivery_settings(config), owner, None);
    if let Some(alerts) = &alerts {
        worker = worker.with_alerts(alerts.clone(), Arc::new(Notify::new()));
    }
    let delivered = worker.drain(&cancel).await?;
    progress.finish_and_clear();
    stop_on_signal.abort();
    println!(
        "{name}: {} page(s); {} new, {} updated, {} unchanged, {} quarantined; delivered {}, retry later {}, dead {}, skipped {}",
        stats.pages,
        stats.commit.new,
        stats.commit.updated,
        stats.commit.unchanged,
        stats.commit.quarantined,
        delivered.delivered,
        delivered.retried,
        delivered.dead,
        delivered.skipped
    );
    send_alerts(alerts.as_ref()).await?;
    Ok(())
}

/// How much of `since..now` a walk has covered, in thousandths. `first` is
/// the (oldest, newest) of its first page: a walk that starts near `since`
/// goes oldest first (progress is how far up it came), one that starts near
/// `now` newest first (how far down).
fn covered_permille(
    since: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
    first: (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>),
    reached: (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>),
) -> u64 {
    let total = (now - since).num_seconds().max(1) as f64;
    let oldest_first = first.1 - since < now - first.0;
    let covered = if oldest_first { reached.1 - since } else { now - reached.0 };
    ((covered.num_seconds() as f64 / total).clamp(0.0, 1.0) * 1000.0) as u64
}

async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let states = store.source_states().await?;
    let totals = store.totals().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "sources": states, "totals": totals }))?);
        return Ok(());
    }
    println!(
        "{:<20} {:<22} {:>8} {:>9} {:>6} {:>11}  last error",
        "source", "last success", "backlog", "delivered", "dead", "quarantined"
    );
    for name in config.sources.keys() {
        let state = states.iter().find(|s| &s.name == name).cloned().unwrap_or_default();
        println!(
            "{:<20} {:<22} {:>8} {:>9} {:>6} {:>11}  {}",
            name,
            state.last_success_at.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "never".into()),
            state.backlog,
            state.delivered,
            state.dead_letters,
            state.quarantined,
            state.last_error.unwrap_or_default()
        );
    }
    println!(
        "total: backlog {}, delivered {}, dead letters {}, quarantined {}, linked identities {}, \
         identity pairs to review {}, alerts queued {}, alerts failed {}",
        totals.backlog,
        totals.delivered,
        totals.dead_letters,
        totals.quarantined,
        totals.identities,
        totals.pending_reviews,
        totals.alerts_pending,
        totals.alerts_failed
    );
    Ok(())
}

async fn dead_letters(config: &Config, command: DeadLetters) -> anyhow::Result<()> {
    let store = open_store(config)?;
    match command {
        DeadLetters::List => {
            let letters = store.dead_letters().await?;
            if letters.is_empty() {
                println!("no dead letters");
            }
            for letter in letters {
                println!(
                    "{}\t{}\t{}\tattempts={}\t{}",
                    letter.id, letter.source, letter.key, letter.attempts, letter.error
                );
            }
        }
        DeadLetters::Retry { ids, all } => {
            if ids.is_empty() && !all {
                bail!("name dead-letter ids or pass --all");
            }
            let count = store.retry_dead_letters(&ids).await?;
            println!("{count} dead letter(s) back in the outbox");
            if count > 0 {
                let crm = registry::build_crm(&config.crm, store.clone())?;
                let alerts = build_alerts(config, &store, &crm)?;
                let mut worker = Worker::new(store.clone(), crm, delivery_settings(config), owner_id(), None);
                if let Some(alerts) = &alerts {
                    worker = worker.with_alerts(alerts.clone(), Arc::new(Notify::new()));
                }
                let stats = worker.drain(&CancellationToken::new()).await?;
                send_alerts(alerts.as_ref()).await?;
                println!(
                    "delivered {}, retry later {}, dead {}, skipped {}",
                    stats.delivered, stats.retried, stats.dead, stats.skipped
                );
            }
        }
        DeadLetters::Drop { ids, all } => {
            if ids.is_empty() && !all {
                bail!("name dead-letter ids or pass --all");
            }
            let count = store.drop_dead_letters(&ids).await?;
            println!("{count} dead letter(s) dropped");
        }
    }
    Ok(())
}

/// Applies a links file: one pair per line, `#` comments; names the line of a bad one.
pub async fn apply_links_file(store: &dyn StateStore, crm: &dyn Crm, path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the links file {}", path.display()))?;
    let mut done = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let sides: Vec<&str> = line.split_whitespace().collect();
        let [a, b] = sides.as_slice() else {
            bail!("{}:{}: a link is two sides, e.g. `reddit:u/alice hubspot:12345`", path.display(), number + 1);
        };
        let at = || format!("{}:{}", path.display(), number + 1);
        let a = identity::parse_target(store, crm.kind(), a).await.with_context(at)?;
        let b = identity::parse_target(store, crm.kind(), b).await.with_context(at)?;
        done.push(identity::link(store, crm, &a, &b).await.with_context(at)?);
    }
    Ok(done)
}

async fn identity_command(config: &Config, command: IdentityCommand) -> anyhow::Result<()> {
    let store = open_store(config)?;
    match command {
        IdentityCommand::Pending { all, json } => {
            let reviews = store.reviews(if all { None } else { Some("pending") }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reviews)?);
                return Ok(());
            }
            if reviews.is_empty() {
                println!("nothing to review");
            }
            let side = |p: &crate::state::Profile| {
                format!(
                    "{} ({}{})",
                    p.identity,
                    p.display_name.as_deref().or(p.handle.as_deref()).unwrap_or("?"),
                    p.contact_id.as_deref().map(|c| format!(", contact {c}")).unwrap_or_default()
                )
            };
            for review in reviews {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    review.id,
                    review.status,
                    side(&review.a),
                    side(&review.b),
                    review.evidence
                );
            }
        }
        IdentityCommand::Approve { id } => {
            let crm = registry::build_crm(&config.crm, store.clone())?;
            println!("{}", identity::approve(&*store, &*crm, id).await?);
            deliver_rollups(config, store, crm).await?;
        }
        IdentityCommand::Reject { id } => {
            identity::reject(&*store, id).await?;
            println!("review {id} rejected: this pair is never queued again");
        }
        IdentityCommand::Link { sides, file } => {
            let crm = registry::build_crm(&config.crm, store.clone())?;
            let done = match (file.or(config.identity.links_file.clone()), sides.as_slice()) {
                (_, [a, b]) => {
                    let a = identity::parse_target(&*store, crm.kind(), a).await?;
                    let b = identity::parse_target(&*store, crm.kind(), b).await?;
                    vec![identity::link(&*store, &*crm, &a, &b).await?]
                }
                (Some(path), []) => apply_links_file(&*store, &*crm, &path).await?,
                _ => bail!("name two sides (`reddit:u/alice hubspot:12345`) or a file with --file"),
            };
            for line in done {
                println!("{line}");
            }
            deliver_rollups(config, store, crm).await?;
        }
    }
    Ok(())
}

/// Writes the rollups a merge made due.
async fn deliver_rollups(config: &Config, store: Arc<dyn StateStore>, crm: Arc<dyn Crm>) -> anyhow::Result<()> {
    Worker::new(store, crm, delivery_settings(config), owner_id(), None).write_rollups().await
}

async fn forget(config: &Config, person: &str, activities: ForgetActivities) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let crm = registry::build_crm(&config.crm, store.clone())?;
    let done = privacy::forget(&*store, &*crm, person, activities).await?;
    if done.identities.is_empty() && done.contacts.is_empty() {
        println!("nobody known as {person}; remembered, so later polls skip them");
        return Ok(());
    }
    println!(
        "forgot {} identit(ies) on {} contact(s): {} contribution(s) and {} outbox row(s) erased, {} CRM activit(ies) {}",
        done.identities.len(),
        done.contacts.len(),
        done.erased.contributions,
        done.erased.outbox_rows,
        done.crm_activities,
        match activities {
            ForgetActivities::Archive => "archived",
            ForgetActivities::Delete => "deleted",
        }
    );
    Ok(())
}

async fn crm_setup(config: &Config) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let crm = registry::build_crm(&config.crm, store.clone())?;
    let report = crm.setup(&config.platforms()).await.context("CRM setup failed")?;
    for name in &report.created {
        println!("created  {name}");
    }
    for name in &report.existing {
        println!("exists   {name}");
    }
    println!("{} created, {} already there", report.created.len(), report.existing.len());
    let (linked, queued) = identity::recheck_handles(&*store, &*crm).await.context("reading handles back")?;
    println!("handles read back: {linked} identit(ies) linked, {queued} queued for review");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_covers_its_window_newest_or_oldest_first() {
        let now = chrono::Utc::now();
        let since = now - chrono::Duration::days(10);
        let day = |n: i64| now - chrono::Duration::days(n);
        // Newest first (the first page is recent), down to 5 days ago: half.
        assert_eq!(covered_permille(since, now, (day(1), now), (day(5), now)), 500);
        // Oldest first (the first page is old), up to 2 days ago: eight tenths.
        assert_eq!(covered_permille(since, now, (day(10), day(9)), (day(10), day(2))), 800);
        // Past the window: done, never more.
        assert_eq!(covered_permille(since, now, (day(1), now), (day(30), now)), 1000);
    }

    #[test]
    fn process_liveness_sees_live_and_dead_processes() {
        assert!(process_alive(std::process::id()));
        assert!(process_alive(1), "init is alive (EPERM counts as alive)");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid), "a reaped child is gone");
        assert!(!process_alive(0) && !process_alive(u32::MAX));
    }
}
