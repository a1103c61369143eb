//! twenty sink: being written.
