//! CRM sinks: one module per CRM, each behind its own feature.

#[cfg(feature = "bottlecrm")]
pub mod bottlecrm;
#[cfg(feature = "dynamics")]
pub mod dynamics;
#[cfg(feature = "file")]
pub mod file;
#[cfg(feature = "hubspot")]
pub mod hubspot;
#[cfg(feature = "pipedrive")]
pub mod pipedrive;
#[cfg(feature = "salesforce")]
pub mod salesforce;
#[cfg(feature = "twenty")]
pub mod twenty;
#[cfg(feature = "webhook")]
pub mod webhook;
#[cfg(feature = "zoho")]
pub mod zoho;
