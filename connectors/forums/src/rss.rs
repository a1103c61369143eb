//! RSS and Atom feeds (also RSS 0.9x/1.0 and JSON Feed, through feed-rs).
//!
//! A feed is fetched whole with a conditional GET: the cursor keeps the
//! `ETag` and `Last-Modified` of the last successful fetch, and a `304 Not
//! Modified` gives an empty page. When the feed changed, every entry is
//! returned (the daemon's ledger drops the unchanged ones by content hash).

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use feed_rs::model::{Entry, Feed, FeedType, Person, Text};
use reqwest::{
    StatusCode,
    header::{ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED},
};
use serde::{Deserialize, Serialize};
use tributary_sdk::{
    Author, Contribution, Cursor, HttpClient, HttpError, HttpOptions, HttpResponse, Kind, Page, PollRequest,
    Quarantined, Source, SourceError,
    source::check_status,
    text::{html_to_text, tidy},
};
use url::Url;

const PLATFORM: &str = "rss";

/// An entry updated this long after it was published counts as edited.
const EDIT_GRACE_SECONDS: i64 = 60;

/// Settings of one feed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RssConfig {
    /// Address of the RSS or Atom feed.
    pub url: Url,
    /// Most entries taken from one fetch of the feed (the first ones in the
    /// document, usually the newest).
    #[serde(default = "default_max_items_per_poll")]
    pub max_items_per_poll: usize,
}

fn default_max_items_per_poll() -> usize {
    200
}

/// Why an [`RssSource`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("feed `url` must be an http(s) URL, not `{0}`")]
    InvalidUrl(String),
    #[error("feed HTTP client: {0}")]
    Http(#[from] HttpError),
}

/// One RSS or Atom feed.
#[derive(Debug)]
pub struct RssSource {
    instance: String,
    config: RssConfig,
    http: HttpClient,
}

/// What the cursor of a feed holds: the validators of the last fetch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct RssCursor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
}

impl RssSource {
    pub fn new(instance: &str, config: RssConfig, http: HttpOptions) -> Result<RssSource, BuildError> {
        if !matches!(config.url.scheme(), "http" | "https") {
            // The URL may carry a token: name the scheme only.
            return Err(BuildError::InvalidUrl(format!("{}:...", config.url.scheme())));
        }
        Ok(RssSource { instance: instance.to_owned(), http: HttpClient::new(http)?, config })
    }

    async fn fetch(&self, validators: &RssCursor) -> Result<HttpResponse, SourceError> {
        let mut request = self.http.get(self.config.url.clone()).header(
            reqwest::header::ACCEPT,
            "application/rss+xml, application/atom+xml, application/feed+json, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.5",
        );
        if let Some(etag) = &validators.etag {
            request = request.header(IF_NONE_MATCH, etag.as_str());
        }
        if let Some(last_modified) = &validators.last_modified {
            request = request.header(IF_MODIFIED_SINCE, last_modified.as_str());
        }
        Ok(self.http.send(request).await?)
    }

    fn parse(&self, response: &HttpResponse) -> Result<Feed, SourceError> {
        feed_rs::parser::Builder::new()
            .base_uri(Some(self.config.url.as_str()))
            .build()
            .parse(response.body.as_slice())
            .map_err(|error| SourceError::Decode(format!("{} is not a readable feed: {error}", response.target)))
    }

    fn to_contribution(&self, feed: &Feed, entry: &Entry) -> Result<Contribution, String> {
        if entry.id.trim().is_empty() {
            return Err("the entry has no id".to_owned());
        }
        let created_at = entry
            .published
            .or(entry.updated)
            .or(feed.updated)
            .or(feed.published)
            .ok_or("neither the entry nor the feed has a date")?;
        let url = entry
            .links
            .iter()
            .find(|link| link.rel.as_deref().is_none_or(|rel| rel == "alternate"))
            .or(entry.links.first())
            .map(|link| link.href.clone());
        let body = entry
            .content
            .as_ref()
            .and_then(|content| {
                let body = content.body.as_deref()?;
                let kind = content.content_type.to_string().to_ascii_lowercase();
                let text = if kind.contains("html") {
                    html_to_text(body)
                } else if kind.starts_with("text/") {
                    tidy(body)
                } else {
                    return None;
                };
                (!text.is_empty()).then_some(text)
            })
            .or_else(|| entry.summary.as_ref().map(plain_text))
            .unwrap_or_default();
        let edited = match (entry.published, entry.updated) {
            (Some(published), Some(updated)) => updated - published > Duration::seconds(EDIT_GRACE_SECONDS),
            _ => false,
        };
        Ok(Contribution {
            platform: PLATFORM.to_owned(),
            source: self.instance.clone(),
            external_id: entry.id.clone(),
            url,
            kind: Kind::Post,
            author: author(feed, entry),
            title: entry.title.as_ref().map(plain_text).filter(|title| !title.is_empty()),
            body,
            language: None,
            created_at,
            updated_at: entry.updated,
            parent_id: None,
            thread_id: None,
            tags: entry.categories.iter().map(|category| category.term.clone()).collect(),
            score: None,
            edited,
            deleted: false,
            signals: None,
        })
    }
}

