//! Alerts to the team: rules in `[alerts.NAME]` matched against delivered
//! contributions, posted to Slack, Microsoft Teams, Mattermost or a generic
//! webhook; at most once per rule and contribution, rate limited.
//!
//! ```toml
//! [alerts.unhappy_customers]
//! destination = "slack"            # slack | teams | mattermost | webhook
//! url = { env = "SLACK_WEBHOOK_URL" }
//! intent = ["complaint"]
//! sentiment_below = -0.3
//! platforms = ["discourse", "zendesk"]
//! contact = { lifecyclestage = ["customer", "opportunity"] }
//! max_per_hour = 30
//! ```
//!
//! # Flow
//!
//! After a delivery batch, [`Alerts::consider`] matches every delivered
//! contribution against every enabled rule and queues a rendered message in
//! the state store, once per rule and contribution key, ever: the store
//! refuses a second alert for the same pair, also after a restart.
//! [`Alerts::send_due`] posts what is due, each rule within its own token
//! bucket (`max_per_hour`, bursts of a sixth of it); an alert over the limit
//! stays queued. 2xx is sent; 429, 5xx and network errors are retried with
//! exponential backoff (never sooner than the destination's `Retry-After`)
//! and given up after [`MAX_ATTEMPTS`]; any other answer fails the alert
//! with the destination's own message.
//!
//! # Messages
//!
//! Every message names the rule, the platform (and source), intent and
//! sentiment, the author, the title, an excerpt of the body (at most
//! [`EXCERPT_CHARS`] characters) and links to the post and to the CRM
//! contact (the `contact_url` template with `{contact_id}` replaced; without
//! a template the contact id is shown).
//!
//! - `slack`: an incoming webhook, `{"text": fallback, "blocks": [...]}` in
//!   mrkdwn. `&`, `<` and `>` of user text are escaped, so a post can neither
//!   link nor mention (`<!channel>`, `<@U123>`).
//! - `mattermost`: an incoming webhook, `{"text": markdown}`. Markdown
//!   punctuation of user text is backslash-escaped, so a post cannot link.
//! - `teams`: a Workflows (Power Automate) webhook, an Adaptive Card 1.4
//!   with the facts and `Action.OpenUrl` buttons for the post and the contact.
//!   Markdown links in user text are broken up.
//! - `webhook`: `POST` of the JSON below with `Content-Type: application/json`:
//!
//! ```json
//! {"rule": "unhappy_customers",
//!  "contribution": {"key": "discourse:community:42", "platform": "discourse", "source": "community",
//!                   "url": "https://...", "kind": "post", "title": "...", "excerpt": "...",
//!                   "author": {"handle": "mayac", "display_name": "Maya", "profile_url": null},
//!                   "created_at": "2024-05-01T12:00:00Z", "intent": "complaint", "sentiment": -0.62},
//!  "contact": {"id": "12345", "url": "https://app.hubspot.com/contacts/1/record/0-1/12345"}}
//! ```
//!
//! With a `secret`, requests to `webhook` carry `Tributary-Signature:
//! t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, as the webhook
//! CRM sink signs its own (`tributary_sdk::signature`).
//!
//! In Slack and Mattermost `@` followed by a name in user text gets a zero
//! width space after it, so a post cannot notify `@channel`, `@here`, `@all`
//! or anyone else.
//!
//! # Secrets
//!
//! The URLs of incoming webhooks embed their token: they are secrets
//! ([`SecretRef`]), are not stored with the queued alert (the rule name maps
//! to the URL when sending), and never appear in logs, errors, stored errors
//! or `Debug` output; messages name the rule and the destination's host.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use rand::Rng;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tributary_sdk::{
    Contribution, Crm, CrmError, HttpClient, HttpError, HttpOptions, Intent, SecretRef,
    signature::{SIGNATURE_HEADER, Signer},
    text,
};
use url::Url;

use crate::state::{AlertOutcome, PendingAlert, StateError, StateStore};

/// Alerts per hour of a rule that does not say.
pub const DEFAULT_MAX_PER_HOUR: u32 = 30;
/// Attempts at sending one alert before it is given up.
pub const MAX_ATTEMPTS: u32 = 8;
/// The longest excerpt of a contribution's body in an alert, in characters.
pub const EXCERPT_CHARS: usize = 300;
/// The state-store lease only one replica's sender holds.
pub const LEASE: &str = "alerts";

const LEASE_TTL: Duration = Duration::from_secs(120);
/// Due alerts read per pass.
const BATCH: usize = 500;
/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`].
const BACKOFF_BASE: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The placeholder of the contact link template.
const CONTACT_ID: &str = "{contact_id}";
const TITLE_CHARS: usize = 150;
const NAME_CHARS: usize = 100;
/// Where a destination's answer is quoted in an error, its first characters.
const ANSWER_CHARS: usize = 300;
const ZERO_WIDTH_SPACE: char = '\u{200B}';
/// The longest URL linked in a Slack message: two fit in one block's text.
const SLACK_URL_CHARS: usize = 1200;

/// Where a rule's alerts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Destination {
    /// A Slack incoming webhook (blocks in mrkdwn).
    Slack,
    /// A Microsoft Teams Workflows webhook (an Adaptive Card).
    Teams,
    /// A Mattermost incoming webhook (Markdown text).
    Mattermost,
    /// Any URL, sent the alert as plain JSON.
    Webhook,
}

impl Destination {
    pub fn as_str(self) -> &'static str {
        match self {
            Destination::Slack => "slack",
            Destination::Teams => "teams",
            Destination::Mattermost => "mattermost",
            Destination::Webhook => "webhook",
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[alerts.NAME]` table. Every condition must hold for a contribution
/// to alert; a list condition holds when any of its values does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRuleConfig {
    /// `slack`, `teams`, `mattermost` or `webhook`.
    pub destination: Destination,
    /// The webhook URL, a secret (it embeds the token): `{ env = "NAME" }`
    /// or `{ file = "/path" }`. https, or http to a receiver on this host.
    pub url: SecretRef,
    /// Intents that alert (`question`, `complaint`, `idea`, `praise`,
    /// `other`); empty or absent: any intent.
    #[serde(default)]
    pub intent: Vec<Intent>,
    /// Alerts only when the sentiment (-1..1) is below this. A contribution
    /// whose sentiment was not scored never matches a sentiment condition.
    #[serde(default)]
    pub sentiment_below: Option<f64>,
    /// Alerts only when the sentiment (-1..1) is above this.
    #[serde(default)]
    pub sentiment_above: Option<f64>,
    /// Platforms that alert (e.g. `discourse`); empty or absent: any.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Source instances (their names in `[sources.NAME]`) that alert; empty
    /// or absent: any.
    #[serde(default)]
    pub sources: Vec<String>,
    /// CRM contact property -> the values that alert (compared without
    /// regard to case), e.g. `{ lifecyclestage = ["customer"] }`. Every
    /// property listed must match; a contact without it does not.
    #[serde(default)]
    pub contact: BTreeMap<String, Vec<String>>,
    /// The most alerts this rule sends per hour, in bursts of at most a
    /// sixth of it; alerts over it wait their turn.
    #[serde(default = "default_max_per_hour")]
    pub max_per_hour: u32,
    /// A disabled rule is not built: nothing is matched or sent for it, and
    /// alerts it queued before are given up when their turn comes.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// `webhook` only: the key (16 bytes at least) that signs requests with
    /// HMAC-SHA256 in the `Tributary-Signature` header.
    #[serde(default)]
    pub secret: Option<SecretRef>,
}

fn default_max_per_hour() -> u32 {
    DEFAULT_MAX_PER_HOUR
}

fn default_enabled() -> bool {
    true
}

