//! OAuth2 for connectors (RFC 6749): the client credentials, refresh token
//! and password grants, with the tokens kept in a [`TokenStore`].
//!
//! The daemon hands connectors its state store as the token store, so a
//! token (and a rotated refresh token) outlives a restart: the next start
//! uses it until shortly before it expires instead of authorizing again.
//! One [`OAuth2`] refreshes at most once at a time; a request refused with
//! 401 gets one refresh and one retry.
//!
//! Tokens are secrets: they never appear in a log line, an error or a
//! `Debug` output; errors quote only the endpoint and the RFC 6749 `error`
//! code and description.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{
    RequestBuilder, StatusCode,
    header::{AUTHORIZATION, HeaderValue},
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use crate::http::{HttpClient, HttpError, HttpResponse};

/// A token is renewed this long before it expires.
const RENEW_MARGIN: Duration = Duration::from_secs(60);

/// What the token endpoint gave.
#[derive(Clone)]
pub struct StoredToken {
    pub access_token: SecretString,
    /// Kept when the endpoint rotates it; `None` for grants without one.
    pub refresh_token: Option<SecretString>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

impl StoredToken {
    /// Usable for a while yet (no expiry known counts as usable: a 401 says otherwise).
    pub fn is_fresh(&self) -> bool {
        self.expires_at
            .is_none_or(|at| chrono::Duration::from_std(RENEW_MARGIN).is_ok_and(|margin| Utc::now() + margin < at))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("token store: {0}")]
pub struct TokenStoreError(pub String);

/// Where tokens outlive the process. Keys are opaque digests of the token
/// endpoint, the client and the grant: a changed credential is a new key.
#[async_trait]
pub trait TokenStore: Send + Sync {
    async fn load_token(&self, key: &str) -> Result<Option<StoredToken>, TokenStoreError>;
    async fn save_token(&self, key: &str, token: &StoredToken) -> Result<(), TokenStoreError>;
}

/// Tokens for this process only (tests, `check`).
#[derive(Default)]
pub struct MemoryTokenStore(std::sync::Mutex<HashMap<String, StoredToken>>);

#[async_trait]
impl TokenStore for MemoryTokenStore {
    async fn load_token(&self, key: &str) -> Result<Option<StoredToken>, TokenStoreError> {
        Ok(self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(key).cloned())
    }

    async fn save_token(&self, key: &str, token: &StoredToken) -> Result<(), TokenStoreError> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key.to_owned(), token.clone());
        Ok(())
    }
}

/// How the client obtains a token when it has none it can refresh.
pub enum Grant {
    ClientCredentials,
    /// A refresh token issued once by an authorization (user context).
    RefreshToken(SecretString),
    /// Resource owner password credentials (Reddit's "script" apps).
    Password {
        username: String,
        password: SecretString,
    },
}

/// How the client proves who it is to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with the client id and secret (RFC 6749 2.3.1, the default).
    Basic,
    /// `client_id` (and `client_secret` when set) in the form body.
    Body,
}

/// One OAuth2 client of one token endpoint.
pub struct OAuth2Config {
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub client_auth: ClientAuth,
    pub grant: Grant,
    pub scope: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The endpoint refused the grant (bad credentials, revoked token).
    #[error("{target} refused the OAuth2 grant: {reason}")]
    Refused { target: String, reason: String },
    #[error("{target} answered the token request with something that is not a bearer token: {reason}")]
    Decode { target: String, reason: String },
}

/// A bearer token source: cached in memory, persisted in the token store,
/// refreshed before expiry and once on a 401.
pub struct OAuth2 {
    config: OAuth2Config,
    store: Arc<dyn TokenStore>,
    key: String,
    current: tokio::sync::Mutex<Option<StoredToken>>,
}

impl std::fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2")
            .field("token_url", &crate::http::safe_target(&self.config.token_url))
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

/// `Bearer <token>`, marked sensitive so no header dump shows it.
fn bearer_header(token: &StoredToken, target: &str) -> Result<HeaderValue, OAuthError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.access_token.expose_secret())).map_err(|_| {
        OAuthError::Decode { target: target.to_owned(), reason: "the token is not a valid header value".into() }
    })?;
    value.set_sensitive(true);
    Ok(value)
}

