//! salesforce sink: being written.