/// Why alerts cannot be built or run. Never shows a webhook URL.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alert rule `{rule}`: `{key}`: {message}")]
    Config { rule: String, key: &'static str, message: String },
    #[error("alerts `contact_url`: {0}")]
    ContactUrl(String),
    #[error("alert rule `{rule}`: cannot build its HTTP client: {message}")]
    Http { rule: String, message: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What one [`Alerts::send_due`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStats {
    pub sent: usize,
    /// Failed for now, queued again for later.
    pub retried: usize,
    /// Given up: refused by the destination, too many attempts, or a rule
    /// no longer configured.
    pub failed: usize,
    /// Over the rule's rate limit (or the destination asked us to wait):
    /// left queued, untouched.
    pub deferred: usize,
}

/// A webhook URL: `Debug` never shows it.
struct SecretUrl(Url);

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A token bucket: `capacity` tokens at most, refilled evenly.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    tokens: f64,
    per_second: f64,
    at: Instant,
}

impl Bucket {
    fn per_hour(max_per_hour: u32) -> Bucket {
        let capacity = f64::from((max_per_hour / 6).max(1));
        Bucket { capacity, tokens: capacity, per_second: f64::from(max_per_hour) / 3600.0, at: Instant::now() }
    }

    fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One enabled rule, built.
struct Rule {
    name: String,
    destination: Destination,
    url: SecretUrl,
    /// host[:port] of the URL: all an error may say about it.
    host: String,
    intents: Vec<Intent>,
    sentiment_below: Option<f64>,
    sentiment_above: Option<f64>,
    platforms: Vec<String>,
    sources: Vec<String>,
    /// Property -> allowed values, trimmed and lowercased.
    contact: BTreeMap<String, Vec<String>>,
    http: HttpClient,
    /// Signs `webhook` requests when the rule has a `secret`.
    signer: Option<Signer>,
    bucket: Mutex<Bucket>,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("destination", &self.destination)
            .field("host", &self.host)
            .field("url", &self.url)
            .field("intents", &self.intents)
            .field("sentiment_below", &self.sentiment_below)
            .field("sentiment_above", &self.sentiment_above)
            .field("platforms", &self.platforms)
            .field("sources", &self.sources)
            .field("contact", &self.contact)
            .finish_non_exhaustive()
    }
}

impl Rule {
    fn build(name: &str, config: &AlertRuleConfig) -> Result<Rule, AlertError> {
        let invalid = |key: &'static str, message: String| AlertError::Config { rule: name.to_owned(), key, message };
        let signer = match (&config.secret, config.destination) {
            (None, _) => None,
            (Some(secret), Destination::Webhook) => {
                let secret = secret.resolve().map_err(|error| invalid("secret", error.to_string()))?;
                Some(Signer::new(&secret).map_err(|error| invalid("secret", error.to_string()))?)
            }
            (Some(_), other) => {
                return Err(invalid(
                    "secret",
                    format!("only `destination = \"webhook\"` signs its requests, not `{other}`"),
                ));
            }
        };
        if config.max_per_hour == 0 {
            return Err(invalid("max_per_hour", "must be at least 1 (set `enabled = false` to mute a rule)".into()));
        }
        for (key, bound) in [("sentiment_below", config.sentiment_below), ("sentiment_above", config.sentiment_above)] {
            if let Some(bound) = bound
                && !(-1.0..=1.0).contains(&bound)
            {
                return Err(invalid(key, format!("must be between -1 and 1, not {bound}")));
            }
        }
        if let (Some(below), Some(above)) = (config.sentiment_below, config.sentiment_above)
            && below <= above
        {
            return Err(invalid(
                "sentiment_below",
                format!("{below} is not above `sentiment_above` ({above}): the rule could never match"),
            ));
        }
        let mut contact = BTreeMap::new();
        for (property, values) in &config.contact {
            if property.trim().is_empty() {
                return Err(invalid("contact", "a property name is empty".into()));
            }
            let values: Vec<String> = values.iter().map(|value| value.trim().to_lowercase()).collect();
            if values.is_empty() {
                return Err(invalid("contact", format!("`{property}` lists no value: the rule could never match")));
            }
            contact.insert(property.trim().to_owned(), values);
        }

        let url = config.url.resolve().map_err(|error| invalid("url", error.to_string()))?;
        // Neither the URL nor the parser's words about it (which may quote it) are shown.
        let url =
            Url::parse(url.expose_secret().trim()).map_err(|_| invalid("url", "is not a valid absolute URL".into()))?;
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(invalid("url", "names no host".into())),
        };
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => {
                return Err(invalid("url", format!("must be https (http only to this host), not http to {host}")));
            }
            scheme => return Err(invalid("url", format!("must be an https URL, not `{scheme}:`"))),
        }
        let http = HttpClient::new(HttpOptions {
            timeout: Duration::from_secs(15),
            // One request per attempt: the queue retries, with its own backoff.
            max_retries: 0,
            // A destination asking us to wait hands the wait back at once.
            max_inline_wait: Duration::ZERO,
            max_body_bytes: 1024 * 1024,
            ..HttpOptions::default()
        })
        .map_err(|error| AlertError::Http { rule: name.to_owned(), message: error.to_string() })?;

        Ok(Rule {
            name: name.to_owned(),
            destination: config.destination,
            url: SecretUrl(url),
            host,
            intents: config.intent.clone(),
            sentiment_below: config.sentiment_below,
            sentiment_above: config.sentiment_above,
            platforms: config.platforms.iter().map(|platform| platform.trim().to_owned()).collect(),
            sources: config.sources.iter().map(|source| source.trim().to_owned()).collect(),
            contact,
            http,
            signer,
            bucket: Mutex::new(Bucket::per_hour(config.max_per_hour)),
        })
    }

    /// Every condition but the contact's.
    fn matches(&self, contribution: &Contribution) -> bool {
        if contribution.deleted {
            return false;
        }
        if !self.platforms.is_empty()
            && !self.platforms.iter().any(|platform| platform.eq_ignore_ascii_case(&contribution.platform))
        {
            return false;
        }
        if !self.sources.is_empty() && !self.sources.contains(&contribution.source) {
            return false;
        }
        if !self.intents.is_empty()
            && !contribution.signals.as_ref().is_some_and(|signals| self.intents.contains(&signals.intent))
        {
            return false;
        }
        if self.sentiment_below.is_some() || self.sentiment_above.is_some() {
            let Some(sentiment) = contribution.signals.as_ref().and_then(|signals| signals.scored_sentiment()) else {
                return false;
            };
            if self.sentiment_below.is_some_and(|below| sentiment >= below)
                || self.sentiment_above.is_some_and(|above| sentiment <= above)
            {
                return false;
            }
        }
        true
    }

    fn contact_matches(&self, properties: &BTreeMap<String, String>) -> bool {
        self.contact.iter().all(|(property, allowed)| {
            let value = properties
                .get(property)
                .or_else(|| properties.iter().find(|(name, _)| name.eq_ignore_ascii_case(property)).map(|(_, v)| v));
            value.is_some_and(|value| allowed.contains(&value.trim().to_lowercase()))
        })
    }

    fn take_token(&self) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        bucket.try_take(Instant::now())
    }

    /// `text` with every trace of the URL (whole, path, query, long
    /// segments) replaced: destinations may echo what they were sent to.
    fn scrub(&self, text: &str) -> String {
        let url = &self.url.0;
        let mut needles: Vec<String> = vec![url.as_str().to_owned()];
        if url.path().len() > 1 {
            needles.push(url.path().to_owned());
        }
        if let Some(query) = url.query().filter(|query| !query.is_empty()) {
            needles.push(query.to_owned());
        }
        needles.extend(url.path_segments().into_iter().flatten().filter(|s| s.len() >= 6).map(str::to_owned));
        needles.extend(url.query_pairs().map(|(_, value)| value.into_owned()).filter(|value| value.len() >= 6));
        tributary_sdk::secret::redact(text, needles.iter().map(String::as_str))
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// The alert rules of a daemon, their queue and their sender.
pub struct Alerts {
    /// Enabled rules, in name order.
    rules: Vec<Rule>,
    /// The link template of a CRM contact, with `{contact_id}`.
    contact_url: Option<String>,
    /// Every property any rule asks about: one read per contact serves all.
    property_names: Vec<String>,
    store: Arc<dyn StateStore>,
    crm: Arc<dyn Crm>,
    backoff_base: Duration,
    /// The CRM cannot read properties: said once at warn level.
    told_unsupported: AtomicBool,
}

impl fmt::Debug for Alerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alerts")
            .field("rules", &self.rules)
            .field("contact_url", &self.contact_url)
            .field("crm", &self.crm.kind())
            .finish_non_exhaustive()
    }
}

/// Builds the enabled rules and the contact link offline, for `check`.
pub fn validate(rules: &BTreeMap<String, AlertRuleConfig>, contact_url: Option<&str>) -> Result<(), AlertError> {
    if let Some(template) = contact_url.map(str::trim).filter(|t| !t.is_empty()) {
        check_contact_url(template.to_owned())?;
    }
    for (name, config) in rules.iter().filter(|(_, config)| config.enabled) {
        Rule::build(name, config)?;
    }
    Ok(())
}

impl Alerts {
    /// Builds the enabled rules; resolves secrets. Errors name the rule and key, never a secret.
    pub fn new(
        rules: &BTreeMap<String, AlertRuleConfig>,
        contact_url: Option<String>,
        store: Arc<dyn StateStore>,
        crm: Arc<dyn Crm>,
    ) -> Result<Alerts, AlertError> {
        let contact_url = match contact_url.map(|template| template.trim().to_owned()) {
            Some(template) if !template.is_empty() => Some(check_contact_url(template)?),
            _ => None,
        };
        let rules = rules
            .iter()
            .filter(|(_, config)| config.enabled)
            .map(|(name, config)| Rule::build(name, config))
            .collect::<Result<Vec<_>, _>>()?;
        let mut property_names: Vec<String> = rules.iter().flat_map(|rule| rule.contact.keys().cloned()).collect();
        property_names.sort();
        property_names.dedup();
        Ok(Alerts {
            rules,
            contact_url,
            property_names,
            store,
            crm,
            backoff_base: BACKOFF_BASE,
            told_unsupported: AtomicBool::new(false),
        })
    }

    /// No rule is enabled.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// After a delivery batch: queues an alert for every (rule, delivered contribution) that matches.
    /// `delivered` = the contribution and the CRM contact id it landed on. Contact properties are fetched
    /// at most once per contact per call, and only for rules that need them and otherwise match.
    /// A CRM failure reading properties is logged and those rules skip that contribution (no panic, no error
    /// for the whole batch). Returns how many were queued.
    pub async fn consider(&self, delivered: &[(Contribution, String)]) -> Result<usize, AlertError> {
        if self.rules.is_empty() || delivered.is_empty() {
            return Ok(0);
        }
        self.consider_batch(delivered).instrument(tracing::info_span!("alerts")).await
    }

    async fn consider_batch(&self, delivered: &[(Contribution, String)]) -> Result<usize, AlertError> {
        // Contact id -> its properties; `None` when the CRM could not say.
        let mut properties: HashMap<&str, Option<BTreeMap<String, String>>> = HashMap::new();
        let mut queued = 0;
        for (contribution, contact_id) in delivered {
            for rule in self.rules.iter().filter(|rule| rule.matches(contribution)) {
                if !rule.contact.is_empty() {
                    if contact_id.is_empty() {
                        continue;
                    }
                    if !properties.contains_key(contact_id.as_str()) {
                        let read = self.read_properties(contact_id).await;
                        properties.insert(contact_id.as_str(), read);
                    }
                    let matched = properties
                        .get(contact_id.as_str())
                        .and_then(Option::as_ref)
                        .is_some_and(|read| rule.contact_matches(read));
                    if !matched {
                        continue;
                    }
                }
                let facts = self.facts(rule, contribution, contact_id);
                let payload = json!({
                    "destination": rule.destination,
                    "body": render(rule.destination, &facts),
                    "alert": facts,
                });
                let contact = Some(contact_id.as_str()).filter(|id| !id.is_empty());
                let key = contribution.key();
                if self.store.enqueue_alert(&rule.name, &key, contact, &payload).await? {
                    tracing::debug!(rule = %rule.name, key = %key, "alert queued");
                    queued += 1;
                }
            }
        }
        if queued > 0 {
            tracing::info!(queued, "alerts queued");
        }
        Ok(queued)
    }

