//! Zendesk Support: the tickets of one account, and the comments on them.
//!
//! **Tickets: the cursor-based incremental export** (Zendesk API reference,
//! "Incremental Exports", and the guide "Using the Incremental Export API").
//! The first request is
//! `GET /api/v2/incremental/tickets/cursor.json?start_time=<unix>&include=users&per_page=N`;
//! every answer holds `tickets`, `after_cursor` and `end_of_stream`, and the
//! next request is `...cursor.json?cursor=<after_cursor>&include=users&per_page=N`.
//! The export lists every ticket created or changed since the start time,
//! oldest change first, whatever changed (status, subject, a new comment);
//! `end_of_stream: true` means "all changes up to now". The stream never
//! ends for good: the last `after_cursor` is kept in this source's cursor
//! even then, and the next scheduled poll asks it for what changed since.
//! Zendesk leaves out what changed in the last minute (it comes with a later
//! request) and refuses a `start_time` less than a minute old, so a start
//! time is never later than a minute ago. The first start time is
//! [`PollRequest::since`], else [`ZendeskConfig::initial_lookback_days`]
//! before now; it is kept in the cursor until Zendesk names an `after_cursor`.
//!
//! **Requesters.** The incremental export supports sideloads through
//! `include` ("The ticket, ticket event, organization, and user incremental
//! export endpoints support side-loading"): with `include=users` the answer
//! carries a top-level `users` list beside `tickets`, and the requester's
//! `name` and `email` are read from there by `requester_id`. The recorded
//! export (zenpy's cassette, made without `include`) has no `users`; the
//! tests add them. A requester missing from the sideload keeps the ticket
//! with the requester's id and no e-mail.
//!
//! **Comments.** For every ticket of an export page (deleted ones aside),
//! `GET /api/v2/tickets/{id}/comments.json?include=users&page[size]=N`, in
//! Zendesk's cursor pagination: `meta.has_more` says whether another page
//! follows, and `page[after]=<meta.after_cursor>` asks for it (the recorded
//! page has `has_more: false` and still a `links.next`, so `links.next` is
//! not a signal). Comments come oldest first; the first comment of a ticket
//! *is* its description (Zendesk: "`description`: the first comment on the
//! ticket"), already the ticket's body, and is skipped. Public comments are
//! always taken, private ones (`public: false`, internal notes) only with
//! [`ZendeskConfig::include_private_comments`]; a private comment is
//! dropped before it is read, so not even a malformed one reaches the
//! quarantine. A ticket without any public comment (`is_public: false`) has
//! a private description: its body is then left empty. Comment authors come
//! from the sideloaded `users` of the comments page.
//!
//! **One page per poll.** A poll either fetches one export page, or one
//! comments page of the first ticket still waiting for its comments: the
//! export page puts its tickets in the cursor's queue, and `has_more` stays
//! set until the queue is empty and the export is at `end_of_stream`. Every
//! time a ticket shows up in the export again, its comments are read again
//! from the first; the unchanged ones are dropped by the daemon's ledger.
//! A ticket whose comments answer 404 (deleted in between), 400, 410 or 422
//! is skipped with a warning, so that one ticket cannot stall the source.
//!
//! **Updates and deletions.** A ticket is `ticket:{id}` ([`Kind::Ticket`],
//! title = subject, body = description, url = the agent's
//! `/agent/tickets/{id}`), a comment `comment:{id}`
//! ([`Kind::TicketComment`], parent and thread = `ticket:{id}`). Every change
//! to a ticket moves its `updated_at` and brings it back in the export with
//! the same id, so a new subject, description or status is an update of the
//! same contribution; a ticket updated more than a minute after its creation
//! is `edited` (Zendesk says no more: a reply moves `updated_at` too). A ticket with `status: "deleted"` (the export lists deleted
//! tickets, scrubbed, unless `exclude_deleted` is asked for, which this
//! source never does) is returned with `deleted = true`; its comments are
//! not fetched (a deleted ticket's comments are gone with it), so comments
//! returned before are not marked deleted. Comments cannot be edited in Zendesk;
//! they can only be *redacted*: redacted text is replaced by `▇`
//! characters ("The characters in the redact tag will be replaced by the ▇
//! symbol"). A redaction is not a deletion: the comment comes back with the
//! redacted text and `edited = true`. A redacted attachment
//! (`PUT .../attachments/{id}/redact.json`) changes nothing this source
//! reads (attachments are not part of a contribution), so it is no change.
//!
//! **Authentication.** An API token, sent as HTTP Basic
//! `{email}/token:{api_token}`, or an OAuth access token, sent as
//! `Authorization: Bearer`; exactly one of the two. Both are marked
//! sensitive and never shown. The incremental export is for admins only:
//! [`Source::check`] asks `GET /api/v2/users/me.json` and refuses a user
//! whose `role` is not `admin`.
//!
//! **Rate limits** (API reference "Rate limits", "Incremental Exports", and
//! the best-practices guide on rate limiting). The account allows 200 to
//! 2,500 requests a minute by plan; the incremental exports allow 10 a
//! minute (30 with the High Volume add-on). Recorded answers carry
//! `ratelimit-limit`/`ratelimit-remaining`/`ratelimit-reset` and
//! `x-rate-limit`/`x-rate-limit-remaining` (older ones `rate-limit-*`), and
//! some endpoints `zendesk-ratelimit-<name>: total=100; remaining=99;
//! resets=41`. The shared client reads `ratelimit-*`, `x-rate-limit-remaining`
//! and `Retry-After` (sent with every 429) and holds every source on the
//! credential accordingly. This source adds what it does not read: an
//! exhausted `zendesk-ratelimit-*` holds until its `resets`, an exhausted
//! `x-rate-limit-remaining` or `rate-limit-remaining` until the reset a
//! header names (`ratelimit-reset`, `rate-limit-reset`), else for a minute
//! (Zendesk's window). And it spaces its own export requests by
//! 60 s / [`ZendeskConfig::incremental_requests_per_minute`]: a poll that
//! comes sooner waits (inline, up to the client's `max_inline_wait`, else it
//! returns [`HttpError::RateLimited`] without a request). The spacing is per
//! source; two sources on one account share the server's answers (429 and
//! headers) through the shared budget, not this spacing.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, SecretError, SecretRef, Source, SourceError,
    http::safe_target,
    source::check_status,
    text::{html_to_text, tidy},
};
use url::Url;

const PLATFORM: &str = "zendesk";

/// A ticket updated this long after it was created counts as edited.
const EDIT_GRACE_SECONDS: i64 = 60;

/// Zendesk refuses a `start_time` less than a minute old.
const MIN_START_AGE_SECONDS: i64 = 60;

/// Zendesk's rate-limit window: a spent budget without a reset header
/// is held this long.
const WINDOW: Duration = Duration::from_secs(60);

/// The longest hold a header may impose: a day.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// What Zendesk puts in place of redacted text.
const REDACTION_MARK: char = '▇';

/// Settings of one Zendesk Support account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZendeskConfig {
    /// The account's subdomain: `acme` for `https://acme.zendesk.com`.
    /// Set this or `base_url`.
    #[serde(default)]
    pub subdomain: Option<String>,
    /// Root of the account's API instead of `subdomain`, e.g.
    /// `https://acme.zendesk.com` (or a test server).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The e-mail address of the (admin) user the `api_token` belongs to;
    /// only with `api_token`.
    #[serde(default)]
    pub email: Option<String>,
    /// An API token (Admin Center > Apps and integrations > Zendesk API),
    /// as `{ env = "..." }` or `{ file = "..." }`; sent as HTTP Basic
    /// `{email}/token:{api_token}`. Set this with `email`, or `oauth_token`.
    #[serde(default)]
    pub api_token: Option<SecretRef>,
    /// An OAuth access token (`{ env = "..." }` or `{ file = "..." }`), sent
    /// as `Authorization: Bearer`; instead of `email` and `api_token`.
    #[serde(default)]
    pub oauth_token: Option<SecretRef>,
    /// Also take private comments (internal notes); by default only public
    /// comments are taken.
    #[serde(default)]
    pub include_private_comments: bool,
    /// Without a `since`, the first poll takes the tickets changed in this
    /// many days before now.
    #[serde(default = "default_initial_lookback_days")]
    pub initial_lookback_days: u32,
    /// Tickets per page of the incremental export, 1 to 1000 (Zendesk's
    /// maximum); each page's tickets then have their comments fetched.
    #[serde(default = "default_per_page")]
    pub per_page: u32,
    /// Comments per page, 1 to 100 (Zendesk's maximum).
    #[serde(default = "default_comments_per_page")]
    pub comments_per_page: u32,
    /// Requests a minute this source makes to the incremental export:
    /// Zendesk allows 10 (30 with the High Volume API add-on).
    #[serde(default = "default_incremental_requests_per_minute")]
    pub incremental_requests_per_minute: u32,
}

fn default_initial_lookback_days() -> u32 {
    30
}

fn default_per_page() -> u32 {
    100
}

fn default_comments_per_page() -> u32 {
    100
}

fn default_incremental_requests_per_minute() -> u32 {
    10
}

impl ZendeskConfig {
    /// The API root as configured (not validated): `base_url`, else the
    /// subdomain's address.
    fn site(&self) -> String {
        match (&self.base_url, &self.subdomain) {
            (Some(base_url), _) => base_url.trim().trim_end_matches('/').to_owned(),
            (None, Some(subdomain)) => format!("https://{}.zendesk.com", subdomain.trim().to_lowercase()),
            (None, None) => String::new(),
        }
    }

    /// Sources with equal keys use one credential on one account and share
    /// one rate budget. Names the secrets' references, never their values.
    pub fn credential_key(&self) -> String {
        format!("zendesk {} {:?} {:?} {:?}", self.site(), self.email, self.api_token, self.oauth_token)
    }
}

