//! A contribution as a BottleCRM comment on its contact.
//!
//! A comment is plain text of at most 10 000 characters (BottleCRM's
//! `COMMENT_MAX_LENGTH`); it is stored and shown as text, so nothing is
//! escaped. Comments have no custom fields: the activity key rides in the
//! text as its last line, `[tributary-key:KEY]`, which the brackets keep
//! from matching as the prefix of another key.

use tributary_sdk::Contribution;

/// BottleCRM refuses a longer comment.
const MAX_CHARS: usize = 10_000;
const TITLE_BUDGET: usize = 500;
const URL_BUDGET: usize = 1_000;

/// The line a comment carries so it can be found again by activity key.
pub(crate) fn marker(key: &str) -> String {
    let key: String = key.trim().chars().take(1_000).collect();
    format!("[tributary-key:{key}]")
}

fn capped(text: &str, budget: usize) -> String {
    if text.chars().count() <= budget {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(budget.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The comment text: a `[deleted]` line, the title, the text, the link, a
/// line of signals and the key marker; always within BottleCRM's limit.
pub(crate) fn text(key: &str, contribution: &Contribution) -> String {
    let mut head = Vec::new();
    if contribution.deleted {
        head.push(format!("[deleted on {}]", contribution.platform));
    }
    if let Some(title) = contribution.title.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        head.push(capped(title, TITLE_BUDGET));
    }
    let mut tail = Vec::new();
    if let Some(url) = contribution.url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        tail.push(capped(url, URL_BUDGET));
    }
    let mut signals = vec![contribution.platform.clone(), contribution.kind.as_str().to_owned()];
    if let Some(found) = &contribution.signals {
        signals.push(format!("intent: {}", found.intent.as_str()));
        if found.sentiment.is_finite() {
            signals.push(format!("sentiment: {:.2}", found.sentiment));
        }
    }
    if contribution.edited {
        signals.push("edited".into());
    }
    signals.push(contribution.created_at.format("%Y-%m-%d %H:%M UTC").to_string());
    tail.push(signals.join(" · "));
    tail.push(marker(key));
    let fixed: usize = head.iter().chain(tail.iter()).map(|part| part.chars().count() + 2).sum();
    let body = contribution.body.replace("\r\n", "\n").replace('\r', "\n");
    let body = body.trim();
    let mut parts = head;
    if !body.is_empty() {
        parts.push(capped(body, MAX_CHARS.saturating_sub(fixed + 8)));
    }
    parts.extend(tail);
    parts.join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bottlecrm_comment_carries_the_key_and_stays_within_the_limit() {
        let contribution = Contribution::sample();
        let text = text("k1", &contribution);
        assert!(text.ends_with("[tributary-key:k1]"), "{text}");
        assert!(text.contains("Export to PDF?"), "{text}");

        let mut long = Contribution::sample();
        long.body = "é".repeat(50_000);
        long.deleted = true;
        let text = super::text("k2", &long);
        assert!(text.chars().count() <= MAX_CHARS, "{}", text.chars().count());
        assert!(text.starts_with("[deleted on"));
        assert!(text.ends_with("[tributary-key:k2]"));
    }
}
