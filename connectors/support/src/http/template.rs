//! Templates and JSON pointers, checked while the definition is read: a
//! bad pointer, an unbalanced brace or an unknown placeholder is a
//! deserialization error.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// A JSON pointer (RFC 6901): empty (the whole value), or `/`-separated
/// reference tokens where `~0` is `~` and `~1` is `/`; array elements by
/// index (`/hits/0`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Pointer(String);

impl TryFrom<String> for Pointer {
    type Error = String;
    fn try_from(value: String) -> Result<Pointer, String> {
        if !value.is_empty() && !value.starts_with('/') {
            return Err(format!(
                "`{value}` is not a JSON pointer (RFC 6901): it must be empty or start with `/`, e.g. `/{value}`"
            ));
        }
        let mut chars = value.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(format!(
                    "`{value}` is not a JSON pointer (RFC 6901): `~` must be written `~0`, and `/` in a name `~1`"
                ));
            }
        }
        Ok(Pointer(value))
    }
}

impl Pointer {
    /// The value it points to in `value`.
    pub fn resolve<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        value.pointer(&self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { f.write_str("(the whole value)") } else { f.write_str(&self.0) }
    }
}

/// The parts of a template: text, and names in braces.
fn split_braces(raw: &str) -> Result<Vec<(bool, String)>, String> {
    let mut parts: Vec<(bool, String)> = Vec::new();
    let mut literal = String::new();
    let mut chars = raw.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '{' if chars.peek().is_some_and(|(_, next)| *next == '{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek().is_some_and(|(_, next)| *next == '}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some((_, '}')) => break,
                        Some((_, '{')) => {
                            return Err(format!("template `{raw}`: `{{` inside a placeholder (at byte {at})"));
                        }
                        Some((_, c)) => name.push(c),
                        None => {
                            return Err(format!(
                                "template `{raw}`: the `{{` at byte {at} is never closed (write `{{{{` for a literal brace)"
                            ));
                        }
                    }
                }
                if name.trim().is_empty() {
                    return Err(format!("template `{raw}`: an empty placeholder `{{}}` at byte {at}"));
                }
                if !literal.is_empty() {
                    parts.push((false, std::mem::take(&mut literal)));
                }
                parts.push((true, name));
            }
            '}' => {
                return Err(format!(
                    "template `{raw}`: a `}}` at byte {at} closes nothing (write `}}}}` for a literal brace)"
                ));
            }
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        parts.push((false, literal));
    }
    Ok(parts)
}

/// A value a request template can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    SinceUnix,
    SinceUnixMs,
    SinceRfc3339,
    SinceDate,
    Page,
    Offset,
    Limit,
    Cursor,
    Stream,
}

impl Var {
    const ALL: [(&'static str, Var); 9] = [
        ("since_unix", Var::SinceUnix),
        ("since_unix_ms", Var::SinceUnixMs),
        ("since_rfc3339", Var::SinceRfc3339),
        ("since_date", Var::SinceDate),
        ("page", Var::Page),
        ("offset", Var::Offset),
        ("limit", Var::Limit),
        ("cursor", Var::Cursor),
        ("stream", Var::Stream),
    ];

    pub fn name(self) -> &'static str {
        Var::ALL.iter().find(|(_, var)| *var == self).map_or("?", |(name, _)| name)
    }
}

/// A piece of a request template.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestPiece {
    Text(String),
    Var(Var),
}

/// A template of the request (`url`, `query`, `body`): `{since_unix}`,
/// `{since_unix_ms}`, `{since_rfc3339}`, `{since_date}`, `{page}`,
/// `{offset}`, `{limit}`, `{cursor}`, `{stream}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct RequestTemplate {
    pub raw: String,
    pub pieces: Vec<RequestPiece>,
}

impl TryFrom<String> for RequestTemplate {
    type Error = String;
    fn try_from(raw: String) -> Result<RequestTemplate, String> {
        let mut pieces = Vec::new();
        for (is_name, text) in split_braces(&raw)? {
            if !is_name {
                pieces.push(RequestPiece::Text(text));
                continue;
            }
            pieces.push(RequestPiece::Var(known_var(&raw, text.trim(), "")?));
        }
        Ok(RequestTemplate { raw, pieces })
    }
}

/// The placeholder `name` of template `raw`.
fn known_var(raw: &str, name: &str, literal_hint: &str) -> Result<Var, String> {
    match Var::ALL.iter().find(|(known, _)| *known == name) {
        Some((_, var)) => Ok(*var),
        None => {
            let known: Vec<String> = Var::ALL.iter().map(|(known, _)| format!("{{{known}}}")).collect();
            let hint = if name.starts_with('/') { " (item pointers belong in `fields`)" } else { literal_hint };
            Err(format!("template `{raw}`: unknown placeholder `{{{name}}}`{hint}; known: {}", known.join(", ")))
        }
    }
}

