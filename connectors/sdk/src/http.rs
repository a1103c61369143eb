//! The one HTTP client every connector uses.
//!
//! It owns what every platform needs and no connector should write again:
//! a rate limit of its own (governor), timeouts, gzip, a cap on body size,
//! retries with exponential backoff and full jitter on 429, 5xx and network
//! errors, and a gate that honours `Retry-After` and the platforms'
//! rate-limit headers: once a server says "wait", no request leaves this
//! client before the time it named.
//!
//! Errors and logs name the target as scheme, host and path only: query
//! strings and headers may carry credentials and are never shown.

use std::{
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use reqwest::{
    RequestBuilder, StatusCode,
    header::{HeaderMap, RETRY_AFTER},
};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

/// How a client behaves; every field has a sensible default.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub user_agent: String,
    /// Time for one whole request, connect to last byte.
    pub timeout: Duration,
    /// Attempts after the first one, for 429, 5xx and network errors.
    pub max_retries: u32,
    /// Client-side limit; `None` relies on the server's headers alone.
    pub requests_per_second: Option<NonZeroU32>,
    /// A larger body is refused with [`HttpError::BodyTooLarge`].
    pub max_body_bytes: usize,
    /// The longest server-requested wait honoured inside one call; a longer
    /// one returns [`HttpError::RateLimited`] so the caller can reschedule.
    pub max_inline_wait: Duration,
    /// First backoff step; doubles each attempt, capped at 30 s, jittered.
    pub backoff_base: Duration,
    /// A budget shared with other clients on the same credential; `None`
    /// gives this client a budget of its own (at `requests_per_second`).
    pub budget: Option<RateBudget>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            user_agent: concat!("tributary/", env!("CARGO_PKG_VERSION")).to_owned(),
            timeout: Duration::from_secs(30),
            max_retries: 4,
            requests_per_second: None,
            max_body_bytes: 8 * 1024 * 1024,
            max_inline_wait: Duration::from_secs(60),
            backoff_base: Duration::from_millis(500),
            budget: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("request to {target} timed out")]
    Timeout { target: String },
    #[error("cannot reach {target}: {message}")]
    Connect { target: String, message: String },
    /// `body` is the start of the 429's body (empty when no request was
    /// sent because the gate was closed), for CRMs that say there which
    /// limit was hit.
    #[error("{target} is rate limiting us; retry in {retry_after:?}")]
    RateLimited { target: String, retry_after: Duration, body: String },
    #[error("{target} answered HTTP {status} after {attempts} attempt(s): {body}")]
    Status { target: String, status: u16, attempts: u32, body: String },
    #[error("{target} sent a body larger than {limit} bytes")]
    BodyTooLarge { target: String, limit: usize },
    #[error("{target} sent a body that cannot be read: {message}")]
    Decode { target: String, message: String },
    #[error("cannot build the request: {0}")]
    Request(String),
}

impl HttpError {
    /// The same error with its free text (bodies, messages) passed through
    /// `scrub`: for sinks whose servers may echo a credential back.
    pub fn map_text(self, scrub: impl Fn(&str) -> String) -> HttpError {
        match self {
            HttpError::Status { target, status, attempts, body } => {
                HttpError::Status { target, status, attempts, body: scrub(&body) }
            }
            HttpError::RateLimited { target, retry_after, body } => {
                HttpError::RateLimited { target, retry_after, body: scrub(&body) }
            }
            HttpError::Connect { target, message } => HttpError::Connect { target, message: scrub(&message) },
            HttpError::Decode { target, message } => HttpError::Decode { target, message: scrub(&message) },
            other => other,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Timeout { .. } | HttpError::Connect { .. } => true,
            HttpError::RateLimited { .. } => true,
            HttpError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// A response whose body was read in full (within the size cap).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// scheme://host/path of the request, safe to show.
    pub target: String,
}

impl HttpResponse {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body)
            .map_err(|error| HttpError::Decode { target: self.target.clone(), message: error.to_string() })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The answer's `Retry-After` (seconds or an HTTP date), bounded to a day.
    pub fn retry_after(&self) -> Option<Duration> {
        retry_after(&self.headers)
    }

    /// The body as text for an error message: lossy, at most 1 KiB.
    pub fn body_snippet(&self) -> String {
        snippet(&self.body)
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(1024)]);
    text.trim().to_owned()
}

