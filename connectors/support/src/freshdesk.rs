//! Freshdesk (API v2): the tickets of one helpdesk, their conversations
//! (replies and, when asked, private notes), and the tickets deleted since.
//!
//! Sources: the Freshdesk API v2 reference (developers.freshdesk.com/api:
//! "List All Tickets", "List All Conversations of a Ticket", "Pagination",
//! "Rate limit"), Freshdesk's support article "What are the rate limits for
//! the API calls to Freshdesk?", and two long-running open-source syncs that
//! rely on the same behaviour (singer-io/tap-freshdesk pairs
//! `filter=deleted` with `updated_since` and `order_by=updated_at`;
//! airbyte's source-freshdesk restarts from `updated_since` at the page cap).
//!
//! **Streams.** Two ticket streams, polled the same way:
//! `GET /api/v2/tickets?updated_since=W&order_by=updated_at&order_type=asc&per_page=100&page=P&include=requester,description`
//! (live tickets) and the same with `filter=deleted` (tickets in the trash,
//! which the plain list hides). `include=requester` embeds the requester's
//! id, name and e-mail; `include=description` is needed for the description
//! on accounts created after 2018-11-30. Each include costs Freshdesk
//! credits (see rate limits below). Without `updated_since` the list only
//! covers tickets created in the last 30 days, so it is always sent.
//!
//! **Incremental model.** Each stream keeps `top`, the newest `updated_at`
//! it has taken. A *pass* asks `updated_since = top - 1 s` (whole seconds;
//! going back one second holds whether Freshdesk compares with `>` or `>=`)
//! and pages by that key rather than by page number: after a page whose
//! `Link` header has `rel="next"`, the next request asks
//! `updated_since = top - 1 s, page=1` again. A page number over an
//! `updated_at`-sorted list shifts whenever a listed ticket is updated and
//! moves to the end, which would skip the ticket sliding into its place;
//! re-asking from the key cannot. Only when the key does not move (a whole
//! page within those two seconds, e.g. a bulk update) does the pass page by
//! number, and Freshdesk stops the list at page 300 (30,000 tickets): there
//! the pass restarts one second further on and logs what it could not reach.
//! A pass ends on a page without `rel="next"`. The boundary tickets come back
//! once more; the stream remembers the `(id, updated_at)` of the tickets it
//! took in the last two seconds and skips exactly those, so an unchanged
//! ticket is neither sent again nor has its conversations fetched again.
//! (A ticket changed twice within one second, after the first change was
//! taken, keeps its first version until its next change.)
//!
//! The first pass of a stream starts at [`PollRequest::since`] (kept in the
//! cursor for both streams), else 30 days back (the window Freshdesk itself
//! lists without `updated_since`).
//!
//! **Conversations.** Freshdesk has no incremental conversation feed, but
//! a new reply or note moves its ticket's `updated_at` (the syncs named
//! above rely on it too). So every live ticket taken is queued in the
//! cursor, and its conversations are fetched with
//! `GET /api/v2/tickets/{id}/conversations?per_page=100&page=P` (following
//! `rel="next"`), one page per poll, before the next ticket page. Unchanged
//! conversations come back unchanged and the daemon's ledger drops them; an
//! edited note whose edit does not move its ticket is picked up with the
//! ticket's next change. Private notes (`private: true`) are taken only
//! with [`FreshdeskConfig::include_private_notes`]. A ticket whose
//! conversations answer 404 (deleted meanwhile) is dropped from the queue.
//!
//! **Rounds.** Each [`Source::poll`] fetches one page: the next
//! conversation page while the queue is not empty, else the next page of the
//! live tickets, then (once the live pass is over and the queue drained) the
//! next page of the deleted tickets. `has_more` stays set until the deleted
//! pass ends, which ends the round.
//!
//! **Mapping.** A ticket is [`Kind::Ticket`] `ticket:{id}`: title = subject,
//! body = the description as plain text, url = the agent's page
//! (`{base}/a/tickets/{id}`), author = the requester (`id`, `name`,
//! `email` from `include=requester`), tags = the ticket's tags, thread = the
//! ticket itself. Every change moves `updated_at`, so the ticket is sent
//! again with its new content; Freshdesk does not say whether the
//! description was edited, so tickets are never marked `edited`. A
//! conversation is [`Kind::TicketComment`] `conversation:{id}`, parent and
//! thread `ticket:{id}`, url the ticket's page, author id = `user_id`, and
//! `edited` when `updated_at` is more than a minute after `created_at`.
//! Its e-mail identifies a person only in some cases, which are the only
//! ones used: a conversation by the ticket's requester (`user_id` equals the
//! requester's id) carries the requester's e-mail and name; an *incoming*
//! one (sent by a customer, e.g. someone in CC) carries the address and name
//! of its `from_email` (`Name <address>`). An agent's reply or note carries
//! no e-mail: its `from_email` is the helpdesk's support mailbox, shared by
//! every agent, and would merge them all into one CRM contact.
//!
//! **Deletions.** Tickets from the `filter=deleted` stream are sent with
//! `deleted = true` (same `ticket:{id}`, so the daemon applies the source's
//! `on_delete`). Their conversations are not fetched nor marked: they stay
//! as last sent. A ticket restored from the trash moves its `updated_at` and
//! comes back from the live stream with `deleted = false`. Spam tickets
//! (`filter=spam`) are not read: a ticket marked as spam just stops changing.
//!
//! **Auth.** HTTP Basic with the API key as user name and `X` as password
//! (marked sensitive: never logged or shown).
//!
//! **Rate limits.** Per account, per minute by plan (e.g. Growth 200, Pro
//! 400, Enterprise 700 calls, with lower caps on the ticket list); each
//! include costs 2 more credits. Every answer carries `X-RateLimit-Total`,
//! `X-RateLimit-Remaining` and `X-RateLimit-Used-CurrentRequest`, and no
//! reset time; a 429 carries `Retry-After`, which the shared client honours
//! (it waits inline up to its limit, else the poll returns
//! [`HttpError::RateLimited`] and no request leaves before the time named).
//! The shared client paces only on headers with a reset time, so this source
//! reads Freshdesk's itself and holds the client's budget (every source on
//! the same key): when what is left cannot pay for another request like the
//! last one, for a minute; under a quarter left, for a minute spread over
//! the requests that are left.

use std::{cmp::max, collections::VecDeque, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use reqwest::{StatusCode, header::ACCEPT};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, SecretError, SecretRef, Source, SourceError,
    source::check_status,
    text::{html_to_text, tidy},
};
use url::Url;

const PLATFORM: &str = "freshdesk";

/// Freshdesk stops a list at this page (300 pages of 100: 30,000 items).
const MAX_PAGE: u32 = 300;

/// What the ticket lists embed: the requester, and the description.
const INCLUDE: &str = "requester,description";

/// How far back a first pass looks without [`PollRequest::since`]: the
/// window Freshdesk lists without `updated_since`.
const FIRST_POLL_LOOKBACK_DAYS: i64 = 30;

/// A conversation updated this long after it was created counts as edited.
const EDIT_GRACE_SECONDS: i64 = 60;

/// Freshdesk's rate-limit window; its headers name no reset time.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The most `(id, updated_at)` pairs a stream remembers at its boundary.
const MAX_SEEN: usize = 1000;

/// Settings of one Freshdesk helpdesk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreshdeskConfig {
    /// The helpdesk's subdomain: `acme` for `https://acme.freshdesk.com`
    /// (`acme.freshdesk.com` is accepted too). Set this or `base_url`.
    #[serde(default)]
    pub domain: Option<String>,
    /// The helpdesk's root URL instead of `domain`, e.g.
    /// `https://acme.freshdesk.com` (a proxy, or a test server);
    /// `/api/v2/...` is appended to it.
    #[serde(default)]
    pub base_url: Option<String>,
    /// An agent's API key (`{ env = "..." }` or `{ file = "..." }`; in
    /// Freshdesk: profile settings, "View API key"). It sees what that agent
    /// sees.
    pub api_key: SecretRef,
    /// Also take private notes (agents' internal notes on a ticket); by
    /// default only public replies and notes are taken.
    #[serde(default)]
    pub include_private_notes: bool,
    /// Tickets, and conversations, per page: 1 to 100 (Freshdesk's maximum).
    #[serde(default = "default_per_page")]
    pub per_page: u32,
}

fn default_per_page() -> u32 {
    100
}

impl FreshdeskConfig {
    /// Sources on one key share one rate budget (Freshdesk counts calls per
    /// account): the helpdesk and the key's *reference*, never its value.
    pub fn credential_key(&self) -> String {
        let root = match self.root() {
            Ok(root) => root.to_string(),
            Err(_) => format!("{:?} {:?}", self.domain, self.base_url),
        };
        format!("freshdesk {root} {:?}", self.api_key)
    }