impl OAuth2 {
    pub fn new(config: OAuth2Config, store: Arc<dyn TokenStore>) -> OAuth2 {
        let mut digest = Sha256::new();
        digest.update(config.token_url.as_str());
        digest.update([0]);
        digest.update(&config.client_id);
        digest.update([0]);
        if let Some(secret) = &config.client_secret {
            digest.update(secret.expose_secret());
        }
        digest.update([0]);
        match &config.grant {
            Grant::ClientCredentials => digest.update("client_credentials"),
            Grant::RefreshToken(token) => {
                digest.update("refresh_token\0");
                digest.update(token.expose_secret());
            }
            Grant::Password { username, password } => {
                digest.update("password\0");
                digest.update(username);
                digest.update([0]);
                digest.update(password.expose_secret());
            }
        }
        let key = format!("oauth2:{}", hex::encode(digest.finalize()));
        OAuth2 { config, store, key, current: tokio::sync::Mutex::new(None) }
    }

    /// The same client, keeping its tokens in `store` (the daemon's state store).
    pub fn with_store(self, store: Arc<dyn TokenStore>) -> OAuth2 {
        OAuth2 { store, current: tokio::sync::Mutex::new(None), ..self }
    }

    /// The `Authorization` value to send: the cached or stored token while
    /// fresh, otherwise a new one.
    pub async fn bearer(&self, http: &HttpClient) -> Result<HeaderValue, OAuthError> {
        let mut current = self.current.lock().await;
        // Another source or process on this credential may have renewed it
        // (and rotated its refresh token): the store has the newest.
        if !current.as_ref().is_some_and(StoredToken::is_fresh) {
            self.reload(&mut current).await;
        }
        let target = crate::http::safe_target(&self.config.token_url);
        if let Some(token) = current.as_ref().filter(|token| token.is_fresh()) {
            return bearer_header(token, &target);
        }
        let token = self.obtain(http, current.as_ref()).await?;
        let header = bearer_header(&token, &target)?;
        *current = Some(token);
        Ok(header)
    }

    /// The token `rejected` was refused: a new one, unless another request
    /// already replaced it.
    pub async fn renew(&self, http: &HttpClient, rejected: &HeaderValue) -> Result<HeaderValue, OAuthError> {
        let mut current = self.current.lock().await;
        self.reload(&mut current).await;
        let target = crate::http::safe_target(&self.config.token_url);
        if let Some(token) = current.as_ref() {
            let header = bearer_header(token, &target)?;
            if header != rejected {
                return Ok(header);
            }
        }
        let token = self.obtain(http, current.as_ref()).await?;
        let header = bearer_header(&token, &target)?;
        *current = Some(token);
        Ok(header)
    }

    /// Takes the stored token, when there is one, over the one in memory.
    async fn reload(&self, current: &mut Option<StoredToken>) {
        match self.store.load_token(&self.key).await {
            Ok(Some(stored)) => *current = Some(stored),
            Ok(None) => {}
            Err(error) => tracing::warn!(error = %error, "cannot read a stored token; using the one in memory"),
        }
    }