/// Why a [`ZendeskSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("zendesk `{key}`: {source}")]
    Secret {
        key: &'static str,
        #[source]
        source: SecretError,
    },
    #[error("zendesk `{0}` holds characters that are not allowed in an HTTP header")]
    InvalidToken(&'static str),
    #[error("zendesk: set `subdomain` (`acme` for https://acme.zendesk.com) or `base_url`")]
    NoSite,
    #[error("zendesk: set `subdomain` or `base_url`, not both")]
    BothSites,
    #[error("zendesk `subdomain` must be the account's name only (`acme` for https://acme.zendesk.com), not `{0}`")]
    InvalidSubdomain(String),
    #[error("zendesk `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("zendesk: set `email` with `api_token`, or `oauth_token`")]
    NoAuth,
    #[error("zendesk: set `api_token` (with `email`) or `oauth_token`, not both")]
    BothAuth,
    #[error("zendesk `api_token` needs `email`: the address of the user the token belongs to")]
    MissingEmail,
    #[error("zendesk `email` is only used with `api_token`, which is not set")]
    EmailWithoutToken,
    #[error("zendesk `email` must be an e-mail address, not `{0}`")]
    InvalidEmail(String),
    #[error("zendesk `per_page` must be between 1 and 1000, not {0}")]
    InvalidPerPage(u32),
    #[error("zendesk `comments_per_page` must be between 1 and 100, not {0}")]
    InvalidCommentsPerPage(u32),
    #[error("zendesk `incremental_requests_per_minute` must be at least 1")]
    InvalidIncrementalRate,
    #[error("zendesk HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// How requests are authenticated; Debug never shows a secret (the
/// token is a `SecretString`, the header value is marked sensitive).
#[derive(Debug)]
enum Auth {
    /// `{email}/token` and the API token, for HTTP Basic.
    Token { user: String, token: SecretString },
    /// `Bearer <token>`.
    Bearer(HeaderValue),
}

/// The tickets and ticket comments of one Zendesk account.
#[derive(Debug)]
pub struct ZendeskSource {
    instance: String,
    config: ZendeskConfig,
    base_url: Url,
    http: HttpClient,
    auth: Auth,
    /// The least time between two incremental export requests.
    export_spacing: Duration,
    /// When the next incremental export request may leave.
    next_export: Mutex<Option<Instant>>,
}

/// What the cursor of a Zendesk source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ZendeskCursor {
    /// The export's last `after_cursor`: where the next export request
    /// goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after_cursor: Option<String>,
    /// The `start_time` of the first export request, until Zendesk names
    /// an `after_cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_time: Option<i64>,
    /// Whether the last export page said `end_of_stream`.
    #[serde(default)]
    end_of_stream: bool,
    /// Tickets of the export whose comments are still to be fetched,
    /// oldest change first.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pending: VecDeque<PendingTicket>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingTicket {
    id: u64,
    /// `meta.after_cursor` of the last comments page fetched; `None`
    /// before the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
}

impl ZendeskSource {
    pub fn new(instance: &str, config: ZendeskConfig, http: HttpOptions) -> Result<ZendeskSource, BuildError> {
        let base_url = match (&config.subdomain, &config.base_url) {
            (Some(_), Some(_)) => return Err(BuildError::BothSites),
            (None, None) => return Err(BuildError::NoSite),
            (Some(subdomain), None) => {
                let name = subdomain.trim();
                let valid = !name.is_empty()
                    && name.len() <= 63
                    && !name.starts_with('-')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
                if !valid {
                    return Err(BuildError::InvalidSubdomain(subdomain.clone()));
                }
                Url::parse(&config.site()).map_err(|_| BuildError::InvalidSubdomain(subdomain.clone()))?
            }
            (None, Some(base_url)) => Url::parse(base_url.trim())
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base() && url.has_host())
                .ok_or_else(|| BuildError::InvalidBaseUrl(base_url.clone()))?,
        };
        let auth = match (&config.email, &config.api_token, &config.oauth_token) {
            (_, Some(_), Some(_)) => return Err(BuildError::BothAuth),
            (None, None, None) => return Err(BuildError::NoAuth),
            (None, Some(_), None) => return Err(BuildError::MissingEmail),
            (Some(_), None, _) => return Err(BuildError::EmailWithoutToken),
            (Some(email), Some(secret), None) => {
                let address = email.trim();
                let valid =
                    address.contains('@') && !address.contains(':') && !address.chars().any(char::is_whitespace);
                if !valid {
                    return Err(BuildError::InvalidEmail(email.clone()));
                }
                let token = secret.resolve().map_err(|source| BuildError::Secret { key: "api_token", source })?;
                let trimmed = token.expose_secret().trim();
                if HeaderValue::from_str(trimmed).is_err() {
                    return Err(BuildError::InvalidToken("api_token"));
                }
                Auth::Token { user: format!("{address}/token"), token: SecretString::from(trimmed.to_owned()) }
            }
            (None, None, Some(secret)) => {
                let token = secret.resolve().map_err(|source| BuildError::Secret { key: "oauth_token", source })?;
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret().trim()))
                    .map_err(|_| BuildError::InvalidToken("oauth_token"))?;
                value.set_sensitive(true);
                Auth::Bearer(value)
            }
        };
        if !(1..=1000).contains(&config.per_page) {
            return Err(BuildError::InvalidPerPage(config.per_page));
        }
        if !(1..=100).contains(&config.comments_per_page) {
            return Err(BuildError::InvalidCommentsPerPage(config.comments_per_page));
        }
        if config.incremental_requests_per_minute == 0 {
            return Err(BuildError::InvalidIncrementalRate);
        }
        let export_spacing = WINDOW / config.incremental_requests_per_minute;
        Ok(ZendeskSource {
            instance: instance.to_owned(),
            http: HttpClient::new(http)?,
            config,
            base_url,
            auth,
            export_spacing,
            next_export: Mutex::new(None),
        })
    }

    /// `base_url` with `segments` appended as path segments (encoded).
    fn endpoint(&self, segments: &[&str]) -> Url {
        tributary_sdk::source::endpoint(&self.base_url, segments)
    }

    /// The next export page: after the stored `after_cursor`, else from a
    /// start time.
    fn export_url(&self, cursor: &ZendeskCursor) -> Url {
        let mut url = self.endpoint(&["api", "v2", "incremental", "tickets", "cursor.json"]);
        {
            let mut query = url.query_pairs_mut();
            match (&cursor.after_cursor, cursor.start_time) {
                (Some(after), _) => query.append_pair("cursor", after),
                (None, start_time) => query.append_pair("start_time", &start_time.unwrap_or_default().to_string()),
            };
            query.append_pair("include", "users").append_pair("per_page", &self.config.per_page.to_string());
        }
        url
    }

    fn comments_url(&self, ticket: &PendingTicket) -> Url {
        let id = ticket.id.to_string();
        let mut url = self.endpoint(&["api", "v2", "tickets", &id, "comments.json"]);
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("include", "users").append_pair("page[size]", &self.config.comments_per_page.to_string());
            if let Some(after) = &ticket.after {
                query.append_pair("page[after]", after);
            }
        }
        url
    }

    /// The agent's page of a ticket.
    fn ticket_web_url(&self, id: u64) -> String {
        self.endpoint(&["agent", "tickets", &id.to_string()]).to_string()
    }

    /// The agent's page of a user.
    fn user_web_url(&self, id: i64) -> String {
        self.endpoint(&["agent", "users", &id.to_string()]).to_string()
    }

    /// The first start time: `since`, else the configured lookback, never
    /// less than a minute ago (Zendesk refuses it) nor before 1970.
    fn start_time(&self, since: Option<DateTime<Utc>>) -> i64 {
        let now = Utc::now().timestamp();
        let start = match since {
            Some(since) => since.timestamp(),
            None => now.saturating_sub(i64::from(self.config.initial_lookback_days).saturating_mul(86_400)),
        };
        start.clamp(0, (now - MIN_START_AGE_SECONDS).max(0))
    }

    /// Waits for this source's next slot on the incremental export, or
    /// returns [`HttpError::RateLimited`] when that is further away than
    /// the client may wait inline.
    async fn wait_for_export_slot(&self, url: &Url) -> Result<(), SourceError> {
        let now = Instant::now();
        let at = {
            let mut next = self.next_export.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let at = next.filter(|at| *at > now).unwrap_or(now);
            let wait = at - now;
            if wait > self.http.options().max_inline_wait {
                return Err(HttpError::RateLimited {
                    target: safe_target(url),
                    retry_after: wait,
                    body: String::new(),
                }
                .into());
            }
            *next = Some(at + self.export_spacing);
            at
        };
        if at > now {
            tracing::debug!(
                source = %self.instance, wait_ms = (at - now).as_millis() as u64,
                "zendesk incremental export spacing; waiting"
            );
            tokio::time::sleep_until(at).await;
        }
        Ok(())
    }

    /// One GET with the credentials; holds the budget when a header the
    /// shared client does not read says it is spent.
    async fn get(&self, url: Url) -> Result<HttpResponse, SourceError> {
        let request = self.http.get(url).header(ACCEPT, "application/json");
        let request = match &self.auth {
            Auth::Token { user, token } => request.basic_auth(user, Some(token.expose_secret())),
            Auth::Bearer(value) => request.header(AUTHORIZATION, value.clone()),
        };
        let response = self.http.send(request).await?;
        if let Some(wait) = spent_budget_wait(&response) {
            tracing::info!(
                source = %self.instance, wait_s = wait.as_secs(),
                "zendesk rate limit spent; holding until it resets"
            );
            self.http.hold(wait);
        }
        Ok(response)
    }

    /// One page of the incremental export: its tickets, and their ids
    /// queued for their comments.
    async fn poll_export(&self, cursor: &mut ZendeskCursor, since: Option<DateTime<Utc>>) -> Result<Page, SourceError> {
        if cursor.after_cursor.is_none() {
            cursor.start_time = Some(match (since, cursor.start_time) {
                (None, Some(stored)) => stored,
                (since, _) => self.start_time(since),
            });
        }
        let url = self.export_url(cursor);
        self.wait_for_export_slot(&url).await?;
        let response = self.get(url).await?;
        check_status(&response)?;
        let export: RawExport = serde_json::from_slice(&response.body).map_err(|error| {
            SourceError::Decode(format!("{} answered an unreadable export: {error}", response.target))
        })?;
        let users = users_by_id(export.users);

        let mut page = Page::default();
        let fetched = export.tickets.len();
        for item in export.tickets {
            match self.ticket(&item, &users) {
                Ok((contribution, id)) => {
                    if !contribution.deleted && !cursor.pending.iter().any(|pending| pending.id == id) {
                        cursor.pending.push_back(PendingTicket { id, after: None });
                    }
                    page.contributions.push(contribution);
                }
                Err(reason) => {
                    let id = item.get("id").and_then(Value::as_u64).map(|id| format!("ticket:{id}"));
                    let raw = serde_json::to_string(&item).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(id, reason, &raw));
                }
            }
        }

        let sent = cursor.after_cursor.clone();
        if let Some(after) = export.after_cursor.filter(|after| !after.is_empty()) {
            cursor.after_cursor = Some(after);
            cursor.start_time = None;
        }
        cursor.end_of_stream = match export.end_of_stream {
            Some(end) => end,
            None => {
                tracing::warn!(source = %self.instance, "zendesk export page without end_of_stream; taking it as the end");
                true
            }
        };
        if !cursor.end_of_stream && cursor.after_cursor == sent {
            tracing::warn!(
                source = %self.instance,
                "zendesk export says more follows but names no new after_cursor; ending the pass"
            );
            cursor.end_of_stream = true;
        }
        tracing::debug!(
            source = %self.instance, fetched, contributions = page.contributions.len(),
            quarantined = page.quarantined.len(), end_of_stream = cursor.end_of_stream,
            "zendesk export page polled"
        );
        Ok(page)
    }

    /// One page of the comments of the first queued ticket.
    async fn poll_comments(&self, cursor: &mut ZendeskCursor) -> Result<Page, SourceError> {
        let Some(ticket) = cursor.pending.front().cloned() else {
            return Ok(Page::default());
        };
        let response = self.get(self.comments_url(&ticket)).await?;
        // A ticket gone since the export (404), or a request Zendesk will
        // never answer otherwise: skipped, so that one ticket cannot stall
        // the source. Refused credentials and 5xx stay errors (retried).
        let status = response.status.as_u16();
        if matches!(status, 400 | 404 | 410 | 422) {
            tracing::warn!(
                source = %self.instance, ticket = ticket.id, status,
                "zendesk answered the ticket's comments with an error; its comments are skipped"
            );
            cursor.pending.pop_front();
            return Ok(Page::default());
        }
        check_status(&response)?;
        let body: RawComments = serde_json::from_slice(&response.body).map_err(|error| {
            SourceError::Decode(format!("{} answered unreadable comments: {error}", response.target))
        })?;
        let users = users_by_id(body.users);

        let mut page = Page::default();
        let first_page = ticket.after.is_none();
        for (index, item) in body.comments.into_iter().enumerate() {
            // The ticket's first comment is its description: the ticket's body.
            if first_page && index == 0 {
                continue;
            }
            let public = item.get("public").and_then(Value::as_bool).unwrap_or(false);
            if !public && !self.config.include_private_comments {
                continue;
            }
            match self.comment(ticket.id, &item, &users) {
                Ok(contribution) => page.contributions.push(contribution),
                Err(reason) => {
                    let id = item.get("id").and_then(Value::as_u64).map(|id| format!("comment:{id}"));
                    let raw = serde_json::to_string(&item).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(id, reason, &raw));
                }
            }
        }

        let meta = body.meta.unwrap_or_default();
        let next = meta.after_cursor.filter(|after| meta.has_more && !after.is_empty());
        match next {
            Some(after) if Some(&after) != ticket.after.as_ref() => {
                if let Some(front) = cursor.pending.front_mut() {
                    front.after = Some(after);
                }
            }
            next => {
                if next.is_some() {
                    tracing::warn!(
                        source = %self.instance, ticket = ticket.id,
                        "zendesk sent the same comments page as next; ending the ticket's comments"
                    );
                }
                cursor.pending.pop_front();
            }
        }
        tracing::debug!(
            source = %self.instance, ticket = ticket.id, contributions = page.contributions.len(),
            quarantined = page.quarantined.len(), "zendesk comments page polled"
        );
        Ok(page)
    }

    /// A ticket of the export, and its id.
    fn ticket(&self, item: &Value, users: &HashMap<i64, RawUser>) -> Result<(Contribution, u64), String> {
        let ticket = RawTicket::deserialize(item).map_err(|error| format!("cannot read the ticket: {error}"))?;
        let created_at = time("ticket", "created_at", ticket.created_at.as_deref())?;
        let updated_at = match ticket.updated_at.as_deref() {
            Some(updated_at) => time("ticket", "updated_at", Some(updated_at))?,
            None => created_at,
        };
        let deleted = ticket.status.as_deref() == Some("deleted");
        // No public comment at all: the description is an internal note.
        let private = ticket.is_public == Some(false) && !self.config.include_private_comments;
        let body = if private { String::new() } else { tidy(ticket.description.as_deref().unwrap_or_default()) };
        let contribution = Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: format!("ticket:{}", ticket.id),
            url: Some(self.ticket_web_url(ticket.id)),
            kind: Kind::Ticket,
            author: self.author(ticket.requester_id, users),
            title: ticket.subject.map(|subject| subject.trim().to_owned()).filter(|subject| !subject.is_empty()),
            body,
            language: None,
            created_at,
            updated_at: Some(updated_at),
            parent_id: None,
            thread_id: Some(format!("ticket:{}", ticket.id)),
            tags: ticket.tags.unwrap_or_default(),
            score: None,
            edited: (updated_at - created_at).num_seconds() > EDIT_GRACE_SECONDS,
            deleted,
            signals: None,
        };
        Ok((contribution, ticket.id))
    }

    fn comment(&self, ticket: u64, item: &Value, users: &HashMap<i64, RawUser>) -> Result<Contribution, String> {
        let comment = RawComment::deserialize(item).map_err(|error| format!("cannot read the comment: {error}"))?;
        let created_at = time("comment", "created_at", comment.created_at.as_deref())?;
        let body = match (comment.plain_body, comment.html_body, comment.body) {
            (Some(plain), _, _) if !plain.trim().is_empty() => tidy(&plain),
            (_, Some(html), _) if !html.trim().is_empty() => html_to_text(&html),
            (_, _, body) => tidy(body.as_deref().unwrap_or_default()),
        };
        let thread = format!("ticket:{ticket}");
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: format!("comment:{}", comment.id),
            url: Some(self.ticket_web_url(ticket)),
            kind: Kind::TicketComment,
            author: self.author(comment.author_id, users),
            title: None,
            edited: body.contains(REDACTION_MARK),
            body,
            language: None,
            created_at,
            updated_at: None,
            parent_id: Some(thread.clone()),
            thread_id: Some(thread),
            tags: Vec::new(),
            score: None,
            deleted: false,
            signals: None,
        })
    }

    /// The author with this user id, named and addressed from the
    /// sideloaded users when they hold them.
    fn author(&self, id: Option<i64>, users: &HashMap<i64, RawUser>) -> Author {
        let Some(id) = id else {
            return Author::default();
        };
        let user = users.get(&id);
        let text = |value: Option<&String>| value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        Author {
            id: id.to_string(),
            handle: None,
            display_name: user.and_then(|user| text(user.name.as_ref())),
            email: user.and_then(|user| text(user.email.as_ref())),
            profile_url: (id > 0).then(|| self.user_web_url(id)),
            links: Vec::new(),
        }
    }
}

