//! Hacker News: mentions of configured terms, through the Algolia HN Search API.
//!
//! `GET {base_url}/search_by_date?query=<term>&tags=<tag>&numericFilters=created_at_i>X&hitsPerPage=N&page=P`
//! lists the stories or comments matching a full-text query, newest first
//! (hn.algolia.com/api: "sorted by date, more recent first"; `numericFilters`
//! on `created_at_i`, e.g. `created_at_i>X,created_at_i<Y`; `page`, with
//! `nbPages` and `hitsPerPage` in the answer). No key is needed.
//!
//! Every configured term is searched once per configured tag: each such
//! *search* keeps its own watermark, the newest `created_at_i` committed by
//! a finished pass. A *pass* of a search pages back from the newest hit to
//! its lower bound: the watermark minus [`HackerNewsConfig::rescan_seconds`]
//! on later passes, [`PollRequest::since`] on a first pass (without it, a
//! first pass fetches only the newest page). Each call to [`Source::poll`]
//! fetches one page of one search; the searches are taken in the configured
//! order and `has_more` stays set until the last one is done. A pass stops
//! after [`HackerNewsConfig::max_pages_per_poll`] pages of its search: it is
//! paused (its window is kept in the cursor, its watermark does not move) and
//! the next poll resumes it, so nothing newer is skipped.
//!
//! Algolia lets no query reach past its 1,000th hit (`paginationLimitedTo`,
//! 1,000 by default): `nbPages * hitsPerPage` never exceeds it (the recorded
//! answer shows `nbHits` 1,366,190 with `nbPages` 1,000 at `hitsPerPage` 1).
//! So a pass pages with `page` while `page < nbPages`; when it reaches the
//! last reachable page while `nbHits` says there are more, it goes on with a
//! new time window, `created_at_i>X,created_at_i<=Y` from page 0, where `Y`
//! is the oldest `created_at_i` seen (the hits of second `Y` come twice,
//! which is harmless). A hit indexed while a pass pages back pushes the
//! others down a page: it gives duplicates, never a gap.
//!
//! Edits: HN allows edits for two hours, and Algolia has no edit marker (the
//! `updated_at` of today's hits is the time the index was updated, which also
//! moves with the points; it is not used, so it never resends an item). An
//! edited item comes back with the same `objectID` and a new text, which
//! changes its body and so its content hash. Later passes ask again for the
//! `rescan_seconds` (2 hours) before the watermark, which also catches items
//! Algolia indexed late; the daemon's ledger drops the unchanged ones.
//!
//! Deletions: a deleted item usually vanishes from the index (algolia/hn-search
//! issue 7: deleted comments are left out of the API's answers), which no
//! search can tell. A hit with neither an author nor a text is kept, marked
//! `deleted`, with an empty body. Neither recorded fixture holds one.
//!
//! Answer shapes: the recorded answers (2014) give every field, `null` when
//! unset (`story_text: ""` on a link story, `story_id: null` on a story,
//! `points` on comments, `created_at` with milliseconds). Today's answers
//! leave unset fields out, set `story_id` of a story to its own id, give
//! comments no points, and add `updated_at`, `children`, `exhaustive*`,
//! `processingTimingsMS` and `serverTimeMS`. Only the fields read below are
//! used, and an absent field counts as `null`, so both shapes map alike.
//!
//! Rate limits: no header and no body field tells them. hn.algolia.com/api
//! says requests are limited to 10,000 per hour per IP, past which the IP is
//! blacklisted: pacing is the daemon's `requests_per_second`, and a 429 with
//! `Retry-After` is honoured by the shared client.
//!
//! Each page holds one search, and an `objectID` is returned at most once
//! in it. The same item matched by two terms comes in two pages as the very
//! same contribution (nothing in it depends on the term), so the ledger drops
//! the second copy.

use std::collections::HashSet;

use async_trait::async_trait;
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, Source, SourceError, source::check_status, text::html_to_text,
};
use url::Url;

const PLATFORM: &str = "hackernews";

/// Where HN shows an item and a user (whatever API mirror is configured).
const ITEM_URL: &str = "https://news.ycombinator.com/item";
const USER_URL: &str = "https://news.ycombinator.com/user";

/// Algolia's default `paginationLimitedTo`: no query reaches past this hit.
const PAGINATION_LIMIT: u64 = 1000;

/// The `_tags` kept on a contribution: they say what the item is and never
/// change (`front_page` comes and goes; `author_*` and `story_*` repeat fields).
const KEPT_TAGS: [&str; 2] = ["ask_hn", "show_hn"];

/// `_tags` of top-level items.
const POST_TAGS: [&str; 4] = ["story", "poll", "pollopt", "job"];

/// Settings of one Hacker News listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HackerNewsConfig {
    /// What to listen for, e.g. the brand and each product name. Each term
    /// is a full-text query of its own: Algolia matches all of its words
    /// (and may forgive a typo); a term in double quotes, `"\"acme cloud\""`,
    /// is a phrase (the HN API turns Algolia's advanced syntax on, as the
    /// `params` of its answers show).
    pub terms: Vec<String>,
    /// Algolia tags searched, each on its own: `story` (posts) and `comment`
    /// by default. `show_hn`, `ask_hn`, `poll` or an OR group such as
    /// `(story,poll)` work too.
    #[serde(default = "default_tags")]
    pub tags: Vec<String>,
    /// Root of the HN Search API.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Hits asked for per request (1 to 1,000).
    #[serde(default = "default_hits_per_page")]
    pub hits_per_page: u32,
    /// Most pages one search (one term and tag) fetches in one poll. A first
    /// pass without `since` fetches one page anyway; any other pass is
    /// paused at this cap and resumed by the next poll, so nothing newer is
    /// skipped.
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: u32,
    /// Later passes ask again for the items created up to this many seconds
    /// before the newest one already committed: HN allows edits for 2 hours
    /// and Algolia indexes with a delay, so this catches edits, deletions
    /// and late items (unchanged ones are dropped by the ledger). 0 asks
    /// only for newer items.
    #[serde(default = "default_rescan_seconds")]
    pub rescan_seconds: u32,
}

fn default_tags() -> Vec<String> {
    vec!["story".to_owned(), "comment".to_owned()]
}

fn default_base_url() -> String {
    "https://hn.algolia.com/api/v1".to_owned()
}

fn default_hits_per_page() -> u32 {
    100
}

fn default_max_pages_per_poll() -> u32 {
    10
}

fn default_rescan_seconds() -> u32 {
    7200
}

/// Why a [`HackerNewsSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("hackernews `terms` must list at least one term, and none may be blank")]
    NoTerms,
    #[error("hackernews `tags` must list at least one tag, and none may be blank")]
    NoTags,
    #[error("hackernews `base_url` must be an http(s) URL, not `{0}`")]
    InvalidBaseUrl(String),
    #[error("hackernews `hits_per_page` must be between 1 and 1000, not {0}")]
    InvalidHitsPerPage(u32),
    #[error("hackernews `max_pages_per_poll` must be at least 1")]
    InvalidMaxPages,
    #[error("hackernews HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// Hacker News, listened to through the Algolia HN Search API.
