//! The HTTP surface for operators, on 127.0.0.1 by default:
//! `/healthz` (alive), `/readyz` (state store reachable, CRM reachable, no
//! source failing past its threshold), `/status` (JSON per source, never a
//! secret) and `/metrics` (Prometheus text).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::state::StateStore;

/// What the running daemon knows beyond the state store.
pub struct Health {
    started: Instant,
    crm_kind: String,
    failure_threshold: u32,
    /// Configured sources: name -> (platform, schedule text).
    sources: Mutex<BTreeMap<String, (String, String)>>,
    crm: Mutex<CrmHealth>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CrmHealth {
    pub reachable: Option<bool>,
    pub last_error: Option<String>,
    pub checked_at: Option<DateTime<Utc>>,
}

impl Health {
    pub fn new(crm_kind: &str, failure_threshold: u32) -> Health {
        Health {
            started: Instant::now(),
            crm_kind: crm_kind.to_owned(),
            failure_threshold,
            sources: Mutex::new(BTreeMap::new()),
            crm: Mutex::new(CrmHealth::default()),
        }
    }

    pub fn set_sources(&self, sources: BTreeMap<String, (String, String)>) {
        *self.sources.lock().unwrap_or_else(|p| p.into_inner()) = sources;
    }

    /// Records the outcome of a CRM call; the error must be free of secrets
    /// (connector errors are).
    pub fn crm_result(&self, error: Option<String>) {
        let mut crm = self.crm.lock().unwrap_or_else(|p| p.into_inner());
        crm.reachable = Some(error.is_none());
        crm.last_error = error;
        crm.checked_at = Some(Utc::now());
    }

    fn crm(&self) -> CrmHealth {
        self.crm.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Clone)]
struct AppState {
    store: Arc<dyn StateStore>,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
}

pub fn router(store: Arc<dyn StateStore>, health: Arc<Health>, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(prometheus))
        .with_state(AppState { store, health, metrics })
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if let Err(error) = app.store.ping().await {
        problems.push(format!("state store unreachable: {error}"));
    }
    let crm = app.health.crm();
    if crm.reachable == Some(false) {
        problems.push(format!("CRM unreachable: {}", crm.last_error.unwrap_or_default()));
    }
    match app.store.source_states().await {
        Ok(states) => {
            let configured = app.health.sources.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for state in states.iter().filter(|s| configured.contains_key(&s.name)) {
                if state.consecutive_failures >= app.health.failure_threshold {
                    problems
                        .push(format!("source `{}` failed {} polls in a row", state.name, state.consecutive_failures));
                }
            }
        }
        Err(error) => problems.push(format!("state store: {error}")),
    }
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({ "ready": true })))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "problems": problems })))
    }
}

async fn status(State(app): State<AppState>) -> impl IntoResponse {
    let states = match app.store.source_states().await {
        Ok(states) => states,
        Err(error) => {
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": error.to_string() })));
        }
    };
    let totals = app.store.totals().await.ok();
    let configured = app.health.sources.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let now = Utc::now();
    let sources: Vec<_> = configured
        .iter()
        .map(|(name, (platform, schedule))| {
            let state = states.iter().find(|s| &s.name == name).cloned().unwrap_or_default();
            json!({
                "name": name,
                "platform": platform,
                "schedule": schedule,
                "last_poll_at": state.last_poll_at,
                "last_success_at": state.last_success_at,
                "lag_seconds": state.last_success_at.map(|at| (now - at).num_seconds()),
                "newest_item_at": state.newest_item_at,
                "consecutive_failures": state.consecutive_failures,
                "last_error": state.last_error,
                "backlog": state.backlog,
                "delivered": state.delivered,
                "dead_letters": state.dead_letters,
                "quarantined": state.quarantined,
            })
        })
        .collect();
    (
        StatusCode::OK,
        Json(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": app.health.started.elapsed().as_secs(),
            "crm": { "type": app.health.crm_kind, "health": app.health.crm() },
            "sources": sources,
            "totals": totals,
        })),
    )
}

async fn prometheus(State(app): State<AppState>) -> impl IntoResponse {
    // Gauges that live in the store are read when scraped.
    if let Ok(totals) = app.store.totals().await {
        metrics::gauge!("tributary_outbox_backlog").set(totals.backlog as f64);
        metrics::gauge!("tributary_dead_letters").set(totals.dead_letters as f64);
        metrics::gauge!("tributary_quarantined").set(totals.quarantined as f64);
        metrics::gauge!("tributary_identities").set(totals.identities as f64);
        metrics::gauge!("tributary_identity_reviews_pending").set(totals.pending_reviews as f64);
        metrics::gauge!("tributary_alerts_pending").set(totals.alerts_pending as f64);
        metrics::gauge!("tributary_alerts_failed").set(totals.alerts_failed as f64);
    }
    if let Ok(states) = app.store.source_states().await {
        for state in states {
            metrics::gauge!("tributary_source_backlog", "source" => state.name.clone()).set(state.backlog as f64);
            metrics::gauge!("tributary_source_consecutive_failures", "source" => state.name.clone())
                .set(state.consecutive_failures as f64);
            if let Some(at) = state.last_success_at {
                metrics::gauge!("tributary_source_last_success_timestamp_seconds", "source" => state.name.clone())
                    .set(at.timestamp() as f64);
            }
        }
    }
    let body = app.metrics.as_ref().map(PrometheusHandle::render).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
