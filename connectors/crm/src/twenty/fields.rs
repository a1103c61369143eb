//! The custom fields Tributary creates in Twenty, the deterministic record
//! ids it writes under, and a contribution as a Twenty note.
//!
//! Twenty's metadata names are camelCase (`^[a-z][a-zA-Z0-9]*$`, at most 63
//! characters), so every field is the configured prefix (`tributary` by
//! default) followed by a capitalised name: `tributaryIdentity`,
//! `tributaryHandleDiscourse`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use tributary_sdk::Contribution;
use uuid::Uuid;

/// The namespace of every UUIDv5 Tributary derives for Twenty records.
const NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_52c4_93a8_4d0e_b7d2_5e0a_41f3_9c77);

/// The note body is cut well before any request-size limit.
const BODY_BUDGET: usize = 50_000;
const TITLE_BUDGET: usize = 200;

/// The person id of an author without e-mail: the same identity always
/// names the same person.
pub(crate) fn person_id(identity: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("person:{identity}").as_bytes())
}

/// The note id of an activity key.
pub(crate) fn note_id(key: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("note:{key}").as_bytes())
}

/// The id of the noteTarget linking a note to a person.
pub(crate) fn note_target_id(note: &Uuid, person: &Uuid) -> Uuid {
    Uuid::new_v5(&NAMESPACE, format!("noteTarget:{note}:{person}").as_bytes())
}

/// How Twenty stores a field (`type` of `POST /rest/metadata/fields`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldType {
    Text,
    Number,
    DateTime,
    Boolean,
}

impl FieldType {
    fn as_str(self) -> &'static str {
        match self {
            FieldType::Text => "TEXT",
            FieldType::Number => "NUMBER",
            FieldType::DateTime => "DATE_TIME",
            FieldType::Boolean => "BOOLEAN",
        }
    }
}

/// One custom field as `crm setup` creates it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldSpec {
    /// The full camelCase name, prefix included.
    pub name: String,
    pub label: String,
    pub description: String,
    pub kind: FieldType,
    /// `isUnique`: Twenty's batch upsert matches records on it.
    pub unique: bool,
}

impl FieldSpec {
    fn new(prefix: &str, name: &str, label: &str, kind: FieldType, description: &str) -> FieldSpec {
        FieldSpec {
            name: field_name(prefix, name),
            label: label.to_owned(),
            description: description.to_owned(),
            kind,
            unique: false,
        }
    }

    /// The body of `POST /rest/metadata/fields`.
    pub fn create_body(&self, object_metadata_id: &str) -> Value {
        let mut body = json!({
            "objectMetadataId": object_metadata_id,
            "type": self.kind.as_str(),
            "name": self.name,
            "label": self.label,
            "description": self.description,
            "isNullable": true,
        });
        if self.unique {
            body["isUnique"] = json!(true);
        }
        if self.kind == FieldType::Boolean {
            body["defaultValue"] = json!(false);
        }
        body
    }
}

/// `prefix` + `Name`: `field_name("tributary", "identity")` is `tributaryIdentity`.
pub(crate) fn field_name(prefix: &str, name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => format!("{prefix}{}{}", first.to_ascii_uppercase(), chars.as_str()),
        None => prefix.to_owned(),
    }
}

/// A platform name as part of a field name: ASCII letters and digits in
/// PascalCase (`stack exchange` and `stack-exchange` become `StackExchange`).
pub(crate) fn platform_slug(platform: &str) -> String {
    let slug: String = platform
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(|word| {
            let mut chars = word.chars();
            let first = chars.next().map(|c| c.to_ascii_uppercase()).unwrap_or_default();
            format!("{first}{}", chars.as_str().to_ascii_lowercase())
        })
        .collect();
    if slug.is_empty() { "Unknown".into() } else { slug }
}

pub(crate) fn handle_field(prefix: &str, platform: &str) -> String {
    format!("{prefix}Handle{}", platform_slug(platform))
}

