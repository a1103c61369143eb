//! Stack Exchange (API 2.3): the questions of a site's tags, with their
//! answers and comments.
//!
//! **Incremental model.** For each configured tag the connector asks
//! `GET /questions?site=S&tagged=TAG&sort=activity&order=asc&min=W&page=P&pagesize=N&filter=F`.
//! `min`/`max` bound the *sort* field (here `last_activity_date`), while
//! `fromdate`/`todate` bound `creation_date` (API docs, "min-max"; the API's
//! own advice on `/questions/{ids}/answers` is "to poll for updates sort by
//! activity, with a minimum date of the last time you polled"). `fromdate`
//! would miss an old question that just got an answer, so it is not used.
//! `tagged=a;b` means *all* of the tags on `/questions`, so every tag is its
//! own query, one after the other.
//!
//! `W`, the tag's watermark, is the newest `last_activity_date` (seconds)
//! of a committed page. Paging is by that key, not by page number: after
//! each page `W` moves to the newest activity on it, and the next page asks
//! `min=W, page=1` again. (A page number over an activity-sorted list shifts
//! whenever a listed question gets new activity and moves to the end, which
//! would skip the question that slides into its place.) `min` is inclusive,
//! so the questions of the boundary second come back once more; the
//! daemon's ledger drops them unchanged. Only when a whole page shares one
//! second does the cursor page by number at that `min`. Each poll fetches at
//! most [`StackExchangeConfig::max_pages_per_poll`] pages per tag; the
//! watermark covers only fetched pages, so the next poll goes on from there.
//! The first poll of a tag starts at [`PollRequest::since`], else 24 hours ago.
//!
//! For the questions of a page, `GET /questions/{ids}/answers?sort=activity&min=W`
//! gives the answers changed since `W` (posting or editing an answer moves
//! its question's `last_activity_date`, so such a question is on a page whose
//! `min` is at most the answer's activity), and one
//! `GET /posts/{ids}/comments?sort=creation&min=W` gives the new comments on
//! those questions and answers (`/posts/{ids}/comments` takes question and
//! answer ids alike, so one request covers both). Both use the same filter
//! and page the same way.
//!
//! **Mapping.** Question: [`Kind::Post`], `q:{question_id}`. Answer:
//! [`Kind::Reply`], `a:{answer_id}`, parent and thread the question. Comment:
//! [`Kind::Comment`], `c:{comment_id}`, parent its post (`q:` or `a:`).
//! Bodies come from the `withbody` filter and are HTML; titles and names are
//! HTML-encoded (the filters are "safe"): both are turned into plain text.
//! User ids are per site: `{site}/{user_id}`; an owner whose `user_type` is
//! `does_not_exist` (a deleted user) keeps the item with an empty author
//! id, which the daemon attaches to no contact. `last_edit_date` marks an edit (`edited`, `updated_at`);
//! a comment says `edited` itself.
//!
//! **What is not seen.** The API lists only undeleted posts ("Returns all
//! the undeleted answers"), so a deletion is never observed and no
//! contribution is ever marked deleted. Comments do not move a question's
//! activity: a new comment on a question (or answer) that had no other
//! activity since `W` is not seen.
//!
//! **Limits, signalled in the body** (API docs "throttle" and
//! "error-handling"): every response wraps `items` with `has_more`,
//! `quota_max`, `quota_remaining` and, at times, `backoff` (seconds during
//! which the same method must not be called again). Errors are HTTP 400 with
//! `error_id`, `error_name`, `error_message`; `throttle_violation` (502)
//! says "too many requests from this IP, more requests available in N
//! seconds" when the daily quota is gone. A `backoff` holds that method and
//! ends the poll after the current page (its cursor resumes); a
//! `quota_remaining` of 0 holds every method for [`QUOTA_HOLD`] (the quota
//! is a rolling day whose reset the API does not name); a
//! `throttle_violation` holds for the wait it names. A call under a hold
//! waits for it when it is short (up to the client's `max_inline_wait`),
//! else fails at once with [`HttpError::RateLimited`], sending nothing.
//! The API gzips every response; the shared client asks for and decodes it.
//!
//! The optional app `key` raises the daily quota from 300 to 10,000 requests;
//! the API takes it only as the `key` query parameter. The SDK's errors and
//! logs name scheme, host and path only, so the key never shows.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, SecretError, SecretRef, Source, SourceError, http::safe_target, source::check_status,
    text::html_to_text,
};
use url::Url;

const PLATFORM: &str = "stackexchange";

const DEFAULT_BASE_URL: &str = "https://api.stackexchange.com/2.3";

/// How far back the first poll of a tag looks when no `since` is given.
const FIRST_POLL_WINDOW_SECONDS: i64 = 24 * 3600;

/// The API's largest `pagesize`, and its largest `{ids}` list.
const MAX_PAGESIZE: u32 = 100;
const MAX_IDS: usize = 100;

/// Most pages of answers (or comments) fetched for one page of questions;
/// past it the rest is left out with a warning (100 questions would need
/// more than 2,500 changed answers since the watermark to get there).
const MAX_CHILD_PAGES: u32 = 25;

/// How long every method is held once `quota_remaining` reached 0. The
/// quota is a rolling day and its reset is not named: after this hold one
/// request finds out, and a `throttle_violation` then names the real wait.
pub const QUOTA_HOLD: Duration = Duration::from_secs(3600);

/// The hold after a `throttle_violation` that names no wait ("Violation of
/// backoff parameter").
const THROTTLE_FALLBACK: Duration = Duration::from_secs(60);

/// The longest hold any answer may impose.
const MAX_HOLD: Duration = Duration::from_secs(2 * 86_400);

/// Longest part of a remote error message repeated in ours.
const MAX_MESSAGE_CHARS: usize = 300;

/// Methods, as the API throttles them (`backoff` is per method).
const ALL_METHODS: &str = "*";
const QUESTIONS: &str = "/questions";
const INFO: &str = "/info";

/// A per-question listing: answers or comments of up to 100 posts.
struct ChildListing {
    /// The method, for `backoff`.
    method: &'static str,
    /// `{collection}/{ids}/{leaf}`.
    collection: &'static str,
    leaf: &'static str,
    /// The sort, and the item field it orders by (for paging by `min`).
    sort: &'static str,
    date_field: &'static str,
    id_field: &'static str,
}

const ANSWERS: ChildListing = ChildListing {
    method: "/questions/{ids}/answers",
    collection: "questions",
    leaf: "answers",
    sort: "activity",
    date_field: "last_activity_date",
    id_field: "answer_id",
};

const COMMENTS: ChildListing = ChildListing {
    method: "/posts/{ids}/comments",
    collection: "posts",
    leaf: "comments",
    sort: "creation",
    date_field: "creation_date",
    id_field: "comment_id",
};

/// Settings of one Stack Exchange site watch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackExchangeConfig {
    /// The site's API name, e.g. `stackoverflow`, `superuser`, `askubuntu`.
    /// It also scopes user ids (`stackoverflow/22656`).
    pub site: String,
    /// Questions tagged with any of these are watched (one query per tag,
    /// since `tagged=a;b` means both on `/questions`).
    pub tags: Vec<String>,
    /// App key from stackapps.com (`{ env = "..." }` or `{ file = "..." }`):
    /// raises the daily quota from 300 to 10,000 requests. The API takes it
    /// only as the `key` query parameter; errors and logs never show queries.
    #[serde(default)]
    pub key: Option<SecretRef>,
    /// Root of the API, version included.
    #[serde(default = "default_base_url")]
    pub base_url: Url,
    /// Fetch the answers changed since the watermark of each page's questions.
    #[serde(default = "default_true")]
    pub include_answers: bool,
    /// Fetch the new comments on each page's questions and answers.
    #[serde(default = "default_true")]
    pub include_comments: bool,
    /// Most pages of questions one poll fetches per tag; the next poll goes
    /// on from there (nothing is skipped).
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
    /// Questions per page, 1 to 100 (answers and comments are always asked
    /// 100 at a time, to spend as few requests as possible).
    #[serde(default = "default_pagesize")]
    pub pagesize: u32,
    /// The API filter: `withbody` is the default fields plus the bodies.
    /// Empty sends none (the API's default filter, without bodies).
    #[serde(default = "default_filter")]
    pub filter: String,
}

fn default_base_url() -> Url {
    Url::parse(DEFAULT_BASE_URL).expect("the default base URL is valid")
}

fn default_true() -> bool {
    true
}

fn default_max_pages_per_poll() -> u32 {
    10
}

fn default_pagesize() -> u32 {
    MAX_PAGESIZE
}

fn default_filter() -> String {
    "withbody".to_owned()
}

