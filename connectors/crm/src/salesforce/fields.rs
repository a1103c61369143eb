//! The custom fields Tributary creates in Salesforce and what it writes to
//! them: their Tooling API definitions, the Task's text, SOQL literals.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use tributary_sdk::Contribution;

/// The Contact field holding a person's identity: Tributary's upsert key.
pub(crate) const IDENTITY: &str = "Tributary_Identity__c";
/// The Task field holding a contribution's activity key: its upsert key.
pub(crate) const KEY: &str = "Tributary_Key__c";

/// Salesforce's sizes for the standard fields Tributary writes.
pub(crate) const LAST_NAME_MAX: usize = 80;
pub(crate) const SUBJECT_MAX: usize = 255;
pub(crate) const DESCRIPTION_MAX: usize = 32_000;
pub(crate) const TEXT_MAX: usize = 255;

/// How a custom field is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldKind {
    /// `Text` of this length.
    Text(u32),
    /// `Text`, External ID, unique (case-insensitive): an upsert key.
    ExternalId(u32),
    /// `Number` with (precision, scale).
    Number(u32, u32),
    DateTime,
    /// `Checkbox`, unchecked by default.
    Checkbox,
}

/// One custom field as `crm setup` creates it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldSpec {
    /// `Contact` or `Activity` (Task custom fields live on Activity).
    pub object: &'static str,
    /// API name, `__c` included.
    pub name: String,
    pub label: String,
    pub description: String,
    pub kind: FieldKind,
}

impl FieldSpec {
    fn new(object: &'static str, name: &str, label: &str, kind: FieldKind, description: &str) -> FieldSpec {
        FieldSpec { object, name: name.to_owned(), label: label.to_owned(), description: description.to_owned(), kind }
    }

    /// `Contact.Tributary_Identity__c`.
    pub fn full_name(&self) -> String {
        format!("{}.{}", self.object, self.name)
    }

    /// The body of `POST /tooling/sobjects/CustomField`.
    pub fn create_body(&self) -> Value {
        let mut metadata = json!({
            "label": self.label,
            "description": self.description,
        });
        match self.kind {
            FieldKind::Text(length) => {
                metadata["type"] = json!("Text");
                metadata["length"] = json!(length);
            }
            FieldKind::ExternalId(length) => {
                metadata["type"] = json!("Text");
                metadata["length"] = json!(length);
                metadata["externalId"] = json!(true);
                metadata["unique"] = json!(true);
                metadata["caseSensitive"] = json!(false);
            }
            FieldKind::Number(precision, scale) => {
                metadata["type"] = json!("Number");
                metadata["precision"] = json!(precision);
                metadata["scale"] = json!(scale);
            }
            FieldKind::DateTime => metadata["type"] = json!("DateTime"),
            FieldKind::Checkbox => {
                metadata["type"] = json!("Checkbox");
                // Required for a checkbox; the Metadata API takes it as text.
                metadata["defaultValue"] = json!("false");
            }
        }
        json!({ "FullName": self.full_name(), "Metadata": metadata })
    }
}

/// A platform name as part of a field name: ASCII letters and digits,
/// words joined by single `_`, each word capitalised, at most 20 characters
/// (`stack exchange` becomes `Stack_Exchange`).
pub(crate) fn platform_slug(platform: &str) -> String {
    let words: Vec<String> = platform
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect();
    let mut slug = words.join("_");
    slug.truncate(20);
    let slug = slug.trim_end_matches('_').to_owned();
    if slug.is_empty() { "Unknown".into() } else { slug }
}

/// The Contact field holding a person's handle on `platform`.
pub(crate) fn handle_field(platform: &str) -> String {
    format!("Tributary_{}_Handle__c", platform_slug(platform))
}

/// The Contact field holding the address of a person's profile on `platform`.
pub(crate) fn profile_field(platform: &str) -> String {
    format!("Tributary_{}_Profile__c", platform_slug(platform))
}

/// The Contact field holding when a person was first seen on `platform`.
/// (`Tributary_` + a slug of at most 20 + `_First` stays within Salesforce's
/// 40 characters for a field name.)
pub(crate) fn first_seen_field(platform: &str) -> String {
    format!("Tributary_{}_First__c", platform_slug(platform))
}

/// The Contact field holding when a person was last seen on `platform`.
pub(crate) fn last_seen_field(platform: &str) -> String {
    format!("Tributary_{}_Last__c", platform_slug(platform))
}

/// The Contact field holding how many contributions a person made on `platform`.
pub(crate) fn contributions_field(platform: &str) -> String {
    format!("Tributary_{}_Count__c", platform_slug(platform))
}

