//! Tributary: brings what customers say in their communities into the
//! company's CRM. This crate is the daemon's wiring and knows no platform:
//! connectors live in `connectors/`.

#[cfg(not(any(
    feature = "hubspot",
    feature = "salesforce",
    feature = "pipedrive",
    feature = "twenty",
    feature = "webhook",
    feature = "dynamics",
    feature = "zoho",
    feature = "bottlecrm",
    feature = "file"
)))]
compile_error!(
    "build with at least one CRM feature: `hubspot`, `salesforce`, `pipedrive`, `twenty`, `webhook` or `file`"
);

pub mod alerts;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod enrich;
pub mod health;
pub mod identity;
pub mod pipeline;
pub mod privacy;
pub mod registry;
pub mod scheduler;
pub mod shutdown;
pub mod state;
pub mod telemetry;
