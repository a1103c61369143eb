//! The TOML configuration: keyed tables, `deny_unknown_fields` everywhere,
//! connectors a closed set chosen by `type`, secrets only by reference.
//!
//! Loading collects every problem it can find (each section is read on its
//! own) and reports each with file, line, column, key and a hint. Secret
//! values never appear in a problem: a plain string where a secret belongs
//! is reported without echoing it.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    num::NonZeroU32,
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use toml::{
    Spanned,
    de::{DeTable, DeValue, ValueDeserializer},
};
use tributary_sdk::SecretRef;

/// sysexits' EX_CONFIG: the exit code of a bad configuration.
pub const EX_CONFIG: i32 = 78;

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub crm: CrmConfig,
    pub sources: BTreeMap<String, SourceConfig>,
    pub identity: IdentityConfig,
    pub privacy: PrivacyConfig,
    pub alerts: BTreeMap<String, crate::alerts::AlertRuleConfig>,
}

/// `[identity]`: the identity graph.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// A file of administrator's links, one pair per line
    /// (`reddit:u/alice hubspot:12345`, `discourse:alice github:alice`;
    /// `#` starts a comment), applied when the daemon starts and by
    /// `tributary identity link --file`.
    #[serde(default)]
    pub links_file: Option<PathBuf>,
    /// How often the CRM's per-platform handle fields are read back into
    /// the identity graph (also done by `crm setup`); `0s` never.
    #[serde(default = "default_crm_recheck")]
    pub crm_recheck: HumanDuration,
}

fn default_crm_recheck() -> HumanDuration {
    HumanDuration(Duration::from_secs(86_400))
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig { links_file: None, crm_recheck: default_crm_recheck() }
    }
}

/// `[privacy]`: forgetting people. Raw bodies are kept no longer than
/// `[daemon] retention`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// What `tributary forget` does with the CRM activities Tributary
    /// created for the person: `archive` or `delete`.
    #[serde(default)]
    pub forget_activities: crate::privacy::ForgetActivities,
}

/// `[daemon]`: the process itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where state is kept: `sqlite:///var/lib/tributary/state.db`
    /// (absolute) or `sqlite://relative/state.db`.
    #[serde(default = "default_state")]
    pub state: String,
    /// Address of the health, status and metrics endpoints.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `text` (journald-friendly lines) or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Contributions delivered to the CRM per batch (HubSpot takes up to 100).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Delivery attempts before a contribution is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Consecutive failed polls after which a source makes `/readyz` fail.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// How often the delivery worker looks at the outbox when not woken.
    #[serde(default = "default_delivery_interval")]
    pub delivery_interval: HumanDuration,
    /// How long a shutdown waits for in-flight work before giving up.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    /// How long raw bodies are kept: delivered outbox rows, quarantined
    /// items, the excerpts of the activity index and the bodies of sent
    /// alerts older than this are deleted (hourly); what was delivered is
    /// still never sent again.
    #[serde(default = "default_retention")]
    pub retention: HumanDuration,
}

fn default_state() -> String {
    "sqlite:///var/lib/tributary/state.db".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_batch_size() -> usize {
    100
}
fn default_max_attempts() -> u32 {
    10
}
fn default_failure_threshold() -> u32 {
    5
}
fn default_delivery_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_retention() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 86_400))
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            state: default_state(),
            listen: default_listen(),
            log_format: LogFormat::default(),
            batch_size: default_batch_size(),
            max_attempts: default_max_attempts(),
            failure_threshold: default_failure_threshold(),
            delivery_interval: default_delivery_interval(),
            shutdown_timeout: default_shutdown_timeout(),
            retention: default_retention(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[crm]`: the system of record.
#[derive(Debug, Clone)]
pub struct CrmConfig {
    pub common: CrmCommon,
    pub kind: CrmKind,
}

/// Keys every CRM accepts, beside its `type` and its own keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrmCommon {
    /// What to do with an author the CRM does not know: `create` a contact
    /// or `skip` the contribution.
    #[serde(default)]
    pub unknown_authors: UnknownAuthors,
    /// Client-side request rate limit; unset relies on the CRM's headers.
    #[serde(default)]
    pub requests_per_second: Option<NonZeroU32>,
    /// Time for one CRM request.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// The address of a contact in the CRM's own interface, with
    /// `{contact_id}` where its id goes, e.g.
    /// `https://app.hubspot.com/contacts/PORTAL_ID/record/0-1/{contact_id}`:
    /// alerts link to it.
    #[serde(default)]
    pub contact_url: Option<String>,
}