/// Why a [`StackExchangeSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("stackexchange `key`: {0}")]
    Secret(#[from] SecretError),
    #[error("stackexchange `site` must be a site's API name such as `stackoverflow`, not `{0}`")]
    InvalidSite(String),
    #[error("stackexchange `tags` must name at least one tag")]
    NoTags,
    #[error("stackexchange tag `{0}` is not a single tag (empty, or holds `;` or spaces)")]
    InvalidTag(String),
    #[error("stackexchange `pagesize` must be 1 to 100, not {0}")]
    InvalidPagesize(u32),
    #[error("stackexchange `max_pages_per_poll` must be at least 1")]
    InvalidMaxPages,
    #[error("stackexchange `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("stackexchange HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// A wait the API asked for, held in memory for the life of the source.
#[derive(Debug, Clone)]
struct Hold {
    until: Instant,
    reason: String,
}

/// Questions (and their answers and comments) of one Stack Exchange site.
#[derive(Debug)]
pub struct StackExchangeSource {
    instance: String,
    config: StackExchangeConfig,
    /// Resolved app key (its Debug output is redacted).
    key: Option<SecretString>,
    http: HttpClient,
    /// Method (or [`ALL_METHODS`]) -> no call before this instant.
    holds: Mutex<HashMap<&'static str, Hold>>,
}

/// What the cursor of a Stack Exchange source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StackExchangeCursor {
    /// Per tag, where its next page starts.
    #[serde(default)]
    tags: BTreeMap<String, TagCursor>,
    /// The pass in progress: the tag to page next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<PassState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TagCursor {
    /// Newest `last_activity_date` (Unix seconds) of a committed question of
    /// this tag: the `min` of its next request.
    watermark: i64,
    /// The page at `watermark`: past 1 only while a whole page shared one
    /// `last_activity_date`.
    #[serde(default = "first_page", skip_serializing_if = "is_first_page")]
    page: u32,
}

fn first_page() -> u32 {
    1
}

