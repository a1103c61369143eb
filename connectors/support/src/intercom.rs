//! Intercom: the conversations of a workspace, each with its parts.
//!
//! What this connector relies on, from Intercom's REST API reference
//! (developers.intercom.com, versions 2.10 to 2.14, and the OpenAPI
//! description `intercom/Intercom-OpenAPI`, whose 2.11 examples are the
//! recorded fixtures of the tests):
//!
//! - **Finding changes.** `POST /conversations/search` takes a `query`
//!   (here `updated_at > <unix seconds>`; `updated_at` is a "Date (UNIX
//!   timestamp)" field), a `sort` (`{ field: "updated_at", order:
//!   "ascending" }`: accepted by Intercom though the 2.11 description leaves
//!   it out, Intercom-OpenAPI issue 114) and `pagination: { per_page,
//!   starting_after }` (20 by default, at most 150). A page with more after
//!   it names `pages.next.starting_after`; the last one has no `next`.
//! - **Passes and the watermark.** A *pass* asks for everything updated at or
//!   after its lower bound and follows `starting_after` to the last page; its
//!   query never changes on the way. When the pass ends, the watermark
//!   becomes the newest `updated_at` the search answered during it (never
//!   the one of a conversation fetched later, which may have moved since).
//!   The next pass starts [`IntercomConfig::overlap_seconds`] before the
//!   watermark: Intercom's search documentation warns that a recent change
//!   may take a moment of processing to show, and the daemon's ledger drops
//!   what comes back unchanged. Nothing depends on the order of the answer,
//!   so a `sort` that Intercom ignored would cost nothing but order.
//! - **First pass.** It starts at [`PollRequest::since`] (kept in the cursor).
//!   Without one, it takes the newest page only (sorted `descending`) and
//!   watches from there: older conversations are left out.
//! - **Parts.** The search answers conversations without their parts, so each
//!   one is fetched with `GET /conversations/{id}` (its parts in
//!   `conversation_parts.conversation_parts`, at most 500: Intercom names no
//!   way to read further ones, and a longer conversation is logged). This
//!   costs one request per conversation on a page; there is no cheaper way to
//!   read parts (the list and search endpoints never include them). The
//!   fetches go one after another on the shared rate budget.
//! - **Mapping.** A conversation is a [`Kind::Ticket`] (`conversation:{id}`):
//!   title = its `title`, else the first message's `subject`; body = the
//!   first message (`source.body`, HTML to plain text); author = the first
//!   message's author; tags = the conversation's tag names (on the ticket
//!   only, so a new tag does not resend every part); url = the inbox address
//!   when [`IntercomConfig::workspace_id`] is set. Each further part with a
//!   message is a [`Kind::TicketComment`] (`part:{id}`) whose `parent_id` and
//!   `thread_id` are the conversation's external id. Parts without a message
//!   (assignments, state changes, ratings without text) are skipped; a part
//!   whose only content is attachments keeps their names as its body.
//! - **Authors.** `source.author` and each part's `author` carry `type`
//!   (`user`, `lead`, `contact`, `admin`, `bot`, `team`), `id`, `name` and
//!   `email`. A customer (`user`, `lead`, `contact`) keeps Intercom's contact
//!   id as the author id, so one person is one identity whatever their role;
//!   a teammate's id is prefixed with its type (`admin:991267553`), so no
//!   teammate can ever be taken for a customer. The e-mail is the author's
//!   own (trimmed; dropped when it is not an address), which links the person
//!   across communities. Teammate replies (admins, bots, teams, Fin) are
//!   included as ticket comments under the teammate's own name and e-mail,
//!   unless [`IntercomConfig::include_teammate_replies`] is off; internal
//!   notes only with [`IntercomConfig::include_notes`]. The ticket of a
//!   conversation a teammate started is attributed to that teammate: it is
//!   their words.
//! - **Edits.** Intercom has no edit marker and lets no one rewrite a sent
//!   message; a conversation whose title, tags or first message changed comes
//!   back with the same external id and the ledger sends the new content.
//!   `updated_at` is left empty on contributions: a conversation's moves with
//!   every event, and a part's with its delivery, neither of which is an edit.
//! - **Deletions.** A part or first message that was redacted
//!   (`POST /conversations/redact`) keeps its id with `redacted: true`, and
//!   redaction moves the conversation's `updated_at`, so the next pass sees
//!   it: it comes back with `deleted = true` and an empty body (Intercom
//!   names no other part type for it). A conversation that answers 404
//!   between the search and its fetch was deleted: its ticket comes back
//!   deleted. A conversation deleted while no pass ran simply disappears;
//!   nothing marks it.
//! - **Auth.** An access token as `Authorization: Bearer`, and the
//!   `Intercom-Version` header ([`IntercomConfig::api_version`]). Workspaces
//!   hosted in Europe or Australia answer at `https://api.eu.intercom.io` and
//!   `https://api.au.intercom.io`.
//! - **Rate limits.** Every answer carries `X-RateLimit-Limit`,
//!   `X-RateLimit-Remaining` and `X-RateLimit-Reset` (a Unix time; the budget
//!   is spread over 10-second windows), and a spent budget answers `429`.
//!   The shared client reads exactly these headers: a short wait is honoured
//!   inside the poll, a longer one returns [`HttpError::RateLimited`] and no
//!   request leaves before the reset, for every source on this token.

use std::{cmp::max, collections::HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{
    RequestBuilder, StatusCode,
    header::{ACCEPT, AUTHORIZATION, HeaderValue},
};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, SecretError, SecretRef, Source, SourceError,
    source::check_status,
    text::{html_to_text, tidy},
};
use url::Url;

const PLATFORM: &str = "intercom";

const DEFAULT_BASE_URL: &str = "https://api.intercom.io";

/// The version of the recorded examples; 2.12 to 2.14 keep every field read here.
const DEFAULT_API_VERSION: &str = "2.11";

/// Intercom's largest search page.
const MAX_PER_PAGE: u32 = 150;

/// Settings of one Intercom workspace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntercomConfig {
    /// An access token (`{ env = "..." }` or `{ file = "..." }`), sent as
    /// `Authorization: Bearer`: a private app's token from the Developer
    /// Hub, with permission to read conversations.
    pub access_token: SecretRef,
    /// Root of the REST API: `https://api.intercom.io`, or the regional
    /// `https://api.eu.intercom.io` / `https://api.au.intercom.io`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Sent as the `Intercom-Version` header, e.g. `"2.11"`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Conversations per search page, 1 to 150. Each one costs one more
    /// request (its parts), so a poll makes `per_page + 1` requests.
    #[serde(default = "default_per_page")]
    pub per_page: u32,
    /// The workspace (app) id, as in `https://app.intercom.com/a/apps/<id>/...`:
    /// when set, contributions link to the conversation in the inbox and
    /// customers to their profile. Without it they have no URL.
    #[serde(default)]
    pub workspace_id: Option<String>,
    /// Take the replies of teammates (admins, bots, teams, Fin) as ticket
    /// comments, attributed to the teammate. Off: only the customers' own
    /// parts (the tickets are always taken).
    #[serde(default = "default_true")]
    pub include_teammate_replies: bool,
    /// Also take internal notes (`part_type = "note"`), which customers
    /// never see.
    #[serde(default)]
    pub include_notes: bool,
    /// Each pass asks again for conversations updated this many seconds
    /// before the watermark, for changes the search index showed late.
    #[serde(default = "default_overlap_seconds")]
    pub overlap_seconds: u32,
}

fn default_base_url() -> String {
    DEFAULT_BASE_URL.to_owned()
}

fn default_api_version() -> String {
    DEFAULT_API_VERSION.to_owned()
}

fn default_per_page() -> u32 {
    20
}

fn default_true() -> bool {
    true
}

fn default_overlap_seconds() -> u32 {
    60
}