impl CrmCommon {
    const KEYS: &[&str] = &["unknown_authors", "requests_per_second", "timeout", "contact_url"];
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownAuthors {
    #[default]
    Create,
    Skip,
}

/// The CRMs this build knows, by `type`.
#[derive(Debug, Clone)]
pub enum CrmKind {
    #[cfg(feature = "hubspot")]
    Hubspot(tributary_crm::hubspot::HubSpotConfig),
    #[cfg(feature = "salesforce")]
    Salesforce(tributary_crm::salesforce::SalesforceConfig),
    #[cfg(feature = "pipedrive")]
    Pipedrive(tributary_crm::pipedrive::PipedriveConfig),
    #[cfg(feature = "twenty")]
    Twenty(tributary_crm::twenty::TwentyConfig),
    #[cfg(feature = "webhook")]
    Webhook(tributary_crm::webhook::WebhookConfig),
    #[cfg(feature = "dynamics")]
    Dynamics(tributary_crm::dynamics::DynamicsConfig),
    #[cfg(feature = "zoho")]
    Zoho(tributary_crm::zoho::ZohoConfig),
    #[cfg(feature = "bottlecrm")]
    Bottlecrm(tributary_crm::bottlecrm::BottleCrmConfig),
    #[cfg(feature = "file")]
    File(tributary_crm::file::FileCrmConfig),
}

const CRM_TYPES: &[&str] = &[
    #[cfg(feature = "hubspot")]
    "hubspot",
    #[cfg(feature = "salesforce")]
    "salesforce",
    #[cfg(feature = "pipedrive")]
    "pipedrive",
    #[cfg(feature = "twenty")]
    "twenty",
    #[cfg(feature = "webhook")]
    "webhook",
    #[cfg(feature = "dynamics")]
    "dynamics",
    #[cfg(feature = "zoho")]
    "zoho",
    #[cfg(feature = "bottlecrm")]
    "bottlecrm",
    #[cfg(feature = "file")]
    "file",
];

/// `[sources.NAME]`: one place where customers talk.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub common: SourceCommon,
    pub kind: SourceKind,
}

/// Keys every source accepts, beside its `type` and its own keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceCommon {
    /// `every 2m` (s, m, h, d) or a cron expression (5 fields, or 6 with seconds).
    pub schedule: Schedule,
    /// Each poll starts up to this much later than scheduled, spreading load.
    #[serde(default = "default_jitter")]
    pub jitter: HumanDuration,
    /// Client-side request rate limit for this source.
    #[serde(default)]
    pub requests_per_second: Option<NonZeroU32>,
    /// Time for one request to the platform.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// A disabled source is kept in the config but never polled.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// On the first poll, do not go back further than this date.
    #[serde(default)]
    pub since: Option<Since>,
    /// What a contribution deleted on the platform does to its CRM activity.
    #[serde(default)]
    pub on_delete: OnDelete,
}

impl SourceCommon {
    const KEYS: &[&str] = &["schedule", "jitter", "requests_per_second", "timeout", "enabled", "since", "on_delete"];
}

/// `on_delete`: what a deletion on the platform does in the CRM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// The activity stays, its text replaced by a `[deleted]` marker; it no
    /// longer counts in the contact's rollups.
    #[default]
    Mark,
    /// The activity is archived in the CRM (HubSpot's recycling bin); it no
    /// longer counts in the contact's rollups.
    Archive,
    /// The activity stays as it was last seen, and still counts.
    Keep,
}

fn default_jitter() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_true() -> bool {
    true
}

/// The sources this build knows, by `type`.
#[derive(Debug, Clone)]
pub enum SourceKind {
    #[cfg(feature = "discourse")]
    Discourse(tributary_forums::discourse::DiscourseConfig),
    #[cfg(feature = "rss")]
    Rss(tributary_forums::rss::RssConfig),
    #[cfg(feature = "bluesky")]
    Bluesky(tributary_social::bluesky::BlueskyConfig),
    #[cfg(feature = "github")]
    Github(tributary_social::github::GitHubConfig),
    #[cfg(feature = "hackernews")]
    Hackernews(tributary_social::hackernews::HackerNewsConfig),
    #[cfg(feature = "mastodon")]
    Mastodon(tributary_social::mastodon::MastodonConfig),
    #[cfg(feature = "reddit")]
    Reddit(tributary_social::reddit::RedditConfig),
    #[cfg(feature = "stackexchange")]
    Stackexchange(tributary_social::stackexchange::StackExchangeConfig),
    #[cfg(feature = "x")]
    X(tributary_social::x::XConfig),
    #[cfg(feature = "youtube")]
    Youtube(tributary_social::youtube::YoutubeConfig),
    #[cfg(feature = "zendesk")]
    Zendesk(tributary_support::zendesk::ZendeskConfig),
    #[cfg(feature = "freshdesk")]
    Freshdesk(tributary_support::freshdesk::FreshdeskConfig),
    #[cfg(feature = "intercom")]
    Intercom(tributary_support::intercom::IntercomConfig),
    #[cfg(feature = "http")]
    Http(Box<tributary_support::http::HttpSourceConfig>),
    Demo(tributary_demo::DemoConfig),
}

const SOURCE_TYPES: &[&str] = &[
    #[cfg(feature = "discourse")]
    "discourse",
    #[cfg(feature = "rss")]
    "rss",
    #[cfg(feature = "bluesky")]
    "bluesky",
    #[cfg(feature = "github")]
    "github",
    #[cfg(feature = "hackernews")]
    "hackernews",
    #[cfg(feature = "mastodon")]
    "mastodon",
    #[cfg(feature = "reddit")]
    "reddit",
    #[cfg(feature = "stackexchange")]
    "stackexchange",
    #[cfg(feature = "x")]
    "x",
    #[cfg(feature = "youtube")]
    "youtube",
    #[cfg(feature = "zendesk")]
    "zendesk",
    #[cfg(feature = "freshdesk")]
    "freshdesk",
    #[cfg(feature = "intercom")]
    "intercom",
    #[cfg(feature = "http")]
    "http",
    "demo",
];

impl SourceKind {
    /// The platforms written on this source's contributions.
    pub fn platforms(&self) -> Vec<&str> {
        #[allow(unreachable_patterns)] // in builds with the demo source only
        match self {
            SourceKind::Demo(_) => tributary_demo::PLATFORMS.to_vec(),
            other => vec![other.platform()],
        }
    }

