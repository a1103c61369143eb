//! GitHub: the issues and issue comments of chosen repositories.
//!
//! Each configured repository has two *streams*, polled the same way:
//! `GET /repos/{owner}/{repo}/issues?state=all&sort=updated&direction=asc&since=<watermark>`
//! and `GET /repos/{owner}/{repo}/issues/comments?sort=updated&direction=asc&since=<watermark>`.
//! GitHub returns what was updated at or after `since`, oldest change first,
//! in pages chained by the `Link: <...>; rel="next"` header. A *pass* of a
//! stream follows those links (only while they stay on the host of
//! [`GitHubConfig::base_url`]) until there is no `next`; then the stream's
//! watermark becomes the newest `updated_at` the pass saw. Items updated
//! exactly at the watermark come back on the next pass; the daemon's ledger
//! drops them when unchanged.
//!
//! Each call to [`Source::poll`] fetches one page. A *round* visits every
//! stream in configuration order (issues, then comments, of each repository)
//! and ends when the last one is done; `has_more` stays set until then. A
//! stream that has fetched [`GitHubConfig::max_pages_per_poll`] pages in a
//! round is paused: the cursor keeps its `next` link and its old watermark,
//! and the next round resumes it there, so nothing is skipped.
//!
//! The first pass of a stream starts at [`PollRequest::since`] (kept in the
//! cursor, so it holds for every stream of the first round and for
//! repositories added later). Without one, the first pass fetches only the
//! newest page (`direction=desc`, [`GitHubConfig::per_page`] items) and
//! starts watching from there: older items are left out.
//!
//! Edits: an issue or comment updated more than a minute after its creation
//! is `edited`, and every change moves `updated_at`, so the item's content
//! hash changes. An issue's `updated_at` also moves with new comments, label
//! and state changes: the issue is then sent again. Deletions: GitHub has no
//! marker; a deleted issue or comment simply disappears from the API (it is
//! never returned again), so no contribution is ever marked `deleted`.
//!
//! Pull requests: GitHub's issues API lists them too, with a `pull_request`
//! key; they are skipped unless [`GitHubConfig::include_pull_requests`] is
//! set. Comments on pull requests are recognised by their `html_url`
//! (`.../pull/{number}#issuecomment-...`) and skipped likewise.
//!
//! Rate limits (GitHub's "Rate limits for the REST API"): the shared client
//! reads `x-ratelimit-remaining`/`x-ratelimit-reset` and `Retry-After`. A
//! `403` or `429` with `retry-after`, with `x-ratelimit-remaining: 0`, or
//! whose message names a rate limit (a secondary limit, "wait at least one
//! minute") is a rate limit, not refused credentials: the poll returns
//! [`HttpError::RateLimited`] and this source sends no request before the
//! time GitHub named. A successful page that leaves `x-ratelimit-remaining`
//! at 0 is kept, and the next request waits for `x-ratelimit-reset` likewise.
//!
//! Offset pages can shift while a pass pages through them (an item updated
//! meanwhile moves to the end); GitHub offers no keyset paging on these
//! endpoints, so an item may be missed until its next update.
//!
//! Profiles ([`GitHubConfig::lookup_profiles`], off by default): the author
//! of each contribution who is a person (`type: "User"`, not a bot) has
//! their profile read once per source instance, `GET /users/{login}`, and
//! the answer (a `404` included) is kept in memory. The profile's public
//! e-mail fills [`Author::email`]; its website (`blog`, as an `http(s)`
//! address) and X account (`twitter_username`, as `x:{name}`) fill
//! [`Author::links`], in that order. A profile whose `id` is not the
//! author's (the login changed hands) is not used. A rate-limited lookup
//! fails the poll like a rate-limited page, so the page is fetched again
//! once the limit ends; any other failed lookup is logged and the page goes
//! on without that profile.

use std::{
    cmp::max,
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_sdk::text::website;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, SecretError, SecretRef, Source, SourceError, http::safe_target, source::check_status, text::tidy,
};
use url::Url;

const PLATFORM: &str = "github";

const DEFAULT_BASE_URL: &str = "https://api.github.com";

/// The REST API version this connector was written against.
const API_VERSION: &str = "2022-11-28";

/// An item updated this long after it was created counts as edited.
const EDIT_GRACE_SECONDS: i64 = 60;

/// GitHub: after a secondary rate limit that names no time, "wait for at
/// least one minute before retrying".
const SECONDARY_LIMIT_WAIT: Duration = Duration::from_secs(60);

/// The longest wait a rate-limit answer may impose: a day.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// Settings of one set of GitHub repositories.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    /// The repositories to watch, as `owner/name` (e.g. `rust-lang/rust`).
    pub repos: Vec<String>,
    /// A token (`{ env = "..." }` or `{ file = "..." }`), sent as
    /// `Authorization: Bearer`. Public repositories work without one, at 60
    /// requests an hour; a token allows 5,000.
    #[serde(default)]
    pub token: Option<SecretRef>,
    /// Root of the REST API: `https://api.github.com`, or
    /// `https://HOST/api/v3` for GitHub Enterprise Server.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Also take pull requests (and the comments on them), which GitHub's
    /// issues API lists beside the issues.
    #[serde(default)]
    pub include_pull_requests: bool,
    /// Most pages one stream (the issues, or the comments, of one
    /// repository) fetches in one poll; a longer pass is paused there and
    /// resumed by the next poll, so nothing is skipped.
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
    /// Items per page, 1 to 100 (GitHub's maximum).
    #[serde(default = "default_per_page")]
    pub per_page: u32,
    /// Read each author's profile (`GET /users/{login}`) for their public
    /// e-mail, website and X account, which link one person's identities
    /// across communities. Costs one request per distinct author per
    /// process run (the answers are cached in memory); bots are skipped.
    #[serde(default)]
    pub lookup_profiles: bool,
}

fn default_base_url() -> String {
    DEFAULT_BASE_URL.to_owned()
}

fn default_max_pages_per_poll() -> u32 {
    10
}

fn default_per_page() -> u32 {
    100
}

/// Why a [`GitHubSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("github `token`: {0}")]
    Secret(#[from] SecretError),
    #[error("github `token` holds characters that are not allowed in an HTTP header")]
    InvalidToken,
    #[error("github `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("github `repos` is empty: name at least one `owner/name`")]
    NoRepos,
    #[error("github `repos`: `{0}` is not an `owner/name` repository")]
    InvalidRepo(String),
    #[error("github `repos`: `{0}` is listed twice")]
    DuplicateRepo(String),
    #[error("github `per_page` must be between 1 and 100, not {0}")]
    InvalidPerPage(u32),
    #[error("github HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// One watched repository.
#[derive(Debug, Clone)]
struct Repo {
    owner: String,
    name: String,
}

impl Repo {
    /// `owner/name` as configured: the prefix of every thread id.
    fn full(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// The cursor key: GitHub's names are case-insensitive.
    fn key(&self) -> String {
        self.full().to_lowercase()
    }
}

/// The issues, or the issue comments, of one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Stream {
    Issues,
    Comments,
}

impl Stream {
    fn noun(self) -> &'static str {
        match self {
            Stream::Issues => "issue",
            Stream::Comments => "comment",
        }
    }
}

/// The issues and issue comments of GitHub repositories.
#[derive(Debug)]
pub struct GitHubSource {
    instance: String,
    config: GitHubConfig,
    base_url: Url,
    repos: Vec<Repo>,
    http: HttpClient,
    /// `Bearer <token>`, marked sensitive so Debug never shows it.
    authorization: Option<HeaderValue>,
    /// The profiles read ([`GitHubConfig::lookup_profiles`]), by lower-cased
    /// login; `None` when GitHub has no such user (or it is not a person).
    profiles: Mutex<HashMap<String, Option<Profile>>>,
}

/// What an author's profile adds to [`Author`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Profile {
    /// The user's id: the profile is used only for the same account.
    id: u64,
    /// The public e-mail, trimmed and lower-cased.
    email: Option<String>,
    /// The website, then the X account (`x:{name}`).
    links: Vec<String>,
}

/// The items of one page, mapped.
#[derive(Debug, Default)]
struct Mapped {
    page: Page,
    /// The newest `updated_at` among the items (pull requests and malformed
    /// items included).
    top: Option<DateTime<Utc>>,
    /// The contributions whose author is a person whose profile may be
    /// read: index in `page.contributions`, login.
    people: Vec<(usize, String)>,
}

/// What the cursor of a GitHub source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct GitHubCursor {
    /// Per repository (`owner/name`, lower-cased).
    #[serde(default)]
    repos: BTreeMap<String, RepoCursor>,
    /// The oldest change to fetch on a stream's first pass: the
    /// [`PollRequest::since`] of the first poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
    /// The stream the round in progress is at; absent between rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    round: Option<Round>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct RepoCursor {
    #[serde(default)]
    issues: StreamCursor,
    #[serde(default)]
    comments: StreamCursor,
}

