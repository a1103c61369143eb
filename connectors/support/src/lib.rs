//! Support tools and any JSON API: one module per source, each behind its own feature.
//! Support conversations usually carry the customer's e-mail, which makes
//! them the anchor for identity across communities.

#[cfg(feature = "freshdesk")]
pub mod freshdesk;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "intercom")]
pub mod intercom;
#[cfg(feature = "zendesk")]
pub mod zendesk;
