//! Discourse: every post of a forum, from its `/posts.json` feed.
//!
//! `/posts.json` lists the newest public posts (50 at a time, newest first);
//! `?before=<id>` lists the posts whose id is at most `id`. A *pass* starts
//! at the newest post and pages back until it reaches the posts committed by
//! the previous pass (the watermark), runs out of posts, passes
//! [`PollRequest::since`] (first pass only) or has fetched
//! [`DiscourseConfig::max_pages_per_poll`] pages. Each call to
//! [`Source::poll`] fetches one page; the cursor remembers where the pass is.
//!
//! The first page of every pass is returned whole (when
//! [`DiscourseConfig::rescan_latest`] is on), so edits and deletions of
//! recent posts are seen again; the daemon's ledger drops the unchanged ones.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::header::HeaderValue;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_sdk::text::website as website_link;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, SecretError, SecretRef, Source, SourceError, source::check_status, text::html_to_text,
};
use url::Url;

const PLATFORM: &str = "discourse";

/// Discourse's `post_type` of a small action ("closed this topic", ...).
const POST_TYPE_SMALL_ACTION: u64 = 3;

/// Settings of one Discourse forum.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscourseConfig {
    /// Root of the forum, e.g. `https://forum.example.com` (a sub-folder
    /// install such as `https://example.com/forum` works too).
    pub base_url: Url,
    /// API key (`{ env = "..." }` or `{ file = "..." }`); public forums need
    /// none. Sent as the `Api-Key` header.
    #[serde(default)]
    pub api_key: Option<SecretRef>,
    /// The user the API key acts as (`Api-Username` header); only used with
    /// `api_key`.
    #[serde(default = "default_api_username")]
    pub api_username: String,
    /// Look up each author's e-mail address with
    /// `GET /u/{username}/emails.json` (needs an admin API key). Answers are
    /// cached in memory; a failed lookup leaves the e-mail empty.
    #[serde(default)]
    pub lookup_emails: bool,
    /// Read each author's public profile with `GET /u/{username}.json` and
    /// fill their links with the website it names. One request per distinct
    /// author per process run (answers are cached in memory); a profile that
    /// is gone or hidden (404, 403) gives no links, another failure is logged
    /// and tried again when the author next appears, and a rate limit fails
    /// the poll so the page is fetched again.
    #[serde(default)]
    pub lookup_profiles: bool,
    /// Most pages (of 50 posts) one poll fetches. A first backfill without
    /// `since` stops there (older posts are left out); any other pass is
    /// paused and resumed by the next poll, so nothing newer is skipped.
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
    /// Return every post of the newest page on each pass, even those already
    /// seen, so recent edits and deletions are picked up.
    #[serde(default = "default_true")]
    pub rescan_latest: bool,
}

fn default_api_username() -> String {
    "system".to_owned()
}

fn default_max_pages_per_poll() -> u32 {
    10
}

fn default_true() -> bool {
    true
}