impl IntercomConfig {
    /// The API host and the token's *reference* (never its value): sources
    /// on one token share one rate budget.
    pub fn credential_key(&self) -> String {
        let host = Url::parse(self.base_url.trim())
            .ok()
            .and_then(|url| url.host_str().map(str::to_owned))
            .unwrap_or_else(|| self.base_url.trim().to_owned());
        format!("{host} {:?}", self.access_token)
    }
}

/// Why an [`IntercomSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("intercom `access_token`: {0}")]
    Secret(#[from] SecretError),
    #[error("intercom `access_token` holds characters that are not allowed in an HTTP header")]
    InvalidToken,
    #[error("intercom `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("intercom `api_version` must be a version such as `2.11` (or `Unstable`), not `{0}`")]
    InvalidApiVersion(String),
    #[error("intercom `per_page` must be between 1 and 150, not {0}")]
    InvalidPerPage(u32),
    #[error("intercom `workspace_id` must be letters and digits only, not `{0}`")]
    InvalidWorkspaceId(String),
    #[error("intercom HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// The conversations of an Intercom workspace.
#[derive(Debug)]
pub struct IntercomSource {
    instance: String,
    config: IntercomConfig,
    base_url: Url,
    /// `app.intercom.com`, or its regional twin, when a workspace id is set.
    inbox: Option<Inbox>,
    http: HttpClient,
    /// `Bearer <token>`, marked sensitive so Debug never shows it.
    authorization: HeaderValue,
}

/// Where the inbox of the workspace lives.
#[derive(Debug, Clone)]
struct Inbox {
    host: String,
    workspace_id: String,
}

/// What the cursor of an Intercom source holds (Unix seconds throughout).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct IntercomCursor {
    /// The newest `updated_at` the search answered in a finished pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark: Option<i64>,
    /// The oldest change to fetch: the [`PollRequest::since`] of the first poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<i64>,
    /// The pass in progress, while it pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<Pass>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pass {
    /// The pass asks for `updated_at >= from`; the same on every page.
    from: i64,
    /// `pages.next.starting_after` of the last page.
    starting_after: String,
    /// The newest `updated_at` this pass has seen: the next watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<i64>,
}

/// One page of search results.
struct SearchPage {
    conversations: Vec<Value>,
    next: Option<String>,
}

/// A conversation fetched by id.
enum Fetched {
    Found(Value),
    /// A 2xx answer that is no JSON object: quarantined, the page goes on.
    Unreadable(String),
    /// 404: deleted since the search listed it.
    Gone,
}