/// The Contact fields: identity, per platform handle and profile, rollups,
/// then per platform the rollup figures.
pub(crate) fn contact_fields(platforms: &[String]) -> Vec<FieldSpec> {
    use FieldKind::*;
    let mut fields = vec![FieldSpec::new(
        "Contact",
        IDENTITY,
        "Tributary Identity",
        ExternalId(255),
        "platform:user id (or email:address) of the person: Tributary's upsert key for contacts.",
    )];
    let mut slugs: Vec<(String, &str)> = platforms.iter().map(|p| (platform_slug(p), p.as_str())).collect();
    slugs.sort();
    slugs.dedup_by(|a, b| a.0 == b.0);
    for (_, platform) in &slugs {
        let platform = *platform;
        fields.push(FieldSpec::new(
            "Contact",
            &handle_field(platform),
            &format!("Handle on {platform}"),
            Text(255),
            &format!("The person's handle on {platform}, as Tributary saw it."),
        ));
        fields.push(FieldSpec::new(
            "Contact",
            &profile_field(platform),
            &format!("Profile on {platform}"),
            Text(255),
            &format!("Address of the person's profile on {platform}."),
        ));
    }
    fields.extend([
        FieldSpec::new(
            "Contact",
            "Tributary_Last_Contribution__c",
            "Last Community Contribution",
            DateTime,
            "When the person last posted in a community Tributary follows.",
        ),
        FieldSpec::new("Contact", "Tributary_Last_Platform__c", "Last Community Platform", Text(80), "Where."),
        FieldSpec::new(
            "Contact",
            "Tributary_Contribution_Count__c",
            "Community Contributions",
            Number(18, 0),
            "How many contributions Tributary delivered for this person.",
        ),
        FieldSpec::new(
            "Contact",
            "Tributary_Platforms__c",
            "Community Platforms",
            Text(255),
            "Every platform the person was seen on, separated by `;`.",
        ),
        FieldSpec::new(
            "Contact",
            "Tributary_Sentiment__c",
            "Community Sentiment",
            Number(4, 3),
            "Mean sentiment of the person's contributions, from -1 (negative) to 1 (positive).",
        ),
        FieldSpec::new("Contact", "Tributary_Questions__c", "Community Questions", Number(18, 0), "Questions."),
        FieldSpec::new("Contact", "Tributary_Complaints__c", "Community Complaints", Number(18, 0), "Complaints."),
        FieldSpec::new("Contact", "Tributary_Ideas__c", "Community Ideas", Number(18, 0), "Ideas."),
        FieldSpec::new("Contact", "Tributary_Praise__c", "Community Praise", Number(18, 0), "Praise."),
        FieldSpec::new(
            "Contact",
            "Tributary_Last_Url__c",
            "Last Contribution URL",
            Text(255),
            "Link to the person's last contribution (empty when longer than the field).",
        ),
        FieldSpec::new(
            "Contact",
            "Tributary_Last_Excerpt__c",
            "Last Contribution Excerpt",
            Text(255),
            "The start of the person's last contribution, on one line.",
        ),
        FieldSpec::new(
            "Contact",
            "Tributary_Contributions_90d__c",
            "Community Contributions (90 Days)",
            Number(18, 0),
            "How many contributions the person made in the last 90 days.",
        ),
        FieldSpec::new(
            "Contact",
            "Tributary_Sentiment_90d__c",
            "Community Sentiment (90 Days)",
            Number(4, 3),
            "Mean sentiment of the last 90 days' contributions, from -1 to 1; empty when none was scored.",
        ),
        FieldSpec::new(
            "Contact",
            "Tributary_Needs_Attention__c",
            "Needs Attention",
            Checkbox,
            "An unresolved complaint or a sharp drop in sentiment: someone should look at this person.",
        ),
        FieldSpec::new(
            "Contact",
            "Tributary_Attention_Reason__c",
            "Attention Reason",
            Text(255),
            "Why the person needs attention, in words.",
        ),
    ]);
    for (_, platform) in &slugs {
        let platform = *platform;
        fields.push(FieldSpec::new(
            "Contact",
            &first_seen_field(platform),
            &format!("First Seen on {platform}"),
            DateTime,
            &format!("When the person's first contribution on {platform} was posted."),
        ));
        fields.push(FieldSpec::new(
            "Contact",
            &last_seen_field(platform),
            &format!("Last Seen on {platform}"),
            DateTime,
            &format!("When the person's last contribution on {platform} was posted."),
        ));
        fields.push(FieldSpec::new(
            "Contact",
            &contributions_field(platform),
            &format!("Contributions on {platform}"),
            Number(18, 0),
            &format!("How many contributions Tributary delivered for the person from {platform}."),
        ));
    }
    fields
}

/// The Task fields (defined on Activity): the key and the signals.
pub(crate) fn task_fields() -> Vec<FieldSpec> {
    use FieldKind::*;
    vec![
        FieldSpec::new(
            "Activity",
            KEY,
            "Tributary Key",
            ExternalId(64),
            "Deterministic key of the contribution: Tributary's upsert key for tasks.",
        ),
        FieldSpec::new("Activity", "Tributary_Platform__c", "Community Platform", Text(80), "Where it was posted."),
        FieldSpec::new("Activity", "Tributary_Url__c", "Contribution URL", Text(255), "Link to the contribution."),
        FieldSpec::new("Activity", "Tributary_Intent__c", "Intent", Text(40), "What the author wants."),
        FieldSpec::new("Activity", "Tributary_Sentiment__c", "Sentiment", Number(4, 3), "From -1 to 1."),
    ]
}

