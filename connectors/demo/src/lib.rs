//! The demo source: a deterministic stream of realistic contributions from a
//! handful of personas active on several platforms. It needs no account and
//! no network, and feeds the quick start.
//!
//! The same seed always gives the same stream, item for item, so a demo run
//! (and a test) can be reproduced exactly.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use tributary_sdk::{Author, Contribution, Cursor, Kind, Page, PollRequest, Source, SourceError};

/// Settings of the demo source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// Seed of the stream; the same seed gives the same contributions.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Contributions returned by one page.
    #[serde(default = "default_per_page")]
    pub per_page: usize,
    /// Stop after this many contributions; 0 means never stop.
    #[serde(default = "default_total")]
    pub total: u64,
    /// Page on within one poll until `total` is reached, instead of one
    /// page per scheduled poll (for load tests and backfills).
    #[serde(default)]
    pub drain: bool,
}

fn default_seed() -> u64 {
    42
}
fn default_per_page() -> usize {
    20
}
fn default_total() -> u64 {
    200
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig { seed: default_seed(), per_page: default_per_page(), total: default_total(), drain: false }
    }
}

/// The platforms the demo's contributions claim to come from.
pub const PLATFORMS: &[&str] = &["demo-forum", "demo-social", "demo-support"];

struct Persona {
    id: &'static str,
    name: &'static str,
    /// (platform, handle, e-mail the platform gives)
    accounts: &'static [(&'static str, &'static str, Option<&'static str>)],
}

/// Maya uses the same e-mail on the forum and in support; "rustacean_42" is
/// known only by a handle; Priya is in support by e-mail and on social by handle.
const PERSONAS: &[Persona] = &[
    Persona {
        id: "maya",
        name: "Maya Chen",
        accounts: &[
            ("forum", "mayac", Some("maya.chen@example.com")),
            ("support", "maya.chen@example.com", Some("maya.chen@example.com")),
        ],
    },
    Persona { id: "rustacean", name: "rustacean_42", accounts: &[("social", "rustacean_42", None)] },
    Persona {
        id: "priya",
        name: "Priya Natarajan",
        accounts: &[("support", "priya@acme.example", Some("priya@acme.example")), ("social", "priya_builds", None)],
    },
    Persona { id: "jonas", name: "Jonas Weber", accounts: &[("forum", "jweber", Some("jonas.weber@example.org"))] },
    Persona { id: "lea", name: "Léa Martin", accounts: &[("forum", "lea_m", None), ("social", "leamartin", None)] },
];

/// (intent of the text, title, body): a mix of questions, complaints, ideas and praise.
const TEXTS: &[(&str, &str, &str)] = &[
    (
        "question",
        "How do I export my dashboards?",
        "Is there a way to export dashboards to PDF? I looked in settings but can't find it.",
    ),
    ("question", "SSO with Okta", "Does the Team plan support SAML SSO with Okta, or do we need Enterprise?"),
    (
        "question",
        "API pagination",
        "How does pagination work on the /events endpoint? I only ever get the first 100 items.",
    ),
    (
        "complaint",
        "Sync keeps failing",
        "The nightly sync has failed three times this week with a timeout. This is really frustrating, our reports are broken.",
    ),
    (
        "complaint",
        "Billing charged twice",
        "I was charged twice for November. Terrible experience, please refund the duplicate charge.",
    ),
    (
        "complaint",
        "Mobile app crashes",
        "The mobile app crashes every time I open a shared board. It's unusable on Android right now.",
    ),
    (
        "idea",
        "Feature request: dark mode",
        "It would be great to have a dark mode for the editor. Maybe follow the OS setting?",
    ),
    (
        "idea",
        "Suggestion: webhooks for comments",
        "Please add webhooks for new comments so we can route them to Slack. Would be nice to filter by project too.",
    ),
    (
        "idea",
        "Idea: bulk edit tags",
        "Feature request: let us bulk edit tags on many items at once instead of one by one.",
    ),
    ("praise", "Love the new editor", "Just wanted to say the new editor is fantastic. Thanks to the team, great job!"),
    (
        "praise",
        "Support was amazing",
        "Huge thanks to support for fixing our import in under an hour. Awesome service.",
    ),
    ("other", "Meetup in Berlin", "We're hosting a user meetup in Berlin next month, details on the events page."),
];

/// A small, stable PRNG (splitmix64): the stream must not change when a
/// dependency's generator does.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[derive(Debug, Serialize, Deserialize)]
struct DemoCursor {
    next: u64,
}

pub struct DemoSource {
    instance: String,
    config: DemoConfig,
    epoch: DateTime<Utc>,
}

impl DemoSource {
    pub fn new(instance: &str, config: DemoConfig) -> DemoSource {
        // A fixed epoch keeps the stream reproducible run after run.
        let epoch = DateTime::from_timestamp(1_767_600_000, 0).unwrap_or_default();
        DemoSource { instance: instance.to_owned(), config, epoch }
    }

