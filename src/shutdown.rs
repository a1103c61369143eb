//! Signals and systemd notifications.
//!
//! SIGTERM and SIGINT stop the daemon (drain, store state, exit 0); SIGHUP
//! reloads the configuration. sd_notify messages are sent when systemd
//! asked for them (`NOTIFY_SOCKET`), and are no-ops otherwise.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Stop,
    Reload,
}

pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.term.recv() => Request::Stop,
            _ = self.int.recv() => Request::Stop,
            _ = self.hup.recv() => Request::Reload,
        }
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(false, states) {
        tracing::debug!(error = %error, "sd_notify failed");
    }
}

pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("running")]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading configuration")]),
        Err(_) => notify(&[NotifyState::Reloading, NotifyState::Status("reloading configuration")]),
    }
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Pings the systemd watchdog at half its interval until `shutdown`, as
/// long as the state store answers: a wedged store stops the pings and
/// systemd restarts the service.
pub async fn watchdog(store: std::sync::Arc<dyn crate::state::StateStore>, shutdown: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    loop {
        match tokio::time::timeout(every, store.ping()).await {
            Ok(Ok(())) => notify(&[NotifyState::Watchdog]),
            Ok(Err(error)) => tracing::error!(error = %error, "state store unreachable; watchdog not pinged"),
            Err(_) => tracing::error!("state store too slow; watchdog not pinged"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