fn is_first_page(page: &u32) -> bool {
    *page <= 1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PassState {
    /// The tag whose page comes next.
    tag: String,
    /// Pages of that tag fetched by this poll so far.
    pages: u32,
}

impl TagCursor {
    fn starting(since: Option<DateTime<Utc>>) -> TagCursor {
        let watermark = since.map_or(Utc::now().timestamp() - FIRST_POLL_WINDOW_SECONDS, |since| since.timestamp());
        TagCursor { watermark, page: 1 }
    }
}

/// The common wrapper of every answer.
#[derive(Debug)]
struct Envelope {
    items: Vec<Value>,
    has_more: bool,
    /// Set when this answer asked us to slow down (backoff, spent quota).
    limited: Option<String>,
}

/// An error reported in the wrapper.
#[derive(Debug)]
struct ApiError {
    id: Option<i64>,
    name: String,
    message: String,
}

/// One page of one tag, before the cursor is worked out.
struct TagPage {
    page: Page,
    /// Newest readable `last_activity_date` of the page's questions.
    newest: Option<i64>,
    has_more: bool,
    limited: Option<String>,
}

/// What an answer or comment needs of its question.
struct QuestionInfo {
    link: String,
    title: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawOwner {
    #[serde(default)]
    user_id: Option<i64>,
    #[serde(default)]
    user_type: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    link: Option<String>,
}

/// The fields of a question this connector reads.
#[derive(Debug, Deserialize)]
struct RawQuestion {
    question_id: u64,
    title: String,
    link: String,
    creation_date: i64,
    #[serde(default)]
    last_edit_date: Option<i64>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    owner: Option<RawOwner>,
}

#[derive(Debug, Deserialize)]
struct RawAnswer {
    answer_id: u64,
    question_id: u64,
    creation_date: i64,
    #[serde(default)]
    last_edit_date: Option<i64>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    owner: Option<RawOwner>,
    #[serde(default)]
    link: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawComment {
    comment_id: u64,
    post_id: u64,
    creation_date: i64,
    #[serde(default)]
    edited: bool,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    score: Option<f64>,
    #[serde(default)]
    owner: Option<RawOwner>,
    #[serde(default)]
    link: Option<String>,
    #[serde(default)]
    post_type: Option<String>,
}

impl StackExchangeSource {
    pub fn new(
        instance: &str,
        mut config: StackExchangeConfig,
        http: HttpOptions,
    ) -> Result<StackExchangeSource, BuildError> {
        if !matches!(config.base_url.scheme(), "http" | "https") || config.base_url.cannot_be_a_base() {
            return Err(BuildError::InvalidBaseUrl(config.base_url.to_string()));
        }
        config.site = config.site.trim().to_owned();
        if config.site.is_empty() || config.site.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(BuildError::InvalidSite(config.site));
        }
        let mut tags: Vec<String> = Vec::with_capacity(config.tags.len());
        for tag in &config.tags {
            let tag = tag.trim();
            if tag.is_empty() || tag.contains(|c: char| c == ';' || c.is_whitespace()) {
                return Err(BuildError::InvalidTag(tag.to_owned()));
            }
            if !tags.iter().any(|known| known == tag) {
                tags.push(tag.to_owned());
            }
        }
        if tags.is_empty() {
            return Err(BuildError::NoTags);
        }
        config.tags = tags;
        if !(1..=MAX_PAGESIZE).contains(&config.pagesize) {
            return Err(BuildError::InvalidPagesize(config.pagesize));
        }
        if config.max_pages_per_poll == 0 {
            return Err(BuildError::InvalidMaxPages);
        }
        let key = config.key.as_ref().map(SecretRef::resolve).transpose()?;
        Ok(StackExchangeSource {
            instance: instance.to_owned(),
            http: HttpClient::new(http)?,
            config,
            key,
            holds: Mutex::new(HashMap::new()),
        })
    }

    /// `base_url` with `segments` appended, and the query every call shares.
    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = tributary_sdk::source::endpoint(&self.config.base_url, segments);
        url.query_pairs_mut().append_pair("site", &self.config.site);
        url
    }

    fn with_filter(&self, url: &mut Url) {
        if !self.config.filter.is_empty() {
            url.query_pairs_mut().append_pair("filter", &self.config.filter);
        }
    }

    fn lock_holds(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Hold>> {
        self.holds.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// No call to `method` (or to any, for [`ALL_METHODS`]) for `wait`.
    fn hold(&self, method: &'static str, wait: Duration, reason: String) {
        if method == ALL_METHODS {
            // The quota is the key's (or the address's): every source on it waits.
            self.http.hold(wait.min(MAX_HOLD));
        }
        let until = Instant::now() + wait.min(MAX_HOLD);
        let mut holds = self.lock_holds();
        if holds.get(method).is_none_or(|hold| hold.until < until) {
            holds.insert(method, Hold { until, reason });
        }
    }

    /// The longest hold on `method` still running, and why.
    fn active_hold(&self, method: &'static str) -> Option<(Duration, String)> {
        let now = Instant::now();
        let holds = self.lock_holds();
        [ALL_METHODS, method]
            .iter()
            .filter_map(|name| holds.get(name))
            .filter_map(|hold| {
                hold.until
                    .checked_duration_since(now)
                    .filter(|left| !left.is_zero())
                    .map(|left| (left, hold.reason.clone()))
            })
            .max_by_key(|(left, _)| *left)
    }

    /// Waits out a short hold on `method`; a long one fails the call before
    /// anything is sent.
    async fn honour_holds(&self, method: &'static str, target: &str) -> Result<(), SourceError> {
        while let Some((left, reason)) = self.active_hold(method) {
            if left > self.http.options().max_inline_wait {
                return Err(SourceError::Http(HttpError::RateLimited {
                    target: format!("{target} ({reason})"),
                    retry_after: left,
                    body: String::new(),
                }));
            }
            tracing::info!(source = %self.instance, method, wait_ms = left.as_millis() as u64, %reason, "stackexchange hold; waiting");
            tokio::time::sleep(left).await;
        }
        Ok(())
    }

    /// One call: honours the holds, adds the key, reads the wrapper and
    /// notes the limits it announces.
    async fn call(&self, method: &'static str, mut url: Url) -> Result<Envelope, SourceError> {
        let target = safe_target(&url);
        self.honour_holds(method, &target).await?;
        if let Some(key) = &self.key {
            url.query_pairs_mut().append_pair("key", key.expose_secret());
        }
        let response = self.http.send(self.http.get(url)).await?;
        let (mut envelope, mut fields) = self.read_envelope(method, &response)?;
        let mut limited = None;
        if let Some(backoff) = fields.remove("backoff").and_then(|value| value.as_f64()).filter(|secs| *secs > 0.0) {
            let wait = seconds(backoff);
            let reason = format!("the API asked for a backoff of {}s on {method}", wait.as_secs());
            tracing::info!(source = %self.instance, method, backoff_s = wait.as_secs(), "stackexchange backoff");
            self.hold(method, wait, reason.clone());
            limited = Some(reason);
        }
        let remaining = fields.get("quota_remaining").and_then(Value::as_i64);
        let quota_max = fields.get("quota_max").and_then(Value::as_i64);
        if remaining.is_some_and(|remaining| remaining <= 0) {
            let max = quota_max.map(|max| format!(" of {max} requests")).unwrap_or_default();
            let hint = if self.key.is_none() { "; a `key` raises it to 10,000" } else { "" };
            let reason = format!("the daily request quota{max} is used up (quota_remaining 0){hint}");
            tracing::warn!(source = %self.instance, method, quota_max, "stackexchange quota used up; holding every call");
            self.hold(ALL_METHODS, QUOTA_HOLD, reason.clone());
            limited = Some(reason);
        }
        tracing::debug!(
            source = %self.instance, %target, items = envelope.items.len(), has_more = envelope.has_more,
            quota_remaining = remaining, "stackexchange response"
        );
        envelope.limited = limited;
        Ok(envelope)
    }

    /// The wrapper of a response (and its other fields), or the error it reports.
    fn read_envelope(
        &self,
        method: &'static str,
        response: &HttpResponse,
    ) -> Result<(Envelope, serde_json::Map<String, Value>), SourceError> {
        let parsed = serde_json::from_slice::<Value>(&response.body);
        if let Ok(body) = &parsed
            && let Some(error) = api_error(body)
        {
            return Err(self.refusal(method, response, error));
        }
        check_status(response)?;
        let mut fields = match parsed {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => {
                return Err(SourceError::Decode(format!("{} answered JSON that is not an object", response.target)));
            }
            Err(error) => return Err(SourceError::Decode(format!("{} did not answer JSON: {error}", response.target))),
        };
        let items = match fields.remove("items") {
            Some(Value::Array(items)) => items,
            _ => return Err(SourceError::Decode(format!("{} answered JSON without an `items` list", response.target))),
        };
        let has_more = fields.get("has_more").and_then(Value::as_bool).unwrap_or(false);
        Ok((Envelope { items, has_more, limited: None }, fields))
    }

    /// What an error in the wrapper means for us.
    fn refusal(&self, method: &'static str, response: &HttpResponse, error: ApiError) -> SourceError {
        let ApiError { id, name, message } = error;
        let id_text = id.map(|id| format!(" ({id})")).unwrap_or_default();
        let described = format!("{name}{id_text}: {message}");
        let target = &response.target;
        let refused_key = name == "bad_parameter" && message.trim().to_ascii_lowercase().starts_with("key");
        if name == "throttle_violation" || id == Some(502) {
            let named = named_wait(&message);
            let wait = named.unwrap_or(THROTTLE_FALLBACK).min(MAX_HOLD);
            // A named wait is the IP's quota: every method waits. Otherwise
            // it is this method's backoff that was not honoured.
            self.hold(if named.is_some() { ALL_METHODS } else { method }, wait, described.clone());
            tracing::warn!(source = %self.instance, method, wait_s = wait.as_secs(), "stackexchange throttle_violation");
            return SourceError::Http(HttpError::RateLimited {
                target: format!("{target} ({described})"),
                retry_after: wait,
                body: response.body_snippet(),
            });
        }
        let refused_credentials = matches!(
            name.as_str(),
            "access_token_required"
                | "invalid_access_token"
                | "access_denied"
                | "key_required"
                | "access_token_compromised"
        ) || matches!(id, Some(401 | 402 | 403 | 405 | 406));
        if refused_credentials || refused_key {
            return SourceError::Auth(format!("{target} refused the request: {described}"));
        }
        SourceError::Status { status: response.status.as_u16(), message: format!("{target}: {described}") }
    }

    /// Every answer (or comment) item of `ids` since `lower`, paging by the
    /// listing's date field like the questions.
    async fn fetch_children(
        &self,
        listing: &ChildListing,
        ids: &[u64],
        lower: i64,
        limited: &mut Option<String>,
    ) -> Result<Vec<Value>, SourceError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for chunk in ids.chunks(MAX_IDS) {
            let joined = chunk.iter().map(u64::to_string).collect::<Vec<_>>().join(";");
            let (mut min, mut page, mut pages) = (lower, 1u32, 0u32);
            loop {
                pages += 1;
                let mut url = self.endpoint(&[listing.collection, &joined, listing.leaf]);
                url.query_pairs_mut()
                    .append_pair("sort", listing.sort)
                    .append_pair("order", "asc")
                    .append_pair("min", &min.to_string())
                    .append_pair("page", &page.to_string())
                    .append_pair("pagesize", &MAX_PAGESIZE.to_string());
                self.with_filter(&mut url);
                let envelope = self.call(listing.method, url).await?;
                if envelope.limited.is_some() {
                    limited.clone_from(&envelope.limited);
                }
                let newest = envelope.items.iter().filter_map(|item| item.get(listing.date_field)?.as_i64()).max();
                for item in envelope.items {
                    let id = item.get(listing.id_field).and_then(Value::as_u64);
                    if id.is_none_or(|id| seen.insert(id)) {
                        out.push(item);
                    }
                }
                if !envelope.has_more {
                    break;
                }
                if pages >= MAX_CHILD_PAGES {
                    tracing::warn!(
                        source = %self.instance, method = listing.method, pages,
                        "stackexchange listing still has more after the page limit; the rest is left out"
                    );
                    break;
                }
                match newest {
                    Some(newest) if newest > min => (min, page) = (newest, 1),
                    _ => page += 1,
                }
            }
        }
        Ok(out)
    }

    /// One page of questions of `tag`, with their answers and comments.
    async fn poll_tag(&self, tag: &str, state: &TagCursor) -> Result<TagPage, SourceError> {
        let mut url = self.endpoint(&["questions"]);
        url.query_pairs_mut()
            .append_pair("tagged", tag)
            .append_pair("sort", "activity")
            .append_pair("order", "asc")
            .append_pair("min", &state.watermark.to_string())
            .append_pair("page", &state.page.max(1).to_string())
            .append_pair("pagesize", &self.config.pagesize.to_string());
        self.with_filter(&mut url);
        let envelope = self.call(QUESTIONS, url).await?;
        let mut limited = envelope.limited;
        let has_more = envelope.has_more;
        let fetched = envelope.items.len();

        let mut page = Page::default();
        let mut seen = HashSet::new();
        let mut questions: HashMap<u64, QuestionInfo> = HashMap::new();
        let mut question_ids = Vec::new();
        let mut newest = None::<i64>;
        for item in envelope.items {
            // Even a malformed question moves the watermark when its
            // activity is readable: it was fetched (and quarantined).
            if let Some(at) = item.get("last_activity_date").and_then(Value::as_i64) {
                newest = Some(newest.map_or(at, |newest| newest.max(at)));
            }
            let id = item.get("question_id").and_then(Value::as_u64);
            let mapped = serde_json::from_value::<RawQuestion>(item.clone())
                .map_err(|error| format!("cannot read the question: {error}"))
                .and_then(|question| self.question(question));
            match mapped {
                Ok((contribution, question_id, info)) => {
                    if seen.insert(contribution.external_id.clone()) {
                        questions.insert(question_id, info);
                        question_ids.push(question_id);
                        page.contributions.push(contribution);
                    }
                }
                Err(reason) => page.quarantined.push(quarantine(id.map(|id| format!("q:{id}")), reason, &item)),
            }
        }

        // Answer id -> its question, for the comments' threads.
        let mut answers: HashMap<u64, u64> = HashMap::new();
        let mut answer_ids = Vec::new();
        if self.config.include_answers && !question_ids.is_empty() {
            let items = self.fetch_children(&ANSWERS, &question_ids, state.watermark, &mut limited).await?;
            for item in items {
                let id = item.get("answer_id").and_then(Value::as_u64);
                let mapped = serde_json::from_value::<RawAnswer>(item.clone())
                    .map_err(|error| format!("cannot read the answer: {error}"))
                    .and_then(|answer| self.answer(answer, &questions));
                match mapped {
                    Ok((contribution, answer_id, question_id)) => {
                        if seen.insert(contribution.external_id.clone()) {
                            answers.insert(answer_id, question_id);
                            answer_ids.push(answer_id);
                            page.contributions.push(contribution);
                        }
                    }
                    Err(reason) => page.quarantined.push(quarantine(id.map(|id| format!("a:{id}")), reason, &item)),
                }
            }
        }

        if self.config.include_comments && !question_ids.is_empty() {
            let posts: Vec<u64> = question_ids.iter().chain(&answer_ids).copied().collect();
            let items = self.fetch_children(&COMMENTS, &posts, state.watermark, &mut limited).await?;
            for item in items {
                let id = item.get("comment_id").and_then(Value::as_u64);
                let mapped = serde_json::from_value::<RawComment>(item.clone())
                    .map_err(|error| format!("cannot read the comment: {error}"))
                    .and_then(|comment| self.comment(comment, &questions, &answers));
                match mapped {
                    Ok(contribution) => {
                        if seen.insert(contribution.external_id.clone()) {
                            page.contributions.push(contribution);
                        }
                    }
                    Err(reason) => page.quarantined.push(quarantine(id.map(|id| format!("c:{id}")), reason, &item)),
                }
            }
        }

        tracing::debug!(
            source = %self.instance, tag, min = state.watermark, page = state.page, fetched,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(), has_more,
            "stackexchange page polled"
        );
        Ok(TagPage { page, newest, has_more, limited })
    }

    fn author(&self, owner: Option<RawOwner>) -> Author {
        let site = &self.config.site;
        let Some(owner) = owner else {
            return Author::default();
        };
        let name = owner.display_name.as_deref().map(html_to_text).filter(|name| !name.is_empty());
        match owner.user_id {
            Some(user_id) if owner.user_type.as_deref() != Some("does_not_exist") => Author {
                id: format!("{site}/{user_id}"),
                handle: name.clone(),
                display_name: name,
                email: None,
                profile_url: owner.link.filter(|link| !link.is_empty()),
                links: Vec::new(),
            },
            // A deleted user: the item stays, attached to no contact.
            _ => Author {
                id: String::new(),
                handle: None,
                display_name: name,
                email: None,
                profile_url: None,
                links: Vec::new(),
            },
        }
    }

    fn question(&self, question: RawQuestion) -> Result<(Contribution, u64, QuestionInfo), String> {
        let created_at = timestamp(question.creation_date, "creation_date")?;
        let edited_at = question.last_edit_date.map(|at| timestamp(at, "last_edit_date")).transpose()?;
        let title = Some(html_to_text(&question.title)).filter(|title| !title.is_empty());
        let id = format!("q:{}", question.question_id);
        let contribution = Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: id.clone(),
            url: Some(question.link.clone()),
            kind: Kind::Post,
            author: self.author(question.owner),
            title: title.clone(),
            body: question.body.as_deref().map(html_to_text).unwrap_or_default(),
            language: None,
            created_at,
            updated_at: edited_at,
            parent_id: None,
            thread_id: Some(id),
            tags: question.tags,
            score: question.score,
            edited: edited_at.is_some(),
            deleted: false,
            signals: None,
        };
        Ok((contribution, question.question_id, QuestionInfo { link: question.link, title }))
    }

    fn answer(
        &self,
        answer: RawAnswer,
        questions: &HashMap<u64, QuestionInfo>,
    ) -> Result<(Contribution, u64, u64), String> {
        let created_at = timestamp(answer.creation_date, "creation_date")?;
        let edited_at = answer.last_edit_date.map(|at| timestamp(at, "last_edit_date")).transpose()?;
        let question = questions.get(&answer.question_id);
        // The default filter may leave `link` out: `/a/{id}` on the site's host.
        let url = answer.link.filter(|link| !link.is_empty()).or_else(|| {
            question
                .and_then(|question| origin(&question.link))
                .map(|origin| format!("{origin}/a/{}", answer.answer_id))
        });
        let parent = format!("q:{}", answer.question_id);
        let contribution = Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: format!("a:{}", answer.answer_id),
            url,
            kind: Kind::Reply,
            author: self.author(answer.owner),
            title: question.and_then(|question| question.title.clone()),
            body: answer.body.as_deref().map(html_to_text).unwrap_or_default(),
            language: None,
            created_at,
            updated_at: edited_at,
            parent_id: Some(parent.clone()),
            thread_id: Some(parent),
            tags: Vec::new(),
            score: answer.score,
            edited: edited_at.is_some(),
            deleted: false,
            signals: None,
        };
        Ok((contribution, answer.answer_id, answer.question_id))
    }

    fn comment(
        &self,
        comment: RawComment,
        questions: &HashMap<u64, QuestionInfo>,
        answers: &HashMap<u64, u64>,
    ) -> Result<Contribution, String> {
        let created_at = timestamp(comment.creation_date, "creation_date")?;
        let post = comment.post_id;
        let question_id = if questions.contains_key(&post) { Some(post) } else { answers.get(&post).copied() };
        let on_question = match (question_id, comment.post_type.as_deref()) {
            (Some(id), _) => id == post,
            (None, Some("question")) => true,
            (None, Some("answer")) => false,
            (None, _) => return Err(format!("post_id {post} is none of this page's questions and answers")),
        };
        let parent = if on_question { format!("q:{post}") } else { format!("a:{post}") };
        let thread = if on_question { Some(format!("q:{post}")) } else { question_id.map(|id| format!("q:{id}")) };
        let question = question_id.and_then(|id| questions.get(&id));
        let url = comment
            .link
            .filter(|link| !link.is_empty())
            .or_else(|| question.map(|question| format!("{}#comment{}_{post}", question.link, comment.comment_id)));
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: format!("c:{}", comment.comment_id),
            url,
            kind: Kind::Comment,
            author: self.author(comment.owner),
            title: question.and_then(|question| question.title.clone()),
            body: comment.body.as_deref().map(html_to_text).unwrap_or_default(),
            language: None,
            created_at,
            updated_at: None,
            parent_id: Some(parent),
            thread_id: thread,
            tags: Vec::new(),
            score: comment.score,
            edited: comment.edited,
            deleted: false,
            signals: None,
        })
    }
}

