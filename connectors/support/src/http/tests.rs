use std::{path::Path, time::Duration};

use serde_json::json;
use tributary_sdk::{Contribution, Kind, testkit::Fixture};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{header, method, path, query_param, query_param_is_missing},
};

use super::*;

/// The daemon's keys common to every source, taken out of a `[sources.X]` table.
const COMMON_KEYS: [&str; 8] =
    ["type", "schedule", "jitter", "requests_per_second", "timeout", "enabled", "since", "on_delete"];

fn options() -> HttpOptions {
    HttpOptions {
        max_retries: 0,
        backoff_base: Duration::from_millis(5),
        timeout: Duration::from_secs(5),
        ..HttpOptions::default()
    }
}

fn time(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap()
}

/// The `[sources.X]` table of an example file, without `type`, `schedule`
/// and the daemon's other common keys.
fn example(file: &str) -> toml::Table {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(file);
    let text = std::fs::read_to_string(&file).unwrap();
    let document: toml::Table = toml::from_str(&text).unwrap();
    let sources = document["sources"].as_table().unwrap();
    assert_eq!(sources.len(), 1, "one source per example");
    let mut table = sources.values().next().unwrap().as_table().unwrap().clone();
    assert_eq!(table.get("type").and_then(toml::Value::as_str), Some("http"), "{}", file.display());
    assert!(table.get("schedule").is_some(), "{}", file.display());
    for key in COMMON_KEYS {
        table.remove(key);
    }
    table
}

/// An example's definition with its host replaced by the mock server's.
fn example_at(file: &str, real: &str, server: &MockServer) -> HttpSourceConfig {
    let mut table = example(file);
    let url = table["url"].as_str().unwrap().replace(real, &server.uri());
    table.insert("url".into(), url.into());
    table.try_into().unwrap()
}

/// Polls while `has_more`, from `request`: the contributions, the
/// quarantined items and the last cursor.
async fn drain(source: &dyn Source, mut request: PollRequest) -> (Vec<Contribution>, Vec<Quarantined>, PollRequest) {
    let (mut contributions, mut quarantined) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let page = source.poll(&request).await.unwrap();
        contributions.extend(page.contributions);
        quarantined.extend(page.quarantined);
        if page.next_cursor.is_some() {
            request.cursor = page.next_cursor;
        }
        if !page.has_more {
            request.since = None;
            return (contributions, quarantined, request);
        }
    }
    panic!("the source never said it was done");
}

/// A request received: method, path and sorted query pairs.
type Sent = (String, String, Vec<(String, String)>);

/// Each request received.
async fn requests(server: &MockServer) -> Vec<Sent> {
    let received = server.received_requests().await.unwrap();
    received
        .iter()
        .map(|request| {
            let mut pairs: Vec<(String, String)> =
                request.url.query_pairs().map(|(k, v)| (k.into(), v.into())).collect();
            pairs.sort();
            (request.method.to_string(), request.url.path().to_owned(), pairs)
        })
        .collect()
}

fn query_value(request: &wiremock::Request, name: &str) -> Option<String> {
    request.url.query_pairs().find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
}

fn cursor_of(page: &Page) -> HttpCursor {
    page.next_cursor.as_ref().and_then(Cursor::to_json).unwrap()
}

/// Serves the recorded Algolia answers: page 0 of each tag as recorded, and
/// page 1 as the recorded envelope without hits (the end of the results;
/// the recording says `nbPages` 1,000, so both sources ask for it).
async fn serve_hackernews(server: &MockServer) {
    for tag in ["story", "comment"] {
        let recorded = Fixture::load("hackernews", &format!("search_by_date_{tag}"));
        let mut end = recorded.clone();
        end.body["hits"] = json!([]);
        for (page, answer) in [("0", recorded), ("1", end)] {
            Mock::given(method("GET"))
                .and(path("/search_by_date"))
                .and(query_param("query", "apple"))
                .and(query_param("tags", tag))
                .and(query_param("page", page))
                .respond_with(answer.response())
                .mount(server)
                .await;
        }
    }
}

