//! Not written yet: the feature compiles to nothing.
