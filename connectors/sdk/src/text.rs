//! Turning what platforms send into clean plain text.

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
}
