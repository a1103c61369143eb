//! The declarative source: any JSON API, described in TOML instead of
//! programmed, so an administrator can bring in a niche forum or tool.
//! `examples/hackernews.toml` and `examples/stackexchange.toml` describe
//! the two APIs the built-in `hackernews` and `stackexchange` connectors
//! read, and give the same contributions.
//!
//! ```toml
//! [sources.hn]
//! type = "http"
//! schedule = "every 5m"
//! platform = "hackernews"                 # written on every contribution
//! url = "https://hn.algolia.com/api/v1/search_by_date"
//! method = "GET"                          # or "POST", with `body`
//! items = "/hits"                         # JSON pointer to the items
//! watermark = "created_at"                # or "updated_at", or { pointer, transform }
//! overlap_seconds = 7200                  # later passes look back this much more
//! lookback_seconds = 86400                # a first pass without `since`
//! newest_first = false                    # true: stop at the first older item
//! max_pages_per_poll = 10
//! query = { query = "acme", numericFilters = "created_at_i>{since_unix}" }
//! headers = { Accept = "application/json" }
//! auth = { kind = "bearer", token = { env = "HN_TOKEN" } }
//! pagination = { kind = "page", param = "page", start = 0, total_pages = "/nbPages" }
//! streams = [{ name = "stories", query = { tags = "story" } }, { name = "comments", query = { tags = "comment" } }]
//!
//! [sources.hn.fields]
//! id = "/objectID"
//! created_at = { pointer = "/created_at_i", transform = "unix" }
//! body = [{ pointer = "/comment_text", transform = "html_to_text" }, "/url"]
//! url = "https://news.ycombinator.com/item?id={/objectID}"
//! ```
//!
//! **Requests.** `url`, the values of `query` and the strings of `body` are
//! templates: `{since_unix}`, `{since_unix_ms}`, `{since_rfc3339}` and
//! `{since_date}` are the pass's lower bound; `{page}`, `{offset}`,
//! `{limit}` and `{cursor}` the position of the page kinds that have one;
//! `{stream}` the stream's name. An unknown placeholder or an unbalanced
//! brace is a deserialization error. `auth` is `none` (default), `bearer {
//! token }`, `basic { username, password }`, `header { name, value }` or
//! `query { name, value }`, with secrets as `{ env = ".." }` or `{ file =
//! ".." }`; resolved when the source is built, never in logs, errors, Debug
//! output or stored cursors.
//!
//! **Passes.** Each `poll` fetches one page of one stream. A *pass* of a
//! stream pages from its lower bound to the end of the results: the
//! watermark minus `overlap_seconds`, or on a first pass the daemon's
//! `since`, else `lookback_seconds` ago. Items whose watermark time is older
//! than the bound are skipped (an API that ignores the filter then costs
//! requests, never duplicates). The bound is the watermark itself: an
//! inclusive filter (`>=`, Stack Exchange's `min`) asks again for the items
//! of the watermark's second, which the daemon's ledger drops unchanged; an
//! exclusive one (`>`) asks only for newer items. An API that answers the
//! same page twice in a row (it ignores the page asked for) ends the pass. The watermark, the newest time seen, moves
//! when the pass ends (for the `watermark` kind: after every page), so a
//! pass interrupted midway starts over from the old one and skips nothing.
//! A pass longer than `max_pages_per_poll` pages is paused, its position kept
//! in the cursor, and resumed by the next poll; `has_more` stays set until
//! every stream had its turn.
//!
//! **Pagination** (`kind`): `none`; `page` (`param`, `start`, `has_more`,
//! `total_pages`, `page_size`); `offset` (`param`, `limit_param`, `limit`,
//! `has_more`, `total`); `cursor` (`pointer` to the next cursor, `param`,
//! `has_more`); `link` (the `Link` header's `rel="next"`); `next_url`
//! (`pointer` to the next page's URL); `watermark` (keyset paging on the
//! watermark for oldest-first lists with an inclusive filter; `param` pages by
//! number only while a whole page shares one time). Every kind stops at a
//! page without items. A next URL (link, next_url) must stay on the origin of
//! `url`: credentials are never sent elsewhere.
//!
//! **Fields.** See [`FieldsConfig`]: each field is a JSON pointer, a
//! template with pointers in braces, a table with a `transform`
//! (`html_to_text`, `text`; for times `unix`, `unix_ms`, `rfc3339`) and a
//! `when` condition, or a list of these (the first that gives a value wins).
//! `id`, `created_at` and `body` or `title` are required. An item without an
//! id or a creation time, or with a value that cannot be read (a time that
//! does not parse, an object where text is expected), is quarantined with its
//! reason and the rest of the page goes on.
//!
//! **Streams.** `streams` lists several searches of one API (their `query`
//! added to the definition's, an optional `kind`), each with its own
//! watermark, polled in turn: so one definition reads both the stories and
//! the comments of Hacker News, as the built-in connector does.
//!
//! What a declarative source does not do: follow-up requests per item (the
//! answers and comments of Stack Exchange questions), platform-specific
//! rate-limit fields in bodies (Stack Exchange's `backoff`; the shared client
//! still honours `Retry-After` and the usual rate-limit headers), or going
//! past a search API's hit cap with time windows (Algolia's 1,000 hits).