impl IntercomSource {
    pub fn new(instance: &str, config: IntercomConfig, http: HttpOptions) -> Result<IntercomSource, BuildError> {
        let base_url = Url::parse(config.base_url.trim())
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base() && url.has_host())
            .ok_or_else(|| BuildError::InvalidBaseUrl(config.base_url.clone()))?;
        let version = config.api_version.trim();
        let version_ok = !version.is_empty()
            && version.len() <= 16
            && version.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
        if !version_ok {
            return Err(BuildError::InvalidApiVersion(config.api_version.clone()));
        }
        if !(1..=MAX_PER_PAGE).contains(&config.per_page) {
            return Err(BuildError::InvalidPerPage(config.per_page));
        }
        let inbox = match config.workspace_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Some(Inbox { host: inbox_host(&base_url), workspace_id: id.to_owned() })
            }
            Some(_) => return Err(BuildError::InvalidWorkspaceId(config.workspace_id.clone().unwrap_or_default())),
            None => None,
        };
        let token = config.access_token.resolve()?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret().trim()))
            .map_err(|_| BuildError::InvalidToken)?;
        authorization.set_sensitive(true);
        Ok(IntercomSource {
            instance: instance.to_owned(),
            http: HttpClient::new(http)?,
            config,
            base_url,
            inbox,
            authorization,
        })
    }

    /// `base_url` with `segments` appended as path segments (encoded).
    fn endpoint(&self, segments: &[&str]) -> Url {
        tributary_sdk::source::endpoint(&self.base_url, segments)
    }

    /// Sends a request with the API's headers; the answer whatever its status.
    async fn send(&self, request: RequestBuilder) -> Result<HttpResponse, SourceError> {
        let request = request
            .header(AUTHORIZATION, self.authorization.clone())
            .header("Intercom-Version", self.config.api_version.trim())
            .header(ACCEPT, "application/json");
        Ok(self.http.send(request).await?)
    }

    /// The search body: `updated_at >= from` (all, newest first, without a
    /// `from`), one page of `per_page`, after `starting_after`.
    fn search_body(&self, from: Option<i64>, starting_after: Option<&str>) -> Value {
        // Intercom's `>` is strict and counts whole seconds: one second less
        // takes in what changed in the second of `from` itself.
        let after = from.map_or(0, |from| from.saturating_sub(1).max(0));
        let order = if from.is_some() { "ascending" } else { "descending" };
        let mut pagination = json!({ "per_page": self.config.per_page });
        if let Some(cursor) = starting_after {
            pagination["starting_after"] = Value::from(cursor);
        }
        json!({
            // The documented examples send the timestamp as a string.
            "query": { "field": "updated_at", "operator": ">", "value": after.to_string() },
            "sort": { "field": "updated_at", "order": order },
            "pagination": pagination,
        })
    }

    async fn search(&self, body: &Value) -> Result<SearchPage, SourceError> {
        let url = self.endpoint(&["conversations", "search"]);
        let response = self.send(self.http.post(url).json(body)).await?;
        check_status(&response)?;
        let body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
        let Some(conversations) = body.get("conversations").and_then(Value::as_array) else {
            return Err(SourceError::Decode(format!("{} answered no `conversations` list", response.target)));
        };
        let next = body
            .pointer("/pages/next/starting_after")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|cursor| !cursor.is_empty())
            .map(str::to_owned);
        Ok(SearchPage { conversations: conversations.clone(), next })
    }

    async fn fetch_conversation(&self, id: &str) -> Result<Fetched, SourceError> {
        let url = self.endpoint(&["conversations", id]);
        let response = self.send(self.http.get(url)).await?;
        if response.status == StatusCode::NOT_FOUND {
            return Ok(Fetched::Gone);
        }
        check_status(&response)?;
        match serde_json::from_slice::<Value>(&response.body) {
            Ok(value @ Value::Object(_)) => Ok(Fetched::Found(value)),
            _ => Ok(Fetched::Unreadable(response.body_snippet())),
        }
    }

    /// Fetches and maps each conversation of a search page. A quarantine of
    /// an item at or before `watermark` was reported by the pass that first
    /// saw it, and is not repeated.
    async fn read_page(
        &self,
        conversations: Vec<Value>,
        watermark: Option<i64>,
    ) -> Result<(Page, Option<i64>), SourceError> {
        let mut page = Page::default();
        let mut top = None;
        let mut fetched: HashSet<String> = HashSet::new();
        for listed in conversations {
            let updated_at = listed.get("updated_at").and_then(Value::as_i64);
            top = max(top, updated_at);
            let seen_before = updated_at.is_some() && updated_at <= watermark;
            let mut quarantined = Vec::new();
            match listed.get("id").and_then(id_text) {
                None => quarantined.push(quarantine(None, "the search listed a conversation without an `id`", &listed)),
                // Listed twice on one page: once is enough.
                Some(id) if !fetched.insert(id.clone()) => {}
                Some(id) => match self.fetch_conversation(&id).await? {
                    Fetched::Unreadable(snippet) => quarantined.push(Quarantined::new(
                        Some(format!("conversation:{id}")),
                        "Intercom answered something that is not a conversation",
                        &snippet,
                    )),
                    Fetched::Found(full) => {
                        self.read_conversation(&id, &full, &mut page.contributions, &mut quarantined)
                    }
                    Fetched::Gone => {
                        tracing::info!(source = %self.instance, conversation = %id, "intercom conversation is gone");
                        let mut into = Vec::new();
                        self.read_conversation(&id, &listed, &mut into, &mut quarantined);
                        page.contributions.extend(
                            into.into_iter().filter(|c| c.kind == Kind::Ticket).map(|ticket| Contribution {
                                body: String::new(),
                                deleted: true,
                                ..ticket
                            }),
                        );
                    }
                },
            }
            if !seen_before {
                page.quarantined.extend(quarantined);
            }
        }
        Ok((page, top))
    }

    /// Maps one fetched conversation: its ticket and its parts.
    fn read_conversation(
        &self,
        listed_id: &str,
        value: &Value,
        contributions: &mut Vec<Contribution>,
        quarantined: &mut Vec<Quarantined>,
    ) {
        let ticket_id = Some(format!("conversation:{listed_id}"));
        let raw = match serde_json::from_value::<RawConversation>(value.clone()) {
            Ok(raw) => raw,
            Err(error) => {
                quarantined.push(quarantine(ticket_id, format!("cannot read the conversation: {error}"), value));
                return;
            }
        };
        let id = raw.id.as_ref().and_then(RawId::text).unwrap_or_else(|| listed_id.to_owned());
        if id != listed_id {
            let reason = format!("asked for conversation `{listed_id}`, Intercom answered `{id}`");
            quarantined.push(quarantine(ticket_id, reason, value));
            return;
        }
        let Some(created_at) = timestamp(raw.created_at) else {
            quarantined.push(quarantine(ticket_id, "the conversation has no readable `created_at`", value));
            return;
        };
        let thread = format!("conversation:{id}");
        let url = self.conversation_url(&id);
        let source = raw.source.unwrap_or_default();
        let title = raw
            .title
            .as_deref()
            .map(tidy)
            .filter(|title| !title.is_empty())
            .or_else(|| source.subject.as_deref().map(html_to_text).filter(|subject| !subject.is_empty()));
        let redacted = source.redacted.unwrap_or(false);
        contributions.push(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: thread.clone(),
            url: url.clone(),
            kind: Kind::Ticket,
            author: self.author(source.author.as_ref()),
            title,
            body: if redacted { String::new() } else { html_to_text(source.body.as_deref().unwrap_or_default()) },
            language: None,
            created_at,
            updated_at: None,
            parent_id: None,
            thread_id: Some(thread.clone()),
            tags: raw.tags.as_ref().map(tag_names).unwrap_or_default(),
            score: None,
            edited: false,
            deleted: redacted,
            signals: None,
        });

        let list = raw.conversation_parts.unwrap_or_default();
        let parts = list.conversation_parts.unwrap_or_default();
        if list.total_count.is_some_and(|total| total > parts.len() as u64) {
            tracing::warn!(
                source = %self.instance, conversation = %id, listed = parts.len(), total = ?list.total_count,
                "intercom answered only part of a long conversation; later parts are not read"
            );
        }
        for part in &parts {
            let part_id = part.get("id").and_then(id_text).map(|id| format!("part:{id}"));
            match serde_json::from_value::<RawPart>(part.clone())
                .map_err(|error| format!("cannot read the conversation part: {error}"))
                .and_then(|raw| self.part(raw, &thread, url.as_deref()))
            {
                Ok(Some(contribution)) => contributions.push(contribution),
                Ok(None) => {}
                Err(reason) => quarantined.push(quarantine(part_id, reason, part)),
            }
        }
    }

    /// A part as a ticket comment; `None` for a part without a message, or
    /// one the configuration leaves out.
    fn part(&self, raw: RawPart, thread: &str, url: Option<&str>) -> Result<Option<Contribution>, String> {
        let id = raw.id.text().ok_or("the part has an empty `id`")?;
        let created_at = timestamp(raw.created_at).ok_or("the part has no readable `created_at`")?;
        let part_type = raw.part_type.as_deref().unwrap_or_default();
        if part_type == "note" && !self.config.include_notes {
            return Ok(None);
        }
        let by_teammate = raw.author.as_ref().is_some_and(RawAuthor::is_teammate);
        if by_teammate && !self.config.include_teammate_replies {
            return Ok(None);
        }
        let redacted = raw.redacted.unwrap_or(false);
        let body = if redacted {
            String::new()
        } else {
            let text = html_to_text(raw.body.as_deref().unwrap_or_default());
            if text.is_empty() { attachment_names(raw.attachments.as_deref().unwrap_or_default()) } else { text }
        };
        if body.is_empty() && !redacted {
            return Ok(None);
        }
        Ok(Some(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: format!("part:{id}"),
            url: url.map(str::to_owned),
            kind: Kind::TicketComment,
            author: self.author(raw.author.as_ref()),
            title: None,
            body,
            language: None,
            created_at,
            updated_at: None,
            parent_id: Some(thread.to_owned()),
            thread_id: Some(thread.to_owned()),
            tags: Vec::new(),
            score: None,
            edited: false,
            deleted: redacted,
            signals: None,
        }))
    }

    fn author(&self, raw: Option<&RawAuthor>) -> Author {
        let Some(raw) = raw else { return Author::default() };
        let Some(id) = raw.id.as_ref().and_then(RawId::text) else {
            // Intercom names no author (Twitter, some automations).
            return Author::default();
        };
        let kind = raw.kind();
        let customer = raw.is_customer();
        let profile_url = match &self.inbox {
            Some(inbox) if customer => Some(format!("https://{}/a/apps/{}/users/{id}", inbox.host, inbox.workspace_id)),
            _ => None,
        };
        Author {
            // A teammate never shares an identity with a customer.
            id: if customer || kind.is_empty() { id } else { format!("{kind}:{id}") },
            handle: None,
            display_name: raw.name.as_deref().map(str::trim).filter(|name| !name.is_empty()).map(str::to_owned),
            email: raw.email.as_deref().and_then(email),
            profile_url,
            links: Vec::new(),
        }
    }

    fn conversation_url(&self, id: &str) -> Option<String> {
        let inbox = self.inbox.as_ref()?;
        let mut url =
            Url::parse(&format!("https://{}/a/apps/{}/conversations", inbox.host, inbox.workspace_id)).ok()?;
        url.path_segments_mut().ok()?.push(id);
        Some(url.to_string())
    }
}

/// `app.intercom.com` for `api.intercom.io`, `app.eu.intercom.com` for
/// `api.eu.intercom.io` (likewise `au`); any other host gets the default.
fn inbox_host(base_url: &Url) -> String {
    let host = base_url.host_str().unwrap_or_default().to_lowercase();
    match host.strip_prefix("api.").and_then(|rest| rest.strip_suffix(".intercom.io")) {
        Some(region) if !region.is_empty() && region.chars().all(|c| c.is_ascii_alphanumeric()) => {
            format!("app.{region}.intercom.com")
        }
        _ => "app.intercom.com".to_owned(),
    }
}

/// An id Intercom sends as a string (or, in older versions, a number).
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.trim().to_owned()).filter(|text| !text.is_empty()),
        Value::Number(number) => number.as_u64().map(|n| n.to_string()),
        _ => None,
    }
}

/// Unix seconds as a time; anything else (text, zero, out of range) is none.
fn timestamp(seconds: Option<Value>) -> Option<DateTime<Utc>> {
    seconds.as_ref().and_then(Value::as_i64).filter(|s| *s > 0).and_then(|s| DateTime::from_timestamp(s, 0))
}

/// A trimmed address, or nothing when it is not one.
fn email(raw: &str) -> Option<String> {
    let email = raw.trim();
    let (local, domain) = email.split_once('@')?;
    let valid =
        !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !email.contains(char::is_whitespace);
    valid.then(|| email.to_owned())
}

/// The names of a `tag.list` (`{ "tags": [{ "name": ... }] }`, or a bare list).
fn tag_names(tags: &Value) -> Vec<String> {
    let list = match tags {
        Value::Array(list) => list.as_slice(),
        other => other.get("tags").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default(),
    };
    list.iter().filter_map(|tag| tag.get("name").and_then(Value::as_str)).map(tidy).filter(|n| !n.is_empty()).collect()
}