    pub fn platform(&self) -> &str {
        match self {
            #[cfg(feature = "discourse")]
            SourceKind::Discourse(_) => "discourse",
            #[cfg(feature = "rss")]
            SourceKind::Rss(_) => "rss",
            #[cfg(feature = "bluesky")]
            SourceKind::Bluesky(_) => "bluesky",
            #[cfg(feature = "github")]
            SourceKind::Github(_) => "github",
            #[cfg(feature = "hackernews")]
            SourceKind::Hackernews(_) => "hackernews",
            #[cfg(feature = "mastodon")]
            SourceKind::Mastodon(_) => "mastodon",
            #[cfg(feature = "reddit")]
            SourceKind::Reddit(_) => "reddit",
            #[cfg(feature = "stackexchange")]
            SourceKind::Stackexchange(_) => "stackexchange",
            #[cfg(feature = "x")]
            SourceKind::X(_) => "x",
            #[cfg(feature = "youtube")]
            SourceKind::Youtube(_) => "youtube",
            #[cfg(feature = "zendesk")]
            SourceKind::Zendesk(_) => "zendesk",
            #[cfg(feature = "freshdesk")]
            SourceKind::Freshdesk(_) => "freshdesk",
            #[cfg(feature = "intercom")]
            SourceKind::Intercom(_) => "intercom",
            #[cfg(feature = "http")]
            SourceKind::Http(c) => c.platform(),
            SourceKind::Demo(_) => "demo",
        }
    }
}

/// A duration written like `30s`, `2m`, `1h`, `1d` or `500ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration"))?;
        let unit_ms = match unit.trim() {
            "ms" => 1,
            "s" | "sec" | "secs" => 1_000,
            "m" | "min" | "mins" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => return Err(format!("`{other}` is not a duration unit (use ms, s, m, h or d)")),
        };
        Ok(HumanDuration(Duration::from_millis(number.saturating_mul(unit_ms))))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// When a source is polled.
#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<cron::Schedule>),
}