#[derive(Debug)]
pub struct HackerNewsSource {
    instance: String,
    config: HackerNewsConfig,
    /// `{base_url}/search_by_date`.
    endpoint: Url,
    /// Every (term, tag), in the order they are polled.
    searches: Vec<Search>,
    http: HttpClient,
}

/// One term searched with one tag.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Search {
    term: String,
    tag: String,
}

/// What the cursor of a Hacker News source holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct HnCursor {
    /// The searches that have committed something or have a pass under way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    searches: Vec<SearchCursor>,
    /// The search (index in the configured order) this poll goes on with;
    /// absent between polls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SearchCursor {
    term: String,
    tag: String,
    /// The newest `created_at_i` committed by a finished pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark: Option<i64>,
    /// The pass under way (or paused), while paging back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<Window>,
}

impl SearchCursor {
    fn is_empty(&self) -> bool {
        self.watermark.is_none() && self.window.is_none()
    }
}

/// Where a pass of one search is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Window {
    /// Only items with `created_at_i > after`; `None`: the newest page only
    /// (a first pass without `since`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<i64>,
    /// And `created_at_i <= until`, once the 1,000-hit cap was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<i64>,
    /// The `page` to fetch next in this time window.
    #[serde(default)]
    page: u32,
    /// Pages fetched by this poll (counted afresh after a pause).
    #[serde(default)]
    pages: u32,
    /// The newest `created_at_i` seen by this pass: the next watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<i64>,
}

impl Window {
    fn numeric_filters(&self) -> Option<String> {
        match (self.after, self.until) {
            (Some(after), Some(until)) => Some(format!("created_at_i>{after},created_at_i<={until}")),
            (Some(after), None) => Some(format!("created_at_i>{after}")),
            (None, Some(until)) => Some(format!("created_at_i<={until}")),
            (None, None) => None,
        }
    }

    /// Whether a hit of this time lies in the window (servers that ignore
    /// `numericFilters` must not make a pass loop or go back too far).
    fn holds(&self, created_at_i: i64) -> bool {
        self.after.is_none_or(|after| created_at_i > after) && self.until.is_none_or(|until| created_at_i <= until)
    }
}

/// The page envelope of `/search_by_date`.
struct Envelope {
    hits: Vec<Value>,
    nb_pages: u64,
    nb_hits: Option<u64>,
    hits_per_page: u64,
}

/// The fields of a hit this connector reads; an absent field is `null`.
#[derive(Debug, Deserialize)]
struct RawHit {
    #[serde(rename = "objectID")]
    object_id: Id,
    created_at_i: i64,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    story_text: Option<String>,
    #[serde(default)]
    comment_text: Option<String>,
    #[serde(default)]
    story_id: Option<Id>,
    #[serde(default)]
    story_title: Option<String>,
    #[serde(default)]
    parent_id: Option<Id>,
    #[serde(default)]
    points: Option<f64>,
    #[serde(default, rename = "_tags")]
    tags: Option<Vec<Value>>,
}

/// An item id, as a string (`objectID`) or a number (`story_id`, `parent_id`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Id {
    Text(String),
    Number(u64),
}

impl Id {
    fn into_string(self) -> Option<String> {
        match self {
            Id::Text(text) => Some(text.trim().to_owned()).filter(|id| !id.is_empty()),
            Id::Number(number) => Some(number.to_string()),
        }
    }
}

/// A non-empty string field.
fn present(value: Option<String>) -> Option<String> {
    value.filter(|text| !text.trim().is_empty())
}

/// `https://news.ycombinator.com/{page}?id={id}`, encoded.
fn hn_url(base: &str, id: &str) -> Option<String> {
    let mut url = Url::parse(base).ok()?;
    url.query_pairs_mut().append_pair("id", id);
    Some(url.into())
}

impl HackerNewsSource {
    pub fn new(instance: &str, config: HackerNewsConfig, http: HttpOptions) -> Result<HackerNewsSource, BuildError> {
        let terms = distinct(&config.terms).ok_or(BuildError::NoTerms)?;
        let tags = distinct(&config.tags).ok_or(BuildError::NoTags)?;
        if !(1..=1000).contains(&config.hits_per_page) {
            return Err(BuildError::InvalidHitsPerPage(config.hits_per_page));
        }
        if config.max_pages_per_poll == 0 {
            return Err(BuildError::InvalidMaxPages);
        }
        let mut endpoint = Url::parse(config.base_url.trim())
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base())
            .ok_or_else(|| BuildError::InvalidBaseUrl(config.base_url.clone()))?;
        endpoint.set_query(None);
        endpoint.set_fragment(None);
        if let Ok(mut path) = endpoint.path_segments_mut() {
            path.pop_if_empty().push("search_by_date");
        }
        let searches = terms
            .iter()
            .flat_map(|term| tags.iter().map(move |tag| Search { term: term.clone(), tag: tag.clone() }))
            .collect();
        Ok(HackerNewsSource { instance: instance.to_owned(), http: HttpClient::new(http)?, config, endpoint, searches })
    }

    /// One page of one search.
    async fn fetch(&self, search: &Search, window: &Window, hits_per_page: u32) -> Result<Envelope, SourceError> {
        let mut url = self.endpoint.clone();
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("query", &search.term)
                .append_pair("tags", &search.tag)
                .append_pair("hitsPerPage", &hits_per_page.to_string())
                .append_pair("page", &window.page.to_string());
            if let Some(filters) = window.numeric_filters() {
                query.append_pair("numericFilters", &filters);
            }
        }
        let response = self.http.send(self.http.get(url)).await?;
        check_status(&response)?;
        envelope(&response, hits_per_page)
    }

    fn decode(&self, cursor: Option<&Cursor>) -> HnCursor {
        tributary_sdk::source::decode_cursor(cursor).unwrap_or_default()
    }

    /// The cursor after a page: the configured searches only, in order.
    fn encode(&self, mut old: HnCursor, current: SearchCursor, at: Option<usize>) -> Option<Cursor> {
        let mut current = Some(current);
        let mut searches = Vec::new();
        for search in &self.searches {
            let state = match current.take_if(|state| state.term == search.term && state.tag == search.tag) {
                Some(state) => Some(state),
                None => {
                    let found = old.searches.iter().position(|s| s.term == search.term && s.tag == search.tag);
                    found.map(|index| old.searches.swap_remove(index))
                }
            };
            if let Some(state) = state.filter(|state| !state.is_empty()) {
                searches.push(state);
            }
        }
        let next = HnCursor { searches, at };
        // Nothing seen yet and no poll under way: keep no cursor, so the next
        // pass is still a first one and honours `since`.
        (next != HnCursor::default()).then(|| Cursor::from_json(&next))
    }

    fn to_contribution(&self, hit: RawHit, search: &Search) -> Result<Contribution, String> {
        let external_id = hit.object_id.into_string().ok_or("the hit has an empty objectID")?;
        let created_at = DateTime::from_timestamp(hit.created_at_i, 0)
            .or_else(|| hit.created_at.as_deref().and_then(|at| DateTime::parse_from_rfc3339(at).ok()).map(Into::into))
            .ok_or_else(|| format!("created_at_i {} is not a readable time", hit.created_at_i))?;
        let tags: Vec<&str> = hit.tags.as_deref().unwrap_or_default().iter().filter_map(Value::as_str).collect();
        let is_comment = if tags.contains(&"comment") {
            true
        } else if tags.iter().any(|tag| POST_TAGS.contains(tag)) {
            false
        } else {
            hit.comment_text.is_some() || search.tag == "comment"
        };
        let author = present(hit.author);
        let text = present(if is_comment { hit.comment_text } else { hit.story_text });
        let deleted = author.is_none() && text.is_none();
        // A story's body is its text, else its link.
        let link = present(hit.url).filter(|_| !is_comment);
        let body = if deleted {
            String::new()
        } else {
            text.map(|html| html_to_text(&html))
                .filter(|text| !text.is_empty())
                .or_else(|| link.map(|link| link.trim().to_owned()))
                .unwrap_or_default()
        };
        let (kind, title, thread_id, parent_id) = if is_comment {
            let thread = hit.story_id.and_then(Id::into_string);
            (Kind::Comment, present(hit.story_title), thread, hit.parent_id.and_then(Id::into_string))
        } else {
            (Kind::Post, present(hit.title), Some(external_id.clone()), None)
        };
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            url: hn_url(ITEM_URL, &external_id),
            external_id,
            kind,
            author: Author {
                // HN has no numeric user ids: the (case-sensitive) name is the id.
                id: author.clone().unwrap_or_default(),
                profile_url: author.as_deref().and_then(|name| hn_url(USER_URL, name)),
                handle: author,
                display_name: None,
                email: None,
                links: Vec::new(),
            },
            title,
            body,
            language: None,
            created_at,
            // No edit time exists (Algolia's `updated_at` is its index time).
            updated_at: None,
            parent_id,
            thread_id,
            tags: tags.iter().filter(|tag| KEPT_TAGS.contains(tag)).map(|tag| (*tag).to_owned()).collect(),
            score: hit.points,
            edited: false,
            deleted,
            signals: None,
        })
    }
}

