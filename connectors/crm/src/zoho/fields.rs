//! The custom Contact fields Tributary creates in Zoho CRM and what it
//! writes: their `settings/fields` definitions, the rollup values, a note's
//! title and plain-text content with its key marker.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tributary_sdk::{Contribution, Rollup};

/// The Contact field holding a person's identity: the duplicate check
/// field of people without an e-mail (unique).
pub(crate) const IDENTITY: &str = "Tributary_Identity";

/// Zoho's sizes for the fields Tributary writes.
pub(crate) const LAST_NAME_MAX: usize = 80;
pub(crate) const TEXT_MAX: usize = 255;
const TITLE_MAX: usize = 120;
const CONTENT_MAX: usize = 30_000;

/// How a custom field is stored (Zoho's `data_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldKind {
    /// `text` of this length.
    Text(u32),
    /// `text`, unique (case-insensitive): a duplicate check field.
    Unique(u32),
    /// `integer`.
    Integer,
    /// `double` (Decimal) with this many decimals.
    Decimal(u32),
    /// `datetime`.
    DateTime,
    /// `boolean` (a checkbox).
    Boolean,
}

/// One custom field as `crm setup` creates it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldSpec {
    /// The API name Zoho derives from the label.
    pub api_name: String,
    pub kind: FieldKind,
}

impl FieldSpec {
    fn new(api_name: &str, kind: FieldKind) -> FieldSpec {
        FieldSpec { api_name: api_name.to_owned(), kind }
    }

    /// The label: the API name with spaces, which Zoho turns back into it.
    pub fn label(&self) -> String {
        self.api_name.replace('_', " ")
    }

    /// One item of `POST /crm/v8/settings/fields` (`fields[]`).
    pub fn create_body(&self) -> Value {
        let mut field = json!({ "field_label": self.label() });
        match self.kind {
            FieldKind::Text(length) => {
                field["data_type"] = json!("text");
                field["length"] = json!(length);
            }
            FieldKind::Unique(length) => {
                field["data_type"] = json!("text");
                field["length"] = json!(length);
                field["unique"] = json!({ "casesensitive": "false" });
            }
            FieldKind::Integer => {
                field["data_type"] = json!("integer");
                field["length"] = json!(9);
            }
            FieldKind::Decimal(places) => {
                field["data_type"] = json!("double");
                field["length"] = json!(16);
                field["decimal_place"] = json!(places);
            }
            FieldKind::DateTime => field["data_type"] = json!("datetime"),
            FieldKind::Boolean => field["data_type"] = json!("boolean"),
        }
        field
    }
}

/// A platform name as part of a field name: ASCII letters and digits,
/// words joined by `_`, each capitalised, at most 20 characters.
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
    format!("Tributary_{}_Handle", platform_slug(platform))
}

/// The Contact field holding the address of a person's profile on `platform`.
pub(crate) fn profile_field(platform: &str) -> String {
    format!("Tributary_{}_Profile", platform_slug(platform))
}

/// The Contact field holding when a person was first seen on `platform`.
pub(crate) fn first_seen_field(platform: &str) -> String {
    format!("Tributary_{}_First_Seen", platform_slug(platform))
}

/// The Contact field holding when a person was last seen on `platform`.
pub(crate) fn last_seen_field(platform: &str) -> String {
    format!("Tributary_{}_Last_Seen", platform_slug(platform))
}

/// The Contact field holding how many contributions a person made on `platform`.
pub(crate) fn contributions_field(platform: &str) -> String {
    format!("Tributary_{}_Contributions", platform_slug(platform))
}