/// At most `max` characters of `text` (Salesforce counts characters).
pub(crate) fn cap(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text.to_owned(),
    }
}

pub(crate) use tributary_sdk::text::one_line;

/// A `DateTime` field value.
pub(crate) fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A number field value rounded to three decimals; `None` for NaN or infinities.
pub(crate) fn sentiment(value: f64) -> Option<f64> {
    value.is_finite().then(|| (value.clamp(-1.0, 1.0) * 1000.0).round() / 1000.0)
}

/// A SOQL string literal, quotes and backslashes escaped.
pub(crate) fn soql_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The URL when it is an absolute http(s) URL.
pub(crate) fn web_link(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

/// The Task's Subject: the title, or `<platform> <kind>`.
pub(crate) fn subject(contribution: &Contribution) -> String {
    let title = contribution.title.as_deref().map(str::trim).filter(|t| !t.is_empty());
    let subject = match title {
        Some(title) => title.to_owned(),
        None => format!("{} {}", contribution.platform, contribution.kind.as_str()),
    };
    cap(&subject.replace(['\r', '\n'], " "), SUBJECT_MAX)
}

/// The Task's Description: plain text (Salesforce shows it as is), the
/// link and the signals at the end, cut to the field's size.
pub(crate) fn description(contribution: &Contribution) -> String {
    let mut tail = String::new();
    if let Some(url) = contribution.url.as_deref().and_then(web_link) {
        tail.push_str(&format!("\n\n{url}"));
    }
    let mut signals = vec![contribution.platform.clone(), contribution.kind.as_str().to_owned()];
    if let Some(found) = &contribution.signals {
        signals.push(format!("intent: {}", found.intent.as_str()));
        if let Some(value) = sentiment(found.sentiment) {
            signals.push(format!("sentiment: {value}"));
        }
    }
    if contribution.deleted {
        signals.push("deleted".into());
    }
    if contribution.edited {
        signals.push("edited".into());
    }
    tail.push_str(&format!("\n{}", signals.join(" · ")));
    let budget = DESCRIPTION_MAX.saturating_sub(tail.chars().count() + 1);
    let mut body = contribution.body.trim().to_owned();
    if body.chars().count() > budget {
        body = cap(&body, budget.saturating_sub(1)) + "…";
    }
    body + &tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_literals_and_text() {
        for (platform, slug) in [
            ("discourse", "Discourse"),
            ("Stack Exchange", "Stack_Exchange"),
            ("hacker--news", "Hacker_News"),
            ("", "Unknown"),
            ("a_very_long_platform_name_indeed", "A_Very_Long_Platform"),
        ] {
            assert_eq!(platform_slug(platform), slug, "{platform:?}");
        }
        assert_eq!(handle_field("github"), "Tributary_Github_Handle__c");
        assert_eq!(soql_literal("o'brien\\x@y.io"), "'o\\'brien\\\\x@y.io'");
        assert_eq!(cap("héllo", 2), "hé");
        let body = contact_fields(&[])[0].create_body();
        assert_eq!(body["FullName"], "Contact.Tributary_Identity__c");
        assert_eq!(body["Metadata"]["externalId"], true);
        assert_eq!(task_fields()[0].full_name(), "Activity.Tributary_Key__c");
        let long = Contribution { body: "x".repeat(40_000), ..Contribution::sample() };
        let text = description(&long);
        assert!(text.chars().count() <= DESCRIPTION_MAX && text.ends_with("intent: question · sentiment: 0.25"));
        assert_eq!(subject(&Contribution { title: None, ..Contribution::sample() }), "discourse post");
        assert_eq!(one_line(" a\n\tb\r\n  c ", 10), "a b c");
        assert_eq!(one_line("abcdef ghij", 6), "abcde…");
    }

    #[test]
    fn every_field_name_fits_salesforce() {
        let longest = "a_very_long_platform_name_indeed".to_owned();
        let fields = contact_fields(&[longest.clone(), "x".into()]);
        for field in fields.iter().chain(&task_fields()) {
            let name = field.name.trim_end_matches("__c");
            assert!(name.len() <= 40, "{name} is {} characters", name.len());
            assert!(!name.contains("__") && !name.ends_with('_'), "{name}");
        }
        assert_eq!(first_seen_field(&longest), "Tributary_A_Very_Long_Platform_First__c");
        assert_eq!(contributions_field("GitHub"), "Tributary_Github_Count__c");
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names.iter().filter(|n| n.ends_with("_Last__c")).count(), 2);
        let attention = fields.iter().find(|f| f.name == "Tributary_Needs_Attention__c").unwrap();
        assert_eq!(
            attention.create_body()["Metadata"],
            json!({ "type": "Checkbox", "defaultValue": "false", "label": "Needs Attention",
                    "description": attention.description })
        );
    }
}