    /// The helpdesk's root URL, from `domain` or `base_url`.
    fn root(&self) -> Result<Url, BuildError> {
        match (&self.domain, &self.base_url) {
            (Some(_), Some(_)) => Err(BuildError::DomainAndBaseUrl),
            (None, None) => Err(BuildError::NoDomain),
            (Some(domain), None) => {
                let name = domain.trim().to_ascii_lowercase();
                let name = name.strip_suffix(".freshdesk.com").unwrap_or(&name);
                let valid = !name.is_empty()
                    && !name.starts_with('-')
                    && !name.ends_with('-')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
                if !valid {
                    return Err(BuildError::InvalidDomain(domain.clone()));
                }
                Url::parse(&format!("https://{name}.freshdesk.com/"))
                    .map_err(|_| BuildError::InvalidDomain(domain.clone()))
            }
            (None, Some(base_url)) => Url::parse(base_url.trim())
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base() && url.has_host())
                .map(|mut url| {
                    url.set_query(None);
                    url.set_fragment(None);
                    url
                })
                .ok_or_else(|| BuildError::InvalidBaseUrl(base_url.clone())),
        }
    }
}

/// Why a [`FreshdeskSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("freshdesk `api_key`: {0}")]
    Secret(#[from] SecretError),
    #[error("freshdesk `api_key` is blank or holds a colon, a space or a control character")]
    InvalidApiKey,
    #[error("freshdesk: set `domain` (e.g. `acme` for acme.freshdesk.com) or `base_url`")]
    NoDomain,
    #[error("freshdesk: set `domain` or `base_url`, not both")]
    DomainAndBaseUrl,
    #[error("freshdesk `domain` must be a Freshdesk subdomain such as `acme`, not `{0}`")]
    InvalidDomain(String),
    #[error("freshdesk `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("freshdesk `per_page` must be between 1 and 100, not {0}")]
    InvalidPerPage(u32),
    #[error("freshdesk HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// The tickets and conversations of one Freshdesk helpdesk.
pub struct FreshdeskSource {
    instance: String,
    config: FreshdeskConfig,
    root: Url,
    http: HttpClient,
    api_key: SecretString,
}

impl std::fmt::Debug for FreshdeskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreshdeskSource")
            .field("instance", &self.instance)
            .field("root", &self.root.as_str())
            .field("include_private_notes", &self.config.include_private_notes)
            .field("per_page", &self.config.per_page)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

/// The live tickets, or those in the trash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Stream {
    Tickets,
    Deleted,
}

/// What the cursor of a Freshdesk source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FreshdeskCursor {
    /// The oldest change a stream's first pass asks for: the
    /// [`PollRequest::since`] of the first poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<DateTime<Utc>>,
    #[serde(default)]
    tickets: StreamCursor,
    #[serde(default)]
    deleted: StreamCursor,
    /// Live tickets whose conversations are still to be fetched, in order.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    conversations: VecDeque<Pending>,
    /// The ticket stream the round in progress is at; absent between rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    round: Option<Stream>,
}

