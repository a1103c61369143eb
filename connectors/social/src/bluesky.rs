//! Bluesky (AT Protocol): the company account's posts and replies (watch
//! mode) and posts matching search terms (listen mode).
//!
//! Every configured feed is a *stream*: each actor in
//! [`BlueskyConfig::actors`] reads `app.bsky.feed.getAuthorFeed` (with
//! `filter=posts_with_replies`), each term in
//! [`BlueskyConfig::search_terms`] reads `app.bsky.feed.searchPosts` (with
//! `sort=latest`). Both answer newest first with an opaque `cursor` for the
//! next, older page (no cursor: the end). Lexicons relied on
//! (`lexicons/app/bsky/feed/*.json` of `bluesky-social/atproto`, as
//! mirrored on docs.rs/pub.dev): `limit` is 1..=100; `searchPosts` takes
//! `since` ("posts after the indicated datetime (inclusive)", compared with
//! the post's `sortAt`, "which may not match createdAt"); a feed item is a
//! `feedViewPost` `{post, reply?, reason?}` where `reason` is
//! `#reasonRepost` or `#reasonPin`, and `reply.parent`/`reply.root` are a
//! `#postView`, `#notFoundPost` or `#blockedPost`.
//!
//! Incremental model: a *pass* over one stream starts at the newest page and
//! pages back with `cursor` until it reaches a post at or below the stream's
//! watermark, runs out of pages, passes [`PollRequest::since`] (the first
//! pass only) or has fetched [`BlueskyConfig::max_pages_per_poll`] pages:
//! then it is paused (the cursor keeps the platform's `cursor`) and resumed
//! by the next poll, and the watermark moves to the newest post of the pass
//! only when the pass completes. The first pass of a stream without `since`
//! is the newest page only. A post's time is the earlier of `indexedAt` and
//! `record.createdAt`, which is how the AppView's `sortAt` orders feeds, so a
//! back-dated post does not stop a pass early. Posts at the watermark's exact
//! time are returned again (the daemon's ledger drops unchanged ones): two
//! posts may share a millisecond. `searchPosts` also gets
//! `since=<watermark or PollRequest::since>` so the server filters too. One
//! call to [`Source::poll`] fetches one page of one stream; the cursor
//! records which stream the current round is on and each stream's state.
//!
//! Mapping: reposts (`#reasonRepost`) are skipped (the reposted post is
//! someone else's, under the reposter's timeline position). A pin marker
//! (`#reasonPin`, only sent with `includePins`, which this connector does not
//! ask for) is returned once like any post, but never stops a pass nor moves
//! the watermark. In watch mode, the `reply.parent` and `reply.root` post
//! views of an item are returned too (they are the conversation the company
//! answered: often a customer's post), deduplicated within the page;
//! `#notFoundPost`/`#blockedPost` views are skipped, never an error.
//!
//! Edits: Bluesky posts cannot be edited (the app has no edit; a record
//! rewritten in place would only show as a new `text`, which changes the
//! contribution's body and so its hash), so `edited` is always false.
//! Deletions: feeds carry no deletion marker; a deleted post simply
//! disappears, so `deleted` is always false.
//!
//! Auth: `com.atproto.server.createSession` with `{identifier, password}`
//! (an app password) gives `{accessJwt, refreshJwt, did, handle}`; calls
//! send `Authorization: Bearer <accessJwt>`. A `400 {"error":"ExpiredToken"}`
//! (the PDS's answer for an expired access token, as seen in atproto client
//! issues, e.g. MarshalX/atproto#158) is answered by
//! `com.atproto.server.refreshSession` with the refreshJwt as bearer, then the
//! call is retried once; if refreshing fails a new session is created.
//!
//! Session persistence: the session is kept in a [`TokenStore`] (the
//! daemon's state store, given by [`BlueskySource::with_token_store`]; a
//! [`MemoryTokenStore`] otherwise), so a restart does not call
//! `createSession` again (a call the PDS rate-limits tightly) while the stored
//! session is usable. The key is `bluesky-session:` followed by the hex
//! SHA-256 of the service URL, the identifier and the app password, so a
//! changed password (or account, or PDS) is a new key and a new login. The
//! [`StoredToken`] holds `access_token` = accessJwt, `refresh_token` =
//! refreshJwt and `expires_at` = the `exp` claim of the accessJwt (its JSON
//! payload is read, never verified: it only decides when to refresh; `None`
//! when unreadable, and then the PDS's `ExpiredToken` decides). The DID is
//! not stored: it is only logged, and a restored session reads it from the
//! accessJwt's `sub` claim; the handle is not needed at all. On first use a
//! stored session is used as is while fresh (over a minute left), a stale
//! one is refreshed with its refreshJwt, and only if that fails is a new
//! session created. Every new or refreshed session is saved; a store that
//! cannot be read or written costs a login (warned), never a poll. Tokens
//! never reach a log line, an error or a `Debug` output.
//!
//! Rate limits (docs.bsky.app, `advanced-guides/rate-limits`): answers carry
//! `RateLimit-Limit`, `-Remaining`, `-Reset` (Unix time) and `-Policy`;
//! crossing a limit gives HTTP 429. The shared HTTP client reads
//! `ratelimit-*` and holds every request until Reset; nothing is signalled
//! in bodies.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, MemoryTokenStore, Page,
    PollRequest, Quarantined, SecretError, SecretRef, Source, SourceError, StoredToken, TokenStore,
    source::check_status, text::tidy,
};
use url::Url;

const PLATFORM: &str = "bluesky";

/// The largest page both endpoints serve.
const MAX_LIMIT: u32 = 100;

const REASON_PIN: &str = "app.bsky.feed.defs#reasonPin";
const POST_VIEW: &str = "app.bsky.feed.defs#postView";

/// Settings of one Bluesky source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlueskyConfig {
    /// Handle or DID of the account Tributary logs in as.
    pub identifier: String,
    /// An app password of that account (`{ env = "..." }` or
    /// `{ file = "..." }`), created under Settings > App passwords.
    pub app_password: SecretRef,
    /// The PDS used to log in and for every XRPC call.
    #[serde(default = "default_service")]
    pub service: Url,
    /// Handles or DIDs whose feeds (posts and replies) are watched.
    #[serde(default)]
    pub actors: Vec<String>,
    /// Search queries whose newest matching posts are read.
    #[serde(default)]
    pub search_terms: Vec<String>,
    /// Most pages one stream fetches in one poll; a longer pass is paused
    /// and resumed by the next poll, so nothing newer is skipped.
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
    /// Posts per page, 1..=100.
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_service() -> Url {
    Url::parse("https://bsky.social").unwrap_or_else(|_| unreachable!("a valid literal URL"))
}

fn default_max_pages_per_poll() -> u32 {
    10
}

fn default_limit() -> u32 {
    MAX_LIMIT
}

/// Why a [`BlueskySource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("bluesky `app_password`: {0}")]
    Secret(#[from] SecretError),
    #[error("bluesky `service` must be an http(s) URL, not `{0}`")]
    InvalidService(String),
    #[error("bluesky `identifier` is empty")]
    MissingIdentifier,
    #[error("bluesky `limit` must be 1..=100, not {0}")]
    InvalidLimit(u32),
    #[error("bluesky source has nothing to read: set `actors` or `search_terms`")]
    NothingToWatch,
    #[error("bluesky `actors`/`search_terms` hold an empty entry")]
    EmptyEntry,
    #[error("bluesky HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// The logged-in session (Debug shows no token).
#[derive(Clone)]
struct Session {
    access: SecretString,
    refresh: SecretString,
    /// The account's DID: from the session answer, or the `sub` claim of a
    /// restored accessJwt (for log lines only).
    did: Option<String>,
    /// The accessJwt's `exp` claim, when readable.
    expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("did", &self.did).field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

impl Session {
    fn new(access: String, refresh: String, did: Option<String>) -> Session {
        let claims = jwt_claims(&access);
        let expires_at = claims.as_ref().and_then(jwt_expiry);
        let did = did.or_else(|| claims.as_ref().and_then(jwt_subject));
        Session { access: SecretString::from(access), refresh: SecretString::from(refresh), did, expires_at }
    }

    /// A stored session; `None` without a refreshJwt (not one this source saved).
    fn restore(token: StoredToken) -> Option<Session> {
        let refresh = token.refresh_token.filter(|refresh| !refresh.expose_secret().is_empty())?;
        if token.access_token.expose_secret().is_empty() {
            return None;
        }
        let claims = jwt_claims(token.access_token.expose_secret());
        Some(Session {
            expires_at: token.expires_at.or_else(|| claims.as_ref().and_then(jwt_expiry)),
            did: claims.as_ref().and_then(jwt_subject),
            access: token.access_token,
            refresh,
        })
    }

    fn to_stored(&self) -> StoredToken {
        StoredToken {
            access_token: self.access.clone(),
            refresh_token: Some(self.refresh.clone()),
            expires_at: self.expires_at,
        }
    }

    fn did(&self) -> &str {
        self.did.as_deref().unwrap_or("unknown")
    }
}

/// The session of a source and whether the token store was read yet.
#[derive(Default)]
struct SessionSlot {
    restored: bool,
    session: Option<Session>,
}

/// The token store key of a login: a changed service, identifier or
/// password is another key.
fn session_key(service: &Url, identifier: &str, password: &SecretString) -> String {
    let mut digest = Sha256::new();
    digest.update(service.as_str());
    digest.update([0]);
    digest.update(identifier);
    digest.update([0]);
    digest.update(password.expose_secret());
    format!("bluesky-session:{}", hex::encode(digest.finalize()))
}

/// Unpadded (or padded) base64url, as in a JWT segment.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    // One character alone cannot end a segment (6 bits are not a byte).
    (bits < 6).then_some(out)
}

/// The payload of a JWT (not verified: only read for its times and subject).
fn jwt_claims(token: &str) -> Option<Value> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    serde_json::from_slice(&base64url_decode(payload)?).ok().filter(Value::is_object)
}

