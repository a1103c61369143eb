//! zoho sink: being written.
