//! The custom properties Tributary creates in HubSpot and writes to.
//!
//! Every name starts with the configured prefix (`tributary_` by default),
//! and all of them live in one property group per object named after the
//! prefix, so an administrator sees at a glance what Tributary owns.

use serde_json::{Value, json};

/// How HubSpot stores and shows a property: (`type`, `fieldType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PropertyKind {
    /// `string` / `text`
    Text,
    /// `number` / `number`
    Number,
    /// `datetime` / `date`: ISO 8601 or epoch milliseconds.
    DateTime,
    /// `enumeration` / `select` with fixed options.
    Select(&'static [&'static str]),
    /// `bool` / `booleancheckbox`, valued `true` or `false` (HubSpot's
    /// Yes/No property).
    Bool,
}

/// The intents of `tributary_sdk::Intent`, as written to notes.
pub(crate) const INTENTS: &[&str] = &["question", "complaint", "idea", "praise", "other"];

/// One custom property as `crm setup` creates it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PropertySpec {
    /// The full internal name, prefix included.
    pub name: String,
    pub label: String,
    pub description: String,
    pub kind: PropertyKind,
    /// `hasUniqueValue`: the property can serve as an upsert `idProperty`.
    pub unique: bool,
}

impl PropertySpec {
    fn new(prefix: &str, name: &str, label: &str, kind: PropertyKind, description: &str) -> Self {
        PropertySpec {
            name: format!("{prefix}{name}"),
            label: label.to_owned(),
            description: description.to_owned(),
            kind,
            unique: false,
        }
    }

    fn unique(mut self) -> Self {
        self.unique = true;
        self
    }

