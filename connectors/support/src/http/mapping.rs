//! From one item of an answer to a contribution, as `fields` says.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value;
use tributary_sdk::{
    Author, Contribution, Kind,
    text::{html_to_text, tidy},
};

use super::config::{
    FieldSource, FieldSpec, FieldsConfig, FlagSpec, KindSpec, TagsSpec, TextTransform, TimeTransform, ValueFrom,
    WatermarkSpec, parse_kind,
};
use super::template::ItemPiece;

/// Reads the items of one stream.
pub(super) struct Mapper<'a> {
    pub platform: &'a str,
    pub instance: &'a str,
    pub fields: &'a FieldsConfig,
    /// The stream's kind, else `fields.kind`.
    pub kind: Option<&'a KindSpec>,
    pub watermark: &'a WatermarkSpec,
}

/// A value found in an item: JSON, or the text a template made.
enum Raw<'a> {
    Json(&'a Value),
    Text(String),
}

/// A value that is there: not null, and not blank text.
pub(super) fn present(value: Option<&Value>) -> Option<&Value> {
    value.filter(|value| match value {
        Value::Null => false,
        Value::String(text) => !text.trim().is_empty(),
        _ => true,
    })
}

/// A string (trimmed), number or boolean, as text.
pub(super) fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.trim().to_owned()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// A flag's truth: `true`, a non-zero number, `"true"`, `"yes"` or `"1"`.
pub(super) fn truthy(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(flag)) => *flag,
        Some(Value::Number(number)) => number.as_f64().is_some_and(|n| n != 0.0),
        Some(Value::String(text)) => matches!(text.trim().to_ascii_lowercase().as_str(), "true" | "yes" | "1"),
        _ => false,
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// What one way of reading a field finds; `None` when it finds nothing.
fn raw<'a, T>(source: &FieldSource<T>, item: &'a Value) -> Result<Option<Raw<'a>>, String> {
    if let Some(when) = &source.when
        && present(when.resolve(item)).is_none_or(|value| *value == Value::Bool(false))
    {
        return Ok(None);
    }
    match &source.from {
        ValueFrom::Pointer(pointer) => Ok(present(pointer.resolve(item)).map(Raw::Json)),
        ValueFrom::Template(template) => {
            let mut out = String::new();
            for piece in &template.pieces {
                match piece {
                    ItemPiece::Text(text) => out.push_str(text),
                    ItemPiece::Pointer(pointer) => {
                        let Some(value) = present(pointer.resolve(item)) else {
                            return Ok(None);
                        };
                        let text = scalar_text(value)
                            .ok_or_else(|| format!("{pointer} holds {}, not text", describe(value)))?;
                        out.push_str(&text);
                    }
                }
            }
            Ok(Some(Raw::Text(out)))
        }
    }
}

fn text(name: &str, spec: Option<&FieldSpec<TextTransform>>, item: &Value) -> Result<Option<String>, String> {
    let Some(spec) = spec else { return Ok(None) };
    for source in &spec.0 {
        let found = raw(source, item).map_err(|why| format!("`{name}`: {why}"))?;
        let text = match found {
            None => continue,
            Some(Raw::Text(text)) => text,
            Some(Raw::Json(value)) => scalar_text(value)
                .ok_or_else(|| format!("`{name}` at {} is {}, not text", source.from, describe(value)))?,
        };
        let text = match source.transform {
            Some(TextTransform::HtmlToText) => html_to_text(&text),
            Some(TextTransform::Text) => tidy(&text),
            None => text.trim().to_owned(),
        };
        if !text.is_empty() {
            return Ok(Some(text));
        }
    }
    Ok(None)
}

fn time(name: &str, spec: Option<&FieldSpec<TimeTransform>>, item: &Value) -> Result<Option<DateTime<Utc>>, String> {
    let Some(spec) = spec else { return Ok(None) };
    for source in &spec.0 {
        let found = raw(source, item).map_err(|why| format!("`{name}`: {why}"))?;
        let Some(found) = found else { continue };
        return parse_time(&found, source.transform)
            .map(Some)
            .map_err(|why| format!("`{name}` at {}: {why}", source.from));
    }
    Ok(None)
}