impl FreshdeskCursor {
    fn stream_mut(&mut self, stream: Stream) -> &mut StreamCursor {
        match stream {
            Stream::Tickets => &mut self.tickets,
            Stream::Deleted => &mut self.deleted,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StreamCursor {
    /// The newest `updated_at` this stream has taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<DateTime<Utc>>,
    /// The tickets taken in the last two seconds up to `top`: skipped when
    /// they come back unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen: Vec<Seen>,
    /// The pass in progress, while paging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<Pass>,
}

impl StreamCursor {
    fn has_seen(&self, id: u64, updated_at: DateTime<Utc>) -> bool {
        self.seen.iter().any(|seen| seen.id == id && seen.updated_at == updated_at)
    }

    fn take(&mut self, id: Option<u64>, updated_at: Option<DateTime<Utc>>) {
        self.top = max(self.top, updated_at);
        if let (Some(id), Some(updated_at)) = (id, updated_at)
            && !self.has_seen(id, updated_at)
        {
            self.seen.push(Seen { id, updated_at });
        }
    }

    /// Forgets what cannot come back unchanged any more: older than `top - 1 s`.
    fn prune(&mut self) {
        if let Some(top) = self.top {
            let horizon = top - TimeDelta::seconds(1);
            self.seen.retain(|seen| seen.updated_at >= horizon);
        }
        if self.seen.len() > MAX_SEEN {
            self.seen.sort_by_key(|seen| seen.updated_at);
            let excess = self.seen.len() - MAX_SEEN;
            self.seen.drain(..excess);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    id: u64,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pass {
    /// The `updated_since` of this pass's requests.
    since: DateTime<Utc>,
    page: u32,
}

/// A ticket whose conversations are to be fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    ticket: u64,
    page: u32,
    /// Who asked: their conversations carry their e-mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    requester: Option<Person>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Person {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
}

impl FreshdeskSource {
    pub fn new(instance: &str, config: FreshdeskConfig, http: HttpOptions) -> Result<FreshdeskSource, BuildError> {
        let root = config.root()?;
        if !(1..=100).contains(&config.per_page) {
            return Err(BuildError::InvalidPerPage(config.per_page));
        }
        let key = config.api_key.resolve()?;
        let key = key.expose_secret().trim();
        if key.is_empty() || key.chars().any(|c| c == ':' || c.is_whitespace() || c.is_control()) {
            return Err(BuildError::InvalidApiKey);
        }
        Ok(FreshdeskSource {
            instance: instance.to_owned(),
            api_key: SecretString::from(key.to_owned()),
            http: HttpClient::new(http)?,
            config,
            root,
        })
    }

    /// The root URL with `segments` appended as path segments (encoded).
    fn endpoint(&self, segments: &[&str]) -> Url {
        tributary_sdk::source::endpoint(&self.root, segments)
    }

    /// One page of a ticket stream, oldest change first from `since`.
    fn list_url(&self, stream: Stream, since: DateTime<Utc>, page: u32) -> Url {
        let mut url = self.endpoint(&["api", "v2", "tickets"]);
        {
            let mut query = url.query_pairs_mut();
            if stream == Stream::Deleted {
                query.append_pair("filter", "deleted");
            }
            // Whole seconds: truncating can only go back, never skip.
            query
                .append_pair("updated_since", &since.to_rfc3339_opts(SecondsFormat::Secs, true))
                .append_pair("order_by", "updated_at")
                .append_pair("order_type", "asc")
                .append_pair("per_page", &self.config.per_page.to_string())
                .append_pair("page", &page.to_string())
                .append_pair("include", INCLUDE);
        }
        url
    }

    fn conversations_url(&self, ticket: u64, page: u32) -> Url {
        let mut url = self.endpoint(&["api", "v2", "tickets", &ticket.to_string(), "conversations"]);
        url.query_pairs_mut()
            .append_pair("per_page", &self.config.per_page.to_string())
            .append_pair("page", &page.to_string());
        url
    }

    /// The agent's page of a ticket.
    fn web_url(&self, ticket: u64) -> String {
        self.endpoint(&["a", "tickets", &ticket.to_string()]).to_string()
    }

    /// One authenticated GET. 429 and its `Retry-After` are the shared
    /// client's; Freshdesk's budget headers are read here.
    async fn get(&self, url: Url) -> Result<HttpResponse, SourceError> {
        let request =
            self.http.get(url).basic_auth(self.api_key.expose_secret(), Some("X")).header(ACCEPT, "application/json");
        let response = match self.http.send(request).await {
            Ok(response) => response,
            Err(HttpError::RateLimited { target, retry_after, body }) => {
                // A 429 without Retry-After leaves the budget open: close it.
                self.http.hold(retry_after);
                return Err(HttpError::RateLimited { target, retry_after, body }.into());
            }
            Err(error) => return Err(error.into()),
        };
        self.pace(&response);
        Ok(response)
    }

    /// Holds the budget as Freshdesk's headers ask; see the module docs.
    fn pace(&self, response: &HttpResponse) {
        let Some(remaining) = header_number(response, "x-ratelimit-remaining") else {
            return;
        };
        let total = header_number(response, "x-ratelimit-total");
        let used = header_number(response, "x-ratelimit-used-currentrequest");
        if let Some(wait) = budget_hold(total, remaining, used) {
            tracing::debug!(
                source = %self.instance, remaining, ?total, ?used, wait_ms = wait.as_millis() as u64,
                "freshdesk rate budget low; pacing"
            );
            self.http.hold(wait);
        }
    }

    /// One page of a list: its raw items and whether `Link` names a next page.
    async fn fetch_list(&self, url: Url) -> Result<(Vec<Value>, bool), SourceError> {
        let response = self.get(url).await?;
        check_status(&response)?;
        read_list(&response)
    }

    async fn poll_conversations(&self, cursor: &mut FreshdeskCursor, pending: Pending) -> Result<Page, SourceError> {
        let response = self.get(self.conversations_url(pending.ticket, pending.page)).await?;
        if response.status == StatusCode::NOT_FOUND {
            tracing::warn!(
                source = %self.instance, ticket = pending.ticket,
                "freshdesk ticket gone before its conversations were read; skipped"
            );
            cursor.conversations.pop_front();
            return Ok(Page::default());
        }
        check_status(&response)?;
        let (items, next) = read_list(&response)?;
        let more = next && !items.is_empty() && pending.page < MAX_PAGE;
        let page = self.read_conversations(&pending, items);
        match cursor.conversations.front_mut() {
            Some(front) if more => front.page += 1,
            _ => {
                cursor.conversations.pop_front();
            }
        }
        Ok(page)
    }

    /// One page of a ticket stream; returns it and whether the pass is over.
    async fn poll_tickets(&self, cursor: &mut FreshdeskCursor, stream: Stream) -> Result<(Page, bool), SourceError> {
        let since = cursor.since;
        let mut state = cursor.stream_mut(stream).clone();
        let pass = state.pass.clone().unwrap_or_else(|| Pass { since: first_since(state.top, since), page: 1 });
        let (items, next) = self.fetch_list(self.list_url(stream, pass.since, pass.page)).await?;
        let fetched = items.len();
        let (page, pending) = self.read_tickets(stream, items, &mut state);
        if stream == Stream::Tickets {
            cursor.conversations.extend(pending);
        }
        let has_next = next && fetched > 0;
        state.pass = next_pass(&pass, state.top, has_next);
        let capped =
            has_next && pass.page >= MAX_PAGE && state.top.is_some_and(|top| top - TimeDelta::seconds(1) <= pass.since);
        if capped {
            tracing::warn!(
                source = %self.instance, ?stream, since = %pass.since,
                "freshdesk: more than 30,000 tickets changed within two seconds; those past page 300 are skipped"
            );
        }
        let done = state.pass.is_none();
        tracing::debug!(
            source = %self.instance, ?stream, page = pass.page, fetched, contributions = page.contributions.len(),
            quarantined = page.quarantined.len(), done, top = ?state.top, "freshdesk ticket page polled"
        );
        *cursor.stream_mut(stream) = state;
        Ok((page, done))
    }

    /// Maps a page of tickets, skipping those taken before unchanged;
    /// returns the page and the live tickets whose conversations to fetch.
    fn read_tickets(&self, stream: Stream, items: Vec<Value>, state: &mut StreamCursor) -> (Page, Vec<Pending>) {
        let mut page = Page::default();
        let mut pending = Vec::new();
        for item in items {
            let id = item.get("id").and_then(Value::as_u64);
            let updated_at = timestamp(&item, "updated_at");
            if let (Some(id), Some(updated_at)) = (id, updated_at)
                && state.has_seen(id, updated_at)
            {
                continue;
            }
            state.take(id, updated_at);
            match serde_json::from_value::<RawTicket>(item.clone()) {
                Ok(ticket) => {
                    let contribution = self.ticket(stream, &ticket);
                    if stream == Stream::Tickets && !contribution.deleted {
                        pending.push(Pending { ticket: ticket.id, page: 1, requester: Some(requester(&ticket)) });
                    }
                    page.contributions.push(contribution);
                }
                Err(error) => {
                    let raw = serde_json::to_string(&item).unwrap_or_default();
                    let reason = format!("cannot read the ticket: {error}");
                    page.quarantined.push(Quarantined::new(id.map(|id| format!("ticket:{id}")), reason, &raw));
                }
            }
        }
        state.prune();
        (page, pending)
    }

    fn ticket(&self, stream: Stream, ticket: &RawTicket) -> Contribution {
        let person = requester(ticket);
        let external_id = format!("ticket:{}", ticket.id);
        let tags = ticket
            .tags
            .iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::trim)
            .filter(|tag| !tag.is_empty())
            .map(str::to_owned)
            .collect();
        Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: external_id.clone(),
            url: Some(self.web_url(ticket.id)),
            kind: Kind::Ticket,
            author: Author {
                id: person.id.map(|id| id.to_string()).unwrap_or_default(),
                handle: None,
                display_name: person.name,
                email: person.email,
                profile_url: None,
                links: Vec::new(),
            },
            title: ticket.subject.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned),
            body: plain_text(ticket.description.as_deref(), ticket.description_text.as_deref()),
            language: None,
            created_at: ticket.created_at,
            updated_at: Some(ticket.updated_at),
            parent_id: None,
            thread_id: Some(external_id),
            tags,
            score: None,
            edited: false,
            deleted: stream == Stream::Deleted || ticket.deleted == Some(true),
            signals: None,
        }
    }

    fn read_conversations(&self, pending: &Pending, items: Vec<Value>) -> Page {
        let mut page = Page::default();
        for item in items {
            if item.get("private").and_then(Value::as_bool) == Some(true) && !self.config.include_private_notes {
                continue;
            }
            match serde_json::from_value::<RawConversation>(item.clone()) {
                Ok(conversation) => page.contributions.push(self.conversation(pending, conversation)),
                Err(error) => {
                    let id = item.get("id").and_then(Value::as_u64).map(|id| format!("conversation:{id}"));
                    let raw = serde_json::to_string(&item).unwrap_or_default();
                    page.quarantined.push(Quarantined::new(id, format!("cannot read the conversation: {error}"), &raw));
                }
            }
        }
        page
    }

    fn conversation(&self, pending: &Pending, conversation: RawConversation) -> Contribution {
        let thread = format!("ticket:{}", pending.ticket);
        Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: format!("conversation:{}", conversation.id),
            url: Some(self.web_url(pending.ticket)),
            kind: Kind::TicketComment,
            author: conversation_author(&conversation, pending.requester.as_ref()),
            title: None,
            body: plain_text(conversation.body.as_deref(), conversation.body_text.as_deref()),
            language: None,
            created_at: conversation.created_at,
            updated_at: Some(conversation.updated_at),
            parent_id: Some(thread.clone()),
            thread_id: Some(thread),
            tags: Vec::new(),
            score: None,
            edited: (conversation.updated_at - conversation.created_at).num_seconds() > EDIT_GRACE_SECONDS,
            deleted: false,
            signals: None,
        }
    }
}

/// Where a stream's pass starts: a second before its newest change, else
/// the first poll's `since`, else 30 days back.
fn first_since(top: Option<DateTime<Utc>>, since: Option<DateTime<Utc>>) -> DateTime<Utc> {
    max(top.map(|top| top - TimeDelta::seconds(1)), since)
        .unwrap_or_else(|| Utc::now() - TimeDelta::days(FIRST_POLL_LOOKBACK_DAYS))
}

/// The request after a page of `pass`: `None` when the pass is over. Pages
/// by key (`top - 1 s`) while it moves, by number while it does not, and
/// past Freshdesk's last page one second further on.
fn next_pass(pass: &Pass, top: Option<DateTime<Utc>>, has_next: bool) -> Option<Pass> {
    if !has_next {
        return None;
    }
    if let Some(top) = top {
        let restart = top - TimeDelta::seconds(1);
        if restart > pass.since {
            return Some(Pass { since: restart, page: 1 });
        }
    }
    if pass.page < MAX_PAGE {
        return Some(Pass { since: pass.since, page: pass.page + 1 });
    }
    // Page 300 of one two-second window: nothing past it can be listed.
    top.map(|_| Pass { since: pass.since + TimeDelta::seconds(1), page: 1 })
}

/// How long Freshdesk's budget headers ask the next request to wait.
fn budget_hold(total: Option<f64>, remaining: f64, used: Option<f64>) -> Option<Duration> {
    let cost = used.filter(|used| *used >= 1.0).unwrap_or(1.0);
    let left = (remaining / cost).floor();
    if left < 1.0 {
        return Some(RATE_WINDOW);
    }
    let total = total?;
    (remaining * 4.0 < total).then(|| RATE_WINDOW.div_f64(left + 1.0))
}

/// A numeric header; NaN and infinities (which parse) are refused.
fn header_number(response: &HttpResponse, name: &str) -> Option<f64> {
    response.header(name).and_then(|value| value.trim().parse::<f64>().ok()).filter(|value| value.is_finite())
}

/// A list body and whether its `Link` header has `rel="next"`.
fn read_list(response: &HttpResponse) -> Result<(Vec<Value>, bool), SourceError> {
    let next = response.headers.get_all("link").iter().filter_map(|value| value.to_str().ok()).any(has_next);
    let body: Value = serde_json::from_slice(&response.body)
        .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
    match body {
        Value::Array(items) => Ok((items, next)),
        other => {
            let message = other
                .get("message")
                .or_else(|| other.get("description"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            Err(SourceError::Decode(format!("{} answered JSON that is not a list: {message}", response.target)))
        }
    }
}

/// Whether a `Link` header (`<url>; rel="next", <url>; rel="prev"`) has a
/// `rel="next"` entry.
fn has_next(header: &str) -> bool {
    let mut rest = header;
    while let Some(start) = rest.find('<') {
        let Some(after) = rest.get(start + 1..) else {
            return false;
        };
        let Some(end) = after.find('>') else {
            return false;
        };
        let params_and_more = after.get(end + 1..).unwrap_or_default();
        // The parameters run to the next `<url>`.
        let params = params_and_more.split('<').next().unwrap_or_default();
        let is_next = params.split([';', ',']).any(|param| {
            let mut parts = param.splitn(2, '=');
            let name = parts.next().unwrap_or_default().trim();
            let value = parts.next().unwrap_or_default().trim().trim_matches('"');
            name.eq_ignore_ascii_case("rel") && value.split_whitespace().any(|rel| rel.eq_ignore_ascii_case("next"))
        });
        if is_next {
            return true;
        }
        rest = params_and_more;
    }
    false
}

fn timestamp(item: &Value, field: &str) -> Option<DateTime<Utc>> {
    item.get(field).and_then(Value::as_str).and_then(|at| at.parse::<DateTime<Utc>>().ok())
}

/// Plain text from an HTML body, else from the platform's own plain text.
fn plain_text(html: Option<&str>, text: Option<&str>) -> String {
    let from_html = html.map(html_to_text).unwrap_or_default();
    if from_html.is_empty() { tidy(text.unwrap_or_default()) } else { from_html }
}

/// The requester of a ticket: the embedded `requester`, else `requester_id`
/// (and the older list shape's `requester_name`).
fn requester(ticket: &RawTicket) -> Person {
    let embedded = ticket.requester.as_ref();
    Person {
        id: embedded.and_then(|r| r.id).or(ticket.requester_id),
        name: non_empty(embedded.and_then(|r| r.name.as_deref()))
            .or_else(|| non_empty(ticket.requester_name.as_deref())),
        email: embedded.and_then(|r| r.email.as_deref()).and_then(email_address),
    }
}

/// Who wrote a conversation; see the module docs for when the e-mail is used.
fn conversation_author(conversation: &RawConversation, requester: Option<&Person>) -> Author {
    let (from_name, from_email) = conversation.from_email.as_deref().map(mailbox).unwrap_or_default();
    let by_requester = requester.filter(|r| r.id.is_some() && r.id == conversation.user_id);
    let (display_name, email) = match by_requester {
        Some(requester) => (requester.name.clone().or(from_name), requester.email.clone().or(from_email)),
        None if conversation.incoming == Some(true) => (from_name, from_email),
        None => (None, None),
    };
    Author {
        id: conversation.user_id.map(|id| id.to_string()).unwrap_or_default(),
        handle: None,
        display_name,
        email,
        profile_url: None,
        links: Vec::new(),
    }
}

/// `Name <address>`, `"Last, First" <address>` or a bare address.
fn mailbox(value: &str) -> (Option<String>, Option<String>) {
    let value = value.trim();
    match (value.rfind('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => {
            let name = value.get(..open).unwrap_or_default().trim().trim_matches('"').trim();
            (non_empty(Some(name)), value.get(open + 1..close).and_then(email_address))
        }
        _ => (None, email_address(value)),
    }
}

/// A trimmed address that looks like one (`local@domain`, no spaces).
fn email_address(value: &str) -> Option<String> {
    let value = value.trim();
    let (local, domain) = value.split_once('@')?;
    let valid = !local.is_empty() && domain.contains('.') && !value.chars().any(|c| c.is_whitespace() || c == '<');
    valid.then(|| value.to_owned())
}

fn non_empty(value: Option<&str>) -> Option<String> {
    value.map(str::trim).filter(|value| !value.is_empty()).map(str::to_owned)
}

/// The fields of a ticket this connector reads.
#[derive(Debug, Deserialize)]
struct RawTicket {
    id: u64,
    #[serde(default)]
    subject: Option<String>,
    /// HTML (v2); plain text in the older list shape.
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    description_text: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    #[serde(default)]
    requester_id: Option<u64>,
    #[serde(default)]
    requester: Option<RawRequester>,
    #[serde(default)]
    requester_name: Option<String>,
    #[serde(default)]
    tags: Option<Vec<Value>>,
    #[serde(default)]
    deleted: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct RawRequester {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

/// The fields of a conversation this connector reads.
#[derive(Debug, Deserialize)]
struct RawConversation {
    id: u64,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_text: Option<String>,
    #[serde(default)]
    incoming: Option<bool>,
    #[serde(default)]
    user_id: Option<u64>,
    #[serde(default)]
    from_email: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[async_trait]
impl Source for FreshdeskSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor: FreshdeskCursor = request.stored().unwrap_or_default();
        cursor.since = request.since.or(cursor.since);
        let mut page = match cursor.conversations.front().cloned() {
            Some(pending) => self.poll_conversations(&mut cursor, pending).await?,
            None => {
                let stream = cursor.round.unwrap_or(Stream::Tickets);
                let (page, done) = self.poll_tickets(&mut cursor, stream).await?;
                cursor.round = match (stream, done) {
                    (stream, false) => Some(stream),
                    (Stream::Tickets, true) => Some(Stream::Deleted),
                    (Stream::Deleted, true) => None,
                };
                page
            }
        };
        page.has_more = cursor.round.is_some() || !cursor.conversations.is_empty();
        if !page.has_more {
            tracing::info!(
                source = %self.instance, tickets = ?cursor.tickets.top, deleted = ?cursor.deleted.top,
                "freshdesk round complete"
            );
        }
        page.next_cursor = Some(Cursor::from_json(&cursor));
        Ok(page)
    }

    /// Lists one ticket: the helpdesk answers and accepts the key.
    async fn check(&self) -> Result<(), SourceError> {
        let mut url = self.endpoint(&["api", "v2", "tickets"]);
        url.query_pairs_mut().append_pair("per_page", "1");
        self.fetch_list(url).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Instant};

    use serde_json::json;
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockBuilder, MockServer, ResponseTemplate,
        matchers::{header, method, path, query_param, query_param_is_missing},
    };

    use super::*;

    const KEY: &str = "Fr3shd3skK3yT3st0nly";
    /// `Basic base64("Fr3shd3skK3yT3st0nly:X")`.
    const BASIC: &str = "Basic RnIzc2hkM3NrSzN5VDNzdDBubHk6WA==";
    const TICKETS: &str = "/api/v2/tickets";
    /// The recorded v2 ticket's `updated_at`, and a second before it.
    const UPDATED: &str = "2016-05-18T23:42:50Z";
    const BEFORE_UPDATED: &str = "2016-05-18T23:42:49Z";

    fn options() -> HttpOptions {
        HttpOptions {
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(2),
            ..HttpOptions::default()
        }
    }

    /// A key file of each test's own (tests run in parallel).
    fn key_file(test: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tributary-freshdesk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(test);
        std::fs::write(&file, format!("{content}\n")).unwrap();
        file
    }

    /// The configuration as a user writes it, pointed at the mock server.
    fn config(server: &MockServer, test: &str, extra: &str) -> FreshdeskConfig {
        let file = key_file(test, KEY);
        let text = format!("base_url = \"{}\"\napi_key = {{ file = \"{}\" }}\n{extra}", server.uri(), file.display());
        toml::from_str(&text).unwrap()
    }

    fn source(config: FreshdeskConfig) -> FreshdeskSource {
        FreshdeskSource::new("helpdesk", config, options()).unwrap()
    }

    /// The recorded v2 ticket (`GET /tickets/1?include=stats,requester`),
    /// which is also the shape of a list item with `include=requester`.
    fn v2_ticket() -> Value {
        Fixture::load("freshdesk", "ticket_with_stats_requester").body
    }

    fn ticket_at(id: u64, updated_at: &str) -> Value {
        let mut ticket = v2_ticket();
        ticket["id"] = id.into();
        ticket["updated_at"] = updated_at.into();
        ticket
    }

    /// The recorded list item, in the older list shape (plain-text
    /// `description`, `requester_name`, no `requester`); its id changed to 7
    /// so that it differs from the v2 sample's.
    fn legacy_ticket() -> Value {
        let mut ticket = Fixture::load("freshdesk", "tickets_list").body[0].clone();
        ticket["id"] = 7.into();
        ticket
    }

    /// The recorded conversations: a private note (1) and an agent's reply (2).
    fn conversations() -> Vec<Value> {
        Fixture::load("freshdesk", "ticket_conversations").body.as_array().cloned().unwrap()
    }

    fn conversation(id: u64) -> Value {
        conversations().into_iter().find(|c| c["id"] == id).unwrap()
    }

    /// A recorded list answer with other items. The samples were recorded
    /// without headers: with `next`, the `Link` header Freshdesk sends when
    /// another page follows is added.
    fn list(server: &MockServer, fixture: &str, items: Vec<Value>, next: bool) -> ResponseTemplate {
        let mut fixture = Fixture::load("freshdesk", fixture);
        fixture.body = Value::Array(items);
        if next {
            let link = format!("<{}/api/v2/tickets?page=2>; rel=\"next\"", server.uri());
            fixture.headers.push(("link".into(), link));
        }
        fixture.response()
    }

    fn tickets(server: &MockServer, items: Vec<Value>, next: bool) -> ResponseTemplate {
        list(server, "tickets_list", items, next)
    }

    fn convs(server: &MockServer, items: Vec<Value>, next: bool) -> ResponseTemplate {
        list(server, "ticket_conversations", items, next)
    }

    /// A recorded answer turned into another: status, body and headers changed.
    fn answer(status: u16, body: Value, headers: &[(&str, &str)]) -> ResponseTemplate {
        let mut fixture = Fixture::load("freshdesk", "tickets_list");
        fixture.status = status;
        fixture.body = body;
        fixture.headers.extend(headers.iter().map(|(name, value)| (name.to_string(), value.to_string())));
        fixture.response()
    }

    /// A request for one page of a ticket stream.
    fn tickets_mock(stream: Stream, since: &str, page: u32) -> MockBuilder {
        let mock = Mock::given(method("GET"))
            .and(path(TICKETS))
            .and(query_param("updated_since", since))
            .and(query_param("page", page.to_string()))
            .and(query_param("order_by", "updated_at"))
            .and(query_param("order_type", "asc"))
            .and(query_param("include", "requester,description"));
        match stream {
            Stream::Tickets => mock.and(query_param_is_missing("filter")),
            Stream::Deleted => mock.and(query_param("filter", "deleted")),
        }
    }

    fn conversations_mock(ticket: u64, page: u32) -> MockBuilder {
        Mock::given(method("GET"))
            .and(path(format!("{TICKETS}/{ticket}/conversations")))
            .and(query_param("page", page.to_string()))
    }

    async fn serve_tickets(server: &MockServer, stream: Stream, since: &str, page: u32, response: ResponseTemplate) {
        tickets_mock(stream, since, page).respond_with(response).expect(1).mount(server).await;
    }

    async fn serve_conversations(server: &MockServer, ticket: u64, page: u32, response: ResponseTemplate) {
        conversations_mock(ticket, page).respond_with(response).expect(1).mount(server).await;
    }

    /// Polls until the round is over; `since` only on the first call (the
    /// cursor carries it on).
    async fn round(source: &FreshdeskSource, cursor: Option<Cursor>, since: Option<&str>) -> Vec<Page> {
        tributary_sdk::testkit::poll_round(source, cursor, since.map(at), 30).await
    }

    fn cursor(page: &Page) -> FreshdeskCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn at(time: &str) -> DateTime<Utc> {
        time.parse().unwrap()
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    fn all_ids(pages: &[Page]) -> Vec<Vec<&str>> {
        pages.iter().map(ids).collect()
    }

    fn find<'a>(pages: &'a [Page], id: &str) -> &'a Contribution {
        pages.iter().flat_map(|page| &page.contributions).find(|c| c.external_id == id).unwrap()
    }

    fn more(pages: &[Page]) -> Vec<bool> {
        pages.iter().map(|page| page.has_more).collect()
    }

    async fn requests_to(server: &MockServer, prefix: &str) -> usize {
        server.received_requests().await.unwrap().iter().filter(|r| r.url.path().starts_with(prefix)).count()
    }

    /// One expected contribution, checked field by field.
    struct Expect<'a> {
        id: &'a str,
        kind: Kind,
        author_id: &'a str,
        name: Option<&'a str>,
        email: Option<&'a str>,
        url: String,
        title: Option<&'a str>,
        thread: &'a str,
        parent: Option<&'a str>,
        created_at: &'a str,
        updated_at: &'a str,
        body: &'a str,
        tags: &'a [&'a str],
        edited: bool,
        deleted: bool,
    }

