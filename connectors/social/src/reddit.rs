//! Reddit: new posts and comments of watched subreddits (watch mode) and
//! the site search for terms (listen mode), through the OAuth API with an
//! application-only token.
//!
//! Streams. Each configured subreddit gives two streams, `/r/{sub}/new`
//! (links, kind `t3`) and `/r/{sub}/comments` (comments, kind `t1`); each
//! search term gives one, `/search?q=..&sort=new&type=link`. One *round*
//! polls every stream in turn (`has_more` between them) and the cursor keeps
//! each stream's state by key (`new:{sub}`, `comments:{sub}`, `search:{term}`).
//!
//! Incremental model, per stream. Reddit listings are newest first and have
//! no "since" parameter; `data.after` is the fullname of the last item of a
//! page and `after=<fullname>` asks for the next, older page (the `Listing`
//! envelope of the Reddit API docs; PRAW's `ListingGenerator` pages the
//! same way, 100 items at most per page, about 1000 per listing). A *pass*
//! starts at the newest page and pages back with `after` until a page holds
//! an item created before the watermark, the listing ends, it passes
//! [`PollRequest::since`] (first pass only) or it has fetched
//! [`RedditConfig::max_pages_per_poll`] pages. The watermark is the
//! `created_utc` of the newest item of the last completed pass (fullnames
//! are base36 ids, so time is what is compared); it moves only when a pass
//! completes. A pass stopped by the page cap pauses with its `after` and
//! resumes on the next round, so nothing newer than the watermark is
//! skipped. The first pass of a stream honours `since`; without it, it is
//! the newest page only.
//!
//! Listings cannot say what changed: every item of a fetched page is
//! returned (the newest page of every pass included), so edits and
//! deletions of recent items are seen again; the daemon's ledger drops the
//! unchanged ones. Items created in the same second as the watermark come
//! back in the next pass too, for the same reason.
//!
//! Mapping and platform behaviour relied on:
//! - Requests carry `raw_json=1`, so text fields come unescaped (no `&amp;`);
//!   `selftext` and `body` are Markdown, kept as text (tidied).
//! - A link (`t3`) is a `post` (title, `selftext` or else its `url` as the
//!   body, `https://www.reddit.com{permalink}`, thread = its fullname); a
//!   comment (`t1`) is a `comment` (parent = `parent_id`, thread = `link_id`,
//!   title = `link_title`). `external_id` is the fullname (`name`).
//! - `edited` is `false` or the epoch time (a float) of the last edit
//!   (recorded in PRAW's cassettes, `comment_edit_ratelimit.json`).
//! - Deleted and removed items keep their place with the text
//!   `[deleted]`/`[removed]` (`deleted_comment_info.json`): they are
//!   returned with `deleted = true` and an empty body. An author `[deleted]`
//!   (a deleted account) gives an empty author, attached to no contact,
//!   while the text stays.
//! - Authentication is OAuth2 "application only": `POST /api/v1/access_token`
//!   with HTTP Basic `client_id:client_secret` and
//!   `grant_type=client_credentials` answers a bearer token valid
//!   `expires_in` seconds (an hour); a "script" app may instead log in as
//!   its account (`grant_type=password`, `username` and `password`). The
//!   SDK's [`OAuth2`] keeps the token in the daemon's state store and
//!   reuses it across restarts until a minute before it expires; an API
//!   call answered 401 gets a fresh token and is retried once. The token
//!   travels only in the `Authorization` header, never in a URL, a log or
//!   an error.
//! - Rate limits are `x-ratelimit-used`, `x-ratelimit-remaining` (a float)
//!   and `x-ratelimit-reset` (seconds to the end of the window), announced
//!   by Reddit in r/redditdev ("Formal ratelimiting headers") and recorded in
//!   the 2025/2026 cassettes; the shared client's gate honours them and 429.
//! - Reddit requires a unique, descriptive User-Agent: `user_agent` is
//!   mandatory and replaces the daemon's default.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::header::HeaderValue;
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

const PLATFORM: &str = "reddit";

/// Where items and profiles are linked to (the API host is not browsable).
const WEB: &str = "https://www.reddit.com";

/// Markers Reddit leaves in place of a deleted author or text.
const DELETED_MARKERS: [&str; 2] = ["[deleted]", "[removed]"];

/// Settings of one Reddit source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedditConfig {
    /// The app's client id (from reddit.com/prefs/apps; a "script" or "web
    /// app" app, which may use the client credentials grant).
    pub client_id: String,
    /// The app's secret (`{ env = "..." }` or `{ file = "..." }`), sent only
    /// to `auth_url` as HTTP Basic auth.
    pub client_secret: SecretRef,
    /// A unique, descriptive User-Agent, as Reddit's API rules require, e.g.
    /// `linux:com.example.tributary:v1.0 (by /u/example)`.
    pub user_agent: String,
    /// Subreddits to watch (names, with or without `r/`): their new posts
    /// and their comments.
    #[serde(default)]
    pub subreddits: Vec<String>,
    /// Terms to find with the site search (posts only, newest first).
    #[serde(default)]
    pub search_terms: Vec<String>,
    /// The OAuth API root.
    #[serde(default = "default_base_url")]
    pub base_url: Url,
    /// With `password`: the account of a "script" app, whose token acts as
    /// that user (the password grant). Without: an application-only token.
    #[serde(default)]
    pub username: Option<String>,
    /// The script account's password (`{ env = "..." }` or `{ file = "..." }`).
    #[serde(default)]
    pub password: Option<SecretRef>,
    /// The token endpoint.
    #[serde(default = "default_auth_url")]
    pub auth_url: Url,
    /// Most pages one stream fetches in one round: a longer pass is paused
    /// and resumed by the next round, so nothing newer is skipped.
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
    /// Items per page (Reddit allows 1 to 100).
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_base_url() -> Url {
    Url::parse("https://oauth.reddit.com").unwrap_or_else(|_| unreachable!("a valid constant URL"))
}

fn default_auth_url() -> Url {
    Url::parse("https://www.reddit.com/api/v1/access_token").unwrap_or_else(|_| unreachable!("a valid constant URL"))
}

fn default_max_pages_per_poll() -> u32 {
    10
}

fn default_limit() -> u32 {
    100
}

