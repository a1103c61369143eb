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
use tributary_sdk::{Contribution, Crm, CrmError, HttpClient, HttpError, HttpOptions, Intent, SecretRef};
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
    /// A disabled rule is not built: nothing is matched or sent for it.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// `webhook` only: the key that would sign requests (HMAC-SHA256).
    /// Not supported yet: a rule that sets it is refused.
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
        if config.secret.is_some() {
            return Err(invalid(
                "secret",
                if config.destination == Destination::Webhook {
                    "signed alert webhooks are not supported yet; remove `secret`".to_owned()
                } else {
                    format!("only `destination = \"webhook\"` signs its requests, not `{}`", config.destination)
                },
            ));
        }
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
        let url = Url::parse(url.expose_secret().trim())
            .map_err(|_| invalid("url", "is not a valid absolute URL".into()))?;
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(invalid("url", "names no host".into())),
        };
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => return Err(invalid("url", format!("must be https (http only to this host), not http to {host}"))),
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
        needles.sort_by_key(|needle| std::cmp::Reverse(needle.len()));
        let mut text = text.to_owned();
        for needle in needles {
            text = text.replace(&needle, "[redacted]");
        }
        text
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
                    .map(|title| cap(&one_line(title), TITLE_CHARS))
                    .filter(|title| !title.is_empty()),
                excerpt: excerpt(&contribution.body),
                author: FactsAuthor {
                    handle: contribution.author.handle.as_deref().map(|handle| cap(&one_line(handle), NAME_CHARS)),
                    display_name: contribution.author.display_name.as_deref().map(|name| cap(&one_line(name), NAME_CHARS)),
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
        let due = self.store.due_alerts(BATCH).await?;
        let mut stats = SendStats::default();
        for alert in due {
            let Some(rule) = self.rule(&alert.rule) else {
                let error = format!(
                    "the alert rule `{}` is no longer configured (or is disabled); this alert is not sent",
                    alert.rule
                );
                tracing::warn!(rule = %alert.rule, key = %alert.key, "{error}");
                self.store.alert_done(alert.id, AlertOutcome::Failed { error }).await?;
                stats.failed += 1;
                continue;
            };
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
        Ok(stats)
    }

    async fn post(&self, rule: &Rule, alert: &PendingAlert, body: &Value) -> AlertOutcome {
        let bytes = match serde_json::to_vec(body) {
            Ok(bytes) => bytes,
            Err(error) => return AlertOutcome::Failed { error: format!("cannot encode the alert: {error}") },
        };
        let request =
            rule.http.post(rule.url.0.clone()).header("content-type", "application/json").body(bytes);
        let failure = |what: String| format!("alert rule `{}`: {} at {}: {what}", rule.name, rule.destination, rule.host);
        match rule.http.send_once(request).await {
            Ok(response) if response.status.is_success() => AlertOutcome::Sent,
            Ok(response) => {
                let answer = cap(&rule.scrub(&response.body_snippet()), ANSWER_CHARS);
                AlertOutcome::Failed { error: failure(format!("refused the alert: HTTP {}: {answer}", response.status.as_u16())) }
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
    pub async fn run(self, shutdown: CancellationToken, wake: Arc<Notify>, interval: Duration) {
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
    let fallback = format!(
        "Alert {}: {} on {} by {}: {}",
        facts.rule,
        facts.intent(),
        c.platform,
        facts.author(),
        facts.title()
    );
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

/// `<url|label>`; `label` must already be escaped.
fn slack_link(url: &str, label: &str) -> String {
    let url = encode_url_delimiters(url).replace('&', "&amp;");
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

/// Runs of whitespace (newlines included) folded into one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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
    cap(&one_line(body), EXCERPT_CHARS)
}