    /// The `PropertyCreate` body of `POST /crm/v3/properties/{objectType}`.
    pub fn create_body(&self, group: &str) -> Value {
        let (data_type, field_type) = match self.kind {
            PropertyKind::Text => ("string", "text"),
            PropertyKind::Number => ("number", "number"),
            PropertyKind::DateTime => ("datetime", "date"),
            PropertyKind::Select(_) => ("enumeration", "select"),
            PropertyKind::Bool => ("bool", "booleancheckbox"),
        };
        let mut body = json!({
            "name": self.name,
            "label": self.label,
            "description": self.description,
            "groupName": group,
            "type": data_type,
            "fieldType": field_type,
            "formField": false,
        });
        if self.unique {
            body["hasUniqueValue"] = json!(true);
        }
        if let PropertyKind::Select(options) = self.kind {
            body["options"] = options
                .iter()
                .enumerate()
                .map(|(order, value)| {
                    json!({
                        "label": capitalise(value),
                        "value": value,
                        "hidden": false,
                        "displayOrder": order,
                    })
                })
                .collect();
        }
        if self.kind == PropertyKind::Bool {
            // The two values HubSpot stores for a Yes/No property; older
            // accounts expect them spelled out.
            body["options"] = json!([
                { "label": "Yes", "value": "true", "hidden": false, "displayOrder": 0 },
                { "label": "No", "value": "false", "hidden": false, "displayOrder": 1 },
            ]);
        }
        body
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A platform name as it may appear in a property name: lowercase ASCII
/// letters, digits and `_` (`Stack Exchange` becomes `stack_exchange`).
pub(crate) fn platform_slug(platform: &str) -> String {
    let slug: String =
        platform.trim().chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    if slug.is_empty() { "unknown".into() } else { slug }
}

/// The contact property holding a person's handle on `platform`.
pub(crate) fn handle_property(prefix: &str, platform: &str) -> String {
    format!("{prefix}handle_{}", platform_slug(platform))
}

/// The contact property holding a person's account id on `platform`.
pub(crate) fn user_id_property(prefix: &str, platform: &str) -> String {
    format!("{prefix}user_id_{}", platform_slug(platform))
}

/// The contact property holding the address of a person's profile on `platform`.
pub(crate) fn profile_property(prefix: &str, platform: &str) -> String {
    format!("{prefix}profile_{}", platform_slug(platform))
}

/// The contact property holding when a person was first seen on `platform`.
pub(crate) fn first_seen_property(prefix: &str, platform: &str) -> String {
    format!("{prefix}first_seen_{}", platform_slug(platform))
}

/// The contact property holding when a person was last seen on `platform`.
pub(crate) fn last_seen_property(prefix: &str, platform: &str) -> String {
    format!("{prefix}last_seen_{}", platform_slug(platform))
}

/// The contact property holding how many contributions a person made on `platform`.
pub(crate) fn contributions_property(prefix: &str, platform: &str) -> String {
    format!("{prefix}contributions_{}", platform_slug(platform))
}

/// The contact properties: identity, per platform the handle, account id
/// and profile address, rollups, then per platform the rollup figures.
pub(crate) fn contact_properties(prefix: &str, platforms: &[String]) -> Vec<PropertySpec> {
    use PropertyKind::*;
    let mut properties = vec![
        PropertySpec::new(
            prefix,
            "identity",
            "Tributary identity",
            Text,
            "platform:user id of a person known only by a handle; Tributary's upsert key for contacts without e-mail.",
        )
        .unique(),
    ];
    let mut slugs: Vec<(String, &str)> =
        platforms.iter().map(|platform| (platform_slug(platform), platform.as_str())).collect();
    slugs.sort();
    slugs.dedup_by(|a, b| a.0 == b.0);
    for (slug, platform) in &slugs {
        properties.push(PropertySpec::new(
            prefix,
            &format!("handle_{slug}"),
            &format!("Handle on {platform}"),
            Text,
            &format!("The person's handle on {platform}, as Tributary saw it."),
        ));
        properties.push(PropertySpec::new(
            prefix,
            &format!("user_id_{slug}"),
            &format!("User id on {platform}"),
            Text,
            &format!("The person's account id on {platform}: what identity resolution links on."),
        ));
        properties.push(PropertySpec::new(
            prefix,
            &format!("profile_{slug}"),
            &format!("Profile on {platform}"),
            Text,
            &format!("Address of the person's profile on {platform}."),
        ));
    }
    properties.extend([
        PropertySpec::new(
            prefix,
            "last_contribution_at",
            "Last community contribution",
            DateTime,
            "When the person last posted in a community Tributary follows.",
        ),
        PropertySpec::new(prefix, "last_platform", "Last community platform", Text, "Where the person last posted."),
        PropertySpec::new(
            prefix,
            "contribution_count",
            "Community contributions",
            Number,
            "How many contributions Tributary delivered for this person.",
        ),
        PropertySpec::new(
            prefix,
            "platforms",
            "Community platforms",
            Text,
            "Every platform the person was seen on, separated by `;`.",
        ),
        PropertySpec::new(
            prefix,
            "sentiment_avg",
            "Average community sentiment",
            Number,
            "Mean sentiment of the person's contributions, from -1 (negative) to 1 (positive).",
        ),
        PropertySpec::new(prefix, "questions", "Community questions", Number, "Contributions read as questions."),
        PropertySpec::new(prefix, "complaints", "Community complaints", Number, "Contributions read as complaints."),
        PropertySpec::new(
            prefix,
            "ideas",
            "Community ideas",
            Number,
            "Contributions read as ideas or feature requests.",
        ),
        PropertySpec::new(prefix, "praise", "Community praise", Number, "Contributions read as praise."),
        PropertySpec::new(prefix, "last_url", "Last contribution URL", Text, "Link to the person's last contribution."),
        PropertySpec::new(
            prefix,
            "last_excerpt",
            "Last contribution excerpt",
            Text,
            "The start of the person's last contribution.",
        ),
        PropertySpec::new(
            prefix,
            "contributions_90d",
            "Community contributions (90 days)",
            Number,
            "How many contributions the person made in the last 90 days.",
        ),
        PropertySpec::new(
            prefix,
            "sentiment_90d",
            "Community sentiment (90 days)",
            Number,
            "Mean sentiment of the last 90 days' contributions, from -1 to 1; empty when none was scored.",
        ),
        PropertySpec::new(
            prefix,
            "needs_attention",
            "Needs attention",
            Bool,
            "An unresolved complaint or a sharp drop in sentiment: someone should look at this person.",
        ),
        PropertySpec::new(
            prefix,
            "attention_reason",
            "Attention reason",
            Text,
            "Why the person needs attention, in words.",
        ),
    ]);
    for (slug, platform) in &slugs {
        properties.push(PropertySpec::new(
            prefix,
            &format!("first_seen_{slug}"),
            &format!("First seen on {platform}"),
            DateTime,
            &format!("When the person's first contribution on {platform} was posted."),
        ));
        properties.push(PropertySpec::new(
            prefix,
            &format!("last_seen_{slug}"),
            &format!("Last seen on {platform}"),
            DateTime,
            &format!("When the person's last contribution on {platform} was posted."),
        ));
        properties.push(PropertySpec::new(
            prefix,
            &format!("contributions_{slug}"),
            &format!("Contributions on {platform}"),
            Number,
            &format!("How many contributions Tributary delivered for the person from {platform}."),
        ));
    }
    properties
}

/// The note properties: the activity key and the contribution's signals.
pub(crate) fn note_properties(prefix: &str) -> Vec<PropertySpec> {
    use PropertyKind::*;
    vec![
        PropertySpec::new(
            prefix,
            "key",
            "Tributary key",
            Text,
            "Deterministic key of the contribution; Tributary's upsert key for notes.",
        )
        .unique(),
        PropertySpec::new(
            prefix,
            "platform",
            "Community platform",
            Text,
            "The platform the contribution was posted on.",
        ),
        PropertySpec::new(
            prefix,
            "intent",
            "Intent",
            Select(INTENTS),
            "What the author wants, as far as Tributary's rules can tell.",
        ),
        PropertySpec::new(
            prefix,
            "sentiment",
            "Sentiment",
            Number,
            "Sentiment of the contribution, from -1 (negative) to 1 (positive).",
        ),
        PropertySpec::new(prefix, "url", "Contribution URL", Text, "Link to the contribution on its platform."),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_names() {
        for (platform, slug) in [
            ("discourse", "discourse"),
            ("Stack Exchange", "stack_exchange"),
            ("hacker-news", "hacker_news"),
            ("", "unknown"),
        ] {
            assert_eq!(platform_slug(platform), slug, "{platform:?}");
        }
        assert_eq!(handle_property("tributary_", "GitHub"), "tributary_handle_github");
    }

    #[test]
    fn definitions_have_the_types_hubspot_expects() {
        let contacts = contact_properties("t_", &["forum".into(), "Forum".into(), "social".into()]);
        let names: Vec<&str> = contacts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            &names[..7],
            [
                "t_identity",
                "t_handle_forum",
                "t_user_id_forum",
                "t_profile_forum",
                "t_handle_social",
                "t_user_id_social",
                "t_profile_social"
            ]
        );
        assert!(contacts[0].unique);
        let at = contacts.iter().find(|p| p.name == "t_last_contribution_at").unwrap();
        let body = at.create_body("t");
        assert_eq!((body["type"].as_str(), body["fieldType"].as_str()), (Some("datetime"), Some("date")));
        let attention = contacts.iter().find(|p| p.name == "t_needs_attention").unwrap();
        let body = attention.create_body("t");
        assert_eq!((body["type"].as_str(), body["fieldType"].as_str()), (Some("bool"), Some("booleancheckbox")));
        assert_eq!(body["options"][0]["value"], "true");
        assert_eq!(body["options"][1]["value"], "false");
        // Per-platform figures come after the global ones, once per slug.
        let tail: Vec<&str> = names[names.len() - 6..].to_vec();
        assert_eq!(
            tail,
            [
                "t_first_seen_forum",
                "t_last_seen_forum",
                "t_contributions_forum",
                "t_first_seen_social",
                "t_last_seen_social",
                "t_contributions_social"
            ]
        );
        assert_eq!(first_seen_property("t_", "Forum"), "t_first_seen_forum");
        assert_eq!(last_seen_property("t_", "Stack Exchange"), "t_last_seen_stack_exchange");
        assert_eq!(contributions_property("t_", "x"), "t_contributions_x");
        let intent = note_properties("t_").into_iter().find(|p| p.name == "t_intent").unwrap();
        let body = intent.create_body("t");
        assert_eq!(body["options"].as_array().unwrap().len(), 5);
        assert_eq!(body["options"][0]["label"], "Question");
    }
}
