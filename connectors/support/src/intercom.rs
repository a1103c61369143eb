//! intercom source: being written.
