//! Builds the configured components: the only place that maps a config
//! `type` to a connector crate.

use std::{collections::HashMap, num::NonZeroU32, sync::Arc};

#[allow(unused_imports)] // unused in builds without any HTTP connector
use anyhow::Context;
use tributary_sdk::{Crm, HttpOptions, RateBudget, Source, TokenStore};

use crate::config::{Config, CrmConfig, CrmKind, SourceConfig, SourceKind};

/// A built source with its settings.
pub struct BuiltSource {
    pub name: String,
    pub config: SourceConfig,
    pub source: Arc<dyn Source>,
}

/// What the built sources share: where OAuth2 tokens are kept, and one
/// rate budget per credential.
pub struct SourceServices {
    pub tokens: Arc<dyn TokenStore>,
    budgets: HashMap<String, RateBudget>,
}

impl SourceServices {
    /// One budget per credential among `sources`, at the lowest
    /// `requests_per_second` any of them sets.
    pub fn new(tokens: Arc<dyn TokenStore>, sources: &[(&str, &SourceConfig)]) -> SourceServices {
        let mut rates: HashMap<String, Option<NonZeroU32>> = HashMap::new();
        for (_, source) in sources {
            if let Some(key) = rate_budget_key(&source.kind) {
                let rate = rates.entry(key).or_insert(source.common.requests_per_second);
                *rate = match (*rate, source.common.requests_per_second) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let budgets = rates.into_iter().map(|(key, rate)| (key, RateBudget::new(rate))).collect();
        SourceServices { tokens, budgets }
    }

    /// The budget a source of this kind draws from, shared with every
    /// other source on the same credential.
    pub fn budget(&self, kind: &SourceKind) -> Option<RateBudget> {
        self.budgets.get(&rate_budget_key(kind)?).cloned()
    }
}

/// Sources with equal keys spend one budget: the platform counts their
/// requests together (one token, or one address for anonymous APIs). The
/// key names the credential's reference, never its value.
#[allow(unreachable_code, unused_variables)] // without any HTTP connector
fn rate_budget_key(kind: &SourceKind) -> Option<String> {
    let key = match kind {
        #[cfg(feature = "discourse")]
        SourceKind::Discourse(c) => format!("discourse {} {:?}", c.base_url, c.api_key),
        #[cfg(feature = "rss")]
        SourceKind::Rss(c) => format!("rss {}", c.url.host_str().unwrap_or_default()),
        #[cfg(feature = "bluesky")]
        SourceKind::Bluesky(c) => format!("bluesky {} {}", c.service, c.identifier),
        #[cfg(feature = "github")]
        SourceKind::Github(c) => format!("github {} {:?}", c.base_url, c.token),
        #[cfg(feature = "hackernews")]
        SourceKind::Hackernews(c) => format!("hackernews {}", c.base_url),
        #[cfg(feature = "mastodon")]
        SourceKind::Mastodon(c) => format!("mastodon {} {:?}", c.base_url, c.token),
        #[cfg(feature = "reddit")]
        SourceKind::Reddit(c) => format!("reddit {} {} {:?}", c.auth_url, c.client_id, c.username),
        #[cfg(feature = "stackexchange")]
        SourceKind::Stackexchange(c) => format!("stackexchange {} {:?}", c.base_url, c.key),
        #[cfg(feature = "x")]
        SourceKind::X(c) => format!(
            "x {} {:?} {:?}",
            c.base_url,
            c.bearer_token,
            c.oauth2.as_ref().map(|o| (&o.client_id, &o.refresh_token))
        ),
        #[cfg(feature = "youtube")]
        SourceKind::Youtube(c) => format!("youtube {} {:?}", c.base_url, c.api_key),
        #[cfg(feature = "zendesk")]
        SourceKind::Zendesk(c) => format!("zendesk {}", c.credential_key()),
        #[cfg(feature = "freshdesk")]
        SourceKind::Freshdesk(c) => format!("freshdesk {}", c.credential_key()),
        #[cfg(feature = "intercom")]
        SourceKind::Intercom(c) => format!("intercom {}", c.credential_key()),
        #[cfg(feature = "http")]
        SourceKind::Http(c) => format!("http {}", c.credential_key()),
        SourceKind::Demo(_) => return None,
    };
    Some(key)
}

fn user_agent() -> String {
    concat!("tributary/", env!("CARGO_PKG_VERSION"), " (+community-to-CRM sync)").to_owned()
}

#[cfg_attr(
    not(any(
        feature = "discourse",
        feature = "rss",
        feature = "bluesky",
        feature = "github",
        feature = "hackernews",
        feature = "mastodon",
        feature = "reddit",
        feature = "stackexchange",
        feature = "x",
        feature = "youtube",
        feature = "zendesk",
        feature = "freshdesk",
        feature = "intercom",
        feature = "http"
    )),
    allow(unused_variables)
)]
pub fn build_source(name: &str, config: &SourceConfig, services: &SourceServices) -> anyhow::Result<Arc<dyn Source>> {
    let http = HttpOptions {
        user_agent: user_agent(),
        timeout: config.common.timeout.0,
        requests_per_second: config.common.requests_per_second,
        budget: services.budget(&config.kind),
        ..HttpOptions::default()
    };
    let source: Arc<dyn Source> = match &config.kind {
        #[cfg(feature = "discourse")]
        SourceKind::Discourse(c) => Arc::new(
            tributary_forums::discourse::DiscourseSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "rss")]
        SourceKind::Rss(c) => Arc::new(
            tributary_forums::rss::RssSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "bluesky")]
        SourceKind::Bluesky(c) => Arc::new(
            tributary_social::bluesky::BlueskySource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?
                .with_token_store(services.tokens.clone()),
        ),
        #[cfg(feature = "github")]
        SourceKind::Github(c) => Arc::new(
            tributary_social::github::GitHubSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "hackernews")]
        SourceKind::Hackernews(c) => Arc::new(
            tributary_social::hackernews::HackerNewsSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "mastodon")]
        SourceKind::Mastodon(c) => Arc::new(
            tributary_social::mastodon::MastodonSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "reddit")]
        SourceKind::Reddit(c) => Arc::new(
            tributary_social::reddit::RedditSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?
                .with_token_store(services.tokens.clone()),
        ),
        #[cfg(feature = "stackexchange")]
        SourceKind::Stackexchange(c) => Arc::new(
            tributary_social::stackexchange::StackExchangeSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "x")]
        SourceKind::X(c) => Arc::new(
            tributary_social::x::XSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?
                .with_token_store(services.tokens.clone()),
        ),
        #[cfg(feature = "youtube")]
        SourceKind::Youtube(c) => Arc::new(
            tributary_social::youtube::YoutubeSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "zendesk")]
        SourceKind::Zendesk(c) => Arc::new(
            tributary_support::zendesk::ZendeskSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "freshdesk")]
        SourceKind::Freshdesk(c) => Arc::new(
            tributary_support::freshdesk::FreshdeskSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "intercom")]
        SourceKind::Intercom(c) => Arc::new(
            tributary_support::intercom::IntercomSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "http")]
        SourceKind::Http(c) => Arc::new(
            tributary_support::http::HttpSource::new(name, (**c).clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        SourceKind::Demo(c) => Arc::new(tributary_demo::DemoSource::new(name, c.clone())),
    };
    Ok(source)
}

