//! The definition of a declarative source, as written in TOML, and the
//! checks serde makes while reading it: a JSON pointer, a template, a
//! transform, a pagination kind or an auth kind that is wrong is a
//! deserialization error, reported by the daemon at the value's line.

use std::{fmt, marker::PhantomData, num::NonZeroU32};

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, SeqAccess, Visitor, value::MapAccessDeserializer},
};
use tributary_sdk::{Kind, SecretRef};

pub use super::template::{BodyTemplate, ItemTemplate, Pointer, RequestTemplate};

/// `[sources.NAME]` of `type = "http"`, without the daemon's common keys
/// (`schedule`, `jitter`, `requests_per_second`, `timeout`, `enabled`,
/// `since`, `on_delete`): any JSON API, described instead of programmed.
/// See the module documentation for the whole format.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    /// The platform name written on every contribution, e.g. `hackernews`:
    /// lowercase letters, digits, `_` and `-`.
    pub platform: String,
    /// The request URL, a template: `{since_unix}`, `{since_unix_ms}`,
    /// `{since_rfc3339}`, `{since_date}`, `{page}`, `{offset}`, `{limit}`,
    /// `{cursor}` and `{stream}` are filled in (percent-encoded) for each
    /// request; `{{` and `}}` are literal braces. Scheme and host must be
    /// literal.
    pub url: RequestTemplate,
    /// `GET` (the default) or `POST`.
    #[serde(default)]
    pub method: Method,
    /// The JSON body of each request (a TOML table), for `POST` APIs. Its
    /// strings take `url`'s placeholders, and any other brace is text (a
    /// GraphQL query needs no escapes; `{{page}}` is the literal `{page}`).
    /// A string that is exactly one placeholder becomes a number for
    /// `{since_unix}`, `{since_unix_ms}`, `{page}`, `{offset}` and `{limit}`,
    /// and `null` for a `{cursor}` not known yet (the first page).
    #[serde(default)]
    pub body: Option<BodyTemplate>,
    /// Query parameters added to `url`, in order; values are templates (not
    /// percent-encoded by hand: they are encoded when sent). A parameter
    /// whose template needs a value that is not known yet (`{cursor}` on the
    /// first page) is left out.
    #[serde(default)]
    pub query: Pairs<RequestTemplate>,
    /// Extra request headers, as written (credentials belong in `auth`).
    #[serde(default)]
    pub headers: Pairs<String>,
    /// How requests authenticate; none by default.
    #[serde(default)]
    pub auth: AuthConfig,
    /// How one pass pages through the results; a single request by default.
    #[serde(default)]
    pub pagination: PaginationConfig,
    /// JSON pointer (RFC 6901) to the array of items in each answer, e.g.
    /// `/hits`; `""` when the answer is the array itself.
    pub items: Pointer,
    /// How each item becomes a contribution.
    #[serde(deserialize_with = "FieldsConfig::deserialize_checked")]
    pub fields: FieldsConfig,
    /// What moves the incremental position: `created_at`, `updated_at`
    /// (else `created_at` when an item has none), or an item's own time,
    /// `{ pointer = "/last_activity_date", transform = "unix" }`. The newest
    /// such time committed, minus `overlap_seconds`, fills `{since_*}` on the
    /// next pass.
    pub watermark: WatermarkSpec,
    /// Several searches of one API, polled in turn with one watermark each
    /// (e.g. the stories and the comments of Hacker News). Each adds its
    /// `query` to the definition's; none: one stream.
    #[serde(default, deserialize_with = "deserialize_streams")]
    pub streams: Vec<StreamConfig>,
    /// Later passes ask again for this many seconds before the watermark, to
    /// catch late-indexed items and edits (unchanged ones are dropped by the
    /// daemon's ledger). 0 by default.
    #[serde(default)]
    pub overlap_seconds: u64,
    /// How far back a first pass looks when the daemon gives no `since`
    /// (seconds, 1 day by default).
    #[serde(default = "default_lookback_seconds")]
    pub lookback_seconds: u64,
    /// The API lists items newest first and may ignore the `{since_*}`
    /// filter: a pass ends at the first item older than the watermark.
    #[serde(default)]
    pub newest_first: bool,
    /// Most pages one stream fetches in one poll; a longer pass is paused
    /// there and resumed by the next poll, so nothing is skipped.
    #[serde(default = "default_max_pages_per_poll")]
    pub max_pages_per_poll: NonZeroU32,
}

