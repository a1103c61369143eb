//! dynamics sink: being written.
