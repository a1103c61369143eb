//! X (Twitter) API v2: posts matching a search query (listen mode, `GET
//! /2/tweets/search/recent`) and posts mentioning the company's account
//! (watch mode, `GET /2/users/{id}/mentions`).
//!
//! Authentication is one of two modes (exactly one is configured):
//! - App-only ([`XConfig::bearer_token`]): the app's bearer token, sent
//!   as is with every request.
//! - OAuth 2.0 user context ([`XConfig::oauth2`]): an admin authorized the
//!   app once as the company's account (Authorization Code with PKCE, scopes
//!   `tweet.read users.read offline.access`), which gave a refresh token.
//!   The SDK's [`OAuth2`] trades it at the token endpoint (`POST
//!   /2/oauth2/token`, `grant_type=refresh_token`; a confidential client
//!   authenticates with HTTP Basic `client_id:client_secret`, a public
//!   client sends `client_id` in the form) for an access token valid two
//!   hours. X rotates refresh tokens: every refresh answers a new one and
//!   invalidates the old, so the newest is kept in the token store (the
//!   daemon's state store, see [`XSource::with_token_store`]) and a restart
//!   goes on from it, reusing the access token while it is fresh. A request
//!   answered 401 gets one refresh and one retry. The configured refresh
//!   token is used once only: after a rotation it is void, so losing the
//!   state store means authorizing again (a new refresh token in the
//!   config is a new credential and starts over from it).
//!
//! Tokens travel only in the `Authorization` header (and the refresh token
//! in the token request's form): never in a URL, a log line, an error or a
//! `Debug` output. Both modes read the same endpoints the same way.
//!
//! Incremental model, per stream. Both endpoints list posts newest first and
//! take `since_id` ("results with a Post ID greater than the specified ID");
//! a page's `meta.next_token` asks for the next, older page (sent back as
//! `next_token` to the search and `pagination_token` to the mentions
//! timeline), and "the next_token does not expire" (docs.x.com, recent
//! search pagination; fundamentals/pagination). A *pass* asks for the posts
//! newer than the watermark (`since_id`, the newest post id committed by the
//! previous pass) and pages with `next_token` until none is left. The next
//! watermark is `meta.newest_id` of the pass's first page, applied only when
//! the pass completes; a pass that reaches
//! [`XConfig::max_pages_per_poll`] pauses with its token and resumes on the
//! next poll, so the watermark never passes posts not yet fetched. Post ids
//! are decimal strings compared as `u64`.
//!
//! The first pass of a stream honours [`PollRequest::since`] through
//! `start_time` (second granularity, inclusive). The recent search covers
//! only the last 7 days, so its `start_time` is clamped to that window; an
//! old `since_id` (a source paused for more than a week) is refused by the
//! search with HTTP 400, and that pass then restarts from the window's
//! start. Without `since` the first pass is the newest page only.
//!
//! With both a query and a user id configured, one *round* polls the
//! mentions stream, then the search stream (`has_more` between them); the
//! cursor keeps each stream's state. A post found by both streams is
//! returned by each (kind `mention`, then `post`/`reply`).
//!
//! Mapping and platform behaviour relied on:
//! - Only `id`, `text` and `edit_history_tweet_ids` are always present
//!   (docs.x.com, "By default, the response includes only id, text, and
//!   edit_history_tweet_ids"); the other fields are requested with
//!   `tweet.fields`, the authors with `expansions=author_id` (`includes.users`).
//!   A missing `created_at` is read from the id (a Snowflake id holds its
//!   creation time in milliseconds since 2010-11-04T01:42:54.657Z).
//! - Edits: a post may be edited (up to 5 times in 30 minutes) and an edit
//!   is a new post id; the endpoints return the most recent version, whose
//!   `edit_history_tweet_ids` lists every version oldest first. The
//!   contribution's `external_id` is the first (original) id, so an edit
//!   updates the same contribution, with `edited = true` and `updated_at`
//!   the time of the version. As the edit has a newer id, `since_id` finds it.
//! - Deletions: the v2 search and mentions timeline simply stop returning a
//!   deleted post; there is no deletion marker to read, so this connector
//!   never sets `deleted`.
//! - `text` escapes `&`, `<` and `>` as HTML entities; they are decoded and
//!   the text kept otherwise as it is (line breaks included).
//! - A 200 may carry an `errors` array for partial problems (a suspended
//!   author in `includes`, a deleted referenced post): those that name a
//!   returned post quarantine it, the others are logged and ignored. A 200
//!   with only `errors` (a user id that does not exist) is an error.
//! - Rate limits are the `x-rate-limit-limit/-remaining/-reset` headers
//!   (reset as a Unix time) and HTTP 429, which the shared client honours.
//!   401/403 are refused credentials (`SourceError::Auth`), as is a refresh
//!   token the token endpoint refuses (revoked, or already rotated away).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, MemoryTokenStore, OAuth2,
    Page, PollRequest, Quarantined, SecretError, SecretRef, Source, SourceError, TokenStore,
    oauth::{ClientAuth, Grant, OAuth2Config},
    source::check_status,
    text::tidy,
};
use url::Url;

const PLATFORM: &str = "x";

const TWEET_FIELDS: &str = "created_at,author_id,conversation_id,in_reply_to_user_id,referenced_tweets,public_metrics,edit_history_tweet_ids,lang";
const USER_FIELDS: &str = "username,name";

/// Milliseconds since the Unix epoch of X's Snowflake epoch.
const SNOWFLAKE_EPOCH_MS: i64 = 1_288_834_974_657;

/// How far back the recent search reaches, less a margin for clock skew.
fn search_window_start() -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(7) + chrono::Duration::minutes(2)
}

/// Settings of one X source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XConfig {
    /// App-only bearer token (`{ env = "..." }` or `{ file = "..." }`), sent
    /// as `Authorization: Bearer ...`. Exactly one of `bearer_token` and
    /// `oauth2` is set.
    #[serde(default)]
    pub bearer_token: Option<SecretRef>,
    /// OAuth 2.0 user context instead of `bearer_token`: the app's client
    /// and a refresh token from a one-time authorization of the account,
    /// e.g. `oauth2 = { client_id = "...", refresh_token = { env = "..." } }`.
    #[serde(default)]
    pub oauth2: Option<XOAuth2Config>,
    /// A v2 search query (listen mode), e.g. `acme -is:retweet`; posts of the
    /// last 7 days that match it.
    #[serde(default)]
    pub query: Option<String>,
    /// The numeric user id of the company's account (watch mode): posts that
    /// mention it. At least one of `query` and `mentions_of_user_id` is needed.
    #[serde(default)]
    pub mentions_of_user_id: Option<String>,
    /// Root of the API.
    #[serde(default = "default_base_url")]
    pub base_url: Url,
    /// Posts per page, 10 to 100.
    #[serde(default = "default_max_results")]
    pub max_results: u32,
    /// Most pages one poll fetches per stream; a longer pass pauses there
    /// and the next poll resumes it (nothing is skipped).
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
}

/// OAuth 2.0 user context of an X source (the `oauth2` table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XOAuth2Config {
    /// The app's OAuth 2.0 Client ID (Developer Console, "Keys and tokens";
    /// not the API key of OAuth 1.0a).
    pub client_id: String,
    /// The app's OAuth 2.0 Client Secret (`{ env = "..." }` or `{ file =
    /// "..." }`) for a confidential client, sent only to `token_url` as HTTP
    /// Basic auth. Leave it out for a public client (`client_id` is then sent
    /// in the form).
    #[serde(default)]
    pub client_secret: Option<SecretRef>,
    /// The refresh token of the account's authorization (Authorization Code
    /// with PKCE, scopes `tweet.read users.read offline.access`), as `{ env =
    /// "..." }` or `{ file = "..." }`. Used once: X rotates it, and the
    /// newest one is kept in the daemon's state store.
    pub refresh_token: SecretRef,
    /// The token endpoint.
    #[serde(default = "default_token_url")]
    pub token_url: Url,
}

fn default_base_url() -> Url {
    Url::parse("https://api.twitter.com").unwrap_or_else(|_| unreachable!("a valid literal URL"))
}