/// The acceptance test of the declarative source: the Hacker News example
/// gives exactly the contributions of the built-in connector on the same
/// recorded answers, and later asks the same requests.
#[tokio::test]
async fn http_hackernews_example_gives_what_the_builtin_connector_gives() {
    let (builtin_server, declared_server) = (MockServer::start().await, MockServer::start().await);
    serve_hackernews(&builtin_server).await;
    serve_hackernews(&declared_server).await;
    let builtin_config = serde_json::from_value(json!({"terms": ["apple"], "base_url": builtin_server.uri()})).unwrap();
    let builtin = tributary_social::hackernews::HackerNewsSource::new("hn", builtin_config, options()).unwrap();
    let config = example_at("hackernews.toml", "https://hn.algolia.com/api/v1", &declared_server);
    assert_eq!((config.platform(), config.streams.len()), ("hackernews", 2));
    let declared = HttpSource::new("hn", config, options()).unwrap();
    assert_eq!(declared.platform(), builtin.platform());

    let since = PollRequest { cursor: None, since: Some("2014-06-01T00:00:00Z".parse().unwrap()) };
    let (expected, expected_quarantined, builtin_next) = drain(&builtin, since.clone()).await;
    let (got, quarantined, declared_next) = drain(&declared, since).await;
    assert!(expected_quarantined.is_empty() && quarantined.is_empty(), "{quarantined:?}");
    let ids: Vec<_> = got.iter().map(|c| (c.external_id.as_str(), c.kind)).collect();
    assert_eq!(ids, [("7919424", Kind::Post), ("7919431", Kind::Comment)]);
    assert_eq!(got, expected);

    // Same requests, but for the first pass's lower bound: the built-in
    // source asks `created_at_i > since - 1`, the definition `> since`
    // (its `{since_unix}` is `since` itself; no hit falls in that second).
    let (builtin_sent, declared_sent) = (requests(&builtin_server).await, requests(&declared_server).await);
    assert_eq!(declared_sent.len(), 4, "two pages of each stream: {declared_sent:?}");
    let without_filters = |sent: &[Sent]| -> Vec<_> {
        sent.iter()
            .map(|(m, p, pairs)| {
                (m.clone(), p.clone(), pairs.iter().filter(|(k, _)| k != "numericFilters").cloned().collect::<Vec<_>>())
            })
            .collect()
    };
    assert_eq!(without_filters(&declared_sent), without_filters(&builtin_sent));
    for (_, _, pairs) in &declared_sent {
        assert!(pairs.contains(&("numericFilters".into(), "created_at_i>1401580800".into())), "{pairs:?}");
    }

    // The next poll is incremental: from each stream's watermark, two hours
    // back, exactly as the built-in source asks; the recorded items come back
    // identical (the ledger drops them).
    let (expected, _, _) = drain(&builtin, builtin_next).await;
    let (got, _, _) = drain(&declared, declared_next).await;
    assert_eq!(got, expected);
    let (builtin_sent, declared_sent) = (requests(&builtin_server).await, requests(&declared_server).await);
    assert_eq!(declared_sent[4..], builtin_sent[4..]);
    let filters: Vec<_> = declared_sent[4..]
        .iter()
        .filter_map(|(_, _, pairs)| pairs.iter().find(|(k, _)| k == "numericFilters").map(|(_, v)| v.clone()))
        .collect();
    assert_eq!(
        filters,
        ["created_at_i>1403228146", "created_at_i>1403228146", "created_at_i>1403228395", "created_at_i>1403228395"]
    );
}

async fn serve_stackexchange(server: &MockServer) {
    let recorded = Fixture::load("stackexchange", "questions_top_votes");
    let mut end = recorded.clone();
    end.body["items"] = json!([]);
    end.body["has_more"] = false.into();
    // `min` 2018-05-01, and then the newest recorded activity.
    for (min, answer) in [("1525132800", recorded), ("1532639000", end)] {
        Mock::given(method("GET"))
            .and(path("/2.3/questions"))
            .and(query_param("min", min))
            .respond_with(answer.response())
            .mount(server)
            .await;
    }
}

/// The Stack Exchange example against the built-in connector without
/// answers and comments (a declarative source makes no follow-up requests
/// per item): same contributions, same requests.
#[tokio::test]
async fn http_stackexchange_example_gives_what_the_builtin_connector_gives() {
    let (builtin_server, declared_server) = (MockServer::start().await, MockServer::start().await);
    serve_stackexchange(&builtin_server).await;
    serve_stackexchange(&declared_server).await;
    let builtin_config = serde_json::from_value(json!({
        "site": "stackoverflow",
        "tags": ["git"],
        "base_url": format!("{}/2.3", builtin_server.uri()),
        "include_answers": false,
        "include_comments": false,
    }))
    .unwrap();
    let builtin = tributary_social::stackexchange::StackExchangeSource::new("so", builtin_config, options()).unwrap();
    let config = example_at("stackexchange.toml", "https://api.stackexchange.com", &declared_server);
    let declared = HttpSource::new("so", config, options()).unwrap();
    assert_eq!(declared.platform(), builtin.platform());

    let since = PollRequest { cursor: None, since: Some(time(1_525_132_800)) };
    let (expected, expected_quarantined, builtin_next) = drain(&builtin, since.clone()).await;
    let (got, quarantined, declared_next) = drain(&declared, since).await;
    assert!(expected_quarantined.is_empty() && quarantined.is_empty(), "{quarantined:?}");
    assert_eq!(got.len(), 10);
    assert_eq!(got, expected);
    let title = got.iter().find(|c| c.external_id == "q:292357").and_then(|c| c.title.as_deref());
    assert_eq!(title, Some("What is the difference between 'git pull' and 'git fetch'?"));
    assert_eq!(requests(&declared_server).await, requests(&builtin_server).await);
    assert_eq!(requests(&declared_server).await.len(), 2);

    // The next poll asks from the committed watermark, like the built-in one.
    let (expected, _, _) = drain(&builtin, builtin_next).await;
    let (got, _, _) = drain(&declared, declared_next).await;
    assert_eq!((got.len(), expected.len()), (0, 0));
    let (builtin_sent, declared_sent) = (requests(&builtin_server).await, requests(&declared_server).await);
    assert_eq!(declared_sent, builtin_sent);
    assert!(declared_sent[2].2.contains(&("min".into(), "1532639000".into())), "{:?}", declared_sent[2]);
}

/// A small forum API for the other tests: `/posts` answers `{"posts": [..]}`.
fn definition(server: &MockServer, top: &str, tables: &str) -> HttpSourceConfig {
    let text = format!(
        r#"
platform = "forum"
url = "{uri}/posts"
items = "/posts"
watermark = "created_at"
{top}

[query]
since = "{{since_unix}}"

[fields]
id = "/id"
created_at = "/at"
body = "/text"
author_handle = "/user"

{tables}
"#,
        uri = server.uri()
    );
    toml::from_str(&text).unwrap_or_else(|error| panic!("{error}\n{text}"))
}

fn forum(config: HttpSourceConfig) -> HttpSource {
    HttpSource::new("forum", config, options()).unwrap()
}