mod config;
mod mapping;
mod request;
mod template;
#[cfg(test)]
mod tests;

use std::{
    collections::HashSet,
    sync::{Mutex, OnceLock},
};

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
pub use config::{
    AuthConfig, Credential, FieldSource, FieldSpec, FieldsConfig, FlagSpec, HttpSourceConfig, KindSpec, Method,
    PaginationConfig, Pairs, StreamConfig, TagsSpec, TextTransform, TimeTransform, Transform, ValueFrom, WatermarkSpec,
};
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use template::{BodyNode, BodyTemplate, ItemPiece, ItemTemplate, Pointer, RequestPiece, RequestTemplate, Var};
use tributary_sdk::{
    Cursor, HttpClient, HttpError, HttpOptions, Page, PollRequest, Quarantined, SecretError, Source, SourceError,
    http::safe_target, model::short_hash, source::check_status,
};
use url::Url;

use self::{
    mapping::{Mapper, present, scalar_text, truthy},
    request::{Vars, next_link, without_param},
};

/// Why an [`HttpSource`] could not be built from its definition.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("http source: `platform` must be lowercase letters, digits, `_` or `-`, not `{0}`")]
    InvalidPlatform(String),
    #[error("http source: `url` must be an http(s) URL with a literal scheme and host: {0}")]
    InvalidUrl(String),
    #[error("http source: {0}")]
    Definition(String),
    #[error("http source: header `{0}` cannot be sent (invalid name or value)")]
    InvalidHeader(String),
    #[error("http source `auth`: {0}")]
    Secret(#[from] SecretError),
    #[error("http source HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// A declarative source, built from an [`HttpSourceConfig`].
#[derive(Debug)]
pub struct HttpSource {
    instance: String,
    platform: &'static str,
    config: HttpSourceConfig,
    /// `scheme://host:port` of `url`: next-page URLs must stay on it.
    origin: url::Origin,
    auth: Auth,
    headers: Vec<(HeaderName, HeaderValue)>,
    streams: Vec<Stream>,
    http: HttpClient,
}

/// Resolved credentials; their Debug output is redacted.
#[derive(Debug)]
enum Auth {
    None,
    Bearer(SecretString),
    Basic(SecretString, SecretString),
    Header(HeaderName, SecretString),
    Query(String, SecretString),
}

/// One stream: its query pairs (the definition's with the stream's own
/// merged in) and kind.
#[derive(Debug)]
struct Stream {
    name: String,
    query: Vec<(String, RequestTemplate)>,
    kind: Option<KindSpec>,
}

/// What the cursor of a declarative source holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct HttpCursor {
    /// The streams that have committed something or have a pass under way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    streams: Vec<StreamState>,
    /// The stream this poll goes on with; absent between polls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StreamState {
    name: String,
    /// The newest watermark time committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    watermark: Option<DateTime<Utc>>,
    /// The pass under way (or paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pass: Option<Pass>,
}