fn parse_time(found: &Raw, transform: Option<TimeTransform>) -> Result<DateTime<Utc>, String> {
    let (number, text) = match found {
        Raw::Json(Value::Number(number)) => (number.as_f64(), number.to_string()),
        Raw::Json(Value::String(text)) => (None, text.trim().to_owned()),
        Raw::Text(text) => (None, text.trim().to_owned()),
        Raw::Json(other) => return Err(format!("{} is not a time", describe(other))),
    };
    let numeric = || number.or_else(|| text.parse::<f64>().ok()).filter(|n| n.is_finite());
    let transform = transform.unwrap_or(if numeric().is_some() { TimeTransform::Unix } else { TimeTransform::Rfc3339 });
    let out_of_range = || format!("`{text}` is not a valid time");
    match transform {
        TimeTransform::Unix => {
            let seconds = numeric().ok_or_else(|| format!("`{text}` is not a Unix time (seconds)"))?;
            if !(-1e13..=1e13).contains(&seconds) {
                return Err(out_of_range());
            }
            let whole = seconds.floor();
            let nanos = ((seconds - whole) * 1e9).round().clamp(0.0, 999_999_999.0) as u32;
            DateTime::from_timestamp(whole as i64, nanos).ok_or_else(out_of_range)
        }
        TimeTransform::UnixMs => {
            let millis = numeric().ok_or_else(|| format!("`{text}` is not a Unix time (milliseconds)"))?;
            if !(-1e16..=1e16).contains(&millis) {
                return Err(out_of_range());
            }
            DateTime::from_timestamp_millis(millis.round() as i64).ok_or_else(out_of_range)
        }
        TimeTransform::Rfc3339 => parse_rfc3339(&text).ok_or_else(|| format!("`{text}` is not an RFC 3339 time")),
    }
}

/// RFC 3339, and its common relatives: a `+0000` offset, a space for the
/// `T`, no offset at all (read as UTC).
fn parse_rfc3339(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.to_utc());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(at) = DateTime::parse_from_str(text, format) {
            return Some(at.to_utc());
        }
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Some(at.and_utc());
        }
    }
    None
}

fn flag(spec: &FlagSpec, item: &Value) -> bool {
    match spec {
        FlagSpec::Pointer { pointer, equals: None } => truthy(pointer.resolve(item)),
        FlagSpec::Pointer { pointer, equals: Some(values) } => present(pointer.resolve(item))
            .and_then(scalar_text)
            .is_some_and(|text| values.iter().any(|value| value.trim() == text)),
        FlagSpec::Missing(pointers) => pointers.iter().all(|pointer| present(pointer.resolve(item)).is_none()),
        FlagSpec::Present(pointers) => pointers.iter().all(|pointer| present(pointer.resolve(item)).is_some()),
    }
}

fn kind(spec: Option<&KindSpec>, item: &Value) -> Result<Kind, String> {
    let (pointer, map, default) = match spec {
        None => return Ok(Kind::Post),
        Some(KindSpec::Constant(kind)) => return Ok(*kind),
        Some(KindSpec::Read { pointer, map, default }) => (pointer, map, default),
    };
    let candidates: Vec<String> = match present(pointer.resolve(item)) {
        Some(Value::Array(values)) => values.iter().filter_map(scalar_text).collect(),
        Some(value) => scalar_text(value).into_iter().collect(),
        None => Vec::new(),
    };
    for candidate in &candidates {
        let found = if map.is_empty() {
            parse_kind(candidate).ok()
        } else {
            map.iter().find(|(value, _)| value == candidate).map(|(_, kind)| *kind)
        };
        if let Some(kind) = found {
            return Ok(kind);
        }
    }
    default.ok_or_else(|| match candidates.first() {
        Some(value) => {
            format!("`kind`: `{value}` at {pointer} is not mapped to a kind (add it to `map`, or set `default`)")
        }
        None => format!("`kind`: nothing at {pointer}, and no `default`"),
    })
}

