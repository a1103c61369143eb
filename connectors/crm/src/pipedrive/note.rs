//! A contribution as a Pipedrive note.
//!
//! A note's `content` is HTML that Pipedrive renders (after sanitising it on
//! its side), and contributions are written by strangers: every piece of
//! text passes through [`escape_html`], and the only markup is the fixed tags
//! written here. Links are emitted for `http`/`https` URLs only.
//!
//! Pipedrive has no custom fields on notes, so the activity key rides in the
//! content as visible text, `[tributary-key:KEY]`: plain text survives the
//! sanitiser (an HTML comment or a data attribute might not), and the
//! brackets keep one key from matching as the prefix of another.

use tributary_sdk::{
    Contribution,
    text::{escape_html, escape_html_capped},
};

/// The body text is cut well before any size Pipedrive could refuse.
const BODY_BUDGET: usize = 60_000;
const TITLE_BUDGET: usize = 1_000;

/// The marker a note carries so a search can find it by activity key.
pub(crate) fn marker(key: &str) -> String {
    format!("[tributary-key:{}]", escape_html(key.trim()))
}

pub(crate) use tributary_sdk::text::decimal as number;

/// The URL when it is an absolute http(s) URL, normalised by the parser.
pub(crate) fn web_link(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

pub(crate) use tributary_sdk::text::one_line;

/// The note content: a `[deleted]` marker, the title, the text, a link, a
/// line of signals and the key marker, all escaped.
pub(crate) fn note_content(key: &str, contribution: &Contribution) -> String {
    let platform = escape_html(&contribution.platform);
    let mut html = String::new();
    if contribution.deleted {
        html.push_str(&format!("<p><em>[deleted on {platform}]</em></p>"));
    }
    if let Some(title) = contribution.title.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        html.push_str(&format!("<p><strong>{}</strong></p>", escape_html_capped(title, TITLE_BUDGET)));
    }
    let body = contribution.body.replace("\r\n", "\n").replace('\r', "\n");
    if !body.trim().is_empty() {
        html.push_str(&format!("<p>{}</p>", escape_html_capped(body.trim(), BODY_BUDGET).replace('\n', "<br>")));
    }
    if let Some(url) = contribution.url.as_deref().and_then(web_link) {
        let url = escape_html_capped(&url, TITLE_BUDGET);
        html.push_str(&format!("<p><a href=\"{url}\">{url}</a></p>"));
    }
    let mut signals = vec![platform, escape_html(contribution.kind.as_str())];
    if let Some(found) = &contribution.signals {
        signals.push(format!("intent: {}", escape_html(found.intent.as_str())));
        if let Some(sentiment) = number(found.sentiment) {
            signals.push(format!("sentiment: {sentiment}"));
        }
    }
    if contribution.edited {
        signals.push("edited".into());
    }
    signals.push(contribution.created_at.format("%Y-%m-%d %H:%M UTC").to_string());
    html.push_str(&format!("<p><small>{}</small></p>", signals.join(" · ")));
    html.push_str(&format!("<p><small>{}</small></p>", marker(key)));
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders the sample changed by `change`; checks what the content must
    /// and must not contain.
    fn check(change: impl FnOnce(&mut Contribution), present: &[&str], absent: &[&str]) {
        let mut contribution = Contribution::sample();
        change(&mut contribution);
        let content = note_content("k1", &contribution);
        for needle in present {
            assert!(content.contains(needle), "{needle:?} missing from {content}");
        }
        for needle in absent {
            assert!(!content.to_lowercase().contains(&needle.to_lowercase()), "{needle:?} found in {content}");
        }
    }

    #[test]
    fn pipedrive_note_content_is_escaped_and_carries_the_key() {
        check(
            |_| {},
            &[
                "<p><strong>Export to PDF?</strong></p>",
                "<p>Is there a way?<br>I looked in settings.</p>",
                "<a href=\"https://community.example.com/t/42\">",
                "discourse · post · intent: question · sentiment: 0.25 · 2023-11-14 22:13 UTC",
                "<p><small>[tributary-key:k1]</small></p>",
            ],
            &["deleted", "edited"],
        );
        check(
            |c| {
                c.title = Some("<script>alert(1)</script>".into());
                c.body = "<SCRIPT src=x></SCRIPT> & <img onerror=alert(2)>\r\nnext".into();
            },
            &["&lt;script&gt;alert(1)&lt;/script&gt;", "&amp; &lt;img onerror=alert(2)&gt;<br>next"],
            &["<script", "<img"],
        );
        check(|c| c.url = Some("javascript:alert(1)".into()), &[], &["javascript:", "<a "]);
        check(
            |c| {
                c.deleted = true;
                c.edited = true;
                c.platform = "<b>x</b>".into();
            },
            &["<p><em>[deleted on &lt;b&gt;x&lt;/b&gt;]</em></p>", "· edited ·"],
            &["<b>"],
        );
        assert_eq!(marker("<k>"), "[tributary-key:&lt;k&gt;]");
        let mut long = Contribution::sample();
        long.body = "\"<>".repeat(50_000);
        let content = note_content("k", &long);
        assert!(content.len() < 70_000 && content.contains('…') && !content.contains("&quo…"));
    }

    #[test]
    fn pipedrive_one_line_folds_whitespace_and_caps() {
        assert_eq!(one_line("  a\r\nb\t\u{7}c  ", 100), "a b c");
        assert_eq!(one_line("", 10), "");
        assert_eq!(one_line("abcdef ghijkl", 9), "abcdef g…");
        assert_eq!(one_line("abcdefghij", 5), "abcd…");
        let capped = one_line(&"é ".repeat(500), 255);
        assert!(capped.chars().count() <= 255 && capped.chars().count() > 250, "{capped}");
        assert!(capped.ends_with('…'));
    }
}