    async fn read_properties(&self, contact_id: &str) -> Option<BTreeMap<String, String>> {
        match self.crm.contact_properties(contact_id, &self.property_names).await {
            Ok(properties) => Some(properties),
            Err(error @ CrmError::Unsupported(_)) => {
                if self.told_unsupported.swap(true, Ordering::Relaxed) {
                    tracing::debug!(error = %error, "contact conditions of alert rules cannot be checked");
                } else {
                    tracing::warn!(
                        error = %error,
                        "contact conditions of alert rules cannot be checked; those rules never alert"
                    );
                }
                None
            }
            Err(error) => {
                tracing::warn!(
                    contact = %contact_id, error = %error,
                    "cannot read contact properties; rules with contact conditions skip this contact's contributions"
                );
                None
            }
        }
    }

    fn facts(&self, rule: &Rule, contribution: &Contribution, contact_id: &str) -> AlertFacts {
        let signals = contribution.signals.as_ref();
        let contact_url = self
            .contact_url
            .as_ref()
            .filter(|_| !contact_id.is_empty())
            .and_then(|template| web_url(&template.replace(CONTACT_ID, &percent_encode(contact_id))));
        AlertFacts {
            rule: rule.name.clone(),
            contribution: FactsContribution {
                key: contribution.key(),
                platform: contribution.platform.clone(),
                source: contribution.source.clone(),
                url: contribution.url.as_deref().and_then(web_url),
                kind: contribution.kind.as_str().to_owned(),
                title: contribution
                    .title
                    .as_deref()
                    .map(|title| text::one_line(title, TITLE_CHARS))
                    .filter(|title| !title.is_empty()),
                excerpt: excerpt(&contribution.body),
                author: FactsAuthor {
                    handle: contribution.author.handle.as_deref().map(|handle| text::one_line(handle, NAME_CHARS)),
                    display_name: contribution
                        .author
                        .display_name
                        .as_deref()
                        .map(|name| text::one_line(name, NAME_CHARS)),
                    profile_url: contribution.author.profile_url.as_deref().and_then(web_url),
                },
                created_at: contribution.created_at,
                intent: signals.map(|signals| signals.intent.as_str().to_owned()),
                sentiment: signals.and_then(|signals| signals.scored_sentiment()),
            },
            contact: FactsContact { id: Some(contact_id.to_owned()).filter(|id| !id.is_empty()), url: contact_url },
        }
    }

    fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.name == name)
    }

    /// Sends what is due, each rule within its max_per_hour (a token bucket per rule: burst = max_per_hour/6 at least 1,
    /// refilled evenly; an alert over the limit stays queued for later, it is not dropped). 2xx → Sent; 429/5xx/network →
    /// Retry with backoff honouring Retry-After, given up after 8 attempts (Failed); other 4xx → Failed with the
    /// destination's answer (scrubbed of the URL). Returns counts.
    pub async fn send_due(&self) -> Result<SendStats, AlertError> {
        let mut stats = SendStats::default();
        // Alerts of rules no longer configured fail; each rule's own are
        // read apart, so a rule held back by its limit never holds up another.
        for alert in self.store.due_alerts(None, BATCH).await? {
            if self.rule(&alert.rule).is_none() {
                let error = format!(
                    "the alert rule `{}` is no longer configured (or is disabled); this alert is not sent",
                    alert.rule
                );
                tracing::warn!(rule = %alert.rule, key = %alert.key, "{error}");
                self.store.alert_done(alert.id, AlertOutcome::Failed { error }).await?;
                stats.failed += 1;
            }
        }
        for rule in &self.rules {
            for alert in self.store.due_alerts(Some(&rule.name), BATCH).await? {
                if rule.http.held_for().is_some() || !rule.take_token() {
                    stats.deferred += 1;
                    continue;
                }
                let outcome = match body_for(&alert.payload, rule.destination) {
                    Some(body) => self.post(rule, &alert, &body).await,
                    None => AlertOutcome::Failed { error: "the queued alert cannot be read; it is not sent".into() },
                };
                match &outcome {
                    AlertOutcome::Sent => {
                        tracing::info!(rule = %rule.name, key = %alert.key, destination = %rule.destination, "alert sent");
                        stats.sent += 1;
                    }
                    AlertOutcome::Retry { error, at } => {
                        tracing::warn!(rule = %rule.name, key = %alert.key, error = %error, retry_at = %at, "alert not sent; retrying later");
                        stats.retried += 1;
                    }
                    AlertOutcome::Failed { error } => {
                        tracing::error!(rule = %rule.name, key = %alert.key, error = %error, "alert given up");
                        stats.failed += 1;
                    }
                }
                self.store.alert_done(alert.id, outcome).await?;
            }
        }
        Ok(stats)
    }

    async fn post(&self, rule: &Rule, alert: &PendingAlert, body: &Value) -> AlertOutcome {
        let bytes = match serde_json::to_vec(body) {
            Ok(bytes) => bytes,
            Err(error) => return AlertOutcome::Failed { error: format!("cannot encode the alert: {error}") },
        };
        let mut request = rule.http.post(rule.url.0.clone()).header("content-type", "application/json");
        if let Some(signer) = &rule.signer {
            request = request.header(SIGNATURE_HEADER, signer.sign(Utc::now().timestamp(), &bytes));
        }
        let request = request.body(bytes);
        let failure =
            |what: String| format!("alert rule `{}`: {} at {}: {what}", rule.name, rule.destination, rule.host);
        match rule.http.send_once(request).await {
            Ok(response) if response.status.is_success() => AlertOutcome::Sent,
            Ok(response) => {
                let answer = cap(&rule.scrub(&response.body_snippet()), ANSWER_CHARS);
                AlertOutcome::Failed {
                    error: failure(format!("refused the alert: HTTP {}: {answer}", response.status.as_u16())),
                }
            }
            Err(error) => {
                let transient = error.is_transient();
                let retry_after = match &error {
                    HttpError::RateLimited { retry_after, .. } => Some(*retry_after),
                    _ => None,
                };
                let message = failure(describe(rule, error));
                if !transient {
                    AlertOutcome::Failed { error: message }
                } else if alert.attempts + 1 >= MAX_ATTEMPTS {
                    AlertOutcome::Failed { error: format!("gave up after {} attempts: {message}", alert.attempts + 1) }
                } else {
                    AlertOutcome::Retry { error: message, at: self.retry_at(alert.attempts, retry_after) }
                }
            }
        }
    }

    fn retry_at(&self, attempts: u32, at_least: Option<Duration>) -> DateTime<Utc> {
        let exp = self.backoff_base.saturating_mul(1u32 << attempts.min(20)).min(MAX_BACKOFF);
        let jittered = Duration::from_secs_f64(exp.as_secs_f64() * rand::rng().random_range(0.5..=1.0));
        let wait = jittered.max(at_least.unwrap_or(Duration::ZERO));
        Utc::now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1))
    }

    /// Runs until shutdown: send_due on wake or every `interval`, under the state-store lease "alerts" so only one
    /// replica sends. Logs, never returns an error.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, wake: Arc<Notify>, interval: Duration) {
        let span = tracing::info_span!("alerts");
        async move {
            let owner = format!("alerts-{}-{:08x}", std::process::id(), rand::rng().random::<u32>());
            let mut holding = false;
            loop {
                match self.store.acquire_lease(LEASE, &owner, LEASE_TTL).await {
                    Ok(true) => {
                        if !holding {
                            tracing::info!("this replica sends the alerts");
                        }
                        holding = true;
                        self.send_pass(&owner).await;
                    }
                    Ok(false) => {
                        if holding {
                            tracing::info!("another replica sends the alerts now");
                        }
                        holding = false;
                    }
                    Err(error) => tracing::warn!(error = %error, "cannot take the alerts lease; trying again later"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            if holding && let Err(error) = self.store.release_lease(LEASE, &owner).await {
                tracing::warn!(error = %error, "cannot release the alerts lease");
            }
            tracing::info!("alerts stopped");
        }
        .instrument(span)
        .await
    }

    /// One [`Alerts::send_due`], the lease renewed while it runs.
    async fn send_pass(&self, owner: &str) {
        let work = self.send_due();
        tokio::pin!(work);
        loop {
            tokio::select! {
                result = &mut work => {
                    match result {
                        Ok(stats) if stats == SendStats::default() => {}
                        Ok(stats) => tracing::info!(
                            sent = stats.sent, retried = stats.retried, failed = stats.failed, deferred = stats.deferred,
                            "alerts pass done"
                        ),
                        Err(error) => tracing::error!(error = %error, "sending alerts failed; trying again later"),
                    }
                    return;
                }
                _ = tokio::time::sleep(LEASE_TTL / 3) => {
                    match self.store.acquire_lease(LEASE, owner, LEASE_TTL).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!("the alerts lease went to another replica during a send"),
                        Err(error) => tracing::warn!(error = %error, "cannot renew the alerts lease"),
                    }
                }
            }
        }
    }
}