#[async_trait]
impl Source for StackExchangeSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let stored = request.stored::<StackExchangeCursor>();
        let mut cursor = stored.unwrap_or_default();
        let tags = &self.config.tags;
        let (tag, pages_before) = match &cursor.pass {
            Some(pass) if tags.contains(&pass.tag) => (pass.tag.clone(), pass.pages),
            _ => match tags.first() {
                Some(first) => (first.clone(), 0),
                None => return Ok(Page::default()),
            },
        };
        // A tag seen for the first time starts at `since` (else a day ago).
        let state = cursor.tags.get(&tag).cloned().unwrap_or_else(|| TagCursor::starting(request.since));

        let TagPage { mut page, newest, has_more, limited } = self.poll_tag(&tag, &state).await?;

        let newest = newest.map_or(state.watermark, |newest| newest.max(state.watermark));
        let next_state = if newest > state.watermark {
            TagCursor { watermark: newest, page: 1 }
        } else if has_more {
            // The whole page shared the watermark's second: page by number.
            TagCursor { watermark: state.watermark, page: state.page.max(1).saturating_add(1) }
        } else {
            TagCursor { watermark: state.watermark, page: 1 }
        };
        cursor.tags.insert(tag.clone(), next_state);
        cursor.tags.retain(|known, _| tags.contains(known));

        let pages = pages_before.saturating_add(1);
        let capped = has_more && pages >= self.config.max_pages_per_poll;
        let next_pass = if has_more && !capped {
            Some(PassState { tag: tag.clone(), pages })
        } else {
            let position = tags.iter().position(|known| *known == tag);
            position.and_then(|at| tags.get(at + 1)).map(|next| PassState { tag: next.clone(), pages: 0 })
        };
        if capped {
            tracing::info!(source = %self.instance, %tag, pages, "stackexchange tag paused at max_pages_per_poll; the next poll goes on");
        }
        page.has_more = next_pass.is_some() && limited.is_none();
        if let Some(reason) = &limited {
            tracing::info!(source = %self.instance, %tag, %reason, "stackexchange poll stopped early; the next poll resumes");
        }
        // A stopped poll leaves its pass to the next one, counted afresh.
        cursor.pass = match limited {
            Some(_) => next_pass.map(|pass| PassState { pages: 0, ..pass }),
            None => next_pass,
        };
        page.next_cursor = Some(Cursor::from_json(&cursor));
        Ok(page)
    }

    /// `GET /info` of the site: one request, which checks the site name and
    /// the key.
    async fn check(&self) -> Result<(), SourceError> {
        self.call(INFO, self.endpoint(&["info"])).await.map(|_| ())
    }
}

/// The error a wrapper reports, if any.
fn api_error(body: &Value) -> Option<ApiError> {
    let id = body.get("error_id").and_then(Value::as_i64);
    let name = body.get("error_name").and_then(Value::as_str);
    if id.is_none() && name.is_none() {
        return None;
    }
    let message = body.get("error_message").and_then(Value::as_str).unwrap_or_default();
    Some(ApiError { id, name: shorten(name.unwrap_or("error")), message: shorten(message) })
}

/// "… more requests available in 46472 seconds" -> 46472 s.
fn named_wait(message: &str) -> Option<Duration> {
    let (_, rest) = message.split_once("available in ")?;
    let digits: String = rest.trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<u64>().ok().map(Duration::from_secs)
}

/// A wait in seconds, clamped to 0..=[`MAX_HOLD`] (never panics).
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(MAX_HOLD).min(MAX_HOLD)
}

fn timestamp(seconds: i64, field: &str) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp(seconds, 0).ok_or_else(|| format!("`{field}` {seconds} is not a valid time"))
}

/// `https://host[:port]` of a link.
fn origin(link: &str) -> Option<String> {
    let url = Url::parse(link).ok()?;
    url.host_str()?;
    Some(url.origin().ascii_serialization())
}

fn shorten(text: &str) -> String {
    text.chars().take(MAX_MESSAGE_CHARS).collect()
}

