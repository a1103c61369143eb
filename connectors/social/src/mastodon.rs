//! Mastodon: the company account's mentions (watch mode) and public hashtag
//! timelines (listen mode) of one instance.
//!
//! Every configured feed is a *stream*: `mentions` reads
//! `GET /api/v1/notifications?types[]=mention`, and each hashtag reads
//! `GET /api/v1/timelines/tag/{hashtag}`. Both list their items newest first
//! and take the same paging parameters (Mastodon documentation,
//! `methods/timelines` and `methods/notifications`):
//!
//! - `min_id` "returns results immediately newer than this ID; in effect,
//!   sets a cursor at this ID and paginates forward". Each stream keeps a
//!   watermark (the newest id committed) and asks for `min_id=<watermark>`:
//!   a page holds exactly the items right after the watermark, so moving the
//!   watermark to the top of that page never skips anything.
//! - `max_id` returns results older than the id; the first poll pages back
//!   with it from the newest page down to [`PollRequest::since`].
//! - `limit` is at most 40 for timelines (notifications take 80, but one
//!   setting serves both, so 40 is the cap here).
//! - The answer's `Link` header names `rel="next"` (`max_id` = the last,
//!   oldest item) and `rel="prev"` (`min_id` = the first, newest item); an
//!   empty page has none. Mastodon warns that the boundary may lie outside
//!   the returned items when some were filtered out, so the link's id is
//!   preferred over the items' ids, but only when the link points at the
//!   instance itself (same scheme, host and port): a link elsewhere is
//!   ignored and the items' own ids are used. The connector builds the next
//!   request itself from that id, so no foreign parameter rides along.
//! - Ids are strings ("cast from an integer but not guaranteed to be a
//!   number"): they compare as numbers when they parse, else by length, then
//!   text. Notifications page by the notification id; the contribution's id
//!   is the status id.
//!
//! One call to [`Source::poll`] fetches one page of one stream; the cursor
//! remembers which streams this poll still has to visit and how far each
//! got. Per stream and poll, at most [`MastodonConfig::max_pages_per_poll`]
//! pages go forward (the rest is fetched by the next poll, from the
//! committed watermark) and as many go back in a first-poll backfill (which
//! is paused there and resumed by the next poll). The very first page of a
//! stream without `since` is the newest page only.
//!
//! Edits: `edited_at` (Mastodon 3.5+) marks an edited status; such an item
//! has `edited = true` and `updated_at = edited_at`. A status already
//! committed is not fetched again (no REST timeline lists "changed since"),
//! so only edits made before a status is first fetched are seen. Deletions:
//! the REST timelines carry no deletion marker; a deleted status simply
//! disappears (and its mention notification with it). Only the streaming
//! API announces them (`delete` events), which this polling connector does
//! not use, so `deleted` is always false.
//!
//! Rate limits (`api/rate-limits` and `config/initializers/rack_attack.rb`):
//! 300 requests per 5 minutes per token (or per IP without one), plus 300
//! paging requests (`min_id`/`max_id`) per 15 minutes. Every answer carries
//! `X-RateLimit-Limit`, `-Remaining` and `-Reset`, where Reset is an ISO 8601
//! timestamp that the shared HTTP client cannot read. So this connector
//! keeps its own gate: when Remaining reaches 0 it holds every request until
//! Reset and answers [`HttpError::RateLimited`] meanwhile. A 429 (Mastodon
//! sends no Retry-After) comes back from the shared client after its own
//! retries; its headers are not visible then, so the wait is the latest
//! Reset seen, at least a minute.

use std::{cmp::Ordering, collections::BTreeMap, sync::Mutex, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, SecretError, SecretRef, Source, SourceError,
    http::safe_target,
    source::check_status,
    text::{html_to_text, tidy},
};
use url::Url;

const PLATFORM: &str = "mastodon";

/// The largest page the timelines serve.
const MAX_LIMIT: u32 = 40;

/// The least wait after a 429 whose reset time is unknown: Mastodon's
/// windows are 5 and 15 minutes long.
const MIN_WAIT_AFTER_429: Duration = Duration::from_secs(60);

/// The longest a reset header may hold the gate: a day.
const MAX_GATE: Duration = Duration::from_secs(86_400);

/// Settings of one Mastodon instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MastodonConfig {
    /// The instance the company account lives on, e.g.
    /// `https://mastodon.social`.
    pub base_url: Url,
    /// OAuth2 bearer token of the company's account (`{ env = "..." }` or
    /// `{ file = "..." }`), with `read:notifications` (mentions) and
    /// `read:statuses` (hashtags on instances that disabled public preview).
    /// Needed for mentions; public hashtag timelines work without it.
    #[serde(default)]
    pub token: Option<SecretRef>,
    /// Hashtags to follow, without `#` (e.g. `["acme", "acmecloud"]`); the
    /// instance's public timeline of each, local and federated statuses.
    #[serde(default)]
    pub hashtags: Vec<String>,
    /// Watch the account's mention notifications. Defaults to true when a
    /// `token` is set; true without a token is refused.
    #[serde(default)]
    pub mentions: Option<bool>,
    /// Most pages one poll fetches per stream in each direction: forward
    /// from the watermark (what is left comes with the next poll) and back
    /// towards `since` on a first poll (paused there, resumed next poll).
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
    /// Items per page, 1 to 40.
    #[serde(default = "default_limit")]
    pub limit: u32,
}

fn default_max_pages_per_poll() -> u32 {
    10
}

fn default_limit() -> u32 {
    MAX_LIMIT
}

/// Why a [`MastodonSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("mastodon `token`: {0}")]
    Secret(#[from] SecretError),
    #[error("mastodon `token` holds characters that are not allowed in an HTTP header")]
    InvalidToken,
    #[error("mastodon `base_url` must be an http(s) URL with a host, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("mastodon `mentions` needs a `token` (of the account whose mentions to read)")]
    MentionsNeedToken,
    #[error("mastodon: nothing to watch (set `hashtags`, or a `token` for mentions)")]
    NothingToWatch,
    #[error("mastodon `hashtags`: `{0}` is not a hashtag name")]
    InvalidHashtag(String),
    #[error("mastodon `limit` must be between 1 and {MAX_LIMIT}, not {0}")]
    InvalidLimit(u32),
    #[error("mastodon HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// One feed of the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stream {
    Mentions,
    /// A hashtag, lower-cased, without `#`.
    Tag(String),
}

impl Stream {
    /// The stream's name in the cursor.
    fn key(&self) -> String {
        match self {
            Stream::Mentions => "mentions".to_owned(),
            Stream::Tag(tag) => format!("tag:{tag}"),
        }
    }
}

/// A Mastodon instance, polled for mentions and hashtags.
#[derive(Debug)]
pub struct MastodonSource {
    instance: String,
    /// Host (and port) of the instance: the scope of its account ids and the
    /// domain of its local accounts' handles.
    host: String,
    config: MastodonConfig,
    streams: Vec<Stream>,
    http: HttpClient,
    /// `Bearer <token>`, marked sensitive so Debug never shows it.
    authorization: Option<HeaderValue>,
    rate: Mutex<RateState>,
}

/// What the instance said about our request budget.
#[derive(Debug, Default)]
struct RateState {
    /// No request leaves before this time.
    closed_until: Option<DateTime<Utc>>,
    /// The latest `X-RateLimit-Reset` seen.
    last_reset: Option<DateTime<Utc>>,
}

