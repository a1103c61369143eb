//! YouTube: the comments on a channel's videos, or on given videos, through
//! the YouTube Data API v3 (`commentThreads.list`).
//!
//! Every configured place is a *stream*: the channel
//! (`allThreadsRelatedToChannelId`, every thread on the channel and its
//! videos) and each video (`videoId`). A stream is read with
//! `GET {base_url}/commentThreads?part=snippet,replies&order=time&maxResults=N&textFormat=plainText`,
//! which lists comment threads newest first (`order=time`, by the time of
//! the top-level comment) with a `nextPageToken` to page back. The API has
//! no "since" filter, so a *pass* over a stream starts at the newest thread
//! and pages back until it reaches a thread whose top-level `publishedAt` is
//! at or below the stream's watermark (the newest `publishedAt` committed by
//! the previous pass), runs out of pages, passes [`PollRequest::since`]
//! (first pass of a stream only) or has fetched
//! [`YoutubeConfig::max_pages_per_poll`] pages. A first pass without `since`
//! reads the newest page only. The watermark moves only when a pass is over;
//! a pass stopped by the page cap is paused with its `pageToken` and resumed
//! by the next poll, so nothing between is skipped. Each call to
//! [`Source::poll`] fetches one page of one stream; the cursor remembers every
//! stream's watermark and pass and which streams this round still has to visit.
//!
//! Every thread of a fetched page is returned, also those already seen: the
//! API marks no changes, and the daemon's ledger drops the unchanged ones,
//! so edits (`updatedAt` later than `publishedAt`) and new replies on the
//! newest page are picked up at no extra cost.
//!
//! What the API does not give:
//! - Deletions: a deleted comment simply vanishes from the listing; there
//!   is no marker, so `deleted` is never set.
//! - All replies: a thread carries at most five replies in
//!   `replies.comments` (the API says a thread "does not necessarily contain
//!   all replies"; the rest need `comments.list?parentId=`, one more unit
//!   each, which this connector does not spend). Replies added later to a
//!   thread older than the watermark are seen only while that thread is on
//!   a page a pass fetches.
//!
//! Quota (documented at developers.google.com/youtube/v3/determine_quota_cost):
//! a project has 10 000 units a day, `commentThreads.list` costs 1 unit, every
//! request counts (failed ones too) and the day resets at midnight Pacific
//! Time. The connector counts the units it spends per Pacific day in memory
//! ([`YoutubeConfig::daily_quota_units`]); once the next request would go
//! over, the poll ends with what was fetched and the cursor resumes the next
//! day. A `403` whose `error.errors[].reason` is `quotaExceeded` or
//! `dailyLimitExceeded` is not an auth failure: no request leaves until the
//! next Pacific midnight (computed with the US daylight-saving rule, no
//! time-zone database), and the poll fails with [`HttpError::RateLimited`]
//! naming the wait. `rateLimitExceeded`/`userRateLimitExceeded` are short-term
//! limits: they pause the source for 100 seconds. A video with
//! `commentsDisabled` (403) or `videoNotFound` (404) is skipped with a
//! warning; the other streams go on. The counter lives in memory: after a
//! restart it starts at zero, and the server's own `quotaExceeded` remains
//! the backstop.
//!
//! The API key can only be sent as the `key` query parameter; the shared
//! HTTP client never shows query strings in its errors or logs.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeDelta, Utc, Weekday};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, SecretError, SecretRef, Source, SourceError, http::safe_target, source::check_status, text::tidy,
};
use url::Url;

const PLATFORM: &str = "youtube";

const DEFAULT_BASE_URL: &str = "https://www.googleapis.com/youtube/v3";

/// Quota cost of one `commentThreads.list` call.
const UNITS_PER_LIST: u32 = 1;

/// How long a short-term rate limit (`rateLimitExceeded`) holds the source:
/// Google's short-term quotas are counted per 100 seconds.
const SHORT_LIMIT_PAUSE: Duration = Duration::from_secs(100);

/// Settings of one YouTube source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YoutubeConfig {
    /// API key of a Google Cloud project with the YouTube Data API enabled
    /// (`{ env = "..." }` or `{ file = "..." }`). Sent as the `key` query
    /// parameter, the only place the API takes it.
    pub api_key: SecretRef,
    /// Channel whose comment threads are read (`UC...`): the comments on the
    /// channel and on all its videos.
    #[serde(default)]
    pub channel_id: Option<String>,
    /// Videos whose comment threads are read, one stream each. At least one
    /// video or a `channel_id` is required.
    #[serde(default)]
    pub video_ids: Vec<String>,
    /// Root of the API. Change it only for a proxy or a test mock.
    #[serde(default = "default_base_url")]
    pub base_url: Url,
    /// Threads per page (`maxResults`, 1 to 100).
    #[serde(default = "default_max_results")]
    pub max_results: u32,
    /// Most pages one poll fetches per stream. A pass that needs more is
    /// paused there and resumed by the next poll (nothing is skipped).
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
    /// Units this source may spend per day (Pacific Time, as Google counts);
    /// one page costs one unit. Lower it when other programs share the key's
    /// project.
    #[serde(default = "default_daily_quota_units")]
    pub daily_quota_units: u32,
}

fn default_base_url() -> Url {
    Url::parse(DEFAULT_BASE_URL).expect("the default base URL is a valid URL")
}

fn default_max_results() -> u32 {
    100
}

fn default_max_pages_per_poll() -> u32 {
    10
}

fn default_daily_quota_units() -> u32 {
    10_000
}

/// Why a [`YoutubeSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("youtube `api_key`: {0}")]
    Secret(#[from] SecretError),
    #[error("youtube needs a `channel_id` or at least one entry in `video_ids`")]
    NoStreams,
    #[error("youtube `{0}` holds an empty id")]
    EmptyId(&'static str),
    #[error("youtube `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("youtube `{field}` must be {expected}")]
    OutOfRange { field: &'static str, expected: &'static str },
    #[error("youtube HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// One place comments are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stream {
    Channel(String),
    Video(String),
}

impl Stream {
    /// Its name in the cursor.
    fn key(&self) -> String {
        match self {
            Stream::Channel(id) => format!("channel:{id}"),
            Stream::Video(id) => format!("video:{id}"),
        }
    }

    /// The filter parameter of `commentThreads.list`.
    fn filter(&self) -> (&'static str, &str) {
        match self {
            Stream::Channel(id) => ("allThreadsRelatedToChannelId", id),
            Stream::Video(id) => ("videoId", id),
        }
    }
}

/// A YouTube channel or set of videos, polled through `commentThreads.list`.
#[derive(Debug)]
pub struct YoutubeSource {
    instance: String,
    config: YoutubeConfig,
    http: HttpClient,
    /// Debug shows it redacted.
    key: SecretString,
    streams: Vec<Stream>,
    quota: Mutex<QuotaLedger>,
}

/// What the cursor of a YouTube source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct YoutubeCursor {
    /// Per stream key (`channel:ID`, `video:ID`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    streams: BTreeMap<String, StreamCursor>,
    /// The streams this round still has to visit, the current one first;
    /// empty: the next poll starts a new round over every stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StreamCursor {
    /// The newest top-level `publishedAt` committed by a finished pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark: Option<DateTime<Utc>>,
    /// The pass in progress (or paused), while paging back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<PassState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PassState {
    /// The `pageToken` of the next page.
    page_token: String,
    /// The newest top-level `publishedAt` seen by this pass: the next watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<DateTime<Utc>>,
    /// Pages fetched by this poll (0 after a pause).
    pages: u32,
    /// The oldest thread to keep (first pass only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
}

/// Units spent per quota day, and a hold after the server said "stop".
#[derive(Debug, Default)]
struct QuotaLedger {
    /// The Pacific date `used` counts for.
    day: Option<NaiveDate>,
    used: u32,
    /// No request before this instant.
    blocked_until: Option<DateTime<Utc>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// Send it (one unit is booked).
    Go,
    /// This source's own budget is spent until then.
    BudgetSpent { resets_at: DateTime<Utc> },
    /// The server said the quota or rate is exhausted until then.
    Blocked { until: DateTime<Utc> },
}

impl QuotaLedger {
    fn admit(&mut self, now: DateTime<Utc>, budget: u32) -> Admission {
        if let Some(until) = self.blocked_until {
            if now < until {
                return Admission::Blocked { until };
            }
            self.blocked_until = None;
        }
        let day = quota_day(now);
        if self.day != Some(day) {
            self.day = Some(day);
            self.used = 0;
        }
        if self.used.saturating_add(UNITS_PER_LIST) > budget {
            return Admission::BudgetSpent { resets_at: next_quota_reset(now) };
        }
        self.used += UNITS_PER_LIST;
        Admission::Go
    }