pub(crate) fn user_id_field(prefix: &str, platform: &str) -> String {
    format!("{prefix}UserId{}", platform_slug(platform))
}

pub(crate) fn profile_field(prefix: &str, platform: &str) -> String {
    format!("{prefix}Profile{}", platform_slug(platform))
}

/// When the person was first seen on `platform`: `tributaryFirstSeenDiscourse`.
pub(crate) fn first_seen_field(prefix: &str, platform: &str) -> String {
    format!("{prefix}FirstSeen{}", platform_slug(platform))
}

/// When the person was last seen on `platform`: `tributaryLastSeenDiscourse`.
pub(crate) fn last_seen_field(prefix: &str, platform: &str) -> String {
    format!("{prefix}LastSeen{}", platform_slug(platform))
}

/// How many contributions the person made on `platform`: `tributaryContributionsDiscourse`.
pub(crate) fn contributions_field(prefix: &str, platform: &str) -> String {
    format!("{prefix}Contributions{}", platform_slug(platform))
}

/// The person fields: identity, per platform handle, account id and
/// profile address, the rollups, then per platform the rollup figures.
pub(crate) fn person_fields(prefix: &str, platforms: &[String]) -> Vec<FieldSpec> {
    use FieldType::*;
    let mut identity = FieldSpec::new(
        prefix,
        "identity",
        "Tributary identity",
        Text,
        "platform:user id of a person known only by a handle; Tributary's upsert key for people without e-mail.",
    );
    identity.unique = true;
    let mut fields = vec![identity];
    let mut slugs: Vec<(String, &str)> =
        platforms.iter().map(|platform| (platform_slug(platform), platform.as_str())).collect();
    slugs.sort();
    slugs.dedup_by(|a, b| a.0 == b.0);
    for (slug, platform) in &slugs {
        fields.push(FieldSpec::new(
            prefix,
            &format!("handle{slug}"),
            &format!("Handle on {platform}"),
            Text,
            &format!("The person's handle on {platform}, as Tributary saw it."),
        ));
        fields.push(FieldSpec::new(
            prefix,
            &format!("userId{slug}"),
            &format!("User id on {platform}"),
            Text,
            &format!("The person's account id on {platform}."),
        ));
        fields.push(FieldSpec::new(
            prefix,
            &format!("profile{slug}"),
            &format!("Profile on {platform}"),
            Text,
            &format!("Address of the person's profile on {platform}."),
        ));
    }
    fields.extend([
        FieldSpec::new(
            prefix,
            "lastContributionAt",
            "Last community contribution",
            DateTime,
            "When the person last posted in a community Tributary follows.",
        ),
        FieldSpec::new(prefix, "lastPlatform", "Last community platform", Text, "Where the person last posted."),
        FieldSpec::new(
            prefix,
            "contributionCount",
            "Community contributions",
            Number,
            "How many contributions Tributary delivered for this person.",
        ),
        FieldSpec::new(
            prefix,
            "platforms",
            "Community platforms",
            Text,
            "Every platform the person was seen on (`;`).",
        ),
        FieldSpec::new(
            prefix,
            "sentimentAvg",
            "Average community sentiment",
            Number,
            "Mean sentiment of the person's contributions, from -1 (negative) to 1 (positive).",
        ),
        FieldSpec::new(prefix, "questions", "Community questions", Number, "Contributions read as questions."),
        FieldSpec::new(prefix, "complaints", "Community complaints", Number, "Contributions read as complaints."),
        FieldSpec::new(prefix, "ideas", "Community ideas", Number, "Contributions read as ideas."),
        FieldSpec::new(prefix, "praise", "Community praise", Number, "Contributions read as praise."),
        FieldSpec::new(prefix, "lastUrl", "Last contribution URL", Text, "Link to the person's last contribution."),
        FieldSpec::new(
            prefix,
            "lastExcerpt",
            "Last contribution excerpt",
            Text,
            "The start of the person's last contribution, on one line.",
        ),
        FieldSpec::new(
            prefix,
            "contributions90d",
            "Community contributions (90 days)",
            Number,
            "How many contributions the person made in the last 90 days.",
        ),
        FieldSpec::new(
            prefix,
            "sentiment90d",
            "Community sentiment (90 days)",
            Number,
            "Mean sentiment of the last 90 days' contributions, from -1 to 1; empty when none was scored.",
        ),
        FieldSpec::new(
            prefix,
            "needsAttention",
            "Needs attention",
            Boolean,
            "An unresolved complaint or a sharp drop in sentiment: someone should look at this person.",
        ),
        FieldSpec::new(prefix, "attentionReason", "Attention reason", Text, "Why the person needs attention."),
    ]);
    for (slug, platform) in &slugs {
        fields.push(FieldSpec::new(
            prefix,
            &format!("firstSeen{slug}"),
            &format!("First seen on {platform}"),
            DateTime,
            &format!("When the person's first contribution on {platform} was posted."),
        ));
        fields.push(FieldSpec::new(
            prefix,
            &format!("lastSeen{slug}"),
            &format!("Last seen on {platform}"),
            DateTime,
            &format!("When the person's last contribution on {platform} was posted."),
        ));
        fields.push(FieldSpec::new(
            prefix,
            &format!("contributions{slug}"),
            &format!("Contributions on {platform}"),
            Number,
            &format!("How many contributions Tributary delivered for the person from {platform}."),
        ));
    }
    fields
}