/// Cheap to clone: clones share the connection pool, the limiter and the gate.
#[derive(Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    budget: RateBudget,
    options: HttpOptions,
}

/// The requests one credential may make: a client-side rate (governor) and
/// a gate that no request passes before the instant the platform named
/// (Retry-After, an exhausted or nearly exhausted remaining/reset pair).
/// Clones share it, so every source on one token draws from one budget.
#[derive(Clone)]
pub struct RateBudget {
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    gate: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for RateBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateBudget").field("limited", &self.limiter.is_some()).finish_non_exhaustive()
    }
}

impl RateBudget {
    /// `None` relies on the platform's headers alone.
    pub fn new(requests_per_second: Option<NonZeroU32>) -> RateBudget {
        let limiter = requests_per_second.map(|rate| Arc::new(RateLimiter::direct(Quota::per_second(rate))));
        RateBudget { limiter, gate: Arc::new(Mutex::new(None)) }
    }

    /// Whether two handles draw from the same budget.
    pub fn same_as(&self, other: &RateBudget) -> bool {
        Arc::ptr_eq(&self.gate, &other.gate)
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").field("options", &self.options).finish_non_exhaustive()
    }
}

impl HttpClient {
    pub fn new(options: HttpOptions) -> Result<HttpClient, HttpError> {
        // Credentials ride in headers: a redirect may stay on its host and
        // scheme (or go from http to https), never leave them.
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            let (from, to) = (&attempt.previous()[0], attempt.url());
            let same_host =
                from.host_str() == to.host_str() && from.port_or_known_default() == to.port_or_known_default();
            let downgrade = from.scheme() == "https" && to.scheme() != "https";
            if attempt.previous().len() > 5 {
                attempt.error("too many redirects")
            } else if !same_host || downgrade {
                attempt.stop()
            } else {
                attempt.follow()
            }
        });
        let inner = reqwest::Client::builder()
            .redirect(redirects)
            .user_agent(options.user_agent.clone())
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(10)))
            .gzip(true)
            .build()
            .map_err(|error| HttpError::Request(error.without_url().to_string()))?;
        let budget = options.budget.clone().unwrap_or_else(|| RateBudget::new(options.requests_per_second));
        Ok(HttpClient { inner, budget, options })
    }

    pub fn options(&self) -> &HttpOptions {
        &self.options
    }

    /// No request on this client's budget (every client sharing it) for
    /// `wait`: for limits a connector reads itself (a body's `backoff`, a
    /// rate-limited 403).
    pub fn hold(&self, wait: Duration) {
        self.close_gate_for(wait.min(MAX_SERVER_WAIT));
    }

    /// How long the budget still holds every request, if it does.
    pub fn held_for(&self) -> Option<Duration> {
        self.gate_remaining().filter(|left| !left.is_zero())
    }

    pub fn get(&self, url: impl reqwest::IntoUrl) -> RequestBuilder {
        self.inner.get(url)
    }

    pub fn post(&self, url: impl reqwest::IntoUrl) -> RequestBuilder {
        self.inner.post(url)
    }

    pub fn request(&self, method: reqwest::Method, url: impl reqwest::IntoUrl) -> RequestBuilder {
        self.inner.request(method, url)
    }

    /// Sends a request, retrying what is worth retrying. Any final answer
    /// that is not 429 or 5xx is returned as is (4xx included) for the
    /// connector to interpret.
    pub async fn send(&self, request: RequestBuilder) -> Result<HttpResponse, HttpError> {
        self.send_with(request, true).await
    }

    /// As [`HttpClient::send`], for a write that is not idempotent (a POST
    /// that creates): a request that may have reached the server (a 5xx, a
    /// timeout, a broken connection) is never sent again, only one the
    /// server refused before doing anything (429). The caller finds out
    /// what happened (searching before it creates) instead of risking a
    /// duplicate.
    pub async fn send_once(&self, request: RequestBuilder) -> Result<HttpResponse, HttpError> {
        self.send_with(request, false).await
    }

    async fn send_with(&self, request: RequestBuilder, repeat_failures: bool) -> Result<HttpResponse, HttpError> {
        let request = request.build().map_err(|error| HttpError::Request(error.without_url().to_string()))?;
        let target = safe_target(request.url());
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            // A wait longer than we may spend inline goes back to the caller.
            if let Some(remaining) = self.gate_remaining()
                && remaining > self.options.max_inline_wait
            {
                return Err(HttpError::RateLimited { target, retry_after: remaining, body: String::new() });
            }
            self.wait_for_gate().await;
            if let Some(limiter) = &self.budget.limiter {
                limiter.until_ready().await;
            }
            let Some(this_try) = request.try_clone() else {
                return Err(HttpError::Request("a streaming body cannot be retried".into()));
            };
            let outcome = self.inner.execute(this_try).await;
            let retry_in = match outcome {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    self.note_rate_limit_headers(&headers);
                    let body = read_capped(response, self.options.max_body_bytes, &target).await?;
                    let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                    if !retryable {
                        tracing::debug!(%target, status = status.as_u16(), attempt, "http response");
                        return Ok(HttpResponse { status, headers, body, target });
                    }
                    let server_wait = server_wait(&headers);
                    tracing::warn!(
                        %target, status = status.as_u16(), attempt,
                        retry_after_ms = server_wait.map(|w| w.as_millis() as u64),
                        "retryable http status"
                    );
                    if let Some(wait) = server_wait {
                        self.close_gate_for(wait);
                        if wait > self.options.max_inline_wait {
                            return Err(HttpError::RateLimited { target, retry_after: wait, body: snippet(&body) });
                        }
                    }
                    let limited = status == StatusCode::TOO_MANY_REQUESTS;
                    if attempt > self.options.max_retries || (!limited && !repeat_failures) {
                        if limited {
                            let retry_after = server_wait.unwrap_or(self.backoff(attempt));
                            return Err(HttpError::RateLimited { target, retry_after, body: snippet(&body) });
                        }
                        return Err(HttpError::Status {
                            target,
                            status: status.as_u16(),
                            attempts: attempt,
                            body: snippet(&body),
                        });
                    }
                    server_wait.unwrap_or_else(|| self.backoff(attempt))
                }
                Err(error) => {
                    let failure = if error.is_timeout() {
                        HttpError::Timeout { target: target.clone() }
                    } else {
                        HttpError::Connect { target: target.clone(), message: error.without_url().to_string() }
                    };
                    tracing::warn!(%target, attempt, error = %failure, "http request failed");
                    if attempt > self.options.max_retries || !repeat_failures {
                        return Err(failure);
                    }
                    self.backoff(attempt)
                }
            };
            tokio::time::sleep(retry_in).await;
        }
    }

    /// Sends and decodes a JSON answer; any non-2xx status is an error.
    pub async fn send_json<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, HttpError> {
        let response = self.send(request).await?;
        if !response.status.is_success() {
            return Err(HttpError::Status {
                target: response.target.clone(),
                status: response.status.as_u16(),
                attempts: 1,
                body: response.body_snippet(),
            });
        }
        response.json()
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.options.backoff_base.saturating_mul(1 << attempt.min(16));
        let cap = exp.min(Duration::from_secs(30));
        let jittered = rand::rng().random_range(0.5..=1.0) * cap.as_secs_f64();
        Duration::from_secs_f64(jittered)
    }

    async fn wait_for_gate(&self) {
        loop {
            let until = *self.budget.gate();
            match until {
                Some(until) if until > Instant::now() => tokio::time::sleep_until(until).await,
                _ => return,
            }
        }
    }

    fn gate_remaining(&self) -> Option<Duration> {
        let until = (*self.budget.gate())?;
        until.checked_duration_since(Instant::now())
    }

    fn close_gate_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut gate = self.budget.gate();
        if gate.is_none_or(|current| current < until) {
            *gate = Some(until);
        }
    }

    /// Adapts the budget to what the platform says is left of it: spent
    /// means no request before the reset; under a quarter left spreads the
    /// rest evenly over the time to the reset, so several sources on one
    /// credential slow down together instead of meeting a 429.
    fn note_rate_limit_headers(&self, headers: &HeaderMap) {
        if let Some(wait) = budget_wait(headers) {
            self.close_gate_for(wait);
        }
    }
}