/// Every enabled source, sharing `tokens` and one budget per credential.
pub fn build_sources(config: &Config, tokens: Arc<dyn TokenStore>) -> anyhow::Result<Vec<BuiltSource>> {
    let enabled: Vec<(&str, &SourceConfig)> =
        config.sources.iter().filter(|(_, source)| source.common.enabled).map(|(n, s)| (n.as_str(), s)).collect();
    let services = SourceServices::new(tokens, &enabled);
    enabled
        .into_iter()
        .map(|(name, source)| {
            Ok(BuiltSource {
                name: name.to_owned(),
                config: source.clone(),
                source: build_source(name, source, &services)?,
            })
        })
        .collect()
}

/// The CRM sink; OAuth2 sinks keep their tokens in `tokens` (the state store).
#[cfg_attr(not(any(feature = "salesforce", feature = "dynamics", feature = "zoho")), allow(unused_variables))]
pub fn build_crm(config: &CrmConfig, tokens: Arc<dyn TokenStore>) -> anyhow::Result<Arc<dyn Crm>> {
    let http = HttpOptions {
        user_agent: user_agent(),
        timeout: config.common.timeout.0,
        requests_per_second: config.common.requests_per_second,
        ..HttpOptions::default()
    };
    let crm: Arc<dyn Crm> = match &config.kind {
        #[cfg(feature = "hubspot")]
        CrmKind::Hubspot(c) => {
            Arc::new(tributary_crm::hubspot::HubSpotCrm::new(c.clone(), http).context("cannot build the HubSpot CRM")?)
        }
        #[cfg(feature = "salesforce")]
        CrmKind::Salesforce(c) => Arc::new(
            tributary_crm::salesforce::SalesforceCrm::new(c.clone(), http)
                .context("cannot build the Salesforce CRM")?
                .with_token_store(tokens),
        ),
        #[cfg(feature = "pipedrive")]
        CrmKind::Pipedrive(c) => Arc::new(
            tributary_crm::pipedrive::PipedriveCrm::new(c.clone(), http).context("cannot build the Pipedrive CRM")?,
        ),
        #[cfg(feature = "twenty")]
        CrmKind::Twenty(c) => {
            Arc::new(tributary_crm::twenty::TwentyCrm::new(c.clone(), http).context("cannot build the Twenty CRM")?)
        }
        #[cfg(feature = "webhook")]
        CrmKind::Webhook(c) => {
            Arc::new(tributary_crm::webhook::WebhookCrm::new(c.clone(), http).context("cannot build the webhook sink")?)
        }
        #[cfg(feature = "dynamics")]
        CrmKind::Dynamics(c) => Arc::new(
            tributary_crm::dynamics::DynamicsCrm::new(c.clone(), http)
                .context("cannot build the Dynamics 365 CRM")?
                .with_token_store(tokens),
        ),
        #[cfg(feature = "zoho")]
        CrmKind::Zoho(c) => Arc::new(
            tributary_crm::zoho::ZohoCrm::new(c.clone(), http)
                .context("cannot build the Zoho CRM")?
                .with_token_store(tokens),
        ),
        #[cfg(feature = "bottlecrm")]
        CrmKind::Bottlecrm(c) => Arc::new(
            tributary_crm::bottlecrm::BottleCrm::new(c.clone(), http).context("cannot build the BottleCRM CRM")?,
        ),
        #[cfg(feature = "file")]
        CrmKind::File(c) => Arc::new(tributary_crm::file::FileCrm::new(c.clone()).context("cannot open the file CRM")?),
    };
    Ok(crm)
}