/// How long the headers the shared client does not read ask every request
/// to wait: a spent `zendesk-ratelimit-*` until its `resets`, a spent
/// `x-rate-limit-remaining` or `rate-limit-remaining` until its reset, or a
/// minute when none is named.
fn spent_budget_wait(response: &HttpResponse) -> Option<Duration> {
    let number = |name: &str| {
        response.header(name).and_then(|value| value.trim().parse::<f64>().ok()).filter(|value| value.is_finite())
    };
    let mut waits = Vec::new();
    for (name, value) in &response.headers {
        if !name.as_str().starts_with("zendesk-ratelimit-") {
            continue;
        }
        if let Some((remaining, resets)) = value.to_str().ok().and_then(parse_zendesk_limit)
            && remaining < 1.0
        {
            waits.push(resets.map(seconds).unwrap_or(WINDOW));
        }
    }
    let reset = ["ratelimit-reset", "x-rate-limit-reset", "rate-limit-reset"].iter().find_map(|name| number(name));
    for name in ["x-rate-limit-remaining", "rate-limit-remaining"] {
        if number(name).is_some_and(|remaining| remaining < 1.0) {
            waits.push(reset.map(seconds).unwrap_or(WINDOW));
        }
    }
    waits.into_iter().max()
}

/// `total=100; remaining=99; resets=41`: the remaining requests and the
/// seconds to the reset.
fn parse_zendesk_limit(value: &str) -> Option<(f64, Option<f64>)> {
    let mut remaining = None;
    let mut resets = None;
    for part in value.split([';', ',']) {
        let Some((key, number)) = part.split_once('=') else {
            continue;
        };
        let number = number.trim().parse::<f64>().ok().filter(|n| n.is_finite());
        match key.trim().to_ascii_lowercase().as_str() {
            "remaining" => remaining = number,
            "resets" => resets = number,
            _ => {}
        }
    }
    Some((remaining?, resets))
}

/// A wait in seconds, between one second and a day (never panics).
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(1.0)).unwrap_or(MAX_WAIT).clamp(Duration::from_secs(1), MAX_WAIT)
}

/// A timestamp field of an item (RFC 3339), or why it cannot be read.
fn time(item: &str, field: &str, value: Option<&str>) -> Result<DateTime<Utc>, String> {
    let value = value.ok_or_else(|| format!("the {item} has no `{field}`"))?;
    value.parse::<DateTime<Utc>>().map_err(|error| format!("the {item}'s `{field}` `{value}` is not a time: {error}"))
}

/// The readable sideloaded users by id; unreadable ones are left out.
fn users_by_id(users: Option<Vec<Value>>) -> HashMap<i64, RawUser> {
    users
        .unwrap_or_default()
        .into_iter()
        .filter_map(|user| RawUser::deserialize(user).ok())
        .map(|user| (user.id, user))
        .collect()
}

/// A page of the cursor-based incremental ticket export.
#[derive(Debug, Deserialize)]
struct RawExport {
    tickets: Vec<Value>,
    #[serde(default)]
    users: Option<Vec<Value>>,
    #[serde(default)]
    after_cursor: Option<String>,
    #[serde(default)]
    end_of_stream: Option<bool>,
}