/// The note fields: the activity key and the contribution's signals.
pub(crate) fn note_fields(prefix: &str) -> Vec<FieldSpec> {
    use FieldType::*;
    vec![
        FieldSpec::new(prefix, "key", "Tributary key", Text, "Deterministic key of the contribution."),
        FieldSpec::new(prefix, "platform", "Community platform", Text, "The platform the contribution was posted on."),
        FieldSpec::new(prefix, "url", "Contribution URL", Text, "Link to the contribution on its platform."),
        FieldSpec::new(prefix, "intent", "Intent", Text, "question, complaint, idea, praise or other."),
        FieldSpec::new(prefix, "sentiment", "Sentiment", Number, "Sentiment of the contribution, from -1 to 1."),
    ]
}

/// A timestamp as Twenty's `DATE_TIME` fields take it.
pub(crate) fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The URL when it is an absolute http(s) URL, normalised, with the
/// parentheses that would end a Markdown link destination encoded.
pub(crate) fn web_link(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string().replace('(', "%28").replace(')', "%29"))
}

/// Text that Markdown renders as itself: every character that could open
/// markup (links, images, HTML, emphasis, code) is backslash-escaped, and
/// so is what would start a heading, quote or list at the start of a line.
/// Contributions are written by strangers: no link, image or tag of theirs
/// becomes live in the CRM.
pub(crate) fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for (number, line) in text.lines().enumerate() {
        if number > 0 {
            out.push('\n');
        }
        let trimmed = line.trim_start();
        out.push_str(&line[..line.len() - trimmed.len()]);
        // A list item `1.` or `1)` at the start of a line.
        let digits = trimmed.chars().take_while(char::is_ascii_digit).count();
        for (index, c) in trimmed.char_indices() {
            let at_start = index == 0;
            let list_number_end = digits > 0 && index == digits && matches!(c, '.' | ')');
            match c {
                '\\' | '`' | '*' | '_' | '[' | ']' | '(' | ')' | '<' | '>' | '!' | '#' | '|' | '~' | '&' | '{'
                | '}' => {
                    out.push('\\');
                    out.push(c);
                }
                '-' | '+' | '=' if at_start => {
                    out.push('\\');
                    out.push(c);
                }
                '.' if list_number_end => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_control() && c != '\t' => {}
                c => out.push(c),
            }
        }
    }
    out
}

pub(crate) use tributary_sdk::text::one_line;