#[cfg(all(test, feature = "github", feature = "hackernews"))]
mod tests {
    use super::*;

    #[test]
    fn sources_on_one_credential_share_one_budget() {
        // SAFETY: only this test reads these variables.
        unsafe {
            std::env::set_var("REGISTRY_TEST_TOKEN_A", "a");
            std::env::set_var("REGISTRY_TEST_TOKEN_B", "b");
        }
        let text = r#"
[daemon]
state = "sqlite:///tmp/unused.db"
[crm]
type = "file"
path = "/tmp/unused.json"
[sources.one]
type = "github"
repos = ["acme/one"]
token = { env = "REGISTRY_TEST_TOKEN_A" }
schedule = "every 10m"
requests_per_second = 5
[sources.two]
type = "github"
repos = ["acme/two"]
token = { env = "REGISTRY_TEST_TOKEN_A" }
schedule = "every 10m"
requests_per_second = 2
[sources.three]
type = "github"
repos = ["acme/three"]
token = { env = "REGISTRY_TEST_TOKEN_B" }
schedule = "every 10m"
[sources.hn]
type = "hackernews"
terms = ["acme"]
schedule = "every 10m"
[sources.demo]
type = "demo"
schedule = "every 10m"
"#;
        let config = Config::parse(std::path::Path::new("test.toml"), text).expect("valid");
        let sources: Vec<(&str, &SourceConfig)> = config.sources.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let services = SourceServices::new(Arc::new(tributary_sdk::MemoryTokenStore::default()), &sources);
        let budget = |name: &str| services.budget(&config.sources[name].kind);
        let (one, two, three) = (budget("one").unwrap(), budget("two").unwrap(), budget("three").unwrap());
        assert!(one.same_as(&two), "one token, one budget");
        assert!(!one.same_as(&three), "another token, another budget");
        assert!(!one.same_as(&budget("hn").unwrap()));
        assert!(budget("demo").is_none(), "the demo source calls nothing");
    }
}
