//! Test kit: recorded platform responses from `../shared/fixtures` and
//! wiremock helpers that replay them. Only for tests.

use std::path::{Path, PathBuf};

use serde_json::Value;
use wiremock::{MockServer, ResponseTemplate};

/// The `shared/` folder beside the repository checkout (override with
/// `TRIBUTARY_SHARED`).
pub fn shared_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRIBUTARY_SHARED") {
        return PathBuf::from(dir);
    }
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    loop {
        let candidate = dir.join("shared");
        if candidate.join("fixtures").is_dir() {
            return candidate;
        }
        let sibling = dir.join("../shared");
        if sibling.join("fixtures").is_dir() {
            return sibling;
        }
        if !dir.pop() {
            return PathBuf::from("../shared");
        }
    }
}

/// One recorded response, as described in `shared/fixtures/README.md`.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Fixture {
    /// Loads `shared/fixtures/<platform>/<name>.json`; panics (it is a test) when absent.
    pub fn load(platform: &str, name: &str) -> Fixture {
        let path = shared_dir().join("fixtures").join(platform).join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
        let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
        let mut headers = Vec::new();
        if let Some(map) = doc["headers"].as_object() {
            for (name, value) in map {
                // The body is stored decoded: these three would lie about it.
                if matches!(name.as_str(), "content-encoding" | "transfer-encoding" | "content-length") {
                    continue;
                }
                match value {
                    Value::String(v) => headers.push((name.clone(), v.clone())),
                    Value::Array(values) => {
                        for v in values.iter().filter_map(Value::as_str) {
                            headers.push((name.clone(), v.to_owned()));
                        }
                    }
                    _ => {}
                }
            }
        }
        Fixture { status: doc["status"].as_u64().unwrap_or(200) as u16, headers, body: doc["body"].clone() }
    }

    /// The raw bytes of a sibling file, e.g. `rss/bbc_in_our_time_rss2.xml`.
    pub fn raw(relative: &str) -> Vec<u8> {
        let path = shared_dir().join("fixtures").join(relative);
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
    }

    /// A wiremock response replaying this fixture: JSON bodies as JSON,
    /// string bodies (XML) as they are.
    pub fn response(&self) -> ResponseTemplate {
        let mut template = ResponseTemplate::new(self.status);
        for (name, value) in &self.headers {
            template = template.append_header(name.as_str(), value.as_str());
        }
        match &self.body {
            Value::String(text) => template.set_body_string(text.clone()),
            body => template.set_body_json(body),
        }
    }
}

/// A started wiremock server, for symmetry with the other helpers.
pub async fn mock_server() -> MockServer {
    MockServer::start().await
}

/// Polls `source` until its round is over (`has_more` false), `since` on the
/// first call only (the cursor carries it on), as the daemon does; panics past
/// `max_pages` (a round that never ends) or on an error.
pub async fn poll_round(
    source: &dyn crate::Source,
    cursor: Option<crate::Cursor>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    max_pages: usize,
) -> Vec<crate::Page> {
    let mut pages = Vec::new();
    let mut request = crate::PollRequest { cursor, since };
    loop {
        let page = source.poll(&request).await.unwrap_or_else(|error| panic!("poll failed: {error}"));
        request = crate::PollRequest { cursor: page.next_cursor.clone().or(request.cursor), since: None };
        let more = page.has_more;
        pages.push(page);
        assert!(pages.len() < max_pages, "the round does not end");
        if !more {
            return pages;
        }
    }
}