fn default_lookback_seconds() -> u64 {
    86_400
}

fn default_max_pages_per_poll() -> NonZeroU32 {
    NonZeroU32::MIN.saturating_add(9)
}

impl HttpSourceConfig {
    /// The platform name written on every contribution.
    pub fn platform(&self) -> &str {
        &self.platform
    }

    /// Sources with equal keys spend one rate budget: the URL's host and
    /// the credential's reference (an environment variable's name, a file's
    /// path), never its value.
    pub fn credential_key(&self) -> String {
        let host = self.url.literal_origin();
        let auth = match &self.auth {
            AuthConfig::None {} => "none".to_owned(),
            AuthConfig::Bearer { token } => format!("bearer {token:?}"),
            AuthConfig::Basic { username, password } => format!("basic {username:?} {password:?}"),
            AuthConfig::Header { name, value } => format!("header {} {value:?}", name.to_ascii_lowercase()),
            AuthConfig::Query { name, value } => format!("query {name} {value:?}"),
        };
        format!("http {host} {auth}")
    }
}

/// `method`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Method {
    #[default]
    #[serde(alias = "get")]
    GET,
    #[serde(alias = "post")]
    POST,
}

/// One entry of `streams`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// The stream's name: in the cursor, and in `{stream}`.
    pub name: String,
    /// Query parameters added to the definition's `query` (replacing one of
    /// the same name).
    #[serde(default)]
    pub query: Pairs<RequestTemplate>,
    /// The kind of this stream's items, instead of `fields.kind`.
    #[serde(default)]
    pub kind: Option<KindSpec>,
}

fn deserialize_streams<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<StreamConfig>, D::Error> {
    let streams = Vec::<StreamConfig>::deserialize(deserializer)?;
    for (index, stream) in streams.iter().enumerate() {
        if stream.name.trim().is_empty() {
            return Err(de::Error::custom("every stream needs a `name`"));
        }
        if streams[..index].iter().any(|other| other.name == stream.name) {
            return Err(de::Error::custom(format!("two streams are named `{}`", stream.name)));
        }
    }
    Ok(streams)
}

/// `auth`, by `kind`. Secrets are references: `{ env = "NAME" }` or
/// `{ file = "/path" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// No credentials.
    None {},
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token.
        token: SecretRef,
    },
    /// HTTP basic authentication.
    Basic {
        /// The user name: a plain string, or a secret reference when the
        /// API takes a key there (Freshdesk).
        username: Credential,
        /// The password: a secret reference, or a plain string when it is
        /// a fixed filler (Freshdesk's `X`).
        password: Credential,
    },
    /// A header of the API's own, e.g. `X-Api-Key`.
    Header {
        /// The header's name.
        name: String,
        /// Its value.
        value: SecretRef,
    },
    /// A query parameter, e.g. Stack Exchange's `key`; it is left out of
    /// stored cursors and never shown (errors and logs name no query).
    Query {
        /// The parameter's name.
        name: String,
        /// Its value.
        value: SecretRef,
    },
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig::None {}
    }
}

/// A plain string, or a secret reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Plain(String),
    Secret(SecretRef),
}