/// The `exp` claim (NumericDate: seconds, possibly fractional).
fn jwt_expiry(claims: &Value) -> Option<DateTime<Utc>> {
    let exp = claims.get("exp")?;
    let seconds = exp.as_i64().or_else(|| exp.as_f64().filter(|s| s.is_finite()).map(|s| s as i64))?;
    DateTime::from_timestamp(seconds, 0)
}

/// The `sub` claim when it is a DID.
fn jwt_subject(claims: &Value) -> Option<String> {
    claims.get("sub")?.as_str().filter(|sub| sub.starts_with("did:")).map(str::to_owned)
}

/// What createSession and refreshSession answer (the fields read here).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionBody {
    access_jwt: String,
    refresh_jwt: String,
    did: String,
}

/// A Bluesky source: author feeds and searches through one PDS.
pub struct BlueskySource {
    instance: String,
    config: BlueskyConfig,
    password: SecretString,
    http: HttpClient,
    /// Where the session outlives a restart, under `key`.
    store: Arc<dyn TokenStore>,
    key: String,
    /// One login or refresh at a time.
    session: tokio::sync::Mutex<SessionSlot>,
}

impl std::fmt::Debug for BlueskySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlueskySource")
            .field("instance", &self.instance)
            .field("config", &self.config)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

/// One stream of a source.
#[derive(Debug, Clone, Copy)]
enum Stream<'a> {
    Actor(&'a str),
    Search(&'a str),
}

impl Stream<'_> {
    fn key(&self) -> String {
        match self {
            Stream::Actor(actor) => format!("actor:{actor}"),
            Stream::Search(term) => format!("search:{term}"),
        }
    }
}

/// What the cursor of a Bluesky source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct BlueskyCursor {
    /// Index of the stream the current round is on.
    #[serde(default)]
    at: usize,
    /// Per stream key (`actor:<id>`, `search:<terms>`).
    #[serde(default)]
    streams: BTreeMap<String, StreamState>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StreamState {
    /// The newest post time committed by a finished pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark: Option<DateTime<Utc>>,
    /// The pass in progress, while paging back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<PassState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PassState {
    /// The newest post time seen by this pass: the next watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<DateTime<Utc>>,
    /// The platform's opaque `cursor` of the next page.
    cursor: String,
    /// Pages fetched by this pass in the current poll.
    pages: u32,
    /// The oldest post time to keep (first pass only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
}