    fn block_until(&mut self, until: DateTime<Utc>) {
        if self.blocked_until.is_none_or(|current| current < until) {
            self.blocked_until = Some(until);
        }
    }
}

/// Hours Pacific Time is behind UTC at `at`, by the US rule in force since
/// 2007: daylight time (UTC-7) from the second Sunday of March, 02:00 PST
/// (10:00 UTC), to the first Sunday of November, 02:00 PDT (09:00 UTC).
fn pacific_offset_hours(at: DateTime<Utc>) -> i64 {
    let year = at.year();
    let start = NaiveDate::from_weekday_of_month_opt(year, 3, Weekday::Sun, 2).and_then(|d| d.and_hms_opt(10, 0, 0));
    let end = NaiveDate::from_weekday_of_month_opt(year, 11, Weekday::Sun, 1).and_then(|d| d.and_hms_opt(9, 0, 0));
    let at = at.naive_utc();
    match (start, end) {
        (Some(start), Some(end)) if at >= start && at < end => 7,
        _ => 8,
    }
}

/// The Pacific date of `at`: the day Google counts YouTube quota in.
fn quota_day(at: DateTime<Utc>) -> NaiveDate {
    (at - TimeDelta::hours(pacific_offset_hours(at))).date_naive()
}

/// The next midnight Pacific Time after `at`, when Google resets the quota.
fn next_quota_reset(at: DateTime<Utc>) -> DateTime<Utc> {
    let today = quota_day(at);
    let midnight = today.succ_opt().unwrap_or(today).and_time(NaiveTime::MIN).and_utc();
    // Midnight is never inside a switch (those happen at 02:00 local).
    let daylight = midnight + TimeDelta::hours(7);
    if pacific_offset_hours(daylight) == 7 { daylight } else { midnight + TimeDelta::hours(8) }
}

/// Why a stream is passed over this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SkipReason {
    CommentsDisabled,
    NotFound,
}

/// The outcome of one `commentThreads.list` call.
enum Fetched {
    Threads {
        items: Vec<Value>,
        next_page_token: Option<String>,
    },
    Skip {
        reason: SkipReason,
        message: String,
    },
    /// The stored `pageToken` is no longer accepted.
    InvalidPageToken,
    /// This source's daily budget is spent; no request was sent.
    BudgetSpent {
        resets_at: DateTime<Utc>,
    },
}