impl<'de> Deserialize<'de> for Credential {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CredentialVisitor;
        impl<'de> Visitor<'de> for CredentialVisitor {
            type Value = Credential;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, or a secret reference such as { env = \"NAME\" }")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Credential, E> {
                Ok(Credential::Plain(value.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Credential, A::Error> {
                SecretRef::deserialize(MapAccessDeserializer::new(map)).map(Credential::Secret)
            }
        }
        deserializer.deserialize_any(CredentialVisitor)
    }
}

/// `pagination`, by `kind`. Every kind also ends a pass on a page without
/// items.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PaginationConfig {
    /// One request per pass.
    None {},
    /// A page number.
    Page {
        /// The query parameter carrying it; without one, `{page}` must
        /// appear in `url`, `query` or `body`.
        #[serde(default)]
        param: Option<String>,
        /// The first page's number (1 by default; Algolia counts from 0).
        #[serde(default = "default_start")]
        start: u64,
        /// Pointer to a boolean of the answer saying whether more pages follow.
        #[serde(default)]
        has_more: Option<Pointer>,
        /// Pointer to the number of pages of the answer (Algolia's `/nbPages`).
        #[serde(default)]
        total_pages: Option<Pointer>,
        /// The items a full page holds: a shorter page is the last one.
        #[serde(default)]
        page_size: Option<u64>,
    },
    /// An item offset, advanced by the number of items received.
    Offset {
        /// The query parameter carrying it; without one, `{offset}` must
        /// appear in `url`, `query` or `body`.
        #[serde(default)]
        param: Option<String>,
        /// The query parameter carrying `limit`, if any (else `{limit}`).
        #[serde(default)]
        limit_param: Option<String>,
        /// Items asked per page: a shorter page is the last one.
        limit: u64,
        /// Pointer to a boolean saying whether more items follow.
        #[serde(default)]
        has_more: Option<Pointer>,
        /// Pointer to the total number of items.
        #[serde(default)]
        total: Option<Pointer>,
    },
    /// An opaque cursor read from each answer.
    Cursor {
        /// Pointer to the next page's cursor in the answer; absent, null or
        /// empty on the last page.
        pointer: Pointer,
        /// The query parameter carrying it; without one, `{cursor}` must
        /// appear in `url`, `query` or `body`.
        #[serde(default)]
        param: Option<String>,
        /// Pointer to a boolean saying whether more pages follow.
        #[serde(default)]
        has_more: Option<Pointer>,
    },
    /// The `Link` header's `rel="next"` URL (RFC 8288), as GitHub sends it.
    Link {},
    /// A URL of the next page in the answer.
    NextUrl {
        /// Pointer to it; absent, null or empty on the last page.
        pointer: Pointer,
    },
    /// Keyset paging on the watermark, for lists sorted oldest first with an
    /// inclusive `{since_*}` filter (Stack Exchange's `sort=activity&min=`):
    /// each page commits its newest time and the next page asks from there.
    Watermark {
        /// The query parameter of a page number, used only while a whole page
        /// shares one time (else the next request would repeat itself).
        #[serde(default)]
        param: Option<String>,
        /// The first page's number (1 by default).
        #[serde(default = "default_start")]
        start: u64,
        /// Pointer to a boolean saying whether more items follow.
        #[serde(default)]
        has_more: Option<Pointer>,
        /// The items a full page holds: a shorter page is the last one.
        #[serde(default)]
        page_size: Option<u64>,
    },
}

fn default_start() -> u64 {
    1
}

impl Default for PaginationConfig {
    fn default() -> Self {
        PaginationConfig::None {}
    }
}

/// `watermark`.
#[derive(Debug, Clone, PartialEq)]
pub enum WatermarkSpec {
    CreatedAt,
    UpdatedAt,
    /// An item's own time (else its `created_at`, when absent).
    Field(FieldSpec<TimeTransform>),
}

impl<'de> Deserialize<'de> for WatermarkSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WatermarkVisitor;
        impl<'de> Visitor<'de> for WatermarkVisitor {
            type Value = WatermarkSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`created_at`, `updated_at`, a JSON pointer, or { pointer = \"..\", transform = \"..\" }")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<WatermarkSpec, E> {
                match value {
                    "created_at" => Ok(WatermarkSpec::CreatedAt),
                    "updated_at" => Ok(WatermarkSpec::UpdatedAt),
                    _ if value.starts_with('/') => {
                        FieldSpec::parse_str(value).map(WatermarkSpec::Field).map_err(E::custom)
                    }
                    _ => Err(E::custom(format!(
                        "watermark `{value}` is neither `created_at`, `updated_at` nor a JSON pointer"
                    ))),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<WatermarkSpec, A::Error> {
                let source = FieldSource::<TimeTransform>::from_table(map)?;
                Ok(WatermarkSpec::Field(FieldSpec(vec![source])))
            }
        }
        deserializer.deserialize_any(WatermarkVisitor)
    }
}

/// `fields`: where each part of a contribution is read in an item.
///
/// A field is a JSON pointer (`"/objectID"`), a template with pointers in
/// braces (`"https://news.ycombinator.com/item?id={/objectID}"`: absent when
/// one of its pointers is), a table `{ pointer = "..", transform = "..",
/// when = ".." }` or `{ template = "..", ... }`, or a list of these: the
/// first that gives a value wins. Text is trimmed, and blank text counts as
/// absent. `when` reads the field only if that pointer holds a value (not
/// null, blank or `false`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldsConfig {
    /// The item's id, unique within the source (required).
    pub id: FieldSpec<TextTransform>,
    /// When it was written (required); transforms `unix`, `unix_ms`,
    /// `rfc3339`, else numbers are Unix seconds and strings RFC 3339.
    pub created_at: FieldSpec<TimeTransform>,
    /// When it was last edited.
    #[serde(default)]
    pub updated_at: Option<FieldSpec<TimeTransform>>,
    /// Its title (this or `body` is required).
    #[serde(default)]
    pub title: Option<FieldSpec<TextTransform>>,
    /// Its text (this or `title` is required); `html_to_text` for HTML.
    #[serde(default)]
    pub body: Option<FieldSpec<TextTransform>>,
    /// Where a person reads it.
    #[serde(default)]
    pub url: Option<FieldSpec<TextTransform>>,
    /// The author's stable id on the platform (by default the handle).
    #[serde(default)]
    pub author_id: Option<FieldSpec<TextTransform>>,
    /// The author's user name.
    #[serde(default)]
    pub author_handle: Option<FieldSpec<TextTransform>>,
    /// The author's display name.
    #[serde(default)]
    pub author_name: Option<FieldSpec<TextTransform>>,
    /// The author's e-mail address, where the API gives it.
    #[serde(default)]
    pub author_email: Option<FieldSpec<TextTransform>>,
    /// The author's profile page.
    #[serde(default)]
    pub author_url: Option<FieldSpec<TextTransform>>,
    /// The id of the item it answers.
    #[serde(default)]
    pub parent_id: Option<FieldSpec<TextTransform>>,
    /// The id of its thread's first item.
    #[serde(default)]
    pub thread_id: Option<FieldSpec<TextTransform>>,
    /// Its kind: a constant (`"comment"`), or `{ pointer = "/type", map = {
    /// question = "post", answer = "reply" }, default = "post" }`; `post`
    /// when not given.
    #[serde(default)]
    pub kind: Option<KindSpec>,
    /// Its tags: a pointer to a list (or to one string), or `{ pointer =
    /// "/labels", item = "/name", only = ["bug"] }`.
    #[serde(default)]
    pub tags: Option<TagsSpec>,
    /// Its score (votes, likes, points): a number, or a string holding one.
    #[serde(default)]
    pub score: Option<FieldSpec<TextTransform>>,
    /// Whether it was deleted (its body is then left empty).
    #[serde(default)]
    pub deleted: Option<FlagSpec>,
    /// Whether it was edited; by default, whether `updated_at` is later than
    /// `created_at`.
    #[serde(default)]
    pub edited: Option<FlagSpec>,
}

