//! Filling in a request: the placeholders' values, and reading where the
//! next page is.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use url::Url;

use super::template::{BodyNode, RequestPiece, RequestTemplate, Var};

/// The values of one request's placeholders.
pub(super) struct Vars<'a> {
    pub since: DateTime<Utc>,
    pub page: Option<u64>,
    pub offset: Option<u64>,
    pub limit: Option<u64>,
    pub cursor: Option<&'a str>,
    pub stream: &'a str,
}

pub(super) enum VarValue {
    Number(i64),
    Text(String),
}

impl Vars<'_> {
    pub fn value(&self, var: Var) -> Option<VarValue> {
        let number = |n: u64| VarValue::Number(i64::try_from(n).unwrap_or(i64::MAX));
        Some(match var {
            Var::SinceUnix => VarValue::Number(self.since.timestamp()),
            Var::SinceUnixMs => VarValue::Number(self.since.timestamp_millis()),
            Var::SinceRfc3339 => VarValue::Text(self.since.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            Var::SinceDate => VarValue::Text(self.since.format("%Y-%m-%d").to_string()),
            Var::Page => number(self.page?),
            Var::Offset => number(self.offset?),
            Var::Limit => number(self.limit?),
            Var::Cursor => VarValue::Text(self.cursor?.to_owned()),
            Var::Stream => VarValue::Text(self.stream.to_owned()),
        })
    }

    pub fn text(&self, var: Var) -> Option<String> {
        self.value(var).map(|value| match value {
            VarValue::Number(n) => n.to_string(),
            VarValue::Text(text) => text,
        })
    }

    /// The template filled in; `None` when one of its values is not known.
    pub fn render(&self, template: &RequestTemplate, encode: bool) -> Option<String> {
        let mut out = String::new();
        for piece in &template.pieces {
            match piece {
                RequestPiece::Text(text) => out.push_str(text),
                RequestPiece::Var(var) => {
                    let value = self.text(*var)?;
                    out.push_str(&if encode { percent_encode(&value) } else { value });
                }
            }
        }
        Some(out)
    }

    /// The template filled in, unknown values left empty.
    pub fn render_lossy(&self, template: &RequestTemplate, encode: bool) -> String {
        let mut out = String::new();
        for piece in &template.pieces {
            match piece {
                RequestPiece::Text(text) => out.push_str(text),
                RequestPiece::Var(var) => {
                    let value = self.text(*var).unwrap_or_default();
                    out.push_str(&if encode { percent_encode(&value) } else { value });
                }
            }
        }
        out
    }

    pub fn body(&self, node: &BodyNode) -> Value {
        match node {
            BodyNode::Literal(value) => value.clone(),
            BodyNode::Array(nodes) => Value::Array(nodes.iter().map(|node| self.body(node)).collect()),
            BodyNode::Object(pairs) => {
                Value::Object(pairs.iter().map(|(key, node)| (key.clone(), self.body(node))).collect())
            }
            BodyNode::Text(template) => match template.pieces.as_slice() {
                [RequestPiece::Var(var)] => match self.value(*var) {
                    Some(VarValue::Number(n)) => Value::from(n),
                    Some(VarValue::Text(text)) => Value::String(text),
                    None => Value::Null,
                },
                _ => Value::String(self.render_lossy(template, false)),
            },
        }
    }
}

/// Percent-encodes all but RFC 3986's unreserved characters.
pub(super) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The `rel="next"` target of `Link` header values (RFC 8288).
pub(super) fn next_link<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<String> {
    for value in values {
        let mut rest = value;
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let close = after.find('>')?;
            let target = &after[..close];
            let mut params = &after[close + 1..];
            // The parameters run to the next comma outside quotes.
            let mut end = params.len();
            let mut quoted = false;
            for (at, c) in params.char_indices() {
                match c {
                    '"' => quoted = !quoted,
                    ',' if !quoted => {
                        end = at;
                        break;
                    }
                    _ => {}
                }
            }
            rest = &params[end..];
            params = &params[..end];
            let is_next = params.split(';').any(|param| {
                let Some((name, value)) = param.split_once('=') else { return false };
                name.trim().eq_ignore_ascii_case("rel")
                    && value
                        .trim()
                        .trim_matches('"')
                        .split_ascii_whitespace()
                        .any(|rel| rel.eq_ignore_ascii_case("next"))
            });
            if is_next {
                return Some(target.trim().to_owned());
            }
        }
    }
    None
}

/// `url` without the query parameter `name`.
pub(super) fn without_param(url: &Url, name: &str) -> Url {
    let mut out = url.clone();
    let kept: Vec<(String, String)> =
        url.query_pairs().filter(|(key, _)| key != name).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    if url.query().is_some() {
        out.set_query(None);
        if !kept.is_empty() {
            out.query_pairs_mut().extend_pairs(kept);
        }
    }
    out
}