/// Plain text of a feed text construct, HTML or not.
fn plain_text(text: &Text) -> String {
    if text.content_type.to_string().to_ascii_lowercase().contains("html") {
        html_to_text(&text.content)
    } else {
        tidy(&text.content)
    }
}

/// The entry's first author, else the feed's. In RSS, `<author>` holds an
/// e-mail address, often as `email (Name)`; feed-rs stores it as the e-mail
/// of a person named after the element.
fn author(feed: &Feed, entry: &Entry) -> Author {
    let Some(person) = entry.authors.first().or(feed.authors.first()) else {
        // No author at all: an empty id, which the daemon attaches to no contact.
        return Author::default();
    };
    let is_rss = matches!(feed.feed_type, FeedType::RSS0 | FeedType::RSS1 | FeedType::RSS2);
    let (mut name, mut email) = (non_empty(&person.name), None);
    if let Some(raw) = person.email.as_deref() {
        let (address, name_in_email) = split_mailbox(raw);
        email = address;
        if is_rss && person.name == "author" {
            // The element's name, not the person's.
            name = name_in_email.or_else(|| (email.is_none()).then(|| non_empty(raw)).flatten());
        } else if name.is_none() {
            name = name_in_email;
        }
    }
    let uri = person_uri(person);
    let id = email
        .as_deref()
        .map(str::to_lowercase)
        .or_else(|| uri.clone())
        .or_else(|| name.as_deref().map(str::to_lowercase))
        .unwrap_or_default();
    Author { id, handle: name.clone(), display_name: name, email, profile_url: uri, links: Vec::new() }
}

fn person_uri(person: &Person) -> Option<String> {
    person.uri.as_deref().and_then(non_empty)
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// Splits `jo@example.com (Jo Doe)`, `Jo Doe <jo@example.com>` or a bare
/// address into (e-mail, name); text without an address gives no e-mail.
fn split_mailbox(raw: &str) -> (Option<String>, Option<String>) {
    let raw = raw.trim();
    let is_address = |text: &str| {
        let text = text.trim().trim_start_matches("mailto:");
        text.contains('@') && !text.contains(char::is_whitespace)
    };
    let clean = |text: &str| text.trim().trim_start_matches("mailto:").to_owned();
    if let Some((before, after)) = raw.split_once('(')
        && let Some(inner) = after.trim_end().strip_suffix(')')
        && is_address(before)
    {
        return (Some(clean(before)), non_empty(inner));
    }
    if let Some((before, after)) = raw.split_once('<')
        && let Some(inner) = after.trim_end().strip_suffix('>')
        && is_address(inner)
    {
        return (Some(clean(inner)), non_empty(before.trim().trim_matches('"')));
    }
    if is_address(raw) { (Some(clean(raw)), None) } else { (None, None) }
}

fn header_string(response: &HttpResponse, name: reqwest::header::HeaderName) -> Option<String> {
    response.header(name.as_str()).map(str::trim).filter(|value| !value.is_empty()).map(str::to_owned)
}

#[async_trait]
impl Source for RssSource {
    fn platform(&self) -> &'static str {
        PLATFORM
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let validators: RssCursor = request.cursor.as_ref().and_then(Cursor::to_json).unwrap_or_default();
        let response = self.fetch(&validators).await?;
        if response.status == StatusCode::NOT_MODIFIED {
            tracing::debug!(source = %self.instance, "feed not modified");
            return Ok(Page { next_cursor: request.cursor.clone(), ..Page::default() });
        }
        check_status(&response)?;
        let feed = self.parse(&response)?;
        let total = feed.entries.len();
        let mut page = Page::default();
        for entry in feed.entries.iter().take(self.config.max_items_per_poll) {
            match self.to_contribution(&feed, entry) {
                Ok(contribution) => page.contributions.push(contribution),
                Err(reason) => {
                    let raw = serde_json::to_string(&RawEntry::from(entry)).unwrap_or_default();
                    let id = non_empty(&entry.id);
                    page.quarantined.push(Quarantined::new(id, reason, &raw));
                }
            }
        }
        if total > self.config.max_items_per_poll {
            tracing::debug!(source = %self.instance, total, kept = self.config.max_items_per_poll, "feed truncated");
        }
        let next =
            RssCursor { etag: header_string(&response, ETAG), last_modified: header_string(&response, LAST_MODIFIED) };
        tracing::debug!(
            source = %self.instance, entries = total,
            contributions = page.contributions.len(), quarantined = page.quarantined.len(),
            conditional = next != RssCursor::default(), "feed polled"
        );
        page.next_cursor = Some(Cursor::from_json(&next));
        Ok(page)
    }

    /// Fetches and parses the feed once, unconditionally.
    async fn check(&self) -> Result<(), SourceError> {
        let response = self.fetch(&RssCursor::default()).await?;
        check_status(&response)?;
        self.parse(&response).map(|_| ())
    }
}