impl Schedule {
    /// The next poll after `now`, before jitter.
    pub fn next_after(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Schedule::Every(every) => chrono::Duration::from_std(*every)
                .ok()
                .and_then(|every| now.checked_add_signed(every))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            Schedule::Cron(cron) => cron.after(&now).next().unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(every) if every.as_secs() % 3600 == 0 => write!(f, "every {}h", every.as_secs() / 3600),
            Schedule::Every(every) if every.as_secs() % 60 == 0 => write!(f, "every {}m", every.as_secs() / 60),
            Schedule::Every(every) if every.subsec_millis() == 0 => write!(f, "every {}s", every.as_secs()),
            Schedule::Every(every) => write!(f, "every {}ms", every.as_millis()),
            Schedule::Cron(cron) => write!(f, "{}", cron.source()),
        }
    }
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(every) = text.strip_prefix("every ") {
            let HumanDuration(every) = every.parse().map_err(|e| format!("invalid schedule `{text}`: {e}"))?;
            if every < Duration::from_secs(1) {
                return Err("a schedule must be at least `every 1s`".into());
            }
            return Ok(Schedule::Every(every));
        }
        // Accept the classic five fields by adding seconds.
        let fields = text.split_whitespace().count();
        let expression = if fields == 5 { format!("0 {text}") } else { text.to_owned() };
        cron::Schedule::from_str(&expression).map(|cron| Schedule::Cron(Box::new(cron))).map_err(|error| {
            format!("invalid schedule: `{text}` is neither `every <duration>` nor a cron expression ({error})")
        })
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A date (`2026-01-31`) or a timestamp (`2026-01-31T12:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since(pub DateTime<Utc>);

impl FromStr for Since {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(at) = DateTime::parse_from_rfc3339(text) {
            return Ok(Since(at.with_timezone(&Utc)));
        }
        NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|date| date.and_hms_opt(0, 0, 0))
            .map(|at| Since(at.and_utc()))
            .ok_or_else(|| format!("`{text}` is not a date (2026-01-31) or an RFC 3339 time"))
    }
}

impl<'de> Deserialize<'de> for Since {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `sources.community.schedule`.
    pub key: String,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: `{}`: {}", self.file.display(), self.line, self.column, self.key, self.message)?;
        if !self.hint.is_empty() {
            write!(f, "\n    hint: {}", self.hint)?;
        }
        Ok(())
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        writeln!(f, "{count} problem{} in the configuration:", if count == 1 { "" } else { "s" })?;
        for problem in &self.0 {
            writeln!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, checks and resolves the secrets of a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_with(path, Secrets::Check)
    }

    /// Reads and checks a configuration file; `Secrets::Ignore` is for
    /// commands that only read the state store (`status`), which an operator
    /// may run without access to the credentials.
    pub fn load_with(path: &Path, secrets: Secrets) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigErrors(vec![Problem {
                file: path.to_owned(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read the file: {error}"),
                hint: "pass the right file with --config".into(),
            }])
        })?;
        Reader { file: path, text: &text, problems: Vec::new(), secrets }.read()
    }

    /// Checks a configuration given as text; `path` is only used in problems.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        Reader { file: path, text, problems: Vec::new(), secrets: Secrets::Check }.read()
    }

    /// The platforms of every configured source (for `crm setup`).
    pub fn platforms(&self) -> Vec<String> {
        let mut platforms: Vec<String> =
            self.sources.values().flat_map(|s| s.kind.platforms()).map(str::to_owned).collect();
        platforms.sort();
        platforms.dedup();
        platforms
    }
}

/// Whether loading resolves the secrets a configuration references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Check,
    Ignore,
}

struct Reader<'a> {
    file: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
    secrets: Secrets,
}

impl<'a> Reader<'a> {
    fn read(mut self) -> Result<Config, ConfigErrors> {
        let root = match DeTable::parse(self.text) {
            Ok(root) => root,
            Err(error) => {
                let span = error.span().unwrap_or(0..0);
                self.problem(span, String::new(), error.message().trim().to_owned());
                return Err(ConfigErrors(self.problems));
            }
        };
        // A second, untouched copy to name the key at any position.
        let index = DeTable::parse(self.text).map(Spanned::into_inner).unwrap_or_default();
        let root_span = root.span();
        let mut root = root.into_inner();

        let daemon = match root.remove_entry("daemon") {
            Some((_, value)) => self.section::<DaemonConfig>(&index, "daemon", value),
            None => Some(DaemonConfig::default()),
        };
        let crm = match root.remove_entry("crm") {
            Some((_, value)) => self.crm(&index, value),
            None => {
                self.problem_at(root_span.start..root_span.start, "crm", "the `[crm]` table is missing".into());
                None
            }
        };
        let identity = match root.remove_entry("identity") {
            Some((_, value)) => self.section::<IdentityConfig>(&index, "identity", value),
            None => Some(IdentityConfig::default()),
        };
        let privacy = match root.remove_entry("privacy") {
            Some((_, value)) => self.section::<PrivacyConfig>(&index, "privacy", value),
            None => Some(PrivacyConfig::default()),
        };
        let mut alerts = BTreeMap::new();
        if let Some((_, value)) = root.remove_entry("alerts") {
            let span = value.span();
            match value.into_inner() {
                DeValue::Table(table) => {
                    for (name, value) in table {
                        let key = format!("alerts.{}", name.get_ref());
                        if let Some(rule) = self.section::<crate::alerts::AlertRuleConfig>(&index, &key, value) {
                            alerts.insert(name.into_inner().into_owned(), rule);
                        }
                    }
                }
                _ => self.problem_at(span, "alerts", "`alerts` must be a table of `[alerts.NAME]` tables".into()),
            }
        }
        let mut sources = BTreeMap::new();
        match root.remove_entry("sources") {
            Some((_, value)) => {
                let span = value.span();
                match value.into_inner() {
                    DeValue::Table(table) => {
                        for (name, value) in table {
                            if let Some(source) = self.source(&index, name.get_ref(), value) {
                                sources.insert(name.into_inner().into_owned(), source);
                            }
                        }
                    }
                    _ => {
                        self.problem_at(span, "sources", "`sources` must be a table of `[sources.NAME]` tables".into())
                    }
                }
            }
            None => self.problem_at(0..0, "sources", "no `[sources.NAME]` table: nothing would be polled".into()),
        }
        for (key, _) in root {
            self.problem(key.span(), key.get_ref().to_string(), format!("unknown top-level table `{}`", key.get_ref()));
        }
        if self.secrets == Secrets::Check {
            // A disabled source is never built: its secrets need not resolve.
            let mut checked = index.clone();
            if let Some(DeValue::Table(configured)) = checked.get_mut("sources").map(Spanned::get_mut) {
                let disabled: Vec<String> = configured
                    .iter()
                    .map(|(name, _)| name.get_ref().to_string())
                    .filter(|name| sources.get(name).is_some_and(|s| !s.common.enabled))
                    .collect();
                for name in disabled {
                    configured.remove_entry(name.as_str());
                }
            }
            self.check_secrets(&checked, &mut Vec::new());
        }
        if let Some(daemon) = &daemon {
            self.check_ranges(&index, daemon);
        }
        if self.secrets == Secrets::Check && self.problems.is_empty() {
            self.check_builds(&index, crm.as_ref(), &sources);
            self.check_alerts(&index, crm.as_ref(), &alerts);
        }

        match (daemon, crm, identity, privacy) {
            (Some(daemon), Some(crm), Some(identity), Some(privacy)) if self.problems.is_empty() => {
                Ok(Config { path: self.file.to_owned(), daemon, crm, sources, identity, privacy, alerts })
            }
            _ => Err(ConfigErrors(self.problems)),
        }
    }

    fn crm(&mut self, index: &DeTable<'_>, value: Spanned<DeValue<'a>>) -> Option<CrmConfig> {
        let (common, kind_name, kind_span, rest) = self.split(value, "crm", CrmCommon::KEYS)?;
        let common = self.section::<CrmCommon>(index, "crm", common);
        let kind = match kind_name.as_str() {
            #[cfg(feature = "hubspot")]
            "hubspot" => self.section(index, "crm", rest).map(CrmKind::Hubspot),
            #[cfg(feature = "salesforce")]
            "salesforce" => self.section(index, "crm", rest).map(CrmKind::Salesforce),
            #[cfg(feature = "pipedrive")]
            "pipedrive" => self.section(index, "crm", rest).map(CrmKind::Pipedrive),
            #[cfg(feature = "twenty")]
            "twenty" => self.section(index, "crm", rest).map(CrmKind::Twenty),
            #[cfg(feature = "webhook")]
            "webhook" => self.section(index, "crm", rest).map(CrmKind::Webhook),
            #[cfg(feature = "dynamics")]
            "dynamics" => self.section(index, "crm", rest).map(CrmKind::Dynamics),
            #[cfg(feature = "zoho")]
            "zoho" => self.section(index, "crm", rest).map(CrmKind::Zoho),
            #[cfg(feature = "bottlecrm")]
            "bottlecrm" => self.section(index, "crm", rest).map(CrmKind::Bottlecrm),
            #[cfg(feature = "file")]
            "file" => self.section(index, "crm", rest).map(CrmKind::File),
            other => {
                self.unknown_type(kind_span, "crm.type", other, CRM_TYPES);
                None
            }
        };
        Some(CrmConfig { common: common?, kind: kind? })
    }

    fn source(&mut self, index: &DeTable<'_>, name: &str, value: Spanned<DeValue<'a>>) -> Option<SourceConfig> {
        let key = format!("sources.{name}");
        let (common, kind_name, kind_span, rest) = self.split(value, &key, SourceCommon::KEYS)?;
        let common = self.section::<SourceCommon>(index, &key, common);
        let kind = match kind_name.as_str() {
            #[cfg(feature = "discourse")]
            "discourse" => self.section(index, &key, rest).map(SourceKind::Discourse),
            #[cfg(feature = "rss")]
            "rss" => self.section(index, &key, rest).map(SourceKind::Rss),
            #[cfg(feature = "bluesky")]
            "bluesky" => self.section(index, &key, rest).map(SourceKind::Bluesky),
            #[cfg(feature = "github")]
            "github" => self.section(index, &key, rest).map(SourceKind::Github),
            #[cfg(feature = "hackernews")]
            "hackernews" => self.section(index, &key, rest).map(SourceKind::Hackernews),
            #[cfg(feature = "mastodon")]
            "mastodon" => self.section(index, &key, rest).map(SourceKind::Mastodon),
            #[cfg(feature = "reddit")]
            "reddit" => self.section(index, &key, rest).map(SourceKind::Reddit),
            #[cfg(feature = "stackexchange")]
            "stackexchange" => self.section(index, &key, rest).map(SourceKind::Stackexchange),
            #[cfg(feature = "x")]
            "x" => self.section(index, &key, rest).map(SourceKind::X),
            #[cfg(feature = "youtube")]
            "youtube" => self.section(index, &key, rest).map(SourceKind::Youtube),
            #[cfg(feature = "zendesk")]
            "zendesk" => self.section(index, &key, rest).map(SourceKind::Zendesk),
            #[cfg(feature = "freshdesk")]
            "freshdesk" => self.section(index, &key, rest).map(SourceKind::Freshdesk),
            #[cfg(feature = "intercom")]
            "intercom" => self.section(index, &key, rest).map(SourceKind::Intercom),
            #[cfg(feature = "http")]
            "http" => self.section(index, &key, rest).map(|c| SourceKind::Http(Box::new(c))),
            "demo" => self.section(index, &key, rest).map(SourceKind::Demo),
            other => {
                self.unknown_type(kind_span, &format!("{key}.type"), other, SOURCE_TYPES);
                None
            }
        };
        Some(SourceConfig { common: common?, kind: kind? })
    }

    /// Splits a component table into its common keys and its own keys,
    /// taking out `type`.
    #[allow(clippy::type_complexity)]
    fn split(
        &mut self,
        value: Spanned<DeValue<'a>>,
        key: &str,
        common_keys: &[&str],
    ) -> Option<(Spanned<DeValue<'a>>, String, Range<usize>, Spanned<DeValue<'a>>)> {
        let span = value.span();
        let DeValue::Table(mut table) = value.into_inner() else {
            self.problem_at(span, key, format!("`{key}` must be a table"));
            return None;
        };
        let Some((type_key, type_value)) = table.remove_entry("type") else {
            self.problem_at(span, key, "missing key `type`".into());
            return None;
        };
        let type_span = type_value.span();
        let Some(kind) = type_value.get_ref().as_str().map(str::to_owned) else {
            self.problem_at(type_key.span(), &format!("{key}.type"), "`type` must be a string".into());
            return None;
        };
        let mut common = DeTable::new();
        for name in common_keys {
            if let Some((k, v)) = table.remove_entry(*name) {
                common.insert(k, v);
            }
        }
        let common = Spanned::new(span.clone(), DeValue::Table(common));
        let rest = Spanned::new(span, DeValue::Table(table));
        Some((common, kind, type_span, rest))
    }

    /// Reads one section (`prefix` is its dotted path) on its own, so a
    /// problem in one section does not hide those of the others.
    fn section<T: DeserializeOwned>(
        &mut self,
        index: &DeTable<'_>,
        prefix: &str,
        value: Spanned<DeValue<'a>>,
    ) -> Option<T> {
        let fallback = value.span();
        match T::deserialize(ValueDeserializer::from(value)) {
            Ok(section) => Some(section),
            Err(error) => {
                let span = error.span().unwrap_or(fallback);
                let inner = table_at(index, prefix).and_then(|table| key_at(table, span.start));
                let key = match inner {
                    Some(inner) => format!("{prefix}.{inner}"),
                    None => prefix.to_owned(),
                };
                self.problem(span, key, error.message().trim().to_owned());
                None
            }
        }
    }

    fn unknown_type(&mut self, span: Range<usize>, key: &str, found: &str, known: &[&str]) {
        let message = format!("unknown type `{found}`");
        let hint = format!("this build knows: {}", known.join(", "));
        let (line, column) = line_column(self.text, span.start);
        self.problems.push(Problem { file: self.file.to_owned(), line, column, key: key.to_owned(), message, hint });
    }

    /// Values that parse but make no sense.
    fn check_ranges(&mut self, index: &DeTable<'_>, daemon: &DaemonConfig) {
        let checks: [(&str, bool, &str); 4] = [
            ("batch_size", (1..=100).contains(&daemon.batch_size), "must be between 1 and 100 (HubSpot's batch limit)"),
            ("max_attempts", daemon.max_attempts >= 1, "must be at least 1"),
            ("failure_threshold", daemon.failure_threshold >= 1, "must be at least 1 (0 would never be ready)"),
            ("delivery_interval", daemon.delivery_interval.0 >= Duration::from_millis(100), "must be at least 100ms"),
        ];
        for (key, ok, message) in checks {
            if ok {
                continue;
            }
            let span = table_at(index, "daemon")
                .and_then(|table| table.get_key_value(key))
                .map_or(0..0, |(key, _)| key.span());
            self.problem(span, format!("daemon.{key}"), format!("`{key}` {message}"));
        }
    }

    /// What serde cannot see (two keys that exclude each other, a value a
    /// connector refuses): every enabled component is built, offline, and a
    /// refusal is reported at its table.
    fn check_builds(&mut self, index: &DeTable<'_>, crm: Option<&CrmConfig>, sources: &BTreeMap<String, SourceConfig>) {
        let tokens: std::sync::Arc<dyn tributary_sdk::TokenStore> =
            std::sync::Arc::new(tributary_sdk::MemoryTokenStore::default());
        let enabled: Vec<(&str, &SourceConfig)> =
            sources.iter().filter(|(_, source)| source.common.enabled).map(|(n, s)| (n.as_str(), s)).collect();
        let services = crate::registry::SourceServices::new(tokens.clone(), &enabled);
        for (name, source) in enabled {
            if let Err(error) = crate::registry::build_source(name, source, &services) {
                let message = error.root_cause().to_string();
                // At the key the connector names in backticks, when the table has it; else at the table.
                let table = table_at(index, "sources").and_then(|table| table.get_key_value(name));
                let named = table.and_then(|(_, value)| match value.get_ref() {
                    DeValue::Table(inner) => {
                        backticked(&message).find_map(|path| key_span(inner, path).map(|s| (path, s)))
                    }
                    _ => None,
                });
                let (key, span) = match named {
                    Some((path, span)) => (format!("sources.{name}.{path}"), span),
                    None => (format!("sources.{name}"), table.map_or(0..0, |(key, _)| key.span())),
                };
                let (line, column) = line_column(self.text, span.start);
                self.problems.push(Problem {
                    file: self.file.to_owned(),
                    line,
                    column,
                    key,
                    message,
                    hint: format!(
                        "the README shows a working `{}` source; config/production.toml documents every key",
                        source.kind.platform()
                    ),
                });
            }
        }
        if let Some(crm) = crm
            && let Err(error) = crate::registry::build_crm(crm, tokens)
        {
            let span = index.get_key_value("crm").map_or(0..0, |(key, _)| key.span());
            let (line, column) = line_column(self.text, span.start);
            self.problems.push(Problem {
                file: self.file.to_owned(),
                line,
                column,
                key: "crm".into(),
                message: error.root_cause().to_string(),
                hint: "config/production.toml documents every key of the CRM".into(),
            });
        }
    }

    /// Alert rules are built offline: a refusal is reported at the key it names.
    fn check_alerts(
        &mut self,
        index: &DeTable<'_>,
        crm: Option<&CrmConfig>,
        alerts: &BTreeMap<String, crate::alerts::AlertRuleConfig>,
    ) {
        let contact_url = crm.and_then(|crm| crm.common.contact_url.as_deref());
        let Err(error) = crate::alerts::validate(alerts, contact_url) else { return };
        let (key, span) = match &error {
            crate::alerts::AlertError::Config { rule, key, .. } => {
                let rule_table = table_at(index, "alerts").and_then(|table| table.get_key_value(rule.as_str()));
                let span = rule_table.and_then(|(name, value)| match value.get_ref() {
                    DeValue::Table(inner) => key_span(inner, key).or(Some(name.span())),
                    _ => Some(name.span()),
                });
                (format!("alerts.{rule}.{key}"), span.unwrap_or(0..0))
            }
            _ => (
                "crm.contact_url".to_owned(),
                table_at(index, "crm").and_then(|t| key_span(t, "contact_url")).unwrap_or(0..0),
            ),
        };
        let (line, column) = line_column(self.text, span.start);
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line,
            column,
            key,
            message: error.to_string(),
            hint: "the README's \"Alerts to the team\" shows a working rule".into(),
        });
    }

    /// Every `{ env = ... }` / `{ file = ... }` table must resolve.
    fn check_secrets(&mut self, table: &DeTable<'_>, path: &mut Vec<String>) {
        for (key, value) in table {
            path.push(key.get_ref().to_string());
            if let DeValue::Table(inner) = value.get_ref() {
                let is_secret = inner.len() == 1 && (inner.contains_key("env") || inner.contains_key("file"));
                if is_secret {
                    let secret = SecretRef::deserialize(ValueDeserializer::from(value.clone()));
                    match secret.map(|s| s.resolve()) {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => self.problem_at(value.span(), &path.join("."), error.to_string()),
                        Err(error) => self.problem_at(value.span(), &path.join("."), error.message().to_owned()),
                    }
                } else {
                    self.check_secrets(inner, path);
                }
            }
            path.pop();
        }
    }

    fn problem_at(&mut self, span: Range<usize>, key: &str, message: String) {
        self.problem(span, key.to_owned(), message);
    }

    fn problem(&mut self, span: Range<usize>, key: String, message: String) {
        let (line, column) = line_column(self.text, span.start);
        let (message, hint) = explain(message);
        self.problems.push(Problem { file: self.file.to_owned(), line, column, key, message, hint });
    }
}

/// Turns a raw message into what to tell an administrator, and never lets
/// a value written where a secret belongs through.
fn explain(message: String) -> (String, String) {
    let secret_hint = "secrets are referenced, never written in the file: \
        `{ env = \"NAME\" }` or `{ file = \"/run/credentials/tributary.service/NAME\" }`";
    if message.contains("`env` or `file`") || message.contains("SecretRef") {
        return ("a secret must be a reference, not a value".into(), secret_hint.into());
    }
    let hint = if message.contains("environment variable") || message.contains("secret file") {
        "set it where the service runs (systemd: `Environment=`/`EnvironmentFile=`, or `LoadCredential=` with `{ file = ... }`)"
    } else if message.contains("unknown field") {
        "remove the key or fix its spelling; config/production.toml documents every key"
    } else if message.contains("missing field") || message.contains("missing key") {
        "add the key; config/production.toml documents every key"
    } else if message.contains("schedule") {
        "write `every 2m` (units: ms, s, m, h, d) or a cron expression such as `*/5 * * * *`"
    } else if message.contains("duration") {
        "write a duration such as `30s`, `2m` or `1h`"
    } else if message.contains("invalid type") || message.contains("invalid value") {
        "check the value's type against config/production.toml"
    } else if message.contains("unknown variant") {
        "use one of the values listed in the message"
    } else if message.contains("unknown top-level") {
        "the top-level tables are `[daemon]`, `[crm]` and `[sources.NAME]`"
    } else if message.contains("missing") {
        "see config/demo.toml for a complete example"
    } else if message.contains("JSON pointer") || message.contains("placeholder") || message.contains("template") {
        "pointers are RFC 6901 (`/items/0/id`); connectors/support/examples/ holds complete `http` definitions"
    } else {
        "config/production.toml and the README document every key"
    };
    (message, hint.to_owned())
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, column)
}