/// A message of attachments only: their names, one a line.
fn attachment_names(attachments: &[Value]) -> String {
    let names: Vec<String> = attachments
        .iter()
        .filter_map(|attachment| attachment.get("name").and_then(Value::as_str))
        .map(tidy)
        .filter(|name| !name.is_empty())
        .map(|name| format!("[attachment] {name}"))
        .collect();
    names.join("\n")
}

fn quarantine(external_id: Option<String>, reason: impl Into<String>, raw: &Value) -> Quarantined {
    let raw = match raw {
        Value::String(text) => text.clone(),
        other => serde_json::to_string(other).unwrap_or_default(),
    };
    Quarantined::new(external_id, reason, &raw)
}

/// An id as a string or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawId {
    Text(String),
    Number(u64),
}

impl RawId {
    fn text(&self) -> Option<String> {
        match self {
            RawId::Text(text) => Some(text.trim().to_owned()).filter(|text| !text.is_empty()),
            RawId::Number(number) => Some(number.to_string()),
        }
    }
}

/// The fields of a conversation this connector reads.
#[derive(Debug, Deserialize)]
struct RawConversation {
    #[serde(default)]
    id: Option<RawId>,
    /// Read by [`timestamp`], so a bad value is named in the quarantine.
    #[serde(default)]
    created_at: Option<Value>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    source: Option<RawSource>,
    #[serde(default)]
    tags: Option<Value>,
    #[serde(default)]
    conversation_parts: Option<RawPartList>,
}