/// The `error.errors[].reason`s (and `error.details[].reason`s) of a
/// Google API error body.
fn error_reasons(body: &[u8]) -> Vec<String> {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let error = body.get("error");
    ["errors", "details"]
        .iter()
        .filter_map(|list| error.and_then(|e| e.get(*list)).and_then(Value::as_array))
        .flatten()
        .filter_map(|entry| entry.get("reason").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

fn rate_limited(target: String, until: DateTime<Utc>, now: DateTime<Utc>, body: String) -> SourceError {
    let retry_after = (until - now).to_std().unwrap_or(Duration::ZERO);
    SourceError::Http(HttpError::RateLimited { target, retry_after, body })
}

/// The fields of a `comment` resource this connector reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawComment {
    id: String,
    snippet: RawCommentSnippet,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCommentSnippet {
    #[serde(default)]
    video_id: Option<String>,
    #[serde(default)]
    text_display: Option<String>,
    #[serde(default)]
    text_original: Option<String>,
    #[serde(default)]
    parent_id: Option<String>,
    #[serde(default)]
    author_display_name: Option<String>,
    #[serde(default)]
    author_channel_url: Option<String>,
    #[serde(default)]
    author_channel_id: Option<RawChannelId>,
    #[serde(default)]
    like_count: Option<f64>,
    published_at: DateTime<Utc>,
    #[serde(default)]
    updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
struct RawChannelId {
    #[serde(default)]
    value: Option<String>,
}

/// The top-level `publishedAt` of a thread, when readable.
fn thread_published_at(thread: &Value) -> Option<DateTime<Utc>> {
    thread
        .pointer("/snippet/topLevelComment/snippet/publishedAt")
        .and_then(Value::as_str)
        .and_then(|at| at.parse::<DateTime<Utc>>().ok())
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

impl YoutubeSource {
    pub fn new(instance: &str, config: YoutubeConfig, http: HttpOptions) -> Result<YoutubeSource, BuildError> {
        if !matches!(config.base_url.scheme(), "http" | "https") || config.base_url.cannot_be_a_base() {
            return Err(BuildError::InvalidBaseUrl(format!("{}:...", config.base_url.scheme())));
        }
        if !(1..=100).contains(&config.max_results) {
            return Err(BuildError::OutOfRange { field: "max_results", expected: "1 to 100" });
        }
        if config.max_pages_per_poll == 0 {
            return Err(BuildError::OutOfRange { field: "max_pages_per_poll", expected: "at least 1" });
        }
        if config.daily_quota_units < UNITS_PER_LIST {
            return Err(BuildError::OutOfRange { field: "daily_quota_units", expected: "at least 1" });
        }
        let mut streams = Vec::new();
        if let Some(channel) = &config.channel_id {
            let channel = channel.trim();
            if channel.is_empty() {
                return Err(BuildError::EmptyId("channel_id"));
            }
            streams.push(Stream::Channel(channel.to_owned()));
        }
        for video in &config.video_ids {
            let video = video.trim();
            if video.is_empty() {
                return Err(BuildError::EmptyId("video_ids"));
            }
            let stream = Stream::Video(video.to_owned());
            if !streams.contains(&stream) {
                streams.push(stream);
            }
        }
        if streams.is_empty() {
            return Err(BuildError::NoStreams);
        }
        let key = config.api_key.resolve()?;
        Ok(YoutubeSource {
            instance: instance.to_owned(),
            http: HttpClient::new(http)?,
            key,
            streams,
            config,
            quota: Mutex::new(QuotaLedger::default()),
        })
    }

    fn endpoint(&self) -> Url {
        let mut url = self.config.base_url.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push("commentThreads");
        }
        url
    }

    fn lock_quota(&self) -> std::sync::MutexGuard<'_, QuotaLedger> {
        self.quota.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One page of `commentThreads.list` for `stream`, within the quota.
    async fn fetch(
        &self,
        stream: &Stream,
        page_token: Option<&str>,
        max_results: u32,
        part: &str,
    ) -> Result<Fetched, SourceError> {
        let url = self.endpoint();
        let target = safe_target(&url);
        let now = Utc::now();
        let admission = self.lock_quota().admit(now, self.config.daily_quota_units);
        match admission {
            Admission::Go => {}
            Admission::BudgetSpent { resets_at } => return Ok(Fetched::BudgetSpent { resets_at }),
            Admission::Blocked { until } => return Err(rate_limited(target, until, now, String::new())),
        }
        let (filter, id) = stream.filter();
        let max_results = max_results.to_string();
        let mut query = vec![
            ("part", part),
            ("order", "time"),
            ("maxResults", &max_results),
            ("textFormat", "plainText"),
            (filter, id),
        ];
        if let Some(token) = page_token {
            query.push(("pageToken", token));
        }
        let request = self.http.get(url).query(&query).query(&[("key", self.key.expose_secret())]);
        let response = self.http.send(request).await?;
        if !response.status.is_success() {
            return self.interpret_error(&response, page_token.is_some());
        }
        let mut body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
        let items = match body.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            // An empty listing may leave `items` out; the envelope says what it is.
            None if body.get("kind").and_then(Value::as_str) == Some("youtube#commentThreadListResponse") => Vec::new(),
            _ => {
                return Err(SourceError::Decode(format!(
                    "{} answered JSON that is not a comment thread list (no `items` list)",
                    response.target
                )));
            }
        };
        let next_page_token =
            body.get("nextPageToken").and_then(Value::as_str).filter(|token| !token.is_empty()).map(str::to_owned);
        Ok(Fetched::Threads { items, next_page_token })
    }

    /// What a non-2xx answer means: quota, a stream to skip, a stale page
    /// token, refused credentials, or an error naming the status.
    fn interpret_error(&self, response: &HttpResponse, had_token: bool) -> Result<Fetched, SourceError> {
        let status = response.status.as_u16();
        let reasons = error_reasons(&response.body);
        let has = |names: &[&str]| reasons.iter().any(|reason| names.contains(&reason.as_str()));
        let now = Utc::now();
        if matches!(status, 403 | 429) && has(&["quotaExceeded", "dailyLimitExceeded"]) {
            let until = next_quota_reset(now);
            self.lock_quota().block_until(until);
            tracing::warn!(
                source = %self.instance, status, until = %until,
                "youtube quota exhausted; no request until midnight Pacific Time"
            );
            return Err(rate_limited(response.target.clone(), until, now, response.body_snippet()));
        }
        if matches!(status, 403 | 429) && has(&["rateLimitExceeded", "userRateLimitExceeded"]) {
            let until = now + TimeDelta::from_std(SHORT_LIMIT_PAUSE).unwrap_or(TimeDelta::MAX);
            self.lock_quota().block_until(until);
            tracing::warn!(source = %self.instance, status, until = %until, "youtube short-term rate limit; pausing");
            return Err(rate_limited(response.target.clone(), until, now, response.body_snippet()));
        }
        if status == 403 && has(&["commentsDisabled"]) {
            return Ok(Fetched::Skip { reason: SkipReason::CommentsDisabled, message: response.body_snippet() });
        }
        if status == 404 && has(&["videoNotFound", "channelNotFound"]) {
            return Ok(Fetched::Skip { reason: SkipReason::NotFound, message: response.body_snippet() });
        }
        if status == 400 && had_token && has(&["invalidPageToken"]) {
            return Ok(Fetched::InvalidPageToken);
        }
        if status == 400 && has(&["keyInvalid", "API_KEY_INVALID"]) {
            return Err(SourceError::Auth(format!(
                "{} refused the API key (HTTP 400): {}",
                response.target,
                response.body_snippet()
            )));
        }
        check_status(response)?;
        Err(SourceError::Status { status, message: format!("{}: {}", response.target, response.body_snippet()) })
    }

    fn to_contribution(
        &self,
        comment: RawComment,
        thread_video: Option<&str>,
        parent: Option<&str>,
    ) -> Result<Contribution, String> {
        let snippet = comment.snippet;
        let text = match (non_empty(snippet.text_original), snippet.text_display) {
            (Some(original), _) => original,
            // Plain text too: the request asks for `textFormat=plainText`.
            (None, Some(display)) => display,
            (None, None) => return Err("the comment has neither textOriginal nor textDisplay".to_owned()),
        };
        let video = non_empty(snippet.video_id).or_else(|| thread_video.map(str::to_owned));
        let url = video.as_deref().map(|video| {
            let mut url = Url::parse("https://www.youtube.com/watch").unwrap_or_else(|_| self.endpoint());
            url.query_pairs_mut().append_pair("v", video).append_pair("lc", &comment.id);
            url.to_string()
        });
        let display_name = non_empty(snippet.author_display_name);
        let author_id = snippet
            .author_channel_id
            .and_then(|channel| non_empty(channel.value))
            .or_else(|| display_name.clone())
            .unwrap_or_default();
        let (kind, parent_id) = match parent {
            Some(parent) => (Kind::Reply, Some(non_empty(snippet.parent_id).unwrap_or_else(|| parent.to_owned()))),
            None => (Kind::Comment, None),
        };
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: comment.id,
            url,
            kind,
            author: Author {
                id: author_id,
                handle: display_name.clone(),
                display_name,
                email: None,
                profile_url: non_empty(snippet.author_channel_url),
                links: Vec::new(),
            },
            title: None,
            body: tidy(&text),
            language: None,
            created_at: snippet.published_at,
            updated_at: snippet.updated_at,
            parent_id,
            thread_id: video,
            tags: Vec::new(),
            score: snippet.like_count,
            edited: snippet.updated_at.is_some_and(|updated| updated != snippet.published_at),
            deleted: false,
            signals: None,
        })
    }

    /// Maps one thread (top-level comment and the replies it carries) into
    /// `page`. Malformed comments are quarantined one by one, unless the
    /// thread was committed by an earlier pass (it was reported then).
    fn map_thread(&self, thread: &Value, already_seen: bool, page: &mut Page) {
        let thread_id = thread.get("id").and_then(Value::as_str);
        let video = thread.pointer("/snippet/videoId").and_then(Value::as_str);
        let top_level = thread.pointer("/snippet/topLevelComment");
        let top_id = top_level.and_then(|c| c.get("id")).and_then(Value::as_str).or(thread_id).map(str::to_owned);
        let mut quarantine = |id: Option<String>, reason: String, raw: &Value| {
            if already_seen {
                tracing::debug!(source = %self.instance, id = ?id, %reason, "youtube: malformed comment seen before");
            } else {
                let raw = serde_json::to_string(raw).unwrap_or_default();
                page.quarantined.push(Quarantined::new(id, reason, &raw));
            }
        };
        let mapped = match top_level {
            None => Err("the thread has no snippet.topLevelComment".to_owned()),
            Some(comment) => serde_json::from_value::<RawComment>(comment.clone())
                .map_err(|error| format!("cannot read the top-level comment: {error}"))
                .and_then(|comment| self.to_contribution(comment, video, None)),
        };
        let mut out = Vec::new();
        match mapped {
            Ok(contribution) => out.push(contribution),
            Err(reason) => quarantine(top_id.clone(), reason, thread),
        }
        let replies = thread.pointer("/replies/comments").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        let parent = top_id.as_deref().unwrap_or_default();
        for reply in replies {
            let reply_id = reply.get("id").and_then(Value::as_str).map(str::to_owned);
            let mapped = serde_json::from_value::<RawComment>(reply.clone())
                .map_err(|error| format!("cannot read the reply: {error}"))
                .and_then(|comment| self.to_contribution(comment, video, Some(parent)));
            match mapped {
                Ok(contribution) => out.push(contribution),
                Err(reason) => quarantine(reply_id, reason, reply),
            }
        }
        let total = thread.pointer("/snippet/totalReplyCount").and_then(Value::as_u64).unwrap_or(0);
        if total > replies.len() as u64 {
            tracing::debug!(
                source = %self.instance, thread = ?top_id, total, included = replies.len(),
                "youtube thread carries only some of its replies"
            );
        }
        page.contributions.extend(out);
    }
}

