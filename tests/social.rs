//! Social sources through the whole daemon: Hacker News search replayed
//! from the recorded Algolia answers into the file CRM; a Reddit token that
//! outlives a restart; two GitHub sources on one token sharing its budget.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use common::{Setup, read_json, stderr};
use tributary_sdk::{MemoryTokenStore, PollRequest, SourceError, TokenStore, testkit::Fixture};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path, query_param, query_param_is_missing},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hacker_news_mentions_land_on_contacts_in_the_crm() {
    let algolia = MockServer::start().await;
    for tag in ["story", "comment"] {
        Mock::given(method("GET"))
            .and(path("/search_by_date"))
            .and(query_param("tags", tag))
            .respond_with(Fixture::load("hackernews", &format!("search_by_date_{tag}")).response())
            .mount(&algolia)
            .await;
    }
    let setup = Setup::new();
    setup.write_config(&format!(
        r#"
[daemon]
state = "sqlite://{{dir}}/state.db"
[crm]
type = "file"
path = "{{dir}}/crm.json"
[sources.hn]
type = "hackernews"
base_url = "{}"
terms = ["acme"]
schedule = "every 10m"
"#,
        algolia.uri()
    ));
    let sync = setup.run(&["sync", "hn"], &[]);
    assert!(sync.status.success(), "{}", stderr(&sync));
    let crm = read_json(&setup.path("crm.json")).expect("the file CRM was written");
    let activities = crm["activities"].as_object().unwrap();
    assert_eq!(activities.len(), 2, "one story and one comment: {crm:#}");
    assert!(activities.values().all(|a| a["platform"] == "hackernews" && a["intent"].is_string()));
    let contacts = crm["contacts"].as_object().unwrap();
    assert!(contacts.values().all(|c| c["handles"]["hackernews"].is_string()), "{crm:#}");

    // Nothing new: a second sync writes nothing more.
    let again = setup.run(&["sync", "hn"], &[]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("0 new, 0 updated"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reddit_token_outlives_a_restart_and_never_shows() {
    let reddit = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v1/access_token"))
        .respond_with(Fixture::load("reddit", "oauth_access_token").response())
        .mount(&reddit)
        .await;
    for (at, fixture) in [("/r/acme/new", "subreddit_new"), ("/r/acme/comments", "subreddit_comments")] {
        Mock::given(method("GET"))
            .and(path(at))
            .and(query_param_is_missing("after"))
            .respond_with(Fixture::load("reddit", fixture).response())
            .mount(&reddit)
            .await;
    }
    // Older pages: the end of the listing.
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "kind": "Listing", "data": {"after": null, "children": []}
        })))
        .mount(&reddit)
        .await;
    let setup = Setup::new();
    setup.write_config(&format!(
        r#"
[daemon]
state = "sqlite://{{dir}}/state.db"
[crm]
type = "file"
path = "{{dir}}/crm.json"
[sources.subreddit]
type = "reddit"
client_id = "tributary-test"
client_secret = {{ env = "TEST_REDDIT_SECRET" }}
user_agent = "linux:com.example.tributary:v1.0 (by /u/example)"
subreddits = ["acme"]
schedule = "every 10m"
base_url = "{uri}"
auth_url = "{uri}/api/v1/access_token"
"#,
        uri = reddit.uri()
    ));
    let env = [("TEST_REDDIT_SECRET", "app-secret-never-shown"), ("RUST_LOG", "debug")];
    let token_requests = || async {
        let requests = reddit.received_requests().await.unwrap_or_default();
        requests.iter().filter(|r| r.url.path() == "/api/v1/access_token").count()
    };
    let first = setup.run(&["sync", "subreddit"], &env);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(token_requests().await, 1);
    // A second process: the stored token is still valid for most of an hour.
    let second = setup.run(&["sync", "subreddit"], &env);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(token_requests().await, 1, "the restart asked for a token again");
    let listings = reddit.received_requests().await.unwrap_or_default();
    assert!(listings.iter().filter(|r| r.url.path() == "/r/acme/new").count() >= 2, "both runs polled");
    // The store holding the token is its owner's alone, and no output shows a secret.
    let mode = std::fs::metadata(setup.path("state.db")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "state.db mode {mode:o}");
    for output in [&first, &second] {
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), stderr(output));
        for secret in ["<ACCESS_TOKEN>", "app-secret-never-shown"] {
            assert!(!text.contains(secret), "{secret} shown in:\n{text}");
        }
    }
}

