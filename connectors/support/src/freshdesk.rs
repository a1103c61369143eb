//! freshdesk source: being written.