/// A failed request in words, naming nothing of the URL.
fn describe(rule: &Rule, error: HttpError) -> String {
    match error {
        HttpError::Timeout { .. } => "timed out".into(),
        HttpError::Connect { message, .. } => format!("cannot connect: {}", rule.scrub(&message)),
        HttpError::RateLimited { retry_after, body, .. } => {
            let body = cap(&rule.scrub(&body), ANSWER_CHARS);
            format!("rate limited; retry in {}s: {body}", retry_after.as_secs())
        }
        HttpError::Status { status, body, .. } => {
            format!("HTTP {status}: {}", cap(&rule.scrub(&body), ANSWER_CHARS))
        }
        HttpError::BodyTooLarge { limit, .. } => format!("answered more than {limit} bytes"),
        HttpError::Decode { message, .. } => format!("answered something unreadable: {}", rule.scrub(&message)),
        HttpError::Request(message) => format!("cannot build the request: {}", rule.scrub(&message)),
    }
}

/// The body to send for a queued alert: as rendered when queued, or
/// rendered again when the rule's destination changed meanwhile.
fn body_for(payload: &Value, destination: Destination) -> Option<Value> {
    if payload.get("destination").and_then(Value::as_str) == Some(destination.as_str()) {
        return payload.get("body").cloned();
    }
    let facts: AlertFacts = serde_json::from_value(payload.get("alert")?.clone()).ok()?;
    Some(render(destination, &facts))
}

/// The contact link template, checked: it has the placeholder and gives a web address.
fn check_contact_url(template: String) -> Result<String, AlertError> {
    if !template.contains(CONTACT_ID) {
        return Err(AlertError::ContactUrl(format!("`{template}` has no `{CONTACT_ID}` placeholder")));
    }
    if web_url(&template.replace(CONTACT_ID, "1")).is_none() {
        return Err(AlertError::ContactUrl(format!("`{template}` is not an http or https URL")));
    }
    Ok(template)
}

/// What every message says about an alert; also the body of `webhook`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AlertFacts {
    rule: String,
    contribution: FactsContribution,
    contact: FactsContact,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FactsContribution {
    key: String,
    platform: String,
    source: String,
    url: Option<String>,
    kind: String,
    title: Option<String>,
    excerpt: String,
    author: FactsAuthor,
    created_at: DateTime<Utc>,
    intent: Option<String>,
    sentiment: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FactsAuthor {
    handle: Option<String>,
    display_name: Option<String>,
    profile_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FactsContact {
    id: Option<String>,
    url: Option<String>,
}

impl AlertFacts {
    fn title(&self) -> String {
        let c = &self.contribution;
        c.title.clone().unwrap_or_else(|| format!("{} on {}", c.kind, c.platform))
    }

    fn author(&self) -> String {
        let author = &self.contribution.author;
        match (author.display_name.as_deref(), author.handle.as_deref()) {
            (Some(name), Some(handle)) if name != handle => format!("{name} (@{handle})"),
            (_, Some(handle)) => format!("@{handle}"),
            (Some(name), None) => name.to_owned(),
            (None, None) => "unknown author".into(),
        }
    }

    fn intent(&self) -> &str {
        self.contribution.intent.as_deref().unwrap_or("unknown")
    }

    fn sentiment(&self) -> String {
        match self.contribution.sentiment {
            Some(sentiment) => format!("{sentiment:.2}"),
            None => "not scored".into(),
        }
    }

    fn platform(&self) -> String {
        let c = &self.contribution;
        format!("{} ({})", c.platform, c.source)
    }

    fn contact(&self) -> String {
        match &self.contact.id {
            Some(id) => id.clone(),
            None => "none".into(),
        }
    }
}

fn render(destination: Destination, facts: &AlertFacts) -> Value {
    match destination {
        Destination::Slack => slack(facts),
        Destination::Teams => teams(facts),
        Destination::Mattermost => mattermost(facts),
        Destination::Webhook => serde_json::to_value(facts).unwrap_or(Value::Null),
    }
}

/// A Slack incoming webhook message: blocks, and the text notifications show.
fn slack(facts: &AlertFacts) -> Value {
    let c = &facts.contribution;
    let title = slack_escape(&facts.title());
    let headline = match c.url.as_deref() {
        Some(url) => format!("*{}*", slack_link(url, &title)),
        None => format!("*{title}*"),
    };
    let mut text = headline;
    if !c.excerpt.is_empty() {
        text.push_str("\n>");
        text.push_str(&slack_escape(&c.excerpt));
    }
    let contact = match (&facts.contact.url, &facts.contact.id) {
        (Some(url), Some(id)) => slack_link(url, &slack_escape(id)),
        _ => slack_escape(&facts.contact()),
    };
    let field = |label: &str, value: String| json!({"type": "mrkdwn", "text": format!("*{label}*\n{value}")});
    let mut links = Vec::new();
    if let Some(url) = &c.url {
        links.push(slack_link(url, "Open post"));
    }
    if let Some(url) = &facts.contact.url {
        links.push(slack_link(url, "Open contact"));
    }
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": cap(&format!("Alert: {}", facts.rule), 150)}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": text}}),
        json!({"type": "section", "fields": [
            field("Rule", slack_escape(&facts.rule)),
            field("Platform", slack_escape(&facts.platform())),
            field("Intent", slack_escape(facts.intent())),
            field("Sentiment", slack_escape(&facts.sentiment())),
            field("Author", slack_escape(&facts.author())),
            field("Contact", contact),
        ]}),
    ];
    if !links.is_empty() {
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": links.join(" · ")}]}));
    }
    let fallback =
        format!("Alert {}: {} on {} by {}: {}", facts.rule, facts.intent(), c.platform, facts.author(), facts.title());
    json!({"text": slack_escape(&fallback), "blocks": blocks})
}

/// A Mattermost incoming webhook message, in Markdown.
fn mattermost(facts: &AlertFacts) -> Value {
    let c = &facts.contribution;
    let mut lines = vec![format!(
        "**Alert: {}** · {} · sentiment {} · {}",
        markdown_escape(&facts.rule),
        markdown_escape(facts.intent()),
        markdown_escape(&facts.sentiment()),
        markdown_escape(&facts.platform()),
    )];
    let title = markdown_escape(&facts.title());
    let title = match c.url.as_deref() {
        Some(url) => format!("**[{title}]({})**", markdown_url(url)),
        None => format!("**{title}**"),
    };
    lines.push(format!("{title} by {}", markdown_escape(&facts.author())));
    if !c.excerpt.is_empty() {
        lines.push(format!("> {}", markdown_escape(&c.excerpt)));
        lines.push(String::new());
    }
    let mut links = Vec::new();
    if let Some(url) = &c.url {
        links.push(format!("[Open post]({})", markdown_url(url)));
    }
    if let Some(url) = &facts.contact.url {
        links.push(format!("[Open contact]({})", markdown_url(url)));
    }
    links.push(format!("contact {}", markdown_escape(&facts.contact())));
    lines.push(links.join(" · "));
    json!({"text": lines.join("\n")})
}

/// A Teams Workflows webhook message: one Adaptive Card.
fn teams(facts: &AlertFacts) -> Value {
    let c = &facts.contribution;
    let mut body = vec![
        json!({"type": "TextBlock", "text": teams_text(&format!("Alert: {}", facts.rule)), "size": "Medium", "weight": "Bolder", "wrap": true}),
        json!({"type": "TextBlock", "text": teams_text(&facts.title()), "weight": "Bolder", "wrap": true}),
    ];
    if !c.excerpt.is_empty() {
        body.push(json!({"type": "TextBlock", "text": teams_text(&c.excerpt), "wrap": true, "isSubtle": true}));
    }
    let fact = |title: &str, value: String| json!({"title": title, "value": teams_text(&value)});
    body.push(json!({"type": "FactSet", "facts": [
        fact("Rule", facts.rule.clone()),
        fact("Platform", facts.platform()),
        fact("Intent", facts.intent().to_owned()),
        fact("Sentiment", facts.sentiment()),
        fact("Author", facts.author()),
        fact("Contact", facts.contact()),
    ]}));
    let mut actions = Vec::new();
    if let Some(url) = &c.url {
        actions.push(json!({"type": "Action.OpenUrl", "title": "Open post", "url": url}));
    }
    if let Some(url) = &facts.contact.url {
        actions.push(json!({"type": "Action.OpenUrl", "title": "Open contact", "url": url}));
    }
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": body,
                "actions": actions,
            },
        }],
    })
}

/// `@name` with a zero width space after the `@`: no mention, same look.
fn neutralise_mentions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '@' && chars.peek().is_some_and(|next| next.is_alphanumeric()) {
            out.push(ZERO_WIDTH_SPACE);
        }
    }
    out
}