/// A GitHub that allows `budget` requests per token and window and answers
/// anything past it with 403, as GitHub does. With `headers`, successes say
/// what is left; without, the limit is a secondary one that only the 403
/// names (with Retry-After). Every page links to a next one, so a source
/// pages for as long as it may.
async fn budgeted_github(budget: u32, headers: bool) -> (MockServer, Arc<AtomicU32>) {
    let github = MockServer::start().await;
    let used = Arc::new(AtomicU32::new(0));
    let counter = used.clone();
    let issues = Fixture::load("github", "issues_page1_link_next").body;
    let comments = Fixture::load("github", "issue_comments_page1_ratelimit_link").body;
    let base = github.uri();
    Mock::given(method("GET"))
        .respond_with(move |request: &wiremock::Request| {
            let used = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let page: u32 = request
                .url
                .query_pairs()
                .find(|(name, _)| name == "page")
                .and_then(|(_, value)| value.parse().ok())
                .unwrap_or(1);
            let next = format!("<{base}{}?page={}&per_page=100>; rel=\"next\"", request.url.path(), page + 1);
            let body = if request.url.path().ends_with("/comments") { &comments } else { &issues };
            if used > budget && !headers {
                return ResponseTemplate::new(403).insert_header("retry-after", "600").set_body_json(serde_json::json!({
                    "message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
                    "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
                }));
            }
            let response = ResponseTemplate::new(if used > budget { 403 } else { 200 })
                .insert_header("link", next.as_str())
                .set_body_json(body.clone());
            if !headers {
                return response;
            }
            response
                .insert_header("x-ratelimit-limit", budget.to_string().as_str())
                .insert_header("x-ratelimit-remaining", budget.saturating_sub(used).to_string().as_str())
                .insert_header("x-ratelimit-reset", (chrono::Utc::now().timestamp() + 3600).to_string().as_str())
        })
        .mount(&github)
        .await;
    (github, used)
}

/// Two GitHub sources on one token, built by the daemon's registry.
fn github_sources(setup: &Setup, github: &MockServer) -> Vec<tributary::registry::BuiltSource> {
    let config_path = setup.write_config(&format!(
        r#"
[daemon]
state = "sqlite://{{dir}}/state.db"
[crm]
type = "file"
path = "{{dir}}/crm.json"
[sources.product]
type = "github"
repos = ["acme/product"]
token = {{ env = "TEST_SHARED_GITHUB_TOKEN" }}
base_url = "{uri}"
max_pages_per_poll = 1000
schedule = "every 10m"
[sources.docs]
type = "github"
repos = ["acme/docs"]
token = {{ env = "TEST_SHARED_GITHUB_TOKEN" }}
base_url = "{uri}"
max_pages_per_poll = 1000
schedule = "every 10m"
"#,
        uri = github.uri()
    ));
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("TEST_SHARED_GITHUB_TOKEN", "ghp_shared") };
    let config = tributary::config::Config::load(&config_path).expect("valid config");
    let tokens: Arc<dyn TokenStore> = Arc::new(MemoryTokenStore::default());
    let sources = tributary::registry::build_sources(&config, tokens).expect("sources build");
    assert_eq!(sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["docs", "product"]);
    sources
}

async fn poll_until_refused(source: &dyn tributary_sdk::Source) -> (u32, Option<String>) {
    let mut request = PollRequest::default();
    let mut pages = 0u32;
    loop {
        match source.poll(&request).await {
            Ok(page) => {
                pages += 1;
                request.cursor = page.next_cursor.or(request.cursor);
            }
            Err(SourceError::Http(tributary_sdk::HttpError::RateLimited { .. })) => return (pages, None),
            Err(other) => return (pages, Some(other.to_string())),
        }
        assert!(pages < 10_000, "never stopped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sources_on_one_token_never_exceed_its_budget_together() {
    const BUDGET: u32 = 60;
    let (github, used) = budgeted_github(BUDGET, true).await;
    let setup = Setup::new();
    let sources = github_sources(&setup, &github);
    // Both poll at once, page after page, until their budget stops them.
    let polls: Vec<_> = sources
        .into_iter()
        .map(|built| tokio::spawn(async move { poll_until_refused(&*built.source).await }))
        .collect();
    let mut total_pages = 0;
    for poll in polls {
        let (pages, error) = poll.await.expect("poll task");
        assert_eq!(error, None, "a source was refused instead of waiting for its budget");
        total_pages += pages;
    }
    let sent = used.load(Ordering::SeqCst);
    assert!(sent <= BUDGET, "{sent} requests on a budget of {BUDGET}");
    assert!(sent >= BUDGET / 2, "the sources stopped long before the budget ran low: {sent}");
    assert!(total_pages > 0);
    let requests = github.received_requests().await.unwrap_or_default();
    for repo in ["/repos/acme/product/", "/repos/acme/docs/"] {
        let paths: Vec<_> = requests.iter().map(|r| r.url.to_string()).collect();
        assert!(requests.iter().any(|r| r.url.path().starts_with(repo)), "{repo} was never polled: {paths:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_met_by_one_source_holds_every_source_on_its_token() {
    const BUDGET: u32 = 8;
    let (github, used) = budgeted_github(BUDGET, false).await;
    let setup = Setup::new();
    let sources = github_sources(&setup, &github);
    // `docs` pages until GitHub's secondary limit (a 403 naming 600 s) stops it.
    let (pages, error) = poll_until_refused(&*sources[0].source).await;
    assert_eq!(error, None);
    assert!(pages > 0);
    assert_eq!(used.load(Ordering::SeqCst), BUDGET + 1, "one request met the limit");
    // `product` shares the token: it waits too, without asking.
    let (pages, error) = poll_until_refused(&*sources[1].source).await;
    assert_eq!((pages, error), (0, None));
    assert_eq!(used.load(Ordering::SeqCst), BUDGET + 1, "a source on the same token sent a request");
}