fn default_token_url() -> Url {
    Url::parse("https://api.x.com/2/oauth2/token").unwrap_or_else(|_| unreachable!("a valid literal URL"))
}

fn default_max_results() -> u32 {
    100
}

fn default_max_pages_per_poll() -> u32 {
    10
}

/// Why an [`XSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The secret of the named field could not be read.
    #[error("x `{0}`: {1}")]
    Secret(&'static str, #[source] SecretError),
    #[error("x `bearer_token` holds characters that are not allowed in an HTTP header")]
    InvalidToken,
    #[error("x takes `bearer_token` (app-only) or `oauth2` (user context), not both")]
    BothAuth,
    #[error("x needs `bearer_token` (app-only) or `oauth2` (user context)")]
    NoAuth,
    #[error("x `oauth2.client_id` must not be empty nor contain `:`")]
    InvalidClientId,
    #[error("x `oauth2.token_url` must be an http(s) URL, not `{0}`")]
    InvalidTokenUrl(String),
    #[error("x needs a `query`, a `mentions_of_user_id` or both")]
    NothingToPoll,
    #[error("x `mentions_of_user_id` must be a numeric user id, not `{0}`")]
    InvalidUserId(String),
    #[error("x `max_results` must be between 10 and 100, not {0}")]
    InvalidMaxResults(u32),
    #[error("x `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("x HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// The two streams a source may poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stream {
    Mentions,
    Search,
}

/// What the cursor of an X source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct XCursor {
    #[serde(default)]
    mentions: StreamCursor,
    #[serde(default)]
    search: StreamCursor,
    /// The stream the next call polls, within a round of several streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<Stream>,
}

impl XCursor {
    fn stream_mut(&mut self, stream: Stream) -> &mut StreamCursor {
        match stream {
            Stream::Mentions => &mut self.mentions,
            Stream::Search => &mut self.search,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StreamCursor {
    /// The newest post id committed by a finished pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since_id: Option<String>,
    /// [`PollRequest::since`] of the first poll, kept until a pass sets `since_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
    /// The pass in progress, while paging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<PassState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PassState {
    /// `meta.newest_id` of the pass's first page: the next watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<String>,
    /// The `next_token` of the next page.
    token: String,
    /// Pages fetched by this poll (0 after a pause).
    pages: u32,
    /// The pass's `since_id` and `start_time`, repeated with every token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_time: Option<DateTime<Utc>>,
}

/// One decoded page of either endpoint.
#[derive(Debug, Default)]
struct ApiPage {
    items: Vec<Value>,
    /// User id -> (username, name) from `includes.users`.
    users: HashMap<String, (Option<String>, Option<String>)>,
    newest_id: Option<String>,
    next_token: Option<String>,
    errors: Vec<Value>,
}

/// The parameters of one request.
#[derive(Debug, Clone, Default)]
struct Query {
    since_id: Option<String>,
    start_time: Option<DateTime<Utc>>,
    token: Option<String>,
}

/// How requests are authenticated.
#[derive(Debug)]
enum Auth {
    /// App-only: `Bearer ...`, marked sensitive so it never shows in Debug output.
    App(HeaderValue),
    /// User context: access tokens from the refresh token, renewed and persisted.
    User(Box<OAuth2>),
}

/// An X account's mentions and/or a search query.
#[derive(Debug)]
pub struct XSource {
    instance: String,
    config: XConfig,
    http: HttpClient,
    auth: Auth,
}

impl XSource {
    pub fn new(instance: &str, config: XConfig, http: HttpOptions) -> Result<XSource, BuildError> {
        if !matches!(config.base_url.scheme(), "http" | "https") || config.base_url.cannot_be_a_base() {
            return Err(BuildError::InvalidBaseUrl(config.base_url.to_string()));
        }
        let query = config.query.as_deref().is_some_and(|query| !query.trim().is_empty());
        if !query && config.mentions_of_user_id.is_none() {
            return Err(BuildError::NothingToPoll);
        }
        if let Some(id) = &config.mentions_of_user_id
            && (id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(BuildError::InvalidUserId(id.clone()));
        }
        if !(10..=100).contains(&config.max_results) {
            return Err(BuildError::InvalidMaxResults(config.max_results));
        }
        let auth = match (&config.bearer_token, &config.oauth2) {
            (Some(_), Some(_)) => return Err(BuildError::BothAuth),
            (None, None) => return Err(BuildError::NoAuth),
            (Some(bearer), None) => {
                let token = bearer.resolve().map_err(|error| BuildError::Secret("bearer_token", error))?;
                let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                    .map_err(|_| BuildError::InvalidToken)?;
                authorization.set_sensitive(true);
                Auth::App(authorization)
            }
            (None, Some(oauth2)) => Auth::User(Box::new(user_context(oauth2)?)),
        };
        Ok(XSource { instance: instance.to_owned(), http: HttpClient::new(http)?, config, auth })
    }

    /// Keeps the user-context tokens (and the rotated refresh token) in
    /// `store`, so a restart goes on from them. Nothing changes with an
    /// app-only bearer token.
    pub fn with_token_store(self, store: Arc<dyn TokenStore>) -> XSource {
        let auth = match self.auth {
            Auth::User(oauth) => Auth::User(Box::new(oauth.with_store(store))),
            app @ Auth::App(_) => app,
        };
        XSource { auth, ..self }
    }

    /// Sends the GET `url` with the configured authentication; with user
    /// context a 401 gets one refresh and one retry.
    async fn get(&self, url: Url) -> Result<HttpResponse, SourceError> {
        match &self.auth {
            Auth::App(authorization) => {
                Ok(self.http.send(self.http.get(url).header(AUTHORIZATION, authorization.clone())).await?)
            }
            Auth::User(oauth) => Ok(oauth.send(&self.http, || self.http.get(url.clone())).await?),
        }
    }

    /// The configured streams, in the order a round polls them.
    fn streams(&self) -> Vec<Stream> {
        let mut streams = Vec::with_capacity(2);
        if self.config.mentions_of_user_id.is_some() {
            streams.push(Stream::Mentions);
        }
        if self.config.query.as_deref().is_some_and(|query| !query.trim().is_empty()) {
            streams.push(Stream::Search);
        }
        streams
    }

    fn endpoint(&self, stream: Stream) -> Url {
        let mut url = self.config.base_url.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            match stream {
                Stream::Search => path.extend(["2", "tweets", "search", "recent"]),
                Stream::Mentions => path.extend([
                    "2",
                    "users",
                    self.config.mentions_of_user_id.as_deref().unwrap_or_default(),
                    "mentions",
                ]),
            };
        }
        url
    }

    async fn fetch(
        &self,
        stream: Stream,
        query: &Query,
        max_results: u32,
        fields: bool,
    ) -> Result<ApiPage, SourceError> {
        let mut url = self.endpoint(stream);
        {
            let mut pairs = url.query_pairs_mut();
            if stream == Stream::Search {
                pairs.append_pair("query", self.config.query.as_deref().unwrap_or_default());
            }
            pairs.append_pair("max_results", &max_results.to_string());
            if fields {
                pairs
                    .append_pair("tweet.fields", TWEET_FIELDS)
                    .append_pair("expansions", "author_id")
                    .append_pair("user.fields", USER_FIELDS);
            }
            if let Some(since_id) = &query.since_id {
                pairs.append_pair("since_id", since_id);
            }
            if let Some(start_time) = query.start_time {
                pairs.append_pair("start_time", &start_time.to_rfc3339_opts(SecondsFormat::Secs, true));
            }
            if let Some(token) = &query.token {
                let name = match stream {
                    Stream::Search => "next_token",
                    Stream::Mentions => "pagination_token",
                };
                pairs.append_pair(name, token);
            }
        }
        let response = self.get(url).await?;
        check_status(&response)?;
        let body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
        let Value::Object(mut body) = body else {
            return Err(SourceError::Decode(format!("{} answered JSON that is not an object", response.target)));
        };
        let errors = match body.remove("errors") {
            Some(Value::Array(errors)) => errors,
            _ => Vec::new(),
        };
        let (data, meta) = (body.remove("data"), body.remove("meta"));
        if data.is_none() && meta.is_none() {
            if let Some(error) = errors.first() {
                let detail = error_text(error);
                return Err(SourceError::Status { status: 200, message: format!("{}: {detail}", response.target) });
            }
            return Err(SourceError::Decode(format!("{} answered JSON without `data` or `meta`", response.target)));
        }
        let items = match data {
            Some(Value::Array(items)) => items,
            None | Some(Value::Null) => Vec::new(),
            Some(_) => {
                return Err(SourceError::Decode(format!("{} answered a `data` that is not a list", response.target)));
            }
        };
        let meta = meta.unwrap_or(Value::Null);
        let text = |key: &str| meta.get(key).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_owned);
        let mut users = HashMap::new();
        let listed = body.get("includes").and_then(|includes| includes.get("users")).and_then(Value::as_array);
        for user in listed.into_iter().flatten() {
            if let Some(id) = user.get("id").and_then(Value::as_str) {
                let field =
                    |key: &str| user.get(key).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_owned);
                users.insert(id.to_owned(), (field("username"), field("name")));
            }
        }
        Ok(ApiPage { items, users, newest_id: text("newest_id"), next_token: text("next_token"), errors })
    }