/// The first message of a conversation.
#[derive(Debug, Default, Deserialize)]
struct RawSource {
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    author: Option<RawAuthor>,
    #[serde(default)]
    redacted: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct RawPartList {
    /// Read one by one, so one malformed part does not hide the others.
    #[serde(default)]
    conversation_parts: Option<Vec<Value>>,
    #[serde(default)]
    total_count: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct RawPart {
    id: RawId,
    #[serde(default)]
    part_type: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    created_at: Option<Value>,
    #[serde(default)]
    author: Option<RawAuthor>,
    #[serde(default)]
    attachments: Option<Vec<Value>>,
    #[serde(default)]
    redacted: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct RawAuthor {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    id: Option<RawId>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

impl RawAuthor {
    fn kind(&self) -> String {
        self.kind.as_deref().map(str::trim).unwrap_or_default().to_lowercase()
    }

    /// A contact of the workspace: a user, a lead, or (newer versions) a contact.
    fn is_customer(&self) -> bool {
        matches!(self.kind().as_str(), "user" | "lead" | "contact")
    }

    /// Someone (or something) answering for the workspace.
    fn is_teammate(&self) -> bool {
        matches!(self.kind().as_str(), "admin" | "bot" | "team")
    }
}

#[async_trait]
impl Source for IntercomSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor: IntercomCursor = request.stored().unwrap_or_default();
        cursor.since = request.since.map(|since| since.timestamp()).or(cursor.since);
        let (from, starting_after, top_before) = match &cursor.pass {
            Some(pass) => (Some(pass.from), Some(pass.starting_after.clone()), pass.top),
            None => {
                let overlap = i64::from(self.config.overlap_seconds);
                let from = match (cursor.watermark.map(|w| w.saturating_sub(overlap)), cursor.since) {
                    (Some(watermark), Some(since)) => Some(max(watermark, since)),
                    (watermark, since) => watermark.or(since),
                };
                (from, None, None)
            }
        };
        let body = self.search_body(from, starting_after.as_deref());
        let SearchPage { conversations, next } = self.search(&body).await?;
        let listed = conversations.len();
        let (mut page, page_top) = self.read_page(conversations, cursor.watermark).await?;
        let top = max(top_before, page_top);

        // The newest page alone (no `from`) starts watching; it is never followed.
        let next = match (from, next) {
            (Some(from), Some(next)) if listed > 0 && Some(&next) != starting_after.as_ref() => Some((from, next)),
            (Some(_), Some(_)) if listed > 0 => {
                tracing::warn!(source = %self.instance, "intercom sent the same page as next; ending the pass");
                None
            }
            _ => None,
        };
        match next {
            Some((from, starting_after)) => {
                cursor.pass = Some(Pass { from, starting_after, top });
                page.has_more = true;
            }
            None => {
                cursor.watermark = max(cursor.watermark, top);
                cursor.pass = None;
                page.has_more = false;
                tracing::info!(source = %self.instance, watermark = ?cursor.watermark, "intercom pass complete");
            }
        }
        tracing::debug!(
            source = %self.instance, listed, contributions = page.contributions.len(),
            quarantined = page.quarantined.len(), "intercom page polled"
        );
        page.next_cursor = Some(Cursor::from_json(&cursor));
        Ok(page)
    }

    /// `GET /me`: the token is accepted (and names its admin).
    async fn check(&self) -> Result<(), SourceError> {
        let response = self.send(self.http.get(self.endpoint(&["me"]))).await?;
        check_status(&response)?;
        serde_json::from_slice::<Value>(&response.body)
            .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        sync::atomic::{AtomicU32, Ordering},
        time::{Duration, Instant},
    };

    use serde_json::json;
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{body_partial_json, header, method, path},
    };

    use super::*;

    /// A made-up token: it must never show up anywhere.
    const TOKEN: &str = "dG9rOjk5MTI2NzU1M19zM2NyM3RfdmFsdWU=";
    /// The recorded conversation of `conversations_search`.
    const LISTED: &str = "378";
    /// Its `updated_at`.
    const LISTED_AT: i64 = 1_719_492_843;
    /// The contact of the recorded conversations.
    const CONTACT: &str = "667d60d88a68186f43bafde1";
    /// Before every recorded timestamp.
    const SINCE: i64 = 1_717_200_000;

    fn options() -> HttpOptions {
        HttpOptions {
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(5),
            max_retries: 2,
            ..HttpOptions::default()
        }
    }

    /// A file holding [`TOKEN`], unique to the caller.
    fn token_file() -> PathBuf {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let n = COUNT.fetch_add(1, Ordering::SeqCst);
        let file = std::env::temp_dir().join(format!("tributary-intercom-{}-{n}", std::process::id()));
        std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
        file
    }

    /// A config on the mock server; `extra` adds or overrides keys.
    fn config(server: &MockServer, extra: Value) -> IntercomConfig {
        let mut value = json!({ "access_token": { "file": token_file() }, "base_url": server.uri() });
        if let (Some(fields), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
            fields.extend(extra.clone());
        }
        serde_json::from_value(value).unwrap()
    }

    fn build(config: IntercomConfig) -> IntercomSource {
        let file = match &config.access_token {
            SecretRef::File(file) => Some(file.clone()),
            SecretRef::Env(_) => None,
        };
        let source = IntercomSource::new("support", config, options()).unwrap();
        if let Some(file) = file {
            std::fs::remove_file(file).unwrap();
        }
        source
    }

    fn source(server: &MockServer) -> IntercomSource {
        build(config(server, json!({})))
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    /// The recorded conversation as the search lists it, with another id and `updated_at`.
    fn listed(id: &str, updated_at: i64) -> Value {
        let mut item = Fixture::load("intercom", "conversations_search").body["conversations"][0].clone();
        item["id"] = id.into();
        item["updated_at"] = updated_at.into();
        item
    }

    /// The recorded search answer with `conversations` replaced, and a
    /// `pages.next` added when `next` is given (the recorded one has a single page).
    fn search_page(conversations: Vec<Value>, next: Option<&str>) -> ResponseTemplate {
        let mut fixture = Fixture::load("intercom", "conversations_search");
        fixture.body["total_count"] = conversations.len().into();
        fixture.body["conversations"] = Value::Array(conversations);
        if let Some(next) = next {
            fixture.body["pages"]["next"] = json!({ "page": 2, "starting_after": next });
            fixture.body["pages"]["total_pages"] = 2.into();
        }
        fixture.response()
    }

    /// The recorded conversation (`conversation_by_id`, which has no parts)
    /// with another id and `updated_at`, and `parts` added.
    fn conversation(id: &str, updated_at: i64, parts: Vec<Value>) -> Value {
        let mut body = Fixture::load("intercom", "conversation_by_id").body;
        body["id"] = id.into();
        body["updated_at"] = updated_at.into();
        body["conversation_parts"]["total_count"] = parts.len().into();
        body["conversation_parts"]["conversation_parts"] = Value::Array(parts);
        body
    }

    /// A part shaped like the `conversation_part` example of the OpenAPI
    /// description (the recorded conversation has none of its own).
    fn part(id: &str, part_type: &str, author: Value, body: Option<&str>) -> Value {
        json!({
            "type": "conversation_part", "id": id, "part_type": part_type, "body": body,
            "created_at": 1_719_492_900, "updated_at": 1_719_492_900, "notified_at": 1_719_492_900,
            "assigned_to": null, "author": author, "attachments": [], "external_id": null, "redacted": false,
        })
    }

    /// The recorded conversation's contact as a part author; name and e-mail made up.
    fn customer() -> Value {
        json!({ "type": "user", "id": CONTACT, "name": "Maya Chen", "email": " maya.chen@example.com " })
    }

    /// The recorded admin (`source.author` of `conversation_by_id`).
    fn admin() -> Value {
        Fixture::load("intercom", "conversation_by_id").body["source"]["author"].clone()
    }

    fn bot() -> Value {
        json!({ "type": "bot", "id": "1650", "name": "Fin", "email": "operator+abcd1234@intercom.io" })
    }

    /// A customer comment, a teammate reply, an assignment without a
    /// message, an internal note, a bot answer and a screenshot alone.
    fn standard_parts() -> Vec<Value> {
        let mut screenshot = part("1006", "comment", customer(), Some(""));
        screenshot["attachments"] = json!([{
            "type": "upload", "name": "screenshot.png", "url": "https://example.com/s.png",
            "content_type": "image/png", "filesize": 100, "width": 100, "height": 100,
        }]);
        vec![
            part("1001", "comment", customer(), Some("<p>My export to PDF fails &amp; I need it <b>today</b>.</p>")),
            part("1002", "comment", admin(), Some("<p>Sorry about that! Looking into it.</p>")),
            part("1003", "assignment", admin(), None),
            part("1004", "note", admin(), Some("<p>Escalating to engineering</p>")),
            part("1005", "comment", bot(), Some("<p>Did this answer help?</p>")),
            screenshot,
        ]
    }

    async fn serve_search(server: &MockServer, response: ResponseTemplate) {
        Mock::given(method("POST")).and(path("/conversations/search")).respond_with(response).mount(server).await;
    }

    async fn serve_conversation(server: &MockServer, id: &str, body: Value) {
        Mock::given(method("GET"))
            .and(path(format!("/conversations/{id}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(server)
            .await;
    }

    async fn poll(source: &IntercomSource, cursor: Option<Cursor>, since: Option<i64>) -> Page {
        source.poll(&PollRequest { cursor, since: since.map(at) }).await.unwrap()
    }

    fn cursor(page: &Page) -> IntercomCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn stored(cursor: &IntercomCursor) -> Option<Cursor> {
        Some(Cursor::from_json(cursor))
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    fn find<'a>(page: &'a Page, id: &str) -> &'a Contribution {
        page.contributions.iter().find(|c| c.external_id == id).unwrap()
    }

    /// The bodies of the searches the server received, in order.
    async fn searches(server: &MockServer) -> Vec<Value> {
        let requests = server.received_requests().await.unwrap();
        requests
            .iter()
            .filter(|r| r.url.path() == "/conversations/search")
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect()
    }

    /// One expected contribution, checked by value.
    struct Expect<'a> {
        id: &'a str,
        kind: Kind,
        author: &'a str,
        email: Option<&'a str>,
        name: Option<&'a str>,
        title: Option<&'a str>,
        body: &'a str,
        deleted: bool,
    }

    /// The page holds exactly `expected`, in order, each in conversation `thread`.
    fn check(page: &Page, thread: &str, expected: &[Expect<'_>]) {
        assert_eq!(ids(page), expected.iter().map(|e| e.id).collect::<Vec<_>>());
        for e in expected {
            let c = find(page, e.id);
            assert_eq!((c.platform.as_str(), c.source.as_str()), ("intercom", "support"), "{}", e.id);
            assert_eq!(c.kind, e.kind, "{}", e.id);
            assert_eq!(c.author.id, e.author, "{}", e.id);
            assert_eq!(c.author.email.as_deref(), e.email, "{}", e.id);
            assert_eq!(c.author.display_name.as_deref(), e.name, "{}", e.id);
            assert_eq!(c.title.as_deref(), e.title, "{}", e.id);
            assert_eq!(c.body, e.body, "{}", e.id);
            assert_eq!(c.deleted, e.deleted, "{}", e.id);
            assert!(!c.edited && c.updated_at.is_none(), "{}", e.id);
            assert_eq!(c.thread_id.as_deref(), Some(thread), "{}", e.id);
            let parent = if e.kind == Kind::Ticket { None } else { Some(thread) };
            assert_eq!(c.parent_id.as_deref(), parent, "{}", e.id);
        }
    }

    /// The recorded ticket (`conversation_by_id`): an admin-initiated message.
    fn recorded_ticket(id: &str) -> Expect<'_> {
        Expect {
            id,
            kind: Kind::Ticket,
            author: "admin:991267553",
            email: Some("admin153@email.com"),
            name: Some("Ciaran153 Lee"),
            title: None,
            body: "this is the message body",
            deleted: false,
        }
    }

    fn by_customer<'a>(id: &'a str, body: &'a str) -> Expect<'a> {
        Expect {
            id,
            kind: Kind::TicketComment,
            author: CONTACT,
            email: Some("maya.chen@example.com"),
            name: Some("Maya Chen"),
            title: None,
            body,
            deleted: false,
        }
    }

    fn by_admin<'a>(id: &'a str, body: &'a str) -> Expect<'a> {
        Expect { kind: Kind::TicketComment, ..Expect { id, body, ..recorded_ticket(id) } }
    }

    fn by_bot<'a>(id: &'a str, body: &'a str) -> Expect<'a> {
        Expect {
            id,
            kind: Kind::TicketComment,
            author: "bot:1650",
            email: Some("operator+abcd1234@intercom.io"),
            name: Some("Fin"),
            title: None,
            body,
            deleted: false,
        }
    }

    fn standard_expectations() -> Vec<Expect<'static>> {
        vec![
            recorded_ticket("conversation:378"),
            by_customer("part:1001", "My export to PDF fails & I need it today."),
            by_admin("part:1002", "Sorry about that! Looking into it."),
            by_bot("part:1005", "Did this answer help?"),
            by_customer("part:1006", "[attachment] screenshot.png"),
        ]
    }

    #[tokio::test]
    async fn first_poll_maps_the_recorded_conversation_and_its_parts() {
        let server = MockServer::start().await;
        // The recorded search page, as recorded.
        serve_search(&server, Fixture::load("intercom", "conversations_search").response()).await;
        let mut full = conversation(LISTED, LISTED_AT, standard_parts());
        full["tags"]["tags"] =
            json!([{ "type": "tag", "id": "123456", "name": "Billing", "applied_at": 1_719_492_830 }]);
        serve_conversation(&server, LISTED, full).await;
        // `/me` is not among the fixtures: a minimal admin answer.
        Mock::given(method("GET"))
            .and(path("/me"))
            .and(header("authorization", format!("Bearer {TOKEN}").as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "type": "admin", "id": "991267553" })))
            .expect(1)
            .mount(&server)
            .await;
        let source = build(config(&server, json!({ "workspace_id": "abc123" })));

        source.check().await.unwrap();
        let page = poll(&source, None, Some(SINCE)).await;
        check(&page, "conversation:378", &standard_expectations());
        assert!(page.quarantined.is_empty(), "{:?}", page.quarantined);
        let ticket = find(&page, "conversation:378");
        assert_eq!(ticket.tags, ["Billing"]);
        assert_eq!(ticket.created_at, at(1_719_492_825));
        assert_eq!(ticket.url.as_deref(), Some("https://app.intercom.com/a/apps/abc123/conversations/378"));
        let comment = find(&page, "part:1001");
        assert_eq!(comment.created_at, at(1_719_492_900));
        assert_eq!(comment.url, ticket.url, "a part links to its conversation");
        assert!(comment.tags.is_empty(), "tags stay on the ticket");
        assert_eq!(
            comment.author.profile_url.as_deref(),
            Some(&*format!("https://app.intercom.com/a/apps/abc123/users/{CONTACT}"))
        );
        assert_eq!(ticket.author.profile_url, None, "teammates have no customer profile");

        assert!(!page.has_more);
        assert_eq!(cursor(&page), IntercomCursor { watermark: Some(LISTED_AT), since: Some(SINCE), pass: None });
        let requests = server.received_requests().await.unwrap();
        for request in &requests {
            assert_eq!(request.headers.get("authorization").unwrap(), &*format!("Bearer {TOKEN}"));
            assert_eq!(request.headers.get("intercom-version").unwrap(), "2.11");
        }
        assert_eq!(
            searches(&server).await,
            [json!({
                "query": { "field": "updated_at", "operator": ">", "value": (SINCE - 1).to_string() },
                "sort": { "field": "updated_at", "order": "ascending" },
                "pagination": { "per_page": 20 },
            })]
        );
    }