impl RepoCursor {
    fn stream_mut(&mut self, stream: Stream) -> &mut StreamCursor {
        match stream {
            Stream::Issues => &mut self.issues,
            Stream::Comments => &mut self.comments,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StreamCursor {
    /// The newest `updated_at` committed by a finished pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark: Option<DateTime<Utc>>,
    /// The pass in progress (or paused), while paging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<Pass>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pass {
    /// The `rel="next"` link GitHub gave with the last page.
    next: String,
    /// The newest `updated_at` this pass has seen: the next watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Round {
    /// Repository key (`owner/name`, lower-cased).
    repo: String,
    stream: Stream,
    /// Pages this stream has fetched in this round.
    pages: u32,
}

/// How the page being fetched was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Oldest change first from a `since`, or a stored `next` link: follow
    /// the `next` links.
    Forward,
    /// The newest page only (a first pass without `since`).
    Newest,
}

impl GitHubSource {
    pub fn new(instance: &str, config: GitHubConfig, http: HttpOptions) -> Result<GitHubSource, BuildError> {
        let base_url = Url::parse(config.base_url.trim())
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base() && url.has_host())
            .ok_or_else(|| BuildError::InvalidBaseUrl(config.base_url.clone()))?;
        if config.repos.is_empty() {
            return Err(BuildError::NoRepos);
        }
        let mut repos: Vec<Repo> = Vec::with_capacity(config.repos.len());
        for spec in &config.repos {
            let repo = parse_repo(spec).ok_or_else(|| BuildError::InvalidRepo(spec.clone()))?;
            if repos.iter().any(|known| known.key() == repo.key()) {
                return Err(BuildError::DuplicateRepo(spec.clone()));
            }
            repos.push(repo);
        }
        if !(1..=100).contains(&config.per_page) {
            return Err(BuildError::InvalidPerPage(config.per_page));
        }
        let authorization = match &config.token {
            Some(secret) => {
                let token = secret.resolve()?;
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret().trim()))
                    .map_err(|_| BuildError::InvalidToken)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(GitHubSource {
            instance: instance.to_owned(),
            http: HttpClient::new(http)?,
            config,
            base_url,
            repos,
            authorization,
            profiles: Mutex::new(HashMap::new()),
        })
    }

    /// `base_url` with `segments` appended as path segments (encoded).
    fn endpoint(&self, segments: &[&str]) -> Url {
        tributary_sdk::source::endpoint(&self.base_url, segments)
    }

    /// The first page of a pass: from `since` oldest first, or the newest page.
    fn list_url(&self, repo: &Repo, stream: Stream, since: Option<DateTime<Utc>>) -> Url {
        let mut url = match stream {
            Stream::Issues => self.endpoint(&["repos", &repo.owner, &repo.name, "issues"]),
            Stream::Comments => self.endpoint(&["repos", &repo.owner, &repo.name, "issues", "comments"]),
        };
        {
            let mut query = url.query_pairs_mut();
            if stream == Stream::Issues {
                query.append_pair("state", "all");
            }
            query.append_pair("sort", "updated");
            match since {
                // GitHub's `since` is inclusive and has whole seconds:
                // truncating can only go back, never skip.
                Some(since) => query
                    .append_pair("direction", "asc")
                    .append_pair("since", &since.to_rfc3339_opts(SecondsFormat::Secs, true)),
                None => query.append_pair("direction", "desc"),
            };
            query.append_pair("per_page", &self.config.per_page.to_string());
        }
        url
    }

    /// A link GitHub gave, if it stays on the API's scheme, host and port:
    /// the token is never sent anywhere else.
    fn same_host(&self, link: &str) -> Option<Url> {
        let url = self.base_url.join(link).ok()?;
        let same = url.scheme() == self.base_url.scheme()
            && url.host_str() == self.base_url.host_str()
            && url.port_or_known_default() == self.base_url.port_or_known_default();
        same.then_some(url)
    }

    /// The hold lives in the client's budget, shared by every source on this token.
    fn held_for(&self) -> Option<Duration> {
        self.http.held_for()
    }

    fn hold_for(&self, wait: Duration) {
        self.http.hold(wait.min(MAX_WAIT));
    }

    /// One GET with the API's headers; rate limits become
    /// [`HttpError::RateLimited`], refusals [`SourceError::Auth`].
    async fn get(&self, url: Url) -> Result<HttpResponse, SourceError> {
        if let Some(left) = self.held_for() {
            tracing::debug!(
                source = %self.instance, wait_ms = left.as_millis() as u64,
                "github rate limit holds; no request"
            );
            return Err(
                HttpError::RateLimited { target: safe_target(&url), retry_after: left, body: String::new() }.into()
            );
        }
        let mut request = self
            .http
            .get(url)
            .header(ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", API_VERSION);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let response = match self.http.send(request).await {
            Ok(response) => response,
            Err(HttpError::RateLimited { target, retry_after, body }) => {
                self.hold_for(retry_after);
                return Err(HttpError::RateLimited { target, retry_after, body }.into());
            }
            Err(error) => return Err(error.into()),
        };
        // Before check_status: a rate-limited 403 is not a refused token.
        if let Some(wait) = rate_limit_wait(&response) {
            tracing::warn!(
                source = %self.instance, status = response.status.as_u16(), wait_s = wait.as_secs(),
                "github rate limit; no request before it ends"
            );
            self.hold_for(wait);
            return Err(HttpError::RateLimited {
                target: response.target.clone(),
                retry_after: wait,
                body: response.body_snippet(),
            }
            .into());
        }
        check_status(&response)?;
        // A success that spends the budget: nothing more until it resets
        // (the shared client alone would wait at most `max_inline_wait`).
        if budget_spent(&response)
            && let Some(wait) = reset_wait(&response)
        {
            tracing::info!(
                source = %self.instance, wait_s = wait.as_secs(),
                "github rate limit budget spent; holding until it resets"
            );
            self.hold_for(wait);
        }
        Ok(response)
    }

    /// One page of a list: its raw items and its `rel="next"` link.
    async fn fetch_list(&self, url: Url) -> Result<(Vec<Value>, Option<String>), SourceError> {
        let response = self.get(url).await?;
        let next = response.header("link").and_then(next_link).map(str::to_owned);
        let body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
        match body {
            Value::Array(items) => Ok((items, next)),
            other => {
                let message = other.get("message").and_then(Value::as_str).unwrap_or_default();
                Err(SourceError::Decode(format!("{} answered JSON that is not a list: {message}", response.target)))
            }
        }
    }

    /// Maps the items of one page.
    fn read_items(&self, repo: &Repo, stream: Stream, items: Vec<Value>, watermark: Option<DateTime<Utc>>) -> Mapped {
        let Mapped { mut page, mut top, mut people } = Mapped::default();
        for item in items {
            let updated_at =
                item.get("updated_at").and_then(Value::as_str).and_then(|at| at.parse::<DateTime<Utc>>().ok());
            top = max(top, updated_at);
            let is_pull_request = match stream {
                Stream::Issues => item.get("pull_request").is_some_and(|pr| !pr.is_null()),
                Stream::Comments => item
                    .get("html_url")
                    .and_then(Value::as_str)
                    .and_then(|link| Url::parse(link).ok())
                    // `/{owner}/{repo}/pull/{number}`, not `/issues/`.
                    .is_some_and(|link| link.path_segments().is_some_and(|s| s.rev().nth(1) == Some("pull"))),
            };
            if is_pull_request && !self.config.include_pull_requests {
                continue;
            }
            let mapped = match stream {
                Stream::Issues => serde_json::from_value::<RawIssue>(item.clone())
                    .map_err(|error| format!("cannot read the issue: {error}"))
                    .map(|issue| (person(issue.user.as_ref()), self.issue(repo, issue))),
                Stream::Comments => serde_json::from_value::<RawComment>(item.clone())
                    .map_err(|error| format!("cannot read the comment: {error}"))
                    .and_then(|comment| {
                        let login = person(comment.user.as_ref());
                        self.comment(repo, comment).map(|contribution| (login, contribution))
                    }),
            };
            match mapped {
                Ok((login, contribution)) => {
                    if let Some(login) = login {
                        people.push((page.contributions.len(), login));
                    }
                    page.contributions.push(contribution)
                }
                // Back at the watermark: reported by the pass that first saw it.
                Err(_) if updated_at.is_some() && updated_at <= watermark => {}
                Err(reason) => {
                    let id = item.get("id").and_then(Value::as_u64).map(|id| format!("{}:{id}", stream.noun()));
                    let raw = serde_json::to_string(&item).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(id, reason, &raw));
                }
            }
        }
        Mapped { page, top, people }
    }

    /// Fills the authors of `mapped.people` from their profiles, reading
    /// each profile not cached yet. Only a rate limit is an error: the page
    /// is then fetched again once it ends.
    async fn fill_profiles(&self, mapped: &mut Mapped) -> Result<(), SourceError> {
        // Logins whose lookup failed on this page: not asked again for it.
        let mut failed = HashSet::new();
        for (index, login) in &mapped.people {
            let key = login.to_lowercase();
            let cached = self.lock_profiles().get(&key).cloned();
            let profile = match cached {
                Some(profile) => profile,
                None if failed.contains(&key) => None,
                None => match self.read_profile(login).await? {
                    Some(profile) => {
                        self.lock_profiles().insert(key, profile.clone());
                        profile
                    }
                    None => {
                        failed.insert(key);
                        None
                    }
                },
            };
            if let Some(profile) = profile
                && let Some(contribution) = mapped.page.contributions.get_mut(*index)
            {
                apply_profile(&mut contribution.author, &profile);
            }
        }
        Ok(())
    }

    fn lock_profiles(&self) -> MutexGuard<'_, HashMap<String, Option<Profile>>> {
        self.profiles.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `GET /users/{login}`: `Some(answer)` to keep (`Some(None)`: no such
    /// person), `None` when the lookup failed (logged), a rate limit as an
    /// error.
    async fn read_profile(&self, login: &str) -> Result<Option<Option<Profile>>, SourceError> {
        let response = match self.get(self.endpoint(&["users", login])).await {
            Ok(response) => response,
            Err(error @ SourceError::Http(HttpError::RateLimited { .. })) => return Err(error),
            Err(SourceError::Status { status: 404 | 410, .. }) => {
                tracing::debug!(source = %self.instance, %login, "github has no such user; no profile");
                return Ok(Some(None));
            }
            Err(error) => {
                tracing::warn!(
                    source = %self.instance, %login, %error,
                    "github profile lookup failed; going on without the profile"
                );
                return Ok(None);
            }
        };
        match serde_json::from_slice::<RawProfile>(&response.body) {
            Ok(raw) => Ok(Some(raw.profile())),
            Err(error) => {
                // A definite answer this connector cannot read: asking again would not help.
                tracing::warn!(
                    source = %self.instance, %login, target = %response.target, %error,
                    "github answered a profile this connector cannot read; going on without it"
                );
                Ok(Some(None))
            }
        }
    }

    fn issue(&self, repo: &Repo, issue: RawIssue) -> Contribution {
        let tags = issue
            .labels
            .unwrap_or_default()
            .iter()
            .filter_map(|label| match label {
                Value::String(name) => Some(name.clone()),
                Value::Object(fields) => fields.get("name").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            })
            .collect();
        Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: format!("issue:{}", issue.id),
            url: issue.html_url,
            kind: Kind::Post,
            author: author(issue.user),
            title: issue.title.filter(|title| !title.trim().is_empty()),
            body: tidy(issue.body.as_deref().unwrap_or_default()),
            language: None,
            created_at: issue.created_at,
            updated_at: Some(issue.updated_at),
            parent_id: None,
            thread_id: Some(format!("{}#{}", repo.full(), issue.number)),
            tags,
            score: issue.reactions.and_then(|reactions| reactions.total_count).map(|count| count as f64),
            edited: edited(issue.created_at, issue.updated_at),
            deleted: false,
            signals: None,
        }
    }

    fn comment(&self, repo: &Repo, comment: RawComment) -> Result<Contribution, String> {
        let number = issue_number(&comment.issue_url)
            .ok_or_else(|| format!("the comment's issue_url `{}` names no issue", comment.issue_url))?;
        let thread = format!("{}#{number}", repo.full());
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: format!("comment:{}", comment.id),
            url: comment.html_url,
            kind: Kind::Comment,
            author: author(comment.user),
            title: None,
            body: tidy(comment.body.as_deref().unwrap_or_default()),
            language: None,
            created_at: comment.created_at,
            updated_at: Some(comment.updated_at),
            parent_id: Some(thread.clone()),
            thread_id: Some(thread),
            tags: Vec::new(),
            score: comment.reactions.and_then(|reactions| reactions.total_count).map(|count| count as f64),
            edited: edited(comment.created_at, comment.updated_at),
            deleted: false,
            signals: None,
        })
    }
}

/// `owner/name`, with GitHub's characters only.
fn parse_repo(spec: &str) -> Option<Repo> {
    let (owner, name) = spec.trim().split_once('/')?;
    let valid = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (valid(owner) && valid(name)).then(|| Repo { owner: owner.to_owned(), name: name.to_owned() })
}