/// The Contact fields: identity, per platform handle and profile, rollups,
/// then per platform the rollup figures.
pub(crate) fn contact_fields(platforms: &[String]) -> Vec<FieldSpec> {
    use FieldKind::*;
    let mut fields = vec![FieldSpec::new(IDENTITY, Unique(255))];
    let mut slugs: Vec<(String, &str)> = platforms.iter().map(|p| (platform_slug(p), p.as_str())).collect();
    slugs.sort();
    slugs.dedup_by(|a, b| a.0 == b.0);
    for (_, platform) in &slugs {
        fields.push(FieldSpec::new(&handle_field(platform), Text(255)));
        fields.push(FieldSpec::new(&profile_field(platform), Text(255)));
    }
    fields.extend([
        FieldSpec::new("Tributary_Last_Contribution", DateTime),
        FieldSpec::new("Tributary_Last_Platform", Text(80)),
        FieldSpec::new("Tributary_Contribution_Count", Integer),
        FieldSpec::new("Tributary_Platforms", Text(255)),
        FieldSpec::new("Tributary_Sentiment", Decimal(3)),
        FieldSpec::new("Tributary_Questions", Integer),
        FieldSpec::new("Tributary_Complaints", Integer),
        FieldSpec::new("Tributary_Ideas", Integer),
        FieldSpec::new("Tributary_Praise", Integer),
        FieldSpec::new("Tributary_Last_Url", Text(255)),
        FieldSpec::new("Tributary_Last_Excerpt", Text(255)),
        FieldSpec::new("Tributary_Contributions_90d", Integer),
        FieldSpec::new("Tributary_Sentiment_90d", Decimal(3)),
        FieldSpec::new("Tributary_Needs_Attention", Boolean),
        FieldSpec::new("Tributary_Attention_Reason", Text(255)),
    ]);
    for (_, platform) in &slugs {
        fields.push(FieldSpec::new(&first_seen_field(platform), DateTime));
        fields.push(FieldSpec::new(&last_seen_field(platform), DateTime));
        fields.push(FieldSpec::new(&contributions_field(platform), Integer));
    }
    fields
}

/// At most `max` characters of `text`.
pub(crate) fn cap(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text.to_owned(),
    }
}

pub(crate) use tributary_sdk::text::one_line;

/// A `datetime` field value: `2023-11-14T22:13:20+00:00` (Zoho's format).
pub(crate) fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

/// Rounded to three decimals; `None` for NaN or infinities.
pub(crate) fn sentiment(value: f64) -> Option<f64> {
    value.is_finite().then(|| (value.clamp(-1.0, 1.0) * 1000.0).round() / 1000.0)
}

/// An integer field holds at most 9 digits.
fn count(value: u64) -> u64 {
    value.min(999_999_999)
}

/// The rollup fields of one contact.
pub(crate) fn rollup_fields(rollup: &Rollup) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("Tributary_Last_Contribution".into(), json!(timestamp(rollup.last_contribution_at)));
    fields.insert("Tributary_Last_Platform".into(), json!(cap(&rollup.last_platform, 80)));
    fields.insert("Tributary_Contribution_Count".into(), json!(count(rollup.contribution_count)));
    fields.insert("Tributary_Platforms".into(), json!(cap(&rollup.platforms.join(";"), TEXT_MAX)));
    if let Some(value) = sentiment(rollup.sentiment_avg) {
        fields.insert("Tributary_Sentiment".into(), json!(value));
    }
    fields.insert("Tributary_Questions".into(), json!(count(rollup.questions)));
    fields.insert("Tributary_Complaints".into(), json!(count(rollup.complaints)));
    fields.insert("Tributary_Ideas".into(), json!(count(rollup.ideas)));
    fields.insert("Tributary_Praise".into(), json!(count(rollup.praise)));
    // A link cut short would lead nowhere: one longer than the field is left empty.
    let last_url = rollup.last_url.as_deref().and_then(web_link).filter(|url| url.chars().count() <= TEXT_MAX);
    fields.insert("Tributary_Last_Url".into(), json!(last_url));
    let excerpt = rollup.last_excerpt.as_deref().map(|text| one_line(text, TEXT_MAX)).filter(|t| !t.is_empty());
    fields.insert("Tributary_Last_Excerpt".into(), json!(excerpt));
    fields.insert("Tributary_Contributions_90d".into(), json!(count(rollup.count_90d)));
    fields.insert("Tributary_Sentiment_90d".into(), json!(rollup.sentiment_avg_90d.and_then(sentiment)));
    fields.insert("Tributary_Needs_Attention".into(), json!(rollup.needs_attention));
    let reason = rollup.attention_reason.as_deref().map(|text| one_line(text, TEXT_MAX)).filter(|t| !t.is_empty());
    fields.insert("Tributary_Attention_Reason".into(), json!(reason));
    for platform in &rollup.per_platform {
        fields.insert(first_seen_field(&platform.platform), json!(timestamp(platform.first_seen)));
        fields.insert(last_seen_field(&platform.platform), json!(timestamp(platform.last_seen)));
        fields.insert(contributions_field(&platform.platform), json!(count(platform.contributions)));
    }
    fields
}

