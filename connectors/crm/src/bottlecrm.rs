//! bottlecrm sink: being written.