/// The table at a dotted path (`sources.community`).
fn table_at<'t, 'i>(root: &'t DeTable<'i>, path: &str) -> Option<&'t DeTable<'i>> {
    path.split('.').try_fold(root, |table, part| match table.get(part).map(Spanned::get_ref) {
        Some(DeValue::Table(inner)) => Some(inner),
        _ => None,
    })
}

/// The words of a message written in backticks.
fn backticked(message: &str) -> impl Iterator<Item = &str> {
    message.split('`').skip(1).step_by(2)
}

/// The span of the key at dotted `path` in `table`.
fn key_span(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let (parent, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (table_at(table, parent)?, last),
        None => (table, path),
    };
    parent.get_key_value(last).map(|(key, _)| key.span())
}

/// The dotted path of the deepest key whose key or value covers `offset`.
fn key_at(table: &DeTable<'_>, offset: usize) -> Option<String> {
    for (key, value) in table {
        let covers = |span: Range<usize>| span.start <= offset && offset < span.end.max(span.start + 1);
        if covers(key.span()) {
            return Some(key.get_ref().to_string());
        }
        if covers(value.span()) {
            let deeper = match value.get_ref() {
                DeValue::Table(inner) => key_at(inner, offset),
                _ => None,
            };
            return Some(match deeper {
                Some(deeper) => format!("{}.{deeper}", key.get_ref()),
                None => key.get_ref().to_string(),
            });
        }
    }
    None
}