impl FieldsConfig {
    fn deserialize_checked<'de, D: Deserializer<'de>>(deserializer: D) -> Result<FieldsConfig, D::Error> {
        let fields = FieldsConfig::deserialize(deserializer)?;
        if fields.body.is_none() && fields.title.is_none() {
            return Err(de::Error::custom("`fields` needs a `body` or a `title`"));
        }
        Ok(fields)
    }
}

/// A transform of a field's value.
pub trait Transform: Sized + Copy + fmt::Debug + PartialEq + for<'de> Deserialize<'de> {}

/// Transforms of text fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextTransform {
    /// HTML to plain text (tags dropped, entities decoded).
    HtmlToText,
    /// Plain text tidied: blank-line runs folded, control characters dropped.
    Text,
}

impl Transform for TextTransform {}

/// How a time field is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeTransform {
    /// Unix seconds (a number or a string of digits).
    Unix,
    /// Unix milliseconds.
    UnixMs,
    /// RFC 3339 (also `+0000` offsets, and times without an offset as UTC).
    Rfc3339,
}

impl Transform for TimeTransform {}

/// A field: alternatives, the first that gives a value wins.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSpec<T>(pub Vec<FieldSource<T>>);

/// One way of reading a field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSource<T> {
    pub from: ValueFrom,
    pub transform: Option<T>,
    /// Read only when this pointer holds a value (not null, blank or `false`).
    pub when: Option<Pointer>,
}

/// Where a field's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueFrom {
    Pointer(Pointer),
    Template(ItemTemplate),
}

impl fmt::Display for ValueFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueFrom::Pointer(pointer) => write!(f, "{pointer}"),
            ValueFrom::Template(template) => f.write_str(&template.raw),
        }
    }
}

impl<T> fmt::Display for FieldSpec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, source) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(" or ")?;
            }
            write!(f, "`{}`", source.from)?;
        }
        Ok(())
    }
}