/// Where a pass of one stream is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pass {
    /// Items older than this are not asked for (fills `{since_*}`).
    bound: DateTime<Utc>,
    /// The page to fetch next.
    next: Position,
    /// The newest watermark time seen by this pass: the next watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top: Option<DateTime<Utc>>,
    /// Pages fetched by this poll (counted afresh after a pause).
    #[serde(default)]
    pages: u32,
    /// A hash of the last page's items: an API that ignores the page asked
    /// for answers the same page again, which ends the pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last: Option<String>,
}

/// The position of a page within a pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "at", rename_all = "snake_case")]
enum Position {
    Start,
    Page {
        page: u64,
    },
    Offset {
        offset: u64,
    },
    Cursor {
        cursor: String,
    },
    /// A next-page URL, without the `auth` query parameter.
    Url {
        url: String,
    },
}

/// A platform name for [`Source::platform`], kept for the life of the
/// process (once per distinct name).
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// `at` moved back by `seconds`, never panicking.
fn back(at: DateTime<Utc>, seconds: u64) -> DateTime<Utc> {
    let delta = TimeDelta::try_seconds(i64::try_from(seconds).unwrap_or(i64::MAX)).unwrap_or(TimeDelta::MAX);
    at.checked_sub_signed(delta).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn raw(item: &Value) -> String {
    serde_json::to_string(item).unwrap_or_default()
}

/// One answer, read.
struct Fetched {
    body: Value,
    items: Vec<Value>,
    link: Option<String>,
    /// The URL asked, without the `auth` query parameter.
    url: Url,
    target: String,
}

impl HttpSource {
    pub fn new(instance: &str, config: HttpSourceConfig, http: HttpOptions) -> Result<HttpSource, BuildError> {
        let platform = config.platform.as_str();
        if platform.is_empty()
            || !platform.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(BuildError::InvalidPlatform(config.platform.clone()));
        }
        let origin = Self::check_url(&config)?;
        Self::check_placeholders(&config)?;
        if matches!(config.watermark, WatermarkSpec::UpdatedAt) && config.fields.updated_at.is_none() {
            return Err(BuildError::Definition("`watermark = \"updated_at\"` needs `fields.updated_at`".into()));
        }
        if config.body.is_some() && config.method != Method::POST {
            return Err(BuildError::Definition("`body` is sent only with `method = \"POST\"`".into()));
        }
        let mut headers = Vec::new();
        for (name, value) in &config.headers.0 {
            let header = HeaderName::from_bytes(name.as_bytes()).ok().zip(HeaderValue::from_str(value).ok());
            headers.push(header.ok_or_else(|| BuildError::InvalidHeader(name.clone()))?);
        }
        let auth = match &config.auth {
            AuthConfig::None {} => Auth::None,
            AuthConfig::Bearer { token } => Auth::Bearer(token.resolve()?),
            AuthConfig::Basic { username, password } => {
                let resolve = |credential: &Credential| match credential {
                    Credential::Plain(text) => Ok(SecretString::from(text.clone())),
                    Credential::Secret(secret) => secret.resolve(),
                };
                Auth::Basic(resolve(username)?, resolve(password)?)
            }
            AuthConfig::Header { name, value } => {
                let name =
                    HeaderName::from_bytes(name.as_bytes()).map_err(|_| BuildError::InvalidHeader(name.clone()))?;
                let value = value.resolve()?;
                if HeaderValue::from_str(value.expose_secret()).is_err() {
                    return Err(BuildError::Definition(format!(
                        "the secret of `auth` header `{name}` holds characters a header cannot carry"
                    )));
                }
                Auth::Header(name, value)
            }
            AuthConfig::Query { name, value } => {
                if name.trim().is_empty() {
                    return Err(BuildError::Definition("`auth` of kind `query` needs a parameter `name`".into()));
                }
                Auth::Query(name.clone(), value.resolve()?)
            }
        };
        let streams = if config.streams.is_empty() {
            vec![Stream { name: String::new(), query: config.query.0.clone(), kind: None }]
        } else {
            config
                .streams
                .iter()
                .map(|stream| {
                    let mut query = config.query.0.clone();
                    for (name, value) in &stream.query.0 {
                        match query.iter_mut().find(|(known, _)| known == name) {
                            Some(pair) => pair.1 = value.clone(),
                            None => query.push((name.clone(), value.clone())),
                        }
                    }
                    Stream { name: stream.name.clone(), query, kind: stream.kind.clone() }
                })
                .collect()
        };
        Ok(HttpSource {
            instance: instance.to_owned(),
            platform: intern(platform),
            origin,
            auth,
            headers,
            streams,
            http: HttpClient::new(http)?,
            config,
        })
    }

    /// `url` with its scheme and host as written: two different sets of
    /// values must give the same origin.
    fn check_url(config: &HttpSourceConfig) -> Result<url::Origin, BuildError> {
        let now = Utc::now();
        let samples = [
            Vars { since: now, page: Some(1), offset: Some(0), limit: Some(10), cursor: Some("a"), stream: "s" },
            Vars {
                since: back(now, 86_400 * 400),
                page: Some(20),
                offset: Some(500),
                limit: Some(99),
                cursor: Some("zz.9"),
                stream: "other",
            },
        ];
        let mut origins = Vec::new();
        for vars in &samples {
            let text = vars.render_lossy(&config.url, true);
            let url =
                Url::parse(&text).map_err(|error| BuildError::InvalidUrl(format!("`{}`: {error}", config.url.raw)))?;
            if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
                return Err(BuildError::InvalidUrl(format!("`{}`", config.url.raw)));
            }
            origins.push(url.origin());
        }
        if origins[0] != origins[1]
            || !matches!(config.url.pieces.first(), Some(RequestPiece::Text(text)) if text.contains("://"))
        {
            return Err(BuildError::InvalidUrl(format!("`{}`: placeholders in the scheme or host", config.url.raw)));
        }
        Ok(origins.swap_remove(0))
    }

    /// Every placeholder used is filled by the pagination (or the streams),
    /// and a pagination without a parameter has its placeholder.
    fn check_placeholders(config: &HttpSourceConfig) -> Result<(), BuildError> {
        let uses = |var: Var| {
            config.url.uses(var)
                || config.query.0.iter().any(|(_, template)| template.uses(var))
                || config.streams.iter().any(|stream| stream.query.0.iter().any(|(_, template)| template.uses(var)))
                || config.body.as_ref().is_some_and(|body| body.uses(var))
        };
        let filled: &[Var] = match &config.pagination {
            PaginationConfig::None {} | PaginationConfig::Link {} | PaginationConfig::NextUrl { .. } => &[],
            PaginationConfig::Page { param, .. } => {
                if param.is_none() && !uses(Var::Page) {
                    return Err(BuildError::Definition(
                        "pagination `page` needs a `param` or a `{page}` placeholder".into(),
                    ));
                }
                &[Var::Page]
            }
            PaginationConfig::Offset { param, .. } => {
                if param.is_none() && !uses(Var::Offset) {
                    return Err(BuildError::Definition(
                        "pagination `offset` needs a `param` or an `{offset}` placeholder".into(),
                    ));
                }
                &[Var::Offset, Var::Limit]
            }
            PaginationConfig::Cursor { param, .. } => {
                if param.is_none() && !uses(Var::Cursor) {
                    return Err(BuildError::Definition(
                        "pagination `cursor` needs a `param` or a `{cursor}` placeholder".into(),
                    ));
                }
                &[Var::Cursor]
            }
            PaginationConfig::Watermark { .. } => {
                let since = [Var::SinceUnix, Var::SinceUnixMs, Var::SinceRfc3339, Var::SinceDate];
                if !since.into_iter().any(uses) {
                    return Err(BuildError::Definition(
                        "pagination `watermark` needs a `{since_*}` placeholder: it pages by moving it".into(),
                    ));
                }
                &[Var::Page]
            }
        };
        for var in [Var::Page, Var::Offset, Var::Limit, Var::Cursor] {
            if uses(var) && !filled.contains(&var) {
                return Err(BuildError::Definition(format!(
                    "placeholder `{{{}}}` is not filled by this `pagination` kind",
                    var.name()
                )));
            }
        }
        if uses(Var::Stream) && config.streams.is_empty() {
            return Err(BuildError::Definition("placeholder `{stream}` needs `streams`".into()));
        }
        Ok(())
    }

    /// The lower bound of a new pass.
    fn first_bound(&self, watermark: Option<DateTime<Utc>>, since: Option<DateTime<Utc>>) -> DateTime<Utc> {
        match (watermark, since) {
            (Some(watermark), _) => back(watermark, self.config.overlap_seconds),
            (None, Some(since)) => since,
            (None, None) => back(Utc::now(), self.config.lookback_seconds),
        }
    }

    fn page_start(&self) -> u64 {
        match &self.config.pagination {
            PaginationConfig::Page { start, .. } | PaginationConfig::Watermark { start, .. } => *start,
            _ => 0,
        }
    }

    /// The placeholders' values for the next page of `pass`.
    fn vars<'a>(&self, stream: &'a Stream, pass: &'a Pass) -> Vars<'a> {
        let page = match &self.config.pagination {
            PaginationConfig::Page { start, .. } | PaginationConfig::Watermark { start, .. } => match pass.next {
                Position::Page { page } => Some(page),
                _ => Some(*start),
            },
            _ => None,
        };
        let (offset, limit) = match (&pass.next, &self.config.pagination) {
            (Position::Offset { offset }, PaginationConfig::Offset { limit, .. }) => (Some(*offset), Some(*limit)),
            (_, PaginationConfig::Offset { limit, .. }) => (Some(0), Some(*limit)),
            _ => (None, None),
        };
        let cursor = match &pass.next {
            Position::Cursor { cursor } => Some(cursor.as_str()),
            _ => None,
        };
        Vars { since: pass.bound, page, offset, limit, cursor, stream: &stream.name }
    }

    /// A next-page URL from the answer, resolved and kept on our origin;
    /// without the `auth` query parameter.
    fn follow(&self, fetched: &Fetched, next: &str) -> Result<Url, SourceError> {
        let url = fetched.url.join(next).map_err(|error| {
            SourceError::Decode(format!("{}: the next page's URL cannot be read: {error}", fetched.target))
        })?;
        if url.origin() != self.origin {
            return Err(SourceError::Decode(format!(
                "{}: the next page's URL leaves {} for {}; not followed (credentials stay on their origin)",
                fetched.target,
                self.origin.ascii_serialization(),
                url.origin().ascii_serialization()
            )));
        }
        Ok(match &self.auth {
            Auth::Query(name, _) => without_param(&url, name),
            _ => url,
        })
    }

    /// The URL of a page.
    fn page_url(&self, stream: &Stream, pass: &Pass) -> Result<Url, SourceError> {
        if let Position::Url { url } = &pass.next {
            let url = Url::parse(url).map_err(|error| SourceError::Decode(format!("stored next-page URL: {error}")))?;
            if url.origin() != self.origin {
                return Err(SourceError::Decode("the stored next-page URL left the source's origin".into()));
            }
            return Ok(url);
        }
        let vars = self.vars(stream, pass);
        let (page, offset, limit, cursor) = (vars.page, vars.offset, vars.limit, vars.cursor);
        let text = vars.render_lossy(&self.config.url, true);
        let mut url = Url::parse(&text).map_err(|error| HttpError::Request(format!("the `url` template: {error}")))?;
        let mut pairs: Vec<(String, String)> = stream
            .query
            .iter()
            .filter_map(|(name, template)| Some((name.clone(), vars.render(template, false)?)))
            .collect();
        let mut push = |name: &Option<String>, value: Option<String>| {
            if let (Some(name), Some(value)) = (name, value) {
                pairs.push((name.clone(), value));
            }
        };
        match &self.config.pagination {
            PaginationConfig::Page { param, .. } | PaginationConfig::Watermark { param, .. } => {
                push(param, page.map(|page| page.to_string()))
            }
            PaginationConfig::Offset { param, limit_param, .. } => {
                push(param, offset.map(|offset| offset.to_string()));
                push(limit_param, limit.map(|limit| limit.to_string()));
            }
            PaginationConfig::Cursor { param, .. } => push(param, cursor.map(str::to_owned)),
            _ => {}
        }
        if !pairs.is_empty() {
            url.query_pairs_mut().extend_pairs(pairs);
        }
        Ok(url)
    }

    /// Fetches one page of `stream`.
    async fn fetch(&self, stream: &Stream, pass: &Pass) -> Result<Fetched, SourceError> {
        let url = self.page_url(stream, pass)?;
        let mut sent = url.clone();
        if let Auth::Query(name, value) = &self.auth {
            sent = without_param(&sent, name);
            sent.query_pairs_mut().append_pair(name, value.expose_secret());
        }
        let target = safe_target(&url);
        let method = match self.config.method {
            Method::GET => reqwest::Method::GET,
            Method::POST => reqwest::Method::POST,
        };
        let mut request = self.http.request(method, sent);
        for (name, value) in &self.headers {
            request = request.header(name.clone(), value.clone());
        }
        request = match &self.auth {
            Auth::Bearer(token) => request.bearer_auth(token.expose_secret()),
            Auth::Basic(username, password) => {
                request.basic_auth(username.expose_secret(), Some(password.expose_secret()))
            }
            Auth::Header(name, value) => match HeaderValue::from_str(value.expose_secret()) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    request.header(name.clone(), value)
                }
                Err(_) => return Err(HttpError::Request(format!("the `{name}` header's value is invalid")).into()),
            },
            Auth::None | Auth::Query(..) => request,
        };
        if let Some(body) = &self.config.body {
            request = request.json(&self.vars(stream, pass).body(&body.0));
        }
        let response = self.http.send(request).await?;
        check_status(&response)?;
        let mut body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| SourceError::Decode(format!("{target} did not answer JSON: {error}")))?;
        let items_at = &self.config.items;
        let items = match body.pointer_mut(items_at.as_str()).map(Value::take) {
            Some(Value::Array(items)) => items,
            Some(Value::Null) => Vec::new(),
            Some(other) => {
                return Err(SourceError::Decode(format!(
                    "{target}: `items` {items_at} holds {}, not a list",
                    if other.is_object() { "an object" } else { "a single value" }
                )));
            }
            None => return Err(SourceError::Decode(format!("{target} answered JSON without `items` {items_at}"))),
        };
        let link = next_link(response.headers.get_all("link").iter().filter_map(|value| value.to_str().ok()));
        Ok(Fetched { body, items, link, url, target })
    }

    /// Where the pass goes after `fetched`, with its bound; `None` at its end.
    fn next_position(
        &self,
        pass: &Pass,
        fetched: &Fetched,
        count: usize,
        newest: Option<DateTime<Utc>>,
    ) -> Result<Option<(Position, DateTime<Utc>)>, SourceError> {
        if count == 0 {
            return Ok(None);
        }
        let body = &fetched.body;
        let said_no_more = |pointer: &Option<Pointer>| {
            pointer.as_ref().and_then(|p| present(p.resolve(body))).is_some_and(|v| !truthy(Some(v)))
        };
        let number = |pointer: &Option<Pointer>| {
            pointer.as_ref().and_then(|p| p.resolve(body)).and_then(|value| match value {
                Value::Number(n) => n.as_u64(),
                Value::String(text) => text.trim().parse().ok(),
                _ => None,
            })
        };
        let short = |page_size: &Option<u64>| page_size.is_some_and(|size| (count as u64) < size);
        let bound = pass.bound;
        let page = match pass.next {
            Position::Page { page } => page,
            _ => self.page_start(),
        };
        let next = match &self.config.pagination {
            PaginationConfig::None {} => None,
            PaginationConfig::Page { start, has_more, total_pages, page_size, .. } => {
                let done_pages = page.saturating_sub(*start).saturating_add(1);
                let last = said_no_more(has_more)
                    || number(total_pages).is_some_and(|total| done_pages >= total)
                    || short(page_size);
                (!last).then(|| (Position::Page { page: page.saturating_add(1) }, bound))
            }
            PaginationConfig::Offset { limit, has_more, total, .. } => {
                let offset = match pass.next {
                    Position::Offset { offset } => offset,
                    _ => 0,
                };
                let next = offset.saturating_add(count as u64);
                let last = (count as u64) < *limit
                    || said_no_more(has_more)
                    || number(total).is_some_and(|total| next >= total);
                (!last).then_some((Position::Offset { offset: next }, bound))
            }
            PaginationConfig::Cursor { pointer, has_more, .. } => {
                let next = present(pointer.resolve(body)).and_then(scalar_text).filter(|next| !next.is_empty());
                let current = match &pass.next {
                    Position::Cursor { cursor } => Some(cursor.as_str()),
                    _ => None,
                };
                match next {
                    Some(next) if current == Some(next.as_str()) => {
                        tracing::warn!(source = %self.instance, "the API answered the cursor it was sent; the pass ends");
                        None
                    }
                    Some(next) if !said_no_more(has_more) => Some((Position::Cursor { cursor: next }, bound)),
                    _ => None,
                }
            }
            PaginationConfig::Link {} => match &fetched.link {
                Some(link) => Some((Position::Url { url: self.follow(fetched, link)?.into() }, bound)),
                None => None,
            },
            PaginationConfig::NextUrl { pointer } => {
                match present(pointer.resolve(body)).and_then(Value::as_str).map(str::trim) {
                    Some(next) => {
                        let url = self.follow(fetched, next)?;
                        if url == fetched.url {
                            tracing::warn!(source = %self.instance, "the next page's URL is this page's; the pass ends");
                            None
                        } else {
                            Some((Position::Url { url: url.into() }, bound))
                        }
                    }
                    None => None,
                }
            }
            PaginationConfig::Watermark { start, has_more, page_size, .. } => {
                if said_no_more(has_more) || short(page_size) {
                    None
                } else {
                    match newest {
                        Some(newest) if newest > bound => Some((Position::Page { page: *start }, newest)),
                        // The whole page shares the bound's time: page by number.
                        _ => Some((Position::Page { page: page.saturating_add(1) }, bound)),
                    }
                }
            }
        };
        Ok(next)
    }
}