    /// Sends the request `build` makes with the bearer token; on a 401 the
    /// token is renewed once and the request sent once more. The final
    /// answer is returned whatever its status.
    pub async fn send(
        &self,
        http: &HttpClient,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<HttpResponse, OAuthError> {
        let bearer = self.bearer(http).await?;
        let response = http.send(build().header(AUTHORIZATION, bearer.clone())).await?;
        if response.status != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        tracing::info!(target = %response.target, "the access token was refused; renewing it once");
        let bearer = self.renew(http, &bearer).await?;
        Ok(http.send(build().header(AUTHORIZATION, bearer)).await?)
    }

    /// A new token: by the refresh token when there is one, else by the
    /// configured grant; persisted before it is used.
    async fn obtain(&self, http: &HttpClient, previous: Option<&StoredToken>) -> Result<StoredToken, OAuthError> {
        let stored_refresh = previous.and_then(|token| token.refresh_token.clone());
        let refresh = match (&stored_refresh, &self.config.grant) {
            (Some(token), _) => Some(token.clone()),
            (None, Grant::RefreshToken(token)) => Some(token.clone()),
            (None, _) => None,
        };
        let token = match self.request(http, refresh.as_ref()).await {
            // A stored refresh token may have been revoked; the configured grant may still work.
            Err(OAuthError::Refused { .. }) if stored_refresh.is_some() && !self.grant_is_refresh(&stored_refresh) => {
                tracing::info!("the stored refresh token was refused; using the configured grant");
                self.request(http, None).await?
            }
            outcome => outcome?,
        };
        // A grant that rotates nothing keeps the refresh token it had.
        let token = StoredToken { refresh_token: token.refresh_token.or(refresh), ..token };
        if let Err(error) = self.store.save_token(&self.key, &token).await {
            tracing::warn!(error = %error, "cannot persist the new token; a restart will ask again");
        }
        Ok(token)
    }

    /// Whether the configured grant is the refresh token `stored` (nothing else to fall back on).
    fn grant_is_refresh(&self, stored: &Option<SecretString>) -> bool {
        match (&self.config.grant, stored) {
            (Grant::RefreshToken(configured), Some(stored)) => configured.expose_secret() == stored.expose_secret(),
            (Grant::RefreshToken(_), None) => true,
            _ => false,
        }
    }

    /// One token request: `refresh` when given, else the configured grant.
    async fn request(&self, http: &HttpClient, refresh: Option<&SecretString>) -> Result<StoredToken, OAuthError> {
        let mut form: Vec<(&str, &str)> = Vec::new();
        match (refresh, &self.config.grant) {
            (Some(token), _) => {
                form.extend([("grant_type", "refresh_token"), ("refresh_token", token.expose_secret())])
            }
            (None, Grant::ClientCredentials) => form.push(("grant_type", "client_credentials")),
            (None, Grant::RefreshToken(token)) => {
                form.extend([("grant_type", "refresh_token"), ("refresh_token", token.expose_secret())])
            }
            (None, Grant::Password { username, password }) => form.extend([
                ("grant_type", "password"),
                ("username", username.as_str()),
                ("password", password.expose_secret()),
            ]),
        }
        if let Some(scope) = &self.config.scope {
            form.push(("scope", scope));
        }
        let mut request = http.post(self.config.token_url.clone());
        match self.config.client_auth {
            ClientAuth::Basic => {
                request = request.basic_auth(
                    &self.config.client_id,
                    self.config.client_secret.as_ref().map(|secret| secret.expose_secret()),
                );
            }
            ClientAuth::Body => {
                form.push(("client_id", &self.config.client_id));
                if let Some(secret) = &self.config.client_secret {
                    form.push(("client_secret", secret.expose_secret()));
                }
            }
        }
        let response = http.send(request.form(&form)).await?;
        parse_token_response(&response)
    }
}

/// Reads a token endpoint's answer (RFC 6749 5.1 and 5.2); never quotes a token.
fn parse_token_response(response: &HttpResponse) -> Result<StoredToken, OAuthError> {
    let target = response.target.clone();
    let body: Option<Value> = serde_json::from_slice(&response.body).ok();
    let field = |name: &str| body.as_ref().and_then(|b| b.get(name)).and_then(Value::as_str).map(str::to_owned);
    // Some endpoints (Reddit's) answer a refused grant with 200 and an `error`.
    if let Some(error) = field("error") {
        let reason = match field("error_description") {
            Some(description) => format!("{error}: {}", description.chars().take(200).collect::<String>()),
            None => error,
        };
        return Err(OAuthError::Refused { target, reason });
    }
    if !response.status.is_success() {
        return Err(if response.status.is_client_error() {
            OAuthError::Refused { target, reason: format!("HTTP {}", response.status.as_u16()) }
        } else {
            HttpError::Status { target, status: response.status.as_u16(), attempts: 1, body: String::new() }.into()
        });
    }
    let decode = |reason: &str| OAuthError::Decode { target: target.clone(), reason: reason.to_owned() };
    let body = body.as_ref().ok_or_else(|| decode("not JSON"))?;
    let access_token =
        field("access_token").filter(|token| !token.is_empty()).ok_or_else(|| decode("no `access_token`"))?;
    let token_type = field("token_type").unwrap_or_else(|| "bearer".to_owned());
    if !token_type.eq_ignore_ascii_case("bearer") {
        return Err(decode(&format!("a token of type `{}`", token_type.chars().take(40).collect::<String>())));
    }
    // A number by the RFC; some vendors send a string.
    let expires_in = match body.get("expires_in") {
        Some(Value::Number(number)) => number.as_f64(),
        Some(Value::String(text)) => text.trim().parse::<f64>().ok(),
        _ => None,
    };
    let expires_at = expires_in
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
        .map(|seconds| Utc::now() + chrono::Duration::milliseconds((seconds.min(366.0 * 86_400.0) * 1000.0) as i64));
    Ok(StoredToken {
        access_token: SecretString::from(access_token),
        refresh_token: field("refresh_token").filter(|token| !token.is_empty()).map(SecretString::from),
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{body_string_contains, header, method, path},
    };

    use super::*;
    use crate::http::HttpOptions;

    fn client() -> HttpClient {
        HttpClient::new(HttpOptions { max_retries: 0, ..HttpOptions::default() }).unwrap()
    }

    fn oauth(server: &MockServer, grant: Grant, store: Arc<dyn TokenStore>) -> OAuth2 {
        OAuth2::new(
            OAuth2Config {
                token_url: Url::parse(&format!("{}/token", server.uri())).unwrap(),
                client_id: "client-1".into(),
                client_secret: Some(SecretString::from("s3cret-client")),
                client_auth: ClientAuth::Basic,
                grant,
                scope: None,
            },
            store,
        )
    }

    /// A token endpoint that hands out `access-N` (and `refresh-N` when
    /// `rotate`) valid for `expires_in` seconds.
    async fn token_endpoint(server: &MockServer, expires_in: u64, rotate: bool) -> Arc<AtomicU32> {
        let issued = Arc::new(AtomicU32::new(0));
        let counter = issued.clone();
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(header("authorization", "Basic Y2xpZW50LTE6czNjcmV0LWNsaWVudA=="))
            .respond_with(move |_: &wiremock::Request| {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let mut body = serde_json::json!({
                    "access_token": format!("access-{n}"), "token_type": "bearer", "expires_in": expires_in,
                });
                if rotate {
                    body["refresh_token"] = format!("refresh-{n}").into();
                }
                ResponseTemplate::new(200).set_body_json(body)
            })
            .mount(server)
            .await;
        issued
    }

    fn token_of(header: &HeaderValue) -> String {
        header.to_str().unwrap().trim_start_matches("Bearer ").to_owned()
    }

    #[tokio::test]
    async fn a_stored_token_is_used_until_it_nearly_expires() {
        let server = MockServer::start().await;
        let issued = token_endpoint(&server, 3600, false).await;
        let store: Arc<dyn TokenStore> = Arc::new(MemoryTokenStore::default());
        let http = client();
        let first = oauth(&server, Grant::ClientCredentials, store.clone());
        assert_eq!(token_of(&first.bearer(&http).await.unwrap()), "access-1");
        assert_eq!(token_of(&first.bearer(&http).await.unwrap()), "access-1", "cached");
        // A new process with the same store: no new grant.
        let second = oauth(&server, Grant::ClientCredentials, store.clone());
        assert_eq!(token_of(&second.bearer(&http).await.unwrap()), "access-1");
        assert_eq!(issued.load(Ordering::SeqCst), 1);
        // A token about to expire is replaced.
        let key = second.key.clone();
        let mut stale = store.load_token(&key).await.unwrap().unwrap();
        stale.expires_at = Some(Utc::now() + chrono::Duration::seconds(30));
        store.save_token(&key, &stale).await.unwrap();
        let third = oauth(&server, Grant::ClientCredentials, store.clone());
        assert_eq!(token_of(&third.bearer(&http).await.unwrap()), "access-2");
        assert_eq!(issued.load(Ordering::SeqCst), 2);
        // Another client secret is another key: its own grant.
        let other = OAuth2::new(
            OAuth2Config { client_secret: Some(SecretString::from("rotated")), ..third.config },
            store.clone(),
        );
        assert_ne!(other.key, key);
    }

    #[tokio::test]
    async fn a_rotated_refresh_token_is_kept_and_used_next() {
        let server = MockServer::start().await;
        let issued = token_endpoint(&server, 3600, true).await;
        let store: Arc<dyn TokenStore> = Arc::new(MemoryTokenStore::default());
        let http = client();
        let oauth = oauth(&server, Grant::RefreshToken(SecretString::from("refresh-0")), store.clone());
        let first = oauth.bearer(&http).await.unwrap();
        assert_eq!(token_of(&first), "access-1");
        let renewed = oauth.renew(&http, &first).await.unwrap();
        assert_eq!(token_of(&renewed), "access-2");
        let requests = server.received_requests().await.unwrap();
        let bodies: Vec<String> = requests.iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
        assert_eq!(
            bodies,
            ["grant_type=refresh_token&refresh_token=refresh-0", "grant_type=refresh_token&refresh_token=refresh-1"]
        );
        let stored = store.load_token(&oauth.key).await.unwrap().unwrap();
        assert_eq!(stored.refresh_token.unwrap().expose_secret(), "refresh-2", "the newest refresh token is stored");
        // A stale header does not renew twice.
        assert_eq!(token_of(&oauth.renew(&http, &first).await.unwrap()), "access-2");
        assert_eq!(issued.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn two_clients_on_one_credential_follow_each_others_rotation() {
        // Strict rotation, as X does: only the newest refresh token works.
        let server = MockServer::start().await;
        let valid = Arc::new(std::sync::Mutex::new(0u32));
        let state = valid.clone();
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(move |request: &wiremock::Request| {
                let mut valid = state.lock().unwrap();
                let body = String::from_utf8_lossy(&request.body).into_owned();
                if !body.ends_with(&format!("refresh_token=refresh-{valid}")) {
                    return ResponseTemplate::new(400).set_body_json(serde_json::json!({ "error": "invalid_grant" }));
                }
                *valid += 1;
                ResponseTemplate::new(200).set_body_json(serde_json::json!({
                    "access_token": format!("access-{valid}"), "token_type": "bearer",
                    "expires_in": 7200, "refresh_token": format!("refresh-{valid}"),
                }))
            })
            .mount(&server)
            .await;
        let store: Arc<dyn TokenStore> = Arc::new(MemoryTokenStore::default());
        let http = client();
        let grant = || Grant::RefreshToken(SecretString::from("refresh-0"));
        let (first, second) = (oauth(&server, grant(), store.clone()), oauth(&server, grant(), store.clone()));
        assert_eq!(token_of(&first.bearer(&http).await.unwrap()), "access-1");
        assert_eq!(token_of(&second.bearer(&http).await.unwrap()), "access-1", "the second reads the first's token");
        // The first renews (rotating the refresh token); the second's renewal
        // then starts from the rotated one, not from what it had in memory.
        let renewed = first.renew(&http, &first.bearer(&http).await.unwrap()).await.unwrap();
        assert_eq!(token_of(&renewed), "access-2");
        let stale = HeaderValue::from_static("Bearer access-1");
        assert_eq!(token_of(&second.renew(&http, &stale).await.unwrap()), "access-2", "no needless refresh");
        assert_eq!(token_of(&second.renew(&http, &renewed).await.unwrap()), "access-3");
        assert_eq!(*valid.lock().unwrap(), 3);
    }

    #[tokio::test]
    async fn a_401_gets_one_renewal_and_one_retry() {
        let server = MockServer::start().await;
        let issued = token_endpoint(&server, 3600, false).await;
        Mock::given(method("GET"))
            .and(path("/api"))
            .and(header("authorization", "Bearer access-2"))
            .respond_with(ResponseTemplate::new(200).set_body_string("ok"))
            .mount(&server)
            .await;
        Mock::given(method("GET")).and(path("/api")).respond_with(ResponseTemplate::new(401)).mount(&server).await;
        let http = client();
        let oauth = oauth(&server, Grant::ClientCredentials, Arc::new(MemoryTokenStore::default()));
        let url = format!("{}/api", server.uri());
        let response = oauth.send(&http, || http.get(&url)).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(issued.load(Ordering::SeqCst), 2);
        // Refused again after the renewal: the 401 comes back, no loop.
        Mock::given(method("GET")).and(path("/never")).respond_with(ResponseTemplate::new(401)).mount(&server).await;
        let url = format!("{}/never", server.uri());
        let response = oauth.send(&http, || http.get(&url)).await.unwrap();
        assert_eq!(response.status, 401);
        assert_eq!(issued.load(Ordering::SeqCst), 3, "one renewal per request");
    }

    #[tokio::test]
    async fn refusals_name_the_error_and_never_a_secret() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(body_string_contains("grant_type=password"))
            .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({
                "error": "invalid_grant", "error_description": "bad password",
            })))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "access_token": "mac-token", "token_type": "mac",
            })))
            .mount(&server)
            .await;
        let http = client();
        let store: Arc<dyn TokenStore> = Arc::new(MemoryTokenStore::default());
        let password = Grant::Password { username: "bot".into(), password: SecretString::from("hunter2") };
        let error = oauth(&server, password, store.clone()).bearer(&http).await.unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, OAuthError::Refused { .. }), "{error:?}");
        assert!(message.contains("invalid_grant: bad password"), "{message}");
        let error = oauth(&server, Grant::ClientCredentials, store).bearer(&http).await.unwrap_err().to_string();
        assert!(error.contains("type `mac`"), "{error}");
        for secret in ["hunter2", "s3cret-client", "mac-token"] {
            assert!(!message.contains(secret) && !error.contains(secret), "{secret} leaked");
        }
        let debug = format!("{:?}", StoredToken { access_token: "tok".into(), refresh_token: None, expires_at: None });
        assert!(!debug.contains("tok\""), "{debug}");
    }
}