/// The line a note carries so a search can find it by activity key.
pub(crate) fn marker(key: &str) -> String {
    format!("[tributary-key:{}]", key.trim().replace(['\r', '\n', ']'], ""))
}

/// The note's title: the contribution's, or `<platform> <kind>`.
pub(crate) fn note_title(contribution: &Contribution) -> String {
    let title = contribution.title.as_deref().map(str::trim).filter(|t| !t.is_empty());
    let title = match title {
        Some(title) => title.to_owned(),
        None => format!("{} {}", contribution.platform, contribution.kind.as_str()),
    };
    cap(&title.replace(['\r', '\n'], " "), TITLE_MAX)
}

/// The URL when it is an absolute http(s) URL.
fn web_link(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

/// The note's plain text: the body (cut to fit), the link, a line of
/// signals and the key marker as the last line.
pub(crate) fn note_content(key: &str, contribution: &Contribution) -> String {
    let mut tail = String::new();
    if let Some(url) = contribution.url.as_deref().and_then(web_link) {
        tail.push_str(&format!("\n\n{}", cap(&url, 2_000)));
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
    signals.push(contribution.created_at.format("%Y-%m-%d %H:%M UTC").to_string());
    tail.push_str(&format!("\n{}\n{}", cap(&signals.join(" · "), 500), marker(key)));
    let budget = CONTENT_MAX.saturating_sub(tail.chars().count() + 1);
    let body = contribution.body.replace("\r\n", "\n").replace('\r', "\n");
    // A line of the body that looks like a marker must not be taken for one.
    let body = body.replace("[tributary-key:", "[tributary-key :");
    let mut body = body.trim().to_owned();
    if body.chars().count() > budget {
        body = cap(&body, budget.saturating_sub(1)) + "…";
    }
    body + &tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoho_field_names_and_note_text() {
        assert_eq!(handle_field("Stack Exchange"), "Tributary_Stack_Exchange_Handle");
        let identity = contact_fields(&[])[0].create_body();
        assert_eq!(identity["field_label"], "Tributary Identity");
        assert_eq!(identity["unique"]["casesensitive"], "false");
        let content = note_content("k1", &Contribution::sample());
        assert!(content.starts_with("Is there a way?\nI looked in settings."), "{content}");
        assert!(content.ends_with("2023-11-14 22:13 UTC\n[tributary-key:k1]"), "{content}");
        let sneaky = Contribution { body: "[tributary-key:other]".into(), ..Contribution::sample() };
        assert_eq!(note_content("k1", &sneaky).matches("[tributary-key:").count(), 1);
        let long = Contribution { body: "x".repeat(40_000), ..Contribution::sample() };
        assert!(note_content("k", &long).chars().count() <= CONTENT_MAX);
        assert_eq!(note_title(&Contribution { title: None, ..Contribution::sample() }), "discourse post");
        assert_eq!(timestamp(Contribution::sample().created_at), "2023-11-14T22:13:20+00:00");
        assert_eq!(one_line("a\r\n b\t\tc", 50), "a b c");
        assert_eq!(one_line("abcdef", 4), "abc…");
        assert_eq!(first_seen_field("Stack Exchange"), "Tributary_Stack_Exchange_First_Seen");
        assert_eq!(contributions_field("github"), "Tributary_Github_Contributions");
        let fields = contact_fields(&["github".into()]);
        let attention = fields.iter().find(|f| f.api_name == "Tributary_Needs_Attention").unwrap();
        assert_eq!(
            attention.create_body(),
            json!({ "field_label": "Tributary Needs Attention", "data_type": "boolean" })
        );
        // Per-platform figures come last; every label gives back its API name.
        assert_eq!(fields.last().unwrap().api_name, "Tributary_Github_Contributions");
        assert!(fields.iter().all(|f| f.label().replace(' ', "_") == f.api_name));
    }
}