/// The URL of the `rel="next"` entry of a `Link` header
/// (`<url>; rel="next", <url>; rel="last"`).
fn next_link(header: &str) -> Option<&str> {
    let mut rest = header;
    while let Some(start) = rest.find('<') {
        let after = rest.get(start + 1..)?;
        let end = after.find('>')?;
        let link = after.get(..end)?;
        let params_and_more = after.get(end + 1..)?;
        // The parameters run to the comma before the next `<url>`.
        let params = params_and_more.split('<').next().unwrap_or_default().trim().trim_end_matches(',');
        let is_next = params.split(';').any(|param| {
            let mut parts = param.splitn(2, '=');
            let name = parts.next().unwrap_or_default().trim();
            let value = parts.next().unwrap_or_default().trim().trim_matches('"');
            name.eq_ignore_ascii_case("rel") && value.split_whitespace().any(|rel| rel.eq_ignore_ascii_case("next"))
        });
        if is_next {
            return Some(link.trim());
        }
        rest = params_and_more;
    }
    None
}

/// How long GitHub asked us to wait, when a 403 or 429 is a rate limit:
/// `retry-after` seconds, else the `x-ratelimit-reset` of an exhausted
/// budget, else a minute when the message names a (secondary) rate limit.
fn rate_limit_wait(response: &HttpResponse) -> Option<Duration> {
    if !matches!(response.status.as_u16(), 403 | 429) {
        return None;
    }
    if let Some(wait) = header_number(response, "retry-after") {
        return Some(clamped_seconds(wait));
    }
    if budget_spent(response) {
        return Some(reset_wait(response).unwrap_or(SECONDARY_LIMIT_WAIT));
    }
    let message = serde_json::from_slice::<Value>(&response.body)
        .ok()
        .and_then(|body| body.get("message").and_then(Value::as_str).map(str::to_lowercase))
        .unwrap_or_default();
    (message.contains("rate limit") || message.contains("abuse detection")).then_some(SECONDARY_LIMIT_WAIT)
}

/// `x-ratelimit-remaining: 0`: the primary budget is spent.
fn budget_spent(response: &HttpResponse) -> bool {
    header_number(response, "x-ratelimit-remaining").is_some_and(|remaining| remaining < 1.0)
}

/// The time until `x-ratelimit-reset` (UTC epoch seconds).
fn reset_wait(response: &HttpResponse) -> Option<Duration> {
    header_number(response, "x-ratelimit-reset").map(|reset| clamped_seconds(reset - Utc::now().timestamp() as f64))
}

/// A numeric header; NaN and infinities (which parse) are refused.
fn header_number(response: &HttpResponse, name: &str) -> Option<f64> {
    response.header(name).and_then(|value| value.trim().parse::<f64>().ok()).filter(|value| value.is_finite())
}

/// A wait in seconds, between one second and a day (never panics).
fn clamped_seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(1.0)).unwrap_or(MAX_WAIT).clamp(Duration::from_secs(1), MAX_WAIT)
}

/// The issue number at the end of a comment's `issue_url`
/// (`.../repos/{owner}/{repo}/issues/{number}`).
fn issue_number(issue_url: &str) -> Option<u64> {
    let url = Url::parse(issue_url).ok()?;
    let mut segments = url.path_segments()?.rev();
    let number = segments.next()?.parse::<u64>().ok()?;
    (segments.next()? == "issues").then_some(number)
}

fn edited(created_at: DateTime<Utc>, updated_at: DateTime<Utc>) -> bool {
    (updated_at - created_at).num_seconds() > EDIT_GRACE_SECONDS
}

fn author(user: Option<RawUser>) -> Author {
    match user {
        Some(user) => Author {
            id: user.id.to_string(),
            handle: Some(user.login).filter(|login| !login.is_empty()),
            display_name: None,
            email: None,
            profile_url: user.html_url,
            links: Vec::new(),
        },
        // GitHub names no author (a `null` user): attached to no contact.
        None => Author::default(),
    }
}

/// The login of an author whose profile may be read: a person
/// (`type: "User"`), not a bot (`type: "Bot"`, or a login ending in `[bot]`).
fn person(user: Option<&RawUser>) -> Option<String> {
    let user = user?;
    let is_person = user.kind.as_deref() == Some("User")
        && !user.login.trim().is_empty()
        && !user.login.to_ascii_lowercase().ends_with("[bot]");
    is_person.then(|| user.login.clone())
}

/// Adds a profile to an author of the same account: the e-mail when the
/// author has none, the links not there yet.
fn apply_profile(author: &mut Author, profile: &Profile) {
    if author.id != profile.id.to_string() {
        return;
    }
    if author.email.as_deref().is_none_or(|email| email.trim().is_empty()) && profile.email.is_some() {
        author.email = profile.email.clone();
    }
    for link in &profile.links {
        if !author.links.contains(link) {
            author.links.push(link.clone());
        }
    }
}

/// A profile's `twitter_username` as `x:{name}` (without `@`); X names are
/// letters, digits and `_`.
fn x_account(name: &str) -> Option<String> {
    let name = name.trim().trim_start_matches('@');
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then(|| format!("x:{name}"))
}

/// A profile's public `email`, trimmed and lower-cased.
fn public_email(email: &str) -> Option<String> {
    let email = email.trim().to_lowercase();
    let valid = email.contains('@') && !email.chars().any(char::is_whitespace);
    valid.then_some(email)
}

/// The fields of an issue this connector reads.
#[derive(Debug, Deserialize)]
struct RawIssue {
    id: u64,
    number: u64,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    html_url: Option<String>,
    #[serde(default)]
    user: Option<RawUser>,
    #[serde(default)]
    labels: Option<Vec<Value>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[serde(default)]
    reactions: Option<RawReactions>,
}

/// The fields of an issue comment this connector reads.
#[derive(Debug, Deserialize)]
struct RawComment {
    id: u64,
    issue_url: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    html_url: Option<String>,
    #[serde(default)]
    user: Option<RawUser>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[serde(default)]
    reactions: Option<RawReactions>,
}

#[derive(Debug, Deserialize)]
struct RawUser {
    id: u64,
    login: String,
    #[serde(default)]
    html_url: Option<String>,
    /// `User`, `Bot`, `Organization` or `Mannequin`.
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// The fields of `GET /users/{username}` this connector reads.
#[derive(Debug, Deserialize)]
struct RawProfile {
    id: u64,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    blog: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    twitter_username: Option<String>,
}

impl RawProfile {
    /// What the profile adds to its author; `None` unless it is a person's.
    fn profile(self) -> Option<Profile> {
        if self.kind.as_deref() != Some("User") {
            return None;
        }
        let mut links: Vec<String> = Vec::new();
        let found = [self.blog.as_deref().and_then(website), self.twitter_username.as_deref().and_then(x_account)];
        for link in found.into_iter().flatten() {
            if !links.contains(&link) {
                links.push(link);
            }
        }
        Some(Profile { id: self.id, email: self.email.as_deref().and_then(public_email), links })
    }
}

#[derive(Debug, Deserialize)]
struct RawReactions {
    #[serde(default)]
    total_count: Option<u64>,
}

#[async_trait]
impl Source for GitHubSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor: GitHubCursor = request.stored().unwrap_or_default();
        // Repositories no longer configured are forgotten.
        cursor.repos.retain(|key, _| self.repos.iter().any(|repo| repo.key() == *key));
        cursor.since = request.since.or(cursor.since);

        let streams: Vec<(&Repo, Stream)> =
            self.repos.iter().flat_map(|repo| [(repo, Stream::Issues), (repo, Stream::Comments)]).collect();
        let (position, pages_before) = cursor
            .round
            .as_ref()
            .and_then(|round| {
                streams
                    .iter()
                    .position(|(repo, stream)| repo.key() == round.repo && *stream == round.stream)
                    .map(|position| (position, round.pages))
            })
            .unwrap_or((0, 0));
        let Some(&(repo, stream)) = streams.get(position) else {
            return Ok(Page::default());
        };
        let key = repo.key();

        let state = cursor.repos.entry(key.clone()).or_default().stream_mut(stream).clone();
        let resumed = state.pass.as_ref().and_then(|pass| match self.same_host(&pass.next) {
            Some(url) => Some((url, pass.top)),
            None => {
                tracing::warn!(
                    source = %self.instance, repo = %key, ?stream,
                    "stored next link leaves the API host; restarting the pass"
                );
                None
            }
        });
        let (url, mode, top_before) = match resumed {
            Some((url, top)) => (url, Mode::Forward, top),
            None => match max(state.watermark, cursor.since) {
                Some(since) => (self.list_url(repo, stream, Some(since)), Mode::Forward, None),
                None => (self.list_url(repo, stream, None), Mode::Newest, None),
            },
        };

        let (items, next) = self.fetch_list(url.clone()).await?;
        let fetched = items.len();
        let mut mapped = self.read_items(repo, stream, items, state.watermark);
        if self.config.lookup_profiles {
            self.fill_profiles(&mut mapped).await?;
        }
        let Mapped { mut page, top: page_top, .. } = mapped;
        let top = max(top_before, page_top);
        let pages = pages_before + 1;