impl<T: Transform> FieldSource<T> {
    fn parse_str(value: &str) -> Result<FieldSource<T>, String> {
        let from = if value.contains(['{', '}']) {
            ValueFrom::Template(ItemTemplate::try_from(value.to_owned())?)
        } else {
            ValueFrom::Pointer(Pointer::try_from(value.to_owned())?)
        };
        Ok(FieldSource { from, transform: None, when: None })
    }

    fn from_table<'de, A: MapAccess<'de>>(map: A) -> Result<FieldSource<T>, A::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, bound = "T: Transform")]
        struct Table<T> {
            #[serde(default)]
            pointer: Option<Pointer>,
            #[serde(default)]
            template: Option<ItemTemplate>,
            #[serde(default)]
            transform: Option<T>,
            #[serde(default)]
            when: Option<Pointer>,
        }
        let table = Table::<T>::deserialize(MapAccessDeserializer::new(map))?;
        let from = match (table.pointer, table.template) {
            (Some(pointer), None) => ValueFrom::Pointer(pointer),
            (None, Some(template)) => ValueFrom::Template(template),
            _ => return Err(de::Error::custom("a field table needs either `pointer` or `template`")),
        };
        Ok(FieldSource { from, transform: table.transform, when: table.when })
    }
}

impl<T: Transform> FieldSpec<T> {
    fn parse_str(value: &str) -> Result<FieldSpec<T>, String> {
        FieldSource::parse_str(value).map(|source| FieldSpec(vec![source]))
    }
}

impl<'de, T: Transform> Deserialize<'de> for FieldSource<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SourceVisitor<T>(PhantomData<T>);
        impl<'de, T: Transform> Visitor<'de> for SourceVisitor<T> {
            type Value = FieldSource<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON pointer, a template, or a table { pointer = \"..\", transform = \"..\" }")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<FieldSource<T>, E> {
                FieldSource::parse_str(value).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FieldSource<T>, A::Error> {
                FieldSource::from_table(map)
            }
        }
        deserializer.deserialize_any(SourceVisitor(PhantomData))
    }
}

impl<'de, T: Transform> Deserialize<'de> for FieldSpec<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpecVisitor<T>(PhantomData<T>);
        impl<'de, T: Transform> Visitor<'de> for SpecVisitor<T> {
            type Value = FieldSpec<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON pointer (\"/id\"), a template (\"q:{/id}\"), a table { pointer = \"..\" }, or a list of these")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<FieldSpec<T>, E> {
                FieldSpec::parse_str(value).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FieldSpec<T>, A::Error> {
                FieldSource::from_table(map).map(|source| FieldSpec(vec![source]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FieldSpec<T>, A::Error> {
                let mut sources = Vec::new();
                while let Some(source) = seq.next_element::<FieldSource<T>>()? {
                    sources.push(source);
                }
                if sources.is_empty() {
                    return Err(de::Error::custom("an empty list of alternatives"));
                }
                Ok(FieldSpec(sources))
            }
        }
        deserializer.deserialize_any(SpecVisitor(PhantomData))
    }
}

/// `fields.kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum KindSpec {
    Constant(Kind),
    Read {
        /// Where the item says what it is (a value, or a list of values: the
        /// first one mapped wins).
        pointer: Pointer,
        /// The item's values, to kinds; without a map the value must be a
        /// kind's name.
        map: Vec<(String, Kind)>,
        /// The kind of an item whose value is absent or not mapped (else it is
        /// quarantined).
        default: Option<Kind>,
    },
}

impl<'de> Deserialize<'de> for KindSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl<'de> Visitor<'de> for KindVisitor {
            type Value = KindSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a kind (post, comment, reply, review, ticket, ticket_comment, mention, message), a JSON pointer, or { pointer = \"..\", map = { .. }, default = \"..\" }")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<KindSpec, E> {
                if value.starts_with('/') {
                    let pointer = Pointer::try_from(value.to_owned()).map_err(E::custom)?;
                    return Ok(KindSpec::Read { pointer, map: Vec::new(), default: None });
                }
                parse_kind(value).map(KindSpec::Constant).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<KindSpec, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Table {
                    pointer: Pointer,
                    #[serde(default)]
                    map: Pairs<Kind>,
                    #[serde(default)]
                    default: Option<Kind>,
                }
                let table = Table::deserialize(MapAccessDeserializer::new(map))?;
                Ok(KindSpec::Read { pointer: table.pointer, map: table.map.0, default: table.default })
            }
        }
        deserializer.deserialize_any(KindVisitor)
    }
}