    fn check(pages: &[Page], expect: &Expect<'_>) {
        let c = find(pages, expect.id);
        let id = expect.id;
        assert_eq!((c.platform.as_str(), c.source.as_str()), ("freshdesk", "helpdesk"), "{id}");
        assert_eq!(c.kind, expect.kind, "{id}");
        assert_eq!(c.author.id, expect.author_id, "{id}");
        assert_eq!(c.author.display_name.as_deref(), expect.name, "{id}");
        assert_eq!(c.author.email.as_deref(), expect.email, "{id}");
        assert_eq!((c.author.handle.as_deref(), c.author.profile_url.as_deref()), (None, None), "{id}");
        assert_eq!(c.url.as_deref(), Some(expect.url.as_str()), "{id}");
        assert_eq!(c.title.as_deref(), expect.title, "{id}");
        assert_eq!(c.thread_id.as_deref(), Some(expect.thread), "{id}");
        assert_eq!(c.parent_id.as_deref(), expect.parent, "{id}");
        assert_eq!(c.created_at, at(expect.created_at), "{id}");
        assert_eq!(c.updated_at, Some(at(expect.updated_at)), "{id}");
        assert_eq!(c.body, expect.body, "{id}");
        assert_eq!(c.tags, expect.tags, "{id}");
        assert_eq!((c.edited, c.deleted), (expect.edited, expect.deleted), "{id}");
        assert_eq!((c.score, c.language.as_deref(), c.signals.as_ref()), (None, None, None), "{id}");
    }