/// Why a [`DiscourseSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("discourse `api_key`: {0}")]
    Secret(#[from] SecretError),
    #[error("discourse `{0}` holds characters that are not allowed in an HTTP header")]
    InvalidHeader(&'static str),
    #[error("discourse `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("discourse `lookup_emails` needs an `api_key` (of an admin)")]
    EmailsNeedKey,
    #[error("discourse HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// The credentials headers, built once; the values are marked sensitive so
/// they never show in a Debug output.
#[derive(Debug)]
struct ApiHeaders {
    key: HeaderValue,
    username: HeaderValue,
}

/// A Discourse forum, polled through `/posts.json`.
#[derive(Debug)]
pub struct DiscourseSource {
    instance: String,
    /// Host (and port and path) of the forum: the scope of its user ids.
    forum: String,
    config: DiscourseConfig,
    http: HttpClient,
    headers: Option<ApiHeaders>,
    /// Username -> e-mail (None when the forum gave none), for `lookup_emails`.
    emails: Mutex<HashMap<String, Option<String>>>,
    /// Set once the forum refused an e-mail lookup (the key is not an admin's):
    /// no more lookups are tried.
    emails_refused: AtomicBool,
    /// Username -> links of their profile (empty when the forum gave none,
    /// or no profile), for `lookup_profiles`.
    profiles: Mutex<HashMap<String, Vec<String>>>,
    /// Set once a profile lookup was refused (403), so the hint is logged once.
    profile_refusal_logged: AtomicBool,
}

/// What the cursor of a Discourse source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct DiscourseCursor {
    /// The highest post id committed by a finished pass (0: none yet).
    #[serde(default)]
    watermark: u64,
    /// The pass in progress, while paging back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<PassState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PassState {
    /// The newest post id seen by this pass: the next watermark.
    top: u64,
    /// The `before=` of the next page (Discourse includes this id).
    before: u64,
    /// Pages fetched so far in this pass.
    pages: u32,
    /// The oldest creation time to keep (first pass only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
}

impl DiscourseSource {
    pub fn new(instance: &str, config: DiscourseConfig, http: HttpOptions) -> Result<DiscourseSource, BuildError> {
        if !matches!(config.base_url.scheme(), "http" | "https") || config.base_url.cannot_be_a_base() {
            return Err(BuildError::InvalidBaseUrl(config.base_url.to_string()));
        }
        let headers = match &config.api_key {
            Some(secret) => {
                let secret = secret.resolve()?;
                let mut key =
                    HeaderValue::from_str(secret.expose_secret()).map_err(|_| BuildError::InvalidHeader("api_key"))?;
                key.set_sensitive(true);
                let username = HeaderValue::from_str(&config.api_username)
                    .map_err(|_| BuildError::InvalidHeader("api_username"))?;
                Some(ApiHeaders { key, username })
            }
            None => None,
        };
        if config.lookup_emails && headers.is_none() {
            return Err(BuildError::EmailsNeedKey);
        }
        let mut forum = config.base_url.host_str().unwrap_or_default().to_owned();
        if let Some(port) = config.base_url.port() {
            forum.push_str(&format!(":{port}"));
        }
        forum.push_str(config.base_url.path().trim_end_matches('/'));
        Ok(DiscourseSource {
            instance: instance.to_owned(),
            forum,
            http: HttpClient::new(http)?,
            config,
            headers,
            emails: Mutex::new(HashMap::new()),
            emails_refused: AtomicBool::new(false),
            profiles: Mutex::new(HashMap::new()),
            profile_refusal_logged: AtomicBool::new(false),
        })
    }

    /// `base_url` with `segments` appended as path segments (encoded).
    fn endpoint(&self, segments: &[&str]) -> Url {
        tributary_sdk::source::endpoint(&self.config.base_url, segments)
    }

    async fn get(&self, url: Url) -> Result<HttpResponse, HttpError> {
        let mut request = self.http.get(url);
        if let Some(headers) = &self.headers {
            request = request.header("Api-Key", headers.key.clone()).header("Api-Username", headers.username.clone());
        }
        self.http.send(request).await
    }

    /// One page of `/posts.json`, as raw items.
    async fn fetch_posts(&self, before: Option<u64>) -> Result<Vec<Value>, SourceError> {
        let mut url = self.endpoint(&["posts.json"]);
        if let Some(before) = before {
            url.query_pairs_mut().append_pair("before", &before.to_string());
        }
        let response = self.get(url).await?;
        check_status(&response)?;
        let mut body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
        match body.get_mut("latest_posts").map(Value::take) {
            Some(Value::Array(items)) => Ok(items),
            _ => Err(SourceError::Decode(format!("{} answered JSON without a `latest_posts` list", response.target))),
        }
    }

    fn to_contribution(&self, post: RawPost) -> Result<Contribution, String> {
        // User ids are per forum: `forum.example.com/42`, so two forums'
        // user 42 are two people.
        let author_id = match (post.user_id, &post.username) {
            (Some(id), _) => format!("{}/{id}", self.forum),
            (None, Some(username)) if !username.is_empty() => format!("{}/{username}", self.forum),
            _ => return Err("the post has neither a user_id nor a username".to_owned()),
        };
        let kind = if post.post_number == 1 {
            Kind::Post
        } else if post.reply_to_post_number.is_some() {
            Kind::Reply
        } else {
            Kind::Comment
        };
        let url = post.topic_slug.as_deref().map(|slug| {
            self.endpoint(&["t", slug, &post.topic_id.to_string(), &post.post_number.to_string()]).to_string()
        });
        let username = post.username.filter(|name| !name.is_empty());
        let display_name = post
            .name
            .filter(|name| !name.trim().is_empty())
            .or(post.display_username.filter(|name| !name.trim().is_empty()));
        let body = match (&post.cooked, &post.raw) {
            (Some(cooked), _) => html_to_text(cooked),
            (None, Some(raw)) => tributary_sdk::text::tidy(raw),
            (None, None) => String::new(),
        };
        let tags = post
            .tags
            .unwrap_or_default()
            .iter()
            .filter_map(|tag| match tag {
                Value::String(name) => Some(name.clone()),
                Value::Object(fields) => fields.get("name").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            })
            .collect();
        let deleted = post.deleted_at.as_ref().is_some_and(|at| !at.is_null())
            || post.user_deleted.unwrap_or(false)
            || post.hidden.unwrap_or(false);
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: post.id.to_string(),
            url,
            kind,
            author: Author {
                id: author_id,
                profile_url: username.as_deref().map(|name| self.endpoint(&["u", name]).to_string()),
                handle: username,
                display_name,
                email: None,
                links: Vec::new(),
            },
            title: post.topic_title.filter(|title| !title.is_empty()),
            body,
            language: None,
            created_at: post.created_at,
            updated_at: post.updated_at,
            parent_id: post.reply_to_post_number.map(|number| format!("{}/{number}", post.topic_id)),
            thread_id: Some(post.topic_id.to_string()),
            tags,
            score: post.score,
            edited: post.version.unwrap_or(1) > 1,
            deleted,
            signals: None,
        })
    }

    /// Fills what the author lookups give (`lookup_emails`, `lookup_profiles`),
    /// in one pass over the page's distinct usernames: at most one lookup of
    /// each kind per username for the life of the source.
    ///
    /// An e-mail lookup that gives no definite answer fails the page:
    /// committed without the e-mail, the author would become a second contact
    /// beside their real one. A profile lookup fails the page only when
    /// rate limited; any other failure leaves the links empty.
    async fn fill_authors(&self, contributions: &mut [Contribution]) -> Result<(), SourceError> {
        let mut seen = HashSet::new();
        let mut wanted = Vec::new();
        for contribution in contributions.iter() {
            // Negative ids are Discourse's own bots (system, discobot).
            let user_id = contribution.author.id.rsplit('/').next().unwrap_or_default();
            let is_person = user_id.parse::<i64>().is_ok_and(|id| id > 0);
            if let Some(handle) = &contribution.author.handle
                && is_person
                && seen.insert(handle.as_str())
            {
                wanted.push(handle.clone());
            }
        }
        for username in wanted {
            let email_wanted = self.config.lookup_emails
                && !self.emails_refused.load(Ordering::Relaxed)
                && self.cached_email(&username).is_none();
            if email_wanted {
                match self.lookup_email(&username).await {
                    Lookup::Answer(email) => {
                        self.lock_emails().insert(username.clone(), email);
                    }
                    // `emails_refused` is set: no more e-mail lookups.
                    Lookup::Refused => {}
                    Lookup::Failed(error) => {
                        return Err(SourceError::Incomplete(format!(
                            "the e-mail of `{username}` could not be looked up: {error}"
                        )));
                    }
                }
            }
            if self.config.lookup_profiles
                && !self.has_profile(&username)
                && let Some(links) = self.lookup_profile(&username).await?
            {
                self.lock_profiles().insert(username, links);
            }
        }
        let emails = self.lock_emails();
        let profiles = self.lock_profiles();
        for contribution in contributions.iter_mut() {
            let Some(handle) = &contribution.author.handle else { continue };
            if let Some(Some(email)) = emails.get(handle) {
                contribution.author.email = Some(email.clone());
            }
            if let Some(links) = profiles.get(handle) {
                contribution.author.links.clone_from(links);
            }
        }
        Ok(())
    }

    fn lock_emails(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.emails.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cached_email(&self, username: &str) -> Option<Option<String>> {
        self.lock_emails().get(username).cloned()
    }

    async fn lookup_email(&self, username: &str) -> Lookup {
        let url = self.endpoint(&["u", username, "emails.json"]);
        let response = match self.get(url).await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(source = %self.instance, %error, "discourse e-mail lookup failed");
                return Lookup::Failed(error.to_string());
            }
        };
        let status = response.status.as_u16();
        if status == 401 || status == 403 {
            tracing::warn!(
                source = %self.instance, status,
                "discourse refused an e-mail lookup (is the API key an admin's?); no more lookups"
            );
            self.emails_refused.store(true, Ordering::Relaxed);
            return Lookup::Refused;
        }
        if !response.status.is_success() {
            tracing::debug!(source = %self.instance, status, "discourse e-mail lookup answered no e-mail");
            return if status == 404 {
                Lookup::Answer(None)
            } else {
                Lookup::Failed(format!("{} answered HTTP {status}", response.target))
            };
        }
        let email = serde_json::from_slice::<Value>(&response.body)
            .ok()
            .and_then(|body| body.get("email").and_then(Value::as_str).map(str::to_owned))
            .filter(|email| email.contains('@'));
        Lookup::Answer(email)
    }

    fn lock_profiles(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.profiles.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn has_profile(&self, username: &str) -> bool {
        self.lock_profiles().contains_key(username)
    }

    /// The links of `username`'s public profile (`GET /u/{username}.json`):
    /// `Some` is an answer worth caching (empty when the profile names no
    /// website, is gone or is hidden), `None` a failure to try again when the
    /// author next appears. Only a rate limit is an error: the page is then
    /// fetched again rather than committed without the links.
    async fn lookup_profile(&self, username: &str) -> Result<Option<Vec<String>>, SourceError> {
        let url = self.endpoint(&["u", &format!("{username}.json")]);
        let response = match self.get(url).await {
            Ok(response) => response,
            Err(error @ HttpError::RateLimited { .. }) => return Err(SourceError::Http(error)),
            Err(error) => {
                tracing::warn!(
                    source = %self.instance, error = %without_body(&error),
                    "discourse profile lookup failed; the author goes on without links"
                );
                return Ok(None);
            }
        };
        let status = response.status.as_u16();
        match status {
            200..=299 => {}
            404 => {
                tracing::debug!(source = %self.instance, target = %response.target, "discourse has no such profile");
                return Ok(Some(Vec::new()));
            }
            403 => {
                if !self.profile_refusal_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        source = %self.instance, target = %response.target,
                        "discourse refused a profile lookup (profiles hidden from the public, or an API key \
                         without access to users?); such authors go on without links"
                    );
                }
                return Ok(Some(Vec::new()));
            }
            _ => {
                tracing::warn!(
                    source = %self.instance, target = %response.target, status,
                    "discourse profile lookup failed; the author goes on without links"
                );
                return Ok(None);
            }
        }
        let body = match serde_json::from_slice::<Value>(&response.body) {
            Ok(body) if body.get("user").is_some_and(Value::is_object) => body,
            // Not a profile: the forum will not answer better on a retry.
            _ => {
                tracing::warn!(
                    source = %self.instance, target = %response.target,
                    "discourse answered a profile lookup without a `user`; the author goes on without links"
                );
                return Ok(Some(Vec::new()));
            }
        };
        // `website` is left out when empty, and for new (trust level 0)
        // users seen without an API key; a hidden profile has none either.
        let website = body["user"].get("website").and_then(Value::as_str).and_then(website_link);
        Ok(Some(website.into_iter().collect()))
    }
}

