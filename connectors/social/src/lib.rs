//! Social and community sources: one module per platform, each behind its own feature.

#[cfg(feature = "bluesky")]
pub mod bluesky;
#[cfg(feature = "github")]
pub mod github;
#[cfg(feature = "hackernews")]
pub mod hackernews;
#[cfg(feature = "mastodon")]
pub mod mastodon;
#[cfg(feature = "reddit")]
pub mod reddit;
#[cfg(feature = "stackexchange")]
pub mod stackexchange;
#[cfg(feature = "x")]
pub mod x;
#[cfg(feature = "youtube")]
pub mod youtube;