impl RequestTemplate {
    /// A string of `body`: only `{name}` (letters, digits, `_`) is a
    /// placeholder and `{{name}}` its literal text; every other brace is
    /// text, so a GraphQL query needs no escapes.
    pub fn lenient(raw: String) -> Result<RequestTemplate, String> {
        /// A name at the start of `text`, and what follows it.
        fn name_of(text: &str) -> Option<(&str, &str)> {
            let end = text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len());
            (end > 0).then(|| text.split_at(end))
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = raw.as_str();
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let after = &rest[open..];
            if let Some(inner) = after.strip_prefix("{{")
                && let Some((name, tail)) = name_of(inner)
                && let Some(tail) = tail.strip_prefix("}}")
            {
                literal.push('{');
                literal.push_str(name);
                literal.push('}');
                rest = tail;
            } else if let Some((name, tail)) = name_of(&after[1..])
                && let Some(tail) = tail.strip_prefix('}')
            {
                let var = known_var(&raw, name, " (write `{{name}}` for the literal text)")?;
                if !literal.is_empty() {
                    pieces.push(RequestPiece::Text(std::mem::take(&mut literal)));
                }
                pieces.push(RequestPiece::Var(var));
                rest = tail;
            } else {
                literal.push('{');
                rest = &after[1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(RequestPiece::Text(literal));
        }
        Ok(RequestTemplate { raw, pieces })
    }

    pub fn uses(&self, var: Var) -> bool {
        self.pieces.contains(&RequestPiece::Var(var))
    }

    /// `scheme://host[:port]` as written (for the credential key), or the
    /// text before the first placeholder.
    pub fn literal_origin(&self) -> String {
        let text = match self.pieces.first() {
            Some(RequestPiece::Text(text)) => text.as_str(),
            _ => "",
        };
        match url::Url::parse(text) {
            Ok(url) if url.has_host() => url.origin().ascii_serialization(),
            _ => text.to_owned(),
        }
    }
}

/// A piece of an item template.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemPiece {
    Text(String),
    Pointer(Pointer),
}

/// A template of an item's field: JSON pointers in braces, e.g.
/// `q:{/question_id}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct ItemTemplate {
    pub raw: String,
    pub pieces: Vec<ItemPiece>,
}

impl TryFrom<String> for ItemTemplate {
    type Error = String;
    fn try_from(raw: String) -> Result<ItemTemplate, String> {
        let mut pieces = Vec::new();
        for (is_name, text) in split_braces(&raw)? {
            if !is_name {
                pieces.push(ItemPiece::Text(text));
                continue;
            }
            if !text.starts_with('/') {
                return Err(format!(
                    "template `{raw}`: placeholder `{{{text}}}` is not a JSON pointer; item fields take pointers such as `{{/id}}`"
                ));
            }
            let pointer = Pointer::try_from(text).map_err(|error| format!("template `{raw}`: {error}"))?;
            pieces.push(ItemPiece::Pointer(pointer));
        }
        Ok(ItemTemplate { raw, pieces })
    }
}

/// `body`: JSON whose strings are request templates, read leniently (see
/// [`RequestTemplate::lenient`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Value")]
pub struct BodyTemplate(pub BodyNode);

/// A node of [`BodyTemplate`].
#[derive(Debug, Clone, PartialEq)]
pub enum BodyNode {
    Literal(Value),
    Text(RequestTemplate),
    Array(Vec<BodyNode>),
    Object(Vec<(String, BodyNode)>),
}

impl TryFrom<Value> for BodyTemplate {
    type Error = String;
    fn try_from(value: Value) -> Result<BodyTemplate, String> {
        fn node(value: Value) -> Result<BodyNode, String> {
            Ok(match value {
                Value::String(text) => BodyNode::Text(RequestTemplate::lenient(text)?),
                Value::Array(values) => BodyNode::Array(values.into_iter().map(node).collect::<Result<_, _>>()?),
                Value::Object(map) => BodyNode::Object(
                    map.into_iter().map(|(key, value)| Ok((key, node(value)?))).collect::<Result<_, String>>()?,
                ),
                other => BodyNode::Literal(other),
            })
        }
        node(value).map(BodyTemplate)
    }
}

impl BodyTemplate {
    pub fn uses(&self, var: Var) -> bool {
        fn uses(node: &BodyNode, var: Var) -> bool {
            match node {
                BodyNode::Literal(_) => false,
                BodyNode::Text(template) => template.uses(var),
                BodyNode::Array(nodes) => nodes.iter().any(|node| uses(node, var)),
                BodyNode::Object(pairs) => pairs.iter().any(|(_, node)| uses(node, var)),
            }
        }
        uses(&self.0, var)
    }
}