/// Slack's escaping of text: `&`, `<`, `>` (so no link, mention or command
/// can be written), and no `@channel`.
fn slack_escape(text: &str) -> String {
    neutralise_mentions(text).replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `<url|label>`; `label` must already be escaped. A URL too long for a
/// block's text limit (3000 characters) leaves the label unlinked.
fn slack_link(url: &str, label: &str) -> String {
    let url = encode_url_delimiters(url).replace('&', "&amp;");
    if url.is_empty() || url.len() > SLACK_URL_CHARS {
        return label.to_owned();
    }
    format!("<{url}|{label}>")
}

/// Markdown punctuation backslash-escaped (no link, image, HTML or
/// formatting can be written), and no `@channel`.
fn markdown_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in neutralise_mentions(text).chars() {
        if matches!(c, '\\' | '`' | '*' | '_' | '~' | '[' | ']' | '(' | ')' | '<' | '>' | '#' | '|' | '!') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn markdown_url(url: &str) -> String {
    encode_url_delimiters(url)
}

/// Text for an Adaptive Card TextBlock (a Markdown subset without escapes):
/// a link `[label](url)` is broken up with a zero width space.
fn teams_text(text: &str) -> String {
    text.replace("](", &format!("]{ZERO_WIDTH_SPACE}("))
}

/// Percent-encodes, after the host, what would end a link in Slack or Markdown.
fn encode_url_delimiters(url: &str) -> String {
    let Ok(parsed) = Url::parse(url) else {
        return String::new();
    };
    let (head, tail) = (&parsed[..url::Position::BeforePath], &parsed[url::Position::BeforePath..]);
    let mut out = String::with_capacity(url.len() + 8);
    out.push_str(head);
    for c in tail.chars() {
        match c {
            '(' => out.push_str("%28"),
            ')' => out.push_str("%29"),
            '|' => out.push_str("%7C"),
            '<' => out.push_str("%3C"),
            '>' => out.push_str("%3E"),
            '[' => out.push_str("%5B"),
            ']' => out.push_str("%5D"),
            ' ' => out.push_str("%20"),
            c => out.push(c),
        }
    }
    out
}

/// `text` as an http or https URL, normalised; anything else (a
/// `javascript:` link a platform let through) is no link at all.
fn web_url(text: &str) -> Option<String> {
    let url = Url::parse(text.trim()).ok()?;
    matches!(url.scheme(), "http" | "https").then(|| url.to_string())
}

/// Everything but unreserved characters percent-encoded (a contact id in a URL).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// At most `max` characters: cut ones end with `…`.
fn cap(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.truncate(out.trim_end().len());
    out.push('…');
    out
}

/// The start of a body on one line, at most [`EXCERPT_CHARS`] whole characters.
fn excerpt(body: &str) -> String {
    text::one_line(body, EXCERPT_CHARS)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use async_trait::async_trait;
    use tributary_sdk::{
        ActivityUpsert, Author, ContactLookup, ContactUpsert, RecordOutcome, Rollup, SetupReport, Signals,
    };
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path},
    };

    use super::*;
    use crate::state::SqliteStore;

    /// The secret part of every test webhook URL.
    const TOKEN: &str = "XyZsecretT0ken";
    const HOOK_PATH: &str = "/hooks/T000/B000/XyZsecretT0ken";
    const CONTACT_URL: &str = "https://crm.example.com/contacts/{contact_id}";

    /// A CRM that knows the properties of a few contacts and counts reads.
    #[derive(Default)]
    struct TestCrm {
        properties: BTreeMap<String, BTreeMap<String, String>>,
        reads: Mutex<Vec<(String, Vec<String>)>>,
        down: bool,
    }

    impl TestCrm {
        fn with_contacts() -> TestCrm {
            let contact = |stage: &str, company: &str| {
                BTreeMap::from([
                    ("lifecyclestage".to_owned(), stage.to_owned()),
                    ("company".to_owned(), company.to_owned()),
                ])
            };
            TestCrm {
                properties: BTreeMap::from([
                    ("c1".to_owned(), contact("Customer", "Acme")),
                    ("c2".to_owned(), contact("lead", "Globex")),
                ]),
                ..TestCrm::default()
            }
        }

        fn reads(&self) -> Vec<(String, Vec<String>)> {
            self.reads.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl Crm for TestCrm {
        fn kind(&self) -> &'static str {
            "test"
        }
        async fn check(&self) -> Result<(), CrmError> {
            Ok(())
        }
        async fn setup(&self, _: &[String]) -> Result<SetupReport, CrmError> {
            Ok(SetupReport::default())
        }
        async fn find_contact(&self, _: &ContactLookup) -> Result<Option<String>, CrmError> {
            Ok(None)
        }
        async fn upsert_contacts(&self, _: &[ContactUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
            Ok(vec![])
        }
        async fn upsert_activities(&self, _: &[ActivityUpsert]) -> Result<Vec<RecordOutcome<String>>, CrmError> {
            Ok(vec![])
        }
        async fn archive_activities(&self, _: &[String]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
            Ok(vec![])
        }
        async fn update_rollups(&self, _: &[Rollup]) -> Result<Vec<RecordOutcome<()>>, CrmError> {
            Ok(vec![])
        }
        async fn contact_properties(
            &self,
            contact_id: &str,
            names: &[String],
        ) -> Result<BTreeMap<String, String>, CrmError> {
            self.reads.lock().unwrap().push((contact_id.to_owned(), names.to_vec()));
            if self.down {
                return Err(CrmError::Transient("the CRM is down".into()));
            }
            let known = self.properties.get(contact_id).cloned().unwrap_or_default();
            Ok(known.into_iter().filter(|(name, _)| names.contains(name)).collect())
        }
    }

    #[derive(Debug, Deserialize)]
    struct Tables {
        alerts: BTreeMap<String, AlertRuleConfig>,
    }

    /// Rules from TOML, where `$URL` stands for a secret file holding `url`.
    fn rules(dir: &Path, url: &str, toml_text: &str) -> BTreeMap<String, AlertRuleConfig> {
        let file = dir.join("hook-url");
        std::fs::write(&file, format!("{url}\n")).unwrap();
        let toml_text = toml_text.replace("$URL", &format!("{{ file = {:?} }}", file.display().to_string()));
        toml::from_str::<Tables>(&toml_text).unwrap().alerts
    }

    /// Alerts over the store in `dir`, retrying at once.
    fn open(dir: &Path, rules: &BTreeMap<String, AlertRuleConfig>, crm: Arc<dyn Crm>) -> Alerts {
        let store = Arc::new(SqliteStore::open(&dir.join("state.db")).unwrap());
        let mut alerts = Alerts::new(rules, Some(CONTACT_URL.into()), store, crm).unwrap();
        alerts.backoff_base = Duration::ZERO;
        alerts
    }

    /// (rule, status, attempts, last error) of every alert in the store.
    fn stored(dir: &Path) -> Vec<(String, String, u32, Option<String>)> {
        let conn = rusqlite::Connection::open(dir.join("state.db")).unwrap();
        let mut query = conn.prepare("SELECT rule, status, attempts, last_error FROM alerts ORDER BY id").unwrap();
        query
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A receiver answering `status` with `body` at [`HOOK_PATH`].
    async fn hook(status: u16, body: &str) -> MockServer {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(HOOK_PATH))
            .respond_with(ResponseTemplate::new(status).set_body_string(body))
            .mount(&server)
            .await;
        server
    }

    fn hook_url(server: &MockServer) -> String {
        format!("{}{HOOK_PATH}", server.uri())
    }

    fn complaint() -> Contribution {
        Contribution {
            author: Author {
                id: "7".into(),
                handle: Some("mayac".into()),
                display_name: Some("Maya C".into()),
                email: Some("maya@example.com".into()),
                profile_url: Some("https://community.example.com/u/mayac".into()),
                links: Vec::new(),
            },
            title: Some("Export is broken".into()),
            body: "It fails every time.\nPlease fix.".into(),
            signals: Some(Signals { sentiment: -0.62, intent: Intent::Complaint, sentiment_skipped: None }),
            ..Contribution::sample()
        }
    }

    fn numbered(contribution: &Contribution, id: usize) -> Contribution {
        Contribution { external_id: format!("{id}"), ..contribution.clone() }
    }

    /// Whether one contribution of contact `contact` alerts under a Slack
    /// rule with `conditions` (TOML lines).
    async fn check(conditions: &str, contribution: Contribution, contact: &str, expected: bool) {
        let dir = tempfile::tempdir().unwrap();
        let toml_text = format!("[alerts.rule]\ndestination = \"slack\"\nurl = $URL\n{conditions}");
        let rules = rules(dir.path(), "https://hooks.example.com/services/T/B/x", &toml_text);
        let alerts = open(dir.path(), &rules, Arc::new(TestCrm::with_contacts()));
        let queued = alerts.consider(&[(contribution, contact.to_owned())]).await.unwrap();
        assert_eq!(queued == 1, expected, "conditions `{conditions}`, contact {contact}");
    }

    #[tokio::test]
    async fn conditions_select_what_alerts() {
        let question = Contribution::sample();
        let unsigned = Contribution { signals: None, ..complaint() };
        let skipped = |sentiment| Contribution {
            signals: Some(Signals {
                sentiment,
                intent: Intent::Complaint,
                sentiment_skipped: Some("language not covered".into()),
            }),
            ..complaint()
        };

        check("", complaint(), "c1", true).await;
        check("", Contribution { deleted: true, ..complaint() }, "c1", false).await;
        check("enabled = true", question.clone(), "", true).await;

        check("intent = [\"complaint\"]", complaint(), "c1", true).await;
        check("intent = [\"complaint\"]", question.clone(), "c1", false).await;
        check("intent = [\"complaint\"]", unsigned.clone(), "c1", false).await;
        check("intent = [\"question\", \"complaint\"]", question.clone(), "c1", true).await;

        check("sentiment_below = -0.3", complaint(), "c1", true).await;
        check("sentiment_below = -0.3", question.clone(), "c1", false).await;
        check("sentiment_below = -0.3", skipped(-0.9), "c1", false).await;
        check("sentiment_below = -0.3", unsigned.clone(), "c1", false).await;
        check("sentiment_above = 0.2", question.clone(), "c1", true).await;
        check("sentiment_above = 0.2", skipped(0.9), "c1", false).await;
        check("sentiment_above = -0.7\nsentiment_below = -0.5", complaint(), "c1", true).await;
        check("sentiment_above = -0.6\nsentiment_below = -0.5", complaint(), "c1", false).await;

        check("platforms = [\"zendesk\"]", complaint(), "c1", false).await;
        check("platforms = [\"Discourse\", \"zendesk\"]", complaint(), "c1", true).await;
        check("sources = [\"community\"]", complaint(), "c1", true).await;
        check("sources = [\"support\"]", complaint(), "c1", false).await;

        let stage = "contact = { lifecyclestage = [\"customer\", \"opportunity\"] }";
        check(stage, complaint(), "c1", true).await;
        check(stage, complaint(), "c2", false).await;
        check(stage, complaint(), "c9", false).await;
        check(stage, complaint(), "", false).await;
        check("contact = { lifecyclestage = [\"customer\"], company = [\"ACME\"] }", complaint(), "c1", true).await;
        check("contact = { lifecyclestage = [\"customer\"], company = [\"Globex\"] }", complaint(), "c1", false).await;
        check("intent = [\"praise\"]\ncontact = { company = [\"Acme\"] }", complaint(), "c1", false).await;
    }

    #[tokio::test]
    async fn a_matching_contribution_alerts_exactly_once_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(200, "ok").await;
        let toml_text = "[alerts.unhappy]\ndestination = \"webhook\"\nurl = $URL\nintent = [\"complaint\"]";
        let rules = rules(dir.path(), &hook_url(&server), toml_text);
        let crm = Arc::new(TestCrm::default());
        let batch = vec![(complaint(), "c1".to_owned()), (numbered(&Contribution::sample(), 43), "c1".to_owned())];

        let alerts = open(dir.path(), &rules, crm.clone());
        assert_eq!(alerts.consider(&batch).await.unwrap(), 1, "the question does not match");
        assert_eq!(alerts.consider(&batch).await.unwrap(), 0, "queued once");
        drop(alerts);

        let alerts = open(dir.path(), &rules, crm.clone());
        assert_eq!(alerts.consider(&batch).await.unwrap(), 0, "a restart queues nothing again");
        assert_eq!(alerts.send_due().await.unwrap(), SendStats { sent: 1, ..SendStats::default() });
        assert_eq!(alerts.send_due().await.unwrap(), SendStats::default());
        assert_eq!(alerts.consider(&batch).await.unwrap(), 0, "a sent alert is never queued again");
        assert_eq!(alerts.send_due().await.unwrap(), SendStats::default());

        assert_eq!(server.received_requests().await.unwrap().len(), 1);
        assert!(crm.reads().is_empty(), "no rule needs contact properties");
        let rows = stored(dir.path());
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].1.as_str(), rows[0].2), ("sent", 1));
    }

    /// What a destination receives for one alert about `contribution`,
    /// with the request's content type.
    async fn sent_body(destination: &str, contribution: Contribution) -> (Value, String) {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(200, "ok").await;
        let toml_text = format!("[alerts.unhappy]\ndestination = \"{destination}\"\nurl = $URL");
        let rules = rules(dir.path(), &hook_url(&server), &toml_text);
        let alerts = open(dir.path(), &rules, Arc::new(TestCrm::default()));
        assert_eq!(alerts.consider(&[(contribution, "c1".to_owned())]).await.unwrap(), 1);
        assert_eq!(alerts.send_due().await.unwrap().sent, 1);
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 1);
        let content_type = requests[0].headers.get("content-type").unwrap().to_str().unwrap().to_owned();
        let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
        let text = body.to_string();
        assert!(!text.contains("maya@example.com"), "no e-mail in an alert: {text}");
        assert!(!text.contains(TOKEN), "{text}");
        (body, content_type)
    }

    fn hostile() -> Contribution {
        Contribution {
            title: Some("<script>alert(1)</script> for @channel".into()),
            body: "Hey @here & @all, <!channel> see [click](https://evil.example) or <https://evil.example|click>"
                .into(),
            ..complaint()
        }
    }

    #[tokio::test]
    async fn slack_gets_blocks_with_escaped_user_text() {
        let (body, content_type) = sent_body("slack", hostile()).await;
        assert_eq!(content_type, "application/json");
        let text = body.to_string();
        for injected in ["<script>", "@channel", "@here", "@all", "<!channel>", "<https://evil"] {
            assert!(!text.contains(injected), "`{injected}` in {text}");
        }
        assert!(body["text"].as_str().unwrap().contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{body}");
        let blocks = body["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(blocks[0]["text"]["text"], "Alert: unhappy");
        let headline = blocks[1]["text"]["text"].as_str().unwrap();
        assert_eq!(blocks[1]["text"]["type"], "mrkdwn");
        assert!(headline.starts_with("*<https://community.example.com/t/42|&lt;script&gt;"), "{headline}");
        assert!(headline.contains("\n>Hey @\u{200B}here &amp; @\u{200B}all, &lt;!channel&gt; see"), "{headline}");
        let fields: Vec<&str> =
            blocks[2]["fields"].as_array().unwrap().iter().map(|f| f["text"].as_str().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "*Rule*\nunhappy",
                "*Platform*\ndiscourse (community)",
                "*Intent*\ncomplaint",
                "*Sentiment*\n-0.62",
                "*Author*\nMaya C (@\u{200B}mayac)",
                "*Contact*\n<https://crm.example.com/contacts/c1|c1>",
            ]
        );
        assert_eq!(
            blocks[3]["elements"][0]["text"],
            "<https://community.example.com/t/42|Open post> · <https://crm.example.com/contacts/c1|Open contact>"
        );
    }

    #[tokio::test]
    async fn teams_gets_an_adaptive_card_with_both_links() {
        let (body, _) = sent_body("teams", hostile()).await;
        assert_eq!(body["type"], "message");
        let attachment = &body["attachments"][0];
        assert_eq!(attachment["contentType"], "application/vnd.microsoft.card.adaptive");
        assert!(attachment["contentUrl"].is_null());
        let card = &attachment["content"];
        assert_eq!(card["$schema"], "http://adaptivecards.io/schemas/adaptive-card.json");
        assert_eq!((card["type"].as_str(), card["version"].as_str()), (Some("AdaptiveCard"), Some("1.4")));
        assert_eq!(
            card["actions"],
            json!([
                {"type": "Action.OpenUrl", "title": "Open post", "url": "https://community.example.com/t/42"},
                {"type": "Action.OpenUrl", "title": "Open contact", "url": "https://crm.example.com/contacts/c1"},
            ])
        );
        let blocks = card["body"].as_array().unwrap();
        assert_eq!(
            blocks[0],
            json!({"type": "TextBlock", "text": "Alert: unhappy", "size": "Medium", "weight": "Bolder", "wrap": true})
        );
        let excerpt = blocks[2]["text"].as_str().unwrap();
        assert!(excerpt.contains("[click]\u{200B}(https://evil.example)"), "a link is broken up: {excerpt}");
        let facts = blocks[3]["facts"].as_array().unwrap();
        assert_eq!(blocks[3]["type"], "FactSet");
        let fact = |title: &str| facts.iter().find(|f| f["title"] == title).unwrap()["value"].clone();
        assert_eq!(fact("Intent"), "complaint");
        assert_eq!(fact("Sentiment"), "-0.62");
        assert_eq!(fact("Author"), "Maya C (@mayac)");
        assert_eq!(fact("Contact"), "c1");
    }

    #[tokio::test]
    async fn mattermost_gets_markdown_text() {
        let (body, _) = sent_body("mattermost", hostile()).await;
        let object = body.as_object().unwrap();
        assert_eq!(object.keys().collect::<Vec<_>>(), ["text"]);
        let text = body["text"].as_str().unwrap();
        for injected in ["@channel", "@here", "@all", "[click](", " <https://evil"] {
            assert!(!text.contains(injected), "`{injected}` in {text}");
        }
        assert!(text.contains(" or \\<https://evil.example\\|click\\>"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "**Alert: unhappy** · complaint · sentiment -0.62 · discourse \\(community\\)");
        assert!(lines[1].starts_with("**[\\<script\\>alert\\(1\\)\\</script\\> for @\u{200B}channel](https://community.example.com/t/42)** by Maya C"), "{text}");
        assert!(
            lines[2].starts_with(
                "> Hey @\u{200B}here & @\u{200B}all, \\<\\!channel\\> see \\[click\\]\\(https://evil.example\\)"
            ),
            "{text}"
        );
        assert_eq!(
            lines.last().unwrap(),
            &"[Open post](https://community.example.com/t/42) · [Open contact](https://crm.example.com/contacts/c1) · contact c1"
        );
    }

    #[tokio::test]
    async fn webhook_gets_the_documented_json() {
        let long = Contribution { body: "é".repeat(400), ..complaint() };
        let (body, content_type) = sent_body("webhook", long).await;
        assert_eq!(content_type, "application/json");
        let excerpt = format!("{}…", "é".repeat(299));
        assert_eq!(
            body,
            json!({
                "rule": "unhappy",
                "contribution": {
                    "key": "discourse:community:42",
                    "platform": "discourse",
                    "source": "community",
                    "url": "https://community.example.com/t/42",
                    "kind": "post",
                    "title": "Export is broken",
                    "excerpt": excerpt,
                    "author": {"handle": "mayac", "display_name": "Maya C", "profile_url": "https://community.example.com/u/mayac"},
                    "created_at": "2023-11-14T22:13:20Z",
                    "intent": "complaint",
                    "sentiment": -0.62,
                },
                "contact": {"id": "c1", "url": "https://crm.example.com/contacts/c1"},
            })
        );
    }

    #[tokio::test]
    async fn a_webhook_with_a_secret_signs_its_requests() {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(200, "ok").await;
        let secret = dir.path().join("alert-secret");
        std::fs::write(&secret, "0123456789abcdef0123").unwrap();
        let toml_text = format!(
            "[alerts.unhappy]\ndestination = \"webhook\"\nurl = $URL\nsecret = {{ file = {:?} }}",
            secret.display().to_string()
        );
        let rules = rules(dir.path(), &hook_url(&server), &toml_text);
        let alerts = open(dir.path(), &rules, Arc::new(TestCrm::default()));
        alerts.consider(&[(complaint(), "c1".to_owned())]).await.unwrap();
        assert_eq!(alerts.send_due().await.unwrap().sent, 1);
        let requests = server.received_requests().await.unwrap();
        let signature = requests[0].headers.get(SIGNATURE_HEADER).unwrap().to_str().unwrap();
        let timestamp: i64 = signature.split(',').next().unwrap().trim_start_matches("t=").parse().unwrap();
        let signer = Signer::new(&secrecy::SecretString::from("0123456789abcdef0123")).unwrap();
        assert_eq!(signature, signer.sign(timestamp, &requests[0].body));
        assert!(!format!("{alerts:?}").contains("0123456789"));
    }

    #[tokio::test]
    async fn over_the_rate_limit_alerts_stay_queued() {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(200, "ok").await;
        let toml_text = "[alerts.unhappy]\ndestination = \"slack\"\nurl = $URL\nmax_per_hour = 6";
        let rules = rules(dir.path(), &hook_url(&server), toml_text);
        let alerts = open(dir.path(), &rules, Arc::new(TestCrm::default()));
        let batch: Vec<_> = (1..=3).map(|id| (numbered(&complaint(), id), "c1".to_owned())).collect();
        assert_eq!(alerts.consider(&batch).await.unwrap(), 3);

        assert_eq!(alerts.send_due().await.unwrap(), SendStats { sent: 1, deferred: 2, ..SendStats::default() });
        assert_eq!(alerts.send_due().await.unwrap(), SendStats { deferred: 2, ..SendStats::default() });
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
        let pending = alerts.store.due_alerts(None, 10).await.unwrap();
        assert_eq!(pending.iter().map(|alert| alert.attempts).collect::<Vec<_>>(), [0, 0], "untouched, still due");
        let statuses: Vec<String> = stored(dir.path()).into_iter().map(|row| row.1).collect();
        assert_eq!(statuses, ["sent", "pending", "pending"]);
    }

    #[tokio::test]
    async fn a_rule_held_by_its_limit_never_holds_up_another() {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(200, "ok").await;
        let toml_text = "[alerts.flood]\ndestination = \"slack\"\nurl = $URL\nmax_per_hour = 6\n\
                         [alerts.quiet]\ndestination = \"webhook\"\nurl = $URL\nplatforms = [\"zendesk\"]";
        let rules = rules(dir.path(), &hook_url(&server), toml_text);
        let alerts = open(dir.path(), &rules, Arc::new(TestCrm::default()));
        // More than one read of the queue of the flooding rule, queued first.
        let flood: Vec<_> = (1..=BATCH + 20).map(|id| (numbered(&complaint(), id), "c1".to_owned())).collect();
        assert_eq!(alerts.consider(&flood).await.unwrap(), BATCH + 20);
        let ticket = Contribution { platform: "zendesk".into(), ..numbered(&complaint(), 9999) };
        assert_eq!(alerts.consider(&[(ticket, "c2".to_owned())]).await.unwrap(), 2, "both rules match the ticket");

        let stats = alerts.send_due().await.unwrap();
        assert_eq!((stats.sent, stats.failed, stats.retried), (2, 0, 0), "{stats:?}");
        let bodies: Vec<Value> = server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect();
        assert!(bodies.iter().any(|b| b["rule"] == "quiet"), "the quiet rule's alert went out: {bodies:?}");
    }

    #[test]
    fn the_bucket_bursts_a_sixth_of_the_hour_and_refills_evenly() {
        let start = Instant::now();
        let mut bucket = Bucket::per_hour(6);
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start));
        assert!(!bucket.try_take(start + Duration::from_secs(599)));
        assert!(bucket.try_take(start + Duration::from_secs(600)));

        let mut bucket = Bucket::per_hour(30);
        assert_eq!((0..10).filter(|_| bucket.try_take(start)).count(), 5);
        assert!(bucket.try_take(start + Duration::from_secs(120)));
        assert!(!bucket.try_take(start + Duration::from_secs(120)));
        assert_eq!(Bucket::per_hour(1).capacity, 1.0);
    }

    /// Alerts with one queued alert of the Slack rule `unhappy`, whose rate limit never bites.
    async fn one_alert(dir: &Path, server: &MockServer) -> Alerts {
        let toml_text = "[alerts.unhappy]\ndestination = \"slack\"\nurl = $URL\nmax_per_hour = 3600";
        let rules = rules(dir, &hook_url(server), toml_text);
        let alerts = open(dir, &rules, Arc::new(TestCrm::default()));
        assert_eq!(alerts.consider(&[(complaint(), "c1".to_owned())]).await.unwrap(), 1);
        alerts
    }

    #[tokio::test]
    async fn a_server_error_is_retried_and_sent_once() {
        let dir = tempfile::tempdir().unwrap();
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500).set_body_string(format!("boom at {HOOK_PATH}")))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(200)).mount(&server).await;
        let alerts = one_alert(dir.path(), &server).await;

        assert_eq!(alerts.send_due().await.unwrap(), SendStats { retried: 1, ..SendStats::default() });
        let rows = stored(dir.path());
        let error = rows[0].3.clone().unwrap();
        assert!(error.contains("HTTP 500") && error.contains("slack at 127.0.0.1"), "{error}");
        assert!(!error.contains(TOKEN) && !error.contains("/hooks/"), "{error}");
        assert_eq!(alerts.send_due().await.unwrap(), SendStats { sent: 1, ..SendStats::default() });
        assert_eq!(alerts.send_due().await.unwrap(), SendStats::default());
        assert_eq!(server.received_requests().await.unwrap().len(), 2);
        let rows = stored(dir.path());
        assert_eq!((rows[0].1.as_str(), rows[0].2, rows[0].3.as_deref()), ("sent", 2, None));
    }

    #[tokio::test]
    async fn transient_failures_are_given_up_after_eight_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(503, "unavailable").await;
        let alerts = one_alert(dir.path(), &server).await;
        for _ in 1..MAX_ATTEMPTS {
            assert_eq!(alerts.send_due().await.unwrap().retried, 1);
        }
        assert_eq!(alerts.send_due().await.unwrap(), SendStats { failed: 1, ..SendStats::default() });
        assert_eq!(alerts.send_due().await.unwrap(), SendStats::default());
        assert_eq!(server.received_requests().await.unwrap().len(), MAX_ATTEMPTS as usize);
        let rows = stored(dir.path());
        assert_eq!((rows[0].1.as_str(), rows[0].2), ("failed", MAX_ATTEMPTS));
        assert!(rows[0].3.as_deref().unwrap().starts_with("gave up after 8 attempts"), "{rows:?}");
    }

    #[tokio::test]
    async fn a_rate_limited_destination_is_tried_again_after_its_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "120"))
            .mount(&server)
            .await;
        let alerts = one_alert(dir.path(), &server).await;
        assert_eq!(alerts.send_due().await.unwrap(), SendStats { retried: 1, ..SendStats::default() });
        assert!(alerts.store.due_alerts(None, 10).await.unwrap().is_empty(), "not due before the Retry-After");
        let rows = stored(dir.path());
        assert_eq!((rows[0].1.as_str(), rows[0].2), ("pending", 1));
        assert!(rows[0].3.as_deref().unwrap().contains("retry in 120s"), "{rows:?}");
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_refused_alert_fails_without_showing_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let server = MockServer::start().await;
        let echo = format!("no_service for {}{HOOK_PATH}", server.uri());
        Mock::given(method("POST")).respond_with(ResponseTemplate::new(404).set_body_string(echo)).mount(&server).await;
        let alerts = one_alert(dir.path(), &server).await;

        assert_eq!(alerts.send_due().await.unwrap(), SendStats { failed: 1, ..SendStats::default() });
        assert_eq!(alerts.send_due().await.unwrap(), SendStats::default(), "a failed alert is not sent again");
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
        let rows = stored(dir.path());
        assert_eq!(rows[0].1, "failed");
        let error = rows[0].3.clone().unwrap();
        assert!(error.starts_with("alert rule `unhappy`: slack at 127.0.0.1:"), "{error}");
        assert!(error.contains("refused the alert: HTTP 404: no_service for"), "{error}");
        assert!(!error.contains(TOKEN) && !error.contains("/hooks/"), "{error}");

        let debug = format!("{alerts:?}");
        assert!(debug.contains("127.0.0.1") && !debug.contains(TOKEN) && !debug.contains("/hooks/"), "{debug}");
        let config =
            format!("{:?}", rules(dir.path(), &hook_url(&server), "[alerts.x]\ndestination = \"slack\"\nurl = $URL"));
        assert!(!config.contains(TOKEN), "{config}");
    }

    /// The error building `rule` (TOML after `[alerts.rule]`) gives.
    fn build_error(dir: &Path, url: &str, rule: &str) -> String {
        let rules = rules(dir, url, &format!("[alerts.rule]\n{rule}"));
        let store = Arc::new(SqliteStore::open(&dir.join("state.db")).unwrap());
        let error = Alerts::new(&rules, None, store, Arc::new(TestCrm::default())).unwrap_err();
        let (display, debug) = (error.to_string(), format!("{error:?}"));
        assert!(!display.contains(TOKEN) && !debug.contains(TOKEN), "{display} / {debug}");
        display
    }

    #[test]
    fn bad_rules_are_refused_by_rule_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let https = format!("https://hooks.example.com{HOOK_PATH}");
        let slack = "destination = \"slack\"\nurl = $URL";
        let cases = [
            (
                https.clone(),
                format!("{slack}\nmax_per_hour = 0"),
                "alert rule `rule`: `max_per_hour`: must be at least 1",
            ),
            (https.clone(), format!("{slack}\nsentiment_below = 2.0"), "`sentiment_below`: must be between -1 and 1"),
            (
                https.clone(),
                format!("{slack}\nsentiment_below = 0.1\nsentiment_above = 0.5"),
                "`sentiment_below`: 0.1 is not above `sentiment_above` (0.5)",
            ),
            (https.clone(), format!("{slack}\ncontact = {{ company = [] }}"), "`contact`: `company` lists no value"),
            (
                https.clone(),
                format!("{slack}\nsecret = {{ env = \"S\" }}"),
                "`secret`: only `destination = \"webhook\"`",
            ),
            (
                https.clone(),
                "destination = \"webhook\"\nurl = $URL\nsecret = { env = \"TRIBUTARY_TEST_UNSET_SECRET\" }".into(),
                "`secret`: environment variable `TRIBUTARY_TEST_UNSET_SECRET` is not set",
            ),
            (format!("http://hooks.example.com{HOOK_PATH}"), slack.into(), "`url`: must be https"),
            (format!("ftp://hooks.example.com{HOOK_PATH}"), slack.into(), "`url`: must be an https URL, not `ftp:`"),
            (format!("{TOKEN} is no URL"), slack.into(), "`url`: is not a valid absolute URL"),
            (
                https.clone(),
                "destination = \"slack\"\nurl = { env = \"TRIBUTARY_TEST_SURELY_UNSET\" }".into(),
                "`url`: environment variable `TRIBUTARY_TEST_SURELY_UNSET` is not set",
            ),
        ];
        for (url, rule, expected) in cases {
            let error = build_error(dir, &url, &rule);
            assert!(error.contains(expected), "{rule}: {error}");
        }

        let unknown =
            toml::from_str::<Tables>("[alerts.x]\ndestination = \"slack\"\nurl = { env = \"X\" }\nchanel = 1");
        assert!(unknown.unwrap_err().to_string().contains("unknown field `chanel`"));
        let intent =
            toml::from_str::<Tables>("[alerts.x]\ndestination = \"slack\"\nurl = { env = \"X\" }\nintent = [\"rant\"]");
        assert!(intent.unwrap_err().to_string().contains("unknown variant `rant`"));

        // A disabled rule is not built, so its secret need not resolve.
        let rules =
            rules(dir, &https, "[alerts.off]\ndestination = \"teams\"\nurl = { env = \"UNSET_X\" }\nenabled = false");
        let store: Arc<dyn StateStore> = Arc::new(SqliteStore::open(&dir.join("state.db")).unwrap());
        let alerts = Alerts::new(&rules, None, store.clone(), Arc::new(TestCrm::default())).unwrap();
        assert!(alerts.is_empty());
        assert_eq!(rules["off"].max_per_hour, DEFAULT_MAX_PER_HOUR);

        let no_placeholder =
            Alerts::new(&rules, Some("https://crm.example.com/c".into()), store, Arc::new(TestCrm::default()));
        assert!(no_placeholder.unwrap_err().to_string().contains("has no `{contact_id}` placeholder"));
    }

    #[tokio::test]
    async fn an_alert_of_a_removed_rule_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(200, "ok").await;
        drop(one_alert(dir.path(), &server).await);
        let rules = rules(dir.path(), &hook_url(&server), "[alerts.other]\ndestination = \"slack\"\nurl = $URL");
        let alerts = open(dir.path(), &rules, Arc::new(TestCrm::default()));
        assert_eq!(alerts.send_due().await.unwrap(), SendStats { failed: 1, ..SendStats::default() });
        let rows = stored(dir.path());
        assert_eq!(rows[0].1, "failed");
        assert!(rows[0].3.as_deref().unwrap().contains("`unhappy` is no longer configured"), "{rows:?}");
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_changed_destination_gets_its_own_format() {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(200, "ok").await;
        drop(one_alert(dir.path(), &server).await);
        let rules = rules(dir.path(), &hook_url(&server), "[alerts.unhappy]\ndestination = \"mattermost\"\nurl = $URL");
        let alerts = open(dir.path(), &rules, Arc::new(TestCrm::default()));
        assert_eq!(alerts.send_due().await.unwrap().sent, 1);
        let requests = server.received_requests().await.unwrap();
        let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
        assert!(body["text"].as_str().unwrap().starts_with("**Alert: unhappy**"), "{body}");
        assert!(body.get("blocks").is_none());
    }

    #[tokio::test]
    async fn contact_properties_are_read_once_per_contact_and_call() {
        let dir = tempfile::tempdir().unwrap();
        let toml_text = r#"
            [alerts.customers]
            destination = "slack"
            url = $URL
            contact = { lifecyclestage = ["customer"] }

            [alerts.acme]
            destination = "slack"
            url = $URL
            contact = { company = ["acme"] }

            [alerts.praise_from_globex]
            destination = "slack"
            url = $URL
            intent = ["praise"]
            contact = { company = ["globex"] }

            [alerts.everything]
            destination = "slack"
            url = $URL
        "#;
        let rules = rules(dir.path(), "https://hooks.example.com/services/T/B/x", toml_text);
        let crm = Arc::new(TestCrm::with_contacts());
        let alerts = open(dir.path(), &rules, crm.clone());
        let batch = vec![
            (numbered(&complaint(), 1), "c1".to_owned()),
            (numbered(&complaint(), 2), "c1".to_owned()),
            (numbered(&complaint(), 3), "c2".to_owned()),
        ];
        // c1: customers, acme and everything, twice; c2: everything only.
        assert_eq!(alerts.consider(&batch).await.unwrap(), 7);
        let names = vec!["company".to_owned(), "lifecyclestage".to_owned()];
        assert_eq!(crm.reads(), [("c1".to_owned(), names.clone()), ("c2".to_owned(), names.clone())]);

        // Another call reads again; a contact only rules without contact
        // conditions (or otherwise failing ones) want is not read.
        let more = vec![(numbered(&complaint(), 4), "c1".to_owned()), (numbered(&complaint(), 5), "c3".to_owned())];
        let rules =
            rules.into_iter().filter(|(name, _)| name != "customers" && name != "acme").collect::<BTreeMap<_, _>>();
        let narrow = open(dir.path(), &rules, crm.clone());
        assert_eq!(narrow.consider(&more).await.unwrap(), 2, "everything, for both");
        assert_eq!(crm.reads().len(), 2, "praise_from_globex matches no complaint: nothing read");
        assert_eq!(alerts.consider(&more[..1]).await.unwrap(), 2, "customers and acme for the new one");
        assert_eq!(crm.reads().len(), 3);
    }

    #[tokio::test]
    async fn a_crm_failure_skips_only_rules_with_contact_conditions() {
        let dir = tempfile::tempdir().unwrap();
        let toml_text = r#"
            [alerts.customers]
            destination = "slack"
            url = $URL
            contact = { lifecyclestage = ["customer"] }

            [alerts.everything]
            destination = "slack"
            url = $URL
        "#;
        let rules = rules(dir.path(), "https://hooks.example.com/services/T/B/x", toml_text);
        let crm = Arc::new(TestCrm { down: true, ..TestCrm::with_contacts() });
        let alerts = open(dir.path(), &rules, crm.clone());
        let batch = vec![(numbered(&complaint(), 1), "c1".to_owned()), (numbered(&complaint(), 2), "c1".to_owned())];
        assert_eq!(alerts.consider(&batch).await.unwrap(), 2, "`everything` for both, `customers` for none");
        assert_eq!(crm.reads().len(), 1, "a failed read is not repeated within the call");
        let rules: Vec<String> = stored(dir.path()).into_iter().map(|row| row.0).collect();
        assert_eq!(rules, ["everything", "everything"]);
    }

    #[tokio::test]
    async fn run_sends_under_the_lease_and_lets_it_go_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let server = hook(200, "ok").await;
        let alerts = one_alert(dir.path(), &server).await;
        let store = alerts.store.clone();
        let (shutdown, wake) = (CancellationToken::new(), Arc::new(Notify::new()));
        let task = tokio::spawn(Arc::new(alerts).run(shutdown.clone(), wake.clone(), Duration::from_secs(3600)));
        for _ in 0..500 {
            if !server.received_requests().await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
        assert!(!store.acquire_lease(LEASE, "another replica", LEASE_TTL).await.unwrap(), "held while running");
        shutdown.cancel();
        task.await.unwrap();
        assert!(store.acquire_lease(LEASE, "another replica", LEASE_TTL).await.unwrap(), "released on shutdown");
        assert_eq!(stored(dir.path())[0].1, "sent");
    }

    #[test]
    fn text_helpers() {
        assert_eq!(excerpt("  a\n\n b\tc "), "a b c");
        let exact = "x".repeat(EXCERPT_CHARS);
        assert_eq!(excerpt(&exact), exact);
        let cut = excerpt(&"日本".repeat(EXCERPT_CHARS));
        assert_eq!(cut.chars().count(), EXCERPT_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(cap("abc def", 5), "abc…");
        assert_eq!(slack_escape("a & <b> @here"), "a &amp; &lt;b&gt; @\u{200B}here");
        assert_eq!(neutralise_mentions("mail me@example.com, @ all"), "mail me@\u{200B}example.com, @ all");
        assert_eq!(markdown_escape("*x* [y](z)"), "\\*x\\* \\[y\\]\\(z\\)");
        assert_eq!(
            slack_link("https://x.example/a|b?q=1&r=(2)", "go"),
            "<https://x.example/a%7Cb?q=1&amp;r=%282%29|go>"
        );
        assert_eq!(web_url("javascript:alert(1)"), None);
        assert_eq!(percent_encode("email:a b@c"), "email%3Aa%20b%40c");
    }
}
