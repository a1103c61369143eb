//! CRM sinks: one module per CRM, each behind its own feature.

#[cfg(feature = "file")]
pub mod file;
#[cfg(feature = "hubspot")]
pub mod hubspot;