    #[tokio::test]
    async fn a_first_poll_without_since_takes_the_newest_page_and_watches_from_there() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/conversations/search"))
            .and(body_partial_json(json!({ "query": { "value": "0" }, "sort": { "order": "descending" } })))
            .respond_with(search_page(vec![listed(LISTED, LISTED_AT)], Some("WzE3MTk0OTI4NDMsIjM3OCJd")))
            .mount(&server)
            .await;
        serve_conversation(&server, LISTED, conversation(LISTED, LISTED_AT, vec![])).await;
        let page = poll(&source(&server), None, None).await;
        assert_eq!(ids(&page), ["conversation:378"]);
        assert!(!page.has_more, "older pages are not followed");
        assert_eq!(cursor(&page), IntercomCursor { watermark: Some(LISTED_AT), since: None, pass: None });
    }

    #[tokio::test]
    async fn an_incremental_poll_with_nothing_new_keeps_the_watermark() {
        let server = MockServer::start().await;
        serve_search(&server, search_page(vec![], None)).await;
        let source = source(&server);
        let before = IntercomCursor { watermark: Some(LISTED_AT), since: Some(SINCE), pass: None };
        let page = poll(&source, stored(&before), Some(SINCE)).await;
        assert!(page.contributions.is_empty() && page.quarantined.is_empty());
        assert!(!page.has_more);
        assert_eq!(cursor(&page), before);
        // The pass starts `overlap_seconds` (60) before the watermark, inclusive.
        let value = (LISTED_AT - 60 - 1).to_string();
        assert_eq!(searches(&server).await[0]["query"]["value"], value.as_str());
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "nothing listed, nothing fetched");
    }

    #[tokio::test]
    async fn pagination_follows_starting_after_to_the_end() {
        let server = MockServer::start().await;
        let next = "WzE3MTk0OTI4NDMsIjM3OCJd";
        // The recorded single page split in two: 378 first, then a 379.
        Mock::given(method("POST"))
            .and(path("/conversations/search"))
            .and(body_partial_json(json!({ "pagination": { "starting_after": next } })))
            .respond_with(search_page(vec![listed("379", LISTED_AT + 100)], None))
            .with_priority(1)
            .mount(&server)
            .await;
        serve_search(&server, search_page(vec![listed(LISTED, LISTED_AT)], Some(next))).await;
        serve_conversation(&server, LISTED, conversation(LISTED, LISTED_AT, vec![])).await;
        serve_conversation(&server, "379", conversation("379", LISTED_AT + 100, vec![])).await;
        let source = source(&server);

        let first = poll(&source, None, Some(SINCE)).await;
        assert_eq!(ids(&first), ["conversation:378"]);
        assert!(first.has_more);
        let paging = IntercomCursor {
            watermark: None,
            since: Some(SINCE),
            pass: Some(Pass { from: SINCE, starting_after: next.into(), top: Some(LISTED_AT) }),
        };
        assert_eq!(cursor(&first), paging);

        let second = poll(&source, first.next_cursor.clone(), Some(SINCE)).await;
        assert_eq!(ids(&second), ["conversation:379"]);
        assert!(!second.has_more);
        assert_eq!(
            cursor(&second),
            IntercomCursor { watermark: Some(LISTED_AT + 100), since: Some(SINCE), pass: None }
        );

        let bodies = searches(&server).await;
        assert_eq!(bodies[1]["query"], bodies[0]["query"], "one query for the whole pass");
        assert_eq!(bodies[1]["pagination"], json!({ "per_page": 20, "starting_after": next }));
    }

    #[tokio::test]
    async fn an_updated_conversation_comes_back_with_the_same_external_ids() {
        let server = MockServer::start().await;
        let comment = || part("1001", "comment", customer(), Some("<p>My export to PDF fails.</p>"));
        serve_search(&server, search_page(vec![listed(LISTED, LISTED_AT)], None)).await;
        serve_conversation(&server, LISTED, conversation(LISTED, LISTED_AT, vec![comment()])).await;
        let source = source(&server);
        let first = poll(&source, None, Some(SINCE)).await;
        assert_eq!(ids(&first), ["conversation:378", "part:1001"]);

        // Later: a title, a tag and a new reply.
        server.reset().await;
        let later = LISTED_AT + 3600;
        serve_search(&server, search_page(vec![listed(LISTED, later)], None)).await;
        let mut reply = part("1007", "comment", customer(), Some("<p>Still broken on 4.2</p>"));
        reply["created_at"] = later.into();
        let mut updated = conversation(LISTED, later, vec![comment(), reply]);
        updated["title"] = "Export to PDF broken".into();
        updated["tags"]["tags"] =
            json!([{ "type": "tag", "id": "1", "name": "Billing" }, { "type": "tag", "id": "2", "name": "Urgent" }]);
        serve_conversation(&server, LISTED, updated).await;
        let second = poll(&source, first.next_cursor.clone(), Some(SINCE)).await;

        assert_eq!(ids(&second), ["conversation:378", "part:1001", "part:1007"]);
        let (before, after) = (find(&first, "conversation:378"), find(&second, "conversation:378"));
        assert_ne!(before.content_hash(), after.content_hash(), "the ledger sends the new content");
        assert_eq!(after.title.as_deref(), Some("Export to PDF broken"));
        assert_eq!(after.tags, ["Billing", "Urgent"]);
        assert_eq!(
            find(&first, "part:1001").content_hash(),
            find(&second, "part:1001").content_hash(),
            "an unchanged part is dropped by the ledger"
        );
        assert_eq!(find(&second, "part:1007").body, "Still broken on 4.2");
        assert_eq!(cursor(&second).watermark, Some(later));
        assert_eq!(searches(&server).await[0]["query"]["value"], (LISTED_AT - 61).to_string().as_str());
    }

    #[tokio::test]
    async fn redacted_parts_and_first_messages_come_back_deleted() {
        let server = MockServer::start().await;
        // A customer-initiated variant of the recorded conversation.
        let started_by_customer = |parts: Vec<Value>| {
            let mut body = conversation(LISTED, LISTED_AT, parts);
            body["source"]["author"] = customer();
            body["source"]["delivered_as"] = "customer_initiated".into();
            body["source"]["body"] = "<p>Where is my invoice?</p>".into();
            body
        };
        let comment = part("1001", "comment", customer(), Some("<p>My card number is 4242 4242 4242 4242</p>"));
        serve_search(&server, search_page(vec![listed(LISTED, LISTED_AT)], None)).await;
        serve_conversation(&server, LISTED, started_by_customer(vec![comment.clone()])).await;
        let source = source(&server);
        let first = poll(&source, None, Some(SINCE)).await;
        assert!(first.contributions.iter().all(|c| !c.deleted));

        // Both redacted (POST /conversations/redact), which moves `updated_at`.
        server.reset().await;
        serve_search(&server, search_page(vec![listed(LISTED, LISTED_AT + 2)], None)).await;
        let mut redacted = comment;
        redacted["redacted"] = true.into();
        let mut body = started_by_customer(vec![redacted]);
        body["source"]["redacted"] = true.into();
        serve_conversation(&server, LISTED, body).await;
        let second = poll(&source, first.next_cursor.clone(), Some(SINCE)).await;

        let ticket = Expect { kind: Kind::Ticket, deleted: true, ..by_customer("conversation:378", "") };
        check(&second, "conversation:378", &[ticket, Expect { deleted: true, ..by_customer("part:1001", "") }]);
    }

    #[tokio::test]
    async fn a_conversation_gone_before_its_fetch_comes_back_deleted() {
        let server = MockServer::start().await;
        serve_search(&server, search_page(vec![listed(LISTED, LISTED_AT)], None)).await;
        // Intercom's error shape for an unknown id.
        let not_found = json!({
            "type": "error.list", "request_id": "req-1",
            "errors": [{ "code": "not_found", "message": "Resource Not Found" }],
        });
        Mock::given(method("GET"))
            .and(path("/conversations/378"))
            .respond_with(ResponseTemplate::new(404).set_body_json(not_found))
            .mount(&server)
            .await;
        let page = poll(&source(&server), None, Some(SINCE)).await;
        // Mapped from the search answer (`conversations_search`'s own admin).
        let gone = Expect {
            author: "admin:991267591",
            email: Some("admin180@email.com"),
            name: Some("Ciaran180 Lee"),
            body: "",
            deleted: true,
            ..recorded_ticket("conversation:378")
        };
        check(&page, "conversation:378", &[gone]);
        assert_eq!(cursor(&page).watermark, Some(LISTED_AT));
    }

    #[tokio::test]
    async fn a_short_429_is_waited_out_within_the_poll() {
        let server = MockServer::start().await;
        // Intercom's 429 names the end of the window in X-RateLimit-Reset (a Unix time).
        let reset = (Utc::now().timestamp() + 2).to_string();
        Mock::given(method("POST"))
            .and(path("/conversations/search"))
            .respond_with(
                ResponseTemplate::new(429)
                    .insert_header("x-ratelimit-limit", "166")
                    .insert_header("x-ratelimit-remaining", "0")
                    .insert_header("x-ratelimit-reset", reset.as_str())
                    .set_body_json(json!({ "type": "error.list", "errors": [{ "code": "rate_limit_exceeded", "message": "Exceeded rate limit of 166 in 10_seconds" }] })),
            )
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&server)
            .await;
        serve_search(&server, search_page(vec![listed(LISTED, LISTED_AT)], None)).await;
        serve_conversation(&server, LISTED, conversation(LISTED, LISTED_AT, vec![])).await;
        let started = Instant::now();
        let page = poll(&source(&server), None, Some(SINCE)).await;
        assert!(started.elapsed() >= Duration::from_millis(900), "retried before the reset: {:?}", started.elapsed());
        assert_eq!(ids(&page), ["conversation:378"]);
        assert_eq!(searches(&server).await.len(), 2);
    }

    #[tokio::test]
    async fn a_long_429_is_handed_back_and_holds_every_request_until_the_reset() {
        let server = MockServer::start().await;
        let reset = (Utc::now().timestamp() + 3600).to_string();
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(429)
                    .insert_header("x-ratelimit-limit", "10000")
                    .insert_header("x-ratelimit-remaining", "0")
                    .insert_header("x-ratelimit-reset", reset.as_str()),
            )
            .mount(&server)
            .await;
        let source = source(&server);
        let errors = [
            source.poll(&PollRequest { cursor: None, since: Some(at(SINCE)) }).await.unwrap_err(),
            source.poll(&PollRequest { cursor: None, since: Some(at(SINCE)) }).await.unwrap_err(),
            source.check().await.unwrap_err(),
        ];
        for error in errors {
            match error {
                SourceError::Http(HttpError::RateLimited { retry_after, .. }) => {
                    assert!(retry_after > Duration::from_secs(3590), "{retry_after:?}")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "no request while the limit holds");
    }

    #[tokio::test]
    async fn malformed_items_are_quarantined_while_the_rest_of_the_page_goes_on() {
        let server = MockServer::start().await;
        // A listed conversation without its `id`, one whose fetch lacks
        // `created_at`, and a good one with a part without `id` and a part
        // whose `created_at` is text.
        let mut no_id = listed("377", LISTED_AT - 10);
        no_id.as_object_mut().unwrap().remove("id");
        // Also: one whose fetch answers an HTML error page with 200, and the
        // good one listed twice (fetched once).
        let page = vec![
            no_id,
            listed("380", LISTED_AT - 5),
            listed("381", LISTED_AT - 4),
            listed(LISTED, LISTED_AT),
            listed(LISTED, LISTED_AT),
        ];
        serve_search(&server, search_page(page, None)).await;
        Mock::given(method("GET"))
            .and(path("/conversations/381"))
            .respond_with(ResponseTemplate::new(200).set_body_string("<html>We'll be right back</html>"))
            .mount(&server)
            .await;
        let mut no_created_at = conversation("380", LISTED_AT - 5, vec![]);
        no_created_at.as_object_mut().unwrap().remove("created_at");
        serve_conversation(&server, "380", no_created_at).await;
        let mut no_part_id = part("1010", "comment", customer(), Some("<p>lost</p>"));
        no_part_id.as_object_mut().unwrap().remove("id");
        let mut text_time = part("1008", "comment", customer(), Some("<p>when?</p>"));
        text_time["created_at"] = "yesterday".into();
        let good = part("1001", "comment", customer(), Some("<p>fine</p>"));
        serve_conversation(&server, LISTED, conversation(LISTED, LISTED_AT, vec![no_part_id, text_time, good])).await;
        let source = source(&server);

        let page = poll(&source, None, Some(SINCE)).await;
        assert_eq!(ids(&page), ["conversation:378", "part:1001"]);
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        assert_eq!(quarantined, [None, Some("conversation:380"), Some("conversation:381"), None, Some("part:1008")]);
        let reasons: Vec<_> = page.quarantined.iter().map(|q| q.reason.as_str()).collect();
        assert!(reasons[0].contains("`id`") && reasons[1].contains("`created_at`"), "{reasons:?}");
        assert!(reasons[2].contains("not a conversation") && page.quarantined[2].raw.contains("right back"));
        assert!(reasons[3].contains("`id`") && reasons[4].contains("`created_at`"), "{reasons:?}");
        assert!(page.quarantined[1].raw.contains("\"380\""));
        assert!(page.quarantined[4].raw.contains("when?"));
        let fetches = server.received_requests().await.unwrap();
        assert_eq!(fetches.iter().filter(|r| r.url.path() == "/conversations/378").count(), 1);
        assert_eq!(cursor(&page).watermark, Some(LISTED_AT));

        // Seen again in the overlap of the next pass: not reported twice.
        let again = poll(&source, page.next_cursor.clone(), Some(SINCE)).await;
        assert_eq!(ids(&again), ["conversation:378", "part:1001"]);
        assert!(again.quarantined.is_empty(), "{:?}", again.quarantined);
    }

    #[tokio::test]
    async fn teammate_replies_and_notes_follow_the_config() {
        let cases = [
            (json!({}), vec!["conversation:378", "part:1001", "part:1002", "part:1005", "part:1006"]),
            (json!({ "include_teammate_replies": false }), vec!["conversation:378", "part:1001", "part:1006"]),
            (
                json!({ "include_notes": true }),
                vec!["conversation:378", "part:1001", "part:1002", "part:1004", "part:1005", "part:1006"],
            ),
        ];
        for (extra, expected) in cases {
            let server = MockServer::start().await;
            serve_search(&server, search_page(vec![listed(LISTED, LISTED_AT)], None)).await;
            serve_conversation(&server, LISTED, conversation(LISTED, LISTED_AT, standard_parts())).await;
            let page = poll(&build(config(&server, extra.clone())), None, Some(SINCE)).await;
            assert_eq!(ids(&page), expected, "{extra}");
        }
    }

    #[tokio::test]
    async fn the_token_never_shows_in_debug_or_errors() {
        let server = MockServer::start().await;
        // Intercom's answer to a bad token.
        let refused = json!({
            "type": "error.list", "request_id": "req-2",
            "errors": [{ "code": "unauthorized", "message": "Access Token Invalid" }],
        });
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(401).set_body_json(refused.clone()))
            .mount(&server)
            .await;
        Mock::given(method("GET")).respond_with(ResponseTemplate::new(401).set_body_json(refused)).mount(&server).await;
        let config = config(&server, json!({}));
        let file = match &config.access_token {
            SecretRef::File(file) => file.display().to_string(),
            SecretRef::Env(_) => unreachable!(),
        };
        let key = config.credential_key();
        assert!(key.starts_with("127.0.0.1 File(") && key.contains(&file), "{key}");
        let source = build(config.clone());
        let errors = [
            source.poll(&PollRequest { cursor: None, since: Some(at(SINCE)) }).await.unwrap_err(),
            source.check().await.unwrap_err(),
        ];
        for error in &errors {
            assert!(matches!(error, SourceError::Auth(text) if text.contains("Access Token Invalid")), "{error:?}");
        }
        let shown = [
            format!("{source:?}"),
            format!("{config:?}"),
            key,
            format!("{:?} {}", errors[0], errors[0]),
            format!("{:?} {}", errors[1], errors[1]),
        ];
        for text in shown {
            assert!(!text.contains(TOKEN), "the token leaked: {text}");
        }
        let missing = IntercomConfig { access_token: SecretRef::Env("TRIBUTARY_TEST_SURELY_UNSET".into()), ..config };
        let error = IntercomSource::new("support", missing, options()).unwrap_err();
        assert!(matches!(error, BuildError::Secret(_)), "{error}");
        assert!(
            error.to_string().contains("`access_token`") && error.to_string().contains("TRIBUTARY_TEST_SURELY_UNSET")
        );
    }

    #[test]
    fn config_reads_toml_with_defaults_and_rejects_unknown_or_bad_values() {
        let minimal: IntercomConfig = toml::from_str(r#"access_token = { env = "INTERCOM_TOKEN" }"#).unwrap();
        assert_eq!(minimal.access_token, SecretRef::Env("INTERCOM_TOKEN".into()));
        assert_eq!((minimal.base_url.as_str(), minimal.api_version.as_str()), ("https://api.intercom.io", "2.11"));
        assert_eq!((minimal.per_page, minimal.overlap_seconds, minimal.workspace_id.as_deref()), (20, 60, None));
        assert!(minimal.include_teammate_replies && !minimal.include_notes);
        assert_eq!(minimal.credential_key(), r#"api.intercom.io Env("INTERCOM_TOKEN")"#);

        let full: IntercomConfig = toml::from_str(
            r#"
            access_token = { file = "intercom" }
            base_url = "https://api.eu.intercom.io"
            api_version = "2.14"
            per_page = 150
            workspace_id = "abc123"
            include_teammate_replies = false
            include_notes = true
            overlap_seconds = 0
            "#,
        )
        .unwrap();
        assert_eq!(full.access_token, SecretRef::File("intercom".into()));
        assert_eq!((full.per_page, full.overlap_seconds, full.workspace_id.as_deref()), (150, 0, Some("abc123")));
        assert!(!full.include_teammate_replies && full.include_notes);

        for unknown in [
            "access_token = { env = \"T\" }\ntoken = \"x\"",
            "access_token = { env = \"T\" }\nschedule = \"every 5m\"",
            "access_token = { value = \"T\" }",
            "base_url = \"https://api.intercom.io\"",
        ] {
            assert!(toml::from_str::<IntercomConfig>(unknown).is_err(), "{unknown}");
        }

        let file = token_file();
        let base = IntercomConfig { access_token: SecretRef::File(file.clone()), ..minimal };
        let cases: [(IntercomConfig, &str); 7] = [
            (IntercomConfig { per_page: 0, ..base.clone() }, "`per_page`"),
            (IntercomConfig { per_page: 151, ..base.clone() }, "`per_page`"),
            (IntercomConfig { base_url: "api.intercom.io".into(), ..base.clone() }, "`base_url`"),
            (IntercomConfig { base_url: "ftp://api.intercom.io".into(), ..base.clone() }, "`base_url`"),
            (IntercomConfig { api_version: "2.11\r\nX-Evil: 1".into(), ..base.clone() }, "`api_version`"),
            (IntercomConfig { api_version: " ".into(), ..base.clone() }, "`api_version`"),
            (IntercomConfig { workspace_id: Some("abc/../x".into()), ..base.clone() }, "`workspace_id`"),
        ];
        for (config, key) in cases {
            let error = IntercomSource::new("support", config, options()).unwrap_err();
            assert!(error.to_string().contains(key), "{key}: {error}");
        }
        std::fs::write(&file, "s3cr\net").unwrap();
        let error = IntercomSource::new("support", base.clone(), options()).unwrap_err();
        assert!(matches!(error, BuildError::InvalidToken), "{error}");
        assert!(!format!("{error} {error:?}").contains("s3cr"), "{error}");
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn inbox_links_follow_the_region() {
        for (base_url, host) in [
            ("https://api.intercom.io", "app.intercom.com"),
            ("https://api.eu.intercom.io", "app.eu.intercom.com"),
            ("https://api.au.intercom.io/", "app.au.intercom.com"),
            ("http://127.0.0.1:9000", "app.intercom.com"),
        ] {
            assert_eq!(inbox_host(&Url::parse(base_url).unwrap()), host, "{base_url}");
        }
        let file = token_file();
        let config = IntercomConfig {
            access_token: SecretRef::File(file),
            base_url: "https://api.eu.intercom.io".into(),
            api_version: DEFAULT_API_VERSION.into(),
            per_page: 20,
            workspace_id: Some("abc123".into()),
            include_teammate_replies: true,
            include_notes: false,
            overlap_seconds: 60,
        };
        let source = build(config);
        assert_eq!(source.platform(), "intercom");
        assert_eq!(
            source.conversation_url("378").as_deref(),
            Some("https://app.eu.intercom.com/a/apps/abc123/conversations/378")
        );
        let author = source.author(
            serde_json::from_value::<RawAuthor>(json!({ "type": "lead", "id": "5bc8", "email": "not an address" }))
                .ok()
                .as_ref(),
        );
        assert_eq!(author.id, "5bc8");
        assert_eq!(author.email, None);
        assert_eq!(author.profile_url.as_deref(), Some("https://app.eu.intercom.com/a/apps/abc123/users/5bc8"));
    }

    #[tokio::test]
    async fn an_unreadable_cursor_starts_over() {
        let server = MockServer::start().await;
        serve_search(&server, Fixture::load("intercom", "conversations_search").response()).await;
        serve_conversation(&server, LISTED, conversation(LISTED, LISTED_AT, vec![])).await;
        let page = poll(&source(&server), Some(Cursor("{\"watermark\": \"soon\"}".into())), Some(SINCE)).await;
        assert_eq!(ids(&page), ["conversation:378"]);
        assert_eq!(searches(&server).await[0]["query"]["value"], (SINCE - 1).to_string().as_str());
    }
}