impl CrmConfig {
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            #[cfg(feature = "hubspot")]
            CrmKind::Hubspot(_) => "hubspot",
            #[cfg(feature = "salesforce")]
            CrmKind::Salesforce(_) => "salesforce",
            #[cfg(feature = "pipedrive")]
            CrmKind::Pipedrive(_) => "pipedrive",
            #[cfg(feature = "twenty")]
            CrmKind::Twenty(_) => "twenty",
            #[cfg(feature = "webhook")]
            CrmKind::Webhook(_) => "webhook",
            #[cfg(feature = "dynamics")]
            CrmKind::Dynamics(_) => "dynamics",
            #[cfg(feature = "zoho")]
            CrmKind::Zoho(_) => "zoho",
            #[cfg(feature = "bottlecrm")]
            CrmKind::Bottlecrm(_) => "bottlecrm",
            #[cfg(feature = "file")]
            CrmKind::File(_) => "file",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[daemon]
state = "sqlite://state.db"

[crm]
type = "file"
path = "crm.json"

[sources.demo]
type = "demo"
schedule = "every 2m"
"#;

    /// Parses `text` and expects exactly the problems given as
    /// (line, key, a piece of the message, a piece of the hint).
    fn check(text: &str, expected: &[(usize, &str, &str, &str)]) {
        let problems = match Config::parse(Path::new("t.toml"), text) {
            Ok(_) => vec![],
            Err(ConfigErrors(problems)) => problems,
        };
        let got: Vec<_> = problems.iter().map(|p| (p.line, p.key.as_str())).collect();
        let want: Vec<_> = expected.iter().map(|(line, key, _, _)| (*line, *key)).collect();
        assert_eq!(got, want, "problems: {problems:#?}");
        for (problem, (_, _, message, hint)) in problems.iter().zip(expected) {
            assert!(problem.message.contains(message), "{problem}\n  expected message with {message:?}");
            assert!(problem.hint.contains(hint), "{problem}\n  expected hint with {hint:?}");
            assert!(problem.to_string().starts_with("t.toml:"), "{problem}");
        }
    }