/// The fields of a `#postView` this connector reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPost {
    uri: String,
    author: RawAuthor,
    record: RawRecord,
    #[serde(default)]
    like_count: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAuthor {
    did: String,
    #[serde(default)]
    handle: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRecord {
    text: String,
    created_at: DateTime<Utc>,
    #[serde(default)]
    reply: Option<RawReplyRef>,
    #[serde(default)]
    facets: Option<Vec<Value>>,
    #[serde(default)]
    tags: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct RawReplyRef {
    root: StrongRef,
    parent: StrongRef,
}

#[derive(Debug, Deserialize)]
struct StrongRef {
    uri: String,
}

fn max_time(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn parse_time(value: Option<&Value>) -> Option<DateTime<Utc>> {
    value?.as_str()?.parse::<DateTime<Utc>>().ok()
}

/// A post view's place in the feed: the earlier of `indexedAt` and
/// `record.createdAt` (the AppView's `sortAt`).
fn sort_at(post: &Value) -> Option<DateTime<Utc>> {
    let indexed = parse_time(post.get("indexedAt"));
    let created = parse_time(post.pointer("/record/createdAt"));
    match (indexed, created) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The rkey of an `at://<did>/app.bsky.feed.post/<rkey>` URI.
fn post_rkey(uri: &str) -> Option<&str> {
    let mut parts = uri.strip_prefix("at://")?.split('/');
    let (_authority, collection, rkey) = (parts.next()?, parts.next()?, parts.next()?);
    (collection == "app.bsky.feed.post" && !rkey.is_empty() && parts.next().is_none()).then_some(rkey)
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Whether an answer says the access token expired.
fn token_expired(response: &HttpResponse) -> bool {
    matches!(response.status.as_u16(), 400 | 401)
        && serde_json::from_slice::<Value>(&response.body)
            .ok()
            .is_some_and(|body| body.get("error").and_then(Value::as_str) == Some("ExpiredToken"))
}

fn bearer(token: &SecretString) -> Result<HeaderValue, SourceError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
        .map_err(|_| SourceError::Decode("the session token cannot be sent in a header".to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}

impl BlueskySource {
    pub fn new(instance: &str, config: BlueskyConfig, http: HttpOptions) -> Result<BlueskySource, BuildError> {
        if !matches!(config.service.scheme(), "http" | "https") || config.service.cannot_be_a_base() {
            return Err(BuildError::InvalidService(config.service.to_string()));
        }
        if config.identifier.trim().is_empty() {
            return Err(BuildError::MissingIdentifier);
        }
        if !(1..=MAX_LIMIT).contains(&config.limit) {
            return Err(BuildError::InvalidLimit(config.limit));
        }
        if config.actors.is_empty() && config.search_terms.is_empty() {
            return Err(BuildError::NothingToWatch);
        }
        if config.actors.iter().chain(&config.search_terms).any(|entry| entry.trim().is_empty()) {
            return Err(BuildError::EmptyEntry);
        }
        let password = config.app_password.resolve()?;
        Ok(BlueskySource {
            instance: instance.to_owned(),
            http: HttpClient::new(http)?,
            key: session_key(&config.service, &config.identifier, &password),
            config,
            password,
            store: Arc::new(MemoryTokenStore::default()),
            session: tokio::sync::Mutex::new(SessionSlot::default()),
        })
    }

    /// Keeps the session in `store`, so a restart reuses it.
    pub fn with_token_store(self, store: Arc<dyn TokenStore>) -> BlueskySource {
        BlueskySource { store, session: tokio::sync::Mutex::new(SessionSlot::default()), ..self }
    }

    fn streams(&self) -> Vec<Stream<'_>> {
        let actors = self.config.actors.iter().map(|actor| Stream::Actor(actor.as_str()));
        actors.chain(self.config.search_terms.iter().map(|term| Stream::Search(term.as_str()))).collect()
    }

    /// `service` + `/xrpc/<nsid>`.
    fn xrpc_url(&self, nsid: &str) -> Url {
        let mut url = self.config.service.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["xrpc", nsid]);
        }
        url
    }

    /// Reads a session answer; the body holds tokens, so no part of it
    /// reaches an error message.
    fn read_session(&self, response: &HttpResponse) -> Result<Session, SourceError> {
        let body: SessionBody = serde_json::from_slice(&response.body).map_err(|_| {
            SourceError::Decode(format!("{} did not answer a session (accessJwt, refreshJwt, did)", response.target))
        })?;
        Ok(Session::new(body.access_jwt, body.refresh_jwt, Some(body.did)))
    }

    /// Saves a new or refreshed session; a failure only costs a login after
    /// a restart.
    async fn persist(&self, session: &Session) {
        if let Err(error) = self.store.save_token(&self.key, &session.to_stored()).await {
            tracing::warn!(source = %self.instance, %error, "cannot persist the bluesky session; a restart will log in again");
        }
    }

    async fn create_session(&self) -> Result<Session, SourceError> {
        let body = serde_json::json!({
            "identifier": self.config.identifier,
            "password": self.password.expose_secret(),
        });
        let request = self.http.post(self.xrpc_url("com.atproto.server.createSession")).json(&body);
        let response = self.http.send(request).await?;
        check_status(&response)?;
        let session = self.read_session(&response)?;
        self.persist(&session).await;
        tracing::info!(source = %self.instance, did = %session.did(), "bluesky session created");
        Ok(session)
    }

    async fn refresh_session(&self, old: &Session) -> Result<Session, SourceError> {
        let request = self
            .http
            .post(self.xrpc_url("com.atproto.server.refreshSession"))
            .header(AUTHORIZATION, bearer(&old.refresh)?);
        let response = self.http.send(request).await?;
        check_status(&response)?;
        let session = self.read_session(&response)?;
        self.persist(&session).await;
        tracing::debug!(source = %self.instance, did = %session.did(), "bluesky session refreshed");
        Ok(session)
    }

    /// The stored session while fresh, else the stored session refreshed,
    /// else a new session.
    async fn restore_session(&self) -> Result<Session, SourceError> {
        let stored = match self.store.load_token(&self.key).await {
            Ok(stored) => stored.and_then(Session::restore),
            Err(error) => {
                tracing::warn!(source = %self.instance, %error, "cannot read the stored bluesky session; logging in");
                None
            }
        };
        let Some(stored) = stored else {
            return self.create_session().await;
        };
        if stored.to_stored().is_fresh() {
            tracing::info!(source = %self.instance, did = %stored.did(), "bluesky session restored");
            return Ok(stored);
        }
        tracing::debug!(source = %self.instance, "the stored bluesky session expired; refreshing it");
        match self.refresh_session(&stored).await {
            Ok(session) => Ok(session),
            Err(error) => {
                tracing::info!(source = %self.instance, %error, "bluesky stored session refresh failed; logging in again");
                self.create_session().await
            }
        }
    }

    /// The session held, else (first use) the stored one, else a new one.
    async fn current_session(&self) -> Result<Session, SourceError> {
        let mut slot = self.session.lock().await;
        if let Some(session) = &slot.session {
            return Ok(session.clone());
        }
        let session = if slot.restored { self.create_session().await? } else { self.restore_session().await? };
        *slot = SessionSlot { restored: true, session: Some(session.clone()) };
        Ok(session)
    }

    /// `rejected` expired: a refreshed session (or a new one if refreshing
    /// fails), unless another call already replaced it.
    async fn renew_session(&self, rejected: &Session) -> Result<Session, SourceError> {
        let mut slot = self.session.lock().await;
        if let Some(current) = &slot.session
            && current.access.expose_secret() != rejected.access.expose_secret()
        {
            return Ok(current.clone());
        }
        let renewed = match self.refresh_session(rejected).await {
            Ok(renewed) => renewed,
            Err(error) => {
                tracing::info!(source = %self.instance, %error, "bluesky session refresh failed; logging in again");
                slot.session = None;
                self.create_session().await?
            }
        };
        *slot = SessionSlot { restored: true, session: Some(renewed.clone()) };
        Ok(renewed)
    }

    async fn send_get(&self, url: &Url, session: &Session) -> Result<HttpResponse, SourceError> {
        let request = self.http.get(url.clone()).header(AUTHORIZATION, bearer(&session.access)?);
        Ok(self.http.send(request).await?)
    }

    /// An authenticated XRPC query, its answer read as JSON. An expired
    /// access token is refreshed (or the session recreated) and the call
    /// retried once.
    async fn xrpc_get(&self, nsid: &str, query: &[(&str, String)]) -> Result<Value, SourceError> {
        let mut url = self.xrpc_url(nsid);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in query {
                pairs.append_pair(name, value);
            }
        }
        let session = self.current_session().await?;
        let mut response = self.send_get(&url, &session).await?;
        if token_expired(&response) {
            tracing::debug!(source = %self.instance, "bluesky access token expired; refreshing the session");
            let renewed = self.renew_session(&session).await?;
            response = self.send_get(&url, &renewed).await?;
        }
        check_status(&response)?;
        serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))
    }

    /// One page of a stream: its raw items and the platform's next cursor.
    async fn fetch(
        &self,
        stream: Stream<'_>,
        cursor: Option<&str>,
        lower: Option<DateTime<Utc>>,
    ) -> Result<(Vec<Value>, Option<String>), SourceError> {
        let mut query = vec![("limit", self.config.limit.to_string())];
        let (nsid, list) = match stream {
            Stream::Actor(actor) => {
                query.push(("actor", actor.to_owned()));
                query.push(("filter", "posts_with_replies".to_owned()));
                ("app.bsky.feed.getAuthorFeed", "feed")
            }
            Stream::Search(term) => {
                query.push(("q", term.to_owned()));
                query.push(("sort", "latest".to_owned()));
                if let Some(lower) = lower {
                    query.push(("since", rfc3339(lower)));
                }
                ("app.bsky.feed.searchPosts", "posts")
            }
        };
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_owned()));
        }
        let mut body = self.xrpc_get(nsid, &query).await?;
        let next = body.get("cursor").and_then(Value::as_str).filter(|c| !c.is_empty()).map(str::to_owned);
        match body.get_mut(list).map(Value::take) {
            Some(Value::Array(items)) => Ok((items, next)),
            _ => Err(SourceError::Decode(format!("{nsid} answered JSON without a `{list}` list"))),
        }
    }

    fn to_contribution(&self, post: RawPost) -> Result<Contribution, String> {
        if post.uri.is_empty() {
            return Err("the post has an empty uri".to_owned());
        }
        if post.author.did.is_empty() {
            return Err("the post's author has no DID".to_owned());
        }
        // `handle.invalid` marks a handle that no longer resolves.
        let handle = post.author.handle.filter(|handle| !handle.is_empty() && handle != "handle.invalid");
        let profile_name = handle.clone().unwrap_or_else(|| post.author.did.clone());
        let url = post_rkey(&post.uri).map(|rkey| format!("https://bsky.app/profile/{profile_name}/post/{rkey}"));
        let (kind, parent_id, thread_id) = match post.record.reply {
            Some(reply) => (Kind::Reply, Some(reply.parent.uri), Some(reply.root.uri)),
            None => (Kind::Post, None, None),
        };
        let mut tags: Vec<String> = Vec::new();
        let facet_tags = post.record.facets.iter().flatten().filter_map(|facet| facet.get("features")?.as_array());
        let facet_tags = facet_tags
            .flatten()
            .filter(|feature| feature.get("$type").and_then(Value::as_str) == Some("app.bsky.richtext.facet#tag"));
        let names = post.record.tags.iter().flatten().filter_map(Value::as_str);
        for name in names.chain(facet_tags.filter_map(|feature| feature.get("tag")?.as_str())) {
            if !name.is_empty() && !tags.iter().any(|tag| tag == name) {
                tags.push(name.to_owned());
            }
        }
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: post.uri,
            url,
            kind,
            author: Author {
                id: post.author.did,
                profile_url: Some(format!("https://bsky.app/profile/{profile_name}")),
                handle,
                display_name: post.author.display_name.filter(|name| !name.trim().is_empty()),
                email: None,
                links: Vec::new(),
            },
            title: None,
            body: tidy(&post.record.text),
            language: None,
            created_at: post.record.created_at,
            updated_at: None,
            parent_id,
            thread_id,
            tags,
            score: post.like_count.map(|likes| likes as f64),
            edited: false,
            deleted: false,
            signals: None,
        })
    }

    fn map_post(&self, view: &Value) -> Result<Contribution, String> {
        let post = serde_json::from_value::<RawPost>(view.clone())
            .map_err(|error| format!("cannot read the post: {error}"))?;
        self.to_contribution(post)
    }

    /// One page of one stream: the page and the stream's new state; `true`
    /// when the stream is done for this poll (its pass ended or paused).
    async fn poll_stream(
        &self,
        stream: Stream<'_>,
        state: StreamState,
        request_since: Option<DateTime<Utc>>,
    ) -> Result<(Page, StreamState, bool), SourceError> {
        let StreamState { watermark, pass } = state;
        let first = watermark.is_none() && pass.is_none();
        let since = match &pass {
            Some(pass) => pass.since,
            None if first => request_since,
            None => None,
        };
        let sent = pass.as_ref().map(|pass| pass.cursor.clone());
        let (items, next) = self.fetch(stream, sent.as_deref(), max_time(watermark, since)).await?;
        let fetched = items.len();

        let mut page = Page::default();
        let mut seen = HashSet::new();
        let mut newest = None;
        let (mut reached, mut passed_since) = (false, false);
        // Older than the watermark: committed by an earlier pass. Older than
        // `since`: not wanted.
        let keep = |at: Option<DateTime<Utc>>| {
            at.is_none_or(|at| watermark.is_none_or(|w| at >= w) && since.is_none_or(|s| at >= s))
        };
        for item in &items {
            let (view, reason, context) = match stream {
                Stream::Actor(_) => {
                    (item.get("post"), item.pointer("/reason/$type").and_then(Value::as_str), item.get("reply"))
                }
                Stream::Search(_) => (Some(item), None, None),
            };
            let pinned = reason == Some(REASON_PIN);
            if reason.is_some() && !pinned {
                tracing::debug!(source = %self.instance, reason, "bluesky feed item skipped (repost)");
                continue;
            }
            let Some(view) = view.filter(|view| view.is_object()) else {
                let raw = serde_json::to_string(item).unwrap_or_default();
                page.quarantined.push(Quarantined::new(None, "the feed item holds no post view", &raw));
                continue;
            };
            let uri = view.get("uri").and_then(Value::as_str).map(str::to_owned);
            let at = sort_at(view);
            // A pinned post sits on top whatever its age: it must not end
            // the pass nor move the watermark.
            if let Some(at) = at
                && !pinned
            {
                newest = max_time(newest, Some(at));
                reached |= watermark.is_some_and(|w| at <= w);
                passed_since |= since.is_some_and(|s| at < s);
            }
            if !keep(at) {
                continue;
            }
            match self.map_post(view) {
                Ok(contribution) => {
                    if seen.insert(contribution.external_id.clone()) {
                        page.contributions.push(contribution);
                    }
                }
                Err(reason) => {
                    let raw = serde_json::to_string(view).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(uri, reason, &raw));
                    continue;
                }
            }
            // The conversation the item answers, whatever the watermark
            // (it is older by nature; only `since` bounds it). Deleted or
            // blocked posts have other view types and are left out.
            for key in ["parent", "root"] {
                let Some(context) = context.and_then(|reply| reply.get(key)) else { continue };
                let kind = context.get("$type").and_then(Value::as_str);
                let wanted = sort_at(context).is_none_or(|at| since.is_none_or(|since| at >= since));
                if kind.is_some_and(|kind| kind != POST_VIEW) || !wanted {
                    continue;
                }
                match self.map_post(context) {
                    Ok(contribution) => {
                        if seen.insert(contribution.external_id.clone()) {
                            page.contributions.push(contribution);
                        }
                    }
                    Err(reason) => {
                        tracing::debug!(source = %self.instance, key, %reason, "bluesky reply context skipped");
                    }
                }
            }
        }

        let pages = pass.as_ref().map_or(0, |pass| pass.pages) + 1;
        let top = max_time(pass.as_ref().and_then(|pass| pass.top), newest);
        // A server that ignores `cursor` would have us loop: stop instead.
        let repeated = next.is_some() && next == sent;
        if repeated {
            tracing::warn!(source = %self.instance, "bluesky answered the same cursor again; ending the pass");
        }
        let pass_over =
            next.is_none() || fetched == 0 || reached || passed_since || repeated || (first && since.is_none());
        let paused = !pass_over && pages >= self.config.max_pages_per_poll.max(1);
        let state = match next {
            Some(cursor) if !pass_over => StreamState {
                watermark,
                // A paused pass counts its pages afresh on the next poll.
                pass: Some(PassState { top, cursor, pages: if paused { 0 } else { pages }, since }),
            },
            _ => StreamState { watermark: max_time(watermark, top), pass: None },
        };
        if paused {
            tracing::info!(source = %self.instance, stream = %stream.key(), pages, "bluesky pass paused at max_pages_per_poll; the next poll resumes it");
        }
        tracing::debug!(
            source = %self.instance, stream = %stream.key(), fetched,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            pass_over, "bluesky page polled"
        );
        Ok((page, state, pass_over || paused))
    }
}