/// The trimmed, distinct, non-blank entries; `None` when there are none or
/// one is blank.
fn distinct(values: &[String]) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for value in values {
        let value = value.trim();
        if value.is_empty() {
            return None;
        }
        if !out.iter().any(|seen| seen == value) {
            out.push(value.to_owned());
        }
    }
    (!out.is_empty()).then_some(out)
}

fn envelope(response: &HttpResponse, asked_per_page: u32) -> Result<Envelope, SourceError> {
    let mut body: Value = serde_json::from_slice(&response.body)
        .map_err(|error| SourceError::Decode(format!("{} did not answer JSON: {error}", response.target)))?;
    let hits = match body.get_mut("hits").map(Value::take) {
        Some(Value::Array(hits)) => hits,
        _ => return Err(SourceError::Decode(format!("{} answered JSON without a `hits` list", response.target))),
    };
    let nb_pages = body
        .get("nbPages")
        .and_then(Value::as_u64)
        .ok_or_else(|| SourceError::Decode(format!("{} answered JSON without `nbPages`", response.target)))?;
    let hits_per_page =
        body.get("hitsPerPage").and_then(Value::as_u64).filter(|&n| n > 0).unwrap_or_else(|| u64::from(asked_per_page));
    Ok(Envelope { hits, nb_pages, nb_hits: body.get("nbHits").and_then(Value::as_u64), hits_per_page })
}

/// The start of a raw hit, for a quarantine record.
fn raw(hit: &Value) -> String {
    serde_json::to_string(hit).unwrap_or_default()
}