    fn to_contribution(
        &self,
        stream: Stream,
        item: &Value,
        users: &HashMap<String, (Option<String>, Option<String>)>,
    ) -> Result<Contribution, String> {
        let tweet = RawTweet::deserialize(item).map_err(|error| format!("cannot read the post: {error}"))?;
        let id = snowflake(&tweet.id).ok_or_else(|| format!("the post id `{}` is not a number", tweet.id))?;
        let original = match tweet.edit_history_tweet_ids.first() {
            Some(first) if tweet.edit_history_tweet_ids.len() > 1 => {
                snowflake(first).ok_or_else(|| format!("the edit history id `{first}` is not a number"))?;
                first.clone()
            }
            _ => tweet.id.clone(),
        };
        let edited = original != tweet.id;
        let version_time = tweet.created_at.or_else(|| snowflake_time(id));
        let (created_at, updated_at) = if edited {
            (snowflake(&original).and_then(snowflake_time).or(version_time), version_time)
        } else {
            (version_time, None)
        };
        let created_at = created_at.ok_or("the post has no readable creation time")?;
        let replied_to = tweet.referenced_tweets.iter().find(|r| r.kind == "replied_to").map(|r| r.id.clone());
        let kind = match (stream, &replied_to) {
            (Stream::Mentions, _) => Kind::Mention,
            (Stream::Search, Some(_)) => Kind::Reply,
            (Stream::Search, None) => Kind::Post,
        };
        let author_id = tweet.author_id.filter(|id| !id.is_empty()).unwrap_or_default();
        let (handle, display_name) = users.get(&author_id).cloned().unwrap_or_default();
        let url = match &handle {
            Some(handle) => format!("https://x.com/{handle}/status/{}", tweet.id),
            None => format!("https://x.com/i/web/status/{}", tweet.id),
        };
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: original,
            url: Some(url),
            kind,
            author: Author {
                id: author_id,
                profile_url: handle.as_deref().map(|handle| format!("https://x.com/{handle}")),
                handle,
                display_name,
                email: None,
                links: Vec::new(),
            },
            title: None,
            body: decode_text(&tweet.text),
            language: None,
            created_at,
            updated_at,
            parent_id: replied_to,
            thread_id: tweet.conversation_id.filter(|id| !id.is_empty()),
            tags: Vec::new(),
            score: tweet.public_metrics.and_then(|metrics| metrics.like_count),
            edited,
            deleted: false,
            signals: None,
        })
    }
}

/// The OAuth2 client of a user-context configuration, keeping its tokens in
/// memory until [`XSource::with_token_store`] gives it the daemon's store.
fn user_context(config: &XOAuth2Config) -> Result<OAuth2, BuildError> {
    let url = &config.token_url;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(BuildError::InvalidTokenUrl(url.to_string()));
    }
    let client_id = config.client_id.trim();
    if client_id.is_empty() || client_id.contains(':') {
        return Err(BuildError::InvalidClientId);
    }
    let client_secret = match &config.client_secret {
        Some(secret) => Some(secret.resolve().map_err(|error| BuildError::Secret("oauth2.client_secret", error))?),
        None => None,
    };
    let refresh_token =
        config.refresh_token.resolve().map_err(|error| BuildError::Secret("oauth2.refresh_token", error))?;
    Ok(OAuth2::new(
        OAuth2Config {
            token_url: url.clone(),
            client_id: client_id.to_owned(),
            // A confidential client authenticates with HTTP Basic; a public one names itself in the form.
            client_auth: if client_secret.is_some() { ClientAuth::Basic } else { ClientAuth::Body },
            client_secret,
            grant: Grant::RefreshToken(refresh_token),
            // A refresh keeps the scopes of the authorization.
            scope: None,
        },
        Arc::new(MemoryTokenStore::default()),
    ))
}

/// The fields of a post this connector reads.
#[derive(Debug, Deserialize)]
struct RawTweet {
    id: String,
    text: String,
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    author_id: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    referenced_tweets: Vec<RawReference>,
    #[serde(default)]
    public_metrics: Option<RawMetrics>,
    #[serde(default)]
    edit_history_tweet_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RawReference {
    #[serde(rename = "type")]
    kind: String,
    id: String,
}

#[derive(Debug, Deserialize)]
struct RawMetrics {
    #[serde(default)]
    like_count: Option<f64>,
}

fn snowflake(id: &str) -> Option<u64> {
    id.parse::<u64>().ok()
}

/// The creation time a Snowflake id holds.
fn snowflake_time(id: u64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(i64::try_from(id >> 22).ok()?.checked_add(SNOWFLAKE_EPOCH_MS)?)
}

/// The larger of two decimal post ids.
fn newest(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if snowflake(&b).unwrap_or(0) > snowflake(&a).unwrap_or(0) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Post text: X escapes `&`, `<` and `>`; `&amp;` is decoded last so an
/// escaped entity stays as written.
fn decode_text(text: &str) -> String {
    tidy(&text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
}

/// A readable line from one entry of an `errors` array.
fn error_text(error: &Value) -> String {
    ["title", "detail"].iter().filter_map(|key| error.get(*key).and_then(Value::as_str)).collect::<Vec<_>>().join(": ")
}

#[async_trait]
impl Source for XSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let decoded = request.stored::<XCursor>();
        let mut cursor = decoded.unwrap_or_else(|| {
            let fresh = StreamCursor { since: request.since, ..StreamCursor::default() };
            XCursor { mentions: fresh.clone(), search: fresh, next: None }
        });
        let streams = self.streams();
        let Some(&first_stream) = streams.first() else {
            return Ok(Page::default());
        };
        let stream = cursor.next.filter(|next| streams.contains(next)).unwrap_or(first_stream);
        let state = cursor.stream_mut(stream).clone();

        let pages = state.pass.as_ref().map_or(0, |pass| pass.pages) + 1;
        let mut query = match &state.pass {
            Some(pass) => {
                Query { since_id: pass.since_id.clone(), start_time: pass.start_time, token: Some(pass.token.clone()) }
            }
            None if state.since_id.is_some() => Query { since_id: state.since_id.clone(), ..Query::default() },
            None => Query {
                start_time: state.since.map(|since| match stream {
                    Stream::Search => since.max(search_window_start()),
                    Stream::Mentions => since,
                }),
                ..Query::default()
            },
        };
        let api = match self.fetch(stream, &query, self.config.max_results, true).await {
            // The recent search refuses a `since_id` older than its 7 days:
            // restart the pass from the start of the window.
            Err(SourceError::Status { status: 400, message })
                if stream == Stream::Search && query.since_id.is_some() && message.contains("since_id") =>
            {
                tracing::warn!(source = %self.instance, %message, "x refused an old since_id; searching the last 7 days");
                query = Query { start_time: Some(search_window_start()), ..Query::default() };
                self.fetch(stream, &query, self.config.max_results, true).await?
            }
            other => other?,
        };

        let mut page = Page::default();
        let ids: HashSet<&str> = api.items.iter().filter_map(|item| item.get("id").and_then(Value::as_str)).collect();
        let mut refused: HashMap<String, String> = HashMap::new();
        for error in &api.errors {
            match error.get("resource_id").and_then(Value::as_str) {
                Some(id) if ids.contains(id) => {
                    refused.insert(id.to_owned(), error_text(error));
                }
                _ => tracing::debug!(source = %self.instance, error = %error_text(error), "x partial error ignored"),
            }
        }
        for item in &api.items {
            let id = item.get("id").and_then(Value::as_str).map(str::to_owned);
            let outcome = match id.as_ref().and_then(|id| refused.get(id)) {
                Some(error) => Err(format!("x reported an error for this post: {error}")),
                None => self.to_contribution(stream, item, &api.users),
            };
            match outcome {
                Ok(contribution) => page.contributions.push(contribution),
                Err(reason) => {
                    let raw = serde_json::to_string(item).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(id, reason, &raw));
                }
            }
        }

        // The newest id of the page, should `meta` not name it.
        let listed = api.items.iter().filter_map(|item| item.get("id").and_then(Value::as_str)).map(str::to_owned);
        let page_newest = newest(api.newest_id.clone(), listed.fold(None, |acc, id| newest(acc, Some(id))));
        let top = match &state.pass {
            Some(pass) => pass.top.clone(),
            None => page_newest,
        };
        // Paging back is bounded by `since_id` or `start_time`; a first pass
        // with neither takes the newest page only.
        let bounded = query.since_id.is_some() || query.start_time.is_some();
        let cap_hit = pages >= self.config.max_pages_per_poll.max(1);
        let next_token = api.next_token.filter(|token| bounded && query.token.as_ref() != Some(token));
        let stream_state = cursor.stream_mut(stream);
        let stream_done = match next_token {
            Some(token) => {
                stream_state.pass = Some(PassState {
                    top,
                    token,
                    pages: if cap_hit { 0 } else { pages },
                    since_id: query.since_id.clone(),
                    start_time: query.start_time,
                });
                if cap_hit {
                    tracing::info!(source = %self.instance, ?stream, pages, "x pass paused at max_pages_per_poll; the next poll resumes it");
                }
                cap_hit
            }
            None => {
                stream_state.pass = None;
                stream_state.since_id = newest(stream_state.since_id.take(), top);
                if stream_state.since_id.is_some() {
                    stream_state.since = None;
                }
                tracing::info!(source = %self.instance, ?stream, since_id = ?stream_state.since_id, pages, "x pass complete");
                true
            }
        };
        let following = streams.iter().skip_while(|s| **s != stream).nth(1).copied();
        cursor.next = if stream_done { following } else { Some(stream) };
        page.has_more = cursor.next.is_some();
        tracing::debug!(
            source = %self.instance, ?stream, fetched = api.items.len(),
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            has_more = page.has_more, "x page polled"
        );
        page.next_cursor = Some(Cursor::from_json(&cursor));
        Ok(page)
    }