/// Keeps at most `budget` bytes of `text`, cut on a char boundary, with `…`.
fn cap(text: &str, budget: usize) -> String {
    if text.len() <= budget {
        return text.to_owned();
    }
    let mut end = budget;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    // Never leave a lone escaping backslash at the cut.
    let mut kept = text[..end].to_owned();
    if kept.ends_with('\\') && !kept.ends_with("\\\\") {
        kept.pop();
    }
    kept.push('…');
    kept
}

/// The note's title: the contribution's own, else the start of its text.
pub(crate) fn note_title(contribution: &Contribution) -> String {
    let title = contribution.title.as_deref().map(str::trim).filter(|t| !t.is_empty());
    let title = match title {
        Some(title) => title.to_owned(),
        None => {
            let first_line = contribution.body.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
            if first_line.is_empty() {
                format!("{} on {}", contribution.kind.as_str(), contribution.platform)
            } else {
                first_line.to_owned()
            }
        }
    };
    let title: String = title.chars().filter(|c| !c.is_control()).collect();
    cap(&title, TITLE_BUDGET)
}

/// The note's Markdown body (`bodyV2.markdown`; Twenty converts it to its
/// block format): the escaped text, a link to the original and the signals.
pub(crate) fn note_markdown(contribution: &Contribution) -> String {
    let mut parts: Vec<String> = Vec::new();
    if contribution.deleted {
        parts.push(format!("_\\[deleted on {}\\]_", escape_markdown(&contribution.platform)));
    }
    let body: Vec<String> =
        contribution.body.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).map(escape_markdown).collect();
    if !body.is_empty() {
        parts.push(cap(&body.join("\n\n"), BODY_BUDGET));
    }
    if let Some(url) = contribution.url.as_deref().and_then(web_link) {
        parts.push(format!("[Open on {}]({url})", escape_markdown(&contribution.platform)));
    }
    let mut signals = vec![escape_markdown(&contribution.platform), contribution.kind.as_str().to_owned()];
    if let Some(found) = &contribution.signals {
        signals.push(format!("intent: {}", found.intent.as_str()));
        if found.sentiment.is_finite() {
            signals.push(format!("sentiment: {}", tributary_sdk::text::decimal(found.sentiment).unwrap_or_default()));
        }
    }
    if let Some(language) = &contribution.language {
        signals.push(format!("language: {}", escape_markdown(language)));
    }
    if contribution.edited {
        signals.push("edited".into());
    }
    parts.push(format!("_{}_", signals.join(" · ")));
    parts.join("\n\n")
}

/// A finite number rounded to four decimals, for a `NUMBER` field.
pub(crate) fn number(value: f64) -> Option<Value> {
    value.is_finite().then(|| json!((value * 10_000.0).round() / 10_000.0))
}