/// Why a [`RedditSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("reddit `client_secret` or `password`: {0}")]
    Secret(#[from] SecretError),
    #[error("reddit `username` and `password` go together (a script app's login), or neither")]
    HalfScriptLogin,
    #[error("reddit `client_id` must not be empty nor contain `:`")]
    InvalidClientId,
    #[error(
        "reddit `user_agent` is required: Reddit refuses generic ones (e.g. `linux:com.example.app:v1.0 (by /u/you)`)"
    )]
    MissingUserAgent,
    #[error("reddit `{0}` must be an http(s) URL, not `{1}`")]
    InvalidUrl(&'static str, String),
    #[error("reddit subreddit `{0}` is not a subreddit name (letters, digits and `_`)")]
    InvalidSubreddit(String),
    #[error("reddit `search_terms` holds an empty term")]
    EmptySearchTerm,
    #[error("reddit `limit` must be between 1 and 100, not {0}")]
    InvalidLimit(u32),
    #[error("reddit needs at least one of `subreddits` and `search_terms`")]
    NothingToPoll,
    #[error("reddit HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// One listing polled by the source.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stream {
    /// `/r/{sub}/new`: the subreddit's links.
    New(String),
    /// `/r/{sub}/comments`: the subreddit's comments.
    Comments(String),
    /// `/search?q={term}&sort=new&type=link`.
    Search(String),
}

impl Stream {
    /// The stream's key in the cursor.
    fn key(&self) -> String {
        match self {
            Stream::New(sub) => format!("new:{}", sub.to_lowercase()),
            Stream::Comments(sub) => format!("comments:{}", sub.to_lowercase()),
            Stream::Search(term) => format!("search:{term}"),
        }
    }
}

/// What the cursor of a Reddit source holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RedditCursor {
    /// Each stream's state, by [`Stream::key`].
    #[serde(default)]
    streams: BTreeMap<String, StreamCursor>,
    /// The stream the next call polls, within a round (none: the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct StreamCursor {
    /// `created_utc` of the newest item of the last completed pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark: Option<f64>,
    /// The pass in progress, while paging back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<PassState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PassState {
    /// The newest `created_utc` seen by this pass: the next watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<f64>,
    /// The `after` of the next page (a fullname).
    after: String,
    /// Pages fetched so far in this round.
    pages: u32,
    /// The oldest creation time to keep (first pass only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
}

/// Reddit: subreddits' new posts and comments, and site search.
#[derive(Debug)]
pub struct RedditSource {
    instance: String,
    config: RedditConfig,
    streams: Vec<Stream>,
    http: HttpClient,
    oauth: OAuth2,
}

/// One page of a listing.
struct Listing {
    items: Vec<Value>,
    after: Option<String>,
}

impl RedditSource {
    pub fn new(instance: &str, config: RedditConfig, http: HttpOptions) -> Result<RedditSource, BuildError> {
        for (field, url) in [("base_url", &config.base_url), ("auth_url", &config.auth_url)] {
            if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
                return Err(BuildError::InvalidUrl(field, url.to_string()));
            }
        }
        if config.client_id.trim().is_empty() || config.client_id.contains(':') {
            return Err(BuildError::InvalidClientId);
        }
        let user_agent = config.user_agent.trim();
        if user_agent.is_empty() || HeaderValue::from_str(user_agent).is_err() {
            return Err(BuildError::MissingUserAgent);
        }
        if !(1..=100).contains(&config.limit) {
            return Err(BuildError::InvalidLimit(config.limit));
        }
        let mut streams = Vec::new();
        for name in &config.subreddits {
            let sub = name.trim().trim_start_matches('/').trim_start_matches("r/").trim_end_matches('/');
            let valid = (2..=21).contains(&sub.len()) && sub.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(BuildError::InvalidSubreddit(name.clone()));
            }
            streams.push(Stream::New(sub.to_owned()));
            streams.push(Stream::Comments(sub.to_owned()));
        }
        for term in &config.search_terms {
            if term.trim().is_empty() {
                return Err(BuildError::EmptySearchTerm);
            }
            streams.push(Stream::Search(term.trim().to_owned()));
        }
        if streams.is_empty() {
            return Err(BuildError::NothingToPoll);
        }
        let grant = match (&config.username, &config.password) {
            (None, None) => Grant::ClientCredentials,
            (Some(username), Some(password)) if !username.trim().is_empty() => {
                Grant::Password { username: username.trim().to_owned(), password: password.resolve()? }
            }
            _ => return Err(BuildError::HalfScriptLogin),
        };
        let oauth = OAuth2::new(
            OAuth2Config {
                token_url: config.auth_url.clone(),
                client_id: config.client_id.trim().to_owned(),
                client_secret: Some(config.client_secret.resolve()?),
                client_auth: ClientAuth::Basic,
                grant,
                scope: None,
            },
            Arc::new(MemoryTokenStore::default()),
        );
        let http = HttpClient::new(HttpOptions { user_agent: user_agent.to_owned(), ..http })?;
        Ok(RedditSource { instance: instance.to_owned(), config, streams, http, oauth })
    }

    /// Keeps the access token in `store`, so a restart reuses it.
    pub fn with_token_store(self, store: Arc<dyn TokenStore>) -> RedditSource {
        RedditSource { oauth: self.oauth.with_store(store), ..self }
    }

    /// `base_url` with `segments` appended as path segments (encoded).
    fn endpoint(&self, segments: &[&str]) -> Url {
        tributary_sdk::source::endpoint(&self.config.base_url, segments)
    }

    fn listing_url(&self, stream: &Stream, after: Option<&str>, limit: u32) -> Url {
        let mut url = match stream {
            Stream::New(sub) => self.endpoint(&["r", sub, "new"]),
            Stream::Comments(sub) => self.endpoint(&["r", sub, "comments"]),
            Stream::Search(_) => self.endpoint(&["search"]),
        };
        {
            let mut query = url.query_pairs_mut();
            if let Stream::Search(term) = stream {
                query.append_pair("q", term).append_pair("sort", "new").append_pair("type", "link");
            }
            query.append_pair("limit", &limit.to_string()).append_pair("raw_json", "1");
            if let Some(after) = after {
                query.append_pair("after", after);
            }
        }
        url
    }

    /// An authenticated GET; a 401 gets a fresh token and one retry.
    async fn get(&self, url: Url) -> Result<HttpResponse, SourceError> {
        Ok(self.oauth.send(&self.http, || self.http.get(url.clone())).await?)
    }

    async fn fetch(&self, stream: &Stream, after: Option<&str>, limit: u32) -> Result<Listing, SourceError> {
        let response = self.get(self.listing_url(stream, after, limit)).await?;
        check_status(&response)?;
        let mut body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
        let Some(data) = body.get_mut("data") else {
            return Err(SourceError::Decode(format!("{} answered JSON that is not a listing", response.target)));
        };
        let after = data.get("after").and_then(Value::as_str).filter(|after| !after.is_empty()).map(str::to_owned);
        match data.get_mut("children").map(Value::take) {
            Some(Value::Array(items)) => Ok(Listing { items, after }),
            _ => Err(SourceError::Decode(format!("{} answered a listing without `data.children`", response.target))),
        }
    }

    fn to_contribution(&self, item: &Value) -> Result<Contribution, String> {
        let kind = item.get("kind").and_then(Value::as_str).unwrap_or_default();
        let data = item.get("data").ok_or("the item has no `data`")?;
        let thing = RawThing::deserialize(data).map_err(|error| format!("cannot read the item: {error}"))?;
        let created_at = epoch(thing.created_utc).ok_or("`created_utc` is not a time")?;
        let (edited, updated_at) = match &thing.edited {
            Some(Value::Number(at)) => (true, at.as_f64().and_then(epoch)),
            Some(Value::Bool(true)) => (true, None),
            _ => (false, None),
        };
        let author_name = thing.author.as_deref().filter(|name| !name.is_empty() && !DELETED_MARKERS.contains(name));
        let author = match author_name {
            Some(name) => Author {
                id: thing.author_fullname.clone().filter(|id| !id.is_empty()).unwrap_or_else(|| name.to_owned()),
                handle: Some(name.to_owned()),
                display_name: None,
                email: None,
                profile_url: Some(format!("{WEB}/user/{name}")),
                links: Vec::new(),
            },
            None => Author::default(),
        };
        let permalink = thing
            .permalink
            .as_deref()
            .filter(|link| !link.is_empty())
            .map(|link| if link.starts_with("http") { link.to_owned() } else { format!("{WEB}{link}") });
        let tags: Vec<String> = thing.subreddit.iter().filter(|sub| !sub.is_empty()).cloned().collect();
        let (kind, text, title, url, parent_id, thread_id) = match kind {
            "t3" => {
                let title = thing.title.ok_or("the link has no `title`")?;
                let text = match thing.selftext.filter(|text| !text.trim().is_empty()) {
                    Some(text) => text,
                    None => thing.url.unwrap_or_default(),
                };
                (Kind::Post, text, Some(title), permalink, None, Some(thing.name.clone()))
            }
            "t1" => {
                let text = thing.body.ok_or("the comment has no `body`")?;
                let link_id = thing.link_id.ok_or("the comment has no `link_id`")?;
                let url = permalink.or_else(|| {
                    let sub = thing.subreddit.as_deref()?;
                    let id = thing.name.strip_prefix("t1_")?;
                    Some(format!("{WEB}/r/{sub}/comments/{}/_/{id}/", link_id.trim_start_matches("t3_")))
                });
                (Kind::Comment, text, thing.link_title.filter(|t| !t.is_empty()), url, thing.parent_id, Some(link_id))
            }
            other => return Err(format!("unexpected item kind `{other}` (expected t1 or t3)")),
        };
        // Only the text says the item is gone; a deleted account leaves its
        // text in place (and an empty author, attached to no contact).
        let deleted = DELETED_MARKERS.contains(&text.trim());
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: thing.name,
            url,
            kind,
            author,
            title,
            body: if deleted { String::new() } else { tidy(&text) },
            language: None,
            created_at,
            updated_at,
            parent_id,
            thread_id,
            tags,
            score: thing.score,
            edited,
            deleted,
            signals: None,
        })
    }
}

