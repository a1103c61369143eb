//! The person fields Tributary creates in Pipedrive and writes to.
//!
//! Pipedrive addresses a custom field by a random 40-character `key` that
//! differs per account; Tributary finds its fields by their `name`, which it
//! chooses (all start with `Tributary`), and caches name → key.

/// A person field as `crm setup` creates it (`POST /personFields`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldSpec {
    pub name: String,
    /// Pipedrive's `field_type`: `varchar`, `double` or `date`.
    pub field_type: &'static str,
}

fn spec(name: impl Into<String>, field_type: &'static str) -> FieldSpec {
    FieldSpec { name: name.into(), field_type }
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

/// Every field the rollups write.
pub(crate) const ROLLUP_FIELDS: [&str; 9] = [
    LAST_CONTRIBUTION_AT,
    LAST_PLATFORM,
    CONTRIBUTION_COUNT,
    PLATFORMS,
    SENTIMENT_AVG,
    QUESTIONS,
    COMPLAINTS,
    IDEAS,
    PRAISE,
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

/// All person fields: identity, per platform handle and profile, rollups.
pub(crate) fn person_fields(platforms: &[String]) -> Vec<FieldSpec> {
    let mut fields = vec![spec(IDENTITY, "varchar")];
    let mut slugs: Vec<String> = platforms.iter().map(|p| platform_slug(p)).collect();
    slugs.sort();
    slugs.dedup();
    for slug in slugs {
        fields.push(spec(handle_field(&slug), "varchar"));
        fields.push(spec(profile_field(&slug), "varchar"));
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
    ]);
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
        assert_eq!(fields.len(), 5 + ROLLUP_FIELDS.len());
        assert_eq!(platform_slug(""), "unknown");
    }
}