        let next = match next {
            Some(link) if mode == Mode::Forward && fetched > 0 => match self.same_host(&link) {
                Some(next) if next != url => Some(next),
                Some(_) => {
                    tracing::warn!(
                        source = %self.instance, repo = %key, ?stream,
                        "github sent the same page as next; ending the pass"
                    );
                    None
                }
                None => {
                    // Oldest change first: what was not fetched is at or after `top`.
                    tracing::warn!(
                        source = %self.instance, repo = %key, ?stream,
                        "github next link leaves the API host; not followed"
                    );
                    None
                }
            },
            _ => None,
        };
        let cap_hit = pages >= self.config.max_pages_per_poll.max(1);
        let stream_state = cursor.repos.entry(key.clone()).or_default().stream_mut(stream);
        let stream_done = match next {
            Some(next) => {
                stream_state.pass = Some(Pass { next: next.to_string(), top });
                if cap_hit {
                    tracing::info!(
                        source = %self.instance, repo = %key, ?stream, pages,
                        "github pass paused at max_pages_per_poll; the next poll resumes it"
                    );
                }
                cap_hit
            }
            None => {
                stream_state.watermark = max(stream_state.watermark, top);
                stream_state.pass = None;
                tracing::info!(
                    source = %self.instance, repo = %key, ?stream, pages, watermark = ?stream_state.watermark,
                    "github pass complete"
                );
                true
            }
        };
        cursor.round = if !stream_done {
            Some(Round { repo: key.clone(), stream, pages })
        } else {
            streams.get(position + 1).map(|(repo, stream)| Round { repo: repo.key(), stream: *stream, pages: 0 })
        };
        tracing::debug!(
            source = %self.instance, repo = %key, ?stream, fetched,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            "github page polled"
        );
        page.has_more = cursor.round.is_some();
        page.next_cursor = Some(Cursor::from_json(&cursor));
        Ok(page)
    }

    /// Lists one issue of each repository: the token is accepted and every
    /// repository exists and is readable with it.
    async fn check(&self) -> Result<(), SourceError> {
        for repo in &self.repos {
            let mut url = self.endpoint(&["repos", &repo.owner, &repo.name, "issues"]);
            url.query_pairs_mut().append_pair("state", "all").append_pair("per_page", "1");
            self.fetch_list(url).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{header, method, path, path_regex, query_param, query_param_is_missing},
    };

    use super::*;

    /// The repository of the recorded issue pages (octokit/fixtures).
    const ISSUES_REPO: &str = "octokit-fixture-org/tmp-scenario-paginate-issues-20220719043836917-izyoe";
    /// The repository of the recorded comment pages (PyGithub).
    const COMMENTS_REPO: &str = "PyGithub/PyGithub";

    fn options() -> HttpOptions {
        HttpOptions {
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(2),
            ..HttpOptions::default()
        }
    }

    fn config(server: &MockServer, repos: &[&str]) -> GitHubConfig {
        serde_json::from_value(json!({ "repos": repos, "base_url": server.uri() })).unwrap()
    }

    fn source(config: GitHubConfig) -> GitHubSource {
        GitHubSource::new("gh", config, options()).unwrap()
    }

    /// A recorded page whose `Link` URLs point at `host` (the mock server).
    fn fixture_at(host: &str, name: &str) -> Fixture {
        let mut fixture = Fixture::load("github", name);
        for (header, value) in &mut fixture.headers {
            if header == "link" {
                *value = value.replace("https://api.github.com", host);
            }
        }
        fixture
    }

    fn fixture(server: &MockServer, name: &str) -> Fixture {
        fixture_at(&server.uri(), name)
    }

    /// The recorded items of a page, for deriving modified copies.
    fn items(name: &str) -> Vec<Value> {
        Fixture::load("github", name).body.as_array().cloned().unwrap()
    }

    fn item_mut(items: &mut [Value], id: u64) -> &mut Value {
        items.iter_mut().find(|item| item["id"] == id).unwrap()
    }

    fn with_items(mut fixture: Fixture, items: Vec<Value>) -> ResponseTemplate {
        fixture.body = Value::Array(items);
        fixture.response()
    }

    /// The recorded last page of issues, emptied: nothing (new) to list.
    fn empty(server: &MockServer) -> ResponseTemplate {
        with_items(fixture(server, "issues_page5_last"), vec![])
    }

    /// A recorded page as if it were the last one: its `rel="next"` dropped.
    fn without_next(mut fixture: Fixture) -> Fixture {
        for (header, value) in &mut fixture.headers {
            if header == "link" {
                *value = value.split(", ").filter(|part| !part.contains("rel=\"next\"")).collect::<Vec<_>>().join(", ");
            }
        }
        fixture
    }

    /// A recorded response turned into another answer: status, body and
    /// headers changed, the rest of the recorded headers kept.
    fn derived(name: &str, status: u16, body: Value, headers: &[(&str, String)]) -> ResponseTemplate {
        let mut fixture = Fixture::load("github", name);
        fixture.status = status;
        fixture.body = body;
        fixture.headers.retain(|(name, _)| name != "link" && !headers.iter().any(|(changed, _)| changed == name));
        fixture.headers.extend(headers.iter().map(|(name, value)| (name.to_string(), value.clone())));
        fixture.response()
    }

    fn list_path(repo: &str, stream: Stream) -> String {
        match stream {
            Stream::Issues => format!("/repos/{repo}/issues"),
            Stream::Comments => format!("/repos/{repo}/issues/comments"),
        }
    }

    /// Serves the first page of a pass: `since` (oldest first) or, without
    /// it, the newest page.
    async fn serve(server: &MockServer, repo: &str, stream: Stream, since: Option<&str>, response: ResponseTemplate) {
        let mock = Mock::given(method("GET")).and(path(list_path(repo, stream))).and(query_param("sort", "updated"));
        let mock = match since {
            Some(since) => mock.and(query_param("since", since)).and(query_param("direction", "asc")),
            None => mock.and(query_param_is_missing("since")).and(query_param("direction", "desc")),
        };
        mock.respond_with(response).mount(server).await;
    }

    /// The recorded newest pages: issues of one repository, comments of the other.
    async fn serve_recorded(server: &MockServer, issues: ResponseTemplate, comments: ResponseTemplate) {
        serve(server, ISSUES_REPO, Stream::Issues, None, issues).await;
        serve(server, ISSUES_REPO, Stream::Comments, None, empty(server)).await;
        serve(server, COMMENTS_REPO, Stream::Issues, None, empty(server)).await;
        serve(server, COMMENTS_REPO, Stream::Comments, None, comments).await;
    }

    /// Polls until the round is over; `since` only on the first call.
    async fn round(source: &GitHubSource, cursor: Option<Cursor>, since: Option<DateTime<Utc>>) -> Vec<Page> {
        tributary_sdk::testkit::poll_round(source, cursor, since, 20).await
    }

    fn cursor(page: &Page) -> GitHubCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn stream_of(page: &Page, repo: &str, stream: Stream) -> StreamCursor {
        cursor(page).repos.get(&repo.to_lowercase()).cloned().unwrap_or_default().stream_mut(stream).clone()
    }

    fn cursor_at(repo: &str, stream: Stream, watermark: &str) -> Option<Cursor> {
        let mut cursor = GitHubCursor::default();
        cursor.repos.entry(repo.to_lowercase()).or_default().stream_mut(stream).watermark = Some(at(watermark));
        Some(Cursor::from_json(&cursor))
    }

    fn at(time: &str) -> DateTime<Utc> {
        time.parse().unwrap()
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    fn find<'a>(pages: &'a [Page], id: &str) -> &'a Contribution {
        pages.iter().flat_map(|page| &page.contributions).find(|c| c.external_id == id).unwrap()
    }

    fn more(pages: &[Page]) -> Vec<bool> {
        pages.iter().map(|page| page.has_more).collect()
    }

    /// One expected contribution of the fixtures, checked by value.
    struct Expect<'a> {
        id: &'a str,
        kind: Kind,
        author_id: &'a str,
        handle: &'a str,
        profile_url: Option<&'a str>,
        url: Option<&'a str>,
        title: Option<&'a str>,
        thread: &'a str,
        parent: Option<&'a str>,
        created_at: &'a str,
        updated_at: &'a str,
        edited: bool,
        score: Option<f64>,
        body_starts: &'a str,
    }

    fn check(pages: &[Page], expect: &Expect<'_>) {
        let c = find(pages, expect.id);
        let at_ = expect.id;
        assert_eq!(c.platform, "github", "{at_}");
        assert_eq!(c.source, "gh", "{at_}");
        assert_eq!(c.kind, expect.kind, "{at_}");
        assert_eq!(c.author.id, expect.author_id, "{at_}");
        assert_eq!(c.author.handle.as_deref(), Some(expect.handle), "{at_}");
        assert_eq!(c.author.display_name, None, "{at_}");
        assert_eq!(c.author.email, None, "{at_}");
        assert_eq!(c.author.profile_url.as_deref(), expect.profile_url, "{at_}");
        assert_eq!(c.url.as_deref(), expect.url, "{at_}");
        assert_eq!(c.title.as_deref(), expect.title, "{at_}");
        assert_eq!(c.thread_id.as_deref(), Some(expect.thread), "{at_}");
        assert_eq!(c.parent_id.as_deref(), expect.parent, "{at_}");
        assert_eq!(c.created_at, at(expect.created_at), "{at_}");
        assert_eq!(c.updated_at, Some(at(expect.updated_at)), "{at_}");
        assert_eq!(c.edited, expect.edited, "{at_}");
        assert!(!c.deleted, "{at_}");
        assert_eq!(c.score, expect.score, "{at_}");
        assert!(c.body.starts_with(expect.body_starts), "{at_}: {:?}", c.body);
        assert!(c.tags.is_empty(), "{at_}");
        assert_eq!(c.language, None, "{at_}");
        assert_eq!(c.signals, None, "{at_}");
    }

    #[tokio::test]
    async fn first_poll_maps_the_newest_page_of_each_stream() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(list_path(ISSUES_REPO, Stream::Issues)))
            .and(query_param("state", "all"))
            .and(query_param("per_page", "100"))
            .and(header("x-github-api-version", "2022-11-28"))
            .and(header("accept", "application/vnd.github+json"))
            .respond_with(fixture(&server, "issues_page1_link_next").response())
            .expect(1)
            .mount(&server)
            .await;
        serve_recorded(&server, empty(&server), fixture(&server, "issue_comments_page1_ratelimit_link").response())
            .await;
        let pages = round(&source(config(&server, &[ISSUES_REPO, COMMENTS_REPO])), None, None).await;

        assert_eq!(more(&pages), [true, true, true, false], "issues and comments of each repository");
        assert_eq!(ids(&pages[0]), ["issue:1308969059", "issue:1308969023", "issue:1308968990"]);
        assert!(pages[1].contributions.is_empty() && pages[2].contributions.is_empty());
        assert_eq!(pages[3].contributions.len(), 30);
        assert!(pages.iter().all(|page| page.quarantined.is_empty()));
        let repo_web = format!("https://github.com/{ISSUES_REPO}");
        let issue_url = format!("{repo_web}/issues/13");
        let issue_thread = format!("{ISSUES_REPO}#13");
        let expected = [
            Expect {
                id: "issue:1308969059",
                kind: Kind::Post,
                author_id: "31898046",
                handle: "octokit-fixture-user-a",
                profile_url: Some("https://github.com/octokit-fixture-user-a"),
                url: Some(issue_url.as_str()),
                title: Some("Test issue 13"),
                thread: issue_thread.as_str(),
                parent: None,
                created_at: "2022-07-19T04:39:16Z",
                updated_at: "2022-07-19T04:39:16Z",
                edited: false,
                score: Some(0.0),
                // The recorded issue has `"body": null`.
                body_starts: "",
            },
            // 2012 recordings: no `html_url` on comments or users, and the
            // `issue_url` of that time ends with the issue's id.
            Expect {
                id: "comment:5168757",
                kind: Kind::Comment,
                author_id: "327146",
                handle: "jacquev6",
                profile_url: None,
                url: None,
                title: None,
                thread: "PyGithub/PyGithub#4141750",
                parent: Some("PyGithub/PyGithub#4141750"),
                created_at: "2012-04-17T05:50:25Z",
                updated_at: "2012-04-17T05:50:25Z",
                edited: false,
                score: None,
                body_starts: "Thank you for reporting this. I'll publish a fix as soon as possible",
            },
            Expect {
                id: "comment:6293572",
                kind: Kind::Comment,
                author_id: "327146",
                handle: "jacquev6",
                profile_url: None,
                url: None,
                title: None,
                thread: "PyGithub/PyGithub#5036241",
                parent: Some("PyGithub/PyGithub#5036241"),
                created_at: "2012-06-13T06:03:24Z",
                updated_at: "2012-06-13T10:52:24Z",
                edited: true,
                score: None,
                // Markdown is kept as text.
                body_starts: "PyGithub is definitely licensed under the GNU **Lesser** General Public License.\n\nAccording to",
            },
            Expect {
                id: "comment:5965891",
                kind: Kind::Comment,
                author_id: "327442",
                handle: "bilderbuchi",
                profile_url: None,
                url: None,
                title: None,
                thread: "PyGithub/PyGithub#4780155",
                parent: Some("PyGithub/PyGithub#4780155"),
                created_at: "2012-05-28T14:04:25Z",
                // Updated 17 s after creation: a fix-up, not an edit.
                updated_at: "2012-05-28T14:04:42Z",
                edited: false,
                score: None,
                body_starts: "I see. Is there a possibility to increase the number of ite",
            },
        ];
        for expect in &expected {
            check(&pages, expect);
        }
        let edited: Vec<_> =
            pages[3].contributions.iter().filter(|c| c.edited).map(|c| c.external_id.as_str()).collect();
        assert_eq!(edited, ["comment:6293572", "comment:6357374", "comment:6357422"], "87 s and more after creation");

        let last = pages.last().unwrap();
        assert_eq!(cursor(last).round, None);
        assert_eq!(
            stream_of(last, ISSUES_REPO, Stream::Issues),
            StreamCursor { watermark: Some(at("2022-07-19T04:39:16Z")), pass: None }
        );
        assert_eq!(
            stream_of(last, COMMENTS_REPO, Stream::Comments),
            StreamCursor { watermark: Some(at("2012-06-20T08:15:10Z")), pass: None }
        );
        assert_eq!(stream_of(last, COMMENTS_REPO, Stream::Issues), StreamCursor::default(), "nothing seen yet");
        // The newest page alone: its `next` link is not followed, and no token is sent.
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 4);
        assert!(requests.iter().all(|r| !r.url.path().starts_with("/repositories/")));
        assert!(requests.iter().all(|r| !r.headers.contains_key("authorization")));
    }

    #[tokio::test]
    async fn a_first_poll_from_since_follows_link_next_across_pages() {
        let server = MockServer::start().await;
        let since = "2012-04-01T00:00:00Z";
        serve(&server, COMMENTS_REPO, Stream::Issues, Some(since), empty(&server)).await;
        serve(
            &server,
            COMMENTS_REPO,
            Stream::Comments,
            Some(since),
            fixture(&server, "issue_comments_page1_ratelimit_link").response(),
        )
        .await;
        Mock::given(method("GET"))
            .and(path(list_path(COMMENTS_REPO, Stream::Comments)))
            .and(query_param("page", "2"))
            .respond_with(without_next(fixture(&server, "issue_comments_page2")).response())
            .expect(1)
            .mount(&server)
            .await;
        let source = source(config(&server, &[COMMENTS_REPO]));

        let pages = round(&source, None, Some(at(since))).await;
        assert_eq!(more(&pages), [true, true, false]);
        assert!(pages[0].contributions.is_empty());
        assert_eq!(pages[1].contributions.len(), 30);
        assert_eq!(pages[2].contributions.len(), 30);
        assert_eq!(pages[1].contributions[0].external_id, "comment:5168757");
        assert_eq!(pages[2].contributions[29].external_id, "comment:7918385");
        let paging = stream_of(&pages[1], COMMENTS_REPO, Stream::Comments);
        assert_eq!(paging.watermark, None, "the watermark moves when the pass is over");
        let pass = paging.pass.unwrap();
        assert_eq!(pass.next, format!("{}/repos/PyGithub/PyGithub/issues/comments?page=2", server.uri()));
        assert_eq!(pass.top, Some(at("2012-06-20T08:15:10Z")));
        assert_eq!(
            stream_of(&pages[2], COMMENTS_REPO, Stream::Comments),
            StreamCursor { watermark: Some(at("2012-08-21T22:15:01Z")), pass: None }
        );
        // `since` was given to the first poll only: the cursor carries it
        // to the comments stream, fetched by the second.
        let requests = server.received_requests().await.unwrap();
        let with_since = requests.iter().filter(|r| r.url.query_pairs().any(|(k, v)| k == "since" && v == since));
        assert_eq!(with_since.count(), 2);
    }

    #[tokio::test]
    async fn an_incremental_poll_with_nothing_new_returns_the_watermark_item_unchanged() {
        let server = MockServer::start().await;
        serve(&server, ISSUES_REPO, Stream::Issues, None, fixture(&server, "issues_page1_link_next").response()).await;
        serve(&server, ISSUES_REPO, Stream::Comments, None, empty(&server)).await;
        // `since` is inclusive: the issue updated at the watermark comes back, as recorded.
        let at_watermark: Vec<Value> = items("issues_page1_link_next").into_iter().take(1).collect();
        serve(
            &server,
            ISSUES_REPO,
            Stream::Issues,
            Some("2022-07-19T04:39:16Z"),
            with_items(without_next(fixture(&server, "issues_page1_link_next")), at_watermark),
        )
        .await;
        let source = source(config(&server, &[ISSUES_REPO]));

        let first = round(&source, None, None).await;
        let second = round(&source, first.last().unwrap().next_cursor.clone(), None).await;
        assert_eq!(ids(&second[0]), ["issue:1308969059"]);
        let before = find(&first, "issue:1308969059");
        assert_eq!(&second[0].contributions[0], before);
        assert_eq!(second[0].contributions[0].content_hash(), before.content_hash(), "the ledger drops it");
        assert_eq!(cursor(second.last().unwrap()), cursor(first.last().unwrap()), "nothing moved");
    }

    #[tokio::test]
    async fn an_edited_comment_comes_back_changed() {
        let server = MockServer::start().await;
        let watermark = "2012-06-20T08:15:10Z";
        let recorded = items("issue_comments_page1_ratelimit_link");
        let mut edited = item_mut(&mut recorded.clone(), 5168757).clone();
        edited["body"] = "Thank you for reporting this.\n\nEDIT: fixed in version 0.6.".into();
        edited["updated_at"] = "2012-06-21T09:00:00Z".into();
        let unchanged = item_mut(&mut recorded.clone(), 6447481).clone();
        serve(&server, COMMENTS_REPO, Stream::Issues, None, empty(&server)).await;
        serve(
            &server,
            COMMENTS_REPO,
            Stream::Comments,
            Some(watermark),
            with_items(without_next(fixture(&server, "issue_comments_page2")), vec![unchanged, edited]),
        )
        .await;
        let source = source(config(&server, &[COMMENTS_REPO]));
        let repo = parse_repo(COMMENTS_REPO).unwrap();
        let original = source.read_items(&repo, Stream::Comments, recorded, None).page;

        let pages = round(&source, cursor_at(COMMENTS_REPO, Stream::Comments, watermark), None).await;
        assert_eq!(ids(&pages[1]), ["comment:6447481", "comment:5168757"]);
        let before = original.contributions.iter().find(|c| c.external_id == "comment:5168757").unwrap();
        let after = find(&pages, "comment:5168757");
        assert!(!before.edited && after.edited);
        assert_eq!(after.body, "Thank you for reporting this.\n\nEDIT: fixed in version 0.6.");
        assert_eq!(after.updated_at, Some(at("2012-06-21T09:00:00Z")));
        assert_eq!(after.created_at, before.created_at);
        assert_ne!(after.content_hash(), before.content_hash());
        let same = original.contributions.iter().find(|c| c.external_id == "comment:6447481").unwrap();
        assert_eq!(find(&pages, "comment:6447481").content_hash(), same.content_hash());
        assert_eq!(stream_of(&pages[1], COMMENTS_REPO, Stream::Comments).watermark, Some(at("2012-06-21T09:00:00Z")));
    }

    /// Serves the recorded issue pages 1, 2 and (as page 3) 5 of a pass
    /// starting at `since`; each is fetched once.
    async fn serve_issue_pages(server: &MockServer, since: &str) {
        Mock::given(method("GET"))
            .and(path(list_path(ISSUES_REPO, Stream::Issues)))
            .and(query_param("since", since))
            .and(query_param("direction", "asc"))
            .respond_with(fixture(server, "issues_page1_link_next").response())
            .expect(1)
            .mount(server)
            .await;
        for (page, name) in [("2", "issues_page2_link_prev_next"), ("3", "issues_page5_last")] {
            Mock::given(method("GET"))
                .and(path("/repositories/515435940/issues"))
                .and(query_param("page", page))
                .respond_with(fixture(server, name).response())
                .expect(1)
                .mount(server)
                .await;
        }
        serve(server, ISSUES_REPO, Stream::Comments, None, empty(server)).await;
    }

    #[tokio::test]
    async fn a_later_pass_pauses_at_max_pages_and_the_next_poll_resumes_it() {
        let server = MockServer::start().await;
        let watermark = "2022-07-19T04:00:00Z";
        serve_issue_pages(&server, watermark).await;
        let mut config = config(&server, &[ISSUES_REPO]);
        config.max_pages_per_poll = 2;
        let source = source(config);

        let first = round(&source, cursor_at(ISSUES_REPO, Stream::Issues, watermark), None).await;
        assert_eq!(more(&first), [true, true, false], "two pages of issues, then the comments");
        assert_eq!(ids(&first[0]), ["issue:1308969059", "issue:1308969023", "issue:1308968990"]);
        assert_eq!(ids(&first[1]), ["issue:1308968954", "issue:1308968920", "issue:1308968889"]);
        let paused = stream_of(&first[2], ISSUES_REPO, Stream::Issues);
        assert_eq!(paused.watermark, Some(at(watermark)), "the watermark must not jump");
        let pass = paused.pass.unwrap();
        assert_eq!(pass.next, format!("{}/repositories/515435940/issues?per_page=3&page=3", server.uri()));
        assert_eq!(pass.top, Some(at("2022-07-19T04:39:16Z")));

        let second = round(&source, first[2].next_cursor.clone(), None).await;
        assert_eq!(ids(&second[0]), ["issue:1308968677"], "resumed at the next link");
        assert_eq!(
            stream_of(second.last().unwrap(), ISSUES_REPO, Stream::Issues),
            StreamCursor { watermark: Some(at("2022-07-19T04:39:16Z")), pass: None }
        );
    }

    #[tokio::test]
    async fn a_pass_is_followed_to_its_last_page_within_max_pages() {
        let server = MockServer::start().await;
        let watermark = "2022-07-19T04:00:00Z";
        serve_issue_pages(&server, watermark).await;
        let source = source(config(&server, &[ISSUES_REPO]));
        let pages = round(&source, cursor_at(ISSUES_REPO, Stream::Issues, watermark), None).await;
        assert_eq!(more(&pages), [true, true, true, false]);
        assert_eq!(pages.iter().map(|p| p.contributions.len()).collect::<Vec<_>>(), [3, 3, 1, 0]);
        assert_eq!(
            cursor(&pages[1]).round,
            Some(Round { repo: ISSUES_REPO.to_lowercase(), stream: Stream::Issues, pages: 2 })
        );
        assert_eq!(stream_of(&pages[3], ISSUES_REPO, Stream::Issues).watermark, Some(at("2022-07-19T04:39:16Z")));
    }

    #[tokio::test]
    async fn pull_requests_are_skipped_unless_configured() {
        let mut issues = items("issues_page1_link_next");
        let pr = format!("https://api.github.com/repos/{ISSUES_REPO}/pulls/12");
        item_mut(&mut issues, 1308969023)["pull_request"] = json!({
            "url": pr,
            "html_url": format!("https://github.com/{ISSUES_REPO}/pull/12"),
            "diff_url": format!("https://github.com/{ISSUES_REPO}/pull/12.diff"),
            "patch_url": format!("https://github.com/{ISSUES_REPO}/pull/12.patch"),
            "merged_at": null
        });
        let mut comments = items("issue_comments_page1_ratelimit_link");
        item_mut(&mut comments, 5168757)["html_url"] =
            "https://github.com/PyGithub/PyGithub/issues/41#issuecomment-5168757".into();
        item_mut(&mut comments, 6447481)["html_url"] =
            "https://github.com/PyGithub/PyGithub/pull/50#issuecomment-6447481".into();

        for include in [false, true] {
            let server = MockServer::start().await;
            serve_recorded(
                &server,
                with_items(fixture(&server, "issues_page1_link_next"), issues.clone()),
                with_items(fixture(&server, "issue_comments_page1_ratelimit_link"), comments.clone()),
            )
            .await;
            let mut config = config(&server, &[ISSUES_REPO, COMMENTS_REPO]);
            config.include_pull_requests = include;
            let pages = round(&source(config), None, None).await;
            let all: Vec<_> = pages.iter().flat_map(|p| &p.contributions).map(|c| c.external_id.as_str()).collect();
            assert_eq!(all.contains(&"issue:1308969023"), include, "include_pull_requests = {include}");
            assert_eq!(all.contains(&"comment:6447481"), include, "include_pull_requests = {include}");
            assert!(all.contains(&"comment:5168757"));
            assert_eq!(
                find(&pages, "comment:5168757").url.as_deref(),
                Some("https://github.com/PyGithub/PyGithub/issues/41#issuecomment-5168757")
            );
            // Skipped or not, the pull request's comment is covered by the watermark.
            let last = pages.last().unwrap();
            assert_eq!(stream_of(last, COMMENTS_REPO, Stream::Comments).watermark, Some(at("2012-06-20T08:15:10Z")));
        }
    }

    #[tokio::test]
    async fn malformed_items_are_quarantined_and_the_page_goes_on() {
        let server = MockServer::start().await;
        let mut issues = items("issues_page1_link_next");
        item_mut(&mut issues, 1308969059).as_object_mut().unwrap().remove("id");
        item_mut(&mut issues, 1308969023)["created_at"] = "yesterday".into();
        let mut comments = items("issue_comments_page1_ratelimit_link");
        item_mut(&mut comments, 5168757)["issue_url"] = "https://api.github.com/repos/PyGithub/PyGithub/pulls".into();
        item_mut(&mut comments, 5181640)["user"]["id"] = "jacquev6".into();
        serve_recorded(
            &server,
            with_items(fixture(&server, "issues_page1_link_next"), issues),
            with_items(fixture(&server, "issue_comments_page1_ratelimit_link"), comments),
        )
        .await;
        let pages = round(&source(config(&server, &[ISSUES_REPO, COMMENTS_REPO])), None, None).await;

        assert_eq!(ids(&pages[0]), ["issue:1308968990"]);
        let quarantined: Vec<_> = pages[0].quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [None, Some("issue:1308969023")]);
        assert!(pages[0].quarantined[0].reason.contains("id"), "{}", pages[0].quarantined[0].reason);
        assert!(pages[0].quarantined[0].raw.contains("Test issue 13"));
        assert!(pages[0].quarantined[1].reason.contains("input"), "{}", pages[0].quarantined[1].reason);
        assert_eq!(pages[3].contributions.len(), 28);
        let quarantined: Vec<_> = pages[3].quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [Some("comment:5168757"), Some("comment:5181640")]);
        assert!(pages[3].quarantined[0].reason.contains("issue_url"), "{}", pages[3].quarantined[0].reason);
        // The issue without an id still had a readable `updated_at`.
        let last = pages.last().unwrap();
        assert_eq!(stream_of(last, ISSUES_REPO, Stream::Issues).watermark, Some(at("2022-07-19T04:39:16Z")));
    }

    #[tokio::test]
    async fn a_body_that_is_not_a_json_list_is_a_decode_error() {
        for (response, expected) in [
            (ResponseTemplate::new(200).set_body_string("<html>Unicorn! This page is taking too long</html>"), "JSON"),
            (
                ResponseTemplate::new(200).set_body_json(json!({"message": "Moved Permanently", "url": "x"})),
                "not a list: Moved Permanently",
            ),
        ] {
            let server = MockServer::start().await;
            Mock::given(method("GET")).respond_with(response).mount(&server).await;
            let error = source(config(&server, &[ISSUES_REPO])).poll(&PollRequest::default()).await.unwrap_err();
            match &error {
                SourceError::Decode(message) => {
                    assert!(message.contains(expected) && message.contains("/issues"), "{message}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn refusals_are_auth_and_other_statuses_are_status() {
        let docs = "https://docs.github.com/rest";
        for (status, message, is_auth) in [
            (401, "Bad credentials", true),
            (403, "Resource not accessible by integration", true),
            (404, "Not Found", false),
        ] {
            let server = MockServer::start().await;
            // The recorded headers (x-ratelimit-remaining: 4922): not a rate limit.
            let body = json!({"message": message, "documentation_url": docs});
            Mock::given(method("GET"))
                .respond_with(derived("issues_page1_link_next", status, body, &[]))
                .mount(&server)
                .await;
            let source = source(config(&server, &[ISSUES_REPO]));
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
    async fn rate_limits_are_honoured_without_further_requests() {
        let in_an_hour = (Utc::now().timestamp() + 3600).to_string();
        let primary = "API rate limit exceeded for 203.0.113.7.";
        let secondary = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.";
        let cases = [
            (
                403,
                primary,
                vec![("x-ratelimit-remaining", "0".into()), ("x-ratelimit-reset", in_an_hour.clone())],
                3600,
            ),
            (
                429,
                primary,
                vec![("x-ratelimit-remaining", "0".into()), ("x-ratelimit-reset", in_an_hour.clone())],
                3600,
            ),
            (403, secondary, vec![("retry-after", "120".into())], 120),
            (429, secondary, vec![("retry-after", "3600".into())], 3600),
            // No header names a time: "wait for at least one minute".
            (403, secondary, Vec::new(), 60),
        ];
        for (status, message, headers, wait) in cases {
            let server = MockServer::start().await;
            let body = json!({"message": message, "documentation_url": "https://docs.github.com/rest"});
            Mock::given(method("GET"))
                .respond_with(derived("issues_page1_link_next", status, body, &headers))
                .mount(&server)
                .await;
            let source = source(config(&server, &[ISSUES_REPO]));
            let errors = [
                source.poll(&PollRequest::default()).await.unwrap_err(),
                source.poll(&PollRequest::default()).await.unwrap_err(),
                source.check().await.unwrap_err(),
            ];
            for error in errors {
                match error {
                    SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                        let secs = retry_after.as_secs_f64();
                        assert!(
                            secs <= wait as f64 && secs > wait as f64 - 5.0,
                            "{status} {headers:?}: {retry_after:?}"
                        )
                    }
                    other => panic!("{status} {headers:?}: unexpected {other:?}"),
                }
            }
            let sent = server.received_requests().await.unwrap().len();
            assert_eq!(sent, 1, "{status} {headers:?}: no request while the limit holds");
        }
    }

    #[tokio::test]
    async fn a_page_that_spends_the_budget_is_kept_and_the_next_request_waits_for_the_reset() {
        let server = MockServer::start().await;
        let in_an_hour = (Utc::now().timestamp() + 3600).to_string();
        let headers = [("x-ratelimit-remaining", "0".to_owned()), ("x-ratelimit-reset", in_an_hour)];
        let body = Value::Array(items("issues_page1_link_next"));
        Mock::given(method("GET"))
            .respond_with(derived("issues_page1_link_next", 200, body, &headers))
            .mount(&server)
            .await;
        let source = source(config(&server, &[ISSUES_REPO]));
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 3, "the page that spent the budget is kept");
        assert!(page.has_more);
        let request = PollRequest { cursor: page.next_cursor.clone(), since: None };
        match source.poll(&request).await.unwrap_err() {
            SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                assert!(retry_after > Duration::from_secs(3590), "{retry_after:?}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_token_is_sent_as_a_bearer_header_and_never_shown() {
        let server = MockServer::start().await;
        let token = "ghp_16C7e42F292c6912E7710c838347Ae178B4a";
        Mock::given(method("GET"))
            .and(header("authorization", format!("Bearer {token}").as_str()))
            .respond_with(with_items(without_next(fixture(&server, "issues_page5_last")), items("issues_page5_last")))
            .expect(3)
            .mount(&server)
            .await;
        let dir = std::env::temp_dir().join(format!("tributary-github-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let mut config = config(&server, &[ISSUES_REPO]);
        config.token = Some(SecretRef::File(file));
        let source = source(config);
        std::fs::remove_dir_all(dir).unwrap();

        source.check().await.unwrap();
        let pages = round(&source, None, None).await;
        assert_eq!(ids(&pages[0]), ["issue:1308968677"]);
        assert!(!format!("{source:?}").contains(token), "the token leaked into Debug");
    }

    #[tokio::test]
    async fn a_next_link_to_another_host_is_not_followed() {
        let elsewhere = MockServer::start().await;
        Mock::given(method("GET")).respond_with(empty(&elsewhere)).mount(&elsewhere).await;
        let server = MockServer::start().await;
        let watermark = "2012-04-01T00:00:00Z";
        serve(&server, COMMENTS_REPO, Stream::Issues, None, empty(&server)).await;
        serve(
            &server,
            COMMENTS_REPO,
            Stream::Comments,
            Some(watermark),
            fixture_at(&elsewhere.uri(), "issue_comments_page1_ratelimit_link").response(),
        )
        .await;
        let source = source(config(&server, &[COMMENTS_REPO]));

        let pages = round(&source, cursor_at(COMMENTS_REPO, Stream::Comments, watermark), None).await;
        assert_eq!(pages[1].contributions.len(), 30);
        // Oldest change first: the next pass starts where this page ended.
        assert_eq!(
            stream_of(&pages[1], COMMENTS_REPO, Stream::Comments),
            StreamCursor { watermark: Some(at("2012-06-20T08:15:10Z")), pass: None }
        );

        // A stored link to another host is dropped: the pass restarts at the watermark.
        let mut stored = GitHubCursor::default();
        stored.repos.entry(COMMENTS_REPO.to_lowercase()).or_default().comments = StreamCursor {
            watermark: Some(at(watermark)),
            pass: Some(Pass {
                next: format!("{}/repos/PyGithub/PyGithub/issues/comments?page=2", elsewhere.uri()),
                top: None,
            }),
        };
        stored.round = Some(Round { repo: COMMENTS_REPO.to_lowercase(), stream: Stream::Comments, pages: 0 });
        let page = source.poll(&PollRequest { cursor: Some(Cursor::from_json(&stored)), since: None }).await.unwrap();
        assert_eq!(page.contributions.len(), 30);
        assert!(elsewhere.received_requests().await.unwrap().is_empty(), "the token never leaves the API host");
    }

    #[tokio::test]
    async fn an_unreadable_cursor_starts_over() {
        let server = MockServer::start().await;
        serve(&server, ISSUES_REPO, Stream::Issues, None, fixture(&server, "issues_page1_link_next").response()).await;
        serve(&server, ISSUES_REPO, Stream::Comments, None, empty(&server)).await;
        let pages = round(&source(config(&server, &[ISSUES_REPO])), Some(Cursor("{\"repos\": 7}".into())), None).await;
        assert_eq!(pages[0].contributions.len(), 3);
        assert_eq!(stream_of(&pages[1], ISSUES_REPO, Stream::Issues).watermark, Some(at("2022-07-19T04:39:16Z")));
    }

    /// A `GET /users/{username}` answer with all the fields GitHub's REST
    /// API gives for a user (`type: "User"`).
    fn profile_body(login: &str, id: u64, blog: &str, email: Option<&str>, twitter: Option<&str>) -> Value {
        let api = format!("https://api.github.com/users/{login}");
        json!({
            "login": login,
            "id": id,
            "node_id": node_id(&format!("04:User{id}")),
            "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
            "gravatar_id": "",
            "url": api,
            "html_url": format!("https://github.com/{login}"),
            "followers_url": format!("{api}/followers"),
            "following_url": format!("{api}/following{{/other_user}}"),
            "gists_url": format!("{api}/gists{{/gist_id}}"),
            "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
            "subscriptions_url": format!("{api}/subscriptions"),
            "organizations_url": format!("{api}/orgs"),
            "repos_url": format!("{api}/repos"),
            "events_url": format!("{api}/events{{/privacy}}"),
            "received_events_url": format!("{api}/received_events"),
            "type": "User",
            "user_view_type": "public",
            "site_admin": false,
            "name": null,
            "company": null,
            "blog": blog,
            "location": null,
            "email": email,
            "hireable": null,
            "bio": null,
            "twitter_username": twitter,
            "public_repos": 34,
            "public_gists": 2,
            "followers": 151,
            "following": 3,
            "created_at": "2010-07-09T06:10:06Z",
            "updated_at": "2024-11-02T17:21:45Z"
        })
    }

    /// A legacy GraphQL node id: the base64 of `04:User{id}`.
    fn node_id(text: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in text.as_bytes().chunks(3) {
            let bytes = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
            let n = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Answers `GET /users/{login}`, `times` times at most when given.
    async fn serve_profile(server: &MockServer, login: &str, response: ResponseTemplate, times: Option<u64>) {
        let mock = Mock::given(method("GET")).and(path(format!("/users/{login}"))).respond_with(response);
        let mock = match times {
            Some(times) => mock.up_to_n_times(times),
            None => mock,
        };
        mock.mount(server).await;
    }

    /// A profile answered as GitHub does, with the recorded headers.
    fn profile_answer(body: Value) -> ResponseTemplate {
        derived("issues_page1_link_next", 200, body, &[])
    }

    /// The logins of the `/users/{login}` requests received, in order.
    async fn profile_requests(server: &MockServer) -> Vec<String> {
        let requests = server.received_requests().await.unwrap();
        requests.iter().filter_map(|r| r.url.path().strip_prefix("/users/").map(str::to_owned)).collect()
    }

    fn looking_up(mut config: GitHubConfig) -> GitHubConfig {
        config.lookup_profiles = true;
        config
    }

    #[tokio::test]
    async fn profiles_fill_the_public_email_and_links_once_per_login_across_pages() {
        let server = MockServer::start().await;
        let since = "2012-04-01T00:00:00Z";
        serve(&server, COMMENTS_REPO, Stream::Issues, Some(since), empty(&server)).await;
        serve(
            &server,
            COMMENTS_REPO,
            Stream::Comments,
            Some(since),
            fixture(&server, "issue_comments_page1_ratelimit_link").response(),
        )
        .await;
        Mock::given(method("GET"))
            .and(path(list_path(COMMENTS_REPO, Stream::Comments)))
            .and(query_param("page", "2"))
            .respond_with(without_next(fixture(&server, "issue_comments_page2")).response())
            .expect(2)
            .mount(&server)
            .await;
        // The authors of both recorded pages, with the ids the pages give them.
        let people = [
            ("jacquev6", 327146),
            ("bilderbuchi", 327442),
            ("tallforasmurf", 1137018),
            ("roskakori", 328726),
            ("jeblair", 899068),
            ("aneroid", 1468519),
            ("malexw", 577322),
            ("philipkimmey", 211079),
        ];
        for (login, id) in people {
            let body = match login {
                "jacquev6" => profile_body(
                    login,
                    id,
                    "jacquev6.example.net",
                    Some(" Vincent.Jacques@Example.NET "),
                    Some("jacquev6_x"),
                ),
                "bilderbuchi" => profile_body(login, id, "https://bilderbuchi.example.org/", Some(""), None),
                // The profile of someone else: the login changed hands.
                "roskakori" => profile_body(login, 99, "roskakori.example.com", Some("r@example.com"), Some("rosk")),
                _ => profile_body(login, id, "", None, None),
            };
            Mock::given(method("GET"))
                .and(path(format!("/users/{login}")))
                .and(header("x-github-api-version", "2022-11-28"))
                .and(header("accept", "application/vnd.github+json"))
                .respond_with(profile_answer(body))
                .expect(1)
                .mount(&server)
                .await;
        }
        let not_found = json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest/users/users#get-a-user", "status": "404"});
        Mock::given(method("GET"))
            .and(path("/users/kukuts"))
            .respond_with(derived("issues_page1_link_next", 404, not_found, &[]))
            .expect(1)
            .mount(&server)
            .await;
        let source = source(looking_up(config(&server, &[COMMENTS_REPO])));

        let pages = round(&source, None, Some(at(since))).await;
        assert_eq!(more(&pages), [true, true, false]);
        assert_eq!(pages[1].contributions.len() + pages[2].contributions.len(), 60, "no item is dropped");
        let all: Vec<&Contribution> = pages.iter().flat_map(|page| &page.contributions).collect();
        for c in &all {
            let handle = c.author.handle.as_deref().unwrap();
            let (email, links): (Option<&str>, &[&str]) = match handle {
                "jacquev6" => (Some("vincent.jacques@example.net"), &["https://jacquev6.example.net", "x:jacquev6_x"]),
                "bilderbuchi" => (None, &["https://bilderbuchi.example.org"]),
                _ => (None, &[]),
            };
            assert_eq!(c.author.email.as_deref(), email, "{} by {handle}", c.external_id);
            assert_eq!(c.author.links, links, "{} by {handle}", c.external_id);
        }
        let jacquev6 = all.iter().filter(|c| c.author.handle.as_deref() == Some("jacquev6")).count();
        assert_eq!(jacquev6, 42, "on both pages");
        // The rest of the author is the item's.
        let first = find(&pages, "comment:5168757");
        assert_eq!((first.author.id.as_str(), first.author.display_name.as_deref()), ("327146", None));

        let mut asked = profile_requests(&server).await;
        asked.sort();
        assert_eq!(
            asked,
            [
                "aneroid",
                "bilderbuchi",
                "jacquev6",
                "jeblair",
                "kukuts",
                "malexw",
                "philipkimmey",
                "roskakori",
                "tallforasmurf"
            ],
            "one request per login"
        );
        // A later round (both pages again) finds every profile in memory.
        let again = round(&source, None, Some(at(since))).await;
        assert_eq!(find(&again, "comment:5168757").author, first.author.clone());
        assert_eq!(profile_requests(&server).await.len(), 9);
    }

    #[tokio::test]
    async fn bots_are_not_looked_up() {
        let server = MockServer::start().await;
        let mut issues = items("issues_page1_link_next");
        item_mut(&mut issues, 1308969059)["user"] = json!({
            "login": "dependabot[bot]",
            "id": 49699333,
            "node_id": "MDM6Qm90NDk2OTkzMzM=",
            "avatar_url": "https://avatars.githubusercontent.com/in/29110?v=4",
            "gravatar_id": "",
            "url": "https://api.github.com/users/dependabot%5Bbot%5D",
            "html_url": "https://github.com/apps/dependabot",
            "type": "Bot",
            "site_admin": false
        });
        item_mut(&mut issues, 1308969023)["user"] = json!({
            "login": "Copilot",
            "id": 198982749,
            "node_id": "BOT_kgDOC9w8XQ",
            "url": "https://api.github.com/users/Copilot",
            "html_url": "https://github.com/apps/copilot-swe-agent",
            "type": "Bot",
            "site_admin": false
        });
        let mut comments = items("issue_comments_page1_ratelimit_link");
        // A `[bot]` login is a bot whatever its type says.
        comments.retain(|item| item["id"] == 5168757 || item["id"] == 5181640);
        item_mut(&mut comments, 5181640)["user"]["login"] = "ci-helper[bot]".into();
        serve_recorded(
            &server,
            with_items(fixture(&server, "issues_page1_link_next"), issues),
            with_items(fixture(&server, "issue_comments_page1_ratelimit_link"), comments),
        )
        .await;
        serve_profile(
            &server,
            "octokit-fixture-user-a",
            profile_answer(profile_body("octokit-fixture-user-a", 31898046, "octokit.github.io", None, None)),
            None,
        )
        .await;
        serve_profile(&server, "jacquev6", profile_answer(profile_body("jacquev6", 327146, "", None, None)), None)
            .await;
        let pages = round(&source(looking_up(config(&server, &[ISSUES_REPO, COMMENTS_REPO]))), None, None).await;

        for (id, links) in [
            ("issue:1308969059", vec![]),
            ("issue:1308969023", vec![]),
            ("issue:1308968990", vec!["https://octokit.github.io"]),
            ("comment:5168757", vec![]),
            ("comment:5181640", vec![]),
        ] {
            assert_eq!(find(&pages, id).author.links, links, "{id}");
        }
        assert_eq!(find(&pages, "issue:1308969059").author.handle.as_deref(), Some("dependabot[bot]"));
        assert_eq!(profile_requests(&server).await, ["octokit-fixture-user-a", "jacquev6"], "no bot is asked for");
    }

    #[tokio::test]
    async fn a_user_github_does_not_know_is_asked_once_and_other_failures_are_asked_again() {
        let docs = "https://docs.github.com/rest/users/users#get-a-user";
        for (status, body, kept) in [
            (404, json!({"message": "Not Found", "documentation_url": docs, "status": "404"}), true),
            (410, json!({"message": "Gone", "documentation_url": docs}), true),
            // An answer that is not a user's profile.
            (200, json!({"message": "Moved Permanently", "url": "x"}), true),
            (500, json!({"message": "Server Error"}), false),
            (401, json!({"message": "Bad credentials", "documentation_url": docs}), false),
        ] {
            let server = MockServer::start().await;
            serve(&server, ISSUES_REPO, Stream::Issues, None, fixture(&server, "issues_page1_link_next").response())
                .await;
            serve(&server, ISSUES_REPO, Stream::Comments, None, empty(&server)).await;
            let at_watermark: Vec<Value> = items("issues_page1_link_next").into_iter().take(1).collect();
            serve(
                &server,
                ISSUES_REPO,
                Stream::Issues,
                Some("2022-07-19T04:39:16Z"),
                with_items(without_next(fixture(&server, "issues_page1_link_next")), at_watermark),
            )
            .await;
            serve_profile(
                &server,
                "octokit-fixture-user-a",
                derived("issues_page1_link_next", status, body, &[]),
                None,
            )
            .await;
            let source = source(looking_up(config(&server, &[ISSUES_REPO])));

            let first = round(&source, None, None).await;
            assert_eq!(ids(&first[0]).len(), 3, "{status}: the page goes on");
            assert!(first[0].contributions.iter().all(|c| c.author.links.is_empty() && c.author.email.is_none()));
            let asked = profile_requests(&server).await.len();
            assert!(asked >= 1, "{status}");
            let second = round(&source, first.last().unwrap().next_cursor.clone(), None).await;
            assert_eq!(ids(&second[0]), ["issue:1308969059"], "{status}");
            assert_eq!(second[0].contributions[0].author, find(&first, "issue:1308969059").author, "{status}");
            let expected = if kept { 1 } else { 2 * asked };
            assert_eq!(profile_requests(&server).await.len(), expected, "{status}: asked again: {}", !kept);
        }
    }

    #[tokio::test]
    async fn a_rate_limited_profile_lookup_fails_the_poll_and_the_page_comes_again() {
        let in_an_hour = (Utc::now().timestamp() + 3600).to_string();
        let primary = "API rate limit exceeded for 203.0.113.7.";
        let secondary = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.";
        for (status, message, headers, wait) in [
            (403, primary, vec![("x-ratelimit-remaining", "0".to_owned()), ("x-ratelimit-reset", in_an_hour)], 3600),
            (429, secondary, vec![("retry-after", "120".to_owned())], 120),
            (403, secondary, vec![("retry-after", "1".to_owned())], 1),
        ] {
            let server = MockServer::start().await;
            serve(&server, ISSUES_REPO, Stream::Issues, None, fixture(&server, "issues_page1_link_next").response())
                .await;
            let body = json!({"message": message, "documentation_url": "https://docs.github.com/rest"});
            serve_profile(
                &server,
                "octokit-fixture-user-a",
                derived("issues_page1_link_next", status, body, &headers),
                Some(1),
            )
            .await;
            let profile = profile_body("octokit-fixture-user-a", 31898046, "", Some("a@example.com"), None);
            serve_profile(&server, "octokit-fixture-user-a", profile_answer(profile), None).await;
            let source = source(looking_up(config(&server, &[ISSUES_REPO])));

            for _ in 0..2 {
                match source.poll(&PollRequest::default()).await.unwrap_err() {
                    SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                        let secs = retry_after.as_secs_f64();
                        assert!(secs <= wait as f64 && secs > wait as f64 - 5.0, "{status}: {retry_after:?}")
                    }
                    other => panic!("{status}: unexpected {other:?}"),
                }
                if wait == 1 {
                    break;
                }
            }
            if wait > 1 {
                // The limit holds: nothing is sent before it ends.
                assert_eq!(server.received_requests().await.unwrap().len(), 2, "{status}");
                continue;
            }
            // Once it ends, the same page comes again, complete.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let page = source.poll(&PollRequest::default()).await.unwrap();
            assert_eq!(ids(&page).len(), 3);
            assert!(page.contributions.iter().all(|c| c.author.email.as_deref() == Some("a@example.com")));
            assert_eq!(profile_requests(&server).await.len(), 2);
        }
    }

    #[tokio::test]
    async fn without_lookup_profiles_no_profile_is_asked_for() {
        let server = MockServer::start().await;
        serve_recorded(
            &server,
            fixture(&server, "issues_page1_link_next").response(),
            fixture(&server, "issue_comments_page1_ratelimit_link").response(),
        )
        .await;
        Mock::given(method("GET"))
            .and(path_regex("^/users/"))
            .respond_with(profile_answer(profile_body("jacquev6", 327146, "example.com", Some("j@example.com"), None)))
            .expect(0)
            .mount(&server)
            .await;
        let pages = round(&source(config(&server, &[ISSUES_REPO, COMMENTS_REPO])), None, None).await;
        assert_eq!(pages.iter().map(|page| page.contributions.len()).sum::<usize>(), 33);
        assert!(pages.iter().flat_map(|page| &page.contributions).all(|c| c.author.links.is_empty()));
        assert!(profile_requests(&server).await.is_empty());
    }

    #[test]
    fn profile_fields_are_normalised() {
        fn check(blog: &str, expected: Option<&str>) {
            assert_eq!(website(blog).as_deref(), expected, "{blog:?}");
        }
        // The test profiles' node ids, as GitHub's legacy ones.
        assert_eq!(node_id("04:User327146"), "MDQ6VXNlcjMyNzE0Ng==");
        assert_eq!(node_id("04:User1"), "MDQ6VXNlcjE=");
        // The website rules are the SDK's (`text::website`); GitHub's free text too.
        check("  example.com/  ", Some("https://example.com"));
        check("N/A", None);
        for (name, expected) in [
            ("alice_x", Some("x:alice_x")),
            (" @Alice ", Some("x:Alice")),
            ("", None),
            ("@", None),
            ("https://x.com/alice", None),
        ] {
            assert_eq!(x_account(name).as_deref(), expected, "{name:?}");
        }
        for (email, expected) in
            [(" Alice@Example.COM ", Some("alice@example.com")), ("", None), ("  ", None), ("not an e-mail", None)]
        {
            assert_eq!(public_email(email).as_deref(), expected, "{email:?}");
        }

        // The whole answer: website first, then X; a profile that is not a person's adds nothing.
        let raw = |body: Value| serde_json::from_value::<RawProfile>(body).unwrap().profile();
        let alice = profile_body("alice", 7, "alice.dev", Some("Alice@Example.com"), Some("@alice"));
        assert_eq!(
            raw(alice.clone()),
            Some(Profile {
                id: 7,
                email: Some("alice@example.com".into()),
                links: vec!["https://alice.dev".into(), "x:alice".into()]
            })
        );
        let mut no_blog = alice.clone();
        no_blog["blog"] = Value::Null;
        no_blog["email"] = Value::Null;
        assert_eq!(raw(no_blog), Some(Profile { id: 7, email: None, links: vec!["x:alice".into()] }));
        let mut organization = alice;
        organization["type"] = "Organization".into();
        assert_eq!(raw(organization), None);

        // Added to the author of the same account, without doubles; an e-mail the author has is kept.
        let profile = Profile { id: 7, email: Some("alice@example.com".into()), links: vec!["x:alice".into()] };
        let mut author = Author {
            id: "7".into(),
            email: Some("alice@work.example".into()),
            links: vec!["x:alice".into()],
            ..Author::default()
        };
        apply_profile(&mut author, &profile);
        assert_eq!((author.email.as_deref(), author.links.len()), (Some("alice@work.example"), 1));
        let mut other = Author { id: "8".into(), ..Author::default() };
        apply_profile(&mut other, &profile);
        assert_eq!(other, Author { id: "8".into(), ..Author::default() });
    }

    #[test]
    fn next_links_are_read_from_the_recorded_headers() {
        for (name, expected) in [
            ("issues_page1_link_next", Some("https://api.github.com/repositories/515435940/issues?per_page=3&page=2")),
            (
                "issues_page2_link_prev_next",
                Some("https://api.github.com/repositories/515435940/issues?per_page=3&page=3"),
            ),
            ("issues_page5_last", None),
            ("issue_comments_page2", Some("https://api.github.com/repos/PyGithub/PyGithub/issues/comments?page=3")),
        ] {
            let fixture = Fixture::load("github", name);
            let link = fixture.headers.iter().find(|(header, _)| header == "link").map(|(_, v)| v.as_str()).unwrap();
            assert_eq!(next_link(link), expected, "{name}");
        }
        assert_eq!(next_link("<https://x/a?page=2>; rel=\"prev next\""), Some("https://x/a?page=2"));
        assert_eq!(next_link("<https://x/a?page=2>; REL=next"), Some("https://x/a?page=2"));
        for garbage in
            ["", "<", "<https://x/a; rel=\"next\"", ">; rel=\"next\"", "https://x/a; rel=\"next\"", "<ü>;;;="]
        {
            assert_eq!(next_link(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: GitHubConfig = serde_json::from_value(json!({"repos": ["rust-lang/rust"]})).unwrap();
        assert_eq!(config.base_url, "https://api.github.com");
        assert_eq!(config.token, None);
        assert!(!config.include_pull_requests);
        assert!(!config.lookup_profiles, "profiles are read on request only");
        let opted: GitHubConfig = serde_json::from_value(json!({"repos": ["a/b"], "lookup_profiles": true})).unwrap();
        assert!(opted.lookup_profiles);
        assert_eq!((config.max_pages_per_poll, config.per_page), (10, 100));
        let source = GitHubSource::new("gh", config.clone(), HttpOptions::default()).unwrap();
        assert_eq!(source.platform(), "github");
        assert_eq!(
            source.list_url(&source.repos[0], Stream::Comments, Some(at("2024-05-01T10:20:30.999Z"))).as_str(),
            "https://api.github.com/repos/rust-lang/rust/issues/comments?sort=updated&direction=asc&since=2024-05-01T10%3A20%3A30Z&per_page=100"
        );
        for unknown in [json!({"repos": ["a/b"], "schedule": "*/5 * * * *"}), json!({"repos": ["a/b"], "repo": "a/b"})]
        {
            assert!(serde_json::from_value::<GitHubConfig>(unknown).is_err());
        }
        assert!(serde_json::from_value::<GitHubConfig>(json!({})).is_err(), "repos is required");

        // GitHub Enterprise Server keeps its path prefix.
        let ghes = GitHubConfig { base_url: "https://ghe.example.com/api/v3/".into(), ..config.clone() };
        let source = GitHubSource::new("gh", ghes, HttpOptions::default()).unwrap();
        assert_eq!(
            source.list_url(&source.repos[0], Stream::Issues, None).as_str(),
            "https://ghe.example.com/api/v3/repos/rust-lang/rust/issues?state=all&sort=updated&direction=desc&per_page=100"
        );

        let build = |config: GitHubConfig| GitHubSource::new("gh", config, HttpOptions::default()).unwrap_err();
        let repos =
            |repos: &[&str]| GitHubConfig { repos: repos.iter().map(|r| r.to_string()).collect(), ..config.clone() };
        assert!(matches!(build(repos(&[])), BuildError::NoRepos));
        for bad in ["rust", "rust-lang/", "/rust", "a/b/c", "a/..", "a b/c", "https://github.com/a/b"] {
            assert!(matches!(build(repos(&[bad])), BuildError::InvalidRepo(_)), "{bad}");
        }
        assert!(matches!(build(repos(&["a/b", "A/B"])), BuildError::DuplicateRepo(_)));
        for per_page in [0, 101] {
            assert!(matches!(build(GitHubConfig { per_page, ..config.clone() }), BuildError::InvalidPerPage(_)));
        }
        for base_url in ["ftp://api.github.com", "api.github.com", "mailto:x@example.com"] {
            let error = build(GitHubConfig { base_url: base_url.into(), ..config.clone() });
            assert!(matches!(error, BuildError::InvalidBaseUrl(_)), "{base_url}: {error}");
        }
        let missing =
            build(GitHubConfig { token: Some(SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into())), ..config });
        assert!(matches!(missing, BuildError::Secret(_)), "{missing}");
    }
}