    /// The contribution at position `index` of the stream.
    pub fn contribution(&self, index: u64) -> Contribution {
        let r = mix(self.config.seed ^ mix(index));
        let persona = &PERSONAS[(r % PERSONAS.len() as u64) as usize];
        let (platform, handle, email) = persona.accounts[((r >> 8) % persona.accounts.len() as u64) as usize];
        let (_, title, body) = TEXTS[((r >> 16) % TEXTS.len() as u64) as usize];
        let created_at = self.epoch + Duration::minutes(17 * index as i64);
        let (kind, title) = match platform {
            "support" => (Kind::Ticket, Some(title.to_owned())),
            "social" => (Kind::Mention, None),
            _ if (r >> 24).is_multiple_of(3) => (Kind::Reply, Some(format!("Re: {title}"))),
            _ => (Kind::Post, Some(title.to_owned())),
        };
        Contribution {
            platform: format!("demo-{platform}"),
            source: self.instance.clone(),
            external_id: format!("{}-{index}", self.config.seed),
            url: Some(format!("https://{platform}.demo.invalid/items/{index}")),
            kind,
            author: Author {
                id: format!("{}-{}", persona.id, platform),
                handle: Some(handle.to_owned()),
                display_name: Some(persona.name.to_owned()),
                email: email.map(str::to_owned),
                profile_url: Some(format!("https://{platform}.demo.invalid/u/{handle}")),
                links: Vec::new(),
            },
            title,
            body: body.to_owned(),
            language: None,
            created_at,
            updated_at: None,
            parent_id: None,
            thread_id: Some(format!("thread-{}", (r >> 32) % 40)),
            tags: vec![],
            score: Some(((r >> 40) % 25) as f64),
            edited: false,
            deleted: false,
            signals: None,
        }
    }
}

#[async_trait]
impl Source for DemoSource {
    fn platform(&self) -> &'static str {
        "demo"
    }

    async fn poll(&self, request: &PollRequest) -> Result<Page, SourceError> {
        let start = request.cursor.as_ref().and_then(|c| c.to_json::<DemoCursor>()).map_or(0, |c| c.next);
        let end = match self.config.total {
            0 => start + self.config.per_page as u64,
            total => (start + self.config.per_page as u64).min(total),
        };
        let contributions = (start..end).map(|index| self.contribution(index)).collect();
        let finished = self.config.total != 0 && end >= self.config.total;
        Ok(Page {
            contributions,
            quarantined: vec![],
            next_cursor: Some(Cursor::from_json(&DemoCursor { next: end })),
            has_more: self.config.drain && !finished,
        })
    }

    async fn check(&self) -> Result<(), SourceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_deterministic_and_mixes_personas_platforms_and_intents() {
        let a = DemoSource::new("demo", DemoConfig::default());
        let b = DemoSource::new("demo", DemoConfig::default());
        let other_seed = DemoSource::new("demo", DemoConfig { seed: 7, ..DemoConfig::default() });
        let stream: Vec<_> = (0..200).map(|i| a.contribution(i)).collect();
        assert_eq!(stream, (0..200).map(|i| b.contribution(i)).collect::<Vec<_>>());
        assert_ne!(stream[0..10], (0..10).map(|i| other_seed.contribution(i)).collect::<Vec<_>>()[..]);

        let platforms: std::collections::BTreeSet<_> = stream.iter().map(|c| c.platform.as_str()).collect();
        assert_eq!(platforms.into_iter().collect::<Vec<_>>(), PLATFORMS);
        let maya_platforms: std::collections::BTreeSet<_> = stream
            .iter()
            .filter(|c| c.author.email.as_deref() == Some("maya.chen@example.com"))
            .map(|c| c.platform.as_str())
            .collect();
        assert_eq!(maya_platforms.len(), 2, "Maya must appear with one e-mail on two platforms");
        assert!(stream.iter().any(|c| c.author.handle.as_deref() == Some("rustacean_42") && c.author.email.is_none()));
        let ids: std::collections::BTreeSet<_> = stream.iter().map(|c| c.key()).collect();
        assert_eq!(ids.len(), 200);
    }

    #[tokio::test]
    async fn pages_follow_the_cursor_and_stop_at_total() {
        let source =
            DemoSource::new("demo", DemoConfig { per_page: 30, total: 50, drain: true, ..DemoConfig::default() });
        let first = source.poll(&PollRequest::default()).await.unwrap();
        assert_eq!(first.contributions.len(), 30);
        assert!(first.has_more);
        let second = source.poll(&PollRequest { cursor: first.next_cursor.clone(), since: None }).await.unwrap();
        assert_eq!(second.contributions.len(), 20);
        assert!(!second.has_more);
        assert_eq!(second.contributions[0], source.contribution(30));
        let third = source.poll(&PollRequest { cursor: second.next_cursor, since: None }).await.unwrap();
        assert!(third.contributions.is_empty());
    }
}
