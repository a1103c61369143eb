//! Builds the configured components: the only place that maps a config
//! `type` to a connector crate.

use std::sync::Arc;

#[allow(unused_imports)] // unused in builds without any HTTP connector
use anyhow::Context;
use tributary_sdk::{Crm, HttpOptions, Source};

use crate::config::{Config, CrmConfig, CrmKind, SourceConfig, SourceKind};

/// A built source with its settings.
pub struct BuiltSource {
    pub name: String,
    pub config: SourceConfig,
    pub source: Arc<dyn Source>,
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
        feature = "youtube"
    )),
    allow(unused_variables)
)]
pub fn build_source(name: &str, config: &SourceConfig) -> anyhow::Result<Arc<dyn Source>> {
    let http = HttpOptions {
        user_agent: user_agent(),
        timeout: config.common.timeout.0,
        requests_per_second: config.common.requests_per_second,
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
                .with_context(|| format!("cannot build source `{name}`"))?,
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
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "stackexchange")]
        SourceKind::Stackexchange(c) => Arc::new(
            tributary_social::stackexchange::StackExchangeSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "x")]
        SourceKind::X(c) => Arc::new(
            tributary_social::x::XSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        #[cfg(feature = "youtube")]
        SourceKind::Youtube(c) => Arc::new(
            tributary_social::youtube::YoutubeSource::new(name, c.clone(), http)
                .with_context(|| format!("cannot build source `{name}`"))?,
        ),
        SourceKind::Demo(c) => Arc::new(tributary_demo::DemoSource::new(name, c.clone())),
    };
    Ok(source)
}

pub fn build_sources(config: &Config) -> anyhow::Result<Vec<BuiltSource>> {
    config
        .sources
        .iter()
        .filter(|(_, source)| source.common.enabled)
        .map(|(name, source)| {
            Ok(BuiltSource { name: name.clone(), config: source.clone(), source: build_source(name, source)? })
        })
        .collect()
}

#[cfg_attr(not(feature = "hubspot"), allow(unused_variables))]
pub fn build_crm(config: &CrmConfig) -> anyhow::Result<Arc<dyn Crm>> {
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
        #[cfg(feature = "file")]
        CrmKind::File(c) => Arc::new(tributary_crm::file::FileCrm::new(c.clone()).context("cannot open the file CRM")?),
    };
    Ok(crm)
}