fn tags(spec: Option<&TagsSpec>, item: &Value) -> Vec<String> {
    let Some(spec) = spec else { return Vec::new() };
    let elements: Vec<&Value> = match spec.pointer.resolve(item) {
        Some(Value::Array(values)) => values.iter().collect(),
        Some(Value::Null) | None => Vec::new(),
        Some(value) => vec![value],
    };
    elements
        .into_iter()
        .filter_map(|element| match &spec.item {
            Some(inner) => inner.resolve(element),
            None => Some(element),
        })
        .filter(|value| matches!(value, Value::String(_) | Value::Number(_)))
        .filter_map(scalar_text)
        .filter(|tag| !tag.is_empty())
        .filter(|tag| spec.only.as_ref().is_none_or(|only| only.iter().any(|kept| kept == tag)))
        .collect()
}

impl Mapper<'_> {
    /// The item's id, when it can be read (for a quarantine record).
    pub fn id(&self, item: &Value) -> Option<String> {
        text("id", Some(&self.fields.id), item).ok().flatten()
    }

    /// The time that moves the watermark; `None` when the item has none.
    pub fn watermark(&self, item: &Value) -> Result<Option<DateTime<Utc>>, String> {
        let created = || time("created_at", Some(&self.fields.created_at), item);
        match self.watermark {
            WatermarkSpec::CreatedAt => created(),
            WatermarkSpec::UpdatedAt => match time("updated_at", self.fields.updated_at.as_ref(), item)? {
                Some(at) => Ok(Some(at)),
                None => created(),
            },
            WatermarkSpec::Field(spec) => match time("watermark", Some(spec), item)? {
                Some(at) => Ok(Some(at)),
                None => created(),
            },
        }
    }

    pub fn contribution(&self, item: &Value) -> Result<Contribution, String> {
        let fields = self.fields;
        if !item.is_object() {
            return Err(format!("the item is {}, not an object", describe(item)));
        }
        let external_id =
            text("id", Some(&fields.id), item)?.ok_or_else(|| format!("the item has no `id` ({})", fields.id))?;
        let created_at = time("created_at", Some(&fields.created_at), item)?
            .ok_or_else(|| format!("the item has no `created_at` ({})", fields.created_at))?;
        let updated_at = time("updated_at", fields.updated_at.as_ref(), item)?;
        let kind = kind(self.kind.or(fields.kind.as_ref()), item)?;
        let deleted = fields.deleted.as_ref().is_some_and(|spec| flag(spec, item));
        let edited = match &fields.edited {
            Some(spec) => flag(spec, item),
            None => updated_at.is_some_and(|updated| updated > created_at),
        };
        let title = text("title", fields.title.as_ref(), item)?;
        // A deleted item's text is gone: whatever is left of it is not kept.
        let body = if deleted { String::new() } else { text("body", fields.body.as_ref(), item)?.unwrap_or_default() };
        let handle = text("author_handle", fields.author_handle.as_ref(), item)?;
        let author_id = match &fields.author_id {
            Some(spec) => text("author_id", Some(spec), item)?.unwrap_or_default(),
            None => handle.clone().unwrap_or_default(),
        };
        let score = match text("score", fields.score.as_ref(), item)? {
            None => None,
            Some(score) => Some(score.parse::<f64>().ok().filter(|n| n.is_finite()).ok_or_else(|| {
                let spec = fields.score.as_ref().map(ToString::to_string).unwrap_or_default();
                format!("`score` ({spec}): `{score}` is not a number")
            })?),
        };
        Ok(Contribution {
            platform: self.platform.to_owned(),
            source: self.instance.to_owned(),
            external_id,
            url: text("url", fields.url.as_ref(), item)?,
            kind,
            author: Author {
                id: author_id,
                handle,
                display_name: text("author_name", fields.author_name.as_ref(), item)?,
                email: text("author_email", fields.author_email.as_ref(), item)?,
                profile_url: text("author_url", fields.author_url.as_ref(), item)?,
                links: Vec::new(),
            },
            title,
            body,
            language: None,
            created_at,
            updated_at,
            parent_id: text("parent_id", fields.parent_id.as_ref(), item)?,
            thread_id: text("thread_id", fields.thread_id.as_ref(), item)?,
            tags: tags(fields.tags.as_ref(), item),
            score,
            edited,
            deleted,
            signals: None,
        })
    }
}