/// What the cursor of a Mastodon source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct MastodonCursor {
    /// Progress of each stream, by [`Stream::key`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    streams: BTreeMap<String, StreamCursor>,
    /// The poll in progress (between calls that returned `has_more`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<RunState>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StreamCursor {
    /// The newest id committed; the next page starts right after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark: Option<String>,
    /// A first-poll backfill towards `since`, not finished yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backfill: Option<Backfill>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Backfill {
    /// The `max_id` of the next page back (exclusive).
    max_id: String,
    /// Items created before this are dropped and end the backfill.
    since: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RunState {
    /// Streams this poll still visits, the current one first.
    pending: Vec<String>,
    /// Pages the current stream fetched in its current direction.
    #[serde(default)]
    pages: u32,
    /// The current stream is done going forward and now pages back.
    #[serde(default)]
    backfilling: bool,
    /// `since` of the request that started this poll (the daemon may not
    /// repeat it), for streams that have no watermark yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
}

/// Which page of a stream to fetch.
#[derive(Debug, Clone)]
enum Step {
    /// The newest page (a stream's first).
    Newest,
    /// The page right after this watermark.
    Forward(String),
    /// The page before the backfill's `max_id`.
    Back(Backfill),
}

/// One page as the instance sent it.
#[derive(Debug, Default)]
struct Fetched {
    items: Vec<Value>,
    /// `min_id` of the `rel="prev"` link (the newest item), on the instance.
    prev_min_id: Option<String>,
    /// `max_id` of the `rel="next"` link (the oldest item), on the instance.
    next_max_id: Option<String>,
}

/// An item that cannot become a contribution: its id (if any) and why.
type Rejected = (Option<String>, String);

impl MastodonSource {
    pub fn new(instance: &str, config: MastodonConfig, http: HttpOptions) -> Result<MastodonSource, BuildError> {
        let base = &config.base_url;
        let has_host = base.host_str().is_some_and(|host| !host.is_empty());
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() || !has_host {
            return Err(BuildError::InvalidBaseUrl(base.to_string()));
        }
        if config.limit == 0 || config.limit > MAX_LIMIT {
            return Err(BuildError::InvalidLimit(config.limit));
        }
        let authorization = match &config.token {
            Some(secret) => {
                let secret = secret.resolve()?;
                let mut value = HeaderValue::from_str(&format!("Bearer {}", secret.expose_secret()))
                    .map_err(|_| BuildError::InvalidToken)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let mentions = config.mentions.unwrap_or(authorization.is_some());
        if mentions && authorization.is_none() {
            return Err(BuildError::MentionsNeedToken);
        }
        let mut streams = Vec::new();
        if mentions {
            streams.push(Stream::Mentions);
        }
        for hashtag in &config.hashtags {
            let name = hashtag.trim();
            let name = name.strip_prefix('#').unwrap_or(name);
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || matches!(c, '#' | '/' | '?')) {
                return Err(BuildError::InvalidHashtag(hashtag.clone()));
            }
            let stream = Stream::Tag(name.to_lowercase());
            if !streams.contains(&stream) {
                streams.push(stream);
            }
        }
        if streams.is_empty() {
            return Err(BuildError::NothingToWatch);
        }
        let mut host = base.host_str().unwrap_or_default().to_owned();
        if let Some(port) = base.port() {
            host.push_str(&format!(":{port}"));
        }
        Ok(MastodonSource {
            instance: instance.to_owned(),
            host,
            http: HttpClient::new(http)?,
            config,
            streams,
            authorization,
            rate: Mutex::new(RateState::default()),
        })
    }

    /// The URL of a stream's first page, without paging parameters.
    fn endpoint(&self, stream: &Stream) -> Url {
        let mut url = self.config.base_url.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            match stream {
                Stream::Mentions => path.extend(["api", "v1", "notifications"]),
                Stream::Tag(tag) => path.extend(["api", "v1", "timelines", "tag", tag.as_str()]),
            };
        }
        url
    }

    /// Fetches one page of a stream.
    async fn fetch(&self, stream: &Stream, step: &Step, limit: u32) -> Result<Fetched, SourceError> {
        let mut url = self.endpoint(stream);
        {
            let mut query = url.query_pairs_mut();
            if *stream == Stream::Mentions {
                // Mastodon 3.5+; older servers ignore it (other types are skipped).
                query.append_pair("types[]", "mention");
            }
            match step {
                Step::Newest => {}
                Step::Forward(watermark) => {
                    query.append_pair("min_id", watermark);
                }
                Step::Back(backfill) => {
                    query.append_pair("max_id", &backfill.max_id);
                }
            }
            query.append_pair("limit", &limit.to_string());
        }
        let response = self.get(url).await?;
        // Older servers answer 404 `{"error": "Record not found"}` for a
        // hashtag nobody used yet (newer ones an empty list).
        if response.status.as_u16() == 404 && matches!(stream, Stream::Tag(_)) && is_mastodon_error(&response.body) {
            tracing::debug!(source = %self.instance, stream = %stream.key(), "hashtag unknown to the instance: no statuses yet");
            return Ok(Fetched::default());
        }
        check_status(&response)?;
        let body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
        let Value::Array(items) = body else {
            return Err(SourceError::Decode(format!("{} answered JSON that is not a list", response.target)));
        };
        let links: Vec<(String, String)> = response
            .headers
            .get_all("link")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(parse_link_header)
            .collect();
        Ok(Fetched {
            items,
            prev_min_id: self.own_link_param(&links, "prev", "min_id"),
            next_max_id: self.own_link_param(&links, "next", "max_id"),
        })
    }

