//! The contract between Tributary's daemon and its connectors.
//!
//! A connector crate knows one platform's API and nothing about tasks, the
//! state store or configuration files. It implements [`Source`] (something
//! that can be polled for [`Contribution`]s) or [`Crm`] (something that can
//! receive contacts, activities and rollups), and talks HTTP through the one
//! shared [`HttpClient`], which handles rate limits, retries and Retry-After.

pub mod crm;
pub mod http;
pub mod model;
pub mod oauth;
pub mod secret;
pub mod signature;
pub mod source;
pub mod text;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use crm::{
    ActivityUpsert, ContactLookup, ContactUpsert, Crm, CrmError, PlatformRollup, RecordOutcome, Rollup, SetupReport,
};
pub use http::{HttpClient, HttpError, HttpOptions, HttpResponse, RateBudget};
pub use model::{Author, Contribution, Intent, Kind, Signals};
pub use oauth::{MemoryTokenStore, OAuth2, OAuthError, StoredToken, TokenStore, TokenStoreError};
pub use secret::{SecretError, SecretRef};
pub use source::{Cursor, Page, PollRequest, Quarantined, Source, SourceError};
