//! http source: being written.