const T: i64 = 1_700_000_000;

fn post(id: u64, at: i64) -> Value {
    json!({"id": id, "at": at, "text": format!("post {id}"), "user": "maya"})
}

fn answer(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(body)
}

fn since_t() -> PollRequest {
    PollRequest { cursor: None, since: Some(time(T)) }
}

fn ids(page: &Page) -> Vec<&str> {
    page.contributions.iter().map(|c| c.external_id.as_str()).collect()
}

#[tokio::test]
async fn http_page_pagination_pages_until_has_more_is_false() {
    let server = MockServer::start().await;
    let pages = [
        (1, json!({"posts": [post(1, T + 1), post(2, T + 2)], "more": true})),
        (2, json!({"posts": [post(3, T + 3)], "more": false})),
    ];
    for (page, body) in pages {
        Mock::given(path("/posts"))
            .and(query_param("p", page.to_string()))
            .and(query_param("since", T.to_string()))
            .respond_with(answer(body))
            .expect(1)
            .mount(&server)
            .await;
    }
    let source = forum(definition(&server, "", "[pagination]\nkind = \"page\"\nparam = \"p\"\nhas_more = \"/more\""));
    let first = source.poll(&since_t()).await.unwrap();
    assert_eq!(ids(&first), ["1", "2"]);
    assert!(first.has_more);
    let state = &cursor_of(&first).streams[0];
    assert_eq!(state.watermark, None, "the watermark waits for the end of the pass");
    assert_eq!(state.pass.as_ref().map(|pass| &pass.next), Some(&Position::Page { page: 2 }));
    let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
    assert_eq!(ids(&second), ["3"]);
    assert!(!second.has_more);
    let state = &cursor_of(&second).streams[0];
    assert_eq!((state.watermark, state.pass.is_none()), (Some(time(T + 3)), true));
    let c = &second.contributions[0];
    assert_eq!(
        (c.platform.as_str(), c.source.as_str(), c.kind, c.body.as_str()),
        ("forum", "forum", Kind::Post, "post 3")
    );
    assert_eq!(
        (c.author.id.as_str(), c.author.handle.as_deref()),
        ("maya", Some("maya")),
        "the id falls back to the handle"
    );

    // Without `has_more`: an empty page ends the pass, and so does `total_pages`.
    let server = MockServer::start().await;
    Mock::given(path("/posts"))
        .and(query_param("p", "0"))
        .respond_with(answer(json!({"posts": [post(1, T + 1)], "pages": 3})))
        .mount(&server)
        .await;
    Mock::given(path("/posts"))
        .and(query_param("p", "1"))
        .respond_with(answer(json!({"posts": [], "pages": 3})))
        .mount(&server)
        .await;
    let source = forum(definition(&server, "", "[pagination]\nkind = \"page\"\nparam = \"p\"\nstart = 0"));
    let (got, _, _) = drain(&source, since_t()).await;
    assert_eq!(got.len(), 1);
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
    let server = MockServer::start().await;
    Mock::given(path("/posts"))
        .and(query_param("p", "0"))
        .respond_with(answer(json!({"posts": [post(1, T + 1)], "pages": 1})))
        .expect(1)
        .mount(&server)
        .await;
    let source = forum(definition(
        &server,
        "",
        "[pagination]\nkind = \"page\"\nparam = \"p\"\nstart = 0\ntotal_pages = \"/pages\"",
    ));
    assert!(!source.poll(&since_t()).await.unwrap().has_more, "page 0 of 1 is the last");

    // An API that ignores the page asked for answers the same page again:
    // the pass ends there instead of paging forever.
    let server = MockServer::start().await;
    Mock::given(path("/posts")).respond_with(answer(json!({"posts": [post(1, T + 1)]}))).mount(&server).await;
    let source = forum(definition(&server, "", "[pagination]\nkind = \"page\"\nparam = \"p\""));
    let (got, _, next) = drain(&source, since_t()).await;
    assert_eq!(got.len(), 2, "the item twice, which the ledger drops");
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
    assert_eq!(next.stored::<HttpCursor>().unwrap().streams[0].watermark, Some(time(T + 1)));
}