/// A page of a ticket's comments.
#[derive(Debug, Deserialize)]
struct RawComments {
    comments: Vec<Value>,
    #[serde(default)]
    users: Option<Vec<Value>>,
    #[serde(default)]
    meta: Option<RawMeta>,
}

#[derive(Debug, Default, Deserialize)]
struct RawMeta {
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    after_cursor: Option<String>,
}

/// The fields of a ticket this connector reads.
#[derive(Debug, Deserialize)]
struct RawTicket {
    id: u64,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    requester_id: Option<i64>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    is_public: Option<bool>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    updated_at: Option<String>,
}

/// The fields of a comment this connector reads.
#[derive(Debug, Deserialize)]
struct RawComment {
    id: u64,
    #[serde(default)]
    author_id: Option<i64>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    plain_body: Option<String>,
    #[serde(default)]
    html_body: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawUser {
    id: i64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

/// `GET /api/v2/users/me.json`.
#[derive(Debug, Deserialize)]
struct RawMe {
    user: RawMeUser,
}

#[derive(Debug, Deserialize)]
struct RawMeUser {
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    role: Option<String>,
}

#[async_trait]
impl Source for ZendeskSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor: ZendeskCursor = request.stored().unwrap_or_default();
        let mut page = if cursor.pending.is_empty() {
            self.poll_export(&mut cursor, request.since).await?
        } else {
            self.poll_comments(&mut cursor).await?
        };
        page.has_more = !cursor.pending.is_empty() || !cursor.end_of_stream;
        page.next_cursor = Some(Cursor::from_json(&cursor));
        Ok(page)
    }

