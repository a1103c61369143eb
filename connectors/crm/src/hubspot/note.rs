//! A contribution as a HubSpot note.
//!
//! `hs_note_body` is rendered as HTML in HubSpot, and contributions are
//! written by strangers: every piece of text that goes into the body passes
//! through [`escape_html`], and the only markup is the fixed tags written
//! here. Links are emitted for `http`/`https` URLs only, so no
//! `javascript:` URL can become clickable.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use tributary_sdk::{
    Contribution,
    text::{escape_html, escape_html_capped},
};

/// HubSpot caps `hs_note_body` at 65,536 characters; the body text is cut
/// well before that, leaving room for the title, link and signals.
const BODY_BUDGET: usize = 60_000;
const TITLE_BUDGET: usize = 1_000;

/// A timestamp as HubSpot's `datetime` properties accept it.
pub(crate) fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) use tributary_sdk::text::decimal as number;

/// Escaped text with its line breaks as `<br>`.
fn paragraph_lines(text: &str, budget: usize) -> String {
    let normalised = text.replace("\r\n", "\n").replace('\r', "\n");
    escape_html_capped(normalised.trim(), budget).replace('\n', "<br>")
}

/// The note body: a `[deleted]` marker, the title, the text, a link and a
/// line of signals, all escaped.
pub(crate) fn note_body(contribution: &Contribution) -> String {
    let platform = escape_html(&contribution.platform);
    let mut html = String::new();
    if contribution.deleted {
        html.push_str(&format!("<p><em>[deleted on {platform}]</em></p>"));
    }
    if let Some(title) = contribution.title.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        html.push_str(&format!("<p><strong>{}</strong></p>", escape_html_capped(title, TITLE_BUDGET)));
    }
    if !contribution.body.trim().is_empty() {
        html.push_str(&format!("<p>{}</p>", paragraph_lines(&contribution.body, BODY_BUDGET)));
    }
    if let Some(url) = contribution.url.as_deref().and_then(web_link) {
        let url = escape_html_capped(&url, TITLE_BUDGET);
        html.push_str(&format!("<p><a href=\"{url}\">{url}</a></p>"));
    }
    let mut signals = vec![platform, escape_html(contribution.kind.as_str())];
    if let Some(found) = &contribution.signals {
        signals.push(format!("intent: {}", escape_html(found.intent.as_str())));
        if let Some(sentiment) = number(found.sentiment) {
            signals.push(format!("sentiment: {}", escape_html(&sentiment)));
        }
    }
    if let Some(language) = contribution.language.as_deref().filter(|l| !l.is_empty()) {
        signals.push(format!("language: {}", escape_html(language)));
    }
    if contribution.edited {
        signals.push("edited".into());
    }
    html.push_str(&format!("<p><small>{}</small></p>", signals.join(" · ")));
    html
}

/// The URL when it is an absolute http(s) URL, normalised by the parser.
pub(crate) fn web_link(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

/// Text for a single-line `string` property: control characters and line
/// breaks become spaces, runs of spaces fold, and the text stops (with `…`)
/// after `max_chars` characters. Not HTML-escaped: HubSpot shows `string`
/// properties as plain text (and escapes them itself), so an entity would
/// be shown as `&amp;`, as it would be for the handles and names Tributary
/// writes.
pub(crate) fn text_property(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 4));
    let mut count = 0;
    for word in text.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()) {
        let space = usize::from(count > 0);
        let length = word.chars().count();
        if count + space + length > max_chars {
            let room = max_chars.saturating_sub(count + space + 1);
            if room > 0 {
                if space == 1 {
                    out.push(' ');
                }
                out.extend(word.chars().take(room));
            }
            out.push('…');
            return out;
        }
        if space == 1 {
            out.push(' ');
        }
        out.push_str(word);
        count += space + length;
    }
    out
}