#[async_trait]
impl Source for BlueskySource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor: BlueskyCursor = request.stored().unwrap_or_default();
        let streams = self.streams();
        let index = if cursor.at < streams.len() { cursor.at } else { 0 };
        let Some(&stream) = streams.get(index) else {
            return Ok(Page::default());
        };
        let key = stream.key();
        let state = cursor.streams.get(&key).cloned().unwrap_or_default();
        let (mut page, state, done) = self.poll_stream(stream, state, request.since).await?;
        cursor.streams.insert(key, state);
        // Streams no longer configured are forgotten.
        let keys: HashSet<String> = streams.iter().map(Stream::key).collect();
        cursor.streams.retain(|key, _| keys.contains(key));
        page.has_more = !done || index + 1 < streams.len();
        cursor.at = match (done, page.has_more) {
            (false, _) => index,
            (true, true) => index + 1,
            (true, false) => 0,
        };
        page.next_cursor = Some(Cursor::from_json(&cursor));
        Ok(page)
    }

    /// Restores the stored session or logs in (when no session is held) and
    /// reads `com.atproto.server.getSession`.
    async fn check(&self) -> Result<(), SourceError> {
        self.xrpc_get("com.atproto.server.getSession", &[]).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{body_json, header, method, path, query_param, query_param_is_missing},
    };

    use super::*;

    const FEED: &str = "/xrpc/app.bsky.feed.getAuthorFeed";
    const SEARCH: &str = "/xrpc/app.bsky.feed.searchPosts";
    const LOGIN: &str = "/xrpc/com.atproto.server.createSession";
    const REFRESH: &str = "/xrpc/com.atproto.server.refreshSession";

    fn options() -> HttpOptions {
        HttpOptions {
            max_retries: 0,
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(2),
            ..HttpOptions::default()
        }
    }

    fn config(server: &MockServer) -> BlueskyConfig {
        serde_json::from_value(serde_json::json!({
            "identifier": "company.test",
            "app_password": {"env": "UNUSED"},
            "service": server.uri(),
            "actors": ["alice.test"],
        }))
        .unwrap()
    }

    /// A source whose app password is read from a secret file (removed
    /// once built: the secret is resolved in `new`).
    fn source_with(config: BlueskyConfig, http: HttpOptions) -> BlueskySource {
        let dir = std::env::temp_dir().join(format!("tributary-bsky-{}-{:?}", std::process::id(), Instant::now()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app_password");
        std::fs::write(&file, "app-pass-1234\n").unwrap();
        let source =
            BlueskySource::new("bsky", BlueskyConfig { app_password: SecretRef::File(file), ..config }, http).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        source
    }

    fn source(config: BlueskyConfig) -> BlueskySource {
        source_with(config, options())
    }

    /// createSession's output (lexicon `com.atproto.server.createSession`;
    /// no recording exists, so this follows the documented shape).
    fn session_body(n: u32) -> Value {
        serde_json::json!({
            "accessJwt": format!("acc-{n}"),
            "refreshJwt": format!("ref-{n}"),
            "handle": "company.test",
            "did": "did:plc:company",
            "active": true
        })
    }

    async fn mount_login(server: &MockServer) {
        Mock::given(method("POST"))
            .and(path(LOGIN))
            .and(body_json(serde_json::json!({"identifier": "company.test", "password": "app-pass-1234"})))
            .respond_with(ResponseTemplate::new(200).set_body_json(session_body(1)))
            .mount(server)
            .await;
    }

    fn fixture(name: &str) -> Fixture {
        Fixture::load("bluesky", name)
    }

    fn items(name: &str) -> Vec<Value> {
        fixture(name).body["feed"].as_array().cloned().unwrap()
    }

    /// The recorded feed with `feed` replaced and a `cursor` added (the
    /// snapshot captured none).
    fn feed_response(feed: Vec<Value>, cursor: Option<&str>) -> ResponseTemplate {
        let mut fixture = fixture("author_feed_alice");
        fixture.body["feed"] = Value::Array(feed);
        if let Some(cursor) = cursor {
            fixture.body["cursor"] = cursor.into();
        }
        fixture.response()
    }

    /// The recorded timestamps are all zeroed: give item i the time
    /// `newest - i minutes` (indexedAt and createdAt).
    fn stamp(items: &mut [Value], newest: &str) {
        let newest: DateTime<Utc> = newest.parse().unwrap();
        for (i, item) in items.iter_mut().enumerate() {
            let at = rfc3339(newest - chrono::Duration::minutes(i as i64));
            item["post"]["indexedAt"] = at.clone().into();
            item["post"]["record"]["createdAt"] = at.into();
        }
    }

    fn time(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn cursor(page: &Page) -> BlueskyCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn watermarked(key: &str, watermark: &str) -> Option<Cursor> {
        let state = StreamState { watermark: Some(time(watermark)), pass: None };
        Some(Cursor::from_json(&BlueskyCursor { at: 0, streams: BTreeMap::from([(key.to_owned(), state)]) }))
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    fn find<'a>(page: &'a Page, id: &str) -> &'a Contribution {
        page.contributions.iter().find(|c| c.external_id == id).unwrap()
    }

    /// One expected contribution, checked by value.
    struct Expect {
        id: &'static str,
        kind: Kind,
        did: &'static str,
        handle: &'static str,
        name: &'static str,
        body: &'static str,
        parent: Option<&'static str>,
        thread: Option<&'static str>,
        score: f64,
    }

    fn check(page: &Page, expect: &Expect) {
        let c = find(page, expect.id);
        let at = expect.id;
        assert_eq!((c.platform.as_str(), c.source.as_str()), ("bluesky", "bsky"), "{at}");
        assert_eq!(c.kind, expect.kind, "{at}");
        assert_eq!(c.author.id, expect.did, "{at}");
        assert_eq!(c.author.handle.as_deref(), Some(expect.handle), "{at}");
        assert_eq!(c.author.display_name.as_deref(), Some(expect.name), "{at}");
        let profile = format!("https://bsky.app/profile/{}", expect.handle);
        assert_eq!(c.author.profile_url.as_deref(), Some(profile.as_str()), "{at}");
        assert_eq!(c.body, expect.body, "{at}");
        assert_eq!(c.parent_id.as_deref(), expect.parent, "{at}");
        assert_eq!(c.thread_id.as_deref(), expect.thread, "{at}");
        assert_eq!(c.score, Some(expect.score), "{at}");
        // The snapshot's uris are placeholders (`record(N)`): no post URL.
        assert_eq!(c.url, None, "{at}");
        assert_eq!(c.created_at, time("1970-01-01T00:00:00Z"), "{at}");
        assert_eq!((c.title.clone(), c.updated_at, c.edited, c.deleted), (None, None, false, false), "{at}");
        assert_eq!((c.language.clone(), c.signals.clone()), (None, None), "{at}");
    }

    #[tokio::test]
    async fn first_poll_maps_the_recorded_author_feed() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", "Bearer acc-1"))
            .and(query_param("actor", "alice.test"))
            .and(query_param("limit", "100"))
            .and(query_param("filter", "posts_with_replies"))
            .and(query_param_is_missing("cursor"))
            .respond_with(fixture("author_feed_alice").response())
            .expect(1)
            .mount(&server)
            .await;
        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        // Each item, then the conversation it answers (parent, root); the
        // root `record(2)` is also the third item: returned once.
        assert_eq!(ids(&page), ["record(0)", "record(3)", "record(2)", "record(6)", "record(13)"]);
        assert!(page.quarantined.is_empty(), "{:?}", page.quarantined);
        let alice = |id, kind, body, parent, thread, score| Expect {
            id,
            kind,
            did: "user(0)",
            handle: "alice.test",
            name: "ali",
            body,
            parent,
            thread,
            score,
        };
        for expect in [
            alice("record(0)", Kind::Reply, "thanks bob", Some("record(3)"), Some("record(2)"), 0.0),
            alice("record(2)", Kind::Post, "again", None, None, 3.0),
            alice("record(6)", Kind::Post, "yoohoo label_me", None, None, 2.0),
            alice("record(13)", Kind::Post, "hey there", None, None, 0.0),
            Expect {
                id: "record(3)",
                kind: Kind::Reply,
                did: "user(2)",
                handle: "bob.test",
                name: "bobby",
                body: "hear that label_me label_me_2",
                parent: Some("record(2)"),
                thread: Some("record(2)"),
                score: 0.0,
            },
        ] {
            check(&page, &expect);
        }
        // A first poll without `since` is the newest page only.
        assert!(!page.has_more);
        let state = StreamState { watermark: Some(time("1970-01-01T00:00:00Z")), pass: None };
        assert_eq!(
            cursor(&page),
            BlueskyCursor { at: 0, streams: BTreeMap::from([("actor:alice.test".into(), state)]) }
        );
    }

    #[test]
    fn post_urls_come_from_at_uris() {
        for (uri, rkey) in [
            ("at://did:plc:abc/app.bsky.feed.post/3kxyz", Some("3kxyz")),
            ("at://alice.test/app.bsky.feed.post/3k2a", Some("3k2a")),
            ("at://did:plc:abc/app.bsky.feed.like/3kxyz", None),
            ("at://did:plc:abc/app.bsky.feed.post/", None),
            ("record(0)", None),
            ("", None),
        ] {
            assert_eq!(post_rkey(uri), rkey, "{uri}");
        }
        let source = source_with(
            BlueskyConfig { service: default_service(), ..config_for("https://bsky.social") },
            HttpOptions::default(),
        );
        let mut view = items("author_feed_alice")[1]["post"].clone();
        view["uri"] = "at://did:plc:abc/app.bsky.feed.post/3kxyz".into();
        let c = source.map_post(&view).unwrap();
        assert_eq!(c.url.as_deref(), Some("https://bsky.app/profile/alice.test/post/3kxyz"));
        view["author"]["handle"] = "handle.invalid".into();
        let c = source.map_post(&view).unwrap();
        assert_eq!(c.author.handle, None);
        assert_eq!(c.url.as_deref(), Some("https://bsky.app/profile/user(0)/post/3kxyz"));
        view["record"]["tags"] = serde_json::json!(["acme", 7]);
        view["record"]["facets"] = serde_json::json!([{"index": {"byteStart": 0, "byteEnd": 5}, "features": [
            {"$type": "app.bsky.richtext.facet#tag", "tag": "support"},
            {"$type": "app.bsky.richtext.facet#link", "uri": "https://example.com"},
            {"$type": "app.bsky.richtext.facet#tag", "tag": "acme"}
        ]}]);
        assert_eq!(source.map_post(&view).unwrap().tags, ["acme", "support"]);
    }

    fn config_for(service: &str) -> BlueskyConfig {
        serde_json::from_value(serde_json::json!({
            "identifier": "company.test", "app_password": {"env": "UNUSED"},
            "service": service, "actors": ["alice.test"]
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn the_pin_marker_is_returned_once_and_never_ends_a_pass() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .respond_with(fixture("author_feed_alice_pinned").response())
            .up_to_n_times(1)
            .mount(&server)
            .await;
        let source = source(config(&server));
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.iter().filter(|c| c.body == "pinned post").count(), 1);
        assert_eq!(find(&page, "record(0)").body, "pinned post");

        // The pinned post is old: it sits on top, but neither stops the pass
        // nor comes back once committed.
        let mut feed = items("author_feed_alice_pinned");
        stamp(&mut feed, "2025-03-01T12:00:00Z");
        feed[0]["post"]["indexedAt"] = "2024-01-01T00:00:00.000Z".into();
        feed[0]["post"]["record"]["createdAt"] = "2024-01-01T00:00:00.000Z".into();
        Mock::given(method("GET"))
            .and(path(FEED))
            .respond_with(feed_response(feed, Some("c2")))
            .expect(1)
            .mount(&server)
            .await;
        let request = PollRequest { cursor: watermarked("actor:alice.test", "2025-03-01T11:57:00Z"), since: None };
        let page = source.poll(&request).await.unwrap();
        // Items 1..=3 are newer than (or at) the watermark; item 3 reaches
        // it and brings the conversation it answers (record 6 and 5).
        assert_eq!(ids(&page), ["record(2)", "record(3)", "record(4)", "record(6)", "record(5)"]);
        assert!(!page.has_more);
        assert_eq!(cursor(&page).streams["actor:alice.test"].watermark, Some(time("2025-03-01T11:59:00Z")));
    }

    #[tokio::test]
    async fn an_incremental_poll_with_nothing_new_returns_the_edge_post_unchanged() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        let mut feed = items("author_feed_alice");
        stamp(&mut feed, "2025-03-01T12:00:00Z");
        Mock::given(method("GET")).and(path(FEED)).respond_with(feed_response(feed, Some("c2"))).mount(&server).await;
        let source = source(config(&server));
        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(first.contributions.len(), 5);
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        // Only the post at the watermark's exact time comes back (posts may
        // share a millisecond) with the conversation it answers, identical:
        // the ledger drops them.
        assert_eq!(ids(&second), ["record(0)", "record(3)", "record(2)"]);
        for again in &second.contributions {
            assert_eq!(again.content_hash(), find(&first, &again.external_id).content_hash());
        }
        assert!(!second.has_more);
        assert_eq!(cursor(&second), cursor(&first));
    }

    /// Serves the recorded feed in two pages: items 0..2 then (for
    /// `cursor=c2`) items 2..4, with distinct times.
    async fn serve_two_pages(server: &MockServer) {
        let mut feed = items("author_feed_alice");
        stamp(&mut feed, "2025-03-01T12:00:00Z");
        let (newest, older) = feed.split_at(2);
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(query_param_is_missing("cursor"))
            .respond_with(feed_response(newest.to_vec(), Some("c2")))
            .expect(1)
            .mount(server)
            .await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(query_param("cursor", "c2"))
            .respond_with(feed_response(older.to_vec(), Some("c3")))
            .expect(1)
            .mount(server)
            .await;
    }

    #[tokio::test]
    async fn pages_back_with_the_cursor_down_to_the_watermark() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        serve_two_pages(&server).await;
        let source = source(config(&server));
        let request = PollRequest { cursor: watermarked("actor:alice.test", "2025-03-01T11:57:00Z"), since: None };
        let first = source.poll(&request).await.unwrap();
        assert_eq!(ids(&first), ["record(0)", "record(3)", "record(2)", "record(6)"]);
        assert!(first.has_more);
        let pass = PassState { top: Some(time("2025-03-01T12:00:00Z")), cursor: "c2".into(), pages: 1, since: None };
        let state = &cursor(&first).streams["actor:alice.test"];
        assert_eq!(state.pass.as_ref(), Some(&pass));
        assert_eq!(state.watermark, Some(time("2025-03-01T11:57:00Z")), "the watermark waits for the pass");

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        // record(13) (11:57) is at the watermark: returned again, and it ends the pass.
        assert_eq!(ids(&second), ["record(2)", "record(13)"]);
        assert!(!second.has_more);
        let state = StreamState { watermark: Some(time("2025-03-01T12:00:00Z")), pass: None };
        assert_eq!(cursor(&second).streams["actor:alice.test"], state);
    }

    #[tokio::test]
    async fn a_later_pass_pauses_at_max_pages_and_the_next_poll_resumes_it() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        serve_two_pages(&server).await;
        let source = source(BlueskyConfig { max_pages_per_poll: 1, ..config(&server) });
        let request = PollRequest { cursor: watermarked("actor:alice.test", "2025-03-01T11:00:00Z"), since: None };
        let first = source.poll(&request).await.unwrap();
        assert_eq!(first.contributions.len(), 4);
        assert!(!first.has_more, "the cap ends this poll");
        let paused = PassState { top: Some(time("2025-03-01T12:00:00Z")), cursor: "c2".into(), pages: 0, since: None };
        let state = StreamState { watermark: Some(time("2025-03-01T11:00:00Z")), pass: Some(paused) };
        assert_eq!(cursor(&first).streams["actor:alice.test"], state, "the watermark must not jump");

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second), ["record(2)", "record(13)"]);
        assert!(!second.has_more, "paused again at the cap, c3 is left for the next poll");
        let state = &cursor(&second).streams["actor:alice.test"];
        assert_eq!(state.pass.as_ref().map(|pass| pass.cursor.as_str()), Some("c3"));
        assert_eq!(state.watermark, Some(time("2025-03-01T11:00:00Z")));
    }

    /// The recorded post views as a `searchPosts` answer (`{posts, cursor}`).
    fn search_response(posts: Vec<Value>, cursor: Option<&str>) -> ResponseTemplate {
        let mut body = serde_json::json!({"posts": posts, "hitsTotal": posts.len()});
        if let Some(cursor) = cursor {
            body["cursor"] = cursor.into();
        }
        ResponseTemplate::new(200).set_body_json(body)
    }

    #[tokio::test]
    async fn search_honours_since_and_streams_take_turns() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        let mut feed = items("author_feed_alice");
        stamp(&mut feed, "2025-03-01T12:00:00Z");
        Mock::given(method("GET")).and(path(FEED)).respond_with(feed_response(feed.clone(), None)).mount(&server).await;
        let posts: Vec<Value> = feed.iter().map(|item| item["post"].clone()).collect();
        Mock::given(method("GET"))
            .and(path(SEARCH))
            .and(query_param("q", "acme widgets"))
            .and(query_param("sort", "latest"))
            .and(query_param("since", "2025-03-01T11:58:30.000Z"))
            .and(query_param_is_missing("cursor"))
            .respond_with(search_response(posts[..2].to_vec(), Some("s2")))
            .expect(1)
            .mount(&server)
            .await;
        // The server ignored `since` here: the connector filters too.
        Mock::given(method("GET"))
            .and(path(SEARCH))
            .and(query_param("cursor", "s2"))
            .respond_with(search_response(posts[2..].to_vec(), Some("s3")))
            .expect(1)
            .mount(&server)
            .await;
        let config = BlueskyConfig { search_terms: vec!["acme widgets".into()], ..config(&server) };
        let source = source(config);
        let since = Some(time("2025-03-01T11:58:30Z"));

        let actor = source.poll(&PollRequest { cursor: None, since }).await.unwrap();
        // The reply's parent and root (zeroed times) are older than `since`.
        assert_eq!(ids(&actor), ["record(0)", "record(6)"]);
        assert!(actor.has_more, "the search stream is next");
        assert_eq!(cursor(&actor).at, 1);

        let search = source.poll(&PollRequest { cursor: actor.next_cursor.clone(), since }).await.unwrap();
        // No reply context in search results: only the posts themselves.
        assert_eq!(ids(&search), ["record(0)", "record(6)"]);
        assert!(search.has_more);
        let pass = cursor(&search).streams["search:acme widgets"].pass.clone().unwrap();
        assert_eq!((pass.cursor.as_str(), pass.since), ("s2", since), "the pass carries `since`");

        let end = source.poll(&PollRequest { cursor: search.next_cursor.clone(), since: None }).await.unwrap();
        assert!(end.contributions.is_empty(), "{:?}", ids(&end));
        assert!(!end.has_more);
        let end_cursor = cursor(&end);
        assert_eq!(end_cursor.at, 0, "the next poll starts a new round");
        let state = StreamState { watermark: Some(time("2025-03-01T12:00:00Z")), pass: None };
        assert_eq!(end_cursor.streams["search:acme widgets"], state);
    }

    #[tokio::test]
    async fn an_expired_token_is_refreshed_and_the_call_retried_once() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", "Bearer acc-1"))
            .respond_with(
                ResponseTemplate::new(400)
                    .set_body_json(serde_json::json!({"error": "ExpiredToken", "message": "Token has expired"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(REFRESH))
            .and(header("authorization", "Bearer ref-1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(session_body(2)))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", "Bearer acc-2"))
            .respond_with(fixture("author_feed_alice").response())
            .expect(2)
            .mount(&server)
            .await;
        let store = Arc::new(MemoryTokenStore::default());
        let source = source(config(&server)).with_token_store(store.clone());
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 5);
        // The refreshed session is kept, and persisted.
        source.poll(&PollRequest::default()).await.unwrap();
        let logins = server.received_requests().await.unwrap().iter().filter(|r| r.url.path() == LOGIN).count();
        assert_eq!(logins, 1);
        assert_eq!(stored_pair(&store, &source).await, ("acc-2".to_owned(), "ref-2".to_owned()));
        assert!(!format!("{source:?}").contains("acc-2"), "a token leaked into Debug");
        assert!(!format!("{source:?}").contains("app-pass-1234"), "the password leaked into Debug");
    }

    #[tokio::test]
    async fn a_failed_refresh_logs_in_again() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(LOGIN))
            .respond_with(ResponseTemplate::new(200).set_body_json(session_body(1)))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(LOGIN))
            .respond_with(ResponseTemplate::new(200).set_body_json(session_body(3)))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", "Bearer acc-1"))
            .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({"error": "ExpiredToken"})))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(REFRESH))
            .respond_with(
                ResponseTemplate::new(400)
                    .set_body_json(serde_json::json!({"error": "ExpiredToken", "message": "Token has been revoked"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", "Bearer acc-3"))
            .respond_with(fixture("author_feed_alice").response())
            .expect(1)
            .mount(&server)
            .await;
        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 5);
    }

    /// Base64url without padding (the JWT alphabet).
    fn b64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    /// An access JWT as a PDS issues them (unsigned here): `exp` seconds
    /// from now, the account's DID as `sub`.
    fn test_jwt(exp_in: i64, tag: &str) -> String {
        let header = b64url(br#"{"typ":"at+jwt","alg":"ES256K"}"#);
        let claims = serde_json::json!({
            "scope": "com.atproto.appPass", "sub": "did:plc:company", "aud": "did:web:pds.test",
            "iat": Utc::now().timestamp(), "exp": Utc::now().timestamp() + exp_in, "jti": tag,
        });
        format!("{header}.{}.c2lnbmF0dXJl", b64url(claims.to_string().as_bytes()))
    }

    fn jwt_session(access: &str, refresh: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "accessJwt": access, "refreshJwt": refresh, "handle": "company.test", "did": "did:plc:company",
        }))
    }

    /// The (accessJwt, refreshJwt) the store holds for `source`.
    async fn stored_pair(store: &MemoryTokenStore, source: &BlueskySource) -> (String, String) {
        let token = store.load_token(&source.key).await.unwrap().expect("a stored session");
        let refresh = token.refresh_token.expect("a stored refreshJwt");
        (token.access_token.expose_secret().to_owned(), refresh.expose_secret().to_owned())
    }

    #[tokio::test]
    async fn a_restart_reuses_the_stored_session_while_it_is_fresh() {
        let server = MockServer::start().await;
        let access = test_jwt(3600, "a1");
        Mock::given(method("POST"))
            .and(path(LOGIN))
            .and(body_json(serde_json::json!({"identifier": "company.test", "password": "app-pass-1234"})))
            .respond_with(jwt_session(&access, "ref-1"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(REFRESH))
            .respond_with(jwt_session("x", "y"))
            .expect(0)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", format!("Bearer {access}").as_str()))
            .respond_with(fixture("author_feed_alice").response())
            .expect(2)
            .mount(&server)
            .await;
        let store = Arc::new(MemoryTokenStore::default());
        let first = source(config(&server)).with_token_store(store.clone());
        assert_eq!(first.poll(&PollRequest::default()).await.unwrap().contributions.len(), 5);
        let token = store.load_token(&first.key).await.unwrap().unwrap();
        let exp = jwt_claims(&access).unwrap()["exp"].as_i64().unwrap();
        assert_eq!(token.expires_at, DateTime::from_timestamp(exp, 0), "expires_at is the JWT's exp");
        assert_eq!(stored_pair(&store, &first).await, (access.clone(), "ref-1".to_owned()));
        drop(first);

        // A restart: a new source on the same store logs in no more.
        let second = source(config(&server)).with_token_store(store.clone());
        assert_eq!(second.poll(&PollRequest::default()).await.unwrap().contributions.len(), 5);
        let session = second.session.lock().await.session.clone().unwrap();
        assert_eq!(session.did.as_deref(), Some("did:plc:company"), "the DID comes from the JWT's `sub`");
        for shown in [format!("{second:?}"), format!("{session:?}"), format!("{token:?}")] {
            assert!(!shown.contains(&access) && !shown.contains("ref-1"), "a token leaked into Debug: {shown}");
        }
        // `expect(1)` on createSession, `expect(0)` on refreshSession.
    }

    #[tokio::test]
    async fn a_stale_stored_session_is_refreshed_not_recreated() {
        let server = MockServer::start().await;
        let (stale, fresh) = (test_jwt(-600, "old"), test_jwt(3600, "new"));
        Mock::given(method("POST")).and(path(LOGIN)).respond_with(jwt_session("x", "y")).expect(0).mount(&server).await;
        Mock::given(method("POST"))
            .and(path(REFRESH))
            .and(header("authorization", "Bearer ref-0"))
            .respond_with(jwt_session(&fresh, "ref-2"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", format!("Bearer {fresh}").as_str()))
            .respond_with(fixture("author_feed_alice").response())
            .expect(2)
            .mount(&server)
            .await;
        let store = Arc::new(MemoryTokenStore::default());
        let first = source(config(&server)).with_token_store(store.clone());
        // Saved without `expires_at`: the stored accessJwt's `exp` says it expired.
        let token = StoredToken {
            access_token: SecretString::from(stale.clone()),
            refresh_token: Some(SecretString::from("ref-0")),
            expires_at: None,
        };
        store.save_token(&first.key, &token).await.unwrap();
        assert_eq!(first.poll(&PollRequest::default()).await.unwrap().contributions.len(), 5);
        assert_eq!(stored_pair(&store, &first).await, (fresh.clone(), "ref-2".to_owned()), "the new pair is saved");
        // Another restart uses the refreshed session as is.
        let second = source(config(&server)).with_token_store(store.clone());
        second.poll(&PollRequest::default()).await.unwrap();
    }

    #[tokio::test]
    async fn a_stored_session_that_cannot_be_refreshed_logs_in_again() {
        let server = MockServer::start().await;
        let fresh = test_jwt(3600, "login");
        Mock::given(method("POST"))
            .and(path(LOGIN))
            .respond_with(jwt_session(&fresh, "ref-1"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(REFRESH))
            .respond_with(
                ResponseTemplate::new(400)
                    .set_body_json(serde_json::json!({"error": "ExpiredToken", "message": "Token has been revoked"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", format!("Bearer {fresh}").as_str()))
            .respond_with(fixture("author_feed_alice").response())
            .expect(1)
            .mount(&server)
            .await;
        let store = Arc::new(MemoryTokenStore::default());
        let source = source(config(&server)).with_token_store(store.clone());
        let token = StoredToken {
            access_token: SecretString::from(test_jwt(-600, "old")),
            refresh_token: Some(SecretString::from("ref-0")),
            expires_at: None,
        };
        store.save_token(&source.key, &token).await.unwrap();
        assert_eq!(source.poll(&PollRequest::default()).await.unwrap().contributions.len(), 5);
        assert_eq!(stored_pair(&store, &source).await, (fresh, "ref-1".to_owned()));
    }

    /// A token store whose disk is gone.
    struct BrokenStore;

    #[async_trait]
    impl TokenStore for BrokenStore {
        async fn load_token(&self, _key: &str) -> Result<Option<StoredToken>, tributary_sdk::TokenStoreError> {
            Err(tributary_sdk::TokenStoreError("disk gone".into()))
        }

        async fn save_token(&self, _key: &str, _token: &StoredToken) -> Result<(), tributary_sdk::TokenStoreError> {
            Err(tributary_sdk::TokenStoreError("disk gone".into()))
        }
    }

    #[tokio::test]
    async fn a_broken_token_store_costs_a_login_never_a_poll() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        Mock::given(method("GET"))
            .and(path(FEED))
            .and(header("authorization", "Bearer acc-1"))
            .respond_with(fixture("author_feed_alice").response())
            .expect(2)
            .mount(&server)
            .await;
        let source = source(config(&server)).with_token_store(Arc::new(BrokenStore));
        for _ in 0..2 {
            assert_eq!(source.poll(&PollRequest::default()).await.unwrap().contributions.len(), 5);
        }
        // The session held in memory is used: one login.
        let logins = server.received_requests().await.unwrap().iter().filter(|r| r.url.path() == LOGIN).count();
        assert_eq!(logins, 1);
    }

    #[test]
    fn the_session_key_is_a_digest_of_service_identifier_and_password() {
        let service = Url::parse("https://pds.test").unwrap();
        let key = session_key(&service, "company.test", &SecretString::from("app-pass-1234"));
        let hex = key.strip_prefix("bluesky-session:").unwrap();
        assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
        assert!(!key.contains("app-pass-1234") && !key.contains("company.test"));
        assert_eq!(key, session_key(&service, "company.test", &SecretString::from("app-pass-1234")));
        let other_service = Url::parse("https://bsky.social").unwrap();
        for other in [
            session_key(&service, "company.test", &SecretString::from("app-pass-5678")),
            session_key(&service, "other.test", &SecretString::from("app-pass-1234")),
            session_key(&other_service, "company.test", &SecretString::from("app-pass-1234")),
        ] {
            assert_ne!(key, other);
        }
    }

    #[test]
    fn jwt_claims_give_the_expiry_and_the_did() {
        let jwt = test_jwt(3600, "a");
        let claims = jwt_claims(&jwt).unwrap();
        let exp = jwt_expiry(&claims).unwrap();
        assert!((exp - Utc::now() - chrono::Duration::seconds(3600)).num_seconds().abs() <= 2, "{exp}");
        assert_eq!(jwt_subject(&claims).as_deref(), Some("did:plc:company"));
        let fractional = serde_json::json!({"exp": 1_700_000_000.5, "sub": "alice"});
        assert_eq!(jwt_expiry(&fractional), DateTime::from_timestamp(1_700_000_000, 0));
        assert_eq!(jwt_subject(&fractional), None, "a sub that is not a DID");
        for opaque in ["acc-1", "a.b", "a.!!.c", "a.Zg.c", "a.e30.c", &format!("x.{}.y", b64url(b"[1]"))] {
            let claims = jwt_claims(opaque);
            assert!(claims.as_ref().and_then(jwt_expiry).is_none(), "{opaque}");
        }
        assert_eq!(base64url_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64url_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64url_decode("-_8").unwrap(), [0xfb, 0xff]);
        assert!(base64url_decode("aGkxa").is_none());
        // A session without a readable exp is used until the PDS says ExpiredToken.
        let session = Session::new("acc-1".into(), "ref-1".into(), None);
        assert_eq!((session.expires_at, session.did()), (None, "unknown"));
        assert!(session.to_stored().is_fresh());
    }

    #[tokio::test]
    async fn a_rewritten_record_changes_the_contribution() {
        // Bluesky has no edit; a record rewritten in place still changes
        // the body, so the content hash differs and the CRM is updated.
        let server = MockServer::start().await;
        mount_login(&server).await;
        let source = source(config(&server));
        let original = source.map_post(&items("author_feed_alice")[3]["post"]).unwrap();
        let mut feed = items("author_feed_alice");
        feed[3]["post"]["record"]["text"] = "hey there, edited".into();
        Mock::given(method("GET")).and(path(FEED)).respond_with(feed_response(feed, None)).mount(&server).await;
        let page = source.poll(&PollRequest::default()).await.unwrap();
        let changed = find(&page, "record(13)");
        assert_eq!(changed.body, "hey there, edited");
        assert!(!changed.edited);
        assert_ne!(changed.content_hash(), original.content_hash());
    }

    #[tokio::test]
    async fn deleted_or_blocked_context_and_reposts_are_skipped_without_error() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        let mut feed = items("author_feed_alice");
        // Bluesky has no deletion marker in feeds: a deleted post is gone,
        // and a reply's deleted parent comes back as a #notFoundPost view.
        feed[0]["reply"]["parent"] =
            serde_json::json!({"$type": "app.bsky.feed.defs#notFoundPost", "uri": "record(3)", "notFound": true});
        feed[0]["reply"]["root"] = serde_json::json!({
            "$type": "app.bsky.feed.defs#blockedPost", "uri": "record(2)", "blocked": true,
            "author": {"did": "user(0)"}
        });
        feed[1]["reason"] = serde_json::json!({
            "$type": "app.bsky.feed.defs#reasonRepost",
            "by": feed[1]["post"]["author"].clone(),
            "indexedAt": "1970-01-01T00:00:00.000Z"
        });
        feed.remove(2);
        Mock::given(method("GET")).and(path(FEED)).respond_with(feed_response(feed, None)).mount(&server).await;
        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&page), ["record(0)", "record(13)"]);
        assert!(page.quarantined.is_empty());
        let reply = find(&page, "record(0)");
        assert_eq!((reply.parent_id.as_deref(), reply.thread_id.as_deref()), (Some("record(3)"), Some("record(2)")));
        assert!(page.contributions.iter().all(|c| !c.deleted));
    }

    #[tokio::test]
    async fn malformed_items_are_quarantined_and_the_rest_goes_on() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        let mut feed = items("author_feed_alice");
        feed[1]["post"]["author"].as_object_mut().unwrap().remove("did");
        feed[2]["post"]["record"]["createdAt"] = "last Tuesday".into();
        feed[2]["post"]["indexedAt"] = "soon".into();
        feed[3]["post"]["author"]["did"] = "".into();
        feed.push(serde_json::json!({"reason": null, "post": 7}));
        Mock::given(method("GET")).and(path(FEED)).respond_with(feed_response(feed, None)).mount(&server).await;
        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&page), ["record(0)", "record(3)", "record(2)"]);
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [Some("record(6)"), Some("record(2)"), Some("record(13)"), None]);
        assert!(page.quarantined[0].reason.contains("did"), "{}", page.quarantined[0].reason);
        assert!(page.quarantined[2].reason.contains("DID"), "{}", page.quarantined[2].reason);
        assert!(page.quarantined[0].raw.contains("yoohoo label_me"));
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_a_decode_error() {
        for (body, needle) in [
            (ResponseTemplate::new(200).set_body_string("<html>maintenance</html>"), "getAuthorFeed"),
            (ResponseTemplate::new(200).set_body_json(serde_json::json!({"posts": []})), "`feed`"),
        ] {
            let server = MockServer::start().await;
            mount_login(&server).await;
            Mock::given(method("GET")).and(path(FEED)).respond_with(body).mount(&server).await;
            let error = source(config(&server)).poll(&PollRequest::default()).await.unwrap_err();
            assert!(matches!(&error, SourceError::Decode(message) if message.contains(needle)), "{error:?}");
        }
        // A login answer that is not a session names no part of its body.
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(LOGIN))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"accessJwt": "secret-ish"})))
            .mount(&server)
            .await;
        let error = source(config(&server)).check().await.unwrap_err();
        assert!(matches!(&error, SourceError::Decode(m) if !m.contains("secret-ish")), "{error:?}");
    }

    #[tokio::test]
    async fn refusals_map_to_auth_and_other_statuses_to_status() {
        // A wrong app password: createSession answers 401.
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(LOGIN))
            .respond_with(ResponseTemplate::new(401).set_body_json(
                serde_json::json!({"error": "AuthenticationRequired", "message": "Invalid identifier or password"}),
            ))
            .mount(&server)
            .await;
        let source_ = source(config(&server));
        for error in [source_.poll(&PollRequest::default()).await.unwrap_err(), source_.check().await.unwrap_err()] {
            assert!(matches!(&error, SourceError::Auth(m) if m.contains("Invalid identifier")), "{error:?}");
            assert!(!error.to_string().contains("app-pass-1234"));
        }
        for (status, error_name, is_auth) in
            [(403, "Forbidden", true), (401, "AuthMissing", true), (400, "InvalidRequest", false)]
        {
            let server = MockServer::start().await;
            mount_login(&server).await;
            Mock::given(method("GET"))
                .and(path(FEED))
                .respond_with(
                    ResponseTemplate::new(status)
                        .set_body_json(serde_json::json!({"error": error_name, "message": "Profile not found"})),
                )
                .mount(&server)
                .await;
            match source(config(&server)).poll(&PollRequest::default()).await.unwrap_err() {
                SourceError::Auth(m) => assert!(is_auth && m.contains(error_name), "{status}: {m}"),
                SourceError::Status { status: got, .. } => assert!(!is_auth && got == status, "{status}"),
                other => panic!("{status}: unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_429_with_a_distant_reset_stops_further_requests() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        let reset = (Utc::now().timestamp() + 3600).to_string();
        Mock::given(method("GET"))
            .and(path(FEED))
            .respond_with(
                ResponseTemplate::new(429)
                    .insert_header("ratelimit-limit", "3000")
                    .insert_header("ratelimit-remaining", "0")
                    .insert_header("ratelimit-reset", reset.as_str())
                    .insert_header("ratelimit-policy", "3000;w=300")
                    .set_body_json(serde_json::json!({"error": "RateLimitExceeded", "message": "Rate Limit Exceeded"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server));
        for _ in 0..2 {
            match source.poll(&PollRequest::default()).await.unwrap_err() {
                SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                    assert!(retry_after > Duration::from_secs(3500), "{retry_after:?}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // `expect(1)`: the second poll sent nothing while the gate held.
    }

    #[tokio::test]
    async fn an_exhausted_budget_holds_every_request_until_reset() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        let reset = (Utc::now().timestamp() + 100).to_string();
        let spent = fixture("author_feed_alice")
            .response()
            .insert_header("ratelimit-remaining", "0")
            .insert_header("ratelimit-reset", reset.as_str());
        Mock::given(method("GET")).and(path(FEED)).respond_with(spent).expect(1).mount(&server).await;
        let source = source_with(config(&server), options());
        source.poll(&PollRequest::default()).await.unwrap();
        // The reset is past what a call may wait inline: the wait goes back
        // to the scheduler at once, and nothing is sent meanwhile.
        match source.poll(&PollRequest::default()).await {
            Err(SourceError::Http(HttpError::RateLimited { retry_after, .. })) => {
                assert!(
                    retry_after > Duration::from_secs(95) && retry_after <= Duration::from_secs(100),
                    "{retry_after:?}"
                )
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn check_logs_in_and_reads_the_session() {
        let server = MockServer::start().await;
        mount_login(&server).await;
        Mock::given(method("GET"))
            .and(path("/xrpc/com.atproto.server.getSession"))
            .and(header("authorization", "Bearer acc-1"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(
                    serde_json::json!({"handle": "company.test", "did": "did:plc:company", "active": true}),
                ),
            )
            .expect(1)
            .mount(&server)
            .await;
        source(config(&server)).check().await.unwrap();
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: BlueskyConfig = serde_json::from_value(serde_json::json!({
            "identifier": "company.bsky.social",
            "app_password": {"env": "BSKY_APP_PASSWORD"},
            "search_terms": ["acme"]
        }))
        .unwrap();
        assert_eq!(config.service.as_str(), "https://bsky.social/");
        assert_eq!((config.max_pages_per_poll, config.limit), (10, 100));
        assert!(config.actors.is_empty());
        assert_eq!(config.app_password, SecretRef::Env("BSKY_APP_PASSWORD".into()));
        for extra in [serde_json::json!({"schedule": "*/5 * * * *"}), serde_json::json!({"password": "x"})] {
            let mut value = serde_json::json!({"identifier": "a", "app_password": {"env": "X"}, "actors": ["a"]});
            value.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            assert!(serde_json::from_value::<BlueskyConfig>(value).is_err());
        }

        let build = |config: BlueskyConfig| BlueskySource::new("b", config, HttpOptions::default()).unwrap_err();
        let missing = build(BlueskyConfig {
            app_password: SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into()),
            ..config.clone()
        });
        assert!(matches!(missing, BuildError::Secret(_)), "{missing}");
        assert!(matches!(build(BlueskyConfig { limit: 101, ..config.clone() }), BuildError::InvalidLimit(101)));
        assert!(matches!(build(BlueskyConfig { limit: 0, ..config.clone() }), BuildError::InvalidLimit(0)));
        let nothing = BlueskyConfig { search_terms: vec![], ..config.clone() };
        assert!(matches!(build(nothing), BuildError::NothingToWatch));
        let empty = BlueskyConfig { actors: vec![" ".into()], ..config.clone() };
        assert!(matches!(build(empty), BuildError::EmptyEntry));
        let no_id = BlueskyConfig { identifier: "".into(), ..config.clone() };
        assert!(matches!(build(no_id), BuildError::MissingIdentifier));
        let ftp = BlueskyConfig { service: Url::parse("ftp://pds.example").unwrap(), ..config };
        assert!(matches!(build(ftp), BuildError::InvalidService(_)));
    }
}