#[async_trait]
impl Source for HttpSource {
    fn platform(&self) -> &'static str {
        self.platform
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let mut cursor: HttpCursor = request.stored().unwrap_or_default();
        let index = cursor
            .at
            .as_ref()
            .and_then(|name| self.streams.iter().position(|stream| &stream.name == name))
            .unwrap_or(0);
        let Some(stream) = self.streams.get(index) else {
            return Ok(Page::default());
        };
        let mut state = match cursor.streams.iter().position(|state| state.name == stream.name) {
            Some(found) => cursor.streams.remove(found),
            None => StreamState { name: stream.name.clone(), watermark: None, pass: None },
        };
        let watermark = state.watermark;
        let mut pass = match state.pass.take() {
            Some(pass) => pass,
            None => Pass {
                bound: self.first_bound(watermark, request.since),
                next: Position::Start,
                top: None,
                pages: 0,
                last: None,
            },
        };

        let fetched = self.fetch(stream, &pass).await?;
        let mapper = Mapper {
            platform: self.platform,
            instance: &self.instance,
            fields: &self.config.fields,
            kind: stream.kind.as_ref(),
            watermark: &self.config.watermark,
        };
        let mut page = Page::default();
        let mut seen = HashSet::new();
        let mut newest: Option<DateTime<Utc>> = None;
        let mut older = false;
        for item in &fetched.items {
            let at = mapper.watermark(item);
            let time = at.as_ref().ok().copied().flatten();
            if let Some(time) = time {
                if time < pass.bound {
                    older = true;
                    tracing::debug!(source = %self.instance, at = %time, "item older than the pass's bound; skipped");
                    continue;
                }
                newest = Some(newest.map_or(time, |newest| newest.max(time)));
            }
            let id = mapper.id(item);
            if let Some(id) = &id
                && !seen.insert(id.clone())
            {
                continue;
            }
            // Already committed: reported by the pass that first saw it.
            let committed = matches!((time, watermark), (Some(time), Some(watermark)) if time <= watermark);
            match at.and_then(|_| mapper.contribution(item)) {
                Ok(contribution) => page.contributions.push(contribution),
                Err(reason) if committed => {
                    tracing::debug!(source = %self.instance, id = ?id, %reason, "unreadable item already committed; skipped");
                }
                Err(reason) => page.quarantined.push(Quarantined::new(id, reason, &raw(item))),
            }
        }