/// The note's properties for `batch/upsert`.
pub(crate) fn note_properties(prefix: &str, key: &str, contribution: &Contribution) -> Map<String, Value> {
    let mut properties = Map::new();
    let mut set = |name: String, value: String| {
        properties.insert(name, Value::String(value));
    };
    set("hs_timestamp".into(), timestamp(contribution.created_at));
    set("hs_note_body".into(), note_body(contribution));
    set(format!("{prefix}key"), key.to_owned());
    set(format!("{prefix}platform"), contribution.platform.clone());
    if let Some(found) = &contribution.signals {
        set(format!("{prefix}intent"), found.intent.as_str().to_owned());
        if let Some(sentiment) = number(found.sentiment) {
            set(format!("{prefix}sentiment"), sentiment);
        }
    }
    if let Some(url) = contribution.url.as_deref().and_then(web_link) {
        set(format!("{prefix}url"), url);
    }
    properties
}

#[cfg(test)]
mod tests {

    use super::*;

    fn sample() -> Contribution {
        Contribution { platform: "discourse".into(), ..Contribution::sample() }
    }

    /// Renders `sample()` changed by `change` and checks what the body must
    /// and must not contain.
    fn check(change: impl FnOnce(&mut Contribution), present: &[&str], absent: &[&str]) {
        let mut contribution = sample();
        change(&mut contribution);
        let body = note_body(&contribution);
        for needle in present {
            assert!(body.contains(needle), "{needle:?} missing from {body}");
        }
        for needle in absent {
            assert!(!body.to_lowercase().contains(&needle.to_lowercase()), "{needle:?} found in {body}");
        }
    }

    #[test]
    fn the_body_is_escaped_html() {
        check(
            |_| {},
            &[
                "<p><strong>Export to PDF?</strong></p>",
                "<p>Is there a way?<br>I looked in settings.</p>",
                "<a href=\"https://community.example.com/t/42\">",
                "discourse · post · intent: question · sentiment: 0.25 · language: eng",
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
            |c| c.url = Some("https://x.example/?q=\"><script>".into()),
            &["https://x.example/?q=%22%3E%3Cscript%3E"],
            &["<script"],
        );
        check(
            |c| {
                c.deleted = true;
                c.edited = true;
                c.platform = "<b>reddit</b>".into();
            },
            &["<p><em>[deleted on &lt;b&gt;reddit&lt;/b&gt;]</em></p>", "· edited"],
            &["<b>"],
        );
        check(
            |c| {
                c.signals = None;
                c.title = None;
                c.language = None;
            },
            &["<p><small>discourse · post</small></p>"],
            &["intent", "<strong>"],
        );
    }

    #[test]
    fn long_bodies_are_cut_below_hubspots_limit() {
        let mut contribution = sample();
        contribution.body = "\"<>".repeat(50_000);
        let body = note_body(&contribution);
        assert!(body.chars().count() < 65_536, "{}", body.len());
        assert!(body.contains("…"));
        assert!(!body.contains("&quo…"), "an entity was cut");
    }

    #[test]
    fn text_properties_are_one_capped_line() {
        assert_eq!(text_property("  a\r\nb\t\u{7}c  ", 100), "a b c");
        assert_eq!(text_property("<b>it's</b> & more", 100), "<b>it's</b> & more");
        assert_eq!(text_property("abcdef", 4), "abc…");
        assert_eq!(text_property("ab cdef", 4), "ab…");
        assert_eq!(text_property("ab cdefg", 5), "ab c…");
        assert_eq!(text_property("ab cd", 5), "ab cd");
        assert_eq!(text_property("é".repeat(10).as_str(), 5).chars().count(), 5);
        assert_eq!(text_property("", 5), "");
    }

    #[test]
    fn properties_carry_the_key_and_signals() {
        let properties = note_properties("tributary_", "k1", &sample());
        for (name, value) in [
            ("hs_timestamp", "2023-11-14T22:13:20.000Z"),
            ("tributary_key", "k1"),
            ("tributary_platform", "discourse"),
            ("tributary_intent", "question"),
            ("tributary_sentiment", "0.25"),
            ("tributary_url", "https://community.example.com/t/42"),
        ] {
            assert_eq!(properties[name], value, "{name}");
        }
        for (value, text) in [(-0.00001, Some("0")), (1.0, Some("1")), (-0.5, Some("-0.5")), (f64::NAN, None)] {
            assert_eq!(number(value).as_deref(), text, "{value}");
        }
    }
}