/// An [`HttpError`] for a log line, without the body the server sent.
fn without_body(error: &HttpError) -> String {
    match error {
        HttpError::Status { target, status, attempts, .. } => {
            format!("{target} answered HTTP {status} after {attempts} attempt(s)")
        }
        other => other.to_string(),
    }
}

/// The outcome of one e-mail lookup.
enum Lookup {
    /// A definitive answer, worth caching (None: the forum has no e-mail).
    Answer(Option<String>),
    /// The key may not look e-mails up: lookups are off for this source.
    Refused,
    /// No answer this time (network, 5xx, rate limit).
    Failed(String),
}

/// The fields of a `/posts.json` post this connector reads.
#[derive(Debug, Deserialize)]
struct RawPost {
    id: u64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    display_username: Option<String>,
    created_at: DateTime<Utc>,
    #[serde(default)]
    updated_at: Option<DateTime<Utc>>,
    #[serde(default)]
    cooked: Option<String>,
    #[serde(default)]
    raw: Option<String>,
    post_number: u64,
    #[serde(default)]
    post_type: Option<u64>,
    #[serde(default)]
    reply_to_post_number: Option<u64>,
    #[serde(default)]
    score: Option<f64>,
    topic_id: u64,
    #[serde(default)]
    topic_slug: Option<String>,
    #[serde(default)]
    topic_title: Option<String>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    user_id: Option<i64>,
    #[serde(default)]
    hidden: Option<bool>,
    #[serde(default)]
    deleted_at: Option<Value>,
    #[serde(default)]
    user_deleted: Option<bool>,
    #[serde(default)]
    tags: Option<Vec<Value>>,
}

