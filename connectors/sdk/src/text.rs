//! Turning what platforms send into clean plain text.

use url::Url;

/// Plain text from HTML: tags dropped (script and style with their
/// content), entities decoded, runs of blank lines folded.
pub fn html_to_text(html: &str) -> String {
    // The trivial decorator writes link and image text without brackets.
    let decorator = html2text::render::TrivialDecorator::new();
    let text = html2text::config::with_decorator(decorator)
        .string_from_read(html.as_bytes(), 10_000)
        .unwrap_or_else(|_| strip_tags_fallback(html));
    tidy(&text)
}

/// Folds trailing spaces and runs of blank lines, trims the ends, and drops
/// control characters other than newlines and tabs.
pub fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line: String = line.chars().filter(|c| !c.is_control() || *c == '\t').collect();
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.trim().to_owned()
}

/// Used only if the HTML parser gives up: drops everything between `<` and `>`.
fn strip_tags_fallback(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// Escapes text for a CRM field that is rendered as HTML.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// [`escape_html`], stopping (with `…`) once the escaped text would pass
/// `budget` bytes; escaping char by char never cuts an entity in half.
pub fn escape_html_capped(text: &str, budget: usize) -> String {
    let mut out = String::with_capacity(text.len().min(budget) + 16);
    let mut buffer = [0u8; 4];
    for c in text.chars() {
        let escaped = escape_html(c.encode_utf8(&mut buffer));
        if out.len() + escaped.len() > budget {
            out.push('…');
            break;
        }
        out.push_str(&escaped);
    }
    out
}

/// A number as written in a note or a CRM field: four decimals at most, no
/// trailing zeros (`-0.125`, `1`); `None` for NaN or infinities.
pub fn decimal(value: f64) -> Option<String> {
    value.is_finite().then(|| {
        let text = format!("{value:.4}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        if text == "-0" { "0".to_owned() } else { text.to_owned() }
    })
}

/// The longest website kept; a longer one is no one's home page.
pub const MAX_WEBSITE_CHARS: usize = 2048;

/// A profile's website as a link: an `http(s)` address with a host
/// (`https://` added when the scheme is missing), in the `url` crate's
/// canonical form (lower-case scheme and host, no default port), without
/// a fragment and without the lone `/` of a bare host, so the same site
/// named on two platforms gives the same text. `None` for anything else:
/// another scheme (`mailto:`, `javascript:`, `x:alice`), an address with
/// credentials or spaces, an IP address or a host without a dot, an empty
/// or overlong value.
pub fn website(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > MAX_WEBSITE_CHARS || raw.chars().any(char::is_whitespace) {
        return None;
    }
    let mut url = match Url::parse(raw) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => url,
        // `alice.dev:8080/blog` reads as the scheme `alice.dev`: a host and
        // port without a scheme. Any other scheme is not a website.
        Ok(url) if url.scheme().contains('.') && !raw.contains("://") => Url::parse(&format!("https://{raw}")).ok()?,
        Ok(_) => return None,
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            Url::parse(&format!("https://{}", raw.trim_start_matches('/'))).ok()?
        }
        Err(_) => return None,
    };
    // A named host: an address (`192.0.2.7`) or `localhost` is no one's site.
    let host_ok = match url.host() {
        Some(url::Host::Domain(domain)) => domain.trim_end_matches('.').contains('.'),
        Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) | None => false,
    };
    if !host_ok || !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    url.set_fragment(None);
    let bare_host = url.path() == "/" && url.query().is_none();
    let mut link = String::from(url);
    if bare_host {
        link.pop();
    }
    Some(link)
}

/// `text` on one line, for a CRM's one-line text field: every run of
/// whitespace or control characters becomes one space, and text past
/// `max_chars` characters is cut, ending with `…`. Nothing is escaped.
pub fn one_line(text: &str, max_chars: usize) -> String {
    let words: Vec<&str> =
        text.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()).collect();
    let folded = words.join(" ");
    if folded.chars().count() <= max_chars {
        return folded;
    }
    let mut out: String = folded.chars().take(max_chars.saturating_sub(1)).collect();
    out.truncate(out.trim_end().len());
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(html: &str, expected: &str) {
        assert_eq!(html_to_text(html), expected, "for {html:?}");
    }

    #[test]
    fn html_becomes_plain_text() {
        check("<p>Hello <b>world</b> &amp; friends</p>", "Hello world & friends");
        check("<p>a</p>\n\n\n<p>b</p>", "a\n\nb");
        check("<p>ok</p><script>alert('x')</script>", "ok");
        check("<style>p{color:red}</style><p>styled</p>", "styled");
        check("5 &lt; 6 &eacute;t&eacute;", "5 < 6 été");
        check("", "");
        check(r#"<p>see <a href="/u/x">@x</a> <img src="a.png" alt=":wrench:"></p>"#, "see @x :wrench:");
    }

    #[test]
    fn escaping_neutralises_markup() {
        assert_eq!(
            escape_html("<script>alert(\"x\")</script> & 'y'"),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn websites_are_normalised() {
        fn check(raw: &str, expected: Option<&str>) {
            assert_eq!(website(raw).as_deref(), expected, "{raw:?}");
        }
        let cases: &[(&str, Option<&str>)] = &[
            // Kept as given, in canonical form.
            ("https://alice.dev/blog", Some("https://alice.dev/blog")),
            ("http://alice.dev", Some("http://alice.dev")),
            ("https://alice.dev/", Some("https://alice.dev")),
            ("  HTTPS://Alice.DEV/Posts?page=2  ", Some("https://alice.dev/Posts?page=2")),
            ("https://alice.dev:443/#about", Some("https://alice.dev")),
            ("https://alice.dev:8443/x", Some("https://alice.dev:8443/x")),
            ("https://bücher.example/", Some("https://xn--bcher-kva.example")),
            // The scheme added when missing.
            ("alice.dev", Some("https://alice.dev")),
            ("www.alice.dev/about/", Some("https://www.alice.dev/about/")),
            ("//alice.dev/x", Some("https://alice.dev/x")),
            ("alice.dev:8080/blog", Some("https://alice.dev:8080/blog")),
            // Not a website.
            ("", None),
            ("   ", None),
            ("alice", None),
            ("localhost:3000", None),
            ("https://localhost/", None),
            ("/u/alice", None),
            ("x:alice", None),
            ("github:alice", None),
            ("mailto:alice@alice.dev", None),
            ("javascript:alert(1)", None),
            ("ftp://files.alice.dev", None),
            ("file:///etc/passwd", None),
            ("https://alice:s3cret@alice.dev", None),
            ("https://", None),
            ("https://alice dev", None),
            ("https://alice.dev/my blog", None),
            ("http://192.0.2.7/home", None),
            ("N/A", None),
            ("me@example.com", None),
            ("https://[2001:db8::1]/", None),
        ];
        for (raw, expected) in cases {
            check(raw, *expected);
        }
        check(&format!("https://alice.dev/{}", "a".repeat(MAX_WEBSITE_CHARS)), None);
        // Whatever the profile says, a link never reads as an account (`platform:handle`).
        for (raw, _) in cases {
            assert!(website(raw).is_none_or(|link| link.starts_with("http")), "{raw:?}");
        }
    }
}