/// A kind by its name.
pub(super) fn parse_kind(name: &str) -> Result<Kind, String> {
    Kind::deserialize(de::value::StrDeserializer::<de::value::Error>::new(name)).map_err(|_| {
        format!(
            "unknown kind `{name}`: expected post, comment, reply, review, ticket, ticket_comment, mention or message"
        )
    })
}

/// `fields.tags`: a pointer to a list of tags (strings or numbers) or to
/// one string, or a table.
#[derive(Debug, Clone, PartialEq)]
pub struct TagsSpec {
    /// A list of tags (strings, or objects read with `item`), or one string.
    pub pointer: Pointer,
    /// In each element of the list, where the tag's name is (`/name`).
    pub item: Option<Pointer>,
    /// Keep only these tags (e.g. the ones that say what the item is).
    pub only: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for TagsSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TagsVisitor;
        impl<'de> Visitor<'de> for TagsVisitor {
            type Value = TagsSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON pointer, or { pointer = \"..\", item = \"..\", only = [..] }")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<TagsSpec, E> {
                let pointer = Pointer::try_from(value.to_owned()).map_err(E::custom)?;
                Ok(TagsSpec { pointer, item: None, only: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TagsSpec, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Table {
                    pointer: Pointer,
                    #[serde(default)]
                    item: Option<Pointer>,
                    #[serde(default)]
                    only: Option<Vec<String>>,
                }
                let table = Table::deserialize(MapAccessDeserializer::new(map))?;
                Ok(TagsSpec { pointer: table.pointer, item: table.item, only: table.only })
            }
        }
        deserializer.deserialize_any(TagsVisitor)
    }
}

/// `fields.deleted` and `fields.edited`: a pointer to a flag (`true`, a
/// non-zero number, `"true"`, `"yes"`, `"1"`), `{ pointer = "/status",
/// equals = ["deleted"] }`, `{ missing = ["/author", "/text"] }` (all absent
/// or blank) or `{ present = ["/last_edit_date"] }` (all there).
#[derive(Debug, Clone, PartialEq)]
pub enum FlagSpec {
    /// Set when the value is truthy, or (with `equals`) one of these values.
    Pointer { pointer: Pointer, equals: Option<Vec<String>> },
    /// Set when none of these holds a value.
    Missing(Vec<Pointer>),
    /// Set when all of these hold a value.
    Present(Vec<Pointer>),
}

impl<'de> Deserialize<'de> for FlagSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl<'de> Visitor<'de> for FlagVisitor {
            type Value = FlagSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a JSON pointer, { pointer = \"..\", equals = [..] }, { missing = [..] } or { present = [..] }",
                )
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<FlagSpec, E> {
                let pointer = Pointer::try_from(value.to_owned()).map_err(E::custom)?;
                Ok(FlagSpec::Pointer { pointer, equals: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FlagSpec, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Table {
                    #[serde(default)]
                    pointer: Option<Pointer>,
                    #[serde(default)]
                    equals: Option<Vec<String>>,
                    #[serde(default)]
                    missing: Option<Vec<Pointer>>,
                    #[serde(default)]
                    present: Option<Vec<Pointer>>,
                }
                let table = Table::deserialize(MapAccessDeserializer::new(map))?;
                match (table.pointer, table.missing, table.present) {
                    (Some(pointer), None, None) => Ok(FlagSpec::Pointer { pointer, equals: table.equals }),
                    (None, Some(missing), None) if table.equals.is_none() && !missing.is_empty() => {
                        Ok(FlagSpec::Missing(missing))
                    }
                    (None, None, Some(present)) if table.equals.is_none() && !present.is_empty() => {
                        Ok(FlagSpec::Present(present))
                    }
                    _ => Err(de::Error::custom(
                        "a flag needs one of `pointer` (with `equals` if any), a non-empty `missing` or a non-empty `present`",
                    )),
                }
            }
        }
        deserializer.deserialize_any(FlagVisitor)
    }
}

/// Key-value pairs of a TOML table, in the order they were written.
#[derive(Debug, Clone, PartialEq)]
pub struct Pairs<T>(pub Vec<(String, T)>);

impl<T> Default for Pairs<T> {
    fn default() -> Self {
        Pairs(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Pairs<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for PairsVisitor<T> {
            type Value = Pairs<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs<T>, A::Error> {
                let mut pairs = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, T>()? {
                    pairs.push((key, value));
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor(PhantomData))
    }
}