/// The note record of `POST /rest/batch/notes`.
pub(crate) fn note_record(prefix: &str, id: &Uuid, key: &str, contribution: &Contribution) -> Value {
    let mut record = Map::new();
    record.insert("id".into(), json!(id.to_string()));
    record.insert("title".into(), json!(note_title(contribution)));
    record.insert("bodyV2".into(), json!({ "markdown": note_markdown(contribution) }));
    record.insert(field_name(prefix, "key"), json!(key));
    record.insert(field_name(prefix, "platform"), json!(contribution.platform));
    if let Some(url) = contribution.url.as_deref().and_then(web_link) {
        record.insert(field_name(prefix, "url"), json!(url));
    }
    if let Some(found) = &contribution.signals {
        record.insert(field_name(prefix, "intent"), json!(found.intent.as_str()));
        if let Some(sentiment) = number(found.sentiment) {
            record.insert(field_name(prefix, "sentiment"), sentiment);
        }
    }
    Value::Object(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: &str) {
        assert_eq!(escape_markdown(text), expected, "for {text:?}");
    }

    #[test]
    fn markdown_from_strangers_stays_text() {
        check("plain words, 5 < 6", "plain words, 5 \\< 6");
        check("![x](https://evil.example/pixel.png)", "\\!\\[x\\]\\(https://evil.example/pixel.png\\)");
        check("<img src=x onerror=alert(1)>", "\\<img src=x onerror=alert\\(1\\)\\>");
        check("# title\n- item\n1. first\n> quote", "\\# title\n\\- item\n1\\. first\n\\> quote");
        check("a*b*_c_ `code` ~~s~~", "a\\*b\\*\\_c\\_ \\`code\\` \\~\\~s\\~\\~");
        check("back\\slash", "back\\\\slash");
        check("1999 was a year. 2000-01-01", "1999 was a year. 2000-01-01");
    }

    #[test]
    fn names_are_camel_case_and_ids_deterministic() {
        for (platform, slug) in [
            ("discourse", "Discourse"),
            ("Stack Exchange", "StackExchange"),
            ("hacker-news", "HackerNews"),
            ("", "Unknown"),
        ] {
            assert_eq!(platform_slug(platform), slug, "{platform:?}");
        }
        assert_eq!(handle_field("tributary", "GitHub"), "tributaryHandleGithub");
        assert_eq!(field_name("tributary", "lastContributionAt"), "tributaryLastContributionAt");
        assert_eq!(note_id("k1"), note_id("k1"));
        assert_ne!(note_id("k1"), note_id("k2"));
        assert_ne!(person_id("discourse:7"), note_id("discourse:7"));
        let fields = person_fields("t", &["forum".into(), "Forum".into()]);
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(&names[..4], ["tIdentity", "tHandleForum", "tUserIdForum", "tProfileForum"]);
        assert!(fields[0].unique && fields[0].create_body("o")["isUnique"] == json!(true));
        let at = fields.iter().find(|f| f.name == "tLastContributionAt").unwrap();
        assert_eq!(at.create_body("o")["type"], "DATE_TIME");
        let attention = fields.iter().find(|f| f.name == "tNeedsAttention").unwrap().create_body("o");
        assert_eq!((attention["type"].as_str(), attention["defaultValue"].as_bool()), (Some("BOOLEAN"), Some(false)));
        assert_eq!(&names[names.len() - 3..], ["tFirstSeenForum", "tLastSeenForum", "tContributionsForum"]);
        assert_eq!(first_seen_field("t", "Stack Exchange"), "tFirstSeenStackExchange");
        assert_eq!(last_seen_field("t", "forum"), "tLastSeenForum");
        assert_eq!(contributions_field("t", "forum"), "tContributionsForum");
        assert!(names.iter().all(|n| n.len() <= 63 && n.chars().all(|c| c.is_ascii_alphanumeric())), "{names:?}");
        assert_eq!(one_line(" a\n\nb\tc ", 10), "a b c");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }

    #[test]
    fn the_note_is_escaped_markdown_with_a_safe_link() {
        let mut contribution = Contribution::sample();
        contribution.body = "Look: [click](javascript:alert(1))\n\n\n<b>bold</b>".into();
        contribution.url = Some("https://community.example.com/t/(42)".into());
        let markdown = note_markdown(&contribution);
        assert!(
            markdown.contains("Look: \\[click\\]\\(javascript:alert\\(1\\)\\)\n\n\\<b\\>bold\\</b\\>"),
            "{markdown}"
        );
        assert!(markdown.contains("[Open on discourse](https://community.example.com/t/%2842%29)"), "{markdown}");
        assert!(markdown.ends_with("_discourse · post · intent: question · sentiment: 0.25 · language: eng_"));
        contribution.url = Some("javascript:alert(1)".into());
        assert!(!note_markdown(&contribution).contains("Open on"));
        contribution.body = "<".repeat(BODY_BUDGET);
        let long = note_markdown(&contribution);
        assert!(long.len() < BODY_BUDGET + 200 && long.contains('…'), "{}", long.len());
        assert_eq!(note_title(&Contribution { title: None, ..Contribution::sample() }), "Is there a way?");
    }
}