#[async_trait]
impl Source for DiscourseSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let stored = request.stored::<DiscourseCursor>();
        let first_pass = stored.is_none();
        let DiscourseCursor { watermark, pass } = stored.unwrap_or_default();
        let before = pass.as_ref().map(|pass| pass.before);
        let pages = pass.as_ref().map_or(0, |pass| pass.pages) + 1;
        let since = match &pass {
            Some(pass) => pass.since,
            None if first_pass => request.since,
            None => None,
        };

        let items = self.fetch_posts(before).await?;
        let fetched = items.len();
        let mut page = Page::default();
        let (mut newest, mut oldest) = (None::<u64>, None::<u64>);
        let mut passed_since = false;
        for item in items {
            let id = item.get("id").and_then(Value::as_u64);
            if let Some(id) = id {
                newest = Some(newest.map_or(id, |n| n.max(id)));
                oldest = Some(oldest.map_or(id, |o| o.min(id)));
                // Already committed: only the first page of a pass is rescanned.
                if id <= watermark && (before.is_some() || !self.config.rescan_latest) {
                    continue;
                }
            }
            let post = match serde_json::from_value::<RawPost>(item.clone()) {
                Ok(post) => post,
                // Reported by the pass that first saw it.
                Err(_) if id.is_some_and(|id| id <= watermark) => continue,
                Err(error) => {
                    let raw = serde_json::to_string(&item).unwrap_or_default();
                    let reason = format!("cannot read the post: {error}");
                    page.quarantined.push(Quarantined::new(id.map(|id| id.to_string()), reason, &raw));
                    continue;
                }
            };
            if post.post_type == Some(POST_TYPE_SMALL_ACTION) {
                continue;
            }
            if since.is_some_and(|since| post.created_at < since) {
                passed_since = true;
                continue;
            }
            let post_id = post.id;
            match self.to_contribution(post) {
                Ok(contribution) => page.contributions.push(contribution),
                Err(_) if post_id <= watermark => {}
                Err(reason) => {
                    let raw = serde_json::to_string(&item).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(Some(post_id.to_string()), reason, &raw));
                }
            }
        }
        if self.config.lookup_emails || self.config.lookup_profiles {
            self.fill_authors(&mut page.contributions).await?;
        }

        let top = pass.as_ref().map_or(newest.unwrap_or(0), |pass| pass.top);
        let next_before = match oldest {
            // Discourse lists ids <= before, so ask for the ones below this page.
            Some(oldest) if oldest > watermark && oldest > 1 => Some(oldest - 1),
            _ => None,
        };
        // A server that ignores `before` would have us loop: stop instead.
        let ignored_before = matches!((before, oldest), (Some(before), Some(oldest)) if oldest > before);
        if ignored_before {
            tracing::warn!(source = %self.instance, "discourse ignored `before`; ending the pass");
        }
        // The page cap ends only a first backfill without `since` (older
        // posts are then left out, as documented). Any other pass is paused
        // at the cap and resumed by the next poll: moving the watermark over
        // posts not yet fetched would lose them.
        let cap_hit = pages >= self.config.max_pages_per_poll.max(1);
        let ends_at_cap = watermark == 0 && since.is_none();
        let pass_over = next_before.is_none() || passed_since || ignored_before || (cap_hit && ends_at_cap);
        let paused = cap_hit && !pass_over;
        let next = match next_before {
            Some(next_before) if !pass_over => DiscourseCursor {
                watermark,
                // A paused pass counts its pages afresh on the next poll.
                pass: Some(PassState { top, before: next_before, pages: if paused { 0 } else { pages }, since }),
            },
            _ => DiscourseCursor { watermark: watermark.max(top), pass: None },
        };
        if paused {
            tracing::info!(source = %self.instance, pages, "discourse pass paused at max_pages_per_poll; the next poll resumes it");
        }
        tracing::debug!(
            source = %self.instance, before, fetched,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            pass_over, "discourse page polled"
        );
        if pass_over {
            tracing::info!(source = %self.instance, watermark = next.watermark, pages, "discourse pass complete");
        }
        page.has_more = !pass_over && !paused;
        // Nothing seen yet (an empty forum): keep no cursor, so the next
        // pass is still a first one and honours `since`.
        page.next_cursor = (next != DiscourseCursor::default()).then(|| Cursor::from_json(&next));
        Ok(page)
    }

    /// Fetches the newest page of posts: the one request every poll needs,
    /// so it works with an API key scoped to reading posts.
    async fn check(&self) -> Result<(), SourceError> {
        self.fetch_posts(None).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{header, method, path, path_regex, query_param, query_param_is_missing},
    };

    use super::*;

    fn options() -> HttpOptions {
        HttpOptions {
            max_retries: 0,
            backoff_base: Duration::from_millis(1),
            timeout: Duration::from_secs(5),
            ..HttpOptions::default()
        }
    }

    fn config(server: &MockServer) -> DiscourseConfig {
        serde_json::from_value(serde_json::json!({ "base_url": server.uri() })).unwrap()
    }

    fn source(config: DiscourseConfig) -> DiscourseSource {
        DiscourseSource::new("community", config, options()).unwrap()
    }

    fn fixture() -> Fixture {
        Fixture::load("discourse", "posts_latest")
    }

    /// The recorded posts, for deriving modified copies.
    fn posts() -> Vec<Value> {
        fixture().body["latest_posts"].as_array().cloned().unwrap()
    }

    /// The fixture with `latest_posts` replaced.
    fn with_posts(posts: Vec<Value>) -> ResponseTemplate {
        let mut fixture = fixture();
        fixture.body["latest_posts"] = Value::Array(posts);
        fixture.response()
    }

    fn post_mut(posts: &mut [Value], id: u64) -> &mut Value {
        posts.iter_mut().find(|post| post["id"] == id).unwrap()
    }

    async fn serve(server: &MockServer, response: ResponseTemplate) {
        Mock::given(method("GET")).and(path("/posts.json")).respond_with(response).mount(server).await;
    }

    fn cursor(page: &Page) -> DiscourseCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn cursor_at(watermark: u64) -> Option<Cursor> {
        Some(Cursor::from_json(&DiscourseCursor { watermark, pass: None }))
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    fn find<'a>(page: &'a Page, id: &str) -> &'a Contribution {
        page.contributions.iter().find(|c| c.external_id == id).unwrap()
    }

    /// One expected post of the fixture, checked by value.
    struct Expect {
        id: &'static str,
        kind: Kind,
        author_id: &'static str,
        handle: &'static str,
        name: &'static str,
        title: &'static str,
        thread: &'static str,
        url_path: &'static str,
        edited: bool,
        created_at: &'static str,
        body_starts: &'static str,
    }

    fn check(page: &Page, base: &str, expect: &Expect) {
        let c = find(page, expect.id);
        let at = expect.id;
        assert_eq!(c.platform, "discourse", "{at}");
        assert_eq!(c.source, "community", "{at}");
        assert_eq!(c.kind, expect.kind, "{at}");
        // User ids are scoped to the forum (host and port here).
        let forum = base.trim_start_matches("http://");
        assert_eq!(c.author.id, format!("{forum}/{}", expect.author_id), "{at}");
        assert_eq!(c.author.handle.as_deref(), Some(expect.handle), "{at}");
        assert_eq!(c.author.display_name.as_deref(), Some(expect.name), "{at}");
        assert_eq!(c.author.profile_url.as_deref(), Some(format!("{base}/u/{}", expect.handle).as_str()), "{at}");
        assert_eq!(c.author.email, None, "{at}");
        assert_eq!(c.title.as_deref(), Some(expect.title), "{at}");
        assert_eq!(c.thread_id.as_deref(), Some(expect.thread), "{at}");
        assert_eq!(c.parent_id, None, "{at}");
        assert_eq!(c.url.as_deref(), Some(format!("{base}{}", expect.url_path).as_str()), "{at}");
        assert_eq!(c.edited, expect.edited, "{at}");
        assert!(!c.deleted, "{at}");
        assert_eq!(c.created_at, expect.created_at.parse::<DateTime<Utc>>().unwrap(), "{at}");
        assert!(c.body.starts_with(expect.body_starts), "{at}: {:?}", c.body);
        assert!(!c.body.contains('<'), "{at}: HTML left in {:?}", c.body);
        assert_eq!(c.language, None, "{at}");
        assert_eq!(c.signals, None, "{at}");
        assert!(c.tags.is_empty(), "{at}");
    }

    #[tokio::test]
    async fn maps_every_recorded_post() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&page), ["29", "28", "27", "26", "25", "22", "18", "17", "16", "14", "10", "1"]);
        assert!(page.quarantined.is_empty());
        let base = server.uri();
        let expected = [
            Expect {
                id: "29",
                kind: Kind::Post,
                author_id: "2",
                handle: "d11",
                name: "D",
                title: "A Post With References",
                thread: "21",
                url_path: "/t/a-post-with-references/21/1",
                edited: false,
                created_at: "2019-10-23T18:26:31.281Z",
                body_starts: "Here is a mention: @dl-proto\nHere is a topic reference:",
            },
            Expect {
                id: "27",
                kind: Kind::Comment,
                author_id: "2",
                handle: "d11",
                name: "D",
                title: "This post will be a wiki",
                thread: "19",
                url_path: "/t/this-post-will-be-a-wiki/19/2",
                edited: false,
                created_at: "2019-10-02T20:57:16.311Z",
                body_starts: "I’m replying to a wiki.",
            },
            Expect {
                id: "26",
                kind: Kind::Post,
                author_id: "2",
                handle: "d11",
                name: "D",
                title: "This post will be a wiki",
                thread: "19",
                url_path: "/t/this-post-will-be-a-wiki/19/1",
                edited: true,
                created_at: "2019-10-02T20:51:31.743Z",
                body_starts: "So I’m starting the wiki content.\n\nNo remove that line.",
            },
            Expect {
                id: "18",
                kind: Kind::Comment,
                author_id: "2",
                handle: "d11",
                name: "D",
                title: "A Thread With Links",
                thread: "13",
                url_path: "/t/a-thread-with-links/13/2",
                edited: true,
                created_at: "2019-08-02T11:16:31.313Z",
                body_starts: "dl-proto:\n\nHere is a link to another discourse thread:\n\nExcellent link.",
            },
            Expect {
                id: "17",
                kind: Kind::Post,
                author_id: "3",
                handle: "dl-proto",
                name: "dandelion protocol acct",
                title: "A Thread With Links",
                thread: "13",
                url_path: "/t/a-thread-with-links/13/1",
                edited: false,
                created_at: "2019-08-02T11:15:53.905Z",
                body_starts: "Here is a link to another discourse thread: My First Test Post",
            },
            Expect {
                id: "14",
                kind: Kind::Post,
                author_id: "2",
                handle: "d11",
                name: "D",
                title: "My First Test Post",
                thread: "11",
                url_path: "/t/my-first-test-post/11/1",
                edited: true,
                created_at: "2019-08-02T11:12:29.476Z",
                body_starts: "This is a test post.\n\nEDIT: This test post was edited on October 24, 2019.",
            },
            Expect {
                id: "10",
                kind: Kind::Post,
                author_id: "-1",
                handle: "system",
                name: "system",
                title: "Welcome to Discourse",
                thread: "7",
                url_path: "/t/welcome-to-discourse/7/1",
                edited: true,
                created_at: "2019-04-02T20:20:12.933Z",
                body_starts: "This is a test instance.",
            },
        ];
        for expect in &expected {
            check(&page, &base, expect);
        }
        // Every post of the page: edited exactly where the fixture says so.
        let edited: Vec<_> = page.contributions.iter().filter(|c| c.edited).map(|c| c.external_id.as_str()).collect();
        assert_eq!(edited, ["26", "18", "14", "10"]);
        for c in &page.contributions {
            assert!(!c.body.is_empty() && !c.body.contains("<p>"), "{}: {:?}", c.external_id, c.body);
        }
        let post29 = find(&page, "29");
        assert_eq!(post29.score, Some(5.2));
        assert_eq!(post29.updated_at, Some("2019-10-23T18:26:31.281Z".parse().unwrap()));
        let body29 = post29.body.replace(['[', ']'], "");
        assert!(body29.contains("Here is a post reference with a slug: My First Test Post"), "{body29:?}");
        assert_eq!(find(&page, "14").updated_at, Some("2019-10-24T16:51:12.095Z".parse().unwrap()));
        // Oldest post is id 1: nothing older to page back to.
        assert!(!page.has_more);
        assert_eq!(cursor(&page), DiscourseCursor { watermark: 29, pass: None });
    }

    /// Serves the fixture in two pages: the newest 6 posts, then (for
    /// `before=21`) the 6 older ones.
    async fn serve_two_pages(server: &MockServer) {
        let all = posts();
        let (newest, older) = all.split_at(6);
        Mock::given(method("GET"))
            .and(path("/posts.json"))
            .and(query_param_is_missing("before"))
            .respond_with(with_posts(newest.to_vec()))
            .expect(1)
            .mount(server)
            .await;
        Mock::given(method("GET"))
            .and(path("/posts.json"))
            .and(query_param("before", "21"))
            .respond_with(with_posts(older.to_vec()))
            .expect(1)
            .mount(server)
            .await;
    }

    #[tokio::test]
    async fn pages_back_with_before_down_to_the_stored_watermark() {
        let server = MockServer::start().await;
        serve_two_pages(&server).await;
        let source = source(config(&server));

        let first = source.poll(&PollRequest { cursor: cursor_at(10), since: None }).await.unwrap();
        assert_eq!(ids(&first), ["29", "28", "27", "26", "25", "22"]);
        assert!(first.has_more);
        let pass = PassState { top: 29, before: 21, pages: 1, since: None };
        assert_eq!(cursor(&first), DiscourseCursor { watermark: 10, pass: Some(pass) });

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        // 10 and 1 were committed by an earlier pass.
        assert_eq!(ids(&second), ["18", "17", "16", "14"]);
        assert!(!second.has_more);
        assert_eq!(cursor(&second), DiscourseCursor { watermark: 29, pass: None });
    }

    #[tokio::test]
    async fn a_later_pass_pauses_at_max_pages_and_the_next_poll_resumes_it() {
        let server = MockServer::start().await;
        serve_two_pages(&server).await;
        let mut config = config(&server);
        config.max_pages_per_poll = 1;
        let source = source(config);

        let first = source.poll(&PollRequest { cursor: cursor_at(10), since: None }).await.unwrap();
        assert_eq!(ids(&first), ["29", "28", "27", "26", "25", "22"]);
        assert!(!first.has_more, "the cap ends this poll");
        let paused = PassState { top: 29, before: 21, pages: 0, since: None };
        assert_eq!(
            cursor(&first),
            DiscourseCursor { watermark: 10, pass: Some(paused) },
            "the watermark must not jump"
        );

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second), ["18", "17", "16", "14"]);
        assert_eq!(cursor(&second), DiscourseCursor { watermark: 29, pass: None });
    }

    #[tokio::test]
    async fn a_pass_stops_after_max_pages() {
        let server = MockServer::start().await;
        let all = posts();
        serve(&server, with_posts(all[..6].to_vec())).await;
        let mut config = config(&server);
        config.max_pages_per_poll = 1;
        let page = source(config).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 6);
        assert!(!page.has_more);
        assert_eq!(cursor(&page), DiscourseCursor { watermark: 29, pass: None });
    }

    #[tokio::test]
    async fn first_pass_honours_since() {
        let server = MockServer::start().await;
        serve_two_pages(&server).await;
        let source = source(config(&server));
        let since = Some("2019-08-02T11:14:00Z".parse().unwrap());

        let first = source.poll(&PollRequest { cursor: None, since }).await.unwrap();
        assert!(first.has_more);
        assert_eq!(cursor(&first).pass.unwrap().since, since);
        // The daemon may not repeat `since`: the cursor carries it.
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second), ["18", "17", "16"]);
        assert!(!second.has_more);
        assert_eq!(cursor(&second), DiscourseCursor { watermark: 29, pass: None });
    }

    #[tokio::test]
    async fn a_second_pass_rescans_the_latest_page_and_keeps_the_watermark() {
        let server = MockServer::start().await;
        let mut edited = posts();
        post_mut(&mut edited, 26)["cooked"] = "<p>Edited <em>again</em>.</p>".into();
        post_mut(&mut edited, 26)["version"] = 4.into();
        post_mut(&mut edited, 25)["deleted_at"] = "2019-10-25T10:00:00.000Z".into();
        post_mut(&mut edited, 22)["hidden"] = true.into();
        // Quarantined by the pass that first saw it: not reported again.
        post_mut(&mut edited, 1)["created_at"] = "yesterday".into();
        serve(&server, with_posts(edited)).await;
        let request = PollRequest { cursor: cursor_at(29), since: None };

        let page = source(config(&server)).poll(&request).await.unwrap();
        assert_eq!(page.contributions.len(), 11);
        assert!(page.quarantined.is_empty(), "{:?}", page.quarantined);
        assert!(!page.has_more);
        assert_eq!(cursor(&page), DiscourseCursor { watermark: 29, pass: None });
        assert_eq!(find(&page, "26").body, "Edited again.");
        let deleted: Vec<_> = page.contributions.iter().filter(|c| c.deleted).map(|c| c.external_id.as_str()).collect();
        assert_eq!(deleted, ["25", "22"]);

        let mut config = config(&server);
        config.rescan_latest = false;
        let page = source(config).poll(&request).await.unwrap();
        assert!(page.contributions.is_empty());
        assert_eq!(cursor(&page), DiscourseCursor { watermark: 29, pass: None });
    }

    #[tokio::test]
    async fn malformed_posts_are_quarantined_and_the_rest_goes_on() {
        let server = MockServer::start().await;
        let mut items = posts();
        post_mut(&mut items, 29).as_object_mut().unwrap().remove("id");
        post_mut(&mut items, 28)["created_at"] = "last Tuesday".into();
        post_mut(&mut items, 27)["topic_id"] = "nineteen".into();
        post_mut(&mut items, 16)["post_type"] = 3.into();
        post_mut(&mut items, 17)["post_type"] = 4.into();
        post_mut(&mut items, 18)["reply_to_post_number"] = 1.into();
        post_mut(&mut items, 18)["tags"] = serde_json::json!(["howto", {"name": "sso", "id": 3}, 7]);
        serve(&server, with_posts(items)).await;

        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&page), ["26", "25", "22", "18", "17", "14", "10", "1"]);
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [None, Some("28"), Some("27")]);
        assert!(page.quarantined[0].reason.contains("id"), "{}", page.quarantined[0].reason);
        assert!(page.quarantined[0].raw.contains("A Post With References"));
        assert!(page.quarantined[1].reason.contains("created_at") || page.quarantined[1].reason.contains("input"));
        let reply = find(&page, "18");
        assert_eq!(reply.kind, Kind::Reply);
        assert_eq!(reply.parent_id.as_deref(), Some("13/1"));
        assert_eq!(reply.tags, ["howto", "sso"]);
        // Post 28 had no readable date but an id: the watermark still covers it.
        assert_eq!(cursor(&page).watermark, 28);
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_a_decode_error() {
        let server = MockServer::start().await;
        serve(&server, ResponseTemplate::new(200).set_body_string("<html>maintenance</html>")).await;
        let error = source(config(&server)).poll(&PollRequest::default()).await.unwrap_err();
        assert!(matches!(&error, SourceError::Decode(message) if message.contains("/posts.json")), "{error:?}");

        let server = MockServer::start().await;
        serve(&server, ResponseTemplate::new(200).set_body_json(serde_json::json!({"users": []}))).await;
        let error = source(config(&server)).poll(&PollRequest::default()).await.unwrap_err();
        assert!(matches!(&error, SourceError::Decode(message) if message.contains("latest_posts")), "{error:?}");
    }

    #[tokio::test]
    async fn refusals_map_to_auth_and_other_statuses_to_status() {
        for (status, is_auth) in [(403, true), (401, true), (404, false)] {
            let server = MockServer::start().await;
            let body = serde_json::json!({"errors": ["You are not permitted to view the requested resource."], "error_type": "invalid_access"});
            serve(&server, ResponseTemplate::new(status).set_body_json(body)).await;
            let source = source(config(&server));
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                match error {
                    SourceError::Auth(message) => {
                        assert!(is_auth && message.contains("not permitted"), "{status}: {message}")
                    }
                    SourceError::Status { status: got, .. } => {
                        assert!(!is_auth && got == status, "{status}")
                    }
                    other => panic!("{status}: unexpected {other:?}"),
                }
            }
        }
    }

    /// A source with an API key read from a secret file (removed once
    /// the source is built: the key is resolved in `new`).
    fn keyed_source(server: &MockServer, name: &str, lookup_emails: bool) -> DiscourseSource {
        keyed_source_with(server, name, |config| config.lookup_emails = lookup_emails)
    }

    fn keyed_source_with(server: &MockServer, name: &str, edit: impl FnOnce(&mut DiscourseConfig)) -> DiscourseSource {
        let dir = std::env::temp_dir().join(format!("tributary-forums-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("api_key");
        std::fs::write(&file, "k3y-0f-th3-f0rum\n").unwrap();
        let mut config = config(server);
        config.api_key = Some(SecretRef::File(file));
        config.api_username = "tributary".into();
        edit(&mut config);
        let source = source(config);
        std::fs::remove_dir_all(dir).unwrap();
        source
    }

    #[tokio::test]
    async fn api_key_and_username_headers_are_sent() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/posts.json"))
            .and(header("Api-Key", "k3y-0f-th3-f0rum"))
            .and(header("Api-Username", "tributary"))
            .respond_with(fixture().response())
            .expect(2)
            .mount(&server)
            .await;
        let source = keyed_source(&server, "headers", false);
        source.check().await.unwrap();
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 12);
        assert!(!format!("{source:?}").contains("k3y-0f-th3-f0rum"), "the key leaked into Debug");
    }

    #[tokio::test]
    async fn lookup_emails_fills_the_author_email_once_per_username() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        Mock::given(method("GET"))
            .and(path("/u/d11/emails.json"))
            .and(header("Api-Key", "k3y-0f-th3-f0rum"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "email": "d11@example.com",
                "secondary_emails": [],
                "unconfirmed_emails": [],
                "associated_accounts": []
            })))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/u/dl-proto/emails.json"))
            .respond_with(ResponseTemplate::new(404).set_body_json(serde_json::json!({"errors": ["not found"]})))
            .expect(1)
            .mount(&server)
            .await;
        let source = keyed_source(&server, "emails", true);
        for _ in 0..2 {
            let page = source.poll(&PollRequest::default()).await.unwrap();
            assert_eq!(find(&page, "29").author.email.as_deref(), Some("d11@example.com"));
            assert_eq!(find(&page, "17").author.email, None);
            assert_eq!(find(&page, "10").author.email, None);
        }
        // The system user (id -1) is never looked up.
        let requests = server.received_requests().await.unwrap();
        assert!(!requests.iter().any(|r| r.url.path().contains("/u/system")));
    }

    #[tokio::test]
    async fn a_refused_email_lookup_stops_lookups_but_not_the_poll() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        Mock::given(method("GET"))
            .and(path_regex("^/u/[^/]+/emails.json$"))
            .respond_with(ResponseTemplate::new(403).set_body_json(serde_json::json!({"errors": ["not permitted"]})))
            .expect(1)
            .mount(&server)
            .await;
        let source = keyed_source(&server, "refused", true);
        for _ in 0..2 {
            let page = source.poll(&PollRequest::default()).await.unwrap();
            assert_eq!(page.contributions.len(), 12);
            assert!(page.contributions.iter().all(|c| c.author.email.is_none()));
        }
    }

    #[tokio::test]
    async fn a_failed_email_lookup_fails_the_page_so_it_is_fetched_again() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        Mock::given(method("GET"))
            .and(path_regex("^/u/[^/]+/emails.json$"))
            .respond_with(ResponseTemplate::new(502))
            .mount(&server)
            .await;
        let source = keyed_source(&server, "flaky", true);
        let error = source.poll(&PollRequest::default()).await.unwrap_err();
        assert!(matches!(error, SourceError::Incomplete(_)), "{error:?}");
        assert!(error.to_string().contains("could not be looked up"), "{error}");
    }

    /// A `/u/{username}.json` answer as Discourse gives it (abridged), with
    /// `website` (and `website_name`) only when the profile names one.
    fn profile(id: i64, username: &str, website: Option<&str>) -> ResponseTemplate {
        let mut user = serde_json::json!({
            "id": id,
            "username": username,
            "name": username.to_uppercase(),
            "avatar_template": "/letter_avatar_proxy/v4/letter/d/47e85d/{size}.png",
            "last_posted_at": "2019-10-23T18:26:31.281Z",
            "last_seen_at": "2019-10-24T16:51:12.095Z",
            "created_at": "2019-04-02T20:22:57.000Z",
            "ignored": false,
            "muted": false,
            "can_send_private_message_to_user": true,
            "trust_level": 1,
            "moderator": false,
            "admin": false,
            "title": null,
            "badge_count": 3,
            "profile_view_count": 12,
            "profile_background_upload_url": null,
            "card_background_upload_url": null,
            "featured_user_badge_ids": [],
            "invited_by": null,
            "groups": [{"id": 11, "name": "trust_level_1", "automatic": true}]
        });
        if let Some(website) = website {
            user["website"] = website.into();
            user["website_name"] = website.trim_start_matches("https://").trim_start_matches("http://").into();
        }
        ResponseTemplate::new(200).set_body_json(serde_json::json!({"user_badges": [], "user": user}))
    }

    async fn serve_profile(server: &MockServer, username: &str, response: ResponseTemplate, times: u64) {
        Mock::given(method("GET"))
            .and(path(format!("/u/{username}.json")))
            .respond_with(response)
            .expect(times)
            .mount(server)
            .await;
    }

    fn profile_requests(requests: &[wiremock::Request]) -> Vec<String> {
        requests.iter().map(|r| r.url.path().to_owned()).filter(|path| path.starts_with("/u/")).collect()
    }

    fn public_source_with_profiles(server: &MockServer) -> DiscourseSource {
        let mut config = config(server);
        config.lookup_profiles = true;
        source(config)
    }

    #[tokio::test]
    async fn lookup_profiles_fills_the_website_once_per_username() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        serve_profile(&server, "d11", profile(2, "d11", Some("http://d11.example.org/blog")), 1).await;
        serve_profile(&server, "dl-proto", profile(3, "dl-proto", None), 1).await;
        let source = public_source_with_profiles(&server);
        for _ in 0..2 {
            let page = source.poll(&PollRequest::default()).await.unwrap();
            assert_eq!(page.contributions.len(), 12);
            for c in page.contributions.iter().filter(|c| c.author.handle.as_deref() == Some("d11")) {
                assert_eq!(c.author.links, ["http://d11.example.org/blog"], "{}", c.external_id);
                assert_eq!(c.author.email, None, "profiles give no e-mail");
            }
            assert!(find(&page, "17").author.links.is_empty(), "a profile without a website");
            assert!(find(&page, "10").author.links.is_empty());
        }
        // Seven posts of d11, two of dl-proto, two polls: one request each.
        // The system user (id -1) is never looked up.
        let requests = server.received_requests().await.unwrap();
        assert_eq!(profile_requests(&requests), ["/u/d11.json", "/u/dl-proto.json"]);
        // No key configured: none sent.
        assert!(requests.iter().all(|r| !r.headers.contains_key("Api-Key")));
    }

    #[tokio::test]
    async fn profiles_and_emails_are_looked_up_together_with_the_key() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        for (username, id, website) in [("d11", 2, "d11.example.org"), ("dl-proto", 3, "https://Proto.Example.com/")] {
            Mock::given(method("GET"))
                .and(path(format!("/u/{username}.json")))
                .and(header("Api-Key", "k3y-0f-th3-f0rum"))
                .and(header("Api-Username", "tributary"))
                .respond_with(profile(id, username, Some(website)))
                .expect(1)
                .mount(&server)
                .await;
            Mock::given(method("GET"))
                .and(path(format!("/u/{username}/emails.json")))
                .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                    "email": format!("{username}@example.com"), "secondary_emails": [], "unconfirmed_emails": []
                })))
                .expect(1)
                .mount(&server)
                .await;
        }
        let source = keyed_source_with(&server, "profiles", |config| {
            config.lookup_emails = true;
            config.lookup_profiles = true;
        });
        for _ in 0..2 {
            let page = source.poll(&PollRequest::default()).await.unwrap();
            let d11 = &find(&page, "29").author;
            assert_eq!(d11.email.as_deref(), Some("d11@example.com"));
            assert_eq!(d11.links, ["https://d11.example.org"]);
            let proto = &find(&page, "16").author;
            assert_eq!(proto.email.as_deref(), Some("dl-proto@example.com"));
            assert_eq!(proto.links, ["https://proto.example.com"]);
        }
    }

    #[tokio::test]
    async fn a_gone_or_hidden_profile_gives_no_links_and_is_not_asked_again() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        let gone = ResponseTemplate::new(404)
            .set_body_json(serde_json::json!({"errors": ["The requested URL or resource could not be found."], "error_type": "not_found"}));
        let hidden = ResponseTemplate::new(403)
            .set_body_json(serde_json::json!({"errors": ["You are not permitted to view the requested resource."], "error_type": "invalid_access"}));
        serve_profile(&server, "d11", gone, 1).await;
        serve_profile(&server, "dl-proto", hidden, 1).await;
        let source = public_source_with_profiles(&server);
        for _ in 0..2 {
            let page = source.poll(&PollRequest::default()).await.unwrap();
            assert_eq!(page.contributions.len(), 12, "no item is dropped");
            assert!(page.quarantined.is_empty());
            assert!(page.contributions.iter().all(|c| c.author.links.is_empty()));
        }

        // A profile hidden by its owner answers 200 with no website.
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        let hidden = ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "user_badges": [],
            "user": {"id": 2, "username": "d11", "name": "D", "avatar_template": "/a/{size}.png", "profile_hidden": true}
        }));
        serve_profile(&server, "d11", hidden, 1).await;
        serve_profile(&server, "dl-proto", profile(3, "dl-proto", Some("")), 1).await;
        let source = public_source_with_profiles(&server);
        for _ in 0..2 {
            let page = source.poll(&PollRequest::default()).await.unwrap();
            assert!(page.contributions.iter().all(|c| c.author.links.is_empty()));
        }
    }

    #[tokio::test]
    async fn a_rate_limited_profile_lookup_fails_the_poll_and_the_page_comes_again_whole() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        Mock::given(method("GET"))
            .and(path_regex("^/u/[^/]+\\.json$"))
            .respond_with(
                ResponseTemplate::new(429).set_body_string("Slow down, too many requests from this IP address."),
            )
            .up_to_n_times(1)
            .expect(1)
            .mount(&server)
            .await;
        serve_profile(&server, "d11", profile(2, "d11", Some("https://d11.example.org")), 1).await;
        serve_profile(&server, "dl-proto", profile(3, "dl-proto", None), 1).await;
        let source = public_source_with_profiles(&server);

        let error = source.poll(&PollRequest::default()).await.unwrap_err();
        assert!(matches!(error, SourceError::Http(HttpError::RateLimited { .. })), "{error:?}");

        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 12);
        assert_eq!(find(&page, "29").author.links, ["https://d11.example.org"]);
        assert_eq!(cursor(&page), DiscourseCursor { watermark: 29, pass: None });
    }

    #[tokio::test]
    async fn a_failed_profile_lookup_leaves_no_links_and_is_tried_again() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        serve_profile(&server, "d11", ResponseTemplate::new(502).set_body_string("<html>Bad gateway</html>"), 2).await;
        serve_profile(&server, "dl-proto", ResponseTemplate::new(200).set_body_string("<html>maintenance</html>"), 1)
            .await;
        let source = public_source_with_profiles(&server);
        for _ in 0..2 {
            let page = source.poll(&PollRequest::default()).await.unwrap();
            assert_eq!(page.contributions.len(), 12, "no item is dropped");
            assert!(page.contributions.iter().all(|c| c.author.links.is_empty()));
        }
        // The 502 is asked again on the next poll, the unreadable answer is not.
        let requests = server.received_requests().await.unwrap();
        assert_eq!(profile_requests(&requests), ["/u/d11.json", "/u/dl-proto.json", "/u/d11.json"]);
    }

    #[tokio::test]
    async fn no_profile_lookup_when_the_option_is_off() {
        let server = MockServer::start().await;
        serve(&server, fixture().response()).await;
        Mock::given(method("GET"))
            .and(path_regex("^/u/[^/]+\\.json$"))
            .respond_with(profile(2, "d11", Some("https://d11.example.org")))
            .expect(0)
            .named("profile lookups")
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path_regex("^/u/[^/]+/emails\\.json$"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({"email": "someone@example.com"})))
            .mount(&server)
            .await;
        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 12);
        assert!(page.contributions.iter().all(|c| c.author.links.is_empty()));
        let requests = server.received_requests().await.unwrap();
        assert!(profile_requests(&requests).is_empty(), "nothing on /u/ at all");

        // E-mail lookups on, profiles off: only e-mails are asked for.
        let source = keyed_source(&server, "profiles-off", true);
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(find(&page, "29").author.email.as_deref(), Some("someone@example.com"));
        assert!(page.contributions.iter().all(|c| c.author.links.is_empty()));
        let requests = server.received_requests().await.unwrap();
        assert_eq!(profile_requests(&requests), ["/u/d11/emails.json", "/u/dl-proto/emails.json"]);
    }

    #[tokio::test]
    async fn scripts_in_cooked_do_not_reach_the_body() {
        let server = MockServer::start().await;
        let mut items = posts();
        post_mut(&mut items, 29)["cooked"] =
            "<p>Hi <b>there</b> &amp; welcome</p><script>alert('pwned')</script><img src=x onerror=alert(1)>".into();
        serve(&server, with_posts(items)).await;
        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        let body = &find(&page, "29").body;
        assert!(!body.contains("<script") && !body.contains("alert") && !body.contains("onerror"), "{body:?}");
        assert!(body.starts_with("Hi there & welcome"), "{body:?}");
    }

    #[tokio::test]
    async fn an_empty_forum_keeps_no_cursor() {
        let server = MockServer::start().await;
        serve(&server, with_posts(vec![])).await;
        let page = source(config(&server)).poll(&PollRequest::default()).await.unwrap();
        assert!(page.contributions.is_empty() && !page.has_more && page.next_cursor.is_none());
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: DiscourseConfig = serde_json::from_value(serde_json::json!({
            "base_url": "https://forum.example.com/community/",
            "api_key": {"env": "DISCOURSE_KEY"}
        }))
        .unwrap();
        assert_eq!(config.api_username, "system");
        assert!(!config.lookup_emails && !config.lookup_profiles && config.rescan_latest);
        assert_eq!(config.max_pages_per_poll, 10);
        assert_eq!(config.api_key, Some(SecretRef::Env("DISCOURSE_KEY".into())));
        let unknown = serde_json::from_value::<DiscourseConfig>(serde_json::json!({
            "base_url": "https://forum.example.com", "schedule": "*/5 * * * *"
        }));
        assert!(unknown.is_err());

        // A sub-folder install keeps its path in every link.
        let source =
            DiscourseSource::new("c", DiscourseConfig { api_key: None, ..config.clone() }, HttpOptions::default())
                .unwrap();
        assert_eq!(
            source.endpoint(&["t", "ünïcode slug", "7", "1"]).as_str(),
            "https://forum.example.com/community/t/%C3%BCn%C3%AFcode%20slug/7/1"
        );

        let missing = DiscourseSource::new(
            "c",
            DiscourseConfig { api_key: Some(SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into())), ..config.clone() },
            HttpOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(missing, BuildError::Secret(_)), "{missing}");
        let no_key = DiscourseSource::new(
            "c",
            DiscourseConfig { api_key: None, lookup_emails: true, ..config },
            HttpOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(no_key, BuildError::EmailsNeedKey), "{no_key}");
    }
}