    #[test]
    fn a_good_config_has_no_problems() {
        check(BASE, &[]);
        let config = Config::parse(Path::new("t.toml"), BASE).unwrap();
        assert_eq!(config.daemon.listen.to_string(), "127.0.0.1:9464");
        assert!(matches!(config.sources["demo"].common.schedule, Schedule::Every(d) if d == Duration::from_secs(120)));
        assert!(matches!(config.sources["demo"].kind, SourceKind::Demo(_)));
    }

    #[test]
    fn every_problem_is_reported_with_line_key_and_hint() {
        // An unknown key, a wrong type and a bad cron, in three sections at once.
        let text = BASE.replace("state = ", "stat = ").replace("path = \"crm.json\"", "path = 5")
            + "\n[sources.other]\ntype = \"demo\"\nschedule = \"every fortnight\"\n";
        check(
            &text,
            &[
                (3, "daemon.stat", "unknown field `stat`", "spelling"),
                (7, "crm.path", "invalid type", "type"),
                (15, "sources.other.schedule", "not a duration", "every 2m"),
            ],
        );
    }

    #[test]
    fn bad_cron_unknown_type_and_missing_schedule() {
        check(&BASE.replace("every 2m", "61 * * * *"), &[(11, "sources.demo.schedule", "cron", "cron expression")]);
        check(
            &BASE.replace("type = \"demo\"", "type = \"myspace\""),
            &[(10, "sources.demo.type", "unknown type `myspace`", "demo")],
        );
        check(
            &BASE.replace("schedule = \"every 2m\"", ""),
            &[(9, "sources.demo", "missing field `schedule`", "add the key")],
        );
        check(&BASE.replace("[crm]\ntype = \"file\"\npath = \"crm.json\"", ""), &[(1, "crm", "missing", "")]);
    }