fn quarantine(external_id: Option<String>, reason: String, item: &Value) -> Quarantined {
    let raw = serde_json::to_string(item).unwrap_or_default();
    Quarantined::new(external_id, reason, &raw)
}

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use serde_json::json;
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path, query_param},
    };

    use super::*;

    fn options() -> HttpOptions {
        HttpOptions {
            max_retries: 0,
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(5),
            ..HttpOptions::default()
        }
    }

    /// Tag `git` of Stack Overflow on the mock server, questions only;
    /// `extra` overrides fields.
    fn config(server: &MockServer, extra: Value) -> StackExchangeConfig {
        let mut config = json!({
            "site": "stackoverflow",
            "tags": ["git"],
            "base_url": format!("{}/2.3", server.uri()),
            "include_answers": false,
            "include_comments": false,
        });
        if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
            config.extend(extra.clone());
        }
        serde_json::from_value(config).unwrap()
    }

    fn source(config: StackExchangeConfig) -> StackExchangeSource {
        StackExchangeSource::new("so", config, options()).unwrap()
    }

    fn fixture() -> Fixture {
        Fixture::load("stackexchange", "questions_top_votes")
    }

    /// The recorded questions (sorted by votes, as recorded).
    fn recorded() -> Vec<Value> {
        fixture().body["items"].as_array().cloned().unwrap()
    }

    fn recorded_question(id: u64) -> Value {
        recorded().into_iter().find(|q| q["question_id"] == id).unwrap()
    }

    /// The recorded questions in the order `sort=activity&order=asc` lists them.
    fn by_activity() -> Vec<Value> {
        let mut items = recorded();
        items.sort_by_key(|q| q["last_activity_date"].as_i64().unwrap());
        items
    }

    /// The recorded wrapper (quota fields included) with `items` and
    /// `has_more` replaced.
    fn wrapper(items: Vec<Value>, has_more: bool) -> Fixture {
        let mut fixture = fixture();
        fixture.body["items"] = Value::Array(items);
        fixture.body["has_more"] = has_more.into();
        fixture
    }

    fn respond(items: Vec<Value>, has_more: bool) -> ResponseTemplate {
        wrapper(items, has_more).response()
    }

    /// The fixture records no answer: one is reshaped from its recorded
    /// question (owner, score and dates kept, `answer_id` taken from
    /// `accepted_answer_id`), with a body added.
    fn answer_from(question: &Value, body: &str) -> Value {
        json!({
            "owner": question["owner"],
            "is_accepted": true,
            "score": question["score"],
            "last_activity_date": question["last_activity_date"],
            "last_edit_date": question["last_edit_date"],
            "creation_date": question["creation_date"],
            "answer_id": question["accepted_answer_id"],
            "question_id": question["question_id"],
            "body": body,
        })
    }

    /// Likewise a comment: the question's owner and last activity as its
    /// author and date; `comment_id` made up.
    fn comment_from(question: &Value, post_id: u64, comment_id: u64, body: &str) -> Value {
        json!({
            "owner": question["owner"],
            "edited": false,
            "score": 3,
            "creation_date": question["last_activity_date"],
            "post_id": post_id,
            "comment_id": comment_id,
            "body": body,
        })
    }

    async fn serve_questions(server: &MockServer, response: ResponseTemplate) {
        Mock::given(method("GET")).and(path("/2.3/questions")).respond_with(response).mount(server).await;
    }

    fn cursor(page: &Page) -> StackExchangeCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn at(watermarks: &[(&str, i64)], pass: Option<(&str, u32)>) -> StackExchangeCursor {
        StackExchangeCursor {
            tags: watermarks
                .iter()
                .map(|(tag, watermark)| (tag.to_string(), TagCursor { watermark: *watermark, page: 1 }))
                .collect(),
            pass: pass.map(|(tag, pages)| PassState { tag: tag.to_owned(), pages }),
        }
    }

    /// A first poll from 2018-01-01, before every recorded activity (the
    /// default first poll, a day back from now, is later than the recording).
    fn first_poll() -> PollRequest {
        PollRequest { cursor: None, since: Some(time(1_514_764_800)) }
    }

    fn request_at(cursor: &StackExchangeCursor) -> PollRequest {
        PollRequest { cursor: Some(Cursor::from_json(cursor)), since: None }
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    fn find<'a>(page: &'a Page, id: &str) -> &'a Contribution {
        page.contributions.iter().find(|c| c.external_id == id).unwrap()
    }

    fn time(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    async fn requests_to(server: &MockServer, to: &str) -> Vec<wiremock::Request> {
        server.received_requests().await.unwrap().into_iter().filter(|r| r.url.path() == to).collect()
    }

    fn query(request: &wiremock::Request, name: &str) -> Option<String> {
        request.url.query_pairs().find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
    }

    /// One recorded question, checked by value.
    struct Expect {
        id: &'static str,
        title: &'static str,
        author_id: &'static str,
        name: &'static str,
        profile: &'static str,
        url: &'static str,
        tags: &'static [&'static str],
        score: f64,
        created_at: i64,
        edited_at: i64,
    }

    fn check(page: &Page, expect: &Expect) {
        let c = find(page, expect.id);
        let at = expect.id;
        assert_eq!(c.platform, "stackexchange", "{at}");
        assert_eq!(c.source, "so", "{at}");
        assert_eq!(c.kind, Kind::Post, "{at}");
        assert_eq!(c.title.as_deref(), Some(expect.title), "{at}");
        assert_eq!(c.author.id, expect.author_id, "{at}");
        assert_eq!(c.author.handle.as_deref(), Some(expect.name), "{at}");
        assert_eq!(c.author.display_name.as_deref(), Some(expect.name), "{at}");
        assert_eq!(c.author.profile_url.as_deref(), Some(expect.profile), "{at}");
        assert_eq!(c.author.email, None, "{at}");
        assert_eq!(c.url.as_deref(), Some(expect.url), "{at}");
        assert_eq!(c.tags, expect.tags, "{at}");
        assert_eq!(c.score, Some(expect.score), "{at}");
        assert_eq!(c.created_at, time(expect.created_at), "{at}");
        assert_eq!(c.updated_at, Some(time(expect.edited_at)), "{at}");
        assert!(c.edited, "{at}");
        assert!(!c.deleted, "{at}");
        assert_eq!(c.thread_id.as_deref(), Some(expect.id), "{at}");
        assert_eq!(c.parent_id, None, "{at}");
        // Recorded without `filter=withbody`: no bodies.
        assert_eq!(c.body, "", "{at}");
        assert_eq!(c.language, None, "{at}");
        assert_eq!(c.signals, None, "{at}");
    }

    #[tokio::test]
    async fn first_poll_maps_the_recorded_questions() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .respond_with(fixture().response())
            .expect(1)
            .mount(&server)
            .await;
        let since = Some(time(1_525_132_800));
        let page = source(config(&server, json!({}))).poll(&PollRequest { cursor: None, since }).await.unwrap();

        let recorded_ids: Vec<String> = recorded().iter().map(|q| format!("q:{}", q["question_id"])).collect();
        assert_eq!(ids(&page), recorded_ids);
        assert!(page.quarantined.is_empty(), "{:?}", page.quarantined);
        for expect in [
            Expect {
                id: "q:11227809",
                title: "Why is it faster to process a sorted array than an unsorted array?",
                author_id: "stackoverflow/87234",
                name: "GManNickG",
                profile: "https://stackoverflow.com/users/87234/gmannickg",
                url: "https://stackoverflow.com/questions/11227809/why-is-it-faster-to-process-a-sorted-array-than-an-unsorted-array",
                tags: &["java", "c++", "performance", "optimization", "branch-prediction"],
                score: 21619.0,
                created_at: 1340805096,
                edited_at: 1522083910,
            },
            Expect {
                id: "q:292357",
                title: "What is the difference between 'git pull' and 'git fetch'?",
                author_id: "stackoverflow/6068",
                name: "pupeno",
                profile: "https://stackoverflow.com/users/6068/pupeno",
                url: "https://stackoverflow.com/questions/292357/what-is-the-difference-between-git-pull-and-git-fetch",
                tags: &["git", "git-pull", "git-fetch"],
                score: 10111.0,
                created_at: 1226742669,
                edited_at: 1525294213,
            },
            Expect {
                id: "q:1642028",
                title: "What is the \"-->\" operator in C++?",
                author_id: "stackoverflow/87234",
                name: "GManNickG",
                profile: "https://stackoverflow.com/users/87234/gmannickg",
                url: "https://stackoverflow.com/questions/1642028/what-is-the-operator-in-c",
                tags: &["c++", "operators", "code-formatting", "standards-compliance"],
                score: 7761.0,
                created_at: 1256799465,
                edited_at: 1486974740,
            },
        ] {
            check(&page, &expect);
        }
        for c in &page.contributions {
            assert!(c.edited && c.title.as_deref().is_some_and(|t| !t.contains('&')), "{}", c.external_id);
        }

        let sent = requests_to(&server, "/2.3/questions").await;
        for (name, value) in [
            ("site", "stackoverflow"),
            ("tagged", "git"),
            ("sort", "activity"),
            ("order", "asc"),
            ("page", "1"),
            ("pagesize", "100"),
            ("filter", "withbody"),
        ] {
            assert_eq!(query(&sent[0], name).as_deref(), Some(value), "{name}");
        }
        assert_eq!(query(&sent[0], "key"), None);
        // `since` bounds the activity (`min`), not the creation (`fromdate`).
        assert_eq!(query(&sent[0], "min").as_deref(), Some("1525132800"));
        assert_eq!(query(&sent[0], "fromdate"), None);

        // The recorded page says has_more: the pass goes on from the newest activity.
        assert!(page.has_more);
        assert_eq!(cursor(&page), at(&[("git", 1532639000)], Some(("git", 1))));
    }

    #[tokio::test]
    async fn answers_and_comments_of_the_page_are_fetched_and_mapped() {
        let server = MockServer::start().await;
        let (sorted, undo) = (recorded_question(11227809), recorded_question(927358));
        serve_questions(&server, respond(vec![sorted.clone(), undo.clone()], false)).await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions/11227809;927358/answers"))
            .respond_with(respond(
                vec![
                    answer_from(&sorted, "<p>Because of <b>branch prediction</b>.</p><script>alert(1)</script>"),
                    answer_from(&undo, "<p>Use <code>git reset HEAD~</code> &amp; commit again.</p>"),
                ],
                false,
            ))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/2.3/posts/11227809;927358;11227902;927386/comments"))
            .respond_with(respond(
                vec![
                    comment_from(&sorted, 11227809, 1001, "Great question &amp; answer"),
                    comment_from(&undo, 927386, 1002, "This saved my <i>day</i>"),
                    comment_from(&undo, 5, 1003, "on a post of another page"),
                ],
                false,
            ))
            .expect(1)
            .mount(&server)
            .await;
        let config = config(&server, json!({"include_answers": true, "include_comments": true}));
        let request = request_at(&at(&[("git", 1_500_000_000)], None));
        let page = source(config).poll(&request).await.unwrap();

        assert_eq!(ids(&page), ["q:11227809", "q:927358", "a:11227902", "a:927386", "c:1001", "c:1002"]);
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [Some("c:1003")]);

        let answer = find(&page, "a:11227902");
        assert_eq!(answer.kind, Kind::Reply);
        assert_eq!(answer.body, "Because of branch prediction.");
        assert_eq!(answer.parent_id.as_deref(), Some("q:11227809"));
        assert_eq!(answer.thread_id.as_deref(), Some("q:11227809"));
        assert_eq!(answer.url.as_deref(), Some("https://stackoverflow.com/a/11227902"));
        assert_eq!(answer.title.as_deref(), Some("Why is it faster to process a sorted array than an unsorted array?"));
        assert_eq!(answer.author.id, "stackoverflow/87234");
        assert_eq!(answer.score, Some(21619.0));
        assert!(answer.edited);
        assert_eq!(answer.updated_at, Some(time(1522083910)));
        assert_eq!(find(&page, "a:927386").body, "Use git reset HEAD~ & commit again.");

        let on_question = find(&page, "c:1001");
        assert_eq!(on_question.kind, Kind::Comment);
        assert_eq!(on_question.body, "Great question & answer");
        assert_eq!(on_question.parent_id.as_deref(), Some("q:11227809"));
        assert_eq!(on_question.thread_id.as_deref(), Some("q:11227809"));
        assert_eq!(
            on_question.url.as_deref(),
            Some(
                "https://stackoverflow.com/questions/11227809/why-is-it-faster-to-process-a-sorted-array-than-an-unsorted-array#comment1001_11227809"
            )
        );
        assert_eq!(on_question.created_at, time(1531920718));
        assert!(!on_question.edited && on_question.updated_at.is_none());
        let on_answer = find(&page, "c:1002");
        assert_eq!(on_answer.body, "This saved my day");
        assert_eq!(on_answer.parent_id.as_deref(), Some("a:927386"));
        assert_eq!(on_answer.thread_id.as_deref(), Some("q:927358"));
        assert_eq!(on_answer.author.id, "stackoverflow/89904");

        // Children are asked from the same watermark, 100 at a time.
        let answers = requests_to(&server, "/2.3/questions/11227809;927358/answers").await;
        let comments = requests_to(&server, "/2.3/posts/11227809;927358;11227902;927386/comments").await;
        for (request, sort) in [(&answers[0], "activity"), (&comments[0], "creation")] {
            assert_eq!(query(request, "sort").as_deref(), Some(sort));
            assert_eq!(query(request, "order").as_deref(), Some("asc"));
            assert_eq!(query(request, "min").as_deref(), Some("1500000000"));
            assert_eq!(query(request, "filter").as_deref(), Some("withbody"));
            assert_eq!(query(request, "pagesize").as_deref(), Some("100"));
            assert_eq!(query(request, "site").as_deref(), Some("stackoverflow"));
        }
        assert!(!page.has_more);
        assert_eq!(cursor(&page), at(&[("git", 1532639000)], None));
    }

    #[tokio::test]
    async fn answers_page_by_their_newest_activity_too() {
        let server = MockServer::start().await;
        let (sorted, undo) = (recorded_question(11227809), recorded_question(927358));
        serve_questions(&server, respond(vec![sorted.clone(), undo.clone()], false)).await;
        let first = answer_from(&sorted, "<p>first</p>");
        Mock::given(method("GET"))
            .and(path("/2.3/questions/11227809;927358/answers"))
            .and(query_param("min", "1500000000"))
            .respond_with(respond(vec![first.clone()], true))
            .expect(1)
            .mount(&server)
            .await;
        // The boundary answer comes back with the next one.
        Mock::given(method("GET"))
            .and(path("/2.3/questions/11227809;927358/answers"))
            .and(query_param("min", "1531920718"))
            .and(query_param("page", "1"))
            .respond_with(respond(vec![first, answer_from(&undo, "<p>second</p>")], false))
            .expect(1)
            .mount(&server)
            .await;
        let config = config(&server, json!({"include_answers": true}));
        let page = source(config).poll(&request_at(&at(&[("git", 1_500_000_000)], None))).await.unwrap();
        assert_eq!(ids(&page), ["q:11227809", "q:927358", "a:11227902", "a:927386"]);
    }

    #[tokio::test]
    async fn first_poll_starts_at_since_or_a_day_ago() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("min", "1530403200"))
            .respond_with(respond(by_activity()[6..].to_vec(), false))
            .expect(1)
            .mount(&server)
            .await;
        let since = Some("2018-07-01T00:00:00Z".parse().unwrap());
        let page = source(config(&server, json!({}))).poll(&PollRequest { cursor: None, since }).await.unwrap();
        assert_eq!(ids(&page), ["q:2003505", "q:1642028", "q:11227809", "q:927358"]);
        assert_eq!(cursor(&page), at(&[("git", 1532639000)], None));

        // No `since`: the last 24 hours, kept as the watermark while nothing comes.
        let server = MockServer::start().await;
        serve_questions(&server, respond(vec![], false)).await;
        let before = Utc::now().timestamp();
        let page = source(config(&server, json!({}))).poll(&PollRequest::default()).await.unwrap();
        let after = Utc::now().timestamp();
        let sent = requests_to(&server, "/2.3/questions").await;
        let min: i64 = query(&sent[0], "min").unwrap().parse().unwrap();
        assert!((before - 86_400..=after - 86_400).contains(&min), "{min}");
        assert_eq!(cursor(&page), at(&[("git", min)], None));
    }

    /// A server that ignores `min` and answers older activity cannot move
    /// the watermark back; the page number moves on instead (and the page
    /// cap bounds the pass).
    #[tokio::test]
    async fn older_activity_never_moves_the_watermark_back() {
        let server = MockServer::start().await;
        serve_questions(&server, fixture().response()).await;
        let page =
            source(config(&server, json!({}))).poll(&request_at(&at(&[("git", 1_600_000_000)], None))).await.unwrap();
        assert_eq!(page.contributions.len(), 10);
        let expected = StackExchangeCursor {
            tags: [("git".to_owned(), TagCursor { watermark: 1_600_000_000, page: 2 })].into(),
            pass: Some(PassState { tag: "git".into(), pages: 1 }),
        };
        assert_eq!(cursor(&page), expected);
    }

    #[tokio::test]
    async fn an_incremental_poll_with_nothing_new_keeps_the_watermark() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("min", "1532639000"))
            .respond_with(respond(vec![], false))
            .expect(1)
            .mount(&server)
            .await;
        let config = config(&server, json!({"include_answers": true, "include_comments": true}));
        let stored = at(&[("git", 1532639000)], None);
        let page = source(config).poll(&request_at(&stored)).await.unwrap();
        assert!(page.contributions.is_empty() && page.quarantined.is_empty() && !page.has_more);
        assert_eq!(cursor(&page), stored);
        // No question, so no answers or comments are asked for.
        assert_eq!(server.received_requests().await.unwrap().len(), 1);

        // `min` is inclusive: the question of the boundary second comes
        // back, identical, and the ledger drops it.
        let server = MockServer::start().await;
        serve_questions(&server, respond(vec![recorded_question(927358)], false)).await;
        let source = source(config_for_tag(&server));
        let before = source.poll(&first_poll()).await.unwrap();
        let again = source.poll(&request_at(&cursor(&before))).await.unwrap();
        assert_eq!(before.contributions, again.contributions);
        assert_eq!(before.contributions[0].content_hash(), again.contributions[0].content_hash());
        assert_eq!(cursor(&again), stored);
    }

    fn config_for_tag(server: &MockServer) -> StackExchangeConfig {
        config(server, json!({}))
    }

    /// Serves the recorded questions as two pages by activity: the oldest
    /// five for `min=1500000000`, the newest five for the first page's
    /// newest activity.
    async fn serve_two_pages(server: &MockServer) {
        let all = by_activity();
        let (older, newer) = all.split_at(5);
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("min", "1500000000"))
            .respond_with(respond(older.to_vec(), true))
            .expect(1)
            .mount(server)
            .await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("min", "1529885895"))
            .and(query_param("page", "1"))
            .respond_with(respond(newer.to_vec(), false))
            .expect(1)
            .mount(server)
            .await;
    }

    #[tokio::test]
    async fn pages_by_moving_min_to_the_newest_activity() {
        let server = MockServer::start().await;
        serve_two_pages(&server).await;
        let source = source(config(&server, json!({"pagesize": 5})));

        let first = source.poll(&request_at(&at(&[("git", 1_500_000_000)], None))).await.unwrap();
        assert_eq!(ids(&first), ["q:503093", "q:179123", "q:231767", "q:292357", "q:111102"]);
        assert!(first.has_more);
        assert_eq!(cursor(&first), at(&[("git", 1529885895)], Some(("git", 1))));

        let second = source.poll(&request_at(&cursor(&first))).await.unwrap();
        assert_eq!(ids(&second), ["q:477816", "q:2003505", "q:1642028", "q:11227809", "q:927358"]);
        assert!(!second.has_more);
        assert_eq!(cursor(&second), at(&[("git", 1532639000)], None));
    }

    #[tokio::test]
    async fn a_pass_pauses_at_max_pages_and_the_next_poll_resumes_it() {
        let server = MockServer::start().await;
        serve_two_pages(&server).await;
        let source = source(config(&server, json!({"pagesize": 5, "max_pages_per_poll": 1})));

        let first = source.poll(&request_at(&at(&[("git", 1_500_000_000)], None))).await.unwrap();
        assert_eq!(first.contributions.len(), 5);
        assert!(!first.has_more, "the cap ends this poll");
        // The watermark covers the fetched page only.
        assert_eq!(cursor(&first), at(&[("git", 1529885895)], None));

        let second = source.poll(&request_at(&cursor(&first))).await.unwrap();
        assert_eq!(ids(&second), ["q:477816", "q:2003505", "q:1642028", "q:11227809", "q:927358"]);
        assert_eq!(cursor(&second), at(&[("git", 1532639000)], None));
    }

    #[tokio::test]
    async fn a_page_within_one_second_pages_by_number() {
        let server = MockServer::start().await;
        let all = by_activity();
        let mut same_second = all[..5].to_vec();
        for question in &mut same_second {
            question["last_activity_date"] = 1_530_000_000.into();
        }
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("min", "1530000000"))
            .and(query_param("page", "1"))
            .respond_with(respond(same_second, true))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("min", "1530000000"))
            .and(query_param("page", "2"))
            .respond_with(respond(all[5..].to_vec(), false))
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, json!({"pagesize": 5})));
        let first = source.poll(&request_at(&at(&[("git", 1_530_000_000)], None))).await.unwrap();
        let paged = StackExchangeCursor {
            tags: [("git".to_owned(), TagCursor { watermark: 1_530_000_000, page: 2 })].into(),
            pass: Some(PassState { tag: "git".into(), pages: 1 }),
        };
        assert_eq!(cursor(&first), paged);
        let second = source.poll(&request_at(&cursor(&first))).await.unwrap();
        assert_eq!(second.contributions.len(), 5);
        assert_eq!(cursor(&second), at(&[("git", 1532639000)], None));
    }

    #[tokio::test]
    async fn tags_are_polled_one_after_the_other() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("tagged", "git"))
            .respond_with(respond(vec![recorded_question(927358)], false))
            .expect(2)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("tagged", "c++"))
            .respond_with(respond(vec![recorded_question(1642028)], false))
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, json!({"tags": ["git", " c++", "git"]})));
        let first = source.poll(&first_poll()).await.unwrap();
        assert_eq!(ids(&first), ["q:927358"]);
        assert!(first.has_more, "c++ is next");
        assert_eq!(cursor(&first), at(&[("git", 1532639000)], Some(("c++", 0))));
        // The daemon hands `since` to every poll: a tag polled for the first
        // time starts there too.
        let second =
            source.poll(&PollRequest { since: first_poll().since, ..request_at(&cursor(&first)) }).await.unwrap();
        assert_eq!(ids(&second), ["q:1642028"]);
        assert!(!second.has_more);
        assert_eq!(cursor(&second), at(&[("c++", 1531496070), ("git", 1532639000)], None));
        // The next poll starts over with the first tag, at its watermark.
        source.poll(&request_at(&cursor(&second))).await.unwrap();
        let git: Vec<_> = requests_to(&server, "/2.3/questions")
            .await
            .into_iter()
            .filter(|r| query(r, "tagged").as_deref() == Some("git"))
            .collect();
        assert_eq!(query(&git[1], "min").as_deref(), Some("1532639000"));
    }

    #[tokio::test]
    async fn an_edit_changes_the_contribution() {
        let server = MockServer::start().await;
        let mut original = recorded_question(111102);
        original.as_object_mut().unwrap().remove("last_edit_date");
        original["body"] = "<p>How do closures work?</p>".into();
        let mut edited = recorded_question(111102);
        edited["body"] = "<p>How do closures work? <em>Edit:</em> with an example, please.</p>".into();
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .respond_with(respond(vec![original], false))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        serve_questions(&server, respond(vec![edited], false)).await;
        let source = source(config(&server, json!({})));
        let before = source.poll(&first_poll()).await.unwrap();
        let after = source.poll(&request_at(&cursor(&before))).await.unwrap();
        let (before, after) = (find(&before, "q:111102"), find(&after, "q:111102"));
        assert!(!before.edited && before.updated_at.is_none());
        assert_eq!(before.body, "How do closures work?");
        assert!(after.edited);
        assert_eq!(after.updated_at, Some(time(1491746117)));
        assert_eq!(after.body, "How do closures work? Edit: with an example, please.");
        assert_eq!(before.key(), after.key());
        assert_ne!(before.content_hash(), after.content_hash());
    }

    /// The API lists only undeleted posts, so there is no deletion marker
    /// to test; a deleted *user* keeps their posts, anonymously.
    #[tokio::test]
    async fn a_deleted_owner_keeps_the_item_with_an_anonymous_author() {
        let server = MockServer::start().await;
        let mut question = recorded_question(111102);
        // A deleted user's shallow_user: only user_type and display_name.
        question["owner"] = json!({"user_type": "does_not_exist", "display_name": "user9951"});
        let mut no_owner = recorded_question(179123);
        no_owner.as_object_mut().unwrap().remove("owner");
        serve_questions(&server, respond(vec![question, no_owner], false)).await;
        let page = source(config(&server, json!({}))).poll(&first_poll()).await.unwrap();
        let c = find(&page, "q:111102");
        assert!(!c.deleted);
        assert_eq!(c.author.id, "");
        assert_eq!(c.author.handle, None);
        assert_eq!(c.author.display_name.as_deref(), Some("user9951"));
        assert_eq!(c.author.profile_url, None);
        assert_eq!(c.title.as_deref(), Some("How do JavaScript closures work?"));
        assert_eq!(find(&page, "q:179123").author.id, "");
    }

    #[tokio::test]
    async fn a_backoff_holds_its_method_and_stops_the_poll() {
        let server = MockServer::start().await;
        let mut body = wrapper(by_activity()[..5].to_vec(), true);
        body.body["backoff"] = 120.into();
        Mock::given(method("GET")).and(path("/2.3/questions")).respond_with(body.response()).mount(&server).await;
        Mock::given(method("GET"))
            .and(wiremock::matchers::path_regex("^/2.3/questions/[0-9;]+/answers$"))
            .respond_with(respond(vec![], false))
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, json!({"include_answers": true, "pagesize": 5})));

        let first = source.poll(&request_at(&at(&[("git", 1_500_000_000)], None))).await.unwrap();
        assert_eq!(first.contributions.len(), 5, "the page that asked for the backoff is kept");
        assert!(!first.has_more, "the backoff ends the poll although the API has more");
        assert_eq!(cursor(&first), at(&[("git", 1529885895)], Some(("git", 0))));

        let error = source.poll(&request_at(&cursor(&first))).await.unwrap_err();
        match &error {
            SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                assert!(*retry_after > Duration::from_secs(110) && *retry_after <= Duration::from_secs(120))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(error.to_string().contains("backoff"), "{error}");
        assert_eq!(requests_to(&server, "/2.3/questions").await.len(), 1, "no call while the backoff holds");
        // Another method is not held.
        source.check().await.unwrap_err();
        assert_eq!(requests_to(&server, "/2.3/info").await.len(), 1);
    }

    #[tokio::test]
    async fn a_short_backoff_is_waited_out_before_the_same_method() {
        let server = MockServer::start().await;
        let mut body = wrapper(vec![recorded_question(927358)], false);
        body.body["backoff"] = 1.into();
        serve_questions(&server, body.response()).await;
        let source = source(config(&server, json!({})));
        let first = source.poll(&first_poll()).await.unwrap();
        let started = StdInstant::now();
        source.poll(&request_at(&cursor(&first))).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(900), "called again before the backoff passed");
        assert_eq!(requests_to(&server, "/2.3/questions").await.len(), 2);
    }

    #[tokio::test]
    async fn a_spent_quota_stops_with_a_clear_error_and_holds_every_call() {
        let server = MockServer::start().await;
        let mut body = wrapper(vec![recorded_question(927358)], false);
        body.body["quota_remaining"] = 0.into();
        serve_questions(&server, body.response()).await;
        let source = source(config(&server, json!({"include_answers": true})));
        for _ in 0..2 {
            let error = source.poll(&PollRequest::default()).await.unwrap_err();
            assert!(matches!(error, SourceError::Http(HttpError::RateLimited { .. })), "{error:?}");
            let message = error.to_string();
            assert!(message.contains("quota of 300 requests is used up") && message.contains("`key`"), "{message}");
        }
        source.check().await.unwrap_err();
        let sent = server.received_requests().await.unwrap();
        assert_eq!(
            sent.len(),
            1,
            "only the call that spent the quota: {:?}",
            sent.iter().map(|r| r.url.path()).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_throttle_violation_is_rate_limited_for_the_wait_it_names() {
        let server = MockServer::start().await;
        let violation = json!({
            "error_id": 502,
            "error_message": "too many requests from this IP, more requests available in 46472 seconds",
            "error_name": "throttle_violation"
        });
        serve_questions(&server, ResponseTemplate::new(400).set_body_json(violation)).await;
        let source = source(config(&server, json!({})));
        for _ in 0..2 {
            match source.poll(&PollRequest::default()).await.unwrap_err() {
                SourceError::Http(HttpError::RateLimited { retry_after, target, .. }) => {
                    assert!(retry_after > Duration::from_secs(46_400), "{retry_after:?}");
                    assert!(target.contains("throttle_violation"), "{target}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        source.check().await.unwrap_err();
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "the IP-wide wait holds every method");

        // Without a named wait it is this method's backoff that was missed.
        let server = MockServer::start().await;
        let violation = json!({"error_id": 502, "error_message": "Violation of backoff parameter", "error_name": "throttle_violation"});
        serve_questions(&server, ResponseTemplate::new(400).set_body_json(violation)).await;
        Mock::given(method("GET")).and(path("/2.3/info")).respond_with(respond(vec![], false)).mount(&server).await;
        let source = self::source(config(&server, json!({})));
        match source.poll(&PollRequest::default()).await.unwrap_err() {
            SourceError::Http(HttpError::RateLimited { retry_after, .. }) => assert_eq!(retry_after, THROTTLE_FALLBACK),
            other => panic!("unexpected {other:?}"),
        }
        source.check().await.unwrap();
        assert_eq!(named_wait("more requests available in  12 seconds"), Some(Duration::from_secs(12)));
        assert_eq!(named_wait("available in ∞ seconds"), None);
    }

    #[tokio::test]
    async fn malformed_items_are_quarantined_and_the_page_goes_on() {
        let server = MockServer::start().await;
        let mut items = recorded();
        items[0].as_object_mut().unwrap().remove("question_id");
        items[1]["creation_date"] = "yesterday".into();
        items[2]["title"] = 7.into();
        items[3]["owner"]["user_id"] = "six thousand".into();
        items[4]["creation_date"] = i64::MAX.into();
        items.push(json!("not a question"));
        serve_questions(&server, respond(items, false)).await;
        let page = source(config(&server, json!({}))).poll(&first_poll()).await.unwrap();
        assert_eq!(ids(&page), ["q:231767", "q:1642028", "q:503093", "q:179123", "q:111102"]);
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [None, Some("q:927358"), Some("q:2003505"), Some("q:292357"), Some("q:477816"), None]);
        assert!(page.quarantined[0].reason.contains("question_id"), "{}", page.quarantined[0].reason);
        assert!(page.quarantined[0].raw.contains("Why is it faster"));
        assert!(page.quarantined[4].reason.contains("creation_date"), "{}", page.quarantined[4].reason);
        // Question 927358 could not be read, but it was fetched: the
        // watermark covers its activity.
        assert_eq!(cursor(&page), at(&[("git", 1532639000)], None));
    }

    #[tokio::test]
    async fn a_body_that_is_not_the_wrapper_is_a_decode_error() {
        for (response, expected) in [
            (ResponseTemplate::new(200).set_body_string("<html>maintenance</html>"), "did not answer JSON"),
            (ResponseTemplate::new(200).set_body_json(json!({"quota_max": 300})), "`items`"),
            (ResponseTemplate::new(200).set_body_json(json!([1, 2])), "not an object"),
        ] {
            let server = MockServer::start().await;
            serve_questions(&server, response).await;
            let error = source(config(&server, json!({}))).poll(&PollRequest::default()).await.unwrap_err();
            assert!(
                matches!(&error, SourceError::Decode(message) if message.contains(expected) && message.contains("/2.3/questions")),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn refusals_map_to_auth_and_other_errors_to_status() {
        let api = |id: i64, name: &str, message: &str| {
            ResponseTemplate::new(400)
                .set_body_json(json!({"error_id": id, "error_name": name, "error_message": message}))
        };
        for (response, auth) in [
            (ResponseTemplate::new(401).set_body_string("Unauthorized"), true),
            (ResponseTemplate::new(403).set_body_string("<html>Forbidden</html>"), true),
            (api(403, "access_denied", "this method needs an access token with private_info"), true),
            (api(400, "bad_parameter", "key"), true),
            (api(400, "bad_parameter", "site"), false),
            (api(500, "internal_error", "oops"), false),
        ] {
            let server = MockServer::start().await;
            Mock::given(method("GET")).respond_with(response).mount(&server).await;
            let source = source(config(&server, json!({})));
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                match error {
                    SourceError::Auth(_) => assert!(auth, "{error}"),
                    SourceError::Status { status: 400, ref message } => {
                        assert!(!auth, "{error}");
                        assert!(message.contains("bad_parameter") || message.contains("internal_error"), "{error}");
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn the_key_is_sent_as_a_query_parameter_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("tributary-stackexchange-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "k3y-0f-th3-app\n").unwrap();
        let server = MockServer::start().await;
        let config = config(&server, json!({"key": {"file": file}}));
        let source = self::source(config);
        std::fs::remove_dir_all(dir).unwrap();

        Mock::given(method("GET"))
            .and(path("/2.3/info"))
            .and(query_param("key", "k3y-0f-th3-app"))
            .and(query_param("site", "stackoverflow"))
            .respond_with(respond(vec![], false))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("key", "k3y-0f-th3-app"))
            .respond_with(ResponseTemplate::new(502).set_body_string("bad gateway"))
            .mount(&server)
            .await;
        source.check().await.unwrap();
        let error = source.poll(&PollRequest::default()).await.unwrap_err();
        assert!(!error.to_string().contains("k3y"), "the key leaked into {error}");
        assert!(!format!("{error:?}").contains("k3y"), "the key leaked into {error:?}");
        assert!(!format!("{source:?}").contains("k3y"), "the key leaked into Debug");
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: StackExchangeConfig =
            serde_json::from_value(json!({"site": "stackoverflow", "tags": ["rust"]})).unwrap();
        assert_eq!(config.base_url.as_str(), "https://api.stackexchange.com/2.3");
        assert!(config.include_answers && config.include_comments);
        assert_eq!(config.max_pages_per_poll, 10);
        assert_eq!(config.pagesize, 100);
        assert_eq!(config.filter, "withbody");
        assert_eq!(config.key, None);
        let keyed: StackExchangeConfig =
            serde_json::from_value(json!({"site": "superuser", "tags": ["x"], "key": {"env": "SE_KEY"}})).unwrap();
        assert_eq!(keyed.key, Some(SecretRef::Env("SE_KEY".into())));
        for unknown in
            [json!({"site": "s", "tags": ["x"], "schedule": "5m"}), json!({"site": "s", "tags": ["x"], "tagged": "y"})]
        {
            assert!(serde_json::from_value::<StackExchangeConfig>(unknown).is_err());
        }
        assert!(serde_json::from_value::<StackExchangeConfig>(json!({"tags": ["x"]})).is_err(), "site is required");

        let build = |change: Value| {
            let mut value = json!({"site": "stackoverflow", "tags": ["rust"]});
            if let (Some(value), Some(change)) = (value.as_object_mut(), change.as_object()) {
                value.extend(change.clone());
            }
            StackExchangeSource::new("so", serde_json::from_value(value).unwrap(), HttpOptions::default())
        };
        assert!(build(json!({})).is_ok());
        assert!(matches!(build(json!({"tags": []})), Err(BuildError::NoTags)));
        assert!(matches!(build(json!({"tags": ["a;b"]})), Err(BuildError::InvalidTag(_))));
        assert!(matches!(build(json!({"tags": [" "]})), Err(BuildError::InvalidTag(_))));
        assert!(matches!(build(json!({"site": " "})), Err(BuildError::InvalidSite(_))));
        assert!(matches!(build(json!({"pagesize": 101})), Err(BuildError::InvalidPagesize(101))));
        assert!(matches!(build(json!({"pagesize": 0})), Err(BuildError::InvalidPagesize(0))));
        assert!(matches!(build(json!({"max_pages_per_poll": 0})), Err(BuildError::InvalidMaxPages)));
        assert!(matches!(build(json!({"base_url": "ftp://example.com"})), Err(BuildError::InvalidBaseUrl(_))));
        let missing = build(json!({"key": {"env": "TRIBUTARY_TEST_SURELY_UNSET"}})).unwrap_err();
        assert!(matches!(missing, BuildError::Secret(_)), "{missing}");
        assert_eq!(build(json!({})).unwrap().platform(), "stackexchange");
    }
}
