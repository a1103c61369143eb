//! pipedrive sink: being written.