    /// Asks who the credentials belong to: Zendesk answers an anonymous
    /// user (no id) for credentials it does not accept, and the incremental
    /// export is for admins only.
    async fn check(&self) -> Result<(), SourceError> {
        let response = self.get(self.endpoint(&["api", "v2", "users", "me.json"])).await?;
        check_status(&response)?;
        let me: RawMe = serde_json::from_slice(&response.body).map_err(|error| {
            SourceError::Decode(format!("{} answered an unreadable user: {error}", response.target))
        })?;
        if me.user.id.is_none() {
            return Err(SourceError::Auth(format!(
                "{} answered as an anonymous user: the credentials were not accepted",
                response.target
            )));
        }
        match me.user.role.as_deref() {
            Some("admin") => Ok(()),
            role => Err(SourceError::Auth(format!(
                "the incremental ticket export is for admins; these credentials are a user with role `{}`",
                role.unwrap_or("unknown")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant as StdInstant};

    use serde_json::json;
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{header, method, path, path_regex, query_param, query_param_is_missing},
    };

    use super::*;

    const EXPORT: &str = "/api/v2/incremental/tickets/cursor.json";
    /// `after_cursor` of the recorded `per_page=1` export page (end_of_stream false).
    const FIRST_AFTER: &str = "MTY5NTA1MjY2My4wfHwyOHw=";
    /// `after_cursor` of the recorded full export page (end_of_stream true).
    const LAST_AFTER: &str = "MTcwNzI3MTc0MS4wfHw0MDQ1fA==";
    /// `meta.after_cursor` of the recorded comments page.
    const COMMENTS_AFTER: &str = "eyJvIjoiY3JlYXRlZF9hdCxpZCIsInYiOiJaRnRQMjJZQUFBQUFhUk9BbXhrbEhnQUEifQ==";
    const EMAIL: &str = "admin@example.com";
    const TOKEN: &str = "6wiIBWbGkBMo1mRDMuVwkw1EPsNkeUj95PIz2akv";
    /// base64 of `admin@example.com/token:<TOKEN>`.
    const BASIC: &str =
        "Basic YWRtaW5AZXhhbXBsZS5jb20vdG9rZW46NndpSUJXYkdrQk1vMW1SRE11VndrdzFFUHNOa2VVajk1UEl6MmFrdg==";
    /// 2023-09-01T00:00:00Z, before every recorded ticket but the sample one.
    const SINCE: i64 = 1_693_526_400;
    /// The requester of 82 of the 87 recorded tickets.
    const MAIN_REQUESTER: i64 = 6130907993114;
    /// The author of the recorded comment.
    const COMMENT_AUTHOR: i64 = 26155588908179;
    /// Ids of the comments added to the recorded comments page.
    const REPLY: u64 = 33144692244600;
    const NOTE: u64 = 33144692244700;

    fn options() -> HttpOptions {
        HttpOptions {
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(2),
            ..HttpOptions::default()
        }
    }

    /// A secret file in a folder of its own, holding `value`; it is read
    /// when the source is built (see [`build`]).
    fn secret_file(value: &str) -> SecretRef {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tributary-zendesk-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, format!("{value}\n")).unwrap();
        SecretRef::File(file)
    }

    /// Removes the secret files (and their folders) made by [`secret_file`].
    fn forget(config: &ZendeskConfig) {
        let prefix = format!("tributary-zendesk-{}-", std::process::id());
        for secret in [&config.api_token, &config.oauth_token].into_iter().flatten() {
            if let SecretRef::File(file) = secret
                && let Some(dir) = file.parent()
                && dir.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(&prefix))
            {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// Builds a source, then removes its secret files.
    fn build(config: ZendeskConfig, options: HttpOptions) -> Result<ZendeskSource, BuildError> {
        let built = ZendeskSource::new("zd", config.clone(), options);
        forget(&config);
        built
    }

    fn config(server: &MockServer) -> ZendeskConfig {
        let token = secret_file(TOKEN);
        serde_json::from_value(json!({ "base_url": server.uri(), "email": EMAIL, "api_token": token })).unwrap()
    }

    /// A source without the export spacing, so that tests do not wait.
    fn source(config: ZendeskConfig) -> ZendeskSource {
        let mut source = build(config, options()).unwrap();
        source.export_spacing = Duration::ZERO;
        source
    }

    /// The requesters of the recorded tickets, added as the `users` sideload
    /// that `include=users` brings (zenpy recorded the export without it).
    /// Names and addresses are made up, but for the requester of Zendesk's
    /// sample ticket; 6314931549722 (ticket 4036) is left out on purpose.
    fn requesters() -> Value {
        json!([
            {"id": MAIN_REQUESTER, "name": "Ada Admin", "email": "ada@example.com", "role": "admin"},
            {"id": 6130869168922_i64, "name": "The Customer", "email": "customer@example.com", "role": "end-user"},
            {"id": 6130871991962_i64, "name": "Tess Tags", "email": " tess@example.com ", "role": "end-user"},
            {"id": 6291823978522_i64, "name": "Del Eted", "email": "del@example.com", "role": "end-user"},
            {"id": 6295881799834_i64, "name": "Node Zendesk", "email": null, "role": "end-user"},
            {"id": "not a user"}
        ])
    }

    /// A recorded export page with the requesters sideloaded.
    fn export(name: &str) -> Fixture {
        let mut fixture = Fixture::load("zendesk", name);
        fixture.body["users"] = requesters();
        fixture
    }

    /// The recorded one-ticket page (ticket 28) as the end of the stream.
    fn single_page() -> Fixture {
        let mut fixture = export("incremental_tickets_cursor_per_page_1");
        fixture.body["end_of_stream"] = true.into();
        fixture
    }

    fn tickets(fixture: &mut Fixture) -> &mut Vec<Value> {
        fixture.body["tickets"].as_array_mut().unwrap()
    }

    fn ticket_mut(fixture: &mut Fixture, id: u64) -> &mut Value {
        tickets(fixture).iter_mut().find(|ticket| ticket["id"] == id).unwrap()
    }

    fn recorded_ticket(id: u64) -> Value {
        ticket_mut(&mut Fixture::load("zendesk", "incremental_tickets_cursor"), id).clone()
    }

    /// The recorded comments page (ticket 33: one public comment, its
    /// description, with an attachment), extended with what a conversation
    /// has next: a public reply by the requester and a private note by the
    /// agent, and the `users` sideload of `include=users`.
    fn comments() -> Fixture {
        let mut fixture = Fixture::load("zendesk", "ticket_comments");
        let recorded = fixture.body["comments"][0].clone();
        let mut reply = recorded.clone();
        reply["id"] = REPLY.into();
        reply["author_id"] = MAIN_REQUESTER.into();
        reply["body"] = "Thanks!\n\nIt works **now**.".into();
        reply["plain_body"] = "Thanks!\n\nIt works now.".into();
        reply["html_body"] = "<div class=\"zd-comment\"><p>Thanks!</p><p>It works <b>now</b>.</p></div>".into();
        reply["attachments"] = json!([]);
        reply["created_at"] = "2024-09-06T19:02:11Z".into();
        let mut note = recorded.clone();
        note["id"] = NOTE.into();
        note["public"] = false.into();
        note["body"] = "Internal: customer is on the legacy plan.".into();
        note["plain_body"] = "Internal: customer is on the legacy plan.".into();
        note["html_body"] = "<p>Internal: customer is on the legacy plan.</p>".into();
        note["created_at"] = "2024-09-06T19:05:00Z".into();
        fixture.body["comments"] = json!([recorded, reply, note]);
        fixture.body["users"] = json!([
            {"id": COMMENT_AUTHOR, "name": "Joshua Teitelbaum", "email": "jteitelbaum@zendesk.com", "role": "admin"},
            {"id": MAIN_REQUESTER, "name": "Ada Admin", "email": "ada@example.com", "role": "admin"}
        ]);
        fixture
    }

    /// The recorded comments page, emptied: a ticket without comments.
    fn no_comments() -> ResponseTemplate {
        let mut fixture = Fixture::load("zendesk", "ticket_comments");
        fixture.body["comments"] = json!([]);
        fixture.response()
    }

    /// The recorded end-of-stream export page, with nothing new in it.
    fn nothing_new(after_cursor: Value) -> ResponseTemplate {
        let mut fixture = export("incremental_tickets_cursor");
        fixture.body["tickets"] = json!([]);
        fixture.body["users"] = json!([]);
        fixture.body["after_cursor"] = after_cursor;
        fixture.response()
    }

    /// Serves the export page asked for with `key=value` (`start_time` or `cursor`).
    async fn serve_export(server: &MockServer, key: &str, value: &str, response: ResponseTemplate) {
        Mock::given(method("GET"))
            .and(path(EXPORT))
            .and(query_param(key, value))
            .and(query_param("include", "users"))
            .and(query_param("per_page", "100"))
            .respond_with(response)
            .mount(server)
            .await;
    }

    async fn serve_comments(server: &MockServer, ticket: u64, response: ResponseTemplate) {
        Mock::given(method("GET"))
            .and(path(format!("/api/v2/tickets/{ticket}/comments.json")))
            .and(query_param("include", "users"))
            .and(query_param("page[size]", "100"))
            .respond_with(response)
            .mount(server)
            .await;
    }

    /// Any ticket not served otherwise has no comments.
    async fn serve_no_comments(server: &MockServer) {
        Mock::given(method("GET"))
            .and(path_regex(r"^/api/v2/tickets/\d+/comments\.json$"))
            .respond_with(no_comments())
            .with_priority(10)
            .mount(server)
            .await;
    }

    /// Polls until `has_more` is off; `since` only on the first call.
    async fn run(source: &ZendeskSource, cursor: Option<Cursor>, since: Option<i64>) -> Vec<Page> {
        let since = since.and_then(|since| DateTime::from_timestamp(since, 0));
        tributary_sdk::testkit::poll_round(source, cursor, since, 300).await
    }

    fn state(page: &Page) -> ZendeskCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn stored(cursor: &ZendeskCursor) -> Option<Cursor> {
        Some(Cursor::from_json(cursor))
    }

    fn at_end(after: &str) -> ZendeskCursor {
        ZendeskCursor { after_cursor: Some(after.into()), end_of_stream: true, ..ZendeskCursor::default() }
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

    fn at(time: &str) -> DateTime<Utc> {
        time.parse().unwrap()
    }

    async fn requests_to(server: &MockServer, path_prefix: &str) -> Vec<wiremock::Request> {
        let requests = server.received_requests().await.unwrap();
        requests.into_iter().filter(|r| r.url.path().starts_with(path_prefix)).collect()
    }

    /// One expected contribution, checked by value.
    struct Expect<'a> {
        id: &'a str,
        kind: Kind,
        author_id: &'a str,
        name: Option<&'a str>,
        email: Option<&'a str>,
        title: Option<&'a str>,
        body: &'a str,
        ticket: u64,
        created_at: &'a str,
        updated_at: Option<&'a str>,
        tags: &'a [&'a str],
        edited: bool,
        deleted: bool,
    }

    fn check(server: &MockServer, pages: &[Page], expect: &Expect<'_>) {
        let c = find(pages, expect.id);
        let id = expect.id;
        let thread = format!("ticket:{}", expect.ticket);
        assert_eq!(c.platform, "zendesk", "{id}");
        assert_eq!(c.source, "zd", "{id}");
        assert_eq!(c.kind, expect.kind, "{id}");
        assert_eq!(c.author.id, expect.author_id, "{id}");
        assert_eq!(c.author.handle, None, "{id}");
        assert_eq!(c.author.display_name.as_deref(), expect.name, "{id}");
        assert_eq!(c.author.email.as_deref(), expect.email, "{id}");
        assert_eq!(
            c.author.profile_url.as_deref(),
            Some(format!("{}/agent/users/{}", server.uri(), expect.author_id).as_str()),
            "{id}"
        );
        assert_eq!(
            c.url.as_deref(),
            Some(format!("{}/agent/tickets/{}", server.uri(), expect.ticket).as_str()),
            "{id}"
        );
        assert_eq!(c.title.as_deref(), expect.title, "{id}");
        assert_eq!(c.body, expect.body, "{id}");
        assert_eq!(c.thread_id.as_deref(), Some(thread.as_str()), "{id}");
        let parent = (expect.kind == Kind::TicketComment).then_some(thread.as_str());
        assert_eq!(c.parent_id.as_deref(), parent, "{id}");
        assert_eq!(c.created_at, at(expect.created_at), "{id}");
        assert_eq!(c.updated_at, expect.updated_at.map(at), "{id}");
        assert_eq!(c.tags, expect.tags, "{id}");
        assert_eq!(c.edited, expect.edited, "{id}");
        assert_eq!(c.deleted, expect.deleted, "{id}");
        assert_eq!((c.score, c.language.as_deref(), c.signals.as_ref()), (None, None, None), "{id}");
    }

    #[tokio::test]
    async fn first_poll_maps_the_exported_tickets_and_the_round_fetches_their_comments() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(EXPORT))
            .and(query_param("start_time", SINCE.to_string().as_str()))
            .and(query_param("include", "users"))
            .and(query_param("per_page", "100"))
            .and(query_param_is_missing("cursor"))
            .and(header("authorization", BASIC))
            .and(header("accept", "application/json"))
            .respond_with(export("incremental_tickets_cursor").response())
            .expect(1)
            .mount(&server)
            .await;
        serve_no_comments(&server).await;
        let pages = run(&source(config(&server)), None, Some(SINCE)).await;

        let first = &pages[0];
        assert_eq!(first.contributions.len(), 87);
        assert!(first.quarantined.is_empty());
        assert_eq!(&ids(first)[..3], ["ticket:28", "ticket:29", "ticket:30"]);
        let after_export = state(first);
        assert_eq!(after_export.after_cursor.as_deref(), Some(LAST_AFTER));
        assert_eq!((after_export.start_time, after_export.end_of_stream), (None, true));
        assert_eq!(after_export.pending.len(), 86, "every ticket but the deleted one waits for its comments");
        assert!(after_export.pending.iter().all(|pending| pending.id != 4034 && pending.after.is_none()));

        let expected = [
            Expect {
                id: "ticket:28",
                kind: Kind::Ticket,
                author_id: "6130907993114",
                name: Some("Ada Admin"),
                email: Some("ada@example.com"),
                title: Some("test"),
                body: "test",
                ticket: 28,
                created_at: "2023-09-18T15:57:42Z",
                updated_at: Some("2023-09-18T15:57:42Z"),
                tags: &[],
                edited: false,
                deleted: false,
            },
            // Zendesk's sample ticket: updated five months after its creation.
            Expect {
                id: "ticket:1",
                kind: Kind::Ticket,
                author_id: "6130869168922",
                name: Some("The Customer"),
                email: Some("customer@example.com"),
                title: Some("Sample ticket: Meet the ticket"),
                body: "Hi there,\n\nI’m sending an email because I’m having a problem setting up your new product. \
                       Can you help me troubleshoot?\n\nThanks,\n The Customer",
                ticket: 1,
                created_at: "2023-09-09T23:52:05Z",
                updated_at: Some("2024-02-07T00:11:18Z"),
                tags: &["sample", "support", "zendesk"],
                edited: true,
                deleted: false,
            },
            Expect {
                id: "ticket:4043",
                kind: Kind::Ticket,
                author_id: "6130871991962",
                name: Some("Tess Tags"),
                email: Some("tess@example.com"),
                title: Some("big test for tags"),
                body: "tags?",
                ticket: 4043,
                created_at: "2023-12-20T16:01:26Z",
                updated_at: Some("2023-12-20T16:01:26Z"),
                tags: &["foo", "new", "tag"],
                edited: false,
                deleted: false,
            },
            // The requester is not in the sideload: the id alone.
            Expect {
                id: "ticket:4036",
                kind: Kind::Ticket,
                author_id: "6314931549722",
                name: None,
                email: None,
                title: Some("Ticket not saved as pending from the get-go"),
                body: "Ticket not saved as pending from the get-go",
                ticket: 4036,
                created_at: "2023-10-29T01:40:58Z",
                updated_at: Some("2023-10-29T01:40:58Z"),
                tags: &[],
                edited: false,
                deleted: false,
            },
            // A requester without an e-mail address.
            Expect {
                id: "ticket:4035",
                kind: Kind::Ticket,
                author_id: "6295881799834",
                name: Some("Node Zendesk"),
                email: None,
                title: Some("Testing node-zendesk"),
                body: "This is a test ticket",
                ticket: 4035,
                created_at: "2023-10-24T05:39:13Z",
                updated_at: Some("2023-10-24T05:39:13Z"),
                tags: &[],
                edited: false,
                deleted: false,
            },
            // The recorded deleted ticket, scrubbed by Zendesk.
            Expect {
                id: "ticket:4034",
                kind: Kind::Ticket,
                author_id: "6291823978522",
                name: Some("Del Eted"),
                email: Some("del@example.com"),
                title: Some("SCRUBBED"),
                body: "X",
                ticket: 4034,
                created_at: "2023-10-23T03:55:22Z",
                updated_at: Some("2023-10-24T04:19:53Z"),
                tags: &[],
                edited: true,
                deleted: true,
            },
        ];
        for expect in &expected {
            check(&server, &pages, expect);
        }
        assert_eq!(pages[0].contributions.iter().filter(|c| c.deleted).count(), 1);

        // Then one poll per ticket for its comments (none here), and the round ends.
        assert_eq!(pages.len(), 87);
        assert!(more(&pages[..86]).iter().all(|more| *more));
        assert!(pages[1..].iter().all(|page| page.contributions.is_empty() && page.quarantined.is_empty()));
        let last = state(pages.last().unwrap());
        assert_eq!(last, at_end(LAST_AFTER), "the stream's last after_cursor is kept for the next poll");
        let comment_requests = requests_to(&server, "/api/v2/tickets/").await;
        assert_eq!(comment_requests.len(), 86);
        assert!(comment_requests.iter().all(|r| r.url.path() != "/api/v2/tickets/4034/comments.json"));
        assert!(comment_requests.iter().all(|r| r.headers.get("authorization").is_some_and(|v| v == BASIC)));
    }

    #[tokio::test]
    async fn comments_skip_the_description_and_take_private_notes_only_when_asked() {
        for include_private in [false, true] {
            let server = MockServer::start().await;
            serve_export(&server, "start_time", &SINCE.to_string(), single_page().response()).await;
            // The recorded comments of ticket 33, served as ticket 28's.
            serve_comments(&server, 28, comments().response()).await;
            let mut config = config(&server);
            config.include_private_comments = include_private;
            let pages = run(&source(config), None, Some(SINCE)).await;

            assert_eq!(more(&pages), [true, false], "the export page, then the comments of its ticket");
            assert_eq!(ids(&pages[0]), ["ticket:28"]);
            let expected: &[&str] = if include_private {
                &["comment:33144692244600", "comment:33144692244700"]
            } else {
                &["comment:33144692244600"]
            };
            assert_eq!(ids(&pages[1]), expected, "include_private_comments = {include_private}");
            check(
                &server,
                &pages,
                &Expect {
                    id: "comment:33144692244600",
                    kind: Kind::TicketComment,
                    author_id: "6130907993114",
                    name: Some("Ada Admin"),
                    email: Some("ada@example.com"),
                    title: None,
                    body: "Thanks!\n\nIt works now.",
                    ticket: 28,
                    created_at: "2024-09-06T19:02:11Z",
                    updated_at: None,
                    tags: &[],
                    edited: false,
                    deleted: false,
                },
            );
            if include_private {
                check(
                    &server,
                    &pages,
                    &Expect {
                        id: "comment:33144692244700",
                        kind: Kind::TicketComment,
                        author_id: "26155588908179",
                        name: Some("Joshua Teitelbaum"),
                        email: Some("jteitelbaum@zendesk.com"),
                        title: None,
                        body: "Internal: customer is on the legacy plan.",
                        ticket: 28,
                        created_at: "2024-09-06T19:05:00Z",
                        updated_at: None,
                        tags: &[],
                        edited: false,
                        deleted: false,
                    },
                );
            }
            assert_eq!(state(&pages[1]), at_end(FIRST_AFTER));
        }
    }

    #[tokio::test]
    async fn comments_page_on_meta_has_more_and_skip_only_the_very_first_comment() {
        let server = MockServer::start().await;
        serve_export(&server, "start_time", &SINCE.to_string(), single_page().response()).await;
        // Page 1: the recorded page, with `has_more` turned on.
        let mut first = Fixture::load("zendesk", "ticket_comments");
        first.body["meta"]["has_more"] = true.into();
        Mock::given(method("GET"))
            .and(path("/api/v2/tickets/28/comments.json"))
            .and(query_param_is_missing("page[after]"))
            .respond_with(first.response())
            .expect(1)
            .mount(&server)
            .await;
        // Page 2: the reply and the note.
        let mut second = comments();
        second.body["comments"].as_array_mut().unwrap().remove(0);
        Mock::given(method("GET"))
            .and(path("/api/v2/tickets/28/comments.json"))
            .and(query_param("page[after]", COMMENTS_AFTER))
            .and(query_param("page[size]", "100"))
            .respond_with(second.response())
            .expect(1)
            .mount(&server)
            .await;
        let pages = run(&source(config(&server)), None, Some(SINCE)).await;

        assert_eq!(more(&pages), [true, true, false]);
        assert!(pages[1].contributions.is_empty(), "the description is the ticket's body");
        let paging = state(&pages[1]);
        assert_eq!(paging.pending, [PendingTicket { id: 28, after: Some(COMMENTS_AFTER.into()) }]);
        assert_eq!(ids(&pages[2]), ["comment:33144692244600"], "the first comment of page 2 is a reply");
        assert!(state(&pages[2]).pending.is_empty());
    }

    #[tokio::test]
    async fn the_export_follows_after_cursor_to_the_end_of_the_stream() {
        let server = MockServer::start().await;
        serve_export(
            &server,
            "start_time",
            &SINCE.to_string(),
            export("incremental_tickets_cursor_per_page_1").response(),
        )
        .await;
        serve_export(&server, "cursor", FIRST_AFTER, export("incremental_tickets_cursor").response()).await;
        serve_no_comments(&server).await;
        let pages = run(&source(config(&server)), None, Some(SINCE)).await;

        assert_eq!(ids(&pages[0]), ["ticket:28"]);
        let paging = state(&pages[0]);
        assert_eq!(paging.after_cursor.as_deref(), Some(FIRST_AFTER));
        assert!(!paging.end_of_stream);
        assert!(pages[1].has_more && pages[1].contributions.is_empty(), "ticket 28's comments; the stream goes on");
        assert_eq!(pages[2].contributions.len(), 87);
        assert_eq!(pages.len(), 2 + 1 + 86);
        assert_eq!(state(pages.last().unwrap()), at_end(LAST_AFTER));
        let exports = requests_to(&server, EXPORT).await;
        assert_eq!(exports.len(), 2);
        assert!(exports[1].url.query_pairs().all(|(key, _)| key != "start_time"), "{}", exports[1].url);
    }

    #[tokio::test]
    async fn an_incremental_poll_with_nothing_new_returns_nothing_and_keeps_the_cursor() {
        for after_cursor in [Value::Null, LAST_AFTER.into()] {
            let server = MockServer::start().await;
            serve_export(&server, "cursor", LAST_AFTER, nothing_new(after_cursor.clone())).await;
            let source = source(config(&server));
            // A `since` does not move a stream that has a cursor.
            let pages = run(&source, stored(&at_end(LAST_AFTER)), Some(SINCE)).await;
            assert_eq!(pages.len(), 1, "{after_cursor}");
            assert!(pages[0].contributions.is_empty() && pages[0].quarantined.is_empty());
            assert_eq!(state(&pages[0]), at_end(LAST_AFTER));
            assert_eq!(requests_to(&server, "/api/v2/tickets/").await.len(), 0);
        }

        // A ticket Zendesk lists again unchanged comes back as it was: the ledger drops it.
        let server = MockServer::start().await;
        let mut again = single_page();
        tickets(&mut again)[0] = recorded_ticket(4045);
        again.body["after_cursor"] = LAST_AFTER.into();
        serve_export(&server, "start_time", &SINCE.to_string(), export("incremental_tickets_cursor").response()).await;
        serve_export(&server, "cursor", LAST_AFTER, again.response()).await;
        serve_no_comments(&server).await;
        let source = source(config(&server));
        let first = run(&source, None, Some(SINCE)).await;
        let second = run(&source, first.last().unwrap().next_cursor.clone(), None).await;
        assert_eq!(ids(&second[0]), ["ticket:4045"]);
        let before = find(&first, "ticket:4045");
        assert_eq!(&second[0].contributions[0], before);
        assert_eq!(second[0].contributions[0].content_hash(), before.content_hash());
        assert_eq!(state(second.last().unwrap()), at_end(LAST_AFTER));
    }

    #[tokio::test]
    async fn a_changed_ticket_is_an_update_of_the_same_contribution() {
        let cases = [
            ("status", json!({"status": "solved", "updated_at": "2023-09-19T09:00:00Z"})),
            (
                "subject and description",
                json!({"subject": "test: printer on fire", "raw_subject": "test: printer on fire",
                       "description": "It is on fire.", "updated_at": "2023-09-19T09:00:00Z"}),
            ),
        ];
        for (what, changes) in cases {
            let server = MockServer::start().await;
            let mut changed = single_page();
            for (key, value) in changes.as_object().unwrap() {
                ticket_mut(&mut changed, 28)[key] = value.clone();
            }
            changed.body["after_cursor"] = "MTY5NTExNDAwMC4wfHwyOHw=".into();
            serve_export(&server, "start_time", &SINCE.to_string(), single_page().response()).await;
            serve_export(&server, "cursor", FIRST_AFTER, changed.response()).await;
            serve_no_comments(&server).await;
            let source = source(config(&server));
            let first = run(&source, None, Some(SINCE)).await;
            let second = run(&source, first.last().unwrap().next_cursor.clone(), None).await;

            let (before, after) = (find(&first, "ticket:28"), find(&second, "ticket:28"));
            assert!(!before.edited && after.edited, "{what}");
            assert_eq!(after.updated_at, Some(at("2023-09-19T09:00:00Z")), "{what}");
            assert_eq!(after.created_at, before.created_at, "{what}");
            assert_ne!(after.content_hash(), before.content_hash(), "{what}: the daemon sends it again");
            if what == "status" {
                assert_eq!((after.title.as_deref(), after.body.as_str()), (Some("test"), "test"));
            } else {
                assert_eq!(
                    (after.title.as_deref(), after.body.as_str()),
                    (Some("test: printer on fire"), "It is on fire.")
                );
            }
            assert_eq!(state(second.last().unwrap()).after_cursor.as_deref(), Some("MTY5NTExNDAwMC4wfHwyOHw="));
            assert_eq!(requests_to(&server, "/api/v2/tickets/28/comments.json").await.len(), 2, "{what}");
        }
    }

    #[tokio::test]
    async fn a_deleted_ticket_is_returned_deleted_and_its_comments_are_not_fetched() {
        let server = MockServer::start().await;
        // Ticket 28 is deleted after the first poll; 4034 is the recorded deleted ticket.
        let mut deleted = single_page();
        ticket_mut(&mut deleted, 28)["status"] = "deleted".into();
        ticket_mut(&mut deleted, 28)["updated_at"] = "2023-09-20T10:00:00Z".into();
        tickets(&mut deleted).push(recorded_ticket(4034));
        tickets(&mut deleted).push(recorded_ticket(4045));
        deleted.body["after_cursor"] = LAST_AFTER.into();
        serve_export(&server, "start_time", &SINCE.to_string(), single_page().response()).await;
        serve_export(&server, "cursor", FIRST_AFTER, deleted.response()).await;
        serve_no_comments(&server).await;
        let source = source(config(&server));
        let first = run(&source, None, Some(SINCE)).await;
        let second = run(&source, first.last().unwrap().next_cursor.clone(), None).await;

        assert_eq!(ids(&second[0]), ["ticket:28", "ticket:4034", "ticket:4045"]);
        let flags: Vec<_> = second[0].contributions.iter().map(|c| c.deleted).collect();
        assert_eq!(flags, [true, true, false]);
        assert_eq!(find(&second, "ticket:28").title, find(&first, "ticket:28").title, "same contribution, now deleted");
        assert_eq!(state(&second[0]).pending, [PendingTicket { id: 4045, after: None }]);
        let comment_paths: Vec<_> =
            requests_to(&server, "/api/v2/tickets/").await.iter().map(|r| r.url.path().to_owned()).collect();
        assert_eq!(comment_paths, ["/api/v2/tickets/28/comments.json", "/api/v2/tickets/4045/comments.json"]);
    }

    #[tokio::test]
    async fn a_ticket_whose_comments_are_gone_is_skipped() {
        // The recorded 404 of a ticket that does not exist (RecordNotFound),
        // and the same answer as a 422.
        for status in [404, 422] {
            let server = MockServer::start().await;
            serve_export(&server, "start_time", &SINCE.to_string(), single_page().response()).await;
            let mut gone = Fixture::load("zendesk", "ticket_update_404");
            gone.status = status;
            serve_comments(&server, 28, gone.response()).await;
            let pages = run(&source(config(&server)), None, Some(SINCE)).await;
            assert_eq!(more(&pages), [true, false], "{status}");
            assert!(pages[1].contributions.is_empty() && pages[1].quarantined.is_empty());
            assert_eq!(state(&pages[1]), at_end(FIRST_AFTER));
        }
        // A refusal is not skipped: the page fails and the ticket stays queued.
        let server = MockServer::start().await;
        serve_comments(&server, 28, ResponseTemplate::new(403).set_body_json(json!({"error": "Forbidden"}))).await;
        let queued = ZendeskCursor { pending: [PendingTicket { id: 28, after: None }].into(), ..at_end(FIRST_AFTER) };
        let error = source(config(&server)).poll(&PollRequest { cursor: stored(&queued), since: None }).await;
        assert!(matches!(error, Err(SourceError::Auth(_))), "{error:?}");
    }

    /// A recorded Zendesk answer turned into a 429 with these headers.
    fn too_many(headers: &[(&str, &str)]) -> ResponseTemplate {
        let mut fixture = Fixture::load("zendesk", "ticket_update_404");
        fixture.status = 429;
        fixture.body = json!({"error": "APIRateLimitExceeded", "description": "Number of allowed API requests per minute exceeded"});
        fixture.headers.extend(headers.iter().map(|(name, value)| (name.to_string(), value.to_string())));
        fixture.response()
    }

    #[tokio::test]
    async fn a_429_is_honoured_and_no_request_leaves_before_retry_after() {
        // A long Retry-After goes back to the daemon; nothing is sent until it ends.
        let server = MockServer::start().await;
        Mock::given(method("GET")).respond_with(too_many(&[("retry-after", "3600")])).mount(&server).await;
        let limited = source(config(&server));
        for _ in 0..2 {
            match limited.poll(&PollRequest::default()).await.unwrap_err() {
                SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                    assert!(retry_after > Duration::from_secs(3590) && retry_after <= Duration::from_secs(3600))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(limited.check().await.is_err());
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "no request while Retry-After holds");

        // A short one is waited for inline, then the page comes.
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(EXPORT))
            .respond_with(too_many(&[("retry-after", "1")]))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        serve_export(&server, "start_time", &SINCE.to_string(), single_page().response()).await;
        let source = source(config(&server));
        let started = StdInstant::now();
        let since = DateTime::from_timestamp(SINCE, 0);
        let page = source.poll(&PollRequest { cursor: None, since }).await.unwrap();
        assert_eq!(ids(&page), ["ticket:28"]);
        assert!(started.elapsed() >= Duration::from_secs(1), "the retry left before Retry-After");
        assert_eq!(requests_to(&server, EXPORT).await.len(), 2);
    }

    #[tokio::test]
    async fn export_requests_keep_to_the_incremental_limit() {
        // 300 a minute: one every 200 ms.
        let server = MockServer::start().await;
        serve_export(&server, "cursor", LAST_AFTER, nothing_new(LAST_AFTER.into())).await;
        let mut config = config(&server);
        config.incremental_requests_per_minute = 300;
        let source = build(config, options()).unwrap();
        let request = PollRequest { cursor: stored(&at_end(LAST_AFTER)), since: None };
        let started = StdInstant::now();
        source.poll(&request).await.unwrap();
        source.poll(&request).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200), "the second export request left too early");
        assert_eq!(requests_to(&server, EXPORT).await.len(), 2);

