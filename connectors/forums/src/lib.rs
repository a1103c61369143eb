//! Forum and feed sources: one module per platform, each behind its own feature.

#[cfg(feature = "discourse")]
pub mod discourse;
#[cfg(feature = "rss")]
pub mod rss;
