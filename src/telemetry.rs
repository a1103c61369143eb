//! Logs (tracing: text lines for journald, or JSON) and metrics (a
//! Prometheus recorder rendered by `/metrics`).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber once; `RUST_LOG` overrides the level.
pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).try_init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).try_init(),
    };
    // Already installed (a reload, or tests): keep the first one.
    let _ = result;
}

/// Installs the global metrics recorder; `None` if one already is.
pub fn init_metrics() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    describe();
    Some(handle)
}

fn describe() {
    metrics::describe_counter!(
        "tributary_contributions_total",
        "Contributions fetched, by source and outcome (new, updated, unchanged, quarantined)"
    );
    metrics::describe_counter!("tributary_polls_total", "Polls, by source and outcome");
    metrics::describe_histogram!("tributary_poll_duration_seconds", "Duration of one poll of a source");
    metrics::describe_counter!(
        "tributary_delivered_total",
        "Outbox rows finished, by outcome (delivered, retry, dead, skipped)"
    );
    metrics::describe_gauge!("tributary_outbox_backlog", "Contributions waiting for delivery");
    metrics::describe_gauge!("tributary_dead_letters", "Contributions the CRM refused for good");
    metrics::describe_gauge!("tributary_quarantined", "Malformed items kept with their reason");
    metrics::describe_gauge!("tributary_identities", "Platform identities linked to CRM contacts");
}