#[async_trait]
impl Source for HackerNewsSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor = self.decode(request.cursor.as_ref());
        let index = cursor.at.filter(|&at| at < self.searches.len()).unwrap_or(0);
        let Some(search) = self.searches.get(index) else {
            return Ok(Page::default());
        };
        let mut state = match cursor.searches.iter().position(|s| s.term == search.term && s.tag == search.tag) {
            Some(found) => cursor.searches.swap_remove(found),
            None => SearchCursor { term: search.term.clone(), tag: search.tag.clone(), watermark: None, window: None },
        };
        let watermark = state.watermark;
        let mut window = match state.window.take() {
            Some(window) => window,
            None => match (watermark, request.since) {
                (Some(watermark), _) => Window {
                    after: Some(watermark.saturating_sub(i64::from(self.config.rescan_seconds))),
                    ..Window::default()
                },
                // Items created at or after `since`: `created_at_i > ceil(since) - 1`.
                (None, Some(since)) => {
                    let ceil = since.timestamp() + i64::from(since.timestamp_subsec_nanos() > 0);
                    Window { after: Some(ceil.saturating_sub(1)), ..Window::default() }
                }
                (None, None) => Window::default(),
            },
        };

        let envelope = self.fetch(search, &window, self.config.hits_per_page).await?;
        let fetched = envelope.hits.len();
        let mut page = Page::default();
        let mut seen = HashSet::new();
        let (mut newest, mut oldest) = (None::<i64>, None::<i64>);
        for item in &envelope.hits {
            let created_at_i = item.get("created_at_i").and_then(Value::as_i64);
            if let Some(at) = created_at_i {
                if !window.holds(at) {
                    tracing::debug!(source = %self.instance, created_at_i = at, "hit outside the window; skipped");
                    continue;
                }
                newest = Some(newest.map_or(at, |n| n.max(at)));
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
            let id = match item.get("objectID") {
                Some(Value::String(id)) => Some(id.clone()),
                Some(Value::Number(id)) => Some(id.to_string()),
                _ => None,
            };
            if let Some(id) = &id
                && !seen.insert(id.clone())
            {
                continue;
            }
            // Already committed: reported by the pass that first saw it.
            let committed = matches!((created_at_i, watermark), (Some(at), Some(w)) if at <= w);
            let outcome = serde_json::from_value::<RawHit>(item.clone())
                .map_err(|error| format!("cannot read the hit: {error}"))
                .and_then(|hit| self.to_contribution(hit, search));
            match outcome {
                Ok(contribution) => page.contributions.push(contribution),
                Err(reason) if committed => {
                    tracing::debug!(source = %self.instance, id = ?id, %reason, "unreadable hit already committed; skipped");
                }
                Err(reason) => page.quarantined.push(Quarantined::new(id, reason, &raw(item))),
            }
        }

        window.top = match (window.top, newest) {
            (Some(top), Some(newest)) => Some(top.max(newest)),
            (top, newest) => top.or(newest),
        };
        window.pages = window.pages.saturating_add(1);
        let more_pages = u64::from(window.page) + 1 < envelope.nb_pages && fetched > 0;
        let reachable = envelope.nb_pages.saturating_mul(envelope.hits_per_page);
        let capped = envelope.nb_hits.is_some_and(|hits| hits > reachable)
            || (reachable >= PAGINATION_LIMIT && fetched as u64 >= envelope.hits_per_page);
        let next_window = if window.after.is_none() {
            // A first pass without `since`: the newest page only.
            None
        } else if more_pages {
            Some(Window { page: window.page.saturating_add(1), ..window.clone() })
        } else if let Some(oldest) = oldest.filter(|_| capped) {
            // The last reachable page: go on below the oldest hit seen.
            let until = match window.until {
                Some(until) if until <= oldest => {
                    tracing::warn!(source = %self.instance, until, "a whole capped window shares one second; skipping it");
                    until.saturating_sub(1)
                }
                _ => oldest,
            };
            Some(Window { until: Some(until), page: 0, ..window.clone() })
        } else {
            None
        };

        let mut search_done = true;
        match next_window {
            Some(next) if next.pages < self.config.max_pages_per_poll => {
                state.window = Some(next);
                search_done = false;
            }
            Some(mut next) => {
                // Paused: the watermark stays, the next poll resumes here.
                tracing::info!(
                    source = %self.instance, term = %search.term, tag = %search.tag, pages = next.pages,
                    "hackernews pass paused at max_pages_per_poll; the next poll resumes it"
                );
                next.pages = 0;
                state.window = Some(next);
            }
            None => {
                state.watermark = match (watermark, window.top) {
                    (Some(w), Some(top)) => Some(w.max(top)),
                    (w, top) => w.or(top),
                };
                tracing::debug!(
                    source = %self.instance, term = %search.term, tag = %search.tag,
                    watermark = state.watermark, "hackernews pass complete"
                );
            }
        }
        let at = if !search_done {
            Some(index)
        } else if index + 1 < self.searches.len() {
            Some(index + 1)
        } else {
            None
        };
        tracing::debug!(
            source = %self.instance, term = %search.term, tag = %search.tag, page = window.page, fetched,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            "hackernews page polled"
        );
        page.has_more = at.is_some();
        page.next_cursor = self.encode(cursor, state, at);
        Ok(page)
    }

    /// Asks for one hit of the first search: the request every poll makes.
    async fn check(&self) -> Result<(), SourceError> {
        let Some(search) = self.searches.first() else { return Ok(()) };
        self.fetch(search, &Window::default(), 1).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use chrono::{SecondsFormat, Utc};
    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path, query_param, query_param_is_missing},
    };

    use super::*;

    /// Times of the recorded hits.
    const STORY_AT: i64 = 1_403_235_346;
    const COMMENT_AT: i64 = 1_403_235_595;

    fn options() -> HttpOptions {
        HttpOptions {
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_secs(2),
            ..HttpOptions::default()
        }
    }

    fn config(server: &MockServer, extra: Value) -> HackerNewsConfig {
        let mut config = serde_json::json!({ "terms": ["apple"], "base_url": server.uri() });
        if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
            config.extend(extra);
        }
        serde_json::from_value(config).unwrap()
    }

    fn hn(config: HackerNewsConfig) -> HackerNewsSource {
        HackerNewsSource::new("hn", config, options()).unwrap()
    }

    fn fixture(name: &str) -> Fixture {
        Fixture::load("hackernews", name)
    }

    /// The recorded story hit (2014 shape).
    fn story() -> Value {
        fixture("search_by_date_story").body["hits"][0].clone()
    }

    /// The recorded comment hit (2014 shape).
    fn comment() -> Value {
        fixture("search_by_date_comment").body["hits"][0].clone()
    }

    /// A recorded hit with another id and creation time.
    fn variant(hit: &Value, id: u64, created_at_i: i64) -> Value {
        let mut hit = hit.clone();
        hit["objectID"] = id.to_string().into();
        hit["created_at_i"] = created_at_i.into();
        let at = DateTime::from_timestamp(created_at_i, 0).unwrap();
        hit["created_at"] = at.to_rfc3339_opts(SecondsFormat::Millis, true).into();
        hit
    }

    /// A recorded answer with its hits and pagination replaced.
    fn answer(name: &str, hits: Vec<Value>, nb_pages: u64, nb_hits: u64, per_page: u64) -> ResponseTemplate {
        let mut fixture = fixture(name);
        fixture.body["hits"] = Value::Array(hits);
        fixture.body["nbPages"] = nb_pages.into();
        fixture.body["nbHits"] = nb_hits.into();
        fixture.body["hitsPerPage"] = per_page.into();
        fixture.response()
    }

    fn nothing() -> ResponseTemplate {
        answer("search_by_date_story", vec![], 0, 0, 100)
    }

    /// Answers `tag` searches of `term` whose `numericFilters` is `filters`
    /// (None: absent) at `page`.
    async fn serve(
        server: &MockServer,
        term: &str,
        tag: &str,
        filters: Option<&str>,
        page: u32,
        response: ResponseTemplate,
    ) {
        let mock = Mock::given(method("GET"))
            .and(path("/search_by_date"))
            .and(query_param("query", term))
            .and(query_param("tags", tag))
            .and(query_param("page", page.to_string()));
        let mock = match filters {
            Some(filters) => mock.and(query_param("numericFilters", filters)),
            None => mock.and(query_param_is_missing("numericFilters")),
        };
        mock.respond_with(response).mount(server).await;
    }

    fn cursor(page: &Page) -> HnCursor {
        page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
    }

    fn watermark(term: &str, tag: &str, at: i64) -> SearchCursor {
        SearchCursor { term: term.into(), tag: tag.into(), watermark: Some(at), window: None }
    }

    fn cursor_of(searches: Vec<SearchCursor>) -> Option<Cursor> {
        Some(Cursor::from_json(&HnCursor { searches, at: None }))
    }

    fn ids(page: &Page) -> Vec<&str> {
        page.contributions.iter().map(|c| c.external_id.as_str()).collect()
    }

    /// One expected contribution, checked by value.
    struct Expect {
        id: &'static str,
        kind: Kind,
        title: &'static str,
        author: &'static str,
        created_at: &'static str,
        score: f64,
        thread: &'static str,
        parent: Option<&'static str>,
        body_starts: &'static str,
    }

    fn check(c: &Contribution, expect: &Expect) {
        let at = expect.id;
        assert_eq!(c.external_id, expect.id);
        assert_eq!(c.platform, "hackernews", "{at}");
        assert_eq!(c.source, "hn", "{at}");
        assert_eq!(c.kind, expect.kind, "{at}");
        assert_eq!(c.title.as_deref(), Some(expect.title), "{at}");
        assert_eq!(c.url, Some(format!("https://news.ycombinator.com/item?id={at}")), "{at}");
        assert_eq!(c.author.id, expect.author, "{at}");
        assert_eq!(c.author.handle.as_deref(), Some(expect.author), "{at}");
        assert_eq!(c.author.display_name, None, "{at}");
        assert_eq!(c.author.email, None, "{at}");
        let profile = format!("https://news.ycombinator.com/user?id={}", expect.author);
        assert_eq!(c.author.profile_url.as_deref(), Some(profile.as_str()), "{at}");
        assert_eq!(c.created_at, expect.created_at.parse::<DateTime<Utc>>().unwrap(), "{at}");
        assert_eq!(c.updated_at, None, "{at}");
        assert_eq!(c.score, Some(expect.score), "{at}");
        assert_eq!(c.thread_id.as_deref(), Some(expect.thread), "{at}");
        assert_eq!(c.parent_id.as_deref(), expect.parent, "{at}");
        assert!(c.body.starts_with(expect.body_starts), "{at}: {:?}", c.body);
        assert!(!c.body.contains('<') && !c.body.contains("&#x"), "{at}: markup left in {:?}", c.body);
        assert!(!c.edited && !c.deleted, "{at}");
        assert!(c.tags.is_empty(), "{at}");
        assert_eq!((c.language.as_deref(), c.signals.as_ref()), (None, None), "{at}");
    }

    fn expected_story() -> Expect {
        Expect {
            id: "7919424",
            kind: Kind::Post,
            title: "Judge says concerned about Apple, Google hiring settlement",
            author: "bradleyjg",
            created_at: "2014-06-20T03:35:46Z",
            score: 1.0,
            thread: "7919424",
            parent: None,
            // A link story has no text: its body is the link.
            body_starts: "http://in.reuters.com/article/2014/06/19/apple-google-settlement-idINL2N0P01ZI20140619",
        }
    }

    fn expected_comment() -> Expect {
        Expect {
            id: "7919431",
            kind: Kind::Comment,
            title: "Fibonacci Flim-Flam",
            author: "gohrt",
            created_at: "2014-06-20T03:39:55Z",
            score: 1.0,
            thread: "7919207",
            parent: Some("7919207"),
            body_starts: "A perennial HN favorite\n",
        }
    }

    /// Serves both recorded answers to a first poll (no numericFilters).
    async fn serve_recorded(server: &MockServer) {
        serve(server, "apple", "story", None, 0, fixture("search_by_date_story").response()).await;
        serve(server, "apple", "comment", None, 0, fixture("search_by_date_comment").response()).await;
    }

    #[tokio::test]
    async fn first_poll_maps_the_recorded_story_and_comment() {
        let server = MockServer::start().await;
        serve_recorded(&server).await;
        let source = hn(config(&server, Value::Null));

        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&first), ["7919424"]);
        assert!(first.quarantined.is_empty());
        check(&first.contributions[0], &expected_story());
        // The recorded answer says 1,000 pages: a first pass without `since` takes the newest only.
        assert!(first.has_more, "the comment search comes next");
        assert_eq!(cursor(&first), HnCursor { searches: vec![watermark("apple", "story", STORY_AT)], at: Some(1) });

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second), ["7919431"]);
        let c = &second.contributions[0];
        check(c, &expected_comment());
        assert!(c.body.contains("https://hn.algolia.com/?q=Fibonacci+Flim-Flam"), "{:?}", c.body);
        assert!(c.body.ends_with("What's fascinating about this topic is that the reposts come at intervals that approximates the Fibonacci sequence."), "{:?}", c.body);
        assert!(!second.has_more);
        let both = vec![watermark("apple", "story", STORY_AT), watermark("apple", "comment", COMMENT_AT)];
        assert_eq!(cursor(&second), HnCursor { searches: both, at: None });

        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 2);
        assert!(requests.iter().all(|r| r.url.query_pairs().any(|(k, v)| k == "hitsPerPage" && v == "100")));
    }

    /// Today's answers leave null fields out, give stories their own
    /// `story_id` and comments no points, and add fields: same contributions.
    #[tokio::test]
    async fn todays_answer_shape_maps_like_the_recorded_one() {
        fn today(mut hit: Value, story_id: Option<u64>) -> Value {
            let fields = hit.as_object_mut().unwrap();
            fields.retain(|_, value| !value.is_null() && value != "");
            match story_id {
                Some(id) => fields.insert("story_id".into(), id.into()),
                None => fields.remove("points"),
            };
            let at = fields["created_at"].as_str().unwrap().replace(".000Z", "Z");
            fields.insert("created_at".into(), at.into());
            fields.insert("updated_at".into(), "2024-02-21T10:00:00Z".into());
            fields.insert("children".into(), serde_json::json!([7919500]));
            hit
        }
        fn envelope(name: &str, hit: Value) -> ResponseTemplate {
            let mut fixture = fixture(name);
            fixture.body["hits"] = Value::Array(vec![hit]);
            let extra = serde_json::json!({
                "exhaustive": {"nbHits": false, "typo": false}, "exhaustiveNbHits": false, "exhaustiveTypo": false,
                "processingTimingsMS": {"_request": {"roundTrip": 14}, "total": 4}, "serverTimeMS": 5
            });
            fixture.body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            fixture.response()
        }
        let story_today = today(story(), Some(7_919_424));
        assert!(story_today.get("story_text").is_none() && story_today.get("parent_id").is_none());
        let comment_today = today(comment(), None);
        assert!(comment_today.get("points").is_none() && comment_today.get("title").is_none());

        let recorded = MockServer::start().await;
        serve_recorded(&recorded).await;
        let now = MockServer::start().await;
        serve(&now, "apple", "story", None, 0, envelope("search_by_date_story", story_today)).await;
        serve(&now, "apple", "comment", None, 0, envelope("search_by_date_comment", comment_today)).await;

        let (old, new) = (hn(config(&recorded, Value::Null)), hn(config(&now, Value::Null)));
        let mut cursor = None;
        for kind in [Kind::Post, Kind::Comment] {
            let a = old.poll(&PollRequest { cursor: cursor.clone(), since: None }).await.unwrap();
            let b = new.poll(&PollRequest { cursor: cursor.clone(), since: None }).await.unwrap();
            assert_eq!((a.contributions.len(), b.contributions.len()), (1, 1));
            let (a_item, b_item) = (&a.contributions[0], &b.contributions[0]);
            assert_eq!(b_item.kind, kind);
            if kind == Kind::Comment {
                assert_eq!(b_item.score, None, "today's comments have no points");
            }
            assert_eq!(&Contribution { score: a_item.score, ..b_item.clone() }, a_item);
            assert_eq!(a_item.content_hash(), b_item.content_hash());
            assert_eq!(a.next_cursor, b.next_cursor);
            cursor = a.next_cursor;
        }
        assert!(cursor.is_some_and(|c| c.to_json::<HnCursor>().is_some_and(|c| c.at.is_none())));
    }

    #[tokio::test]
    async fn an_incremental_poll_with_nothing_new() {
        let server = MockServer::start().await;
        let committed = vec![watermark("apple", "story", STORY_AT), watermark("apple", "comment", COMMENT_AT)];
        // Without a rescan: only newer items are asked for, and there are none.
        serve(&server, "apple", "story", Some("created_at_i>1403235346"), 0, nothing()).await;
        serve(&server, "apple", "comment", Some("created_at_i>1403235595"), 0, nothing()).await;
        let quiet = hn(config(&server, serde_json::json!({"rescan_seconds": 0})));
        let mut request = PollRequest { cursor: cursor_of(committed.clone()), since: None };
        for expect_more in [true, false] {
            let page = quiet.poll(&request).await.unwrap();
            assert!(page.contributions.is_empty() && page.quarantined.is_empty());
            assert_eq!(page.has_more, expect_more);
            request.cursor = page.next_cursor;
        }
        assert_eq!(request.cursor, cursor_of(committed.clone()), "nothing new moves no watermark");

        // With the default two-hour rescan the recorded items come back, identical.
        serve_recorded(&server).await;
        let source = hn(config(&server, Value::Null));
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
        assert_eq!(request.cursor, cursor_of(committed.clone()));
        // As Algolia answers a filtered search: one page.
        let story_again = answer("search_by_date_story", vec![story()], 1, 1, 100);
        serve(&server, "apple", "story", Some("created_at_i>1403228146"), 0, story_again).await;
        let comment_again = answer("search_by_date_comment", vec![comment()], 1, 1, 100);
        serve(&server, "apple", "comment", Some("created_at_i>1403228395"), 0, comment_again).await;
        let mut again = Vec::new();
        loop {
            let page = source.poll(&request).await.unwrap();
            again.extend(page.contributions);
            request.cursor = page.next_cursor;
            if !page.has_more {
                break;
            }
        }
        assert_eq!(again, first);
        assert_eq!(request.cursor, cursor_of(committed));
    }

    /// Three stories newer than the watermark, served two per page.
    async fn serve_two_pages(server: &MockServer, tag: &str, after: i64) {
        let filters = format!("created_at_i>{after}");
        let (a, b, c) =
            (variant(&story(), 7_919_500, STORY_AT + 54), story(), variant(&story(), 7_919_300, STORY_AT - 46));
        serve(server, "apple", tag, Some(&filters), 0, answer("search_by_date_story", vec![a, b], 2, 3, 2)).await;
        serve(server, "apple", tag, Some(&filters), 1, answer("search_by_date_story", vec![c], 2, 3, 2)).await;
    }

    #[tokio::test]
    async fn pages_back_with_page_and_then_moves_the_watermark() {
        let server = MockServer::start().await;
        let old = STORY_AT - 100;
        serve_two_pages(&server, "story", old).await;
        let source =
            hn(config(&server, serde_json::json!({"tags": ["story"], "hits_per_page": 2, "rescan_seconds": 0})));

        let request = PollRequest { cursor: cursor_of(vec![watermark("apple", "story", old)]), since: None };
        let first = source.poll(&request).await.unwrap();
        assert_eq!(ids(&first), ["7919500", "7919424"]);
        assert!(first.has_more);
        let window = Window { after: Some(old), until: None, page: 1, pages: 1, top: Some(STORY_AT + 54) };
        let paging = SearchCursor { window: Some(window), ..watermark("apple", "story", old) };
        assert_eq!(cursor(&first), HnCursor { searches: vec![paging], at: Some(0) }, "the watermark waits");

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&second), ["7919300"]);
        assert!(!second.has_more);
        assert_eq!(cursor(&second), HnCursor { searches: vec![watermark("apple", "story", STORY_AT + 54)], at: None });
    }

    #[tokio::test]
    async fn a_pass_pauses_at_max_pages_and_the_next_poll_resumes_it() {
        let server = MockServer::start().await;
        let old = STORY_AT - 100;
        serve_two_pages(&server, "story", old).await;
        serve(&server, "apple", "comment", Some("created_at_i>1403235595"), 0, nothing()).await;
        let settings = serde_json::json!({"hits_per_page": 2, "rescan_seconds": 0, "max_pages_per_poll": 1});
        let source = hn(config(&server, settings));
        let start = vec![watermark("apple", "story", old), watermark("apple", "comment", COMMENT_AT)];

        let first = source.poll(&PollRequest { cursor: cursor_of(start), since: None }).await.unwrap();
        assert_eq!(ids(&first), ["7919500", "7919424"]);
        assert!(first.has_more, "the comment search still gets its turn");
        let paused = Window { after: Some(old), until: None, page: 1, pages: 0, top: Some(STORY_AT + 54) };
        let story_paused = SearchCursor { window: Some(paused), ..watermark("apple", "story", old) };
        let expected = vec![story_paused.clone(), watermark("apple", "comment", COMMENT_AT)];
        assert_eq!(cursor(&first), HnCursor { searches: expected.clone(), at: Some(1) }, "the watermark must not jump");

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert!(second.contributions.is_empty() && !second.has_more);
        assert_eq!(cursor(&second), HnCursor { searches: expected, at: None });

        // The next poll resumes the paused pass where it stopped.
        let third = source.poll(&PollRequest { cursor: second.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(ids(&third), ["7919300"]);
        let done = vec![watermark("apple", "story", STORY_AT + 54), watermark("apple", "comment", COMMENT_AT)];
        assert_eq!(cursor(&third), HnCursor { searches: done, at: Some(1) });
    }

    /// Past Algolia's 1,000-hit cap the pass goes on in a time window below
    /// the oldest hit seen (simulated with a cap of 2: nbHits > nbPages * hitsPerPage).
    #[tokio::test]
    async fn the_hit_cap_is_passed_with_a_time_window() {
        let server = MockServer::start().await;
        let old = STORY_AT - 100;
        let (a, b, c) =
            (variant(&story(), 7_919_500, STORY_AT + 54), story(), variant(&story(), 7_919_300, STORY_AT - 46));
        let capped = answer("search_by_date_story", vec![a, b.clone()], 1, 3, 2);
        serve(&server, "apple", "story", Some("created_at_i>1403235246"), 0, capped).await;
        let below = answer("search_by_date_story", vec![b, c], 1, 2, 2);
        serve(&server, "apple", "story", Some("created_at_i>1403235246,created_at_i<=1403235346"), 0, below).await;
        let source =
            hn(config(&server, serde_json::json!({"tags": ["story"], "hits_per_page": 2, "rescan_seconds": 0})));

        let request = PollRequest { cursor: cursor_of(vec![watermark("apple", "story", old)]), since: None };
        let first = source.poll(&request).await.unwrap();
        assert_eq!(ids(&first), ["7919500", "7919424"]);
        assert!(first.has_more);
        let window = Window { after: Some(old), until: Some(STORY_AT), page: 0, pages: 1, top: Some(STORY_AT + 54) };
        let expected = SearchCursor { window: Some(window), ..watermark("apple", "story", old) };
        assert_eq!(cursor(&first), HnCursor { searches: vec![expected], at: Some(0) });

        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        // The oldest second is asked for again: a duplicate, never a gap.
        assert_eq!(ids(&second), ["7919424", "7919300"]);
        assert!(!second.has_more);
        assert_eq!(cursor(&second), HnCursor { searches: vec![watermark("apple", "story", STORY_AT + 54)], at: None });
    }

    #[tokio::test]
    async fn first_poll_honours_since() {
        for since in ["2014-06-20T03:37:00Z", "2014-06-20T03:36:59.250Z"] {
            let server = MockServer::start().await;
            // A server ignoring the filter would send older items: they are dropped.
            let older = variant(&comment(), 7_919_000, 1_403_235_000);
            let response = answer("search_by_date_comment", vec![comment(), older], 1, 2, 100);
            serve(&server, "apple", "comment", Some("created_at_i>1403235419"), 0, response).await;
            let source = hn(config(&server, serde_json::json!({"tags": ["comment"]})));
            let request = PollRequest { cursor: None, since: Some(since.parse().unwrap()) };
            let page = source.poll(&request).await.unwrap();
            assert_eq!(ids(&page), ["7919431"], "{since}");
            assert!(!page.has_more);
            assert_eq!(cursor(&page), HnCursor { searches: vec![watermark("apple", "comment", COMMENT_AT)], at: None });
        }
    }

    #[tokio::test]
    async fn an_edit_changes_the_contribution() {
        let server = MockServer::start().await;
        let filters = Some("created_at_i>1403228395");
        serve(&server, "apple", "comment", filters, 0, fixture("search_by_date_comment").response()).await;
        let source = hn(config(&server, serde_json::json!({"tags": ["comment"]})));
        let request = PollRequest { cursor: cursor_of(vec![watermark("apple", "comment", COMMENT_AT)]), since: None };
        let before = source.poll(&request).await.unwrap().contributions.remove(0);

        let server2 = MockServer::start().await;
        let mut edited = comment();
        let text = format!("{}<p>EDIT: the <i>original</i> thread is older.", edited["comment_text"].as_str().unwrap());
        edited["comment_text"] = text.into();
        serve(&server2, "apple", "comment", filters, 0, answer("search_by_date_comment", vec![edited], 1, 1, 100))
            .await;
        let source = hn(config(&server2, serde_json::json!({"tags": ["comment"]})));
        let after = source.poll(&request).await.unwrap().contributions.remove(0);

        assert_eq!(after.key(), before.key());
        assert!(after.body.ends_with("EDIT: the original thread is older."), "{:?}", after.body);
        assert_ne!(after.content_hash(), before.content_hash(), "an edit must reach the CRM");
        // Algolia has no edit marker: only the text tells.
        assert!(!after.edited && after.updated_at.is_none());
        assert_eq!(Contribution { body: before.body.clone(), ..after }, before);
    }

    #[tokio::test]
    async fn a_hit_with_neither_author_nor_text_is_kept_as_deleted() {
        let server = MockServer::start().await;
        let mut gone_story = story();
        for field in ["author", "story_text", "title", "url"] {
            gone_story[field] = Value::Null;
        }
        let mut gone_comment = comment();
        gone_comment["author"] = Value::Null;
        gone_comment["comment_text"] = Value::Null;
        // Only the text gone but an author left: not a deletion.
        let mut blank = variant(&comment(), 7_919_432, COMMENT_AT - 5);
        blank["comment_text"] = Value::Null;
        let stories = answer("search_by_date_story", vec![gone_story], 1, 1, 100);
        serve(&server, "apple", "story", Some("created_at_i>1403228146"), 0, stories).await;
        let comments = answer("search_by_date_comment", vec![gone_comment, blank], 1, 2, 100);
        serve(&server, "apple", "comment", Some("created_at_i>1403228395"), 0, comments).await;
        let source = hn(config(&server, Value::Null));
        let committed = vec![watermark("apple", "story", STORY_AT), watermark("apple", "comment", COMMENT_AT)];

        let first = source.poll(&PollRequest { cursor: cursor_of(committed), since: None }).await.unwrap();
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        let (story, comment, blank) = (&first.contributions[0], &second.contributions[0], &second.contributions[1]);
        for deleted in [story, comment] {
            assert!(deleted.deleted, "{}", deleted.external_id);
            assert_eq!(deleted.body, "");
            assert_eq!(deleted.author, Author::default());
        }
        assert_eq!((story.external_id.as_str(), story.kind, story.title.as_deref()), ("7919424", Kind::Post, None));
        assert_eq!((comment.external_id.as_str(), comment.kind), ("7919431", Kind::Comment));
        assert_eq!(comment.parent_id.as_deref(), Some("7919207"), "the thread is still known");
        assert!(!blank.deleted && blank.body.is_empty() && blank.author.id == "gohrt");
        assert!(first.quarantined.is_empty() && second.quarantined.is_empty());
    }

    #[tokio::test]
    async fn a_429_is_honoured_before_the_next_request() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        serve(&server, "apple", "story", None, 0, fixture("search_by_date_story").response()).await;
        let source = hn(config(&server, serde_json::json!({"tags": ["story"]})));
        let started = Instant::now();
        let page = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(ids(&page), ["7919424"]);
        assert!(started.elapsed() >= Duration::from_secs(1), "a request left before Retry-After");
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 2);

        // A wait longer than the client may spend inline is handed back, and
        // no request leaves while it holds.
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3600"))
            .mount(&server)
            .await;
        let source = hn(config(&server, Value::Null));
        for _ in 0..2 {
            let error = source.poll(&PollRequest::default()).await.unwrap_err();
            assert!(
                matches!(&error, SourceError::Http(HttpError::RateLimited { retry_after, .. }) if retry_after.as_secs() > 3500),
                "{error:?}"
            );
            assert!(source.check().await.is_err());
        }
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn malformed_hits_are_quarantined_and_the_rest_goes_on() {
        let server = MockServer::start().await;
        let mut no_id = variant(&story(), 1, STORY_AT + 40);
        no_id.as_object_mut().unwrap().remove("objectID");
        let mut no_time = variant(&story(), 7_919_600, 0);
        no_time.as_object_mut().unwrap().remove("created_at_i");
        let mut bad_time = variant(&story(), 7_919_601, 0);
        bad_time["created_at_i"] = "yesterday".into();
        let mut bad_points = variant(&story(), 7_919_602, STORY_AT + 10);
        bad_points["points"] = "many".into();
        let mut old_bad = variant(&story(), 7_919_100, STORY_AT - 10);
        old_bad["author"] = serde_json::json!({"name": "x"});
        let hits = vec![no_id, story(), no_time, story(), bad_time, bad_points, old_bad];
        let response = answer("search_by_date_story", hits, 1, 7, 100);
        serve(&server, "apple", "story", Some("created_at_i>1403228145"), 0, response).await;
        let source = hn(config(&server, serde_json::json!({"tags": ["story"]})));
        let request = PollRequest { cursor: cursor_of(vec![watermark("apple", "story", STORY_AT - 1)]), since: None };

        let page = source.poll(&request).await.unwrap();
        assert_eq!(ids(&page), ["7919424"], "once, though it came twice");
        check(&page.contributions[0], &expected_story());
        let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
        // 7919100 is older than the watermark: reported when it was first seen.
        assert_eq!(quarantined, [None, Some("7919600"), Some("7919601"), Some("7919602")]);
        let reasons: Vec<_> = page.quarantined.iter().map(|q| q.reason.as_str()).collect();
        assert!(reasons[0].contains("objectID"), "{}", reasons[0]);
        assert!(reasons[1].contains("created_at_i"), "{}", reasons[1]);
        assert!(reasons[3].contains("cannot read the hit"), "{}", reasons[3]);
        assert!(page.quarantined[0].raw.contains("Judge says concerned about Apple"));
        // The hit without an objectID still had a time: the watermark covers it.
        assert_eq!(cursor(&page).searches[0].watermark, Some(STORY_AT + 40));
    }

    #[tokio::test]
    async fn an_item_matched_by_two_terms_comes_back_identical() {
        let server = MockServer::start().await;
        for term in ["apple", "google"] {
            serve(&server, term, "story", None, 0, fixture("search_by_date_story").response()).await;
        }
        let source =
            hn(config(&server, serde_json::json!({"terms": ["apple", " google", "apple"], "tags": ["story"]})));
        assert_eq!(source.searches.len(), 2, "terms are trimmed and distinct");
        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert!(first.has_more);
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert!(!second.has_more);
        // Nothing in it depends on the term: the ledger drops the second copy.
        assert_eq!(first.contributions, second.contributions);
        assert_eq!(
            cursor(&second),
            HnCursor {
                searches: vec![watermark("apple", "story", STORY_AT), watermark("google", "story", STORY_AT)],
                at: None
            }
        );
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_a_decode_error() {
        for (response, expect) in [
            (ResponseTemplate::new(200).set_body_string("<html>maintenance</html>"), "did not answer JSON"),
            (ResponseTemplate::new(200).set_body_json(serde_json::json!({"message": "ok"})), "`hits`"),
            (ResponseTemplate::new(200).set_body_json(serde_json::json!({"hits": []})), "`nbPages`"),
        ] {
            let server = MockServer::start().await;
            Mock::given(method("GET")).respond_with(response).mount(&server).await;
            let source = hn(config(&server, Value::Null));
            let error = source.poll(&PollRequest::default()).await.unwrap_err();
            assert!(
                matches!(&error, SourceError::Decode(m) if m.contains(expect) && m.contains("/search_by_date")),
                "{error:?}"
            );
            assert!(matches!(source.check().await, Err(SourceError::Decode(_))));
        }
    }

    #[tokio::test]
    async fn refusals_map_to_auth_and_other_statuses_to_status() {
        for (status, is_auth) in [(401, true), (403, true), (400, false)] {
            let server = MockServer::start().await;
            let body =
                serde_json::json!({"message": "Invalid value for \"numericFilters\" parameter", "status": status});
            Mock::given(method("GET"))
                .respond_with(ResponseTemplate::new(status).set_body_json(body))
                .mount(&server)
                .await;
            let source = hn(config(&server, Value::Null));
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                match error {
                    SourceError::Auth(message) => assert!(is_auth && message.contains("numericFilters"), "{message}"),
                    SourceError::Status { status: got, .. } => assert!(!is_auth && got == status, "{status}"),
                    other => panic!("{status}: unexpected {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn check_asks_for_one_hit_and_an_unreadable_cursor_starts_over() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/search_by_date"))
            .and(query_param("query", "\"acme cloud\""))
            .and(query_param("tags", "story"))
            .and(query_param("hitsPerPage", "1"))
            .and(query_param_is_missing("numericFilters"))
            .respond_with(fixture("search_by_date_story").response())
            .expect(1)
            .mount(&server)
            .await;
        // Started over: a first pass, without numericFilters.
        serve(&server, "\"acme cloud\"", "story", None, 0, fixture("search_by_date_story").response()).await;
        let config = config(&server, serde_json::json!({"terms": ["\"acme cloud\""], "tags": ["story"]}));
        let mut with_slash = config.clone();
        with_slash.base_url.push('/');
        let source = hn(with_slash);
        source.check().await.unwrap();
        let request = PollRequest { cursor: Some(Cursor("{\"watermark\": \"soon\"".into())), since: None };
        let page = source.poll(&request).await.unwrap();
        assert_eq!(ids(&page), ["7919424"]);
        assert_eq!(server.received_requests().await.unwrap().len(), 2);
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: HackerNewsConfig = serde_json::from_value(serde_json::json!({"terms": ["acme"]})).unwrap();
        assert_eq!(config.tags, ["story", "comment"]);
        assert_eq!(config.base_url, "https://hn.algolia.com/api/v1");
        assert_eq!((config.hits_per_page, config.max_pages_per_poll, config.rescan_seconds), (100, 10, 7200));
        let source = HackerNewsSource::new("hn", config.clone(), HttpOptions::default()).unwrap();
        assert_eq!(source.endpoint.as_str(), "https://hn.algolia.com/api/v1/search_by_date");
        assert_eq!(source.platform(), "hackernews");

        for unknown in [
            serde_json::json!({"terms": ["acme"], "schedule": "*/5 * * * *"}),
            serde_json::json!({"terms": ["acme"], "requests_per_hour": 100}),
            serde_json::json!({"tags": ["story"]}),
        ] {
            assert!(serde_json::from_value::<HackerNewsConfig>(unknown.clone()).is_err(), "{unknown}");
        }

        let invalid = [
            HackerNewsConfig { terms: vec![], ..config.clone() },
            HackerNewsConfig { terms: vec![" ".into()], ..config.clone() },
            HackerNewsConfig { tags: vec![], ..config.clone() },
            HackerNewsConfig { base_url: "ftp://hn.example".into(), ..config.clone() },
            HackerNewsConfig { hits_per_page: 0, ..config.clone() },
            HackerNewsConfig { hits_per_page: 1001, ..config.clone() },
            HackerNewsConfig { max_pages_per_poll: 0, ..config },
        ];
        let errors: Vec<_> = invalid
            .into_iter()
            .map(|config| HackerNewsSource::new("hn", config, HttpOptions::default()).unwrap_err())
            .collect();
        assert!(matches!(errors[..2], [BuildError::NoTerms, BuildError::NoTerms]), "{errors:?}");
        assert!(matches!(errors[2], BuildError::NoTags), "{}", errors[2]);
        assert!(matches!(&errors[3], BuildError::InvalidBaseUrl(url) if url == "ftp://hn.example"), "{}", errors[3]);
        assert!(matches!(errors[4..6], [BuildError::InvalidHitsPerPage(0), BuildError::InvalidHitsPerPage(1001)]));
        assert!(matches!(errors[6], BuildError::InvalidMaxPages), "{}", errors[6]);
    }
}