#[tokio::test]
async fn http_offset_pagination_advances_by_the_items_received() {
    let server = MockServer::start().await;
    Mock::given(path("/posts"))
        .and(query_param("from", "0"))
        .and(query_param("size", "2"))
        .respond_with(answer(json!({"posts": [post(1, T + 1), post(2, T + 2)]})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path("/posts"))
        .and(query_param("from", "2"))
        .and(query_param("size", "2"))
        .respond_with(answer(json!({"posts": [post(3, T + 3)]})))
        .expect(1)
        .mount(&server)
        .await;
    let tables = "[pagination]\nkind = \"offset\"\nparam = \"from\"\nlimit_param = \"size\"\nlimit = 2";
    let source = forum(definition(&server, "", tables));
    let (got, _, next) = drain(&source, since_t()).await;
    assert_eq!(got.iter().map(|c| c.external_id.as_str()).collect::<Vec<_>>(), ["1", "2", "3"]);
    let cursor: HttpCursor = next.stored().unwrap();
    assert_eq!(cursor.streams[0].watermark, Some(time(T + 3)), "a short page is the last");
}

#[tokio::test]
async fn http_cursor_pagination_follows_the_cursor_in_the_body() {
    let server = MockServer::start().await;
    Mock::given(path("/posts"))
        .and(query_param_is_missing("after"))
        .respond_with(answer(json!({"posts": [post(1, T + 1)], "meta": {"next": "b+/=1"}})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path("/posts"))
        .and(query_param("after", "b+/=1"))
        .respond_with(answer(json!({"posts": [post(2, T + 2)], "meta": {"next": null}})))
        .expect(1)
        .mount(&server)
        .await;
    let tables = "[pagination]\nkind = \"cursor\"\npointer = \"/meta/next\"\nparam = \"after\"";
    let source = forum(definition(&server, "", tables));
    let first = source.poll(&since_t()).await.unwrap();
    assert!(first.has_more);
    assert_eq!(cursor_of(&first).streams[0].pass.as_ref().unwrap().next, Position::Cursor { cursor: "b+/=1".into() });
    let second = source.poll(&PollRequest { cursor: first.next_cursor, since: None }).await.unwrap();
    assert_eq!(ids(&second), ["2"]);
    assert!(!second.has_more);
}

/// A secret in a temporary file, removed when dropped.
struct SecretFile(std::path::PathBuf);

impl SecretFile {
    fn new(name: &str, value: &str) -> SecretFile {
        let path = std::env::temp_dir().join(format!("tributary-http-{}-{name}", std::process::id()));
        std::fs::write(&path, format!("{value}\n")).unwrap();
        SecretFile(path)
    }

    fn toml(&self) -> String {
        format!("{{ file = {:?} }}", self.0.display().to_string())
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn http_link_pagination_follows_rel_next_and_keeps_the_key_out_of_the_cursor() {
    let key = SecretFile::new("link-key", "k3y-l1nk-s3cr3t");
    let server = MockServer::start().await;
    let next = format!(
        "<{}/posts?page=2&key=k3y-l1nk-s3cr3t>; rel=\"next\", <{}/posts?page=9>; rel=\"last\"",
        server.uri(),
        server.uri()
    );
    Mock::given(path("/posts"))
        .and(query_param_is_missing("page"))
        .and(query_param("key", "k3y-l1nk-s3cr3t"))
        .respond_with(answer(json!({"posts": [post(1, T + 1)]})).insert_header("link", next.as_str()))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path("/posts"))
        .and(query_param("page", "2"))
        .and(query_param("key", "k3y-l1nk-s3cr3t"))
        .respond_with(answer(json!({"posts": [post(2, T + 2)]})))
        .expect(1)
        .mount(&server)
        .await;
    let tables =
        format!("[pagination]\nkind = \"link\"\n[auth]\nkind = \"query\"\nname = \"key\"\nvalue = {}", key.toml());
    let source = forum(definition(&server, "", &tables));
    let first = source.poll(&since_t()).await.unwrap();
    assert!(first.has_more);
    let stored = first.next_cursor.clone().unwrap().0;
    assert!(stored.contains("page=2") && !stored.contains("k3y"), "the key was stored: {stored}");
    let second = source.poll(&PollRequest { cursor: first.next_cursor, since: None }).await.unwrap();
    assert_eq!(ids(&second), ["2"]);
    assert!(!second.has_more);
    let sent = server.received_requests().await.unwrap();
    assert_eq!(
        sent[1].url.query_pairs().filter(|(k, _)| k == "key").count(),
        1,
        "the key is sent once: {}",
        sent[1].url.path()
    );

    // A next link to another origin is not followed: credentials stay home.
    let server = MockServer::start().await;
    Mock::given(path("/posts"))
        .respond_with(
            answer(json!({"posts": [post(1, T + 1)]}))
                .insert_header("link", "<https://elsewhere.example/posts?page=2>; rel=\"next\""),
        )
        .mount(&server)
        .await;
    let source = forum(definition(&server, "", &tables));
    let error = source.poll(&since_t()).await.unwrap_err();
    assert!(
        matches!(&error, SourceError::Decode(m) if m.contains("https://elsewhere.example") && m.contains("not followed")),
        "{error}"
    );
    assert!(!error.to_string().contains("k3y"));
}

#[tokio::test]
async fn http_next_url_pagination_follows_the_url_in_the_body() {
    let server = MockServer::start().await;
    Mock::given(path("/posts"))
        .and(query_param_is_missing("after"))
        .respond_with(answer(json!({"posts": [post(1, T + 1)], "next": "/posts?after=1"})))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path("/posts"))
        .and(query_param("after", "1"))
        .respond_with(answer(json!({"posts": [post(2, T + 2)], "next": ""})))
        .expect(1)
        .mount(&server)
        .await;
    let source = forum(definition(&server, "", "[pagination]\nkind = \"next_url\"\npointer = \"/next\""));
    let (got, _, _) = drain(&source, since_t()).await;
    assert_eq!(got.len(), 2);
}

#[tokio::test]
async fn http_watermark_pagination_moves_the_bound_and_pages_by_number_within_one_second() {
    let server = MockServer::start().await;
    let respond = |since: i64, page: &str, body: Value| {
        Mock::given(path("/posts"))
            .and(query_param("since", since.to_string()))
            .and(query_param("page", page))
            .respond_with(answer(body))
            .expect(1)
    };
    respond(T, "1", json!({"posts": [post(1, T + 1), post(2, T + 5)], "has_more": true})).mount(&server).await;
    // A whole page at the bound's second: the next one is asked by number.
    respond(T + 5, "1", json!({"posts": [post(2, T + 5), post(3, T + 5)], "has_more": true})).mount(&server).await;
    respond(T + 5, "2", json!({"posts": [post(4, T + 5), post(5, T + 9)], "has_more": false})).mount(&server).await;
    let tables = "[pagination]\nkind = \"watermark\"\nparam = \"page\"\nhas_more = \"/has_more\"";
    let source = forum(definition(&server, "", tables));
    let first = source.poll(&since_t()).await.unwrap();
    assert_eq!(cursor_of(&first).streams[0].watermark, Some(time(T + 5)), "each page commits its newest time");
    let (got, _, next) = drain(&source, PollRequest { cursor: first.next_cursor, since: None }).await;
    let ids: Vec<_> = got.iter().map(|c| c.external_id.as_str()).collect();
    assert_eq!(ids, ["2", "3", "4", "5"], "the boundary item comes again; the ledger drops it");
    let cursor: HttpCursor = next.stored().unwrap();
    assert_eq!((cursor.streams[0].watermark, cursor.streams[0].pass.is_none()), (Some(time(T + 9)), true));
}

#[tokio::test]
async fn http_a_pass_pauses_at_max_pages_per_poll_and_the_next_poll_resumes_it() {
    let server = MockServer::start().await;
    for (page, body) in [
        ("1", json!({"posts": [post(3, T + 3)]})),
        ("2", json!({"posts": [post(2, T + 2)]})),
        ("3", json!({"posts": [post(1, T + 1)]})),
        ("4", json!({"posts": []})),
    ] {
        Mock::given(path("/posts"))
            .and(query_param("p", page))
            .respond_with(answer(body))
            .expect(1)
            .mount(&server)
            .await;
    }
    let source = forum(definition(&server, "max_pages_per_poll = 2", "[pagination]\nkind = \"page\"\nparam = \"p\""));
    let (got, _, next) = drain(&source, since_t()).await;
    assert_eq!(got.iter().map(|c| c.external_id.as_str()).collect::<Vec<_>>(), ["3", "2"], "two pages, then paused");
    let paused = next.stored::<HttpCursor>().unwrap();
    assert_eq!(paused.streams[0].watermark, None, "the watermark must not jump");
    let pass = paused.streams[0].pass.clone().unwrap();
    assert_eq!(
        (pass.next, pass.pages, pass.top, pass.bound),
        (Position::Page { page: 3 }, 0, Some(time(T + 3)), time(T))
    );
    let (got, _, next) = drain(&source, next).await;
    assert_eq!(got.iter().map(|c| c.external_id.as_str()).collect::<Vec<_>>(), ["1"], "resumed where it stopped");
    let done = next.stored::<HttpCursor>().unwrap();
    assert_eq!((done.streams[0].watermark, done.streams[0].pass.is_none()), (Some(time(T + 3)), true));
}

#[tokio::test]
async fn http_an_incremental_poll_asks_from_the_watermark() {
    let server = MockServer::start().await;
    Mock::given(path("/posts"))
        .and(query_param("since", T.to_string()))
        .respond_with(answer(json!({"posts": [post(2, T + 20), post(1, T + 10)]})))
        .expect(1)
        .mount(&server)
        .await;
    // The watermark minus the overlap: T + 20 - 5. A server that ignores the
    // filter sends an older item too: it is skipped.
    Mock::given(path("/posts"))
        .and(query_param("since", (T + 15).to_string()))
        .and(query_param("at", "2023-11-14T22:13:35Z"))
        .respond_with(answer(json!({"posts": [post(3, T + 30), post(2, T + 20), post(1, T + 10)]})))
        .expect(1)
        .mount(&server)
        .await;
    let mut config = definition(&server, "overlap_seconds = 5", "");
    config.query.0.push(("at".into(), RequestTemplate::try_from("{since_rfc3339}".to_owned()).unwrap()));
    let source = forum(config);
    let (first, _, next) = drain(&source, since_t()).await;
    assert_eq!(first.len(), 2);
    assert_eq!(next.stored::<HttpCursor>().unwrap().streams[0].watermark, Some(time(T + 20)));
    let (second, _, next) = drain(&source, next).await;
    assert_eq!(second.iter().map(|c| c.external_id.as_str()).collect::<Vec<_>>(), ["3", "2"]);
    assert_eq!(next.stored::<HttpCursor>().unwrap().streams[0].watermark, Some(time(T + 30)));

    // Newest first without a filter: the pass ends at the first older item.
    let server = MockServer::start().await;
    Mock::given(path("/posts"))
        .and(query_param("p", "1"))
        .respond_with(answer(json!({"posts": [post(9, T + 90), post(1, T - 10)]})))
        .expect(1)
        .mount(&server)
        .await;
    let source = forum(definition(&server, "newest_first = true", "[pagination]\nkind = \"page\"\nparam = \"p\""));
    let page = source.poll(&since_t()).await.unwrap();
    assert_eq!((ids(&page), page.has_more), (vec!["9"], false));
}

#[tokio::test]
async fn http_a_malformed_item_is_quarantined_and_the_page_goes_on() {
    let server = MockServer::start().await;
    let mut no_id = post(0, T + 1);
    no_id.as_object_mut().unwrap().remove("id");
    let mut no_time = post(2, 0);
    no_time.as_object_mut().unwrap().remove("at");
    let mut bad_time = post(3, 0);
    bad_time["at"] = "yesterday".into();
    let mut bad_score = post(4, T + 4);
    bad_score["votes"] = "many".into();
    let mut bad_author = post(5, T + 5);
    bad_author["user"] = json!({"name": "x"});
    let items = json!([
        post(1, T + 1),
        no_id,
        no_time,
        post(1, T + 1),
        bad_time,
        bad_score,
        "not an item",
        bad_author,
        post(6, T + 6)
    ]);
    Mock::given(path("/posts")).respond_with(answer(json!({"posts": items}))).mount(&server).await;
    let mut config = definition(&server, "", "");
    config.fields.score = Some(FieldSpec(vec![FieldSource {
        from: ValueFrom::Pointer(Pointer::try_from("/votes".to_owned()).unwrap()),
        transform: None,
        when: None,
    }]));
    let page = forum(config).poll(&since_t()).await.unwrap();
    assert_eq!(ids(&page), ["1", "6"], "once each, and the page goes on");
    let quarantined: Vec<_> = page.quarantined.iter().map(|q| q.external_id.as_deref()).collect();
    assert_eq!(quarantined, [None, Some("2"), Some("3"), Some("4"), None, Some("5")]);
    let reasons: Vec<_> = page.quarantined.iter().map(|q| q.reason.as_str()).collect();
    assert!(reasons[0].contains("no `id`") && reasons[0].contains("/id"), "{}", reasons[0]);
    assert!(reasons[1].contains("no `created_at`"), "{}", reasons[1]);
    assert!(reasons[2].contains("`yesterday` is not"), "{}", reasons[2]);
    assert!(reasons[3].contains("`many` is not a number"), "{}", reasons[3]);
    assert!(reasons[4].contains("not an object"), "{}", reasons[4]);
    assert!(reasons[5].contains("`author_handle`") && reasons[5].contains("an object"), "{}", reasons[5]);
    assert!(page.quarantined[1].raw.contains("post 2"));
    assert_eq!(cursor_of(&page).streams[0].watermark, Some(time(T + 6)));
}

#[tokio::test]
async fn http_each_auth_kind_sends_its_credential_and_never_shows_it() {
    let secret = SecretFile::new("auth", "s3cr3t-t0k3n");
    let file = secret.toml();
    let cases = [
        (
            format!("[auth]\nkind = \"bearer\"\ntoken = {file}"),
            Some(("authorization", "Bearer s3cr3t-t0k3n".to_owned())),
            None,
        ),
        (
            format!("[auth]\nkind = \"basic\"\nusername = \"maya\"\npassword = {file}"),
            Some(("authorization", "Basic bWF5YTpzM2NyM3QtdDBrM24=".to_owned())),
            None,
        ),
        (
            format!("[auth]\nkind = \"header\"\nname = \"X-Api-Key\"\nvalue = {file}"),
            Some(("x-api-key", "s3cr3t-t0k3n".to_owned())),
            None,
        ),
        (
            format!("[auth]\nkind = \"query\"\nname = \"api_key\"\nvalue = {file}"),
            None,
            Some(("api_key", "s3cr3t-t0k3n")),
        ),
        ("[auth]\nkind = \"none\"".to_owned(), None, None),
    ];
    for (tables, expect_header, expect_query) in cases {
        let server = MockServer::start().await;
        Mock::given(path("/posts"))
            .and(query_param("p", "1"))
            .respond_with(answer(json!({"posts": [post(1, T + 1)]})))
            .mount(&server)
            .await;
        // The second page fails: its error must not show the secret either.
        Mock::given(path("/posts"))
            .and(query_param("p", "2"))
            .respond_with(ResponseTemplate::new(500).set_body_string("oops"))
            .mount(&server)
            .await;
        let config = definition(&server, "", &format!("[pagination]\nkind = \"page\"\nparam = \"p\"\n{tables}"));
        let key = config.credential_key();
        let source = forum(config.clone());
        let first = source.poll(&since_t()).await.unwrap();
        let error = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap_err();
        let sent = server.received_requests().await.unwrap();
        assert_eq!(sent.len(), 2, "{tables}");
        for request in &sent {
            match &expect_header {
                Some((name, value)) => assert_eq!(
                    request.headers.get(*name).and_then(|v| v.to_str().ok()),
                    Some(value.as_str()),
                    "{tables}"
                ),
                None => assert!(request.headers.get("authorization").is_none(), "{tables}"),
            }
            if let Some((name, value)) = expect_query {
                assert_eq!(query_value(request, name).as_deref(), Some(value), "{tables}");
            }
        }
        for shown in [
            error.to_string(),
            format!("{error:?}"),
            format!("{source:?}"),
            format!("{config:?}"),
            key,
            first.next_cursor.unwrap().0,
        ] {
            assert!(
                !shown.contains("s3cr3t") && !shown.contains("bWF5YTpzM2NyM3QtdDBrM24"),
                "{tables}: the secret shows in {shown}"
            );
        }
    }

    let missing = definition(
        &MockServer::start().await,
        "",
        "[auth]\nkind = \"bearer\"\ntoken = { env = \"TRIBUTARY_TEST_SURELY_UNSET\" }",
    );
    let error = HttpSource::new("forum", missing, options()).unwrap_err();
    assert!(
        matches!(error, BuildError::Secret(_)) && error.to_string().contains("TRIBUTARY_TEST_SURELY_UNSET"),
        "{error}"
    );
}

#[tokio::test]
async fn http_a_post_body_is_rendered_with_typed_placeholders() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/graphql"))
        .and(header("content-type", "application/json"))
        .respond_with(|request: &wiremock::Request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
            let page = if body["variables"]["after"].is_null() {
                json!({"data": {"posts": {"nodes": [post(1, T + 1)], "end": "c1"}}})
            } else {
                json!({"data": {"posts": {"nodes": [post(2, T + 2)], "end": null}}})
            };
            ResponseTemplate::new(200).set_body_json(page)
        })
        .mount(&server)
        .await;
    let text = format!(
        r#"
platform = "forum"
url = "{uri}/graphql"
method = "POST"
items = "/data/posts/nodes"
watermark = "created_at"
body = {{ query = "query($after: String) {{ posts(after: $after) {{ id }} }} {{{{page}}}}", variables = {{ after = "{{cursor}}", since = "{{since_unix}}", at = "from {{since_date}}", first = 2 }} }}
pagination = {{ kind = "cursor", pointer = "/data/posts/end" }}
fields = {{ id = "/id", created_at = "/at", body = "/text" }}
"#,
        uri = server.uri()
    );
    let config: HttpSourceConfig = toml::from_str(&text).unwrap();
    let (got, _, _) = drain(&forum(config), since_t()).await;
    assert_eq!(got.len(), 2);
    let bodies: Vec<Value> =
        server.received_requests().await.unwrap().iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect();
    assert_eq!(bodies[0]["query"], "query($after: String) { posts(after: $after) { id } } {page}");
    assert_eq!(bodies[0]["variables"], json!({"after": null, "since": T, "at": "from 2023-11-14", "first": 2}));
    assert_eq!(bodies[1]["variables"]["after"], "c1");
}

