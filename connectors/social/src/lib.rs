//! Social and community sources: one module per platform, each behind its own feature.

#[cfg(feature = "github")]
pub mod github;
#[cfg(feature = "hackernews")]
pub mod hackernews;
#[cfg(feature = "mastodon")]
pub mod mastodon;
#[cfg(feature = "stackexchange")]
pub mod stackexchange;
#[cfg(feature = "youtube")]
pub mod youtube;