/// What is kept of a quarantined entry for a human to look at (feed-rs
/// gives no raw XML per entry).
#[derive(Serialize)]
struct RawEntry<'a> {
    id: &'a str,
    title: Option<&'a str>,
    links: Vec<&'a str>,
    published: Option<DateTime<Utc>>,
    updated: Option<DateTime<Utc>>,
    authors: Vec<&'a str>,
    summary: Option<&'a str>,
}

impl<'a> From<&'a Entry> for RawEntry<'a> {
    fn from(entry: &'a Entry) -> Self {
        RawEntry {
            id: &entry.id,
            title: entry.title.as_ref().map(|title| title.content.as_str()),
            links: entry.links.iter().map(|link| link.href.as_str()).collect(),
            published: entry.published,
            updated: entry.updated,
            authors: entry.authors.iter().map(|person| person.name.as_str()).collect(),
            summary: entry.summary.as_ref().map(|summary| summary.content.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration as StdDuration;

    use tributary_sdk::testkit::Fixture;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{header, method, path},
    };

    use super::*;

    const BBC: &str = "rss/bbc_in_our_time_rss2.xml";
    const REDDIT: &str = "rss/reddit_r_rust_atom.xml";

    fn options() -> HttpOptions {
        HttpOptions {
            max_retries: 0,
            backoff_base: StdDuration::from_millis(1),
            timeout: StdDuration::from_secs(5),
            ..HttpOptions::default()
        }
    }

    fn source(server: &MockServer) -> RssSource {
        let config: RssConfig =
            serde_json::from_value(serde_json::json!({ "url": format!("{}/feed", server.uri()) })).unwrap();
        RssSource::new("news", config, options()).unwrap()
    }

    fn xml(file: &str) -> String {
        String::from_utf8(Fixture::raw(file)).unwrap()
    }

    fn feed_response(body: impl Into<Vec<u8>>, content_type: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_raw(body.into(), content_type)
    }

    async fn serve(server: &MockServer, response: ResponseTemplate) {
        Mock::given(method("GET")).and(path("/feed")).respond_with(response).mount(server).await;
    }

    async fn poll_once(body: impl Into<Vec<u8>>, content_type: &str) -> Result<Page, SourceError> {
        let server = MockServer::start().await;
        serve(&server, feed_response(body, content_type)).await;
        source(&server).poll(&PollRequest::default()).await
    }

    /// One expected entry, checked by value.
    struct Expect {
        id: &'static str,
        title: &'static str,
        url: &'static str,
        author_id: &'static str,
        author_name: &'static str,
        profile_url: Option<&'static str>,
        created_at: &'static str,
        tags: &'static [&'static str],
        body_starts: &'static str,
    }

    fn check(page: &Page, expect: &Expect) {
        let at = expect.id;
        assert!(page.quarantined.is_empty(), "{at}: {:?}", page.quarantined);
        assert_eq!(page.contributions.len(), 1, "{at}");
        let c = &page.contributions[0];
        assert_eq!(c.platform, "rss", "{at}");
        assert_eq!(c.source, "news", "{at}");
        assert_eq!(c.external_id, expect.id, "{at}");
        assert_eq!(c.kind, Kind::Post, "{at}");
        assert_eq!(c.title.as_deref(), Some(expect.title), "{at}");
        assert_eq!(c.url.as_deref(), Some(expect.url), "{at}");
        assert_eq!(c.author.id, expect.author_id, "{at}");
        assert_eq!(c.author.handle.as_deref(), Some(expect.author_name), "{at}");
        assert_eq!(c.author.display_name.as_deref(), Some(expect.author_name), "{at}");
        assert_eq!(c.author.profile_url.as_deref(), expect.profile_url, "{at}");
        // The podcast owner's itunes:email is not the entry author's.
        assert_eq!(c.author.email, None, "{at}");
        let created_at: DateTime<Utc> = expect.created_at.parse().unwrap();
        assert_eq!(c.created_at, created_at, "{at}");
        assert_eq!(c.updated_at, Some(created_at), "{at}");
        assert!(!c.edited && !c.deleted, "{at}");
        assert_eq!(c.tags, expect.tags, "{at}");
        assert!(c.body.starts_with(expect.body_starts), "{at}: {:?}", c.body);
        assert!(!c.body.contains('<') && !c.body.contains("&quot;"), "{at}: {:?}", c.body);
        assert_eq!((c.language.as_ref(), c.signals.as_ref(), c.score), (None, None, None), "{at}");
    }

    #[tokio::test]
    async fn recorded_feeds_parse_to_their_entries() {
        let cases = [
            (
                BBC,
                "application/rss+xml",
                Expect {
                    id: "urn:bbc:podcast:m000sjxt",
                    title: "Marcus Aurelius",
                    url: "http://www.bbc.co.uk/programmes/m000sjxt",
                    author_id: "bbc radio 4",
                    author_name: "BBC Radio 4",
                    profile_url: None,
                    created_at: "2021-02-25T10:15:00Z",
                    tags: &[],
                    body_starts: "Melvyn Bragg and guests discuss...",
                },
            ),
            (
                REDDIT,
                "application/atom+xml",
                Expect {
                    id: "t3_glvkc5",
                    title: "Hey Rustaceans! Got an easy question? Ask here (21/2020)!",
                    url: "https://www.reddit.com/r/rust/comments/glvkc5/hey_rustaceans_got_an_easy_question_ask_here/",
                    author_id: "https://www.reddit.com/user/llogiq",
                    author_name: "/u/llogiq",
                    profile_url: Some("https://www.reddit.com/user/llogiq"),
                    created_at: "2020-05-18T05:44:47Z",
                    tags: &["rust"],
                    body_starts: "Mystified about strings?",
                },
            ),
        ];
        for (file, content_type, expect) in &cases {
            let page = poll_once(Fixture::raw(file), content_type).await.unwrap();
            check(&page, expect);
            assert!(!page.has_more);
            assert_eq!(page.next_cursor.as_ref().and_then(Cursor::to_json::<RssCursor>), Some(RssCursor::default()));
        }
        let reddit = poll_once(Fixture::raw(REDDIT), "application/atom+xml").await.unwrap();
        let body = &reddit.contributions[0].body;
        assert!(body.contains("docs that haven't been written yet"), "{body:?}");
        assert!(body.contains("the \"Rust\" tag"), "{body:?}");
    }

    #[tokio::test]
    async fn etag_and_last_modified_make_the_next_fetch_conditional() {
        let server = MockServer::start().await;
        let etag = "\"b006qykl-v7\"";
        let last_modified = "Thu, 25 Feb 2021 10:20:00 GMT";
        Mock::given(method("GET"))
            .and(path("/feed"))
            .and(header("If-None-Match", etag))
            // (wiremock's `header` splits values at commas, which dates have)
            .and(move |request: &wiremock::Request| {
                request.headers.get("If-Modified-Since").is_some_and(|value| value == last_modified)
            })
            .respond_with(ResponseTemplate::new(304).insert_header("ETag", etag))
            .expect(1)
            .with_priority(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/feed"))
            .respond_with(
                feed_response(Fixture::raw(BBC), "application/rss+xml")
                    .insert_header("ETag", etag)
                    .insert_header("Last-Modified", last_modified),
            )
            .expect(1)
            .mount(&server)
            .await;
        let source = source(&server);

        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(first.contributions.len(), 1);
        let cursor = first.next_cursor.clone().unwrap();
        assert_eq!(
            cursor.to_json::<RssCursor>(),
            Some(RssCursor { etag: Some(etag.into()), last_modified: Some(last_modified.into()) })
        );

        let second = source.poll(&PollRequest { cursor: Some(cursor.clone()), since: None }).await.unwrap();
        assert!(second.contributions.is_empty() && second.quarantined.is_empty() && !second.has_more);
        assert_eq!(second.next_cursor, Some(cursor));
    }

    #[tokio::test]
    async fn a_body_that_is_no_feed_is_a_decode_error() {
        for garbage in ["this is not a feed", "<html><body>Login</body></html>", ""] {
            let error = poll_once(garbage, "text/html").await.unwrap_err();
            assert!(
                matches!(&error, SourceError::Decode(message) if message.contains("/feed")),
                "{garbage:?}: {error:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused_without_panicking() {
        let huge = vec![b' '; 10 * 1024 * 1024];
        let error = poll_once(huge, "application/rss+xml").await.unwrap_err();
        assert!(matches!(error, SourceError::Http(HttpError::BodyTooLarge { .. })), "{error:?}");
    }

    #[tokio::test]
    async fn refusals_map_to_auth_and_other_statuses_to_status() {
        for (status, is_auth) in [(403, true), (401, true), (410, false)] {
            let server = MockServer::start().await;
            serve(&server, ResponseTemplate::new(status).set_body_string("go away")).await;
            let source = source(&server);
            for error in [source.poll(&PollRequest::default()).await.unwrap_err(), source.check().await.unwrap_err()] {
                match error {
                    SourceError::Auth(message) => {
                        assert!(is_auth && message.contains("go away"), "{status}")
                    }
                    SourceError::Status { status: got, .. } => {
                        assert!(!is_auth && got == status, "{status}")
                    }
                    other => panic!("{status}: unexpected {other:?}"),
                }
            }
        }
    }

    /// The BBC feed with a second item (given XML) after the first one.
    fn bbc_with_item(item: &str) -> String {
        xml(BBC).replacen("</item>", &format!("</item>\n{item}"), 1)
    }

    #[tokio::test]
    async fn rss_author_elements_give_email_and_name() {
        let items = [
            (
                "<author>editor@bbc.co.uk (Melvyn Bragg)</author>",
                "editor@bbc.co.uk",
                Some("Melvyn Bragg"),
                Some("editor@bbc.co.uk"),
            ),
            ("<author>Editor@BBC.co.uk</author>", "editor@bbc.co.uk", None, Some("Editor@BBC.co.uk")),
            ("<author>Melvyn Bragg</author>", "melvyn bragg", Some("Melvyn Bragg"), None),
            (
                "<dc:creator xmlns:dc=\"http://purl.org/dc/elements/1.1/\">Melvyn Bragg</dc:creator>",
                "melvyn bragg",
                Some("Melvyn Bragg"),
                None,
            ),
        ];
        for (element, id, name, email) in items {
            let item = format!(
                "<item><title>Second</title><guid>urn:test:2</guid><pubDate>Thu, 04 Mar 2021 10:15:00 +0000</pubDate>\
                 <category>History</category><category>Philosophy</category>{element}\
                 <description>&lt;p&gt;5 &amp;lt; 6 &lt;b&gt;bold&lt;/b&gt;&lt;/p&gt;</description></item>"
            );
            let page = poll_once(bbc_with_item(&item), "application/rss+xml").await.unwrap();
            assert_eq!(page.contributions.len(), 2, "{element}");
            let c = &page.contributions[1];
            assert_eq!(c.external_id, "urn:test:2");
            assert_eq!(c.author.id, id, "{element}");
            assert_eq!(c.author.display_name.as_deref(), name, "{element}");
            assert_eq!(c.author.handle.as_deref(), name, "{element}");
            assert_eq!(c.author.email.as_deref(), email, "{element}");
            assert_eq!(c.tags, ["History", "Philosophy"]);
            assert_eq!(c.body, "5 < 6 bold");
            // The first entry still falls back to the feed's itunes:author.
            assert_eq!(page.contributions[0].author.id, "bbc radio 4");
        }
    }

    #[tokio::test]
    async fn an_entry_without_any_date_is_quarantined_and_the_rest_goes_on() {
        let item = "<item><title>Undated</title><guid>urn:test:undated</guid><link>http://example.com/u</link></item>";
        let mut feed = bbc_with_item(item);
        // With a feed date, the entry falls back to it.
        let page = poll_once(feed.clone(), "application/rss+xml").await.unwrap();
        assert_eq!(page.contributions.len(), 2);
        assert_eq!(page.contributions[1].created_at, "2021-02-25T10:15:00Z".parse::<DateTime<Utc>>().unwrap());

        feed = feed.replacen("<pubDate>Thu, 25 Feb 2021 10:15:00 +0000</pubDate>", "", 1);
        let page = poll_once(feed, "application/rss+xml").await.unwrap();
        assert_eq!(page.contributions.len(), 1);
        assert_eq!(page.contributions[0].external_id, "urn:bbc:podcast:m000sjxt");
        assert_eq!(page.quarantined.len(), 1);
        let quarantined = &page.quarantined[0];
        assert_eq!(quarantined.external_id.as_deref(), Some("urn:test:undated"));
        assert!(quarantined.reason.contains("date"), "{}", quarantined.reason);
        assert!(quarantined.raw.contains("http://example.com/u"), "{}", quarantined.raw);
    }

    #[tokio::test]
    async fn atom_updates_after_publication_are_edits() {
        let feed = xml(REDDIT).replacen(
            "<updated>2020-05-18T05:44:47+00:00</updated>",
            "<published>2020-05-18T05:44:47+00:00</published><updated>2020-05-19T08:00:00+00:00</updated>",
            1,
        );
        let page = poll_once(feed, "application/atom+xml").await.unwrap();
        let c = &page.contributions[0];
        assert!(c.edited);
        assert_eq!(c.created_at, "2020-05-18T05:44:47Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(c.updated_at, Some("2020-05-19T08:00:00Z".parse().unwrap()));
    }

    #[tokio::test]
    async fn only_max_items_per_poll_entries_are_taken() {
        let server = MockServer::start().await;
        let item = "<item><title>Second</title><guid>urn:test:2</guid><pubDate>Thu, 04 Mar 2021 10:15:00 +0000</pubDate></item>";
        serve(&server, feed_response(bbc_with_item(item), "application/rss+xml")).await;
        let config = RssConfig { url: format!("{}/feed", server.uri()).parse().unwrap(), max_items_per_poll: 1 };
        let page = RssSource::new("news", config, options()).unwrap().poll(&PollRequest::default()).await.unwrap();
        assert_eq!(page.contributions.len(), 1);
        assert_eq!(page.contributions[0].external_id, "urn:bbc:podcast:m000sjxt");
    }

    #[test]
    fn config_has_defaults_and_rejects_unknown_fields() {
        let config: RssConfig =
            serde_json::from_value(serde_json::json!({"url": "https://example.com/feed.xml"})).unwrap();
        assert_eq!(config.max_items_per_poll, 200);
        assert!(
            serde_json::from_value::<RssConfig>(serde_json::json!({"url": "https://e.com/", "type": "rss"})).is_err()
        );
        let ftp = RssConfig { url: "ftp://example.com/feed?token=s3cr3t".parse().unwrap(), max_items_per_poll: 1 };
        let error = RssSource::new("x", ftp, HttpOptions::default()).unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
    }

    #[test]
    fn mailboxes_split_into_email_and_name() {
        let cases = [
            ("jo@example.com (Jo Doe)", Some("jo@example.com"), Some("Jo Doe")),
            ("Jo Doe <jo@example.com>", Some("jo@example.com"), Some("Jo Doe")),
            ("\"Jo Doe\" <mailto:jo@example.com>", Some("jo@example.com"), Some("Jo Doe")),
            ("jo@example.com", Some("jo@example.com"), None),
            ("Jo Doe", None, None),
            ("Jo (the editor)", None, None),
            ("", None, None),
        ];
        for (raw, email, name) in cases {
            let (got_email, got_name) = split_mailbox(raw);
            assert_eq!((got_email.as_deref(), got_name.as_deref()), (email, name), "{raw:?}");
        }
    }
}