    #[test]
    fn secrets_are_checked_and_never_echoed() {
        let missing = BASE.to_owned()
            + "\n[sources.x]\ntype = \"demo\"\nschedule = \"every 1m\"\nseed = { env = \"TRIBUTARY_TEST_NOT_SET\" }\n";
        // The secret is reported as missing before the type mismatch is considered.
        let problems = Config::parse(Path::new("t.toml"), &missing).unwrap_err().0;
        let secret =
            problems.iter().find(|p| p.message.contains("TRIBUTARY_TEST_NOT_SET")).expect("missing env reported");
        assert_eq!(secret.line, 16);
        assert_eq!(secret.key, "sources.x.seed");
        assert!(secret.hint.contains("Environment="), "{secret}");
    }

    #[test]
    fn values_out_of_range_are_problems_and_disabled_sources_need_no_secrets() {
        check(
            &BASE.replace("state = \"sqlite://state.db\"", "batch_size = 500\nfailure_threshold = 0"),
            &[(3, "daemon.batch_size", "between 1 and 100", ""), (4, "daemon.failure_threshold", "at least 1", "")],
        );
        let disabled = BASE.to_owned()
            + "\n[sources.old]\ntype = \"discourse\"\nbase_url = \"https://old.example.com\"\nschedule = \"every 1m\"\nenabled = false\napi_key = { env = \"TRIBUTARY_TEST_NOT_SET\" }\n";
        check(&disabled, &[]);
        let enabled = disabled.replace("enabled = false", "enabled = true");
        check(&enabled, &[(18, "sources.old.api_key", "TRIBUTARY_TEST_NOT_SET", "Environment=")]);
        // A schedule too long to add to now does not panic.
        let far: Schedule = "every 99999999999d".parse().unwrap();
        assert_eq!(far.next_after(Utc::now()), DateTime::<Utc>::MAX_UTC);
    }

    #[test]
    fn syntax_errors_point_at_the_line() {
        check(&BASE.replace("[crm]", "[crm"), &[(5, "", "", "")]);
    }

    #[test]
    fn durations_schedules_and_dates_parse() {
        assert_eq!("500ms".parse::<HumanDuration>().unwrap().0, Duration::from_millis(500));
        assert_eq!("2h".parse::<HumanDuration>().unwrap().0, Duration::from_secs(7200));
        assert!("2 weeks".parse::<HumanDuration>().is_err());
        assert!("every 0s".parse::<Schedule>().is_err());
        let cron: Schedule = "*/5 * * * *".parse().unwrap();
        let now = DateTime::parse_from_rfc3339("2026-01-01T10:01:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(cron.next_after(now).to_rfc3339(), "2026-01-01T10:05:00+00:00");
        assert_eq!("2026-01-31".parse::<Since>().unwrap().0.to_rfc3339(), "2026-01-31T00:00:00+00:00");
    }
}
