//! webhook sink: being written.