/// How long the rate-limit headers of a response ask the next request to wait.
fn budget_wait(headers: &HeaderMap) -> Option<Duration> {
    const REMAINING: [&str; 5] = [
        "x-ratelimit-remaining",
        "ratelimit-remaining",
        "x-rate-limit-remaining",
        "rate-limit-remaining",
        "x-hubspot-ratelimit-remaining",
    ];
    // Zendesk names its limit `x-rate-limit` (and `rate-limit`).
    const LIMIT: [&str; 7] = [
        "x-ratelimit-limit",
        "ratelimit-limit",
        "x-rate-limit-limit",
        "x-rate-limit",
        "rate-limit-limit",
        "rate-limit",
        "x-hubspot-ratelimit-max",
    ];
    let remaining = REMAINING.iter().filter_map(|name| header_f64(headers, name)).reduce(f64::min)?;
    // HubSpot names no reset time, only its rolling window.
    let window = header_f64(headers, "x-hubspot-ratelimit-interval-milliseconds")
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    let reset = reset_wait(headers).or(window)?;
    if remaining < 1.0 {
        return Some(reset);
    }
    // Reddit sends what was used instead of the limit.
    let limit = LIMIT
        .iter()
        .find_map(|name| header_f64(headers, name))
        .or_else(|| header_f64(headers, "x-ratelimit-used").map(|used| used + remaining))?;
    (remaining * 4.0 < limit).then(|| reset.div_f64(remaining.floor() + 1.0))
}