/// A Reddit time (epoch seconds, a float) as a date; None when absurd.
fn epoch(seconds: f64) -> Option<DateTime<Utc>> {
    if !seconds.is_finite() {
        return None;
    }
    DateTime::from_timestamp_millis((seconds * 1000.0).round() as i64)
}

/// The fields of a link (`t3`) or comment (`t1`) this connector reads.
#[derive(Debug, Deserialize)]
struct RawThing {
    name: String,
    created_utc: f64,
    author: Option<String>,
    author_fullname: Option<String>,
    subreddit: Option<String>,
    score: Option<f64>,
    edited: Option<Value>,
    permalink: Option<String>,
    title: Option<String>,
    selftext: Option<String>,
    url: Option<String>,
    body: Option<String>,
    parent_id: Option<String>,
    link_id: Option<String>,
    link_title: Option<String>,
}

#[async_trait]
impl Source for RedditSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor: RedditCursor = request.stored().unwrap_or_default();
        let index = cursor
            .next
            .as_ref()
            .and_then(|next| self.streams.iter().position(|stream| &stream.key() == next))
            .unwrap_or(0);
        let Some(stream) = self.streams.get(index) else {
            return Err(SourceError::Decode("reddit source has no stream to poll".to_owned()));
        };
        let key = stream.key();
        let StreamCursor { watermark, pass } = cursor.streams.get(&key).cloned().unwrap_or_default();
        let first_pass = watermark.is_none() && pass.is_none();
        let since = match &pass {
            Some(pass) => pass.since,
            None if first_pass => request.since,
            None => None,
        };
        let after = pass.as_ref().map(|pass| pass.after.clone());
        let pages = pass.as_ref().map_or(0, |pass| pass.pages) + 1;

        let listing = self.fetch(stream, after.as_deref(), self.config.limit).await?;
        let fetched = listing.items.len();
        let mut page = Page::default();
        let mut newest = None::<f64>;
        let (mut reached_watermark, mut passed_since) = (false, false);
        for item in &listing.items {
            let created = item.pointer("/data/created_utc").and_then(Value::as_f64).filter(|c| c.is_finite());
            let below_watermark = matches!((created, watermark), (Some(c), Some(w)) if c < w);
            if let Some(created) = created {
                newest = Some(newest.map_or(created, |n| n.max(created)));
                reached_watermark |= below_watermark;
                if let Some(since) = since
                    && epoch(created).is_some_and(|at| at < since)
                {
                    passed_since = true;
                    continue;
                }
            }
            match self.to_contribution(item) {
                Ok(contribution) => page.contributions.push(contribution),
                // Reported by the pass that first saw it.
                Err(_) if below_watermark => {}
                Err(reason) => {
                    let id = item.pointer("/data/name").and_then(Value::as_str).map(str::to_owned);
                    let raw = serde_json::to_string(item).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(id, reason, &raw));
                }
            }
        }

        let top = match (pass.as_ref().and_then(|pass| pass.top), newest) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        // A server that ignores `after` would have us loop: stop instead.
        let ignored_after = after.is_some() && listing.after == after;
        if ignored_after {
            tracing::warn!(source = %self.instance, stream = %key, "reddit repeated `after`; ending the pass");
        }
        let newest_page_only = first_pass && since.is_none();
        let pass_over = listing.after.is_none()
            || fetched == 0
            || reached_watermark
            || passed_since
            || newest_page_only
            || ignored_after;
        let paused = !pass_over && pages >= self.config.max_pages_per_poll.max(1);
        let state = match (&listing.after, pass_over) {
            (Some(next_after), false) => StreamCursor {
                watermark,
                // A paused pass counts its pages afresh in the next round.
                pass: Some(PassState { top, after: next_after.clone(), pages: if paused { 0 } else { pages }, since }),
            },
            _ => StreamCursor {
                watermark: match (watermark, top) {
                    (Some(w), Some(t)) => Some(w.max(t)),
                    (w, t) => w.or(t),
                },
                pass: None,
            },
        };
        if paused {
            tracing::info!(source = %self.instance, stream = %key, pages, "reddit pass paused at max_pages_per_poll; the next round resumes it");
        }
        if pass_over {
            tracing::info!(source = %self.instance, stream = %key, watermark = state.watermark, pages, "reddit pass complete");
        }
        tracing::debug!(
            source = %self.instance, stream = %key, fetched,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            pass_over, "reddit page polled"
        );
        if state == StreamCursor::default() {
            cursor.streams.remove(&key);
        } else {
            cursor.streams.insert(key.clone(), state);
        }
        // Streams no longer configured are forgotten.
        cursor.streams.retain(|known, _| self.streams.iter().any(|stream| &stream.key() == known));
        let stream_done = pass_over || paused;
        cursor.next = match self.streams.get(index + 1) {
            _ if !stream_done => Some(key),
            Some(following) => Some(following.key()),
            // The round is over: the next one starts at the first stream.
            None => None,
        };
        page.has_more = cursor.next.is_some();
        page.next_cursor = (cursor != RedditCursor::default()).then(|| Cursor::from_json(&cursor));
        Ok(page)
    }

    /// Gets a token and reads one item of the first stream.
    async fn check(&self) -> Result<(), SourceError> {
        let stream = self.streams.first().ok_or_else(|| SourceError::Decode("no stream configured".to_owned()))?;
        self.fetch(stream, None, 1).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::{Duration, Instant},
    };

    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{basic_auth, bearer_token, body_string, method, path, query_param, query_param_is_missing},
    };

    use super::*;

    const SECRET: &str = "s3cr3t-0f-th3-app";
    const TOKEN: &str = "<ACCESS_TOKEN>";

    fn options() -> HttpOptions {
        HttpOptions {
            max_retries: 0,
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(5),
            ..HttpOptions::default()
        }
    }

    /// A secret file of its own for each source (resolved in `new`, then removed).
    fn secret_file() -> std::path::PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let file = std::env::temp_dir().join(format!("tributary-reddit-{}-{n}", std::process::id()));
        std::fs::write(&file, format!("{SECRET}\n")).unwrap();
        file
    }

    fn config(server: &MockServer, subreddits: &[&str], terms: &[&str]) -> RedditConfig {
        serde_json::from_value(serde_json::json!({
            "client_id": "cl1ent-id",
            "client_secret": {"file": "/nonexistent"},
            "user_agent": "linux:com.example.tributary:v0.1 (by /u/example)",
            "subreddits": subreddits,
            "search_terms": terms,
            "base_url": server.uri(),
            "auth_url": format!("{}/api/v1/access_token", server.uri()),
        }))
        .unwrap()
    }

    fn source(mut config: RedditConfig) -> RedditSource {
        let file = secret_file();
        config.client_secret = SecretRef::File(file.clone());
        let source = RedditSource::new("reddit", config, options()).unwrap();
        std::fs::remove_file(file).unwrap();
        source
    }

    /// The token endpoint, replaying the recorded answer; it checks the
    /// client credentials and the grant.
    async fn serve_token(server: &MockServer) {
        Mock::given(method("POST"))
            .and(path("/api/v1/access_token"))
            .and(basic_auth("cl1ent-id", SECRET))
            .and(body_string("grant_type=client_credentials"))
            .respond_with(Fixture::load("reddit", "oauth_access_token").response())
            .mount(server)
            .await;
    }

    fn token_requests(requests: &[wiremock::Request]) -> usize {
        requests.iter().filter(|r| r.url.path() == "/api/v1/access_token").count()
    }

    fn fixture(name: &str) -> Fixture {
        Fixture::load("reddit", name)
    }

    fn children(name: &str) -> Vec<Value> {
        fixture(name).body["data"]["children"].as_array().cloned().unwrap()
    }

    /// The recorded listing `name` with other children and `after`.
    fn listing(name: &str, items: Vec<Value>, after: Option<&str>) -> ResponseTemplate {
        let mut fixture = fixture(name);
        fixture.body["data"]["children"] = Value::Array(items);
        fixture.body["data"]["after"] = after.map_or(Value::Null, |a| a.into());
        fixture.response()
    }

    fn item_mut<'a>(items: &'a mut [Value], name: &str) -> &'a mut Value {
        &mut items.iter_mut().find(|item| item["data"]["name"] == name).unwrap()["data"]
    }

    /// Serves `response` at `path` for requests with the token and without `after`.
    async fn serve(server: &MockServer, at: &str, response: ResponseTemplate) {
        Mock::given(method("GET"))
            .and(path(at))
            .and(bearer_token(TOKEN))
            .and(query_param("raw_json", "1"))
            .and(query_param_is_missing("after"))
            .respond_with(response)
            .mount(server)
            .await;
    }

    async fn serve_after(server: &MockServer, at: &str, after: &str, response: ResponseTemplate) {
        Mock::given(method("GET"))
            .and(path(at))
            .and(bearer_token(TOKEN))
            .and(query_param("after", after))
            .respond_with(response)
            .mount(server)
            .await;
    }

    fn cursor(page: &Page) -> RedditCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn cursor_with(key: &str, state: StreamCursor, next: Option<&str>) -> Option<Cursor> {
        let cursor = RedditCursor { streams: [(key.to_owned(), state)].into(), next: next.map(str::to_owned) };
        Some(Cursor::from_json(&cursor))
    }

    fn at_watermark(watermark: f64) -> StreamCursor {
        StreamCursor { watermark: Some(watermark), pass: None }
    }

    fn find<'a>(page: &'a Page, id: &str) -> &'a Contribution {
        page.contributions.iter().find(|c| c.external_id == id).unwrap()
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    /// One expected item of the fixtures, checked by value.
    struct Expect {
        id: &'static str,
        kind: Kind,
        handle: &'static str,
        title: &'static str,
        body_starts: &'static str,
        url: &'static str,
        parent: Option<&'static str>,
        thread: &'static str,
        score: f64,
        created_at: &'static str,
    }

    fn check(page: &Page, expect: &Expect) {
        let c = find(page, expect.id);
        let at = expect.id;
        assert_eq!((c.platform.as_str(), c.source.as_str()), ("reddit", "reddit"), "{at}");
        assert_eq!(c.kind, expect.kind, "{at}");
        // The 2016 recordings carry no `author_fullname`: the name stands in.
        assert_eq!(c.author.id, expect.handle, "{at}");
        assert_eq!(c.author.handle.as_deref(), Some(expect.handle), "{at}");
        let profile = format!("https://www.reddit.com/user/{}", expect.handle);
        assert_eq!(c.author.profile_url.as_deref(), Some(profile.as_str()), "{at}");
        assert_eq!(c.title.as_deref(), Some(expect.title), "{at}");
        assert!(c.body.starts_with(expect.body_starts), "{at}: {:?}", c.body);
        assert_eq!(c.url.as_deref(), Some(expect.url), "{at}");
        assert_eq!(c.parent_id.as_deref(), expect.parent, "{at}");
        assert_eq!(c.thread_id.as_deref(), Some(expect.thread), "{at}");
        assert_eq!(c.tags, ["AskReddit"], "{at}");
        assert_eq!(c.score, Some(expect.score), "{at}");
        assert_eq!(c.created_at, expect.created_at.parse::<DateTime<Utc>>().unwrap(), "{at}");
        assert!(!c.edited && !c.deleted && c.updated_at.is_none(), "{at}");
        assert!(c.language.is_none() && c.signals.is_none(), "{at}");
    }

    #[tokio::test]
    async fn first_round_maps_the_recorded_posts_and_comments() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        serve(&server, "/r/askreddit/new", fixture("subreddit_new").response()).await;
        serve(&server, "/r/askreddit/comments", fixture("subreddit_comments").response()).await;
        let source = source(config(&server, &["r/askreddit"], &[]));

        let posts = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(posts.contributions.len(), 100);
        assert!(posts.quarantined.is_empty(), "{:?}", posts.quarantined);
        assert!(posts.has_more, "the comments stream is next in the round");
        let comments = source.poll(&PollRequest { cursor: posts.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(comments.contributions.len(), 100);
        assert!(comments.quarantined.is_empty(), "{:?}", comments.quarantined);
        assert!(!comments.has_more, "the round is over");

        let expected = [
            Expect {
                id: "t3_48fbm9",
                kind: Kind::Post,
                handle: "RedHeadQc",
                title: "[Serious] Parents of Reddit, what's the biggest lie about yourself you've told your kids?",
                // A self post without text: its url stands in.
                body_starts: "https://www.reddit.com/r/AskReddit/comments/48fbm9/",
                url: "https://www.reddit.com/r/AskReddit/comments/48fbm9/serious_parents_of_reddit_whats_the_biggest_lie/",
                parent: None,
                thread: "t3_48fbm9",
                score: 1.0,
                created_at: "2016-03-01T08:37:38Z",
            },
            Expect {
                id: "t3_48f6io",
                kind: Kind::Post,
                handle: "purpleclouds",
                title: "What are your two favorite foods and how would they taste mixed together?",
                body_starts: "https://www.reddit.com/r/AskReddit/comments/48f6io/",
                url: "https://www.reddit.com/r/AskReddit/comments/48f6io/what_are_your_two_favorite_foods_and_how_would/",
                parent: None,
                thread: "t3_48f6io",
                score: 3.0,
                created_at: "2016-03-01T07:44:02Z",
            },
            Expect {
                id: "t1_d4y8bdp",
                kind: Kind::Comment,
                handle: "preppypuppy",
                title: "[Serious] To anyone who \"followed their dreams\", how has it panned out?",
                body_starts: "great, life is so much better when you can do what you enjoy for a living",
                url: "https://www.reddit.com/r/AskReddit/comments/4r4inc/_/d4y8bdp/",
                parent: Some("t3_4r4inc"),
                thread: "t3_4r4inc",
                score: 1.0,
                created_at: "2016-07-04T00:04:50Z",
            },
            Expect {
                id: "t1_d4y8bdn",
                kind: Kind::Comment,
                handle: "LoneStarCub15",
                title: "What television series is so good, it's worth binge watching from beginning to end?",
                body_starts: "Seeing Don sucker punch the UTZ actor was one of the best scenes in the whole series.",
                url: "https://www.reddit.com/r/AskReddit/comments/4r2hd3/_/d4y8bdn/",
                parent: Some("t1_d4xrzgq"),
                thread: "t3_4r2hd3",
                score: 1.0,
                created_at: "2016-07-04T00:04:50Z",
            },
        ];
        for expect in &expected[..2] {
            check(&posts, expect);
        }
        for expect in &expected[2..] {
            check(&comments, expect);
        }
        // Posts with text carry it (unescaped, as raw_json=1 asks).
        let with_text = posts.contributions.iter().filter(|c| !c.body.starts_with("https://")).count();
        assert!(with_text > 0);
        assert!(posts.contributions.iter().all(|c| !c.body.contains("&amp;")));

        // The first round had no `since`: the newest page of each stream only.
        assert_eq!(
            cursor(&comments),
            RedditCursor {
                streams: [
                    ("comments:askreddit".to_owned(), at_watermark(1467590690.0)),
                    ("new:askreddit".to_owned(), at_watermark(1456821458.0)),
                ]
                .into(),
                next: None,
            }
        );
        let requests = server.received_requests().await.unwrap();
        assert_eq!(token_requests(&requests), 1, "the token is reused");
        assert!(
            requests
                .iter()
                .all(|r| r.headers.get("user-agent").unwrap() == "linux:com.example.tributary:v0.1 (by /u/example)")
        );
        let listing = requests.iter().find(|r| r.url.path() == "/r/askreddit/new").unwrap();
        assert_eq!(listing.url.query(), Some("limit=100&raw_json=1"));
    }

    #[tokio::test]
    async fn a_round_with_nothing_new_returns_the_same_items_unchanged() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        serve(&server, "/r/askreddit/new", fixture("subreddit_new").response()).await;
        serve(&server, "/r/askreddit/comments", fixture("subreddit_comments").response()).await;
        let source = source(config(&server, &["askreddit"], &[]));
        let mut first = Vec::new();
        let mut request = PollRequest::default();
        loop {
            let page = source.poll(&request).await.unwrap();
            first.extend(page.contributions);
            request.cursor = page.next_cursor;
            if !page.has_more {
                break;
            }
        }
        let settled = request.cursor.clone();
        let mut again = Vec::new();
        loop {
            let page = source.poll(&request).await.unwrap();
            again.extend(page.contributions);
            request.cursor = page.next_cursor;
            if !page.has_more {
                break;
            }
        }
        assert_eq!(first.len(), 200);
        let hashes = |items: &[Contribution]| items.iter().map(|c| c.content_hash()).collect::<Vec<_>>();
        assert_eq!(hashes(&first), hashes(&again), "the ledger drops every one of them");
        assert_eq!(request.cursor, settled, "the watermarks stay where they were");
        let requests = server.received_requests().await.unwrap();
        assert!(requests.iter().all(|r| !r.url.query().unwrap_or_default().contains("after=")), "no paging back");
    }

    /// The recorded posts split in two pages of 50: `after` is the fullname
    /// of the first page's last item, as Reddit gives it.
    async fn serve_two_post_pages(server: &MockServer) -> (f64, f64, String) {
        let all = children("subreddit_new");
        let (newest, older) = all.split_at(50);
        let last = newest[49]["data"]["name"].as_str().unwrap().to_owned();
        serve(server, "/r/askreddit/new", listing("subreddit_new", newest.to_vec(), Some(&last))).await;
        serve_after(server, "/r/askreddit/new", &last, listing("subreddit_new", older.to_vec(), Some("t3_48f6io")))
            .await;
        let created = |item: &Value| item["data"]["created_utc"].as_f64().unwrap();
        (created(&all[0]), created(&older[30]), last)
    }

    #[tokio::test]
    async fn pages_back_with_after_down_to_the_watermark() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        let (top, watermark, last) = serve_two_post_pages(&server).await;
        let source = source(config(&server, &["askreddit"], &[]));
        let request = PollRequest { cursor: cursor_with("new:askreddit", at_watermark(watermark), None), since: None };

        let first = source.poll(&request).await.unwrap();
        assert_eq!(first.contributions.len(), 50);
        assert!(first.has_more);
        let pass = PassState { top: Some(top), after: last, pages: 1, since: None };
        let state = &cursor(&first).streams["new:askreddit"];
        assert_eq!(state, &StreamCursor { watermark: Some(watermark), pass: Some(pass) });

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        // The whole second page comes back; it reaches the watermark, so the pass ends.
        assert_eq!(second.contributions.len(), 50);
        assert!(second.has_more, "the comments stream is next");
        let after = cursor(&second);
        assert_eq!(after.streams["new:askreddit"], at_watermark(top));
        assert_eq!(after.next.as_deref(), Some("comments:askreddit"));
    }

    #[tokio::test]
    async fn a_pass_pauses_at_max_pages_and_the_next_round_resumes_it() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        let (top, watermark, last) = serve_two_post_pages(&server).await;
        let mut config = config(&server, &["askreddit"], &[]);
        config.max_pages_per_poll = 1;
        let source = source(config);
        let request = PollRequest { cursor: cursor_with("new:askreddit", at_watermark(watermark), None), since: None };

        let first = source.poll(&request).await.unwrap();
        assert_eq!(first.contributions.len(), 50);
        let paused = cursor(&first);
        let pass = PassState { top: Some(top), after: last, pages: 0, since: None };
        assert_eq!(paused.streams["new:askreddit"], StreamCursor { watermark: Some(watermark), pass: Some(pass) });
        assert_eq!(paused.next.as_deref(), Some("comments:askreddit"), "on to the next stream, the pass paused");

        // Next round: the posts stream resumes where it paused.
        let resumed = RedditCursor { next: None, ..paused };
        let second =
            source.poll(&PollRequest { cursor: Some(Cursor::from_json(&resumed)), since: None }).await.unwrap();
        assert_eq!(second.contributions.len(), 50);
        assert_eq!(cursor(&second).streams["new:askreddit"], at_watermark(top));
    }

    #[tokio::test]
    async fn the_first_pass_honours_since() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        serve_two_post_pages(&server).await;
        let source = source(config(&server, &["askreddit"], &[]));
        let all = children("subreddit_new");
        // Between the 70th and 71st post.
        let since = epoch(all[70]["data"]["created_utc"].as_f64().unwrap()).unwrap();

        let first = source.poll(&PollRequest { cursor: None, since: Some(since) }).await.unwrap();
        assert_eq!(first.contributions.len(), 50);
        assert_eq!(cursor(&first).streams["new:askreddit"].pass.as_ref().unwrap().since, Some(since));
        // The daemon need not repeat `since`: the cursor carries it.
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert!(second.contributions.iter().all(|c| c.created_at >= since));
        let expected: Vec<&str> = all[50..].iter().map(|i| i["data"]["name"].as_str().unwrap()).take(21).collect();
        let got: Vec<&str> = ids(&second).into_iter().take(21).collect();
        assert_eq!(got, expected);
        assert!(second.contributions.len() < 50, "older posts are left out");
        assert_eq!(cursor(&second).streams["new:askreddit"].pass, None);
    }

    #[tokio::test]
    async fn an_edit_changes_the_contribution() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        let original = children("subreddit_comments");
        let mut edited = original.clone();
        // As the recorded edit answer shows it: the new text, `edited` an epoch float.
        let recorded = &fixture("comment_edit_ratelimit").body["json"]["data"]["things"][0]["data"];
        assert!(recorded["edited"].is_f64());
        let item = item_mut(&mut edited, "t1_d4y8bdo");
        item["body"] = recorded["body"].clone();
        item["edited"] = 1467591000.0.into();
        Mock::given(method("GET"))
            .and(path("/r/askreddit/comments"))
            .respond_with(listing("subreddit_comments", original, None))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/r/askreddit/comments"))
            .respond_with(listing("subreddit_comments", edited, None))
            .mount(&server)
            .await;
        let source = source(config(&server, &["askreddit"], &[]));
        let request =
            PollRequest { cursor: cursor_with("x", at_watermark(0.0), Some("comments:askreddit")), since: None };
        let before = source.poll(&request).await.unwrap();
        let after = source.poll(&request).await.unwrap();
        let (old, new) = (find(&before, "t1_d4y8bdo"), find(&after, "t1_d4y8bdo"));
        assert!(!old.edited && old.updated_at.is_none());
        assert!(new.edited);
        assert_eq!(new.body, "New text");
        assert_eq!(new.updated_at, Some("2016-07-04T00:10:00Z".parse().unwrap()));
        assert_ne!(old.content_hash(), new.content_hash());
        assert_eq!(find(&before, "t1_d4y8bdp").content_hash(), find(&after, "t1_d4y8bdp").content_hash());
    }

    #[tokio::test]
    async fn deleted_and_removed_items_are_kept_and_marked() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        let mut comments = children("subreddit_comments");
        // The recorded deleted comment, as /api/info returned it.
        comments.insert(1, fixture("deleted_comment_info").body["data"]["children"][0].clone());
        item_mut(&mut comments, "t1_d4y8bdo")["body"] = "[removed]".into();
        let mut posts = children("subreddit_new");
        item_mut(&mut posts, "t3_48fbig")["selftext"] = "[removed]".into();
        serve(&server, "/r/askreddit/comments", listing("subreddit_comments", comments, None)).await;
        serve(&server, "/r/askreddit/new", listing("subreddit_new", posts, None)).await;
        let source = source(config(&server, &["askreddit"], &[]));
        let posts = source.poll(&PollRequest::default()).await.unwrap();
        let comments = source.poll(&PollRequest { cursor: posts.next_cursor.clone(), since: None }).await.unwrap();

        let gone = find(&comments, "t1_d7ltvl0");
        assert!(gone.deleted);
        assert_eq!(gone.body, "");
        assert_eq!(gone.author, Author::default(), "a deleted author is no contact");
        assert_eq!(gone.thread_id.as_deref(), Some("t3_52o2fl"));
        let removed = find(&comments, "t1_d4y8bdo");
        assert!(removed.deleted && removed.body.is_empty());
        assert_eq!(removed.author.handle.as_deref(), Some("Hankko"));
        let post = find(&posts, "t3_48fbig");
        assert!(post.deleted && post.body.is_empty() && post.title.is_some());
        let deleted = comments.contributions.iter().chain(&posts.contributions).filter(|c| c.deleted).count();
        assert_eq!(deleted, 3);
    }

    #[tokio::test]
    async fn an_exhausted_rate_limit_holds_the_next_request() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        // The recorded 2025 headers, with the budget spent and the window ending in 1 s.
        let mut spent = fixture("inbox_comment_replies_ratelimit");
        for (name, value) in spent.headers.iter_mut() {
            match name.as_str() {
                "x-ratelimit-remaining" => *value = "0.0".into(),
                "x-ratelimit-reset" => *value = "1".into(),
                _ => {}
            }
        }
        spent.body = fixture("subreddit_new").body;
        serve(&server, "/r/askreddit/new", spent.response()).await;
        serve(&server, "/r/askreddit/comments", fixture("subreddit_comments").response()).await;
        let source = source(config(&server, &["askreddit"], &[]));
        let first = source.poll(&PollRequest::default()).await.unwrap();
        let started = Instant::now();
        source.poll(&PollRequest { cursor: first.next_cursor, since: None }).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(900), "a request left before the reset");
    }

    #[tokio::test]
    async fn a_429_hands_back_rate_limited_and_sends_nothing_while_it_holds() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        let mut limited = fixture("announcements_ratelimit");
        limited.status = 429;
        for (name, value) in limited.headers.iter_mut() {
            match name.as_str() {
                "x-ratelimit-remaining" => *value = "0.0".into(),
                "x-ratelimit-used" => *value = "1000".into(),
                _ => {}
            }
        }
        limited.body = serde_json::json!({"message": "Too Many Requests", "error": 429});
        serve(&server, "/r/askreddit/new", limited.response()).await;
        let source = source(config(&server, &["askreddit"], &[]));
        for _ in 0..2 {
            let error = source.poll(&PollRequest::default()).await.unwrap_err();
            match &error {
                SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                    assert!(retry_after.as_secs() > 300, "{retry_after:?}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.iter().filter(|r| r.url.path() == "/r/askreddit/new").count(), 1);
    }

    #[tokio::test]
    async fn malformed_items_are_quarantined_and_the_page_goes_on() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        let mut comments = children("subreddit_comments");
        item_mut(&mut comments, "t1_d4y8bdp").as_object_mut().unwrap().remove("body");
        item_mut(&mut comments, "t1_d4y8bdo")["created_utc"] = "yesterday".into();
        comments[2]["kind"] = "more".into();
        item_mut(&mut comments, "t1_d4y8a9e")["score"] = "lots".into();
        serve(&server, "/r/askreddit/comments", listing("subreddit_comments", comments, None)).await;
        let source = source(config(&server, &["askreddit"], &[]));
        let request =
            PollRequest { cursor: cursor_with("x", StreamCursor::default(), Some("comments:askreddit")), since: None };
        let page = source.poll(&request).await.unwrap();
        assert_eq!(page.contributions.len(), 96);
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref().unwrap()).collect();
        assert_eq!(quarantined, ["t1_d4y8bdp", "t1_d4y8bdo", "t1_d4y8bdn", "t1_d4y8a9e"]);
        assert!(page.quarantined[0].reason.contains("body"), "{}", page.quarantined[0].reason);
        assert!(page.quarantined[2].reason.contains("more"), "{}", page.quarantined[2].reason);
        assert!(page.quarantined[0].raw.contains("preppypuppy"));
    }

    #[tokio::test]
    async fn a_body_that_is_not_a_listing_is_a_decode_error() {
        for (body, expect) in [
            (
                ResponseTemplate::new(200).set_body_string("<html>all our servers are busy</html>"),
                "did not answer JSON",
            ),
            (ResponseTemplate::new(200).set_body_json(serde_json::json!({"kind": "t5"})), "not a listing"),
            (
                ResponseTemplate::new(200).set_body_json(serde_json::json!({"kind": "Listing", "data": {}})),
                "data.children",
            ),
        ] {
            let server = MockServer::start().await;
            serve_token(&server).await;
            serve(&server, "/search", body).await;
            let error = source(config(&server, &[], &["tributary"])).poll(&PollRequest::default()).await.unwrap_err();
            assert!(
                matches!(&error, SourceError::Decode(message) if message.contains(expect) && message.contains("/search")),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn search_terms_use_the_site_search_sorted_new() {
        let server = MockServer::start().await;
        serve_token(&server).await;
        Mock::given(method("GET"))
            .and(path("/search"))
            .and(query_param("q", "tributary crm"))
            .and(query_param("sort", "new"))
            .and(query_param("type", "link"))
            .and(query_param("limit", "25"))
            .respond_with(fixture("subreddit_new").response())
            .expect(1)
            .mount(&server)
            .await;
        let mut config = config(&server, &[], &["tributary crm"]);
        config.limit = 25;
        let page = source(config).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 100);
        assert!(!page.has_more);
        assert!(cursor(&page).streams.contains_key("search:tributary crm"));
    }

    #[tokio::test]
    async fn a_refused_token_is_renewed_once_then_refusals_are_auth() {
        // The API refuses the first token: a new one is fetched and the call retried once.
        let server = MockServer::start().await;
        serve_token(&server).await;
        Mock::given(method("GET"))
            .and(path("/search"))
            .respond_with(
                ResponseTemplate::new(401).set_body_json(serde_json::json!({"message": "Unauthorized", "error": 401})),
            )
            .up_to_n_times(1)
            .mount(&server)
            .await;
        serve(&server, "/search", fixture("subreddit_new").response()).await;
        let renewed = source(config(&server, &[], &["rust"]));
        let page = renewed.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 100);
        assert_eq!(token_requests(&server.received_requests().await.unwrap()), 2);

        // Refused again after the renewal, or refused outright (403): Auth, and no loop.
        for status in [401, 403] {
            let server = MockServer::start().await;
            serve_token(&server).await;
            let body = serde_json::json!({"message": "Forbidden", "error": status});
            Mock::given(method("GET"))
                .and(path("/search"))
                .respond_with(ResponseTemplate::new(status).set_body_json(body))
                .mount(&server)
                .await;
            let source = source(config(&server, &[], &["rust"]));
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                assert!(matches!(&error, SourceError::Auth(_)), "{status}: {error:?}");
                assert!(!error.to_string().contains(TOKEN) && !error.to_string().contains(SECRET), "{error}");
            }
            let requests = server.received_requests().await.unwrap();
            let api = requests.iter().filter(|r| r.url.path() == "/search").count();
            assert_eq!(api, if status == 401 { 4 } else { 2 }, "{status}: one retry per call at most");
        }

        // The token endpoint refuses the credentials.
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/api/v1/access_token"))
            .respond_with(
                ResponseTemplate::new(401).set_body_json(serde_json::json!({"message": "Unauthorized", "error": 401})),
            )
            .mount(&server)
            .await;
        let source = source(config(&server, &[], &["rust"]));
        let error = source.check().await.unwrap_err();
        assert!(matches!(&error, SourceError::Auth(m) if m.contains("access_token")), "{error:?}");
        assert!(!error.to_string().contains(SECRET));
        assert!(!format!("{source:?}").contains(SECRET), "the secret leaked into Debug");
    }

    #[tokio::test]
    async fn a_token_answer_without_a_token_is_auth_and_never_echoed() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/api/v1/access_token"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(serde_json::json!({"error": "unsupported_grant_type"})),
            )
            .mount(&server)
            .await;
        let error = source(config(&server, &[], &["rust"])).check().await.unwrap_err();
        assert!(matches!(&error, SourceError::Auth(m) if m.contains("unsupported_grant_type")), "{error:?}");

        // A token is cached: the Debug output never shows it.
        let server = MockServer::start().await;
        serve_token(&server).await;
        serve(&server, "/search", fixture("subreddit_new").response()).await;
        let source = source(config(&server, &[], &["rust"]));
        source.check().await.unwrap();
        assert!(!format!("{source:?}").contains(TOKEN), "the token leaked into Debug");
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: RedditConfig = serde_json::from_value(serde_json::json!({
            "client_id": "id",
            "client_secret": {"env": "REDDIT_SECRET"},
            "user_agent": "linux:com.example:v1 (by /u/x)",
            "subreddits": ["rust"]
        }))
        .unwrap();
        assert_eq!(config.base_url.as_str(), "https://oauth.reddit.com/");
        assert_eq!(config.auth_url.as_str(), "https://www.reddit.com/api/v1/access_token");
        assert_eq!((config.max_pages_per_poll, config.limit), (10, 100));
        assert!(config.search_terms.is_empty());
        assert_eq!(config.client_secret, SecretRef::Env("REDDIT_SECRET".into()));
        for unknown in [serde_json::json!({"schedule": "*/5 * * * *"}), serde_json::json!({"token": "x"})] {
            let mut value = serde_json::json!({
                "client_id": "id", "client_secret": {"env": "S"}, "user_agent": "ua", "subreddits": ["rust"]
            });
            value.as_object_mut().unwrap().extend(unknown.as_object().unwrap().clone());
            assert!(serde_json::from_value::<RedditConfig>(value).is_err());
        }
        let no_agent = serde_json::from_value::<RedditConfig>(serde_json::json!({
            "client_id": "id", "client_secret": {"env": "S"}, "subreddits": ["rust"]
        }));
        assert!(no_agent.is_err(), "user_agent is required");

        let build = |config: RedditConfig| RedditSource::new("r", config, HttpOptions::default()).unwrap_err();
        let secret = SecretRef::File(secret_file());
        let base = RedditConfig { client_secret: secret.clone(), ..config.clone() };
        assert!(matches!(build(RedditConfig { user_agent: " ".into(), ..base.clone() }), BuildError::MissingUserAgent));
        assert!(matches!(build(RedditConfig { subreddits: vec![], ..base.clone() }), BuildError::NothingToPoll));
        assert!(matches!(
            build(RedditConfig { subreddits: vec!["r/no such".into()], ..base.clone() }),
            BuildError::InvalidSubreddit(_)
        ));
        assert!(matches!(build(RedditConfig { limit: 101, ..base.clone() }), BuildError::InvalidLimit(101)));
        assert!(matches!(build(RedditConfig { client_id: "a:b".into(), ..base.clone() }), BuildError::InvalidClientId));
        assert!(matches!(build(config.clone()), BuildError::Secret(_)), "the secret is resolved in new");
        let ok = RedditSource::new(
            "r",
            RedditConfig { subreddits: vec!["/r/Rust/".into()], ..base },
            HttpOptions::default(),
        )
        .unwrap();
        assert_eq!(ok.streams, [Stream::New("Rust".into()), Stream::Comments("Rust".into())]);
        if let SecretRef::File(file) = secret {
            std::fs::remove_file(file).unwrap();
        }
    }
}