/// Each snippet is a whole definition with one mistake; the error names it.
#[test]
fn http_bad_definitions_fail_to_deserialize_naming_the_problem() {
    let good = r#"
platform = "forum"
url = "https://forum.example.com/posts?since={since_unix}"
items = "/posts"
watermark = "created_at"
pagination = { kind = "page", param = "page" }
[fields]
id = "/id"
created_at = { pointer = "/at", transform = "unix" }
body = "/text"
"#;
    let config: HttpSourceConfig = toml::from_str(good).unwrap();
    assert!(HttpSource::new("forum", config, options()).is_ok());
    for (change, from, to, expect) in [
        ("a pointer without its slash", "items = \"/posts\"", "items = \"posts\"", "`posts` is not a JSON pointer"),
        ("a bad escape", "id = \"/id\"", "id = \"/i~2d\"", "`~` must be written `~0`"),
        ("an unknown pagination kind", "kind = \"page\"", "kind = \"pages\"", "unknown variant `pages`"),
        ("no watermark", "watermark = \"created_at\"\n", "", "missing field `watermark`"),
        ("a bad watermark", "watermark = \"created_at\"", "watermark = \"created\"", "watermark `created`"),
        ("an unclosed brace", "{since_unix}", "{since_unix", "never closed"),
        ("a stray brace", "{since_unix}", "since_unix}", "closes nothing"),
        ("an unknown placeholder", "{since_unix}", "{since}", "unknown placeholder `{since}`"),
        ("an item template without pointers", "id = \"/id\"", "id = \"q:{id}\"", "is not a JSON pointer"),
        (
            "a text transform on a time",
            "transform = \"unix\"",
            "transform = \"html_to_text\"",
            "unknown variant `html_to_text`",
        ),
        ("neither body nor title", "body = \"/text\"", "url = \"/link\"", "needs a `body` or a `title`"),
        ("an unknown key", "items = \"/posts\"", "items = \"/posts\"\nitem = \"/x\"", "unknown field `item`"),
        (
            "an unknown auth kind",
            "watermark = \"created_at\"",
            "watermark = \"created_at\"\nauth = { kind = \"oauth\" }",
            "unknown variant `oauth`",
        ),
        ("an unknown kind", "body = \"/text\"", "body = \"/text\"\nkind = \"question\"", "unknown kind `question`"),
        ("no pages", "items = \"/posts\"", "items = \"/posts\"\nmax_pages_per_poll = 0", "nonzero"),
        (
            "a pointer in a tags table",
            "body = \"/text\"",
            "body = \"/text\"\ntags = { pointer = \"tags\" }",
            "`tags` is not a JSON pointer",
        ),
    ] {
        let text = good.replacen(from, to, 1);
        assert_ne!(text, good, "{change}: nothing replaced");
        let error = match toml::from_str::<HttpSourceConfig>(&text) {
            Ok(config) => panic!("{change}: accepted as {config:?}"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains(expect), "{change}: {error}");
        assert!(error.contains("line"), "{change}: the error names no line: {error}");
    }
}

#[test]
fn http_definitions_that_cannot_be_built_are_refused() {
    let base = r#"
platform = "forum"
url = "https://forum.example.com/posts"
items = "/posts"
watermark = "created_at"
[fields]
id = "/id"
created_at = "/at"
title = "/title"
"#;
    let build = |from: &str, to: &str| {
        let text = base.replacen(from, to, 1);
        HttpSource::new("forum", toml::from_str(&text).unwrap(), options()).map(|_| ())
    };
    build("", "").unwrap();
    let cases = [
        ("platform = \"forum\"", "platform = \"Forum Posts\"", "`platform`"),
        ("https://forum.example.com/posts", "ftp://forum.example.com/posts", "http(s)"),
        ("https://forum.example.com/posts", "https://{stream}.example.com/posts", "placeholders in the scheme or host"),
        ("/posts\"\nitems", "/posts?page={page}\"\nitems", "`{page}` is not filled"),
        ("items = \"/posts\"", "items = \"/posts\"\npagination = { kind = \"page\" }", "needs a `param` or a `{page}`"),
        ("items = \"/posts\"", "items = \"/posts\"\npagination = { kind = \"watermark\" }", "`{since_*}`"),
        ("watermark = \"created_at\"", "watermark = \"updated_at\"", "needs `fields.updated_at`"),
        ("items = \"/posts\"", "items = \"/posts\"\nbody = { q = 1 }", "only with `method = \"POST\"`"),
        ("items = \"/posts\"", "items = \"/posts\"\nheaders = { \"Bad Header\" = \"x\" }", "`Bad Header`"),
        ("/posts\"\nitems", "/{stream}\"\nitems", "`{stream}` needs `streams`"),
    ];
    for (from, to, expect) in cases {
        let error = build(from, to).unwrap_err().to_string();
        assert!(error.contains(expect), "{to}: {error}");
    }
}

#[test]
fn http_examples_are_complete_source_tables() {
    for file in ["hackernews.toml", "stackexchange.toml"] {
        let config: HttpSourceConfig = example(file).try_into().unwrap();
        let source = HttpSource::new("x", config.clone(), options()).unwrap();
        assert_eq!(source.platform(), config.platform());
        assert!(!config.credential_key().is_empty());
    }
    let hn: HttpSourceConfig = example("hackernews.toml").try_into().unwrap();
    assert_eq!(hn.credential_key(), "http https://hn.algolia.com none");
    assert_eq!(hn.streams.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["story", "comment"]);
}

#[test]
fn http_credential_key_names_the_host_and_the_reference_only() {
    let text = r#"
platform = "forum"
url = "https://forum.example.com:8443/api/posts?since={since_unix}"
items = ""
watermark = "created_at"
auth = { kind = "header", name = "X-Api-Key", value = { env = "FORUM_KEY" } }
fields = { id = "/id", created_at = "/at", body = "/text" }
"#;
    let config: HttpSourceConfig = toml::from_str(text).unwrap();
    assert_eq!(config.credential_key(), "http https://forum.example.com:8443 header x-api-key Env(\"FORUM_KEY\")");
    assert_eq!(config.platform(), "forum");
}

#[test]
fn http_link_headers_are_read_as_rfc_8288_says() {
    assert_eq!(
        next_link([
            r#"<https://api.example.com/x?page=2&a=b,c>; rel="next", <https://api.example.com/x?page=5>; rel="last""#
        ]),
        Some("https://api.example.com/x?page=2&a=b,c".into())
    );
    assert_eq!(
        next_link(["<https://a.example/1>; rel=\"prev\"", "<https://a.example/3>; REL=next"]),
        Some("https://a.example/3".into())
    );
    assert_eq!(
        next_link([r#"<https://a.example/3>; title="a, b"; rel="last next""#]),
        Some("https://a.example/3".into())
    );
    assert_eq!(next_link(["<https://a.example/1>; rel=\"prev\""]), None);
    assert_eq!(next_link(["garbage"]), None);
}

#[test]
fn http_item_fields_read_pointers_templates_and_transforms() {
    let text = r#"
platform = "forum"
url = "https://forum.example.com/posts"
items = "/posts"
watermark = "updated_at"
[fields]
id = "t{/topic}-{/id}"
created_at = { pointer = "/created", transform = "rfc3339" }
updated_at = { pointer = "/edited_ms", transform = "unix_ms" }
title = { pointer = "/title", transform = "html_to_text" }
body = [{ pointer = "/html", transform = "html_to_text" }, { pointer = "/plain", transform = "text" }]
url = "https://forum.example.com/t/{/topic}#{/id}"
author_id = { pointer = "/user/id", when = "/user/active" }
author_email = "/user/mail"
author_url = "https://forum.example.com/u/{/user/name}"
kind = { pointer = "/type", map = { question = "post", answer = "reply" } }
tags = { pointer = "/labels", item = "/name" }
score = "/votes"
deleted = { pointer = "/state", equals = ["removed", "spam"] }
"#;
    let config: HttpSourceConfig = toml::from_str(text).unwrap();
    let mapper =
        Mapper { platform: "forum", instance: "f", fields: &config.fields, kind: None, watermark: &config.watermark };
    let item = json!({
        "topic": 7, "id": "42", "created": "2024-02-21 10:00:00+0000", "edited_ms": 1_708_510_000_500_i64,
        "title": "Export &amp; import", "html": "", "plain": "line one\n\n\n\nline two\u{7}",
        "user": {"id": 5, "active": false, "mail": "maya@example.com", "name": "maya"},
        "type": "answer", "labels": [{"name": "pdf"}, {"name": 3}, {"other": 1}], "votes": "12.5", "state": "removed"
    });
    let c = mapper.contribution(&item).unwrap();
    assert_eq!(c.external_id, "t7-42");
    assert_eq!(c.created_at, "2024-02-21T10:00:00Z".parse::<DateTime<Utc>>().unwrap());
    assert_eq!(c.updated_at, Some("2024-02-21T10:06:40.500Z".parse().unwrap()));
    assert!(c.edited, "edited later than created");
    assert_eq!(mapper.watermark(&item).unwrap(), c.updated_at);
    assert_eq!(c.title.as_deref(), Some("Export & import"));
    assert_eq!(c.body, "", "deleted: the text is not kept");
    assert!(c.deleted);
    assert_eq!(c.url.as_deref(), Some("https://forum.example.com/t/7#42"));
    assert_eq!(c.author.id, "", "`when` is false");
    assert_eq!(c.author.email.as_deref(), Some("maya@example.com"));
    assert_eq!(c.author.profile_url.as_deref(), Some("https://forum.example.com/u/maya"));
    assert_eq!((c.kind, c.tags.clone(), c.score), (Kind::Reply, vec!["pdf".to_owned(), "3".to_owned()], Some(12.5)));

    let mut alive = item.clone();
    alive["state"] = "open".into();
    alive["user"]["active"] = true.into();
    let c = mapper.contribution(&alive).unwrap();
    assert_eq!((c.body.as_str(), c.deleted, c.author.id.as_str()), ("line one\n\nline two", false, "5"));
    alive["type"] = "poll".into();
    let error = mapper.contribution(&alive).unwrap_err();
    assert!(error.contains("`poll` at /type is not mapped"), "{error}");
}