/// A numeric header; NaN and infinities (which parse) are refused.
fn header_f64(headers: &HeaderMap, name: &str) -> Option<f64> {
    headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok().filter(|value| value.is_finite())
}

/// The longest wait any header may impose: a day.
const MAX_SERVER_WAIT: Duration = Duration::from_secs(86_400);

/// A wait in seconds, clamped to 0..=a day (never panics).
fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(MAX_SERVER_WAIT).min(MAX_SERVER_WAIT)
}

/// How long the server asked us to wait, from Retry-After (seconds or an
/// HTTP date) or a rate-limit reset header.
fn server_wait(headers: &HeaderMap) -> Option<Duration> {
    retry_after(headers).or_else(|| reset_wait(headers))
}

/// `Retry-After` as seconds or an HTTP date, clamped to 0..=a day.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Some(wait) = value.parse::<f64>().ok().filter(|v| v.is_finite()) {
        return Some(seconds(wait));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = date.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO).min(MAX_SERVER_WAIT))
}

/// Reset headers come as seconds from now (Reddit, IETF draft) or as a Unix
/// time (GitHub, X); a value past 10^9 can only be the latter.
fn reset_wait(headers: &HeaderMap) -> Option<Duration> {
    const RESET: [&str; 4] = ["x-ratelimit-reset", "ratelimit-reset", "x-rate-limit-reset", "rate-limit-reset"];
    // Mastodon sends an RFC 3339 timestamp instead.
    let timestamp = || {
        RESET.iter().find_map(|name| {
            let text = headers.get(*name)?.to_str().ok()?;
            let at = chrono::DateTime::parse_from_rfc3339(text.trim()).ok()?;
            Some((at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds() as f64 / 1000.0)
        })
    };
    let wait = match RESET.iter().find_map(|name| header_f64(headers, name)) {
        Some(value) if value > 1e9 => value - chrono::Utc::now().timestamp() as f64,
        Some(value) => value,
        None => timestamp()?,
    };
    Some(seconds(wait))
}

async fn read_capped(mut response: reqwest::Response, limit: usize, target: &str) -> Result<Vec<u8>, HttpError> {
    if response.content_length().is_some_and(|length| length as usize > limit) {
        return Err(HttpError::BodyTooLarge { target: target.to_owned(), limit });
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(HttpError::BodyTooLarge { target: target.to_owned(), limit });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(error) if error.is_timeout() => return Err(HttpError::Timeout { target: target.to_owned() }),
            Err(error) => {
                return Err(HttpError::Decode { target: target.to_owned(), message: error.without_url().to_string() });
            }
        }
    }
}