    /// Sends a GET through the gate, with the token if there is one.
    async fn get(&self, url: Url) -> Result<HttpResponse, SourceError> {
        if let Some(retry_after) = self.gate_wait() {
            tracing::debug!(source = %self.instance, retry_after_s = retry_after.as_secs(), "mastodon budget spent; no request sent");
            return Err(HttpError::RateLimited { target: safe_target(&url), retry_after, body: String::new() }.into());
        }
        let mut request = self.http.get(url);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        match self.http.send(request).await {
            Ok(response) => {
                self.note_rate_limit(&response);
                Ok(response)
            }
            Err(HttpError::RateLimited { target, retry_after, body }) => {
                let retry_after = self.close_gate_after_429(retry_after);
                tracing::warn!(source = %self.instance, %target, retry_after_s = retry_after.as_secs(), "mastodon is rate limiting us");
                Err(HttpError::RateLimited { target, retry_after, body }.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    fn lock_rate(&self) -> std::sync::MutexGuard<'_, RateState> {
        self.rate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long the gate stays closed, if it is.
    fn gate_wait(&self) -> Option<Duration> {
        let mut rate = self.lock_rate();
        let wait = rate.closed_until.and_then(|until| (until - Utc::now()).to_std().ok()).filter(|w| !w.is_zero());
        if wait.is_none() {
            rate.closed_until = None;
        }
        wait
    }

    /// Reads `X-RateLimit-Remaining` and the ISO 8601 `X-RateLimit-Reset`:
    /// a spent budget closes the gate until the reset.
    fn note_rate_limit(&self, response: &HttpResponse) {
        let now = Utc::now();
        let reset = response
            .header("x-ratelimit-reset")
            .and_then(|value| DateTime::parse_from_rfc3339(value.trim()).ok())
            .map(|reset| reset.with_timezone(&Utc).min(now + MAX_GATE));
        let remaining = response
            .header("x-ratelimit-remaining")
            .and_then(|value| value.trim().parse::<f64>().ok())
            .filter(|value| value.is_finite());
        let mut rate = self.lock_rate();
        if reset.is_some() {
            rate.last_reset = reset;
        }
        if remaining.is_some_and(|remaining| remaining < 1.0) {
            let until = reset.filter(|reset| *reset > now).unwrap_or(now + MIN_WAIT_AFTER_429);
            tracing::info!(source = %self.instance, until = %until, "mastodon request budget spent; holding requests until its reset");
            rate.closed_until = Some(rate.closed_until.map_or(until, |current| current.max(until)));
        }
    }

    /// After a 429: the latest reset seen, the client's wait or a minute,
    /// whichever is longest. Returns that wait.
    fn close_gate_after_429(&self, client_wait: Duration) -> Duration {
        let now = Utc::now();
        let mut rate = self.lock_rate();
        let until_reset = rate.last_reset.and_then(|reset| (reset - now).to_std().ok()).unwrap_or_default();
        let wait = client_wait.max(until_reset).max(MIN_WAIT_AFTER_429).min(MAX_GATE);
        let until = now + wait;
        rate.closed_until = Some(rate.closed_until.map_or(until, |current| current.max(until)));
        wait
    }

    /// The `name` parameter of the `rel` link, when the link points at the
    /// instance itself.
    fn own_link_param(&self, links: &[(String, String)], rel: &str, name: &str) -> Option<String> {
        let (_, target) = links.iter().find(|(link_rel, _)| link_rel == rel)?;
        let url = self.config.base_url.join(target).ok()?;
        let base = &self.config.base_url;
        let same_origin = url.scheme() == base.scheme()
            && url.host_str() == base.host_str()
            && url.port_or_known_default() == base.port_or_known_default();
        if !same_origin {
            tracing::debug!(source = %self.instance, rel, link_host = url.host_str().unwrap_or("?"), "ignoring a Link to another host");
            return None;
        }
        url.query_pairs().find(|(key, _)| key == name).map(|(_, value)| value.into_owned()).filter(|v| !v.is_empty())
    }

    /// An item of a stream: a contribution, `None` for what is not one (a
    /// boost, a notification of another type), or why it cannot be read.
    fn map_item(&self, stream: &Stream, item: &Value) -> Result<Option<Contribution>, Rejected> {
        match stream {
            Stream::Mentions => {
                let status = item.get("status").filter(|status| !status.is_null());
                let status_id = status.and_then(|status| status.get("id")).and_then(id_string);
                let notification = serde_json::from_value::<RawNotification>(item.clone())
                    .map_err(|error| (status_id.clone(), format!("cannot read the notification: {error}")))?;
                if notification.kind != "mention" {
                    return Ok(None);
                }
                let Some(status) = status else {
                    let reason = format!("mention notification {} carries no status", notification.id.into_string());
                    return Err((None, reason));
                };
                self.map_status(status, Some(Kind::Mention)).map(Some)
            }
            Stream::Tag(_) => {
                if item.get("reblog").is_some_and(|reblog| !reblog.is_null()) {
                    return Ok(None);
                }
                self.map_status(item, None).map(Some)
            }
        }
    }

    fn map_status(&self, value: &Value, kind: Option<Kind>) -> Result<Contribution, Rejected> {
        let value_id = value.get("id").and_then(id_string);
        let status = serde_json::from_value::<RawStatus>(value.clone())
            .map_err(|error| (value_id.clone(), format!("cannot read the status: {error}")))?;
        let id = status.id.into_string();
        if id.is_empty() {
            return Err((None, "the status has an empty id".to_owned()));
        }
        let account_id = status.account.id.into_string();
        if account_id.is_empty() {
            return Err((Some(id), "the status's account has an empty id".to_owned()));
        }
        let non_empty = |text: Option<String>| text.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        // `acct` is `user` for local accounts and `user@domain` for remote ones.
        let handle = non_empty(status.account.acct)
            .or(non_empty(status.account.username))
            .map(|acct| acct.trim_start_matches('@').to_owned())
            .map(|acct| if acct.contains('@') { acct } else { format!("{acct}@{}", self.host) });
        let parent_id = status.in_reply_to_id.map(RawId::into_string).filter(|id| !id.is_empty());
        let kind = kind.unwrap_or(if parent_id.is_some() { Kind::Reply } else { Kind::Post });
        // Mastodon has no conversation id in its statuses; Pleroma and
        // Akkoma put one under `pleroma`.
        let conversation = status
            .conversation_id
            .map(RawId::into_string)
            .or_else(|| status.pleroma.as_ref().and_then(|p| p.get("conversation_id")).and_then(id_string))
            .filter(|id| !id.is_empty());
        let tags = status
            .tags
            .iter()
            .filter_map(|tag| match tag {
                Value::Object(fields) => fields.get("name").and_then(Value::as_str).map(str::to_owned),
                Value::String(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: id.clone(),
            url: non_empty(status.url).or(non_empty(status.uri)),
            kind,
            author: Author {
                id: format!("{}/{account_id}", self.host),
                handle,
                display_name: non_empty(status.account.display_name),
                email: None,
                profile_url: non_empty(status.account.url),
                links: Vec::new(),
            },
            title: status.spoiler_text.map(|text| tidy(&text)).filter(|text| !text.is_empty()),
            body: html_to_text(status.content.as_deref().unwrap_or_default()),
            language: None,
            created_at: status.created_at,
            updated_at: status.edited_at,
            parent_id,
            thread_id: Some(conversation.unwrap_or(id)),
            tags,
            score: status.favourites_count,
            edited: status.edited_at.is_some(),
            deleted: false,
            signals: None,
        })
    }

    fn decode_cursor(&self, cursor: Option<&Cursor>) -> MastodonCursor {
        tributary_sdk::source::decode_cursor(cursor).unwrap_or_default()
    }
}

/// The fields of a notification this connector reads.
#[derive(Debug, Deserialize)]
struct RawNotification {
    id: RawId,
    #[serde(rename = "type")]
    kind: String,
}

/// The fields of a status this connector reads.
#[derive(Debug, Deserialize)]
struct RawStatus {
    id: RawId,
    created_at: DateTime<Utc>,
    account: RawAccount,
    #[serde(default)]
    in_reply_to_id: Option<RawId>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    spoiler_text: Option<String>,
    #[serde(default)]
    edited_at: Option<DateTime<Utc>>,
    #[serde(default)]
    favourites_count: Option<f64>,
    #[serde(default)]
    tags: Vec<Value>,
    #[serde(default)]
    conversation_id: Option<RawId>,
    #[serde(default)]
    pleroma: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RawAccount {
    id: RawId,
    #[serde(default)]
    acct: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

/// Mastodon's ids are strings; other servers may send numbers.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawId {
    Text(String),
    Number(u64),
}

impl RawId {
    fn into_string(self) -> String {
        match self {
            RawId::Text(text) => text.trim().to_owned(),
            RawId::Number(number) => number.to_string(),
        }
    }
}

/// An id given as a string or a number.
fn id_string(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        Value::Number(number) => number.as_u64().map(|n| n.to_string()),
        _ => None,
    }
}

/// Orders ids: as numbers when both parse, else by length, then text.
fn cmp_ids(a: &str, b: &str) -> Ordering {
    match (a.parse::<u128>(), b.parse::<u128>()) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
    }
}

fn newest_id<'a>(ids: impl IntoIterator<Item = &'a String>) -> Option<String> {
    ids.into_iter().max_by(|a, b| cmp_ids(a, b)).cloned()
}

fn oldest_id<'a>(ids: impl IntoIterator<Item = &'a String>) -> Option<String> {
    ids.into_iter().min_by(|a, b| cmp_ids(a, b)).cloned()
}

/// `(rel, target)` pairs of a `Link` header
/// (`<url>; rel="next", <url>; rel="prev"`).
fn parse_link_header(value: &str) -> Vec<(String, String)> {
    let mut links = Vec::new();
    let mut rest = value;
    while let Some((_, after)) = rest.split_once('<') {
        let Some((target, tail)) = after.split_once('>') else { break };
        let end = tail.find('<').unwrap_or(tail.len());
        let Some((params, next)) = tail.split_at_checked(end) else { break };
        for param in params.split([';', ',']) {
            let Some(rels) = param.trim().strip_prefix("rel=") else { continue };
            for rel in rels.trim_matches('"').split_whitespace() {
                links.push((rel.to_ascii_lowercase(), target.trim().to_owned()));
            }
        }
        rest = next;
    }
    links
}

/// Whether a body is Mastodon's error shape, `{"error": "..."}`.
fn is_mastodon_error(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|body| body.get("error").is_some_and(Value::is_string))
}

#[async_trait]
impl Source for MastodonSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor = self.decode_cursor(request.cursor.as_ref());
        let keys: Vec<String> = self.streams.iter().map(Stream::key).collect();
        // A stream no longer configured is forgotten.
        cursor.streams.retain(|key, _| keys.contains(key));
        let mut run = cursor.run.take().unwrap_or_else(|| RunState {
            pending: keys.clone(),
            pages: 0,
            backfilling: false,
            since: request.since,
        });
        run.pending.retain(|key| keys.contains(key));
        let Some(stream) = run.pending.first().and_then(|key| self.streams.iter().find(|s| s.key() == *key)).cloned()
        else {
            let next_cursor = (cursor != MastodonCursor::default()).then(|| Cursor::from_json(&cursor));
            return Ok(Page { next_cursor, ..Page::default() });
        };
        let key = stream.key();
        let mut state = cursor.streams.get(&key).cloned().unwrap_or_default();
        let step = match (&state.watermark, &state.backfill) {
            (None, _) => Step::Newest,
            (Some(_), Some(backfill)) if run.backfilling => Step::Back(backfill.clone()),
            (Some(watermark), _) => Step::Forward(watermark.clone()),
        };
        let since = match &step {
            Step::Newest => run.since,
            Step::Forward(_) => None,
            Step::Back(backfill) => Some(backfill.since),
        };