    /// The recorded v2 ticket as mapped.
    fn expect_v2_ticket(server: &MockServer) -> Expect<'static> {
        Expect {
            id: "ticket:1",
            kind: Kind::Ticket,
            // The embedded requester's id (the sample's `requester_id` differs: it is hand-made).
            author_id: "43026449322",
            name: Some("Dummyname"),
            email: Some("dummyname@example.com"),
            url: format!("{}/a/tickets/1", server.uri()),
            title: Some("This is a sample ticket"),
            thread: "ticket:1",
            parent: None,
            created_at: "2016-05-18T04:36:04Z",
            updated_at: UPDATED,
            body: "This is a sample ticket, feel free to delete it.",
            tags: &["foo", "bar"],
            edited: false,
            deleted: false,
        }
    }

    /// The recorded reply (conversation 2) as mapped.
    fn expect_reply(server: &MockServer) -> Expect<'static> {
        Expect {
            id: "conversation:2",
            kind: Kind::TicketComment,
            // An agent's outgoing reply: its `from_email` is the support mailbox.
            author_id: "1",
            name: None,
            email: None,
            url: format!("{}/a/tickets/1", server.uri()),
            title: None,
            thread: "ticket:1",
            parent: Some("ticket:1"),
            created_at: "2016-05-19T05:36:14Z",
            updated_at: "2016-05-19T05:36:14Z",
            body: "This is a reply",
            tags: &[],
            edited: false,
            deleted: false,
        }
    }

    #[tokio::test]
    async fn first_poll_maps_tickets_and_their_public_conversations() {
        let server = MockServer::start().await;
        let since = "2014-12-01T00:00:00Z";
        serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![legacy_ticket(), v2_ticket()], false))
            .await;
        serve_conversations(&server, 7, 1, convs(&server, vec![], false)).await;
        serve_conversations(&server, 1, 1, convs(&server, conversations(), false)).await;
        serve_tickets(&server, Stream::Deleted, since, 1, tickets(&server, vec![], false)).await;
        let pages = round(&source(config(&server, "first_poll", "")), None, Some(since)).await;

        assert_eq!(more(&pages), [true, true, true, false], "tickets, two tickets' conversations, deleted tickets");
        let no_ids: Vec<&str> = Vec::new();
        assert_eq!(all_ids(&pages), [vec!["ticket:7", "ticket:1"], no_ids.clone(), vec!["conversation:2"], no_ids]);
        assert!(pages.iter().all(|page| page.quarantined.is_empty()));
        check(&pages, &expect_v2_ticket(&server));
        check(&pages, &expect_reply(&server));
        check(
            &pages,
            &Expect {
                id: "ticket:7",
                kind: Kind::Ticket,
                author_id: "5004272351",
                // The older list shape names the requester but gives no e-mail.
                name: Some("Rachel"),
                email: None,
                url: format!("{}/a/tickets/7", server.uri()),
                title: Some("This is a sample ticket"),
                thread: "ticket:7",
                parent: None,
                created_at: "2014-12-31T02:27:09Z",
                updated_at: "2015-01-01T00:58:39Z",
                body: "This is a sample ticket, feel free to delete it.",
                tags: &["mytag"],
                edited: false,
                deleted: false,
            },
        );

        let last = cursor(pages.last().unwrap());
        assert_eq!(last.since, Some(at(since)), "kept for the deleted stream, polled last");
        assert_eq!(
            last.tickets,
            StreamCursor { top: Some(at(UPDATED)), seen: vec![Seen { id: 1, updated_at: at(UPDATED) }], pass: None }
        );
        assert_eq!(last.deleted, StreamCursor::default(), "nothing deleted yet");
        assert_eq!((last.round, last.conversations.len()), (None, 0));
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 4);
        assert!(requests.iter().all(|r| r.headers.get("authorization").is_some_and(|v| v == BASIC)));
        assert!(requests.iter().all(|r| r.url.query_pairs().any(|(k, v)| k == "per_page" && v == "100")));
    }

    #[tokio::test]
    async fn conversation_authors_and_private_notes() {
        let requester = "43026449322";
        let reply = conversation(2);
        let mut incoming = reply.clone();
        incoming["incoming"] = true.into();
        let mut by_requester = reply.clone();
        by_requester["user_id"] = json!(43026449322u64);
        by_requester["from_email"] = Value::Null;
        // (include_private_notes, reply as served, ids taken, reply's author: id, name, e-mail)
        let cases = [
            (false, reply.clone(), vec!["conversation:2"], ("1", None, None)),
            (true, reply, vec!["conversation:1", "conversation:2"], ("1", None, None)),
            // Sent by a customer (e.g. in CC): the address of `from_email`.
            (false, incoming, vec!["conversation:2"], ("1", Some("Rachel"), Some("rachel@freshdesk.com"))),
            // By the ticket's requester: the requester's name and e-mail.
            (
                false,
                by_requester,
                vec!["conversation:2"],
                (requester, Some("Dummyname"), Some("dummyname@example.com")),
            ),
        ];
        for (private_notes, reply, expected, (author_id, name, email)) in cases {
            let server = MockServer::start().await;
            let since = "2016-01-01T00:00:00Z";
            serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![v2_ticket()], false)).await;
            serve_conversations(&server, 1, 1, convs(&server, vec![conversation(1), reply], false)).await;
            serve_tickets(&server, Stream::Deleted, since, 1, tickets(&server, vec![], false)).await;
            let extra = format!("include_private_notes = {private_notes}");
            let pages = round(&source(config(&server, "conversation_authors", &extra)), None, Some(since)).await;
            assert_eq!(ids(&pages[1]), expected, "include_private_notes = {private_notes}");
            let c = find(&pages, "conversation:2");
            assert_eq!(
                (c.author.id.as_str(), c.author.display_name.as_deref(), c.author.email.as_deref()),
                (author_id, name, email)
            );
            if private_notes {
                let note = find(&pages, "conversation:1");
                assert_eq!((note.body.as_str(), note.author.id.as_str()), ("This is a private note", "1"));
                assert_eq!((note.author.email.as_deref(), note.parent_id.as_deref()), (None, Some("ticket:1")));
            }
        }
    }

    #[tokio::test]
    async fn an_incremental_poll_with_nothing_new_sends_nothing_and_fetches_no_conversations() {
        let server = MockServer::start().await;
        let since = "2016-01-01T00:00:00Z";
        serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![v2_ticket()], false)).await;
        serve_conversations(&server, 1, 1, convs(&server, conversations(), false)).await;
        // The deleted stream has taken nothing: it asks from `since` both times.
        tickets_mock(Stream::Deleted, since, 1)
            .respond_with(tickets(&server, vec![], false))
            .expect(2)
            .mount(&server)
            .await;
        // A second before the newest change: the boundary ticket comes back, unchanged.
        serve_tickets(&server, Stream::Tickets, BEFORE_UPDATED, 1, tickets(&server, vec![v2_ticket()], false)).await;
        let source = source(config(&server, "nothing_new", ""));

        let first = round(&source, None, Some(since)).await;
        let second = round(&source, first.last().unwrap().next_cursor.clone(), None).await;
        assert_eq!(more(&second), [true, false], "tickets, then deleted tickets: no conversations");
        assert!(second.iter().all(|page| page.contributions.is_empty() && page.quarantined.is_empty()));
        assert_eq!(cursor(second.last().unwrap()), cursor(first.last().unwrap()), "nothing moved");
        assert_eq!(requests_to(&server, "/api/v2/tickets/1/").await, 1, "conversations fetched once");
    }

    #[tokio::test]
    async fn pagination_follows_link_next_to_the_end_of_tickets_and_conversations() {
        let server = MockServer::start().await;
        let since = "2024-03-01T00:00:00Z";
        let t = |id, hour: u32| ticket_at(id, &format!("2024-03-01T{hour}:00:00Z"));
        // Each next page asks again from a second before the newest change seen.
        serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![t(11, 10), t(12, 11)], true)).await;
        let page_2 = tickets(&server, vec![t(12, 11), t(13, 12)], true);
        serve_tickets(&server, Stream::Tickets, "2024-03-01T10:59:59Z", 1, page_2).await;
        let page_3 = tickets(&server, vec![t(13, 12), t(14, 13)], false);
        serve_tickets(&server, Stream::Tickets, "2024-03-01T11:59:59Z", 1, page_3).await;
        serve_conversations(&server, 11, 1, convs(&server, vec![conversation(2)], true)).await;
        let mut third = conversation(2);
        third["id"] = 3.into();
        serve_conversations(&server, 11, 2, convs(&server, vec![third], false)).await;
        for ticket in [12, 13, 14] {
            serve_conversations(&server, ticket, 1, convs(&server, vec![], false)).await;
        }
        serve_tickets(&server, Stream::Deleted, since, 1, tickets(&server, vec![], false)).await;

        let pages = round(&source(config(&server, "pagination", "")), None, Some(since)).await;
        let no_ids: Vec<&str> = Vec::new();
        assert_eq!(
            all_ids(&pages),
            [
                vec!["ticket:11", "ticket:12"],
                vec!["conversation:2"],
                vec!["conversation:3"],
                no_ids.clone(),
                // Ticket 12 came back unchanged: skipped, its conversations not fetched again.
                vec!["ticket:13"],
                no_ids.clone(),
                vec!["ticket:14"],
                no_ids.clone(),
                no_ids,
            ]
        );
        assert_eq!(more(&pages), [true, true, true, true, true, true, true, true, false]);
        assert_eq!(find(&pages, "conversation:3").parent_id.as_deref(), Some("ticket:11"));
        // While the conversations are read, the pass waits in the cursor.
        let paging = cursor(&pages[1]);
        assert_eq!(paging.tickets.pass, Some(Pass { since: at("2024-03-01T10:59:59Z"), page: 1 }));
        assert_eq!(paging.conversations.iter().map(|p| (p.ticket, p.page)).collect::<Vec<_>>(), [(11, 2), (12, 1)]);
        assert_eq!(paging.round, Some(Stream::Tickets));
        let last = cursor(pages.last().unwrap());
        let top = at("2024-03-01T13:00:00Z");
        assert_eq!(
            last.tickets,
            StreamCursor { top: Some(top), seen: vec![Seen { id: 14, updated_at: top }], pass: None }
        );
    }

    #[tokio::test]
    async fn at_freshdesks_last_page_the_pass_restarts_further_on() {
        let server = MockServer::start().await;
        let since = "2024-03-01T10:00:00Z";
        // Page 300 of a window whose key does not move (a bulk update):
        // Freshdesk lists nothing past it, so the pass restarts a second on.
        let same_second = vec![ticket_at(21, "2024-03-01T10:00:01Z"), ticket_at(22, "2024-03-01T10:00:01Z")];
        serve_tickets(&server, Stream::Tickets, since, 300, tickets(&server, same_second, true)).await;
        let later = vec![ticket_at(22, "2024-03-01T10:00:01Z"), ticket_at(23, "2024-03-01T10:00:05Z")];
        serve_tickets(&server, Stream::Tickets, "2024-03-01T10:00:01Z", 1, tickets(&server, later, false)).await;
        for ticket in [21, 22, 23] {
            serve_conversations(&server, ticket, 1, convs(&server, vec![], false)).await;
        }
        serve_tickets(&server, Stream::Deleted, "2024-03-01T00:00:00Z", 1, tickets(&server, vec![], false)).await;
        let stored = FreshdeskCursor {
            since: Some(at("2024-03-01T00:00:00Z")),
            tickets: StreamCursor {
                top: Some(at(since)),
                seen: Vec::new(),
                pass: Some(Pass { since: at(since), page: 300 }),
            },
            round: Some(Stream::Tickets),
            ..FreshdeskCursor::default()
        };
        let source = source(config(&server, "page_cap", "per_page = 2"));
        let pages = round(&source, Some(Cursor::from_json(&stored)), None).await;
        let taken: Vec<_> = pages.iter().flat_map(ids).collect();
        assert_eq!(taken, ["ticket:21", "ticket:22", "ticket:23"]);
        assert_eq!(cursor(&pages[0]).tickets.pass, Some(Pass { since: at("2024-03-01T10:00:01Z"), page: 1 }));
        assert_eq!(cursor(pages.last().unwrap()).tickets.top, Some(at("2024-03-01T10:00:05Z")));
    }

    #[test]
    fn passes_page_by_key_by_number_within_two_seconds_and_restart_past_page_300() {
        let since = at("2024-03-01T10:00:00Z");
        let pass = |page| Pass { since, page };
        let restart = |time: &str| Some(Pass { since: at(time), page: 1 });
        for (current, top, has_next, expected) in [
            (pass(1), Some("2024-03-01T12:00:00Z"), false, None),
            (pass(1), Some("2024-03-01T12:00:00Z"), true, restart("2024-03-01T11:59:59Z")),
            // The key does not move: the next page by number.
            (pass(1), Some("2024-03-01T10:00:01Z"), true, Some(pass(2))),
            (pass(299), Some("2024-03-01T10:00:00Z"), true, Some(pass(300))),
            // Freshdesk's last page: restart a second further on.
            (pass(300), Some("2024-03-01T10:00:01Z"), true, restart("2024-03-01T10:00:01Z")),
            // A key that moves restarts from the newest change seen, as on any page.
            (pass(300), Some("2024-03-01T10:30:00Z"), true, restart("2024-03-01T10:29:59Z")),
            // No readable `updated_at` at all: by number, and no further than Freshdesk lists.
            (pass(1), None, true, Some(pass(2))),
            (pass(300), None, true, None),
        ] {
            assert_eq!(next_pass(&current, top.map(at), has_next), expected, "{current:?} {top:?} {has_next}");
        }
    }

    #[tokio::test]
    async fn an_updated_ticket_comes_back_with_its_new_content() {
        let server = MockServer::start().await;
        let since = "2016-01-01T00:00:00Z";
        serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![v2_ticket()], false)).await;
        tickets_mock(Stream::Deleted, since, 1).respond_with(tickets(&server, vec![], false)).mount(&server).await;
        conversations_mock(1, 1)
            .respond_with(convs(&server, conversations(), false))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        // The requester edits the subject and description and the agent
        // corrects the reply: the ticket's `updated_at` moves.
        let mut edited = v2_ticket();
        edited["updated_at"] = "2016-05-20T08:00:00Z".into();
        edited["subject"] = "Export to PDF fails".into();
        edited["description"] = "<div>Exporting to PDF fails since the update.</div>".into();
        edited["tags"] = json!(["foo", "bar", "pdf"]);
        let mut reply = conversation(2);
        reply["body"] = "<div>This is a reply, corrected</div>".into();
        reply["body_text"] = "This is a reply, corrected".into();
        reply["updated_at"] = "2016-05-19T09:00:00Z".into();
        serve_tickets(&server, Stream::Tickets, BEFORE_UPDATED, 1, tickets(&server, vec![edited], false)).await;
        conversations_mock(1, 1).respond_with(convs(&server, vec![conversation(1), reply], false)).mount(&server).await;
        let source = source(config(&server, "update", ""));

        let first = round(&source, None, Some(since)).await;
        let second = round(&source, first.last().unwrap().next_cursor.clone(), None).await;
        assert_eq!(all_ids(&second), [vec!["ticket:1"], vec!["conversation:2"], vec![]]);
        check(
            &second,
            &Expect {
                title: Some("Export to PDF fails"),
                body: "Exporting to PDF fails since the update.",
                updated_at: "2016-05-20T08:00:00Z",
                tags: &["foo", "bar", "pdf"],
                ..expect_v2_ticket(&server)
            },
        );
        check(
            &second,
            &Expect {
                body: "This is a reply, corrected",
                updated_at: "2016-05-19T09:00:00Z",
                edited: true,
                ..expect_reply(&server)
            },
        );
        for id in ["ticket:1", "conversation:2"] {
            assert_ne!(find(&first, id).content_hash(), find(&second, id).content_hash(), "{id}");
        }
        assert_eq!(cursor(second.last().unwrap()).tickets.top, Some(at("2016-05-20T08:00:00Z")));
    }

    #[tokio::test]
    async fn deleted_tickets_come_back_deleted() {
        let server = MockServer::start().await;
        let since = "2016-01-01T00:00:00Z";
        let mut trashed = v2_ticket();
        trashed["deleted"] = true.into();
        serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![], false)).await;
        serve_tickets(&server, Stream::Deleted, since, 1, tickets(&server, vec![trashed], false)).await;
        let pages = round(&source(config(&server, "deleted", "")), None, Some(since)).await;

        assert_eq!(more(&pages), [true, false]);
        assert_eq!(ids(&pages[1]), ["ticket:1"]);
        // The same item as the live ticket, marked deleted.
        check(&pages, &Expect { deleted: true, ..expect_v2_ticket(&server) });
        assert_eq!(requests_to(&server, "/api/v2/tickets/").await, 0, "no conversations of a deleted ticket");
        let last = cursor(pages.last().unwrap());
        assert_eq!(last.deleted.top, Some(at(UPDATED)));
        assert_eq!(last.tickets.top, None);
    }

    #[tokio::test]
    async fn a_ticket_gone_before_its_conversations_are_read_is_skipped() {
        let server = MockServer::start().await;
        let since = "2016-01-01T00:00:00Z";
        let later = ticket_at(5, "2016-06-01T00:00:00Z");
        serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![v2_ticket(), later], false)).await;
        // A 404 (its body is not what is read).
        serve_conversations(&server, 1, 1, answer(404, json!({}), &[])).await;
        serve_conversations(&server, 5, 1, convs(&server, conversations(), false)).await;
        serve_tickets(&server, Stream::Deleted, since, 1, tickets(&server, vec![], false)).await;
        let pages = round(&source(config(&server, "gone", "")), None, Some(since)).await;
        assert_eq!(all_ids(&pages), [vec!["ticket:1", "ticket:5"], vec![], vec!["conversation:2"], vec![]]);
        assert_eq!(find(&pages, "conversation:2").thread_id.as_deref(), Some("ticket:5"));
    }

    #[tokio::test]
    async fn malformed_items_are_quarantined_and_the_page_goes_on() {
        let server = MockServer::start().await;
        let since = "2016-01-01T00:00:00Z";
        let mut no_id = ticket_at(2, "2016-05-19T00:00:00Z");
        no_id.as_object_mut().unwrap().remove("id");
        let mut bad_date = ticket_at(3, "2016-05-20T00:00:00Z");
        bad_date["created_at"] = "yesterday".into();
        serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![v2_ticket(), no_id, bad_date], false))
            .await;
        let mut undated = conversation(2);
        undated["id"] = 4.into();
        undated.as_object_mut().unwrap().remove("created_at");
        let items = vec![conversation(1), conversation(2), undated];
        serve_conversations(&server, 1, 1, convs(&server, items, false)).await;
        serve_tickets(&server, Stream::Deleted, since, 1, tickets(&server, vec![], false)).await;
        let pages = round(&source(config(&server, "malformed", "")), None, Some(since)).await;

        assert_eq!(
            all_ids(&pages),
            [vec!["ticket:1"], vec!["conversation:2"], vec![]],
            "only readable tickets' threads"
        );
        let quarantined: Vec<_> =
            pages.iter().flat_map(|p| &p.quarantined).map(|q| (q.external_id.as_deref(), q.reason.as_str())).collect();
        assert_eq!(quarantined.len(), 3);
        assert_eq!(quarantined[0], (None, "cannot read the ticket: missing field `id`"));
        assert_eq!(quarantined[1].0, Some("ticket:3"));
        assert!(quarantined[1].1.starts_with("cannot read the ticket: "), "{}", quarantined[1].1);
        assert_eq!(
            quarantined[2],
            (Some("conversation:4"), "cannot read the conversation: missing field `created_at`")
        );
        assert!(pages[0].quarantined[0].raw.contains("This is a sample ticket"));
        // The unreadable ticket still moved the stream on.
        assert_eq!(cursor(pages.last().unwrap()).tickets.top, Some(at("2016-05-20T00:00:00Z")));
    }

    #[tokio::test]
    async fn rate_limits_are_honoured_without_early_requests() {
        // Freshdesk documents the status and `Retry-After`; the body is illustrative.
        let limited = |retry_after: Option<&str>| {
            let body =
                json!({"code": "rate_limit_exceeded", "message": "You have exceeded the limit of requests per minute"});
            let headers: Vec<(&str, &str)> = retry_after.map(|after| ("retry-after", after)).into_iter().collect();
            answer(429, body, &headers)
        };
        let rate_limited = |error: SourceError| match error {
            SourceError::Http(HttpError::RateLimited { retry_after, .. }) => retry_after,
            other => panic!("unexpected {other:?}"),
        };

        // A long Retry-After is handed back, and nothing is sent before it.
        let server = MockServer::start().await;
        Mock::given(method("GET")).respond_with(limited(Some("3600"))).mount(&server).await;
        let source = source(config(&server, "rate_long", ""));
        for error in [
            source.poll(&PollRequest::default()).await.unwrap_err(),
            source.poll(&PollRequest::default()).await.unwrap_err(),
            source.check().await.unwrap_err(),
        ] {
            let wait = rate_limited(error).as_secs();
            assert!((3590..=3600).contains(&wait), "{wait}");
        }
        assert_eq!(server.received_requests().await.unwrap().len(), 1);

        // A short one is waited out before the request is sent again.
        let server = MockServer::start().await;
        Mock::given(method("GET")).respond_with(limited(Some("1"))).up_to_n_times(1).mount(&server).await;
        Mock::given(method("GET")).respond_with(tickets(&server, vec![], false)).mount(&server).await;
        let started = Instant::now();
        source_for(&server, "rate_short", Duration::from_secs(60)).poll(&PollRequest::default()).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1), "a request left before Retry-After");
        assert_eq!(server.received_requests().await.unwrap().len(), 2);

        // Without Retry-After: retried with backoff, then held.
        let server = MockServer::start().await;
        Mock::given(method("GET")).respond_with(limited(None)).mount(&server).await;
        let source = source_for(&server, "rate_bare", Duration::from_secs(60));
        rate_limited(source.poll(&PollRequest::default()).await.unwrap_err());
        let sent = server.received_requests().await.unwrap().len();
        assert_eq!(sent, 5, "the first try and four retries");
        // The backoff it gave up at holds the budget: the next poll waits it out first.
        let held = source.http.held_for().expect("a 429 without Retry-After holds the budget");
        let started = Instant::now();
        rate_limited(source.poll(&PollRequest::default()).await.unwrap_err());
        assert!(started.elapsed() >= held, "a request left before the hold ended");

        // A page that leaves too little for the next request: kept, and the
        // next request waits for the window (here, longer than may be
        // waited inline).
        let server = MockServer::start().await;
        let spent =
            [("x-ratelimit-total", "400"), ("x-ratelimit-remaining", "2"), ("x-ratelimit-used-currentrequest", "5")];
        Mock::given(method("GET")).respond_with(answer(200, json!([v2_ticket()]), &spent)).mount(&server).await;
        let source = source_for(&server, "rate_spent", Duration::from_secs(5));
        let page = source.poll(&PollRequest { cursor: None, since: Some(at("2016-01-01T00:00:00Z")) }).await.unwrap();
        assert_eq!(ids(&page), ["ticket:1"], "the page that spent the budget is kept");
        let request = PollRequest { cursor: page.next_cursor, since: None };
        let wait = rate_limited(source.poll(&request).await.unwrap_err());
        assert!(wait > Duration::from_secs(55) && wait <= RATE_WINDOW, "{wait:?}");
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "no request while the budget is spent");
    }

    fn source_for(server: &MockServer, test: &str, max_inline_wait: Duration) -> FreshdeskSource {
        let options = HttpOptions { max_inline_wait, ..options() };
        FreshdeskSource::new("helpdesk", config(server, test, ""), options).unwrap()
    }

    #[test]
    fn the_budget_headers_pace_requests() {
        // (X-RateLimit-Total, X-RateLimit-Remaining, X-RateLimit-Used-CurrentRequest, wait in seconds)
        for (total, remaining, used, expected) in [
            (Some(400.0), 380.0, Some(1.0), None),
            (Some(400.0), 0.0, Some(1.0), Some(60.0)),
            // A list with two includes costs 5 credits: 4 left buy nothing.
            (Some(400.0), 4.0, Some(5.0), Some(60.0)),
            // Under a quarter left: the window spread over the requests left.
            (Some(400.0), 99.0, Some(1.0), Some(0.6)),
            (Some(400.0), 45.0, Some(5.0), Some(6.0)),
            (Some(400.0), 99.0, None, Some(0.6)),
            (None, 10.0, None, None),
            (None, 0.0, None, Some(60.0)),
        ] {
            let wait = budget_hold(total, remaining, used).map(|wait| wait.as_secs_f64());
            match (wait, expected) {
                (Some(wait), Some(expected)) => assert!((wait - expected).abs() < 0.01, "{remaining}: {wait}"),
                (wait, expected) => assert_eq!(wait, expected, "{total:?} {remaining} {used:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_key_is_sent_as_basic_auth_and_never_shown() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(header("authorization", BASIC))
            .respond_with(tickets(&server, vec![], false))
            .expect(1)
            .mount(&server)
            .await;
        let config = config(&server, "auth", "");
        let source = source(config.clone());
        source.check().await.unwrap();
        for shown in [format!("{source:?}"), format!("{config:?}"), config.credential_key()] {
            assert!(!shown.contains(KEY) && !shown.contains(&BASIC[6..]), "the key leaked: {shown}");
        }

        let refused =
            json!({"code": "invalid_credentials", "message": "You have to be logged in to perform this action."});
        for (status, is_auth) in [(401, true), (403, true), (500, false)] {
            let server = MockServer::start().await;
            Mock::given(method("GET")).respond_with(answer(status, refused.clone(), &[])).mount(&server).await;
            let source = source_for(&server, "auth_refused", Duration::from_secs(60));
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                let text = error.to_string();
                assert!(!text.contains(KEY) && !text.contains(&BASIC[6..]), "the key leaked: {text}");
                match error {
                    SourceError::Auth(text) => assert!(is_auth && text.contains("logged in"), "{status}: {text}"),
                    SourceError::Http(HttpError::Status { status: got, .. }) => assert!(!is_auth && got == status),
                    other => panic!("{status}: unexpected {other:?}"),
                }
            }
        }

        // A proxy's or a maintenance page: not a list of tickets.
        for (body, expected) in [
            (
                ResponseTemplate::new(200).set_body_string("<html>Freshdesk is under maintenance</html>"),
                "did not answer JSON",
            ),
            (
                answer(200, json!({"description": "Validation failed", "errors": []}), &[]),
                "not a list: Validation failed",
            ),
        ] {
            let server = MockServer::start().await;
            Mock::given(method("GET")).respond_with(body).mount(&server).await;
            match source_for(&server, "auth_decode", Duration::from_secs(60)).poll(&PollRequest::default()).await {
                Err(SourceError::Decode(message)) => {
                    assert!(message.contains(expected) && message.contains(TICKETS), "{message}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn link_headers_are_read_for_rel_next() {
        for (link, expected) in [
            ("<https://acme.freshdesk.com/api/v2/tickets?page=2>;rel=\"next\"", true),
            ("<https://acme.freshdesk.com/api/v2/tickets?page=2>; rel=\"next\"", true),
            ("<https://x/a?page=1>; rel=\"prev\", <https://x/a?page=3>; rel=\"next\"", true),
            ("<https://x/a?page=1>; rel=\"prev\"", false),
            ("<https://x/a?page=2>; REL=next", true),
            ("", false),
            ("<", false),
            ("<https://x/a; rel=\"next\"", false),
            ("https://x/a; rel=\"next\"", false),
            ("<ü>;;;=", false),
        ] {
            assert_eq!(has_next(link), expected, "{link:?}");
        }
    }

    #[test]
    fn mailboxes_give_a_name_and_an_address() {
        for (value, name, email) in [
            ("Rachel <rachel@freshdesk.com>", Some("Rachel"), Some("rachel@freshdesk.com")),
            ("\"Doe, Jane\" <jane@example.com>", Some("Doe, Jane"), Some("jane@example.com")),
            ("jane@example.com", None, Some("jane@example.com")),
            ("<jane@example.com>", None, Some("jane@example.com")),
            ("Jane", None, None),
            ("Jane <not an address>", Some("Jane"), None),
            ("", None, None),
        ] {
            assert_eq!(mailbox(value), (name.map(str::to_owned), email.map(str::to_owned)), "{value:?}");
        }
    }

    #[test]
    fn config_is_read_from_toml_with_defaults_and_checked() {
        let toml_text = "domain = \"acme\"\napi_key = { env = \"FRESHDESK_API_KEY\" }\n";
        let config: FreshdeskConfig = toml::from_str(toml_text).unwrap();
        assert_eq!((config.per_page, config.include_private_notes, config.base_url.as_deref()), (100, false, None));
        assert_eq!(config.credential_key(), "freshdesk https://acme.freshdesk.com/ Env(\"FRESHDESK_API_KEY\")");
        for unknown in ["subdomain = \"acme\"", "api_token = \"x\"", "per_page = 50\nfilter = \"deleted\""] {
            assert!(toml::from_str::<FreshdeskConfig>(&format!("{toml_text}{unknown}")).is_err(), "{unknown}");
        }
        assert!(toml::from_str::<FreshdeskConfig>("domain = \"acme\"").is_err(), "api_key is required");
        assert!(toml::from_str::<FreshdeskConfig>("domain = \"acme\"\napi_key = \"plain\"").is_err(), "no plain key");

        let config = FreshdeskConfig { api_key: SecretRef::File(key_file("config", KEY)), ..config };
        let source = FreshdeskSource::new("hd", config.clone(), HttpOptions::default()).unwrap();
        assert_eq!(source.platform(), "freshdesk");
        assert_eq!(
            source.list_url(Stream::Deleted, at("2024-05-01T10:20:30.999Z"), 2).as_str(),
            "https://acme.freshdesk.com/api/v2/tickets?filter=deleted&updated_since=2024-05-01T10%3A20%3A30Z&order_by=updated_at&order_type=asc&per_page=100&page=2&include=requester%2Cdescription"
        );
        assert_eq!(source.web_url(42), "https://acme.freshdesk.com/a/tickets/42");
        let full = FreshdeskConfig { domain: Some(" Acme.freshdesk.com ".into()), ..config.clone() };
        assert_eq!(FreshdeskSource::new("hd", full, HttpOptions::default()).unwrap().root, source.root);
        let proxied =
            FreshdeskConfig { domain: None, base_url: Some("https://proxy.example.com/fd/".into()), ..config.clone() };
        let proxied = FreshdeskSource::new("hd", proxied, HttpOptions::default()).unwrap();
        assert_eq!(
            proxied.conversations_url(9, 1).as_str(),
            "https://proxy.example.com/fd/api/v2/tickets/9/conversations?per_page=100&page=1"
        );

        let build = |config: FreshdeskConfig| FreshdeskSource::new("hd", config, HttpOptions::default()).unwrap_err();
        let cases: Vec<(FreshdeskConfig, &str)> = vec![
            (FreshdeskConfig { domain: None, ..config.clone() }, "`domain`"),
            (FreshdeskConfig { base_url: Some("https://acme.freshdesk.com".into()), ..config.clone() }, "`base_url`"),
            (FreshdeskConfig { domain: Some("acme.zendesk.com".into()), ..config.clone() }, "`domain`"),
            (FreshdeskConfig { domain: Some("a b".into()), ..config.clone() }, "`domain`"),
            (FreshdeskConfig { domain: Some("".into()), ..config.clone() }, "`domain`"),
            (
                FreshdeskConfig { domain: None, base_url: Some("ftp://acme.freshdesk.com".into()), ..config.clone() },
                "`base_url`",
            ),
            (
                FreshdeskConfig { domain: None, base_url: Some("acme.freshdesk.com".into()), ..config.clone() },
                "`base_url`",
            ),
            (FreshdeskConfig { per_page: 0, ..config.clone() }, "`per_page`"),
            (FreshdeskConfig { per_page: 101, ..config.clone() }, "`per_page`"),
            (
                FreshdeskConfig { api_key: SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into()), ..config.clone() },
                "`api_key`",
            ),
            (
                FreshdeskConfig { api_key: SecretRef::File(key_file("config_colon", "user:pass")), ..config.clone() },
                "`api_key`",
            ),
        ];
        for (config, key) in cases {
            let error = build(config).to_string();
            assert!(error.contains(key), "{error}");
        }
        let missing =
            build(FreshdeskConfig { api_key: SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into()), ..config });
        assert!(
            matches!(missing, BuildError::Secret(_)) && missing.to_string().contains("TRIBUTARY_TEST_SURELY_UNSET")
        );
    }

    #[tokio::test]
    async fn an_unreadable_cursor_starts_over() {
        let server = MockServer::start().await;
        let since = "2016-01-01T00:00:00Z";
        serve_tickets(&server, Stream::Tickets, since, 1, tickets(&server, vec![], false)).await;
        serve_tickets(&server, Stream::Deleted, since, 1, tickets(&server, vec![], false)).await;
        let source = source(config(&server, "unreadable", ""));
        let pages = round(&source, Some(Cursor("{\"tickets\": 7}".into())), Some(since)).await;
        assert_eq!(more(&pages), [true, false]);
    }
}
