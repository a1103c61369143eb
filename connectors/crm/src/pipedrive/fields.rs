//! The person fields Tributary creates in Pipedrive and writes to.
//!
//! Pipedrive addresses a custom field by a random 40-character `key` that
//! differs per account; Tributary finds its fields by their `name`, which it
//! chooses (all start with `Tributary`), and caches name → key.

/// A person field as `crm setup` creates it (`POST /personFields`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldSpec {
    pub name: String,
    /// Pipedrive's `field_type`: `varchar` (up to 255 characters), `text`
    /// (large text), `double`, `date` or `enum`.
    pub field_type: &'static str,
    /// The option labels of an `enum` field, in order.
    pub options: &'static [&'static str],
}

fn spec(name: impl Into<String>, field_type: &'static str) -> FieldSpec {
    FieldSpec { name: name.into(), field_type, options: &[] }
}

pub(crate) const IDENTITY: &str = "Tributary identity";
pub(crate) const LAST_CONTRIBUTION_AT: &str = "Tributary last contribution";
pub(crate) const LAST_PLATFORM: &str = "Tributary last platform";
pub(crate) const CONTRIBUTION_COUNT: &str = "Tributary contributions";
pub(crate) const PLATFORMS: &str = "Tributary platforms";
pub(crate) const SENTIMENT_AVG: &str = "Tributary sentiment";
pub(crate) const QUESTIONS: &str = "Tributary questions";
pub(crate) const COMPLAINTS: &str = "Tributary complaints";
pub(crate) const IDEAS: &str = "Tributary ideas";
pub(crate) const PRAISE: &str = "Tributary praise";
pub(crate) const LAST_URL: &str = "Tributary last URL";
pub(crate) const LAST_EXCERPT: &str = "Tributary last excerpt";
pub(crate) const COUNT_90D: &str = "Tributary 90-day contributions";
pub(crate) const SENTIMENT_90D: &str = "Tributary 90-day sentiment";
/// An `enum` field valued [`YES`] or [`NO`]: Pipedrive has no yes/no field type.
pub(crate) const NEEDS_ATTENTION: &str = "Tributary needs attention";
pub(crate) const ATTENTION_REASON: &str = "Tributary attention reason";

pub(crate) const YES: &str = "Yes";
pub(crate) const NO: &str = "No";

/// Every global field the rollups write; per platform they also write
/// [`first_seen_field`], [`last_seen_field`] and [`contributions_field`].
pub(crate) const ROLLUP_FIELDS: [&str; 15] = [
    LAST_CONTRIBUTION_AT,
    LAST_PLATFORM,
    CONTRIBUTION_COUNT,
    PLATFORMS,
    SENTIMENT_AVG,
    QUESTIONS,
    COMPLAINTS,
    IDEAS,
    PRAISE,
    LAST_URL,
    LAST_EXCERPT,
    COUNT_90D,
    SENTIMENT_90D,
    NEEDS_ATTENTION,
    ATTENTION_REASON,
];

/// A platform name as it appears in a field name: lowercase ASCII letters,
/// digits and `_` (`Stack Exchange` becomes `stack_exchange`).
pub(crate) fn platform_slug(platform: &str) -> String {
    let slug: String =
        platform.trim().chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    if slug.is_empty() { "unknown".into() } else { slug }
}

/// The field holding a person's handle on `platform`.
pub(crate) fn handle_field(platform: &str) -> String {
    format!("Tributary handle ({})", platform_slug(platform))
}

/// The field holding the address of a person's profile on `platform`.
pub(crate) fn profile_field(platform: &str) -> String {
    format!("Tributary profile ({})", platform_slug(platform))
}

/// The field holding when a person's first contribution on `platform` was posted.
pub(crate) fn first_seen_field(platform: &str) -> String {
    format!("Tributary first seen ({})", platform_slug(platform))
}

/// The field holding when a person's last contribution on `platform` was posted.
pub(crate) fn last_seen_field(platform: &str) -> String {
    format!("Tributary last seen ({})", platform_slug(platform))
}

/// The field holding how many contributions a person made on `platform`.
pub(crate) fn contributions_field(platform: &str) -> String {
    format!("Tributary contributions ({})", platform_slug(platform))
}

/// All person fields: identity, per platform handle and profile, rollups,
/// then per platform the rollup figures.
pub(crate) fn person_fields(platforms: &[String]) -> Vec<FieldSpec> {
    let mut fields = vec![spec(IDENTITY, "varchar")];
    let mut slugs: Vec<String> = platforms.iter().map(|p| platform_slug(p)).collect();
    slugs.sort();
    slugs.dedup();
    for slug in &slugs {
        fields.push(spec(handle_field(slug), "varchar"));
        fields.push(spec(profile_field(slug), "varchar"));
    }
    fields.extend([
        spec(LAST_CONTRIBUTION_AT, "date"),
        spec(LAST_PLATFORM, "varchar"),
        spec(CONTRIBUTION_COUNT, "double"),
        spec(PLATFORMS, "varchar"),
        spec(SENTIMENT_AVG, "double"),
        spec(QUESTIONS, "double"),
        spec(COMPLAINTS, "double"),
        spec(IDEAS, "double"),
        spec(PRAISE, "double"),
        spec(LAST_URL, "text"),
        spec(LAST_EXCERPT, "text"),
        spec(COUNT_90D, "double"),
        spec(SENTIMENT_90D, "double"),
        FieldSpec { options: &[YES, NO], ..spec(NEEDS_ATTENTION, "enum") },
        spec(ATTENTION_REASON, "varchar"),
    ]);
    for slug in &slugs {
        fields.push(spec(first_seen_field(slug), "date"));
        fields.push(spec(last_seen_field(slug), "date"));
        fields.push(spec(contributions_field(slug), "double"));
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipedrive_fields_are_named_per_platform_without_duplicates() {
        let fields = person_fields(&["Forum".into(), "forum".into(), "Stack Exchange".into()]);
        let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            &names[..5],
            [
                IDENTITY,
                "Tributary handle (forum)",
                "Tributary profile (forum)",
                "Tributary handle (stack_exchange)",
                "Tributary profile (stack_exchange)"
            ]
        );
        assert_eq!(fields.len(), 1 + 2 * 5 + ROLLUP_FIELDS.len());
        let tail: Vec<&str> = names[names.len() - 6..].to_vec();
        assert_eq!(
            tail,
            [
                "Tributary first seen (forum)",
                "Tributary last seen (forum)",
                "Tributary contributions (forum)",
                "Tributary first seen (stack_exchange)",
                "Tributary last seen (stack_exchange)",
                "Tributary contributions (stack_exchange)"
            ]
        );
        let attention = fields.iter().find(|f| f.name == NEEDS_ATTENTION).unwrap();
        assert_eq!((attention.field_type, attention.options), ("enum", &[YES, NO][..]));
        for name in ROLLUP_FIELDS {
            assert!(names.contains(&name), "{name} is not created");
        }
        assert_eq!(platform_slug(""), "unknown");
    }
}