/// scheme://host[:port]/path: never the query, which may hold credentials.
pub fn safe_target(url: &reqwest::Url) -> String {
    let mut target = format!("{}://{}", url.scheme(), url.host_str().unwrap_or("?"));
    if let Some(port) = url.port() {
        target.push_str(&format!(":{port}"));
    }
    target.push_str(url.path());
    target
}

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path},
    };

    use super::*;

    fn fast_client() -> HttpClient {
        HttpClient::new(HttpOptions {
            backoff_base: Duration::from_millis(5),
            timeout: Duration::from_millis(500),
            max_retries: 3,
            ..HttpOptions::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn retries_5xx_then_returns_success() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/x"))
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(2)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/x"))
            .respond_with(ResponseTemplate::new(200).set_body_string("ok"))
            .mount(&server)
            .await;
        let client = fast_client();
        let response = client.send(client.get(format!("{}/x", server.uri()))).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"ok");
        assert_eq!(server.received_requests().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn send_once_repeats_only_what_the_server_refused_before_doing_anything() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/create"))
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/limited"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "0"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(201)).mount(&server).await;
        let client = fast_client();
        let failed = client.send_once(client.post(format!("{}/create", server.uri()))).await.unwrap_err();
        assert!(matches!(failed, HttpError::Status { status: 503, attempts: 1, .. }), "{failed:?}");
        let created = client.send_once(client.post(format!("{}/limited", server.uri()))).await.unwrap();
        assert_eq!(created.status, 201, "a 429 is repeated");
        let paths: Vec<String> =
            server.received_requests().await.unwrap().iter().map(|r| r.url.path().to_owned()).collect();
        assert_eq!(paths, ["/create", "/limited", "/limited"]);
    }

    #[tokio::test]
    async fn honours_retry_after_before_the_next_request() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
        let client = fast_client();
        let started = StdInstant::now();
        client.send(client.get(format!("{}/a", server.uri()))).await.unwrap();
        // The gate holds for every request of this client, not just the retried one.
        client.send(client.get(format!("{}/b", server.uri()))).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1), "a request left before Retry-After");
        assert_eq!(server.received_requests().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn long_retry_after_is_handed_back_to_the_caller() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "3600"))
            .mount(&server)
            .await;
        let client = fast_client();
        let error = client.send(client.get(format!("{}/q?api_key=hunter2", server.uri()))).await.unwrap_err();
        match &error {
            HttpError::RateLimited { retry_after, .. } => assert_eq!(retry_after.as_secs(), 3600),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!error.to_string().contains("hunter2"), "query string leaked: {error}");
        // The next call does not sleep for an hour: it is told at once.
        let again = client.send(client.get(format!("{}/q", server.uri()))).await.unwrap_err();
        assert!(matches!(again, HttpError::RateLimited { .. }), "{again:?}");
        assert_eq!(server.received_requests().await.unwrap().len(), 1, "no request while the gate is closed");
    }

    #[tokio::test]
    async fn refuses_a_body_over_the_cap_and_times_out_cleanly() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/big"))
            .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b'a'; 10 * 1024 * 1024]))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/slow"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
            .mount(&server)
            .await;
        let client = fast_client();
        let big = client.send(client.get(format!("{}/big", server.uri()))).await.unwrap_err();
        assert!(matches!(big, HttpError::BodyTooLarge { .. }), "{big:?}");
        let slow = client.send(client.get(format!("{}/slow", server.uri()))).await.unwrap_err();
        assert!(matches!(slow, HttpError::Timeout { .. }), "{slow:?}");
        assert_eq!(server.received_requests().await.unwrap().iter().filter(|r| r.url.path() == "/slow").count(), 4);
    }

    /// Headers a hostile or broken server may send: no panic, bounded waits.
    #[test]
    fn absurd_rate_limit_headers_give_bounded_waits() {
        for (name, value) in [
            ("retry-after", "NaN"),
            ("retry-after", "inf"),
            ("retry-after", "-5"),
            ("retry-after", "1e300"),
            ("retry-after", "Sat, 01 Jan 200000 00:00:00 GMT"),
            ("x-ratelimit-reset", "nan"),
            ("x-ratelimit-reset", "1e300"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, value.parse().unwrap());
            let wait = server_wait(&headers);
            assert!(wait.is_none_or(|w| w <= MAX_SERVER_WAIT), "{name}: {value} -> {wait:?}");
        }
        let client = fast_client();
        let mut headers = HeaderMap::new();
        headers.insert("x-hubspot-ratelimit-remaining", "0".parse().unwrap());
        headers.insert("x-hubspot-ratelimit-interval-milliseconds", "inf".parse().unwrap());
        client.note_rate_limit_headers(&headers);
        headers.insert("x-hubspot-ratelimit-interval-milliseconds", "10000".parse().unwrap());
        client.note_rate_limit_headers(&headers);
        let closed = client.gate_remaining().unwrap();
        assert!(closed > Duration::from_secs(9) && closed <= Duration::from_secs(10), "{closed:?}");
    }

    #[tokio::test]
    async fn credentials_do_not_follow_a_redirect_to_another_host() {
        let elsewhere = MockServer::start().await;
        Mock::given(method("GET")).respond_with(ResponseTemplate::new(200)).mount(&elsewhere).await;
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/same"))
            .respond_with(ResponseTemplate::new(302).insert_header("location", "/landed"))
            .mount(&server)
            .await;
        Mock::given(method("GET")).and(path("/landed")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
        Mock::given(method("GET"))
            .and(path("/away"))
            .respond_with(ResponseTemplate::new(302).insert_header("location", format!("{}/stolen", elsewhere.uri())))
            .mount(&server)
            .await;
        let client = fast_client();
        let same = client.send(client.get(format!("{}/same", server.uri())).header("api-key", "k")).await.unwrap();
        assert_eq!(same.status, 200, "a redirect on the same host is followed");
        let away = client.send(client.get(format!("{}/away", server.uri())).header("api-key", "k")).await.unwrap();
        assert_eq!(away.status, 302, "a redirect to another host is not followed");
        assert!(elsewhere.received_requests().await.unwrap().is_empty());
    }

    fn check_budget_wait(headers: &[(&'static str, &str)], expected_secs: Option<f64>) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        let wait = budget_wait(&map).map(|wait| wait.as_secs_f64());
        match (wait, expected_secs) {
            (Some(wait), Some(expected)) => assert!((wait - expected).abs() < 1.5, "{headers:?}: {wait} != {expected}"),
            (wait, expected) => assert_eq!(wait, expected, "{headers:?}"),
        }
    }

    #[test]
    fn the_budget_adapts_to_remaining_and_reset() {
        // Plenty left: no wait.
        check_budget_wait(
            &[("x-ratelimit-limit", "5000"), ("x-ratelimit-remaining", "4000"), ("x-ratelimit-reset", "600")],
            None,
        );
        // Spent: nothing before the reset.
        check_budget_wait(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "600")], Some(600.0));
        // Under a quarter left: the rest spread evenly to the reset.
        check_budget_wait(
            &[("x-ratelimit-limit", "100"), ("x-ratelimit-remaining", "9"), ("x-ratelimit-reset", "100")],
            Some(10.0),
        );
        // Reddit: used + remaining is the limit; remaining may be fractional.
        check_budget_wait(
            &[("x-ratelimit-used", "590"), ("x-ratelimit-remaining", "9.0"), ("x-ratelimit-reset", "300")],
            Some(30.0),
        );
        check_budget_wait(
            &[("x-ratelimit-used", "10"), ("x-ratelimit-remaining", "590.0"), ("x-ratelimit-reset", "300")],
            None,
        );
        // X and the IETF draft names.
        check_budget_wait(
            &[("x-rate-limit-limit", "450"), ("x-rate-limit-remaining", "0"), ("x-rate-limit-reset", "60")],
            Some(60.0),
        );
        check_budget_wait(
            &[("ratelimit-limit", "3000"), ("ratelimit-remaining", "99"), ("ratelimit-reset", "100")],
            Some(1.0),
        );
        // Zendesk's names for its limit.
        check_budget_wait(
            &[("x-rate-limit", "700"), ("x-rate-limit-remaining", "0"), ("ratelimit-reset", "30")],
            Some(30.0),
        );
        check_budget_wait(
            &[("rate-limit", "100"), ("rate-limit-remaining", "9"), ("rate-limit-reset", "20")],
            Some(2.0),
        );
        // No reset named: nothing to pace against.
        check_budget_wait(&[("x-ratelimit-limit", "100"), ("x-ratelimit-remaining", "1")], None);
    }

    /// A platform that allows `budget` requests per window and counts
    /// every request past it as a violation.
    async fn budgeted_server(budget: u32) -> (MockServer, Arc<std::sync::atomic::AtomicU32>) {
        use std::sync::atomic::{AtomicU32, Ordering};
        let server = MockServer::start().await;
        let used = Arc::new(AtomicU32::new(0));
        let counter = used.clone();
        Mock::given(method("GET"))
            .respond_with(move |_: &wiremock::Request| {
                let used = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let remaining = budget.saturating_sub(used);
                let status = if used > budget { 429 } else { 200 };
                ResponseTemplate::new(status)
                    .insert_header("x-ratelimit-limit", budget.to_string().as_str())
                    .insert_header("x-ratelimit-remaining", remaining.to_string().as_str())
                    .insert_header("x-ratelimit-reset", "3600")
            })
            .mount(&server)
            .await;
        (server, used)
    }

    #[tokio::test]
    async fn clients_on_one_budget_stop_together_when_it_is_spent() {
        let (server, used) = budgeted_server(40).await;
        let budget = RateBudget::new(None);
        let options = || HttpOptions { budget: Some(budget.clone()), max_retries: 0, ..HttpOptions::default() };
        let (first, second) = (HttpClient::new(options()).unwrap(), HttpClient::new(options()).unwrap());
        let run = |client: HttpClient, server: String| async move {
            let mut sent = 0;
            while client.send(client.get(format!("{server}/x"))).await.is_ok() {
                sent += 1;
            }
            sent
        };
        let (a, b) = tokio::join!(run(first, server.uri()), run(second, server.uri()));
        let sent = used.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(a + b, sent, "every request sent was answered with success");
        assert!((30..=40).contains(&sent), "together they stayed within the budget: {sent} ({a} + {b})");
        // Both now wait for the reset, without asking.
        let client = HttpClient::new(options()).unwrap();
        let refused = client.send(client.get(format!("{}/x", server.uri()))).await.unwrap_err();
        assert!(matches!(refused, HttpError::RateLimited { .. }), "{refused:?}");
        assert_eq!(used.load(std::sync::atomic::Ordering::SeqCst), sent, "no request while the budget is spent");
    }

    #[test]
    fn reset_headers_accept_seconds_and_unix_times() {
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-reset", "30".parse().unwrap());
        assert_eq!(reset_wait(&headers), Some(Duration::from_secs(30)));
        let later = chrono::Utc::now().timestamp() + 100;
        headers.insert("x-ratelimit-reset", later.to_string().parse().unwrap());
        let wait = reset_wait(&headers).unwrap().as_secs();
        assert!((98..=100).contains(&wait), "{wait}");
        let at = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
        headers.insert("x-ratelimit-reset", at.parse().unwrap());
        let wait = reset_wait(&headers).unwrap().as_secs();
        assert!((58..=60).contains(&wait), "an RFC 3339 reset (Mastodon): {wait}");
    }
}