        let next = self.next_position(&pass, &fetched, fetched.items.len(), newest)?;
        let next = if older && self.config.newest_first { None } else { next };
        let fingerprint = short_hash(&fetched.items.iter().map(raw).collect::<Vec<_>>().join("\n"));
        let next = if next.is_some() && pass.last.as_ref() == Some(&fingerprint) {
            tracing::warn!(
                source = %self.instance, target = %fetched.target,
                "the API answered the same page twice (does it ignore the pagination?); the pass ends"
            );
            None
        } else {
            next
        };
        pass.last = Some(fingerprint);
        pass.pages = pass.pages.saturating_add(1);
        pass.top = pass.top.max(newest);
        if matches!(self.config.pagination, PaginationConfig::Watermark { .. }) {
            // Keyset paging: every page commits its newest time.
            state.watermark = state.watermark.max(newest);
        }
        let mut stream_done = true;
        match next {
            Some((position, bound)) => {
                pass.next = position;
                pass.bound = bound;
                if pass.pages < self.config.max_pages_per_poll.get() {
                    stream_done = false;
                } else {
                    tracing::info!(
                        source = %self.instance, stream = %stream.name, pages = pass.pages,
                        "pass paused at max_pages_per_poll; the next poll resumes it"
                    );
                    pass.pages = 0;
                }
                state.pass = Some(pass);
            }
            None => {
                state.watermark = state.watermark.max(pass.top);
                tracing::debug!(source = %self.instance, stream = %stream.name, watermark = ?state.watermark, "pass complete");
            }
        }
        let at = if !stream_done {
            Some(index)
        } else if index + 1 < self.streams.len() {
            Some(index + 1)
        } else {
            None
        };
        tracing::debug!(
            source = %self.instance, target = %fetched.target, stream = %stream.name, fetched = fetched.items.len(),
            contributions = page.contributions.len(), quarantined = page.quarantined.len(), "http page polled"
        );
        cursor.streams.push(state);
        cursor.streams.retain(|state| self.streams.iter().any(|stream| stream.name == state.name));
        cursor.streams.sort_by_key(|state| self.streams.iter().position(|stream| stream.name == state.name));
        cursor.at = at.and_then(|at| self.streams.get(at)).map(|stream| stream.name.clone());
        page.has_more = cursor.at.is_some();
        page.next_cursor = Some(Cursor::from_json(&cursor));
        Ok(page)
    }

    /// Asks for the first page of the first stream: the request every pass
    /// starts with.
    async fn check(&self) -> Result<(), SourceError> {
        let Some(stream) = self.streams.first() else { return Ok(()) };
        let pass = Pass { bound: self.first_bound(None, None), next: Position::Start, top: None, pages: 0, last: None };
        self.fetch(stream, &pass).await.map(|_| ())
    }
}