    /// One small page (10 posts, no expansions) of the first configured
    /// stream: it checks the token and the query or user id together.
    async fn check(&self) -> Result<(), SourceError> {
        let stream = self.streams().first().copied().unwrap_or(Stream::Search);
        self.fetch(stream, &Query::default(), 10, false).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{header, method, path, query_param, query_param_is_missing},
    };

    use super::*;

    const SEARCH: &str = "/2/tweets/search/recent";
    const MENTIONS: &str = "/2/users/783214/mentions";

    fn options() -> HttpOptions {
        HttpOptions {
            max_retries: 1,
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(2),
            ..HttpOptions::default()
        }
    }

    /// A secret file holding `value`, one per call (removed when the source
    /// is built: secrets are resolved in `new`).
    fn secret_file(value: &str) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = std::env::temp_dir().join(format!("tributary-x-{}-{n}", std::process::id()));
        std::fs::write(&file, format!("{value}\n")).unwrap();
        file
    }

    /// A secret file holding the test bearer token.
    fn token_file() -> std::path::PathBuf {
        secret_file("AAAAbearer-of-tests")
    }

    fn config(server: &MockServer, query: Option<&str>, user: Option<&str>) -> XConfig {
        serde_json::from_value(json!({
            "bearer_token": {"file": token_file()},
            "query": query,
            "mentions_of_user_id": user,
            "base_url": server.uri(),
        }))
        .unwrap()
    }

    fn source(config: XConfig) -> XSource {
        let source = XSource::new("brand", config.clone(), options());
        remove_secret_files(&config);
        source.unwrap()
    }

    /// Removes the secret files `config` names.
    fn remove_secret_files(config: &XConfig) {
        let oauth2 = config.oauth2.as_ref();
        let secrets = [config.bearer_token.as_ref()]
            .into_iter()
            .chain([oauth2.and_then(|o| o.client_secret.as_ref()), oauth2.map(|o| &o.refresh_token)]);
        for secret in secrets.flatten() {
            if let SecretRef::File(file) = secret {
                std::fs::remove_file(file).unwrap();
            }
        }
    }

    const TOKEN: &str = "/2/oauth2/token";

    /// A user-context config against `server`: a confidential client with
    /// `client_secret`, else a public one; the refresh token `refresh-0`.
    fn user_config(server: &MockServer, client_secret: Option<&str>, user: Option<&str>) -> XConfig {
        let mut oauth2 = json!({
            "client_id": "x-client",
            "refresh_token": {"file": secret_file("refresh-0")},
            "token_url": format!("{}{TOKEN}", server.uri()),
        });
        if let Some(secret) = client_secret {
            oauth2["client_secret"] = json!({"file": secret_file(secret)});
        }
        serde_json::from_value(json!({"oauth2": oauth2, "mentions_of_user_id": user, "base_url": server.uri()}))
            .unwrap()
    }

    /// A user-context source keeping its tokens in `store`.
    fn user_source(config: XConfig, store: &Arc<MemoryTokenStore>) -> XSource {
        source(config).with_token_store(store.clone())
    }

    /// X's token endpoint: every refresh answers `access-N` and rotates the
    /// refresh token to `refresh-N`, in the documented shape.
    async fn token_endpoint(server: &MockServer) {
        let issued = std::sync::atomic::AtomicU32::new(0);
        Mock::given(method("POST"))
            .and(path(TOKEN))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .respond_with(move |_: &wiremock::Request| {
                let n = issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                ResponseTemplate::new(200).set_body_json(json!({
                    "token_type": "bearer",
                    "expires_in": 7200,
                    "access_token": format!("access-{n}"),
                    "scope": "tweet.read users.read offline.access",
                    "refresh_token": format!("refresh-{n}"),
                }))
            })
            .mount(server)
            .await;
    }

    /// The requests `server` received at `at`.
    async fn received(server: &MockServer, at: &str) -> Vec<wiremock::Request> {
        server.received_requests().await.unwrap().into_iter().filter(|r| r.url.path() == at).collect()
    }

    fn form(request: &wiremock::Request) -> String {
        String::from_utf8_lossy(&request.body).into_owned()
    }

    fn authorization(request: &wiremock::Request) -> &str {
        request.headers.get("authorization").and_then(|value| value.to_str().ok()).unwrap_or_default()
    }

    fn search_fixture() -> Fixture {
        Fixture::load("x", "search_recent_tweets")
    }

    fn mentions_fixture() -> Fixture {
        Fixture::load("x", "users_mentions")
    }

    /// A recorded fixture with its body changed by `edit`.
    fn derived(fixture: Fixture, edit: impl FnOnce(&mut Value)) -> ResponseTemplate {
        let mut fixture = fixture;
        edit(&mut fixture.body);
        fixture.response()
    }

    /// The recorded meta of an empty answer: `result_count` 0 and nothing else.
    fn empty() -> ResponseTemplate {
        derived(search_fixture(), |body| {
            body.as_object_mut().unwrap().remove("data");
            body["meta"] = json!({"result_count": 0});
        })
    }

    fn tweet_mut<'a>(body: &'a mut Value, id: &str) -> &'a mut Value {
        body["data"].as_array_mut().unwrap().iter_mut().find(|t| t["id"] == id).unwrap()
    }

    /// Adds the fields requested with `tweet.fields` and `expansions` (which
    /// the recording did not ask for) to the recorded mentions, in their
    /// documented shape.
    fn with_documented_fields(body: &mut Value) {
        for (n, tweet) in body["data"].as_array_mut().unwrap().iter_mut().enumerate() {
            let id = tweet["id"].as_str().unwrap().to_owned();
            tweet["author_id"] = json!(format!("10{n}"));
            tweet["created_at"] = json!("2022-10-07T22:43:06.000Z");
            tweet["conversation_id"] = json!(id);
            tweet["lang"] = json!("en");
            tweet["public_metrics"] =
                json!({"retweet_count": 0, "reply_count": 1, "like_count": n * 2, "quote_count": 0});
        }
        let reply = tweet_mut(body, "1578516242867945475");
        reply["conversation_id"] = json!("1578500000000000000");
        reply["in_reply_to_user_id"] = json!("99");
        reply["referenced_tweets"] = json!([{"type": "replied_to", "id": "1578515000000000000"}]);
        body["includes"] = json!({"users": [
            {"id": "100", "name": "Dana P.", "username": "dana_p"},
            {"id": "103", "name": "Mercy", "username": "MercyKnifed"},
        ]});
    }

    async fn serve(server: &MockServer, at: &str, response: ResponseTemplate) {
        Mock::given(method("GET")).and(path(at)).respond_with(response).mount(server).await;
    }

    fn cursor(page: &Page) -> XCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn watermark(stream: Stream, since_id: &str) -> Option<Cursor> {
        let state = StreamCursor { since_id: Some(since_id.into()), ..StreamCursor::default() };
        let mut cursor = XCursor::default();
        *cursor.stream_mut(stream) = state;
        Some(Cursor::from_json(&cursor))
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
        author: &'static str,
        handle: Option<&'static str>,
        name: Option<&'static str>,
        url: &'static str,
        created_at: &'static str,
        thread: Option<&'static str>,
        parent: Option<&'static str>,
        score: Option<f64>,
        body_starts: &'static str,
    }

    fn check(page: &Page, expect: &Expect) {
        let c = find(page, expect.id);
        let at = expect.id;
        assert_eq!((c.platform.as_str(), c.source.as_str()), ("x", "brand"), "{at}");
        assert_eq!(c.kind, expect.kind, "{at}");
        assert_eq!(c.author.id, expect.author, "{at}");
        assert_eq!(c.author.handle.as_deref(), expect.handle, "{at}");
        assert_eq!(c.author.display_name.as_deref(), expect.name, "{at}");
        let profile = expect.handle.map(|h| format!("https://x.com/{h}"));
        assert_eq!(c.author.profile_url, profile, "{at}");
        assert_eq!(c.url.as_deref(), Some(expect.url), "{at}");
        assert_eq!(c.created_at, expect.created_at.parse::<DateTime<Utc>>().unwrap(), "{at}");
        assert_eq!(c.thread_id.as_deref(), expect.thread, "{at}");
        assert_eq!(c.parent_id.as_deref(), expect.parent, "{at}");
        assert_eq!(c.score, expect.score, "{at}");
        assert!(c.body.starts_with(expect.body_starts), "{at}: {:?}", c.body);
        assert!(!c.edited && !c.deleted && c.updated_at.is_none(), "{at}");
        assert!(c.title.is_none() && c.language.is_none() && c.signals.is_none() && c.tags.is_empty(), "{at}");
    }

    #[tokio::test]
    async fn first_poll_maps_the_recorded_search_page_and_takes_only_the_newest_page() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(SEARCH))
            .and(query_param("query", "tweepy -is:retweet"))
            .and(query_param("max_results", "100"))
            .and(query_param("tweet.fields", TWEET_FIELDS))
            .and(query_param("expansions", "author_id"))
            .and(query_param("user.fields", "username,name"))
            .and(query_param_is_missing("since_id"))
            .and(query_param_is_missing("start_time"))
            .and(header("authorization", "Bearer AAAAbearer-of-tests"))
            .respond_with(search_fixture().response())
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, Some("tweepy -is:retweet"), None));
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 10);
        assert!(page.quarantined.is_empty());
        // The recording asked for no fields: no author, time from the id.
        for expect in [
            Expect {
                id: "1578516068309794817",
                kind: Kind::Post,
                author: "",
                handle: None,
                name: None,
                url: "https://x.com/i/web/status/1578516068309794817",
                created_at: "2022-10-07T22:42:12.752Z",
                thread: None,
                parent: None,
                score: None,
                body_starts: "2022-10-07 22:42:12.637103 tweepy",
            },
            Expect {
                id: "1578511538419212288",
                kind: Kind::Post,
                author: "",
                handle: None,
                name: None,
                url: "https://x.com/i/web/status/1578511538419212288",
                created_at: "2022-10-07T22:24:12.742Z",
                thread: None,
                parent: None,
                score: None,
                body_starts: "2022-10-07 22:24:12.640234 tweepy",
            },
        ] {
            check(&page, &expect);
        }
        // Without `since`, the next_token of the first page is not followed.
        assert!(!page.has_more);
        assert_eq!(cursor(&page).search.since_id.as_deref(), Some("1578516068309794817"));
        assert_eq!(cursor(&page).search.pass, None);
        assert!(!format!("{source:?}").contains("bearer-of-tests"), "the token leaked into Debug");
    }

    #[tokio::test]
    async fn mentions_map_authors_replies_threads_and_likes() {
        let server = MockServer::start().await;
        serve(&server, MENTIONS, derived(mentions_fixture(), with_documented_fields)).await;
        let page = source(config(&server, None, Some("783214"))).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 10);
        check(
            &page,
            &Expect {
                id: "1578516295611748353",
                kind: Kind::Mention,
                author: "100",
                handle: Some("dana_p"),
                name: Some("Dana P."),
                url: "https://x.com/dana_p/status/1578516295611748353",
                created_at: "2022-10-07T22:43:06Z",
                thread: Some("1578516295611748353"),
                parent: None,
                score: Some(0.0),
                body_starts: "@Twitter @TwitterSupport this is my ENTIRE feed",
            },
        );
        check(
            &page,
            &Expect {
                id: "1578516242867945475",
                kind: Kind::Mention,
                author: "103",
                handle: Some("MercyKnifed"),
                name: Some("Mercy"),
                url: "https://x.com/MercyKnifed/status/1578516242867945475",
                created_at: "2022-10-07T22:43:06Z",
                thread: Some("1578500000000000000"),
                parent: Some("1578515000000000000"),
                score: Some(6.0),
                body_starts: "@MercyKnifed @Twitter what the fuck???",
            },
        );
        // An author missing from `includes.users` keeps its id.
        let unnamed = find(&page, "1578516273537118209");
        assert_eq!((unnamed.author.id.as_str(), unnamed.author.handle.as_deref()), ("101", None));
        assert_eq!(cursor(&page).mentions.since_id.as_deref(), Some("1578516295611748353"));
    }

    #[tokio::test]
    async fn search_replies_are_replies_and_text_entities_are_decoded() {
        let server = MockServer::start().await;
        let response = derived(search_fixture(), |body| {
            let tweet = tweet_mut(body, "1578515564971970560");
            tweet["referenced_tweets"] = json!([{"type": "quoted", "id": "1"}, {"type": "replied_to", "id": "2"}]);
            tweet["text"] = json!("a &lt;b&gt; &amp;amp; c\nsecond line");
        });
        serve(&server, SEARCH, response).await;
        let page = source(config(&server, Some("tweepy"), None)).poll(&PollRequest::default()).await.unwrap();
        let reply = find(&page, "1578515564971970560");
        assert_eq!((reply.kind, reply.parent_id.as_deref()), (Kind::Reply, Some("2")));
        assert_eq!(reply.body, "a <b> &amp; c\nsecond line");
        assert_eq!(find(&page, "1578516068309794817").kind, Kind::Post);
    }

    #[tokio::test]
    async fn an_incremental_poll_sends_since_id_and_nothing_new_keeps_the_watermark() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(SEARCH))
            .and(query_param("since_id", "1578516068309794817"))
            .respond_with(empty())
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, Some("tweepy"), None));
        let request = PollRequest { cursor: watermark(Stream::Search, "1578516068309794817"), since: None };
        let page = source.poll(&request).await.unwrap();
        assert!(page.contributions.is_empty() && page.quarantined.is_empty() && !page.has_more);
        assert_eq!(page.next_cursor, request.cursor, "nothing new: the cursor is unchanged");
    }

    /// The recorded search page split in two: the newest 5 posts with a
    /// `next_token`, then the older 5 without one.
    async fn serve_two_pages(server: &MockServer, since_id: &str) {
        let first = derived(search_fixture(), |body| {
            body["data"].as_array_mut().unwrap().truncate(5);
            body["meta"]["oldest_id"] = json!("1578514055010324480");
            body["meta"]["result_count"] = json!(5);
        });
        let second = derived(search_fixture(), |body| {
            body["data"].as_array_mut().unwrap().drain(..5);
            body["meta"] =
                json!({"newest_id": "1578513551664173057", "oldest_id": "1578511538419212288", "result_count": 5});
        });
        Mock::given(method("GET"))
            .and(path(SEARCH))
            .and(query_param("since_id", since_id))
            .and(query_param_is_missing("next_token"))
            .respond_with(first)
            .expect(1)
            .mount(server)
            .await;
        Mock::given(method("GET"))
            .and(path(SEARCH))
            .and(query_param("since_id", since_id))
            .and(query_param("next_token", "b26v89c19zqg8o3fpzbn1e0ffhxjiofzw6po136rvbnul"))
            .respond_with(second)
            .expect(1)
            .mount(server)
            .await;
    }

    #[tokio::test]
    async fn pages_with_next_token_and_moves_the_watermark_when_the_pass_ends() {
        let server = MockServer::start().await;
        serve_two_pages(&server, "1578500000000000000").await;
        let source = source(config(&server, Some("tweepy"), None));
        let request = PollRequest { cursor: watermark(Stream::Search, "1578500000000000000"), since: None };
        let first = source.poll(&request).await.unwrap();
        assert_eq!(first.contributions.len(), 5);
        assert!(first.has_more);
        let state = cursor(&first).search;
        assert_eq!(state.since_id.as_deref(), Some("1578500000000000000"), "the watermark waits for the pass");
        let pass = state.pass.unwrap();
        assert_eq!(pass.top.as_deref(), Some("1578516068309794817"));
        assert_eq!(pass.pages, 1);

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second)[0], "1578513551664173057");
        assert_eq!(second.contributions.len(), 5);
        assert!(!second.has_more);
        let state = cursor(&second).search;
        assert_eq!((state.since_id.as_deref(), state.pass), (Some("1578516068309794817"), None));
    }

    #[tokio::test]
    async fn a_pass_pauses_at_max_pages_and_the_next_poll_resumes_it() {
        let server = MockServer::start().await;
        serve_two_pages(&server, "1578500000000000000").await;
        let mut config = config(&server, Some("tweepy"), None);
        config.max_pages_per_poll = 1;
        let source = source(config);
        let request = PollRequest { cursor: watermark(Stream::Search, "1578500000000000000"), since: None };
        let first = source.poll(&request).await.unwrap();
        assert_eq!(first.contributions.len(), 5);
        assert!(!first.has_more, "the cap ends this poll");
        let state = cursor(&first).search;
        assert_eq!(state.since_id.as_deref(), Some("1578500000000000000"), "the watermark must not jump");
        assert_eq!(state.pass.as_ref().map(|p| p.pages), Some(0));

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(second.contributions.len(), 5);
        assert_eq!(cursor(&second).search.since_id.as_deref(), Some("1578516068309794817"));
    }

    #[tokio::test]
    async fn first_poll_honours_since_with_start_time_and_pagination_token() {
        let server = MockServer::start().await;
        let since: DateTime<Utc> = "2022-10-07T22:00:00Z".parse().unwrap();
        Mock::given(method("GET"))
            .and(path(MENTIONS))
            .and(query_param("start_time", "2022-10-07T22:00:00Z"))
            .and(query_param_is_missing("pagination_token"))
            .respond_with(mentions_fixture().response())
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(MENTIONS))
            .and(query_param("start_time", "2022-10-07T22:00:00Z"))
            .and(query_param("pagination_token", "7140dibdnow9c7btw423i3sy3u5zupmkcpofxcsmxj48j"))
            .respond_with(empty())
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, None, Some("783214")));
        let first = source.poll(&PollRequest { cursor: None, since: Some(since) }).await.unwrap();
        assert_eq!(first.contributions.len(), 10);
        assert!(first.has_more);
        // The daemon need not repeat `since`: the pass carries it.
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert!(second.contributions.is_empty() && !second.has_more);
        let state = cursor(&second).mentions;
        assert_eq!(state, StreamCursor { since_id: Some("1578516295611748353".into()), since: None, pass: None });
    }

    #[tokio::test]
    async fn search_since_is_clamped_to_seven_days_and_an_old_since_id_restarts_the_window() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(SEARCH))
            .and(query_param("since_id", "1"))
            .respond_with(ResponseTemplate::new(400).set_body_json(json!({
                "errors": [{"parameters": {"since_id": ["1"]}, "message": "Invalid 'since_id':'1'. 'since_id' must be a tweet id created after 2022-09-30T22:43:19Z."}],
                "title": "Invalid Request", "detail": "One or more parameters to your request was invalid.",
                "type": "https://api.twitter.com/2/problems/invalid-request"
            })))
            .mount(&server)
            .await;
        Mock::given(method("GET")).and(path(SEARCH)).respond_with(empty()).mount(&server).await;
        let source = source(config(&server, Some("tweepy"), None));
        let month_ago = Utc::now() - chrono::Duration::days(30);
        let before_poll = search_window_start();
        source.poll(&PollRequest { cursor: None, since: Some(month_ago) }).await.unwrap();
        source.poll(&PollRequest { cursor: watermark(Stream::Search, "1"), since: None }).await.unwrap();
        let requests = server.received_requests().await.unwrap();
        let start_times: Vec<DateTime<Utc>> = requests
            .iter()
            .filter_map(|r| r.url.query_pairs().find(|(k, _)| k == "start_time").map(|(_, v)| v.parse().unwrap()))
            .collect();
        assert_eq!((requests.len(), start_times.len()), (3, 2), "{requests:?}");
        for start in start_times {
            assert!(start >= before_poll - chrono::Duration::seconds(1) && start <= Utc::now(), "{start}");
        }
    }

    #[tokio::test]
    async fn an_edit_updates_the_original_contribution() {
        let server = MockServer::start().await;
        // Post ...817 is the second version of ...560.
        let response = derived(search_fixture(), |body| {
            let tweet = tweet_mut(body, "1578516068309794817");
            tweet["edit_history_tweet_ids"] = json!(["1578515564971970560", "1578516068309794817"]);
            tweet["text"] = json!("2022-10-07 22:42:12.637103 tweepy (edited)");
            body["data"].as_array_mut().unwrap().remove(1);
        });
        serve(&server, SEARCH, response).await;
        let page = source(config(&server, Some("tweepy"), None)).poll(&PollRequest::default()).await.unwrap();
        let edited = find(&page, "1578515564971970560");
        assert!(edited.edited);
        assert_eq!(edited.body, "2022-10-07 22:42:12.637103 tweepy (edited)");
        assert_eq!(edited.created_at, "2022-10-07T22:40:12.747Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(edited.updated_at, Some("2022-10-07T22:42:12.752Z".parse().unwrap()));
        assert_eq!(edited.url.as_deref(), Some("https://x.com/i/web/status/1578516068309794817"));
        assert!(page.contributions.iter().all(|c| c.external_id != "1578516068309794817"));
        assert!(!page.contributions.iter().any(|c| c.deleted), "x has no deletion marker");
    }

    #[tokio::test]
    async fn a_429_is_honoured_and_no_request_leaves_while_it_holds() {
        let server = MockServer::start().await;
        let reset = (Utc::now().timestamp() + 3600).to_string();
        serve(
            &server,
            SEARCH,
            ResponseTemplate::new(429)
                .insert_header("x-rate-limit-limit", "450")
                .insert_header("x-rate-limit-remaining", "0")
                .insert_header("x-rate-limit-reset", reset.as_str())
                .set_body_json(json!({"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank", "status": 429})),
        )
        .await;
        let source = source(config(&server, Some("tweepy"), None));
        let error = source.poll(&PollRequest::default()).await.unwrap_err();
        match &error {
            SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                assert!(retry_after.as_secs() > 3500, "{retry_after:?}")
            }
            other => panic!("unexpected {other:?}"),
        }
        let again = source.poll(&PollRequest::default()).await.unwrap_err();
        assert!(matches!(again, SourceError::Http(HttpError::RateLimited { .. })), "{again:?}");
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "no request while the reset holds");
    }

    #[tokio::test]
    async fn malformed_posts_and_posts_named_by_errors_are_quarantined() {
        let server = MockServer::start().await;
        let response = derived(search_fixture(), |body| {
            tweet_mut(body, "1578516068309794817").as_object_mut().unwrap().remove("text");
            tweet_mut(body, "1578515564971970560")["id"] = json!("not-a-number");
            tweet_mut(body, "1578515061600964608")["created_at"] = json!("last Tuesday");
            body["errors"] = json!([
                {"value": "1578514558372618243", "detail": "Could not find tweet with id: [1578514558372618243].",
                 "title": "Not Found Error", "resource_type": "tweet", "parameter": "id",
                 "resource_id": "1578514558372618243", "type": "https://api.twitter.com/2/problems/resource-not-found"},
                {"value": "2244994945", "detail": "User has been suspended: [2244994945].",
                 "title": "Forbidden", "resource_type": "user", "field": "author_id", "parameter": "author_id",
                 "resource_id": "2244994945", "section": "includes", "type": "https://api.twitter.com/2/problems/resource-not-found"}
            ]);
        });
        serve(&server, SEARCH, response).await;
        let page = source(config(&server, Some("tweepy"), None)).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 6);
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(
            quarantined,
            [
                Some("1578516068309794817"),
                Some("not-a-number"),
                Some("1578515061600964608"),
                Some("1578514558372618243")
            ]
        );
        assert!(page.quarantined[0].reason.contains("text"), "{}", page.quarantined[0].reason);
        assert!(page.quarantined[3].reason.contains("Could not find tweet"), "{}", page.quarantined[3].reason);
        assert_eq!(cursor(&page).search.since_id.as_deref(), Some("1578516068309794817"));
    }

    #[tokio::test]
    async fn a_body_that_is_not_the_expected_json_is_an_error() {
        let server = MockServer::start().await;
        serve(&server, SEARCH, ResponseTemplate::new(200).set_body_string("<html>over capacity</html>")).await;
        let error = source(config(&server, Some("tweepy"), None)).poll(&PollRequest::default()).await.unwrap_err();
        assert!(matches!(&error, SourceError::Decode(m) if m.contains(SEARCH)), "{error:?}");

        let server = MockServer::start().await;
        serve(&server, SEARCH, ResponseTemplate::new(200).set_body_json(json!({"result": []}))).await;
        let error = source(config(&server, Some("tweepy"), None)).poll(&PollRequest::default()).await.unwrap_err();
        assert!(matches!(&error, SourceError::Decode(m) if m.contains("data")), "{error:?}");

        // Only errors: the user does not exist.
        let server = MockServer::start().await;
        let body = json!({"errors": [{"value": "783214", "detail": "Could not find user with id: [783214].",
            "title": "Not Found Error", "resource_type": "user", "parameter": "id", "resource_id": "783214",
            "type": "https://api.twitter.com/2/problems/resource-not-found"}]});
        serve(&server, MENTIONS, ResponseTemplate::new(200).set_body_json(body)).await;
        let error = source(config(&server, None, Some("783214"))).poll(&PollRequest::default()).await.unwrap_err();
        assert!(
            matches!(&error, SourceError::Status { status: 200, message } if message.contains("Could not find user")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn refusals_map_to_auth_and_other_statuses_to_status() {
        for (status, is_auth) in [(401, true), (403, true), (404, false)] {
            let server = MockServer::start().await;
            let body =
                json!({"title": "Unauthorized", "type": "about:blank", "status": status, "detail": "Unauthorized"});
            serve(&server, SEARCH, ResponseTemplate::new(status).set_body_json(body)).await;
            let source = source(config(&server, Some("tweepy"), None));
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                match error {
                    SourceError::Auth(message) => assert!(is_auth && message.contains("Unauthorized"), "{status}"),
                    SourceError::Status { status: got, .. } => assert!(!is_auth && got == status, "{status}"),
                    other => panic!("{status}: unexpected {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn both_streams_are_polled_in_one_round_and_check_asks_for_one_small_page() {
        let server = MockServer::start().await;
        serve(&server, MENTIONS, mentions_fixture().response()).await;
        serve(&server, SEARCH, search_fixture().response()).await;
        let source = source(config(&server, Some("tweepy"), Some("783214")));
        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert!(first.contributions.iter().all(|c| c.kind == Kind::Mention));
        assert!(first.has_more);
        assert_eq!(cursor(&first).next, Some(Stream::Search));
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert!(second.contributions.iter().all(|c| c.kind == Kind::Post));
        assert!(!second.has_more);
        let state = cursor(&second);
        assert_eq!(state.next, None);
        assert_eq!(state.mentions.since_id.as_deref(), Some("1578516295611748353"));
        assert_eq!(state.search.since_id.as_deref(), Some("1578516068309794817"));

        source.check().await.unwrap();
        let requests = server.received_requests().await.unwrap();
        let check = requests.last().unwrap();
        assert_eq!(check.url.path(), MENTIONS);
        assert_eq!(check.url.query(), Some("max_results=10"));
    }

    #[test]
    fn config_has_defaults_rejects_unknown_fields_and_bad_values() {
        let file = token_file();
        let config: XConfig =
            serde_json::from_value(json!({"bearer_token": {"file": file}, "query": "acme -is:retweet"})).unwrap();
        assert_eq!(config.base_url.as_str(), "https://api.twitter.com/");
        assert_eq!((config.max_results, config.max_pages_per_poll), (100, 10));
        assert_eq!(config.mentions_of_user_id, None);
        let unknown = serde_json::from_value::<XConfig>(json!({
            "bearer_token": {"env": "X"}, "query": "acme", "schedule": "*/5 * * * *"
        }));
        assert!(unknown.is_err());

        let build = |edit: &dyn Fn(&mut XConfig)| {
            let mut config = config.clone();
            edit(&mut config);
            XSource::new("brand", config, HttpOptions::default())
        };
        assert!(build(&|_| {}).is_ok());
        type Edit<'a> = &'a dyn Fn(&mut XConfig);
        let cases: [(Edit, &str); 5] = [
            (&|c| c.query = None, "NothingToPoll"),
            (&|c| c.query = Some("  ".into()), "NothingToPoll"),
            (&|c| c.mentions_of_user_id = Some("../1".into()), "InvalidUserId"),
            (&|c| c.max_results = 5, "InvalidMaxResults"),
            (&|c| c.bearer_token = Some(SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into())), "Secret"),
        ];
        for (edit, expected) in cases {
            let error = build(edit).unwrap_err();
            assert!(format!("{error:?}").starts_with(expected), "{expected}: {error:?}");
        }
        let mentions_only = build(&|c| {
            c.query = None;
            c.mentions_of_user_id = Some("783214".into());
        })
        .unwrap();
        assert_eq!(
            mentions_only.endpoint(Stream::Mentions).as_str(),
            "https://api.twitter.com/2/users/783214/mentions"
        );
        std::fs::remove_file(file).unwrap();
    }

    #[tokio::test]
    async fn user_context_trades_the_refresh_token_then_polls_with_the_new_access_token() {
        let server = MockServer::start().await;
        token_endpoint(&server).await;
        Mock::given(method("GET"))
            .and(path(MENTIONS))
            .and(header("authorization", "Bearer access-1"))
            .respond_with(mentions_fixture().response())
            .expect(1)
            .mount(&server)
            .await;
        let store = Arc::new(MemoryTokenStore::default());
        let source = user_source(user_config(&server, Some("client-s3cret"), Some("783214")), &store);
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 10);
        assert!(page.contributions.iter().all(|c| c.kind == Kind::Mention));
        assert_eq!(cursor(&page).mentions.since_id.as_deref(), Some("1578516295611748353"));

        let requests = server.received_requests().await.unwrap();
        let paths: Vec<&str> = requests.iter().map(|r| r.url.path()).collect();
        assert_eq!(paths, [TOKEN, MENTIONS], "the token first, then the API");
        let token = &requests[0];
        assert_eq!(token.method.as_str(), "POST");
        assert_eq!(form(token), "grant_type=refresh_token&refresh_token=refresh-0");
        // A confidential client: HTTP Basic x-client:client-s3cret.
        assert_eq!(authorization(token), "Basic eC1jbGllbnQ6Y2xpZW50LXMzY3JldA==");
        let debug = format!("{source:?}");
        for secret in ["refresh-0", "refresh-1", "access-1", "client-s3cret"] {
            assert!(!debug.contains(secret), "{secret} leaked into Debug: {debug}");
        }
    }

    #[tokio::test]
    async fn a_restart_with_the_same_token_store_reuses_the_fresh_access_token() {
        let server = MockServer::start().await;
        token_endpoint(&server).await;
        serve(&server, MENTIONS, mentions_fixture().response()).await;
        let store = Arc::new(MemoryTokenStore::default());
        let first = user_source(user_config(&server, Some("client-s3cret"), Some("783214")), &store);
        first.poll(&PollRequest::default()).await.unwrap();
        drop(first);
        // The same configuration in a new process, with the same state store.
        let second = user_source(user_config(&server, Some("client-s3cret"), Some("783214")), &store);
        second.poll(&PollRequest::default()).await.unwrap();
        second.check().await.unwrap();

        assert_eq!(received(&server, TOKEN).await.len(), 1, "no refresh while the token is fresh");
        let api = received(&server, MENTIONS).await;
        assert_eq!(api.len(), 3);
        assert!(api.iter().all(|r| authorization(r) == "Bearer access-1"), "{api:?}");
    }

    #[tokio::test]
    async fn a_401_gets_one_refresh_with_the_rotated_refresh_token_and_one_retry() {
        let server = MockServer::start().await;
        token_endpoint(&server).await;
        Mock::given(method("GET"))
            .and(path(MENTIONS))
            .and(header("authorization", "Bearer access-1"))
            .respond_with(ResponseTemplate::new(401).set_body_json(json!({
                "title": "Unauthorized", "type": "about:blank", "status": 401, "detail": "Unauthorized"
            })))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(MENTIONS))
            .and(header("authorization", "Bearer access-2"))
            .respond_with(mentions_fixture().response())
            .mount(&server)
            .await;
        let store = Arc::new(MemoryTokenStore::default());
        // A public client: no secret, `client_id` in the form.
        let page = user_source(user_config(&server, None, Some("783214")), &store)
            .poll(&PollRequest::default())
            .await
            .unwrap();
        assert_eq!(page.contributions.len(), 10);

        let tokens = received(&server, TOKEN).await;
        let forms: Vec<String> = tokens.iter().map(form).collect();
        assert_eq!(
            forms,
            [
                "grant_type=refresh_token&refresh_token=refresh-0&client_id=x-client",
                "grant_type=refresh_token&refresh_token=refresh-1&client_id=x-client",
            ],
            "the renewal uses the refresh token rotated by the first answer"
        );
        assert!(tokens.iter().all(|r| !r.headers.contains_key("authorization")), "a public client sends no Basic");
        let api: Vec<String> = received(&server, MENTIONS).await.iter().map(|r| authorization(r).to_owned()).collect();
        assert_eq!(api, ["Bearer access-1", "Bearer access-2"], "one retry");

        // The renewed token (and refresh-2) outlive a restart.
        let restarted = user_source(user_config(&server, None, Some("783214")), &store);
        restarted.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(received(&server, TOKEN).await.len(), 2);
        assert_eq!(
            received(&server, MENTIONS).await.last().map(|r| authorization(r).to_owned()).unwrap(),
            "Bearer access-2"
        );
    }

    #[tokio::test]
    async fn a_refused_refresh_token_is_an_auth_error_that_names_no_secret() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(TOKEN))
            .respond_with(ResponseTemplate::new(400).set_body_json(json!({
                "error": "invalid_request", "error_description": "Value passed for the token was invalid."
            })))
            .mount(&server)
            .await;
        serve(&server, MENTIONS, mentions_fixture().response()).await;
        let store = Arc::new(MemoryTokenStore::default());
        let source = user_source(user_config(&server, Some("client-s3cret"), Some("783214")), &store);
        for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
            let SourceError::Auth(message) = &error else { panic!("unexpected {error:?}") };
            assert!(message.contains("invalid_request: Value passed for the token was invalid."), "{message}");
            for secret in ["refresh-0", "client-s3cret"] {
                assert!(!message.contains(secret) && !format!("{error:?}").contains(secret), "{secret} leaked");
            }
        }
        assert!(received(&server, MENTIONS).await.is_empty(), "no API call without a token");
    }

    #[test]
    fn auth_is_exactly_one_of_bearer_token_and_oauth2() {
        let oauth2 = json!({"client_id": "x-client", "refresh_token": {"env": "TRIBUTARY_TEST_SURELY_UNSET"}});
        let config: XConfig = serde_json::from_value(json!({"oauth2": oauth2, "query": "acme"})).unwrap();
        let user = config.oauth2.as_ref().unwrap();
        assert_eq!(user.token_url.as_str(), "https://api.x.com/2/oauth2/token");
        assert!(user.client_secret.is_none() && config.bearer_token.is_none());
        let unknown = json!({"client_id": "x", "refresh_token": {"env": "X"}, "scope": "tweet.read"});
        assert!(serde_json::from_value::<XConfig>(json!({"oauth2": unknown, "query": "acme"})).is_err());
        let incomplete = json!({"client_id": "x"});
        let error = serde_json::from_value::<XConfig>(json!({"oauth2": incomplete, "query": "acme"})).unwrap_err();
        assert!(error.to_string().contains("refresh_token"), "{error}");

        let build = |config: &XConfig| XSource::new("brand", config.clone(), HttpOptions::default()).unwrap_err();
        let both = XConfig { bearer_token: Some(SecretRef::Env("X_BEARER".into())), ..config.clone() };
        let neither = XConfig { oauth2: None, ..config.clone() };
        for (config, expected) in [(&both, "BothAuth"), (&neither, "NoAuth")] {
            let error = build(config);
            assert!(format!("{error:?}").starts_with(expected), "{error:?}");
            let message = error.to_string();
            assert!(message.contains("`bearer_token`") && message.contains("`oauth2`"), "{message}");
        }
        let error = build(&config);
        assert!(matches!(error, BuildError::Secret("oauth2.refresh_token", _)), "{error:?}");
        assert!(error.to_string().starts_with("x `oauth2.refresh_token`: "), "{error}");
        let with_oauth2 = |edit: &dyn Fn(&mut XOAuth2Config)| {
            let mut config = config.clone();
            edit(config.oauth2.as_mut().unwrap());
            build(&config)
        };
        assert!(matches!(with_oauth2(&|o| o.client_id = "a:b".into()), BuildError::InvalidClientId));
        assert!(matches!(with_oauth2(&|o| o.client_id = " ".into()), BuildError::InvalidClientId));
        let ftp = Url::parse("ftp://api.x.com/2/oauth2/token").unwrap();
        assert!(matches!(with_oauth2(&|o| o.token_url = ftp.clone()), BuildError::InvalidTokenUrl(_)));
        let secret = with_oauth2(&|o| o.client_secret = Some(SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into())));
        assert!(matches!(secret, BuildError::Secret("oauth2.client_secret", _)), "{secret:?}");
    }
}
