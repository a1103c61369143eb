//! zendesk source: being written.