#[async_trait]
impl Source for YoutubeSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor: YoutubeCursor = request.stored().unwrap_or_default();
        // Streams removed from the configuration are forgotten.
        let keys: Vec<String> = self.streams.iter().map(Stream::key).collect();
        cursor.streams.retain(|key, _| keys.contains(key));
        cursor.pending.retain(|key| keys.contains(key));
        if cursor.pending.is_empty() {
            cursor.pending = keys.clone();
        }
        let Some(stream) = cursor.pending.first().and_then(|key| self.streams.iter().find(|s| &s.key() == key)) else {
            return Ok(Page::default());
        };
        let key = stream.key();
        let state = cursor.streams.get(&key).cloned().unwrap_or_default();
        let first_pass = state.watermark.is_none() && state.pass.is_none();
        let since = match &state.pass {
            Some(pass) => pass.since,
            None if first_pass => request.since,
            None => None,
        };
        let pages = state.pass.as_ref().map_or(0, |pass| pass.pages) + 1;
        let token = state.pass.as_ref().map(|pass| pass.page_token.as_str());

        let mut page = Page::default();
        let (items, next_token) = match self.fetch(stream, token, self.config.max_results, "snippet,replies").await? {
            Fetched::Threads { items, next_page_token } => (items, next_page_token),
            Fetched::BudgetSpent { resets_at } => {
                tracing::info!(
                    source = %self.instance, budget = self.config.daily_quota_units, resets_at = %resets_at,
                    "youtube daily_quota_units spent; the next poll after midnight Pacific Time resumes"
                );
                // The stored cursor already says where to resume.
                return Ok(page);
            }
            Fetched::Skip { reason, message } => {
                tracing::warn!(source = %self.instance, stream = %key, ?reason, %message, "youtube stream skipped");
                cursor.pending.remove(0);
                page.has_more = !cursor.pending.is_empty();
                page.next_cursor = Some(Cursor::from_json(&cursor));
                return Ok(page);
            }
            Fetched::InvalidPageToken => {
                tracing::warn!(
                    source = %self.instance, stream = %key,
                    "youtube no longer accepts the stored pageToken; the pass starts again next round"
                );
                cursor.streams.insert(key, StreamCursor { watermark: state.watermark, pass: None });
                cursor.pending.remove(0);
                page.has_more = !cursor.pending.is_empty();
                page.next_cursor = Some(Cursor::from_json(&cursor));
                return Ok(page);
            }
        };

        let fetched = items.len();
        let watermark = state.watermark;
        let mut newest = None::<DateTime<Utc>>;
        let (mut reached_watermark, mut passed_since) = (false, false);
        for thread in &items {
            let published = thread_published_at(thread);
            if let Some(at) = published {
                newest = newest.max(Some(at));
                if watermark.is_some_and(|watermark| at <= watermark) {
                    reached_watermark = true;
                }
                if since.is_some_and(|since| at < since) {
                    passed_since = true;
                    continue;
                }
            }
            let already_seen = watermark.zip(published).is_some_and(|(watermark, at)| at <= watermark);
            self.map_thread(thread, already_seen, &mut page);
        }

        let top = state.pass.as_ref().and_then(|pass| pass.top).max(newest);
        let cap_hit = pages >= self.config.max_pages_per_poll.max(1);
        let first_page_only = first_pass && since.is_none();
        let pass_over = next_token.is_none() || reached_watermark || passed_since || first_page_only;
        let paused = cap_hit && !pass_over;
        let next = match next_token {
            Some(page_token) if !pass_over => StreamCursor {
                watermark,
                pass: Some(PassState { page_token, top, pages: if paused { 0 } else { pages }, since }),
            },
            _ => StreamCursor { watermark: watermark.max(top), pass: None },
        };
        if paused {
            tracing::info!(
                source = %self.instance, stream = %key, pages,
                "youtube pass paused at max_pages_per_poll; the next poll resumes it"
            );
        }
        if pass_over {
            tracing::info!(source = %self.instance, stream = %key, watermark = ?next.watermark, pages, "youtube pass complete");
        }
        tracing::debug!(
            source = %self.instance, stream = %key, fetched,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            pass_over, "youtube page polled"
        );
        if next == StreamCursor::default() {
            cursor.streams.remove(&key);
        } else {
            cursor.streams.insert(key, next);
        }
        if pass_over || paused {
            cursor.pending.remove(0);
            page.has_more = !cursor.pending.is_empty();
        } else {
            page.has_more = true;
        }
        // Nothing seen yet (no comments anywhere): keep no cursor, so the
        // next pass is still a first one and honours `since`.
        page.next_cursor = (cursor != YoutubeCursor::default()).then(|| Cursor::from_json(&cursor));
        Ok(page)
    }

    /// Lists one thread id of the first stream (`part=id`, one unit): the key
    /// is accepted and the stream exists. A video with comments disabled
    /// still proves the key works.
    async fn check(&self) -> Result<(), SourceError> {
        let Some(stream) = self.streams.first() else {
            return Ok(());
        };
        match self.fetch(stream, None, 1, "id").await? {
            Fetched::Threads { .. } | Fetched::InvalidPageToken => Ok(()),
            Fetched::Skip { reason: SkipReason::CommentsDisabled, .. } => Ok(()),
            Fetched::Skip { reason: SkipReason::NotFound, message } => {
                Err(SourceError::Status { status: 404, message: format!("{}: {message}", stream.key()) })
            }
            Fetched::BudgetSpent { resets_at } => {
                Err(rate_limited(safe_target(&self.endpoint()), resets_at, Utc::now(), String::new()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path, query_param, query_param_is_missing},
    };

    use super::*;

    const KEY: &str = "AIza-t3st-k3y";
    const VIDEO: &str = "CeAvbVpBWR4";
    const API_PATH: &str = "/youtube/v3/commentThreads";

    fn options() -> HttpOptions {
        HttpOptions {
            max_retries: 0,
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(5),
            ..HttpOptions::default()
        }
    }

    /// A config for `server` from `extra` settings; the key is read from a
    /// secret file that `source` removes once the key is resolved.
    fn config(server: &MockServer, extra: Value) -> YoutubeConfig {
        let mut doc = serde_json::json!({
            "api_key": {"env": "UNUSED"},
            "base_url": format!("{}/youtube/v3", server.uri()),
            "video_ids": [VIDEO],
        });
        for (name, value) in extra.as_object().cloned().unwrap_or_default() {
            doc[name] = value;
        }
        serde_json::from_value(doc).unwrap()
    }

    fn source(mut config: YoutubeConfig) -> YoutubeSource {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tributary-youtube-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("api_key");
        std::fs::write(&file, format!("{KEY}\n")).unwrap();
        config.api_key = SecretRef::File(file);
        let source = YoutubeSource::new("channel", config, options()).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        source
    }

    fn fixture() -> Fixture {
        Fixture::load("youtube", "comment_threads_page")
    }

    /// The recorded threads, for deriving modified copies.
    fn threads() -> Vec<Value> {
        fixture().body["items"].as_array().cloned().unwrap()
    }

    /// The recorded page with `items` and `nextPageToken` replaced.
    fn with_threads(items: Vec<Value>, next: Option<&str>) -> ResponseTemplate {
        let mut fixture = fixture();
        fixture.body["items"] = Value::Array(items);
        match next {
            Some(token) => fixture.body["nextPageToken"] = token.into(),
            None => {
                fixture.body.as_object_mut().unwrap().remove("nextPageToken");
            }
        }
        fixture.response()
    }

    fn thread_mut<'a>(items: &'a mut [Value], id: &str) -> &'a mut Value {
        items.iter_mut().find(|thread| thread["id"] == id).unwrap()
    }

    /// The standard Google API error envelope (as in the errors guide and
    /// the bodies quoted in public issue reports).
    fn google_error(status: u16, domain: &str, reason: &str, message: &str) -> ResponseTemplate {
        ResponseTemplate::new(status).set_body_json(serde_json::json!({
            "error": {
                "code": status,
                "message": message,
                "errors": [{"message": message, "domain": domain, "reason": reason}]
            }
        }))
    }

    fn quota_exceeded() -> ResponseTemplate {
        google_error(
            403,
            "youtube.quota",
            "quotaExceeded",
            "The request cannot be completed because you have exceeded your <a href=\"/youtube/v3/getting-started#quota\">quota</a>.",
        )
    }

    async fn serve(server: &MockServer, response: ResponseTemplate) {
        Mock::given(method("GET")).and(path(API_PATH)).respond_with(response).mount(server).await;
    }

    /// Serves the recorded threads in two pages: the first `split` threads
    /// with `nextPageToken=PAGE2`, then the others.
    async fn serve_two_pages(server: &MockServer, split: usize) {
        let all = threads();
        let (newest, older) = all.split_at(split);
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .and(query_param_is_missing("pageToken"))
            .respond_with(with_threads(newest.to_vec(), Some("PAGE2")))
            .expect(1)
            .mount(server)
            .await;
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .and(query_param("pageToken", "PAGE2"))
            .respond_with(with_threads(older.to_vec(), None))
            .expect(1)
            .mount(server)
            .await;
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn cursor(page: &Page) -> YoutubeCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn stream_cursor(page: &Page) -> StreamCursor {
        cursor(page).streams.get(&format!("video:{VIDEO}")).cloned().unwrap_or_default()
    }

    fn watermark_at(watermark: &str) -> Option<Cursor> {
        let mut cursor = YoutubeCursor::default();
        cursor.streams.insert(format!("video:{VIDEO}"), StreamCursor { watermark: Some(at(watermark)), pass: None });
        Some(Cursor::from_json(&cursor))
    }

    fn top_ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().filter(|c| c.kind == Kind::Comment).map(|c| c.external_id.as_str()).collect()
    }

    fn find<'a>(page: &'a Page, id: &str) -> &'a Contribution {
        page.contributions.iter().find(|c| c.external_id == id).unwrap()
    }

    fn thread_ids(items: &[Value]) -> Vec<String> {
        items.iter().map(|thread| thread["id"].as_str().unwrap().to_owned()).collect()
    }

    /// One expected comment of the fixture, checked by value.
    struct Expect {
        id: &'static str,
        kind: Kind,
        parent: Option<&'static str>,
        author_id: &'static str,
        handle: &'static str,
        score: f64,
        created_at: &'static str,
        updated_at: &'static str,
        edited: bool,
        body_starts: &'static str,
    }

    fn check(page: &Page, expect: &Expect) {
        let c = find(page, expect.id);
        let at_ = expect.id;
        assert_eq!(c.platform, "youtube", "{at_}");
        assert_eq!(c.source, "channel", "{at_}");
        assert_eq!(c.kind, expect.kind, "{at_}");
        assert_eq!(c.parent_id.as_deref(), expect.parent, "{at_}");
        assert_eq!(c.thread_id.as_deref(), Some(VIDEO), "{at_}");
        assert_eq!(
            c.url.as_deref(),
            Some(format!("https://www.youtube.com/watch?v={VIDEO}&lc={}", expect.id).as_str()),
            "{at_}"
        );
        assert_eq!(c.author.id, expect.author_id, "{at_}");
        assert_eq!(c.author.handle.as_deref(), Some(expect.handle), "{at_}");
        assert_eq!(c.author.display_name.as_deref(), Some(expect.handle), "{at_}");
        assert_eq!(
            c.author.profile_url.as_deref(),
            Some(format!("http://www.youtube.com/channel/{}", expect.author_id).as_str()),
            "{at_}"
        );
        assert_eq!(c.author.email, None, "{at_}");
        assert_eq!(c.score, Some(expect.score), "{at_}");
        assert_eq!(c.created_at, at(expect.created_at), "{at_}");
        assert_eq!(c.updated_at, Some(at(expect.updated_at)), "{at_}");
        assert_eq!(c.edited, expect.edited, "{at_}");
        assert!(!c.deleted, "{at_}");
        assert!(c.body.starts_with(expect.body_starts), "{at_}: {:?}", c.body);
        assert_eq!((c.title.as_deref(), c.language.as_deref(), c.signals.as_ref()), (None, None, None), "{at_}");
        assert!(c.tags.is_empty(), "{at_}");
    }

    #[tokio::test]
    async fn maps_the_recorded_threads_and_their_replies() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .and(query_param("part", "snippet,replies"))
            .and(query_param("order", "time"))
            .and(query_param("maxResults", "100"))
            .and(query_param("textFormat", "plainText"))
            .and(query_param("videoId", VIDEO))
            .and(query_param("key", KEY))
            .and(query_param_is_missing("pageToken"))
            .and(query_param_is_missing("allThreadsRelatedToChannelId"))
            .respond_with(fixture().response())
            .expect(1)
            .mount(&server)
            .await;
        let page = source(config(&server, serde_json::json!({}))).poll(&PollRequest::default()).await.unwrap();

        assert!(page.quarantined.is_empty(), "{:?}", page.quarantined);
        assert_eq!(page.contributions.len(), 141);
        assert_eq!(top_ids(&page), thread_ids(&threads()));
        assert_eq!(page.contributions.iter().filter(|c| c.kind == Kind::Reply).count(), 41);
        let expected = [
            Expect {
                id: "UgwY4-fKdUWIXRIMaI54AaABAg",
                kind: Kind::Comment,
                parent: None,
                author_id: "UC64C0tlfN-t1IhRpFxrqLEw",
                handle: "elRolo",
                score: 1.0,
                created_at: "2020-05-14T22:23:00Z",
                updated_at: "2020-05-14T22:23:00Z",
                edited: false,
                body_starts: "6:03 a lo que vinieron",
            },
            Expect {
                id: "UgyW3oDWo5PMqRULk5h4AaABAg",
                kind: Kind::Comment,
                parent: None,
                author_id: "UCYFpfOFVnKkCnJeYCuE8yPg",
                handle: "Edgar Baeza",
                score: 5.0,
                created_at: "2017-09-06T00:07:57Z",
                updated_at: "2017-09-08T15:55:46Z",
                edited: true,
                body_starts: "Te recomiendo que desinstales Babel ES6/ES7",
            },
            Expect {
                id: "UgyNiSwdhxJ8F-cyZOF4AaABAg.8kOTRn8m0Tc8kP9EcD41gv",
                kind: Kind::Reply,
                parent: Some("UgyNiSwdhxJ8F-cyZOF4AaABAg"),
                author_id: "UCJgGc8pQO1lv04VXrBxA_Hg",
                handle: "Carlos Azaustre",
                score: 1.0,
                created_at: "2018-08-26T06:25:54Z",
                updated_at: "2018-08-26T06:25:54Z",
                edited: false,
                body_starts: "A mi con Atom me pasaba igual.",
            },
            Expect {
                id: "UgznXGF_IK-x0G68WFF4AaABAg",
                kind: Kind::Comment,
                parent: None,
                author_id: "UCvZneHeP77kY9ARwhtKD1nA",
                handle: "Jose Moreno Gómez",
                score: 0.0,
                created_at: "2020-05-11T20:39:54Z",
                updated_at: "2020-05-11T20:39:54Z",
                edited: false,
                // "\r\n\n\n" folded to one blank line.
                body_starts: "Bracket Pair Colorizer\n\nTe marca los (),{},[] de diferente color",
            },
        ];
        for expect in &expected {
            check(&page, expect);
        }
        // Plain text is kept as typed: nothing that looks like a tag is lost.
        assert!(find(&page, "UgzfvFsv64-FfsTZ-B54AaABAg").body.contains("ASI {<HTML></HTML>} PERO"));
        let edited: Vec<_> = page.contributions.iter().filter(|c| c.edited).map(|c| c.external_id.as_str()).collect();
        assert_eq!(edited, ["UgwvFzctC7nOQwcPLPd4AaABAg", "UgyFZzRZ-YAM1m_BEmN4AaABAg", "UgyW3oDWo5PMqRULk5h4AaABAg"]);
        // This thread has 6 replies; the API sent (and we map) 5 of them.
        let parent = "UgyBdB76oI8S6778QWh4AaABAg";
        let replies = page.contributions.iter().filter(|c| c.parent_id.as_deref() == Some(parent)).count();
        assert_eq!(replies, 5);
        // A first poll without `since` reads the newest page only.
        assert!(!page.has_more);
        let expected = StreamCursor { watermark: Some(at("2020-05-14T22:23:00Z")), pass: None };
        assert_eq!(stream_cursor(&page), expected);
        assert!(cursor(&page).pending.is_empty());
    }

    #[tokio::test]
    async fn a_poll_with_nothing_new_stops_at_the_watermark_and_returns_the_page_unchanged() {
        let server = MockServer::start().await;
        // The recorded page says there are older pages: none is fetched.
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .and(query_param_is_missing("pageToken"))
            .respond_with(fixture().response())
            .expect(2)
            .mount(&server)
            .await;
        let source = source(config(&server, serde_json::json!({})));
        let first = source.poll(&PollRequest::default()).await.unwrap();
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert!(!second.has_more);
        assert_eq!(cursor(&second), cursor(&first), "the cursor does not move");
        assert!(second.quarantined.is_empty());
        let hashes = |page: &Page| page.contributions.iter().map(Contribution::content_hash).collect::<Vec<_>>();
        assert_eq!(hashes(&second), hashes(&first), "already seen items come back identical");
    }

    #[tokio::test]
    async fn pages_back_with_page_tokens_down_to_the_stored_watermark() {
        let server = MockServer::start().await;
        serve_two_pages(&server, 50).await;
        let source = source(config(&server, serde_json::json!({})));
        let all = thread_ids(&threads());
        // Thread 70 (2017-10-25) was the newest of the previous pass.
        let request = PollRequest { cursor: watermark_at("2017-10-25T11:11:37Z"), since: None };

        let first = source.poll(&request).await.unwrap();
        assert_eq!(top_ids(&first), all[..50]);
        assert!(first.has_more);
        let pass =
            PassState { page_token: "PAGE2".into(), top: Some(at("2020-05-14T22:23:00Z")), pages: 1, since: None };
        let expected = StreamCursor { watermark: Some(at("2017-10-25T11:11:37Z")), pass: Some(pass) };
        assert_eq!(stream_cursor(&first), expected, "the watermark waits for the end of the pass");
        assert_eq!(cursor(&first).pending, [format!("video:{VIDEO}")]);

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        // The whole fetched page, the already committed threads included.
        assert_eq!(top_ids(&second), all[50..]);
        assert!(!second.has_more);
        let expected = StreamCursor { watermark: Some(at("2020-05-14T22:23:00Z")), pass: None };
        assert_eq!(stream_cursor(&second), expected);
        assert!(cursor(&second).pending.is_empty());
    }

    #[tokio::test]
    async fn a_later_pass_pauses_at_max_pages_and_the_next_poll_resumes_it() {
        let server = MockServer::start().await;
        serve_two_pages(&server, 50).await;
        let source = source(config(&server, serde_json::json!({"max_pages_per_poll": 1})));
        let request = PollRequest { cursor: watermark_at("2017-10-25T11:11:37Z"), since: None };

        let first = source.poll(&request).await.unwrap();
        assert_eq!(top_ids(&first).len(), 50);
        assert!(!first.has_more, "the cap ends this poll");
        let paused =
            PassState { page_token: "PAGE2".into(), top: Some(at("2020-05-14T22:23:00Z")), pages: 0, since: None };
        let expected = StreamCursor { watermark: Some(at("2017-10-25T11:11:37Z")), pass: Some(paused) };
        assert_eq!(stream_cursor(&first), expected, "the watermark must not jump");

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(top_ids(&second).len(), 50);
        assert!(!second.has_more);
        assert_eq!(stream_cursor(&second).watermark, Some(at("2020-05-14T22:23:00Z")));
        assert_eq!(stream_cursor(&second).pass, None);
    }

    #[tokio::test]
    async fn first_poll_honours_since() {
        let server = MockServer::start().await;
        serve_two_pages(&server, 10).await;
        let source = source(config(&server, serde_json::json!({})));
        let oldest = at("2019-01-01T00:00:00Z");
        let since = Some(oldest);
        let all = thread_ids(&threads());

        let first = source.poll(&PollRequest { cursor: None, since }).await.unwrap();
        assert_eq!(top_ids(&first), all[..10]);
        assert!(first.has_more);
        assert_eq!(stream_cursor(&first).pass.unwrap().since, since);
        // The cursor carries `since`: the daemon need not repeat it.
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        // Threads 10..=21 are from 2019 on; thread 22 (2018-12-27) ends the pass.
        assert_eq!(top_ids(&second), all[10..22]);
        assert!(second.contributions.iter().all(|c| c.created_at >= oldest));
        assert!(!second.has_more);
        let expected = StreamCursor { watermark: Some(at("2020-05-14T22:23:00Z")), pass: None };
        assert_eq!(stream_cursor(&second), expected);
    }

    #[tokio::test]
    async fn an_edit_changes_the_contribution() {
        let server = MockServer::start().await;
        let mut items = threads();
        let top = &mut thread_mut(&mut items, "UgwY4-fKdUWIXRIMaI54AaABAg")["snippet"]["topLevelComment"]["snippet"];
        top["textOriginal"] = "6:03 a lo que vinieron (editado)".into();
        top["textDisplay"] = "6:03 a lo que vinieron (editado)".into();
        top["updatedAt"] = "2020-05-15T08:00:00Z".into();
        top["likeCount"] = 4.into();
        let reply = &mut thread_mut(&mut items, "UgyNiSwdhxJ8F-cyZOF4AaABAg")["replies"]["comments"][1]["snippet"];
        reply["textOriginal"] = "Cambié a VSCode y va mucho más fluido.".into();
        reply["updatedAt"] = "2018-08-27T10:00:00Z".into();
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .respond_with(fixture().response())
            .up_to_n_times(1)
            .mount(&server)
            .await;
        serve(&server, with_threads(items, Some("NEXT"))).await;
        let source = source(config(&server, serde_json::json!({})));

        let before = source.poll(&PollRequest::default()).await.unwrap();
        let after = source.poll(&PollRequest { cursor: before.next_cursor.clone(), since: None }).await.unwrap();
        let changed: Vec<_> = after
            .contributions
            .iter()
            .filter(|c| c.content_hash() != find(&before, &c.external_id).content_hash())
            .map(|c| c.external_id.as_str())
            .collect();
        assert_eq!(changed, ["UgwY4-fKdUWIXRIMaI54AaABAg", "UgyNiSwdhxJ8F-cyZOF4AaABAg.8kOTRn8m0Tc8kP9EcD41gv"]);
        let comment = find(&after, "UgwY4-fKdUWIXRIMaI54AaABAg");
        assert!(comment.edited);
        assert_eq!(comment.body, "6:03 a lo que vinieron (editado)");
        assert_eq!(comment.updated_at, Some(at("2020-05-15T08:00:00Z")));
        assert_eq!(comment.score, Some(4.0));
        let reply = find(&after, "UgyNiSwdhxJ8F-cyZOF4AaABAg.8kOTRn8m0Tc8kP9EcD41gv");
        assert!(reply.edited && reply.body == "Cambié a VSCode y va mucho más fluido.");
        assert_eq!(cursor(&after), cursor(&before));
    }

    #[tokio::test]
    async fn quota_signals_stop_every_request_until_they_lift() {
        let cases = [
            // (answer, reason, the wait is the rest of the Pacific day)
            (quota_exceeded(), "quotaExceeded", true),
            (
                google_error(403, "usageLimits", "dailyLimitExceeded", "Daily Limit Exceeded"),
                "dailyLimitExceeded",
                true,
            ),
            (google_error(403, "usageLimits", "rateLimitExceeded", "Rate Limit Exceeded"), "rateLimitExceeded", false),
        ];
        for (answer, reason, whole_day) in cases {
            let server = MockServer::start().await;
            Mock::given(method("GET")).and(path(API_PATH)).respond_with(answer).expect(1).mount(&server).await;
            let source = source(config(&server, serde_json::json!({})));
            let until_reset = (next_quota_reset(Utc::now()) - Utc::now()).to_std().unwrap();

            let error = source.poll(&PollRequest::default()).await.unwrap_err();
            let SourceError::Http(HttpError::RateLimited { retry_after, body, target }) = &error else {
                panic!("{reason}: expected RateLimited, got {error:?}");
            };
            assert!(body.contains(reason), "{reason}: {body}");
            assert!(target.ends_with(API_PATH) && !target.contains(KEY), "{target}");
            if whole_day {
                let diff = until_reset.abs_diff(*retry_after);
                assert!(diff < Duration::from_secs(5), "{reason}: {retry_after:?} vs {until_reset:?}");
            } else {
                assert!(*retry_after <= SHORT_LIMIT_PAUSE && *retry_after > Duration::from_secs(90), "{retry_after:?}");
            }
            // While it holds, neither a poll nor a check sends a request.
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                assert!(
                    matches!(&error, SourceError::Http(HttpError::RateLimited { body, .. }) if body.is_empty()),
                    "{reason}: {error:?}"
                );
            }
            assert!(!error.to_string().contains(KEY));
        }
    }

    #[tokio::test]
    async fn the_daily_budget_ends_the_poll_and_the_next_day_resumes_it() {
        let server = MockServer::start().await;
        let all = threads();
        for (token, range, next) in
            [(None, 0..10, Some("PAGE2")), (Some("PAGE2"), 10..20, Some("PAGE3")), (Some("PAGE3"), 20..30, None)]
        {
            let mock = Mock::given(method("GET")).and(path(API_PATH));
            let mock = match token {
                Some(token) => mock.and(query_param("pageToken", token)),
                None => mock.and(query_param_is_missing("pageToken")),
            };
            mock.respond_with(with_threads(all[range].to_vec(), next)).expect(1).mount(&server).await;
        }
        let source = source(config(&server, serde_json::json!({"daily_quota_units": 2})));
        let since = Some(at("2000-01-01T00:00:00Z"));

        let first = source.poll(&PollRequest { cursor: None, since }).await.unwrap();
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since }).await.unwrap();
        assert!(first.has_more && second.has_more);
        let spent = source.poll(&PollRequest { cursor: second.next_cursor.clone(), since }).await.unwrap();
        assert!(spent.contributions.is_empty() && !spent.has_more);
        assert!(spent.next_cursor.is_none(), "the stored cursor is kept: it resumes the pass");
        assert_eq!(server.received_requests().await.unwrap().len(), 2, "no request over the budget");

        // The next Pacific day the pass resumes where it stopped.
        let yesterday = quota_day(Utc::now()).pred_opt().unwrap();
        source.lock_quota().day = Some(yesterday);
        let third = source.poll(&PollRequest { cursor: second.next_cursor.clone(), since }).await.unwrap();
        assert_eq!(top_ids(&third), thread_ids(&all[20..30]));
        assert!(!third.has_more);
        assert_eq!(stream_cursor(&third).watermark, Some(at("2020-05-14T22:23:00Z")));
    }

    #[test]
    fn the_quota_ledger_counts_per_pacific_day() {
        let mut ledger = QuotaLedger::default();
        // 2024-01-10 07:59 UTC is still 2024-01-09 in Pacific (standard) time.
        let evening = at("2024-01-10T07:00:00Z");
        assert_eq!(ledger.admit(evening, 2), Admission::Go);
        assert_eq!(ledger.admit(evening, 2), Admission::Go);
        let reset = at("2024-01-10T08:00:00Z");
        assert_eq!(ledger.admit(at("2024-01-10T07:59:59Z"), 2), Admission::BudgetSpent { resets_at: reset });
        assert_eq!(ledger.admit(reset, 2), Admission::Go, "a new Pacific day, a new budget");

        ledger.block_until(at("2024-01-11T08:00:00Z"));
        let until = at("2024-01-11T08:00:00Z");
        assert_eq!(ledger.admit(at("2024-01-10T20:00:00Z"), 100), Admission::Blocked { until });
        assert_eq!(ledger.admit(until, 100), Admission::Go);
    }

    #[test]
    fn quota_resets_at_midnight_pacific_time_across_daylight_saving() {
        let cases = [
            // (now, Pacific day, next reset)
            ("2024-01-10T07:59:59Z", "2024-01-09", "2024-01-10T08:00:00Z"),
            ("2024-01-10T08:00:00Z", "2024-01-10", "2024-01-11T08:00:00Z"),
            ("2024-07-01T06:30:00Z", "2024-06-30", "2024-07-01T07:00:00Z"),
            ("2024-07-01T07:00:00Z", "2024-07-01", "2024-07-02T07:00:00Z"),
            // DST starts Sunday 2024-03-10 at 02:00 PST (10:00 UTC).
            ("2024-03-09T12:00:00Z", "2024-03-09", "2024-03-10T08:00:00Z"),
            ("2024-03-10T09:59:00Z", "2024-03-10", "2024-03-11T07:00:00Z"),
            ("2024-03-10T10:00:00Z", "2024-03-10", "2024-03-11T07:00:00Z"),
            // DST ends Sunday 2024-11-03 at 02:00 PDT (09:00 UTC).
            ("2024-11-02T12:00:00Z", "2024-11-02", "2024-11-03T07:00:00Z"),
            ("2024-11-03T08:59:00Z", "2024-11-03", "2024-11-04T08:00:00Z"),
            ("2024-11-03T09:00:00Z", "2024-11-03", "2024-11-04T08:00:00Z"),
        ];
        for (now, day, reset) in cases {
            assert_eq!(quota_day(at(now)).to_string(), day, "{now}");
            assert_eq!(next_quota_reset(at(now)), at(reset), "{now}");
        }
    }

    #[tokio::test]
    async fn a_video_with_comments_disabled_or_gone_is_skipped_and_the_others_go_on() {
        let disabled = google_error(
            403,
            "youtube.commentThread",
            "commentsDisabled",
            "The video identified by the <code><a href=\"/youtube/v3/docs/commentThreads/list#videoId\">videoId</a></code> parameter has disabled comments.",
        );
        let gone = google_error(
            404,
            "youtube.commentThread",
            "videoNotFound",
            "The video identified by the <code><a href=\"/youtube/v3/docs/commentThreads/list#videoId\">videoId</a></code> parameter could not be found.",
        );
        for (answer, check_ok) in [(disabled, true), (gone, false)] {
            let server = MockServer::start().await;
            Mock::given(method("GET"))
                .and(path(API_PATH))
                .and(query_param("videoId", "quietVideo1"))
                .respond_with(answer)
                .mount(&server)
                .await;
            Mock::given(method("GET"))
                .and(path(API_PATH))
                .and(query_param("videoId", VIDEO))
                .respond_with(fixture().response())
                .mount(&server)
                .await;
            let source = source(config(&server, serde_json::json!({"video_ids": ["quietVideo1", VIDEO]})));

            let skipped = source.poll(&PollRequest::default()).await.unwrap();
            assert!(skipped.contributions.is_empty() && skipped.has_more);
            assert_eq!(cursor(&skipped).pending, [format!("video:{VIDEO}")]);
            let next = source.poll(&PollRequest { cursor: skipped.next_cursor.clone(), since: None }).await.unwrap();
            assert_eq!(next.contributions.len(), 141);
            assert!(!next.has_more);
            assert!(!cursor(&next).streams.contains_key("video:quietVideo1"));
            // `check` asks about the first video: disabled comments still prove the key.
            assert_eq!(source.check().await.is_ok(), check_ok);
        }
    }

    #[tokio::test]
    async fn malformed_comments_are_quarantined_and_the_rest_goes_on() {
        let server = MockServer::start().await;
        let mut items = threads();
        thread_mut(&mut items, "UgwY4-fKdUWIXRIMaI54AaABAg")["snippet"]["topLevelComment"]
            .as_object_mut()
            .unwrap()
            .remove("id");
        thread_mut(&mut items, "UgznXGF_IK-x0G68WFF4AaABAg")["snippet"]["topLevelComment"]["snippet"]["publishedAt"] =
            "last Tuesday".into();
        let no_text =
            &mut thread_mut(&mut items, "UgwGSBCsLYWI7FA6Aqt4AaABAg")["snippet"]["topLevelComment"]["snippet"];
        no_text.as_object_mut().unwrap().remove("textOriginal");
        no_text.as_object_mut().unwrap().remove("textDisplay");
        // A broken reply: its thread and the other reply go on.
        thread_mut(&mut items, "UgyNiSwdhxJ8F-cyZOF4AaABAg")["replies"]["comments"][0]["snippet"]["likeCount"] =
            "many".into();
        // No channel id and no textOriginal: fall back, not malformed.
        let fallback =
            &mut thread_mut(&mut items, "UgyOLIY5SR06TI8cSqx4AaABAg")["snippet"]["topLevelComment"]["snippet"];
        fallback.as_object_mut().unwrap().remove("authorChannelId");
        fallback.as_object_mut().unwrap().remove("textOriginal");
        thread_mut(&mut items, "UgzxMyNk4F-jQT5fUsR4AaABAg")["snippet"]
            .as_object_mut()
            .unwrap()
            .remove("topLevelComment");
        serve(&server, with_threads(items, None)).await;

        let source = source(config(&server, serde_json::json!({})));
        let page = source.poll(&PollRequest::default()).await.unwrap();
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(
            quarantined,
            [
                Some("UgwY4-fKdUWIXRIMaI54AaABAg"),
                Some("UgznXGF_IK-x0G68WFF4AaABAg"),
                Some("UgwGSBCsLYWI7FA6Aqt4AaABAg"),
                Some("UgzxMyNk4F-jQT5fUsR4AaABAg"),
                Some("UgyNiSwdhxJ8F-cyZOF4AaABAg.8kOTRn8m0Tc8kQYuMNjsck"),
            ]
        );
        let reasons: Vec<_> = page.quarantined.iter().map(|q| q.reason.as_str()).collect();
        assert!(reasons[0].contains("id"), "{}", reasons[0]);
        assert!(reasons[1].contains("input") || reasons[1].contains("publishedAt"), "{}", reasons[1]);
        assert!(reasons[2].contains("textOriginal"), "{}", reasons[2]);
        assert!(reasons[3].contains("topLevelComment"), "{}", reasons[3]);
        assert!(page.quarantined[4].raw.contains("muchas gracias por reponder"));
        assert_eq!(page.contributions.len(), 141 - 5);
        let fallback = find(&page, "UgyOLIY5SR06TI8cSqx4AaABAg");
        assert_eq!(fallback.author.id, fallback.author.handle.clone().unwrap());
        assert!(!fallback.body.is_empty());
        assert!(find(&page, "UgyNiSwdhxJ8F-cyZOF4AaABAg.8kOTRn8m0Tc8kP9EcD41gv").kind == Kind::Reply);
        // The unreadable date does not hold the watermark back.
        assert_eq!(stream_cursor(&page).watermark, Some(at("2020-05-14T22:23:00Z")));

        // The next pass reports again only what it cannot place below the watermark.
        let again = source.poll(&PollRequest { cursor: page.next_cursor.clone(), since: None }).await.unwrap();
        let quarantined: Vec<_> = again.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [Some("UgznXGF_IK-x0G68WFF4AaABAg"), Some("UgzxMyNk4F-jQT5fUsR4AaABAg")]);
        assert_eq!(again.contributions, page.contributions);
    }

    #[tokio::test]
    async fn a_body_that_is_not_a_thread_list_is_a_decode_error() {
        let answers = [
            (ResponseTemplate::new(200).set_body_string("<html>Service Unavailable</html>"), "JSON"),
            (
                ResponseTemplate::new(200).set_body_json(serde_json::json!({"kind": "youtube#videoListResponse"})),
                "items",
            ),
        ];
        for (answer, mentions) in answers {
            let server = MockServer::start().await;
            serve(&server, answer).await;
            let error = source(config(&server, serde_json::json!({}))).poll(&PollRequest::default()).await.unwrap_err();
            assert!(
                matches!(&error, SourceError::Decode(message) if message.contains(mentions) && message.contains(API_PATH)),
                "{error:?}"
            );
        }
        // An empty listing that leaves `items` out is just empty.
        let server = MockServer::start().await;
        let mut empty = fixture();
        for field in ["items", "nextPageToken"] {
            empty.body.as_object_mut().unwrap().remove(field);
        }
        serve(&server, empty.response()).await;
        let page = source(config(&server, serde_json::json!({}))).poll(&PollRequest::default()).await.unwrap();
        assert!(page.contributions.is_empty() && !page.has_more && page.next_cursor.is_none());
    }

    #[tokio::test]
    async fn refusals_map_to_auth_and_other_statuses_to_status() {
        let key_invalid_now = ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "error": {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "errors": [{"message": "API key not valid. Please pass a valid API key.", "domain": "global", "reason": "badRequest"}],
                "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
            }
        }));
        let cases = [
            (google_error(400, "usageLimits", "keyInvalid", "Bad Request"), None),
            (key_invalid_now, None),
            (google_error(403, "global", "forbidden", "Forbidden"), None),
            (google_error(401, "global", "required", "Login Required"), None),
            (google_error(400, "youtube.parameter", "invalidParameter", "Invalid value"), Some(400)),
            (google_error(404, "global", "notFound", "Not Found"), Some(404)),
        ];
        for (answer, status) in cases {
            let server = MockServer::start().await;
            serve(&server, answer).await;
            let source = source(config(&server, serde_json::json!({})));
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                assert!(!error.to_string().contains(KEY), "{error}");
                match (error, status) {
                    (SourceError::Auth(_), None) => {}
                    (SourceError::Status { status: got, .. }, Some(status)) => assert_eq!(got, status),
                    (other, _) => panic!("{status:?}: unexpected {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_stale_page_token_restarts_the_pass_next_round() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .and(query_param("pageToken", "stale"))
            .respond_with(google_error(400, "youtube.parameter", "invalidPageToken", "The page token is invalid."))
            .expect(1)
            .mount(&server)
            .await;
        let mut stored = YoutubeCursor::default();
        let pass =
            PassState { page_token: "stale".into(), top: Some(at("2020-05-14T22:23:00Z")), pages: 0, since: None };
        let watermark = Some(at("2019-01-01T00:00:00Z"));
        stored.streams.insert(format!("video:{VIDEO}"), StreamCursor { watermark, pass: Some(pass) });
        let request = PollRequest { cursor: Some(Cursor::from_json(&stored)), since: None };
        let page = source(config(&server, serde_json::json!({}))).poll(&request).await.unwrap();
        assert!(page.contributions.is_empty() && !page.has_more);
        assert_eq!(stream_cursor(&page), StreamCursor { watermark, pass: None }, "the watermark is kept");
    }

    #[tokio::test]
    async fn a_channel_and_videos_are_polled_in_turn() {
        let server = MockServer::start().await;
        let channel = "UCJgGc8pQO1lv04VXrBxA_Hg";
        let all = threads();
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .and(query_param("allThreadsRelatedToChannelId", channel))
            .and(query_param_is_missing("videoId"))
            .and(query_param("key", KEY))
            .respond_with(with_threads(all[..3].to_vec(), Some("MORE")))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .and(query_param("videoId", VIDEO))
            .respond_with(with_threads(all[3..5].to_vec(), None))
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, serde_json::json!({"channel_id": channel})));
        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(top_ids(&first), thread_ids(&all[..3]));
        assert!(first.has_more, "the video is still to visit");
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(top_ids(&second), thread_ids(&all[3..5]));
        assert!(!second.has_more);
        let cursor = cursor(&second);
        assert_eq!(cursor.streams.len(), 2);
        assert_eq!(cursor.streams[&format!("channel:{channel}")].watermark, Some(at("2020-05-14T22:23:00Z")));
        assert_eq!(cursor.streams[&format!("video:{VIDEO}")].watermark, Some(at("2020-04-20T01:08:57Z")));
        let json = serde_json::to_string(&cursor).unwrap();
        assert!(json.contains("\"video:CeAvbVpBWR4\":{\"watermark\":\"2020-04-20T01:08:57Z\"}"), "{json}");
    }

    #[tokio::test]
    async fn streams_no_longer_configured_are_forgotten() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        let mut stored = YoutubeCursor::default();
        let old = StreamCursor { watermark: Some(at("2019-01-01T00:00:00Z")), pass: None };
        stored.streams.insert("channel:UCgone".into(), old.clone());
        stored.streams.insert(format!("video:{VIDEO}"), old);
        stored.pending = vec!["channel:UCgone".into(), format!("video:{VIDEO}")];
        let request = PollRequest { cursor: Some(Cursor::from_json(&stored)), since: None };
        let page = source(config(&server, serde_json::json!({}))).poll(&request).await.unwrap();
        assert_eq!(page.contributions.len(), 141, "the configured video is polled");
        let cursor = cursor(&page);
        assert_eq!(cursor.streams.keys().collect::<Vec<_>>(), [&format!("video:{VIDEO}")]);
        assert!(cursor.pending.is_empty() && !page.has_more);
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: YoutubeConfig = serde_json::from_value(serde_json::json!({
            "api_key": {"env": "YOUTUBE_KEY"},
            "channel_id": "UCJgGc8pQO1lv04VXrBxA_Hg"
        }))
        .unwrap();
        assert_eq!(config.base_url.as_str(), "https://www.googleapis.com/youtube/v3");
        assert_eq!((config.max_results, config.max_pages_per_poll, config.daily_quota_units), (100, 10, 10_000));
        assert!(config.video_ids.is_empty());
        assert_eq!(config.api_key, SecretRef::Env("YOUTUBE_KEY".into()));
        for unknown in ["schedule", "api_token"] {
            let doc = serde_json::json!({"api_key": {"env": "K"}, "video_ids": ["v"], unknown: "x"});
            assert!(serde_json::from_value::<YoutubeConfig>(doc).is_err(), "{unknown}");
        }

        let build = |doc: Value| {
            let config: YoutubeConfig = serde_json::from_value(doc).unwrap();
            YoutubeSource::new("yt", config, HttpOptions::default())
        };
        let cases = [
            (serde_json::json!({"api_key": {"env": "K"}}), "NoStreams"),
            (serde_json::json!({"api_key": {"env": "K"}, "video_ids": [" "]}), "EmptyId"),
            (serde_json::json!({"api_key": {"env": "K"}, "channel_id": ""}), "EmptyId"),
            (serde_json::json!({"api_key": {"env": "K"}, "video_ids": ["v"], "max_results": 0}), "OutOfRange"),
            (serde_json::json!({"api_key": {"env": "K"}, "video_ids": ["v"], "max_results": 101}), "OutOfRange"),
            (serde_json::json!({"api_key": {"env": "K"}, "video_ids": ["v"], "max_pages_per_poll": 0}), "OutOfRange"),
            (serde_json::json!({"api_key": {"env": "K"}, "video_ids": ["v"], "daily_quota_units": 0}), "OutOfRange"),
            (
                serde_json::json!({"api_key": {"env": "K"}, "video_ids": ["v"], "base_url": "ftp://x/y"}),
                "InvalidBaseUrl",
            ),
            (serde_json::json!({"api_key": {"env": "TRIBUTARY_TEST_SURELY_UNSET"}, "video_ids": ["v"]}), "Secret"),
        ];
        for (doc, variant) in cases {
            let error = build(doc.clone()).unwrap_err();
            assert!(format!("{error:?}").starts_with(variant), "{doc}: {error:?}");
            assert!(error.to_string().starts_with("youtube"), "{error}");
        }
    }

    #[tokio::test]
    async fn the_key_is_sent_but_never_shown() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(API_PATH))
            .and(query_param("key", KEY))
            .and(query_param("part", "id"))
            .and(query_param("maxResults", "1"))
            .respond_with(with_threads(threads()[..1].to_vec(), Some("NEXT")))
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, serde_json::json!({"video_ids": [VIDEO, VIDEO]})));
        assert_eq!(source.streams.len(), 1, "duplicates are dropped");
        source.check().await.unwrap();
        assert!(!format!("{source:?}").contains(KEY), "the key leaked into Debug");
    }
}