        // The default, 10 a minute, is six seconds: longer than this client
        // waits inline, so the second poll is handed back without a request.
        let server = MockServer::start().await;
        serve_export(&server, "cursor", LAST_AFTER, nothing_new(LAST_AFTER.into())).await;
        let options = HttpOptions { max_inline_wait: Duration::from_secs(1), ..options() };
        let source = build(self::config(&server), options).unwrap();
        source.poll(&request).await.unwrap();
        match source.poll(&request).await.unwrap_err() {
            SourceError::Http(HttpError::RateLimited { retry_after, target, .. }) => {
                assert!(
                    retry_after > Duration::from_secs(5) && retry_after <= Duration::from_secs(6),
                    "{retry_after:?}"
                );
                assert!(target.ends_with(EXPORT), "{target}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(requests_to(&server, EXPORT).await.len(), 1);
    }

    fn recorded_headers(name: &str, extra: &[(&str, &str)]) -> HttpResponse {
        let fixture = Fixture::load("zendesk", name);
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in fixture.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).chain(extra.iter().copied())
        {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        HttpResponse {
            status: reqwest::StatusCode::OK,
            headers,
            body: Vec::new(),
            target: "https://example.zendesk.com/api/v2/x".into(),
        }
    }

    #[test]
    fn spent_zendesk_budgets_are_read_from_every_header_family() {
        type Extra<'a> = &'a [(&'a str, &'a str)];
        let cases: [(&str, Extra<'_>, Option<u64>); 8] = [
            // As recorded: plenty left.
            ("incremental_tickets_cursor", &[], None),
            ("ticket_comment_attachment_redact", &[], None),
            ("ticket_update_404", &[], None),
            // Endpoint budgets: `total=..; remaining=..; resets=..`.
            ("ticket_comments", &[("zendesk-ratelimit-tickets-index", "total=100; remaining=0; resets=41")], Some(41)),
            (
                "ticket_comment_attachment_redact",
                &[("zendesk-ratelimit-per-ticket-updates", "total=30; remaining=0")],
                Some(60),
            ),
            // `x-rate-limit-remaining` spent; `ratelimit-reset` (12 as recorded) names the reset.
            ("incremental_tickets_cursor", &[("x-rate-limit-remaining", "0")], Some(12)),
            // The older `rate-limit-*` family of the 404 recording.
            ("ticket_update_404", &[("rate-limit-remaining", "0")], Some(59)),
            ("ticket_update_404", &[("zendesk-ratelimit-x", "remaining=nan; resets=inf")], None),
        ];
        for (name, extra, expected) in cases {
            let wait = spent_budget_wait(&recorded_headers(name, extra));
            assert_eq!(wait.map(|w| w.as_secs()), expected, "{name} {extra:?}");
        }
        // A spent count without any reset holds Zendesk's minute.
        let mut bare = recorded_headers("ticket_comments", &[("x-rate-limit-remaining", "0")]);
        bare.headers.remove("ratelimit-reset");
        assert_eq!(spent_budget_wait(&bare), Some(WINDOW));
        assert_eq!(parse_zendesk_limit("total=100; remaining=99; resets=41"), Some((99.0, Some(41.0))));
        assert_eq!(parse_zendesk_limit("garbage"), None);
    }

    #[tokio::test]
    async fn a_spent_endpoint_budget_holds_the_next_request() {
        let server = MockServer::start().await;
        let mut page = single_page();
        page.headers
            .push(("zendesk-ratelimit-incremental-exports".into(), "total=10; remaining=0; resets=3600".into()));
        serve_export(&server, "start_time", &SINCE.to_string(), page.response()).await;
        serve_no_comments(&server).await;
        let source = source(config(&server));
        let since = DateTime::from_timestamp(SINCE, 0);
        let first = source.poll(&PollRequest { cursor: None, since }).await.unwrap();
        assert_eq!(ids(&first), ["ticket:28"], "the page that spent the budget is kept");
        let next = PollRequest { cursor: first.next_cursor.clone(), since: None };
        match source.poll(&next).await.unwrap_err() {
            SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                assert!(retry_after > Duration::from_secs(3590), "{retry_after:?}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn malformed_items_are_quarantined_and_the_rest_of_the_page_goes_on() {
        let server = MockServer::start().await;
        let mut page = export("incremental_tickets_cursor");
        ticket_mut(&mut page, 29).as_object_mut().unwrap().remove("id");
        ticket_mut(&mut page, 30)["created_at"] = "yesterday".into();
        ticket_mut(&mut page, 31)["tags"] = "urgent".into();
        serve_export(&server, "start_time", &SINCE.to_string(), page.response()).await;
        let since = DateTime::from_timestamp(SINCE, 0);
        let first = source(config(&server)).poll(&PollRequest { cursor: None, since }).await.unwrap();
        assert_eq!(first.contributions.len(), 84);
        let quarantined: Vec<_> = first.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [None, Some("ticket:30"), Some("ticket:31")]);
        assert!(first.quarantined[0].reason.contains("id"), "{}", first.quarantined[0].reason);
        assert!(first.quarantined[1].reason.contains("`created_at` `yesterday`"), "{}", first.quarantined[1].reason);
        assert!(first.quarantined[2].raw.contains("\"urgent\""));
        assert_eq!(state(&first).pending.len(), 83, "only mapped, undeleted tickets wait for comments");

        // Comments: a public one without `created_at` is quarantined; a
        // broken private note is dropped unread.
        let server = MockServer::start().await;
        let mut broken = comments();
        broken.body["comments"][1].as_object_mut().unwrap().remove("created_at");
        broken.body["comments"][2]["created_at"] = json!(17);
        let mut extra = broken.body["comments"][1].clone();
        extra["id"] = 33144692244800_u64.into();
        extra["created_at"] = "2024-09-07T08:00:00Z".into();
        broken.body["comments"].as_array_mut().unwrap().push(extra);
        serve_export(&server, "start_time", &SINCE.to_string(), single_page().response()).await;
        serve_comments(&server, 28, broken.response()).await;
        let pages = run(&source(config(&server)), None, Some(SINCE)).await;
        assert_eq!(ids(&pages[1]), ["comment:33144692244800"]);
        let quarantined: Vec<_> = pages[1].quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [Some("comment:33144692244600")]);
        assert!(pages[1].quarantined[0].reason.contains("created_at"), "{}", pages[1].quarantined[0].reason);
        assert!(pages.iter().all(|page| page.quarantined.iter().all(|q| !q.raw.contains("legacy plan"))));
    }

    #[tokio::test]
    async fn an_answer_that_is_not_an_export_is_a_decode_error() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(EXPORT))
            .respond_with(ResponseTemplate::new(200).set_body_string("<html>Help Center</html>"))
            .mount(&server)
            .await;
        match source(config(&server)).poll(&PollRequest::default()).await.unwrap_err() {
            SourceError::Decode(message) => assert!(message.contains(EXPORT), "{message}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_redacted_comment_is_an_edit_and_a_redacted_attachment_is_no_change() {
        let server_uri = "https://z3npuddn.zendesk.com";
        let config: ZendeskConfig =
            serde_json::from_value(json!({"base_url": server_uri, "email": EMAIL, "api_token": secret_file(TOKEN)}))
                .unwrap();
        let source = build(config, options()).unwrap();
        let fixture = comments();
        let users = users_by_id(fixture.body["users"].as_array().cloned());
        let recorded = fixture.body["comments"][0].clone();
        let original = source.comment(33, &recorded, &users).unwrap();

        // The attachment redacted (the recorded answer of the redact call, as
        // Zendesk then shows it: `redacted.txt`): nothing this source reads changed.
        let mut attachment = Fixture::load("zendesk", "ticket_comment_attachment_redact").body["attachment"].clone();
        attachment["file_name"] = "redacted.txt".into();
        attachment["content_type"] = "text/plain".into();
        let mut without_attachment = recorded.clone();
        without_attachment["attachments"] = json!([attachment]);
        let same = source.comment(33, &without_attachment, &users).unwrap();
        assert_eq!(same, original);
        assert_eq!(same.content_hash(), original.content_hash());

        // Text redacted: the same comment, changed and edited, not deleted.
        let mut redacted = recorded;
        redacted["body"] = "Some ▇▇▇▇▇▇▇".into();
        redacted["plain_body"] = "Some ▇▇▇▇▇▇▇".into();
        redacted["html_body"] = "<div class=\"zd-comment\"><p>Some ▇▇▇▇▇▇▇</p></div>".into();
        let changed = source.comment(33, &redacted, &users).unwrap();
        assert_eq!(changed.external_id, original.external_id);
        assert_eq!(changed.body, "Some ▇▇▇▇▇▇▇");
        assert!(changed.edited && !changed.deleted && !original.edited);
        assert_ne!(changed.content_hash(), original.content_hash());
        assert_eq!(original.author.email.as_deref(), Some("jteitelbaum@zendesk.com"));
        assert_eq!(original.url.as_deref(), Some("https://z3npuddn.zendesk.com/agent/tickets/33"));
    }

    /// `GET /api/v2/users/me.json` answers: made up (no recording of this
    /// endpoint), in the shape of Zendesk's "Show the Currently Authenticated User".
    fn me(id: Value, role: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(json!({"user": {"id": id, "name": "Ada Admin", "role": role}}))
    }

    #[tokio::test]
    async fn check_wants_an_admin_and_refused_credentials_are_auth() {
        let cases = [
            (me(json!(MAIN_REQUESTER), "admin"), None),
            (me(json!(MAIN_REQUESTER), "agent"), Some("role `agent`")),
            (me(Value::Null, "end-user"), Some("anonymous")),
            (
                ResponseTemplate::new(401).set_body_json(json!({"error": "Couldn't authenticate you"})),
                Some("Couldn't authenticate you"),
            ),
        ];
        for (response, refusal) in cases {
            let server = MockServer::start().await;
            Mock::given(method("GET"))
                .and(path("/api/v2/users/me.json"))
                .and(header("authorization", BASIC))
                .respond_with(response)
                .expect(1)
                .mount(&server)
                .await;
            let result = source(config(&server)).check().await;
            match (result, refusal) {
                (Ok(()), None) => {}
                (Err(SourceError::Auth(message)), Some(expected)) => {
                    assert!(message.contains(expected), "{message}");
                    assert!(!message.contains(TOKEN) && !message.contains(&BASIC[6..]), "{message}");
                }
                (other, expected) => panic!("expected {expected:?}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn secrets_are_sent_as_headers_and_never_shown() {
        let server = MockServer::start().await;
        let bearer = "zd-oauth-3a8f0e6a1c5b4d2f9e7c";
        Mock::given(method("GET"))
            .and(path("/api/v2/users/me.json"))
            .and(header("authorization", format!("Bearer {bearer}").as_str()))
            .respond_with(me(json!(MAIN_REQUESTER), "admin"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(EXPORT))
            .respond_with(ResponseTemplate::new(403).set_body_json(json!({"error": "Forbidden"})))
            .mount(&server)
            .await;
        let oauth: ZendeskConfig =
            serde_json::from_value(json!({"base_url": server.uri(), "oauth_token": secret_file(bearer)})).unwrap();
        let oauth = source(oauth);
        oauth.check().await.unwrap();
        let refused = oauth.poll(&PollRequest::default()).await.unwrap_err();
        assert!(matches!(refused, SourceError::Auth(_)), "{refused:?}");

        let token = source(config(&server));
        let shown = [
            format!("{oauth:?}"),
            format!("{token:?}"),
            format!("{:?}", token.config),
            refused.to_string(),
            token.poll(&PollRequest::default()).await.unwrap_err().to_string(),
        ];
        for text in shown {
            for secret in [bearer, TOKEN, &BASIC[6..]] {
                assert!(!text.contains(secret), "a secret leaked: {text}");
            }
        }
    }

    #[test]
    fn config_has_defaults_validates_and_names_its_keys() {
        let config: ZendeskConfig = toml::from_str(
            r#"
            subdomain = "acme"
            email = "admin@acme.example"
            api_token = { env = "ZENDESK_API_TOKEN" }
            "#,
        )
        .unwrap();
        assert!(!config.include_private_comments);
        assert_eq!(
            (
                config.initial_lookback_days,
                config.per_page,
                config.comments_per_page,
                config.incremental_requests_per_minute
            ),
            (30, 100, 100, 10)
        );
        let key = config.credential_key();
        assert!(key.contains("https://acme.zendesk.com") && key.contains("ZENDESK_API_TOKEN"), "{key}");
        let other = ZendeskConfig { email: Some("other@acme.example".into()), ..config.clone() };
        assert_ne!(other.credential_key(), key, "another user is another credential");
        for unknown in ["token = \"x\"", "schedule = \"every 5m\"", "private_comments = true"] {
            let text = format!("subdomain = \"acme\"\n{unknown}");
            assert!(toml::from_str::<ZendeskConfig>(&text).is_err(), "{unknown}");
        }

        // A file secret builds; the address comes from the subdomain.
        let good = ZendeskConfig { api_token: Some(secret_file(TOKEN)), ..config.clone() };
        let source = ZendeskSource::new("zd", good.clone(), HttpOptions::default()).unwrap();
        assert_eq!(source.platform(), "zendesk");
        assert_eq!(source.export_spacing, Duration::from_secs(6));
        let cursor = ZendeskCursor { start_time: Some(SINCE), ..ZendeskCursor::default() };
        assert_eq!(
            source.export_url(&cursor).as_str(),
            "https://acme.zendesk.com/api/v2/incremental/tickets/cursor.json?start_time=1693526400&include=users&per_page=100"
        );
        assert_eq!(
            source.comments_url(&PendingTicket { id: 7, after: Some("a+b=".into()) }).as_str(),
            "https://acme.zendesk.com/api/v2/tickets/7/comments.json?include=users&page%5Bsize%5D=100&page%5Bafter%5D=a%2Bb%3D"
        );
        // Start times: `since`, else the lookback; never within the last minute.
        let now = Utc::now().timestamp();
        assert_eq!(source.start_time(DateTime::from_timestamp(SINCE, 0)), SINCE);
        assert!((now - 30 * 86_400 - source.start_time(None)).abs() <= 2);
        assert!(source.start_time(Some(Utc::now())) <= now - 60);
        assert_eq!(source.start_time(DateTime::from_timestamp(-5, 0)), 0);

        let unset = SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into());
        let oauth = Some(secret_file("abc"));
        let cases: Vec<(ZendeskConfig, &str)> = vec![
            (ZendeskConfig { subdomain: None, ..good.clone() }, "`subdomain`"),
            (ZendeskConfig { base_url: Some("https://acme.zendesk.com".into()), ..good.clone() }, "not both"),
            (ZendeskConfig { subdomain: Some("acme.zendesk.com".into()), ..good.clone() }, "`subdomain`"),
            (
                ZendeskConfig { subdomain: None, base_url: Some("acme.zendesk.com".into()), ..good.clone() },
                "`base_url`",
            ),
            (ZendeskConfig { email: None, api_token: None, ..good.clone() }, "`oauth_token`"),
            (ZendeskConfig { oauth_token: oauth.clone(), ..good.clone() }, "not both"),
            (ZendeskConfig { email: None, ..good.clone() }, "`email`"),
            (ZendeskConfig { api_token: None, oauth_token: oauth.clone(), ..good.clone() }, "`email` is only used"),
            (ZendeskConfig { email: Some("admin".into()), ..good.clone() }, "`email`"),
            (ZendeskConfig { api_token: Some(unset), ..good.clone() }, "`api_token`: environment variable"),
            (ZendeskConfig { per_page: 0, ..good.clone() }, "`per_page`"),
            (ZendeskConfig { per_page: 1001, ..good.clone() }, "`per_page`"),
            (ZendeskConfig { comments_per_page: 101, ..good.clone() }, "`comments_per_page`"),
            (ZendeskConfig { incremental_requests_per_minute: 0, ..good.clone() }, "`incremental_requests_per_minute`"),
        ];
        for (config, expected) in cases {
            let error = ZendeskSource::new("zd", config, HttpOptions::default()).unwrap_err();
            assert!(error.to_string().contains(expected), "{error} does not name {expected}");
        }
        forget(&ZendeskConfig { oauth_token: oauth, ..good });
    }

    #[tokio::test]
    async fn an_unreadable_cursor_starts_over() {
        let server = MockServer::start().await;
        serve_export(&server, "start_time", &SINCE.to_string(), single_page().response()).await;
        serve_no_comments(&server).await;
        let pages = run(&source(config(&server)), Some(Cursor("{\"pending\": 7}".into())), Some(SINCE)).await;
        assert_eq!(ids(&pages[0]), ["ticket:28"]);
        assert_eq!(state(pages.last().unwrap()), at_end(FIRST_AFTER));
    }
}