        let fetched = self.fetch(&stream, &step, self.config.limit).await?;
        let count = fetched.items.len();
        let full = count >= self.config.limit as usize;
        let mut page = Page::default();
        let mut ids = Vec::with_capacity(count);
        let mut passed_since = false;
        for item in &fetched.items {
            if let Some(id) = item.get("id").and_then(id_string) {
                ids.push(id);
            }
            match self.map_item(&stream, item) {
                Ok(Some(contribution)) if since.is_some_and(|since| contribution.created_at < since) => {
                    passed_since = true;
                }
                Ok(Some(contribution)) => page.contributions.push(contribution),
                Ok(None) => {}
                Err((external_id, reason)) => {
                    let raw = serde_json::to_string(item).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(external_id, reason, &raw));
                }
            }
        }
        let top = fetched.prev_min_id.or_else(|| newest_id(&ids));
        let bottom = fetched.next_max_id.or_else(|| oldest_id(&ids));

        run.pages += 1;
        let budget_left = run.pages < self.config.max_pages_per_poll.max(1);
        let stay = match &step {
            Step::Newest => {
                state.watermark = top.clone();
                match (since, bottom) {
                    (Some(since), Some(bottom)) if full && !passed_since && top.is_some() => {
                        state.backfill = Some(Backfill { max_id: bottom, since });
                        // The way back has its own page budget.
                        run.backfilling = true;
                        run.pages = 0;
                        true
                    }
                    _ => false,
                }
            }
            Step::Forward(watermark) => {
                if let Some(top) = top {
                    state.watermark = newest_id([watermark, &top]);
                }
                if full && budget_left {
                    true
                } else if state.backfill.is_some() {
                    run.backfilling = true;
                    run.pages = 0;
                    true
                } else {
                    false
                }
            }
            Step::Back(backfill) => {
                // A server that ignores `max_id` would have us loop: stop instead.
                let older = bottom.filter(|bottom| cmp_ids(bottom, &backfill.max_id) == Ordering::Less);
                match older {
                    Some(bottom) if full && !passed_since => {
                        state.backfill = Some(Backfill { max_id: bottom, since: backfill.since });
                        if !budget_left {
                            tracing::info!(source = %self.instance, stream = %key, "mastodon backfill paused at max_pages_per_poll; the next poll resumes it");
                        }
                        budget_left
                    }
                    _ => {
                        state.backfill = None;
                        false
                    }
                }
            }
        };
        tracing::debug!(
            source = %self.instance, stream = %key, step = ?step, fetched = count,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            watermark = state.watermark.as_deref().unwrap_or(""), "mastodon page polled"
        );
        if state == StreamCursor::default() {
            cursor.streams.remove(&key);
        } else {
            cursor.streams.insert(key.clone(), state);
        }
        if !stay {
            run.pending.retain(|pending| *pending != key);
            run.pages = 0;
            run.backfilling = false;
        }
        page.has_more = !run.pending.is_empty();
        cursor.run = page.has_more.then_some(run);
        // Nothing seen yet: keep no cursor, so the next poll still honours `since`.
        page.next_cursor = (cursor != MastodonCursor::default()).then(|| Cursor::from_json(&cursor));
        Ok(page)
    }

    /// Fetches one item of the first stream (mentions when watched): the
    /// request every poll makes, so it needs no other token scope.
    async fn check(&self) -> Result<(), SourceError> {
        match self.streams.first() {
            Some(stream) => self.fetch(stream, &Step::Newest, 1).await.map(|_| ()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use chrono::SecondsFormat;
    use serde_json::json;
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{header, method, path, query_param, query_param_is_missing},
    };

    use super::*;

    const TOKEN: &str = "t0ken-0f-the-c0mpany";
    const TAG_PATH: &str = "/api/v1/timelines/tag/hoot";
    const MENTIONS_PATH: &str = "/api/v1/notifications";
    /// Ids of the recorded items.
    const STATUS: &str = "117020593741189701";
    const MENTION_STATUS: &str = "117020577157693549";
    const NOTIFICATION: &str = "21";

    fn options() -> HttpOptions {
        HttpOptions {
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(2),
            ..HttpOptions::default()
        }
    }

    /// A token file, removed once the source is built (it is resolved in `new`).
    fn token_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tributary-mastodon-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
        file
    }

    fn config(server: &MockServer, extra: Value) -> MastodonConfig {
        let mut config = json!({ "base_url": server.uri(), "hashtags": ["hoot"] });
        if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
            config.extend(extra);
        }
        serde_json::from_value(config).unwrap()
    }

    fn source(server: &MockServer, extra: Value) -> MastodonSource {
        MastodonSource::new("fediverse", config(server, extra), options()).unwrap()
    }

    /// A source with a token (so mentions too) and the hashtag.
    fn keyed_source(server: &MockServer, name: &str, extra: Value) -> MastodonSource {
        let file = token_file(name);
        let mut extra = extra;
        extra["token"] = json!({ "file": file });
        let source = source(server, extra);
        std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
        source
    }

    fn timeline() -> Fixture {
        Fixture::load("mastodon", "hashtag_timeline")
    }

    fn mentions() -> Fixture {
        Fixture::load("mastodon", "notifications_mentions")
    }

    /// The recorded hashtag status with another id and creation time.
    fn status(id: u64, created_at: &str) -> Value {
        let mut status = timeline().body[0].clone();
        status["id"] = id.to_string().into();
        status["url"] = format!("http://localhost:3000/@mastodonpy_test_2/{id}").into();
        status["uri"] = format!("http://localhost:3000/ap/users/117020566092212359/statuses/{id}").into();
        status["created_at"] = created_at.into();
        status
    }

    /// A recorded response with its body and Link header replaced (and the
    /// headers given set), as the instance would send other pages.
    fn replay(mut fixture: Fixture, body: Value, link: Option<String>, headers: &[(&str, String)]) -> ResponseTemplate {
        fixture.body = body;
        fixture.headers.retain(|(name, _)| name != "link" && !headers.iter().any(|(h, _)| h == name));
        fixture.headers.extend(link.map(|link| ("link".to_owned(), link)));
        fixture.headers.extend(headers.iter().map(|(name, value)| (name.to_string(), value.clone())));
        fixture.response()
    }

    /// The recorded Link header's shape, pointing at `base`.
    fn link(base: &str, path: &str, max_id: &str, min_id: &str) -> Option<String> {
        Some(format!("<{base}{path}?max_id={max_id}>; rel=\"next\", <{base}{path}?min_id={min_id}>; rel=\"prev\""))
    }

    fn reset_in(seconds: i64) -> String {
        (Utc::now() + chrono::Duration::seconds(seconds)).to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    fn host(server: &MockServer) -> String {
        server.uri().trim_start_matches("http://").to_owned()
    }

    fn cursor(page: &Page) -> MastodonCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn watermarks(entries: &[(&str, &str)]) -> MastodonCursor {
        let streams = entries
            .iter()
            .map(|(key, watermark)| {
                (key.to_string(), StreamCursor { watermark: Some(watermark.to_string()), backfill: None })
            })
            .collect();
        MastodonCursor { streams, run: None }
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    fn find<'a>(page: &'a Page, id: &str) -> &'a Contribution {
        page.contributions.iter().find(|c| c.external_id == id).unwrap()
    }

    async fn requests(server: &MockServer) -> usize {
        server.received_requests().await.unwrap().len()
    }

    fn rate_limited(result: Result<Page, SourceError>) -> Duration {
        match result {
            Err(SourceError::Http(HttpError::RateLimited { retry_after, .. })) => retry_after,
            other => panic!("expected RateLimited, got {other:?}"),
        }
    }

    /// One recorded item, checked by value.
    struct Expect {
        id: &'static str,
        kind: Kind,
        url: &'static str,
        body: &'static str,
        account: &'static str,
        acct: &'static str,
        profile_url: &'static str,
        created_at: &'static str,
        tags: &'static [&'static str],
    }

    fn check(page: &Page, host: &str, expect: &Expect) {
        let c = find(page, expect.id);
        let at = expect.id;
        assert_eq!(c.platform, "mastodon", "{at}");
        assert_eq!(c.source, "fediverse", "{at}");
        assert_eq!(c.kind, expect.kind, "{at}");
        assert_eq!(c.url.as_deref(), Some(expect.url), "{at}");
        assert_eq!(c.body, expect.body, "{at}");
        // Account ids are per instance; local handles get the instance's domain.
        assert_eq!(c.author.id, format!("{host}/{}", expect.account), "{at}");
        assert_eq!(c.author.handle, Some(format!("{}@{host}", expect.acct)), "{at}");
        assert_eq!(c.author.display_name, None, "{at}: the recorded display_name is empty");
        assert_eq!(c.author.profile_url.as_deref(), Some(expect.profile_url), "{at}");
        assert_eq!(c.author.email, None, "{at}");
        assert_eq!(c.created_at, expect.created_at.parse::<DateTime<Utc>>().unwrap(), "{at}");
        assert_eq!(c.tags, expect.tags, "{at}");
        assert_eq!(c.thread_id.as_deref(), Some(expect.id), "{at}");
        assert_eq!((c.parent_id.as_deref(), c.title.as_deref()), (None, None), "{at}");
        assert_eq!(c.score, Some(0.0), "{at}");
        assert_eq!((c.edited, c.updated_at, c.deleted), (false, None, false), "{at}");
        assert_eq!((&c.language, &c.signals), (&None, &None), "{at}");
    }

    #[tokio::test]
    async fn first_poll_maps_the_recorded_mention_and_hashtag_status() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(MENTIONS_PATH))
            .and(query_param("types[]", "mention"))
            .and(query_param("limit", "40"))
            .and(query_param_is_missing("min_id"))
            .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
            .respond_with(mentions().response())
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param("limit", "40"))
            .and(query_param_is_missing("min_id"))
            .and(query_param_is_missing("max_id"))
            .respond_with(timeline().response())
            .expect(1)
            .mount(&server)
            .await;
        let source = keyed_source(&server, "first", json!({}));
        assert!(!format!("{source:?}").contains(TOKEN), "the token leaked into Debug");

        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&first), [MENTION_STATUS]);
        assert!(first.has_more, "the hashtag stream is still to visit");
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second), [STATUS]);
        assert!(!second.has_more);
        assert!(first.quarantined.is_empty() && second.quarantined.is_empty());

        let host = host(&server);
        check(
            &first,
            &host,
            &Expect {
                id: MENTION_STATUS,
                kind: Kind::Mention,
                url: "http://localhost:3000/@admin/117020577157693549",
                body: "@mastodonpy_test hello!",
                account: "117020565693913441",
                acct: "admin",
                profile_url: "http://localhost:3000/@admin",
                created_at: "2026-08-01T13:51:42.823Z",
                tags: &[],
            },
        );
        check(
            &second,
            &host,
            &Expect {
                id: STATUS,
                kind: Kind::Post,
                url: "http://localhost:3000/@mastodonpy_test_2/117020593741189701",
                body: "#hoot (hashtag toot)",
                account: "117020566092212359",
                acct: "mastodonpy_test_2",
                profile_url: "http://localhost:3000/@mastodonpy_test_2",
                created_at: "2026-08-01T13:55:55.867Z",
                tags: &["hoot"],
            },
        );
        // The recorded Links point at localhost:3000, not this instance: the
        // watermarks come from the items (the notification id for mentions).
        assert_eq!(cursor(&second), watermarks(&[("mentions", NOTIFICATION), ("tag:hoot", STATUS)]));
    }

    #[tokio::test]
    async fn an_incremental_poll_with_nothing_new_keeps_the_cursor() {
        let server = MockServer::start().await;
        // With nothing newer than min_id Mastodon answers an empty list, no Link.
        Mock::given(method("GET"))
            .and(path(MENTIONS_PATH))
            .and(query_param("min_id", NOTIFICATION))
            .respond_with(replay(mentions(), json!([]), None, &[]))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param("min_id", STATUS))
            .respond_with(replay(timeline(), json!([]), None, &[]))
            .expect(1)
            .mount(&server)
            .await;
        let source = keyed_source(&server, "nothing-new", json!({}));
        let stored = watermarks(&[("mentions", NOTIFICATION), ("tag:hoot", STATUS)]);

        let mut request = PollRequest { cursor: Some(Cursor::from_json(&stored)), since: None };
        let first = source.poll(&request).await.unwrap();
        assert!(first.contributions.is_empty() && first.has_more);
        request.cursor = first.next_cursor.clone();
        let second = source.poll(&request).await.unwrap();
        assert!(second.contributions.is_empty() && second.quarantined.is_empty() && !second.has_more);
        assert_eq!(cursor(&second), stored);
    }

    #[tokio::test]
    async fn pages_forward_through_the_prev_link_across_two_pages() {
        let server = MockServer::start().await;
        let base = server.uri();
        let page1 = json!([status(105, "2026-08-01T13:59:00Z"), status(104, "2026-08-01T13:58:00Z")]);
        let page2 = json!([status(106, "2026-08-01T14:00:00Z")]);
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param("min_id", "103"))
            .and(query_param("limit", "2"))
            .respond_with(replay(timeline(), page1, link(&base, TAG_PATH, "104", "105"), &[]))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param("min_id", "105"))
            .respond_with(replay(timeline(), page2, link(&base, TAG_PATH, "106", "106"), &[]))
            .expect(1)
            .mount(&server)
            .await;
        let source = source(&server, json!({ "limit": 2 }));
        let stored = watermarks(&[("tag:hoot", "103")]);

        let first = source.poll(&PollRequest { cursor: Some(Cursor::from_json(&stored)), since: None }).await.unwrap();
        assert_eq!(ids(&first), ["105", "104"]);
        assert!(first.has_more, "a full page: more may follow");
        assert_eq!(cursor(&first).streams, watermarks(&[("tag:hoot", "105")]).streams);

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second), ["106"]);
        assert!(!second.has_more);
        assert_eq!(cursor(&second), watermarks(&[("tag:hoot", "106")]));
    }

    #[tokio::test]
    async fn a_link_to_another_host_is_not_followed() {
        let server = MockServer::start().await;
        // A prev link elsewhere, claiming an id far ahead: its id is not taken.
        let elsewhere = link("https://evil.example", TAG_PATH, "1", "999999999999999999999");
        let body = json!([status(105, "2026-08-01T13:59:00Z")]);
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .respond_with(replay(timeline(), body, elsewhere, &[]))
            .mount(&server)
            .await;
        let source = source(&server, json!({}));
        let stored = watermarks(&[("tag:hoot", "103")]);
        let page = source.poll(&PollRequest { cursor: Some(Cursor::from_json(&stored)), since: None }).await.unwrap();
        assert_eq!(cursor(&page), watermarks(&[("tag:hoot", "105")]));
        assert_eq!(requests(&server).await, 1);
    }

    /// Serves a newest page (3 statuses after `since`) and the page before
    /// it (one after `since`, one before), which must be asked `older` times.
    async fn serve_backfill(server: &MockServer, older_asked: u64) {
        let base = server.uri();
        let newest = json!([
            status(110, "2026-08-01T14:10:00Z"),
            status(109, "2026-08-01T14:09:00Z"),
            status(108, "2026-08-01T14:08:00Z"),
        ]);
        let older = json!([status(107, "2026-08-01T14:07:00Z"), status(101, "2026-07-01T10:00:00Z")]);
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param_is_missing("min_id"))
            .and(query_param_is_missing("max_id"))
            .respond_with(replay(timeline(), newest, link(&base, TAG_PATH, "108", "110"), &[]))
            .expect(1)
            .mount(server)
            .await;
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param("max_id", "108"))
            .respond_with(replay(timeline(), older, link(&base, TAG_PATH, "101", "107"), &[]))
            .expect(older_asked)
            .mount(server)
            .await;
    }

    fn since() -> Option<DateTime<Utc>> {
        Some("2026-08-01T00:00:00Z".parse().unwrap())
    }

    #[tokio::test]
    async fn first_poll_honours_since_by_paging_back_with_max_id() {
        let server = MockServer::start().await;
        serve_backfill(&server, 1).await;
        let source = source(&server, json!({ "limit": 3 }));

        let first = source.poll(&PollRequest { cursor: None, since: since() }).await.unwrap();
        assert_eq!(ids(&first), ["110", "109", "108"]);
        assert!(first.has_more);
        let backfill = Backfill { max_id: "108".into(), since: since().unwrap() };
        let state = StreamCursor { watermark: Some("110".into()), backfill: Some(backfill) };
        assert_eq!(cursor(&first).streams.get("tag:hoot"), Some(&state));

        // The daemon need not repeat `since`: the cursor carries it.
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second), ["107"], "the status from before `since` is dropped");
        assert!(!second.has_more);
        assert_eq!(cursor(&second), watermarks(&[("tag:hoot", "110")]));
    }

    #[tokio::test]
    async fn a_backfill_pauses_at_max_pages_and_the_next_poll_resumes_it() {
        let server = MockServer::start().await;
        let base = server.uri();
        let pages = [
            ("newest", json!([status(110, "2026-08-01T14:10:00Z"), status(109, "2026-08-01T14:09:00Z")]), "109", "110"),
            ("109", json!([status(108, "2026-08-01T14:08:00Z"), status(107, "2026-08-01T14:07:00Z")]), "107", "108"),
            ("107", json!([status(106, "2026-08-01T14:06:00Z"), status(101, "2026-07-01T10:00:00Z")]), "101", "106"),
        ];
        for (max_id, body, next, prev) in pages {
            let mock = Mock::given(method("GET")).and(path(TAG_PATH)).and(query_param_is_missing("min_id"));
            let mock = match max_id {
                "newest" => mock.and(query_param_is_missing("max_id")),
                max_id => mock.and(query_param("max_id", max_id)),
            };
            let response = replay(timeline(), body, link(&base, TAG_PATH, next, prev), &[]);
            mock.respond_with(response).expect(1).mount(&server).await;
        }
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param("min_id", "110"))
            .respond_with(replay(timeline(), json!([]), None, &[]))
            .expect(1)
            .mount(&server)
            .await;
        let source = source(&server, json!({ "limit": 2, "max_pages_per_poll": 1 }));

        // The newest page spends the forward budget; the way back has its own.
        let first = source.poll(&PollRequest { cursor: None, since: since() }).await.unwrap();
        assert_eq!(ids(&first), ["110", "109"]);
        assert!(first.has_more);
        let paused = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&paused), ["108", "107"]);
        assert!(!paused.has_more, "the cap ends this poll");
        let backfill = Backfill { max_id: "107".into(), since: since().unwrap() };
        let state = StreamCursor { watermark: Some("110".into()), backfill: Some(backfill) };
        assert_eq!(
            cursor(&paused),
            MastodonCursor { streams: [("tag:hoot".into(), state)].into(), run: None },
            "the watermark stays at the newest page; the way back resumes at 107"
        );

        // The next poll goes forward from the watermark first, then resumes the way back.
        let forward = source.poll(&PollRequest { cursor: paused.next_cursor.clone(), since: None }).await.unwrap();
        assert!(forward.contributions.is_empty() && forward.has_more);
        let resumed = source.poll(&PollRequest { cursor: forward.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&resumed), ["106"], "the status from before `since` is dropped");
        assert!(!resumed.has_more);
        assert_eq!(cursor(&resumed), watermarks(&[("tag:hoot", "110")]), "the backfill reached `since`");
    }

    #[tokio::test]
    async fn without_since_the_first_poll_takes_the_newest_page_only() {
        let server = MockServer::start().await;
        serve_backfill(&server, 0).await;
        let source = source(&server, json!({ "limit": 3 }));
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&page), ["110", "109", "108"]);
        assert!(!page.has_more);
        assert_eq!(cursor(&page), watermarks(&[("tag:hoot", "110")]));
    }

    #[tokio::test]
    async fn edits_replies_remote_authors_and_boosts_are_mapped() {
        let server = MockServer::start().await;
        let recorded = timeline().body[0].clone();
        let mut edited = recorded.clone();
        edited["content"] = "<p><a href=\"http://localhost:3000/tags/hoot\" class=\"mention hashtag\" rel=\"tag\">#<span>hoot</span></a> (hashtag toot, <em>edited</em>)</p>".into();
        edited["edited_at"] = "2026-08-01T14:01:02.000Z".into();
        edited["favourites_count"] = 3.into();
        edited["spoiler_text"] = "product feedback".into();
        let mut reply = status(117020593741189702, "2026-08-01T14:02:00Z");
        reply["in_reply_to_id"] = STATUS.into();
        reply["in_reply_to_account_id"] = "117020566092212359".into();
        reply["account"]["acct"] = "someone@remote.example".into();
        reply["account"]["display_name"] = "Some One".into();
        let mut boost = status(117020593741189703, "2026-08-01T14:03:00Z");
        boost["reblog"] = recorded.clone();
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .respond_with(replay(timeline(), json!([boost, reply, edited]), None, &[]))
            .mount(&server)
            .await;
        let page = source(&server, json!({})).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&page), ["117020593741189702", STATUS], "the boost is left out");

        let edited = find(&page, STATUS);
        assert!(edited.edited);
        assert_eq!(edited.updated_at, Some("2026-08-01T14:01:02Z".parse().unwrap()));
        assert_eq!(edited.body, "#hoot (hashtag toot, edited)");
        assert_eq!(edited.title.as_deref(), Some("product feedback"));
        assert_eq!(edited.score, Some(3.0));
        // The edit changes the content hash, so the ledger sends it again.
        let original = source(&server, json!({})).map_status(&recorded, None).unwrap();
        assert_eq!((original.edited, original.updated_at), (false, None));
        assert_ne!(original.content_hash(), edited.content_hash());

        let reply = find(&page, "117020593741189702");
        assert_eq!(reply.kind, Kind::Reply);
        assert_eq!(reply.parent_id.as_deref(), Some(STATUS));
        assert_eq!(reply.thread_id.as_deref(), Some("117020593741189702"), "Mastodon names no conversation");
        assert_eq!(reply.author.handle.as_deref(), Some("someone@remote.example"));
        assert_eq!(reply.author.display_name.as_deref(), Some("Some One"));
        assert_eq!(cursor(&page), watermarks(&[("tag:hoot", "117020593741189703")]), "the boost's id counts");
    }

    #[tokio::test]
    async fn a_spent_budget_holds_every_request_until_the_reset_timestamp() {
        let server = MockServer::start().await;
        let spent = [("x-ratelimit-remaining", "0".to_owned()), ("x-ratelimit-reset", reset_in(90))];
        Mock::given(method("GET"))
            .and(path(MENTIONS_PATH))
            .respond_with(replay(mentions(), mentions().body, None, &spent))
            .mount(&server)
            .await;
        Mock::given(method("GET")).and(path(TAG_PATH)).respond_with(timeline().response()).mount(&server).await;
        let source = keyed_source(&server, "spent", json!({}));

        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&first), [MENTION_STATUS], "the page that spent the budget is kept");
        assert!(first.has_more);
        let wait = rate_limited(source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await);
        assert!(wait > Duration::from_secs(85) && wait <= Duration::from_secs(90), "{wait:?}");
        assert!(matches!(source.check().await, Err(SourceError::Http(HttpError::RateLimited { .. }))));
        assert_eq!(requests(&server).await, 1, "no request while the budget is spent");
    }

    #[tokio::test]
    async fn a_429_waits_for_the_last_reset_seen_and_sends_nothing_meanwhile() {
        let server = MockServer::start().await;
        let base = server.uri();
        // Plenty left of 300: no pacing, the 429 alone decides the wait.
        let budget = [("x-ratelimit-remaining", "250".to_owned()), ("x-ratelimit-reset", reset_in(120))];
        let body = json!([status(104, "2026-08-01T13:58:00Z")]);
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param("min_id", "103"))
            .respond_with(replay(timeline(), body, link(&base, TAG_PATH, "104", "104"), &budget))
            .mount(&server)
            .await;
        // Mastodon's throttled answer (rack_attack.rb): Remaining 0, an ISO
        // reset, no Retry-After, `{"error": ...}`; the rest as recorded.
        let mut throttled = timeline();
        throttled.status = 429;
        let throttled = replay(
            throttled,
            json!({ "error": "Too many requests" }),
            None,
            &[("x-ratelimit-remaining", "0".to_owned()), ("x-ratelimit-reset", reset_in(100))],
        );
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .and(query_param("min_id", "104"))
            .respond_with(throttled)
            .mount(&server)
            .await;
        let source = source(&server, json!({ "limit": 1 }));
        let stored = watermarks(&[("tag:hoot", "103")]);

        let first = source.poll(&PollRequest { cursor: Some(Cursor::from_json(&stored)), since: None }).await.unwrap();
        assert_eq!(ids(&first), ["104"]);
        assert!(first.has_more);
        let wait = rate_limited(source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await);
        assert!(wait > Duration::from_secs(115) && wait <= Duration::from_secs(120), "{wait:?}");
        let sent = requests(&server).await;
        // The shared client reads the ISO reset of the 429 and hands it back
        // at once: no blind retries.
        assert_eq!(sent, 2);
        let again = rate_limited(source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await);
        assert!(again > Duration::from_secs(110), "{again:?}");
        assert_eq!(requests(&server).await, sent, "no request while the 429 holds");
    }

    #[tokio::test]
    async fn malformed_items_are_quarantined_and_the_page_goes_on() {
        let server = MockServer::start().await;
        let mut no_id = status(105, "2026-08-01T13:59:00Z");
        no_id.as_object_mut().unwrap().remove("id");
        let bad_date = status(104, "yesterday");
        let mut no_account = status(103, "2026-08-01T13:57:00Z");
        no_account["account"] = Value::Null;
        let good = status(102, "2026-08-01T13:56:00Z");
        Mock::given(method("GET"))
            .and(path(TAG_PATH))
            .respond_with(replay(timeline(), json!([no_id, bad_date, no_account, good]), None, &[]))
            .mount(&server)
            .await;
        // Mentions: one without its status, one of another type, one good.
        let recorded = mentions().body[0].clone();
        let mut no_status = recorded.clone();
        no_status["id"] = "23".into();
        no_status["status"] = Value::Null;
        let mut favourite = recorded.clone();
        favourite["id"] = "22".into();
        favourite["type"] = "favourite".into();
        Mock::given(method("GET"))
            .and(path(MENTIONS_PATH))
            .respond_with(replay(mentions(), json!([no_status, favourite, recorded]), None, &[]))
            .mount(&server)
            .await;
        let source = keyed_source(&server, "malformed", json!({}));

        let notes = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&notes), [MENTION_STATUS], "the favourite is skipped");
        assert_eq!(notes.quarantined.len(), 1);
        assert!(notes.quarantined[0].reason.contains("23"), "{}", notes.quarantined[0].reason);
        let tags = source.poll(&PollRequest { cursor: notes.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&tags), ["102"]);
        let quarantined: Vec<_> = tags.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [None, Some("104"), Some("103")]);
        assert!(tags.quarantined[0].reason.contains("id"), "{}", tags.quarantined[0].reason);
        assert!(tags.quarantined[0].raw.contains("hashtag toot"));
        assert!(tags.quarantined[1].reason.contains("input") || tags.quarantined[1].reason.contains("created_at"));
        // The unreadable items' ids are still covered by the watermark.
        assert_eq!(cursor(&tags), watermarks(&[("mentions", "23"), ("tag:hoot", "104")]));
    }

    #[tokio::test]
    async fn a_body_that_is_not_a_json_list_is_a_decode_error() {
        for (body, expected) in [
            (ResponseTemplate::new(200).set_body_string("<html>maintenance</html>"), "did not answer JSON"),
            (ResponseTemplate::new(200).set_body_json(json!({ "statuses": [] })), "not a list"),
        ] {
            let server = MockServer::start().await;
            Mock::given(method("GET")).respond_with(body).mount(&server).await;
            let error = source(&server, json!({})).poll(&PollRequest::default()).await.unwrap_err();
            assert!(
                matches!(&error, SourceError::Decode(message) if message.contains(expected) && message.contains(TAG_PATH)),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn refusals_map_to_auth_and_other_statuses_to_status() {
        for (status, message, is_auth) in [
            (401, "The access token is invalid", true),
            (403, "This action is outside the authorized scopes", true),
            (422, "Unprocessable", false),
        ] {
            let server = MockServer::start().await;
            let response = ResponseTemplate::new(status).set_body_json(json!({ "error": message }));
            Mock::given(method("GET")).respond_with(response).mount(&server).await;
            let source = keyed_source(&server, &format!("refused-{status}"), json!({}));
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                match error {
                    SourceError::Auth(text) => assert!(is_auth && text.contains(message), "{status}: {text}"),
                    SourceError::Status { status: got, .. } => assert!(!is_auth && got == status, "{status}"),
                    other => panic!("{status}: unexpected {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn an_unknown_hashtag_is_an_empty_timeline_and_check_asks_for_one_item() {
        let server = MockServer::start().await;
        let not_found = ResponseTemplate::new(404).set_body_json(json!({ "error": "Record not found" }));
        Mock::given(method("GET")).and(path(TAG_PATH)).respond_with(not_found).mount(&server).await;
        let source = source(&server, json!({}));
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert!(page.contributions.is_empty() && !page.has_more && page.next_cursor.is_none());
        source.check().await.unwrap();
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.last().unwrap().url.query(), Some("limit=1"));
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: MastodonConfig = serde_json::from_value(json!({
            "base_url": "https://mastodon.social", "hashtags": ["#Acme", "acme", "acmecloud"]
        }))
        .unwrap();
        assert_eq!((config.max_pages_per_poll, config.limit, config.mentions), (10, 40, None));
        assert_eq!(config.token, None);
        let source = MastodonSource::new("m", config.clone(), HttpOptions::default()).unwrap();
        assert_eq!(source.streams, [Stream::Tag("acme".into()), Stream::Tag("acmecloud".into())]);
        assert_eq!(source.host, "mastodon.social");
        assert_eq!(
            source.endpoint(&Stream::Tag("café".into())).as_str(),
            "https://mastodon.social/api/v1/timelines/tag/caf%C3%A9"
        );
        for unknown in [
            json!({ "base_url": "https://m.example", "schedule": "*/5 * * * *" }),
            json!({ "base_url": "https://m.example", "hashtag": ["x"] }),
        ] {
            assert!(serde_json::from_value::<MastodonConfig>(unknown).is_err());
        }

        let build = |config: MastodonConfig| MastodonSource::new("m", config, HttpOptions::default()).unwrap_err();
        let cases = [
            (MastodonConfig { mentions: Some(true), ..config.clone() }, "MentionsNeedToken"),
            (MastodonConfig { hashtags: vec![], ..config.clone() }, "NothingToWatch"),
            (MastodonConfig { hashtags: vec!["two words".into()], ..config.clone() }, "InvalidHashtag"),
            (MastodonConfig { limit: 80, ..config.clone() }, "InvalidLimit"),
            (MastodonConfig { base_url: "ftp://m.example".parse().unwrap(), ..config.clone() }, "InvalidBaseUrl"),
            (
                MastodonConfig { token: Some(SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into())), ..config.clone() },
                "Secret",
            ),
        ];
        for (config, expected) in cases {
            let error = build(config);
            assert!(format!("{error:?}").starts_with(expected), "{expected}: {error:?}");
        }
    }

    #[tokio::test]
    async fn a_token_turns_mentions_on_unless_told_otherwise() {
        let server = MockServer::start().await;
        assert_eq!(keyed_source(&server, "on", json!({})).streams, [Stream::Mentions, Stream::Tag("hoot".into())]);
        let off = keyed_source(&server, "off", json!({ "mentions": false }));
        assert_eq!(off.streams, [Stream::Tag("hoot".into())]);
    }

    #[test]
    fn ids_compare_as_numbers_else_by_length_then_text() {
        assert_eq!(cmp_ids("117020593741189701", "21"), Ordering::Greater);
        assert_eq!(cmp_ids("9", "10"), Ordering::Less);
        assert_eq!(cmp_ids("abc", "abd"), Ordering::Less);
        assert_eq!(cmp_ids("zz", "aaa"), Ordering::Less);
        assert_eq!(newest_id(&["9".to_owned(), "10".to_owned()]).as_deref(), Some("10"));
    }

    #[test]
    fn the_recorded_link_header_parses() {
        let recorded = timeline().headers.into_iter().find(|(name, _)| name == "link").unwrap().1;
        assert_eq!(
            parse_link_header(&recorded),
            [
                ("next".to_owned(), format!("http://localhost:3000{TAG_PATH}?max_id={STATUS}")),
                ("prev".to_owned(), format!("http://localhost:3000{TAG_PATH}?min_id={STATUS}")),
            ]
        );
        assert!(parse_link_header("garbage, <unterminated").is_empty());
    }
}
