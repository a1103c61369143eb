//! A small validator for the subset of OpenAPI 3 that HubSpot's published
//! spec files use: `$ref`s into the same document, `type`, `required`,
//! `properties`, `additionalProperties`, `items`, `enum` and the
//! `date-time` format. No `allOf`/`oneOf`/`anyOf` appear in those files.
//!
//! Request bodies are checked strictly: a field the schema does not declare
//! is a violation too, so a typo such as `idproperty` cannot slip through.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// The HubSpot spec files the mock serves.
pub const SPEC_FILES: [&str; 4] = ["contacts-v3.json", "notes-v3.json", "associations-v4.json", "properties-v3.json"];

/// Where the HubSpot spec files are: `shared/specs/hubspot`.
pub fn default_spec_dir() -> PathBuf {
    tributary_sdk::testkit::shared_dir().join("specs").join("hubspot")
}

/// All operations of a set of OpenAPI documents.
#[derive(Debug)]
pub struct SpecSet {
    docs: Vec<Value>,
    operations: Vec<Operation>,
}

#[derive(Debug)]
struct Operation {
    doc: usize,
    method: String,
    template: String,
    segments: Vec<Option<String>>,
    /// The operation object (requestBody, responses).
    operation: Value,
}

/// The operation a request matched, with its path parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Matched {
    /// The path template as written in the spec, e.g.
    /// `/crm/v3/properties/{objectType}`.
    pub template: String,
    pub params: BTreeMap<String, String>,
}

impl SpecSet {
    /// Loads the HubSpot spec files from `dir`.
    pub fn load(dir: &Path) -> Result<SpecSet, String> {
        let mut docs = Vec::new();
        for name in SPEC_FILES {
            let path = dir.join(name);
            let text =
                std::fs::read_to_string(&path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            let doc: Value =
                serde_json::from_str(&text).map_err(|error| format!("cannot parse {}: {error}", path.display()))?;
            docs.push(doc);
        }
        Ok(SpecSet::from_docs(docs))
    }

    pub fn from_docs(docs: Vec<Value>) -> SpecSet {
        let mut operations = Vec::new();
        for (index, doc) in docs.iter().enumerate() {
            let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
                continue;
            };
            for (template, item) in paths {
                let Some(item) = item.as_object() else {
                    continue;
                };
                let segments = split(template)
                    .map(|segment| {
                        if segment.starts_with('{') && segment.ends_with('}') { None } else { Some(segment.to_owned()) }
                    })
                    .collect::<Vec<_>>();
                for (method, operation) in item {
                    if !matches!(method.as_str(), "get" | "post" | "put" | "patch" | "delete") {
                        continue;
                    }
                    operations.push(Operation {
                        doc: index,
                        method: method.to_ascii_uppercase(),
                        template: template.clone(),
                        segments: segments.clone(),
                        operation: operation.clone(),
                    });
                }
            }
        }
        SpecSet { docs, operations }
    }

    fn find_operation(&self, method: &str, path: &str) -> Option<(&Operation, Matched)> {
        let parts: Vec<&str> = split(path).collect();
        let mut best: Option<(&Operation, usize)> = None;
        for operation in &self.operations {
            if !operation.method.eq_ignore_ascii_case(method) || operation.segments.len() != parts.len() {
                continue;
            }
            let fits = operation
                .segments
                .iter()
                .zip(&parts)
                .all(|(segment, part)| segment.as_ref().is_none_or(|literal| literal == part));
            if !fits {
                continue;
            }
            // The most literal template wins: `/groups` over `/{propertyName}`.
            let literals = operation.segments.iter().filter(|s| s.is_some()).count();
            if best.is_none_or(|(_, best_literals)| literals > best_literals) {
                best = Some((operation, literals));
            }
        }
        let (operation, _) = best?;
        let params = split(&operation.template)
            .zip(&parts)
            .filter_map(|(segment, part)| {
                let name = segment.strip_prefix('{')?.strip_suffix('}')?;
                Some((name.to_owned(), (*part).to_owned()))
            })
            .collect();
        Some((operation, Matched { template: operation.template.clone(), params }))
    }

    /// The operation serving `method path`, if the specs have one.
    pub fn find(&self, method: &str, path: &str) -> Option<Matched> {
        self.find_operation(method, path).map(|(_, matched)| matched)
    }

    /// Checks a request body against the operation's `requestBody` schema.
    /// `Err` lists the problems, each with a JSON path.
    pub fn validate_request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Matched, Vec<String>> {
        let Some((operation, matched)) = self.find_operation(method, path) else {
            return Err(vec![format!("the specs have no operation {method} {path}")]);
        };
        let doc = &self.docs[operation.doc];
        let request_body = operation.operation.get("requestBody").map(|body| resolve(doc, body));
        let schema = request_body
            .and_then(|body| body.get("content"))
            .and_then(|content| content.get("application/json"))
            .and_then(|media| media.get("schema"));
        let required = request_body.and_then(|body| body.get("required")).and_then(Value::as_bool).unwrap_or(false);
        match (schema, body) {
            (Some(schema), Some(body)) => {
                let mut problems = Vec::new();
                Validator::strict(doc).check(schema, body, "$", &mut problems);
                if problems.is_empty() { Ok(matched) } else { Err(problems) }
            }
            (Some(_), None) if required => Err(vec!["$: the request body is required".into()]),
            (None, Some(_)) => {
                Err(vec![format!("$: {} {} takes no request body", operation.method, operation.template)])
            }
            _ => Ok(matched),
        }
    }

    /// Checks a response body against the schema of its status (or
    /// `default`). Error bodies are checked leniently: HubSpot always adds
    /// `status: "error"`, which the `Error` schema does not declare.
    pub fn validate_response(&self, method: &str, path: &str, status: u16, body: &Value) -> Result<(), Vec<String>> {
        let Some((operation, _)) = self.find_operation(method, path) else {
            return Err(vec![format!("the specs have no operation {method} {path}")]);
        };
        let doc = &self.docs[operation.doc];
        let Some(responses) = operation.operation.get("responses") else {
            return Ok(());
        };
        let response = match responses.get(status.to_string()) {
            Some(response) => response,
            None if (200..300).contains(&status) => {
                return Err(vec![format!(
                    "status {status} is not declared for {} {}",
                    operation.method, operation.template
                )]);
            }
            None => match responses.get("default") {
                Some(response) => response,
                None => return Err(vec![format!("status {status} is not declared")]),
            },
        };
        let response = resolve(doc, response);
        let content = response.get("content").and_then(Value::as_object);
        let schema = content.and_then(|content| {
            content.get("application/json").or_else(|| content.get("*/*")).and_then(|media| media.get("schema"))
        });
        let Some(schema) = schema else {
            return Ok(());
        };
        let validator = if (200..300).contains(&status) { Validator::strict(doc) } else { Validator::lenient(doc) };
        let mut problems = Vec::new();
        validator.check(schema, body, "$", &mut problems);
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|segment| !segment.is_empty())
}

/// Follows `$ref`s (`#/json/pointer` within the same document).
fn resolve<'a>(doc: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..32 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(reference) => match reference.strip_prefix('#').and_then(|p| doc.pointer(p)) {
                Some(target) => node = target,
                None => return node,
            },
            None => return node,
        }
    }
    node
}

/// Checks a JSON value against a schema of one document.
pub struct Validator<'a> {
    doc: &'a Value,
    /// Flag object fields the schema does not declare.
    deny_unknown: bool,
}

impl<'a> Validator<'a> {
    /// Undeclared object fields are violations.
    pub fn strict(doc: &'a Value) -> Validator<'a> {
        Validator { doc, deny_unknown: true }
    }

    /// Undeclared object fields are allowed (plain JSON Schema semantics).
    pub fn lenient(doc: &'a Value) -> Validator<'a> {
        Validator { doc, deny_unknown: false }
    }

    /// Appends one line per problem to `problems`, each starting with the
    /// JSON path (`$.inputs[0].id`) of the offending value.
    pub fn check(&self, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
        let schema = resolve(self.doc, schema);
        if let Some(Value::String(reference)) = schema.get("$ref") {
            problems.push(format!("{at}: unresolvable $ref {reference}"));
            return;
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array)
            && !options.contains(value)
        {
            let allowed: Vec<String> = options.iter().map(Value::to_string).collect();
            problems.push(format!("{at}: {value} is not one of [{}]", allowed.join(", ")));
        }
        let declared_type = schema.get("type").and_then(Value::as_str);
        let looks_like_object = schema.get("properties").is_some()
            || schema.get("additionalProperties").is_some()
            || schema.get("required").is_some();
        match declared_type {
            Some("string") => match value.as_str() {
                Some(text) => {
                    if schema.get("format").and_then(Value::as_str) == Some("date-time")
                        && chrono::DateTime::parse_from_rfc3339(text).is_err()
                    {
                        problems.push(format!("{at}: {text:?} is not an RFC 3339 date-time"));
                    }
                }
                None => problems.push(format!("{at}: expected a string, got {}", kind(value))),
            },
            Some(scalar @ ("integer" | "number" | "boolean")) => {
                let fits = match scalar {
                    "integer" => value.is_i64() || value.is_u64(),
                    "number" => value.is_number(),
                    _ => value.is_boolean(),
                };
                if !fits {
                    let article = if scalar == "integer" { "an" } else { "a" };
                    problems.push(format!("{at}: expected {article} {scalar}, got {}", kind(value)));
                }
            }
            Some("array") => match value.as_array() {
                Some(items) => {
                    if let Some(item_schema) = schema.get("items") {
                        for (index, item) in items.iter().enumerate() {
                            self.check(item_schema, item, &format!("{at}[{index}]"), problems);
                        }
                    }
                }
                None => problems.push(format!("{at}: expected an array, got {}", kind(value))),
            },
            Some("object") => self.check_object(schema, value, at, problems),
            None if looks_like_object => self.check_object(schema, value, at, problems),
            None => {}
            Some(other) => problems.push(format!("{at}: the schema has an unknown type {other}")),
        }
    }

    fn check_object(&self, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
        let Some(object) = value.as_object() else {
            problems.push(format!("{at}: expected an object, got {}", kind(value)));
            return;
        };
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !object.contains_key(name) {
                    problems.push(format!("{at}: missing required property `{name}`"));
                }
            }
        }
        let declared = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (name, field) in object {
            let field_at = format!("{at}.{name}");
            if let Some(field_schema) = declared.and_then(|declared| declared.get(name)) {
                self.check(field_schema, field, &field_at, problems);
                continue;
            }
            match additional {
                Some(Value::Bool(false)) => {
                    problems.push(format!("{field_at}: property not allowed"));
                }
                Some(Value::Bool(true)) => {}
                Some(extra_schema) => self.check(extra_schema, field, &field_at, problems),
                None if self.deny_unknown && declared.is_some() => {
                    problems.push(format!("{field_at}: property not declared by the spec"));
                }
                None => {}
            }
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn specs() -> SpecSet {
        SpecSet::load(&default_spec_dir()).expect("the HubSpot spec files")
    }

    const UPSERT: &str = "/crm/v3/objects/contacts/batch/upsert";

    fn check(body: Value, expected_problems: &[&str]) {
        let result = specs().validate_request("POST", UPSERT, Some(&body));
        match (result, expected_problems.is_empty()) {
            (Ok(_), true) => {}
            (Ok(_), false) => panic!("{body} passed, expected {expected_problems:?}"),
            (Err(problems), true) => panic!("{body} failed: {problems:?}"),
            (Err(problems), false) => {
                for expected in expected_problems {
                    assert!(
                        problems.iter().any(|problem| problem.contains(expected)),
                        "{body}: {expected:?} not in {problems:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn batch_upsert_bodies_are_checked_against_the_spec() {
        check(
            json!({"inputs": [{"idProperty": "email", "id": "a@example.com", "properties": {"firstname": "A"}}]}),
            &[],
        );
        check(
            json!({"inputs": [{"idProperty": "email", "id": "a@example.com", "properties": {}, "objectWriteTraceId": "t0"}]}),
            &[],
        );
        check(
            json!({"inputs": [{"idProperty": "email", "properties": {"n": 3}}]}),
            &[
                "$.inputs[0]: missing required property `id`",
                "$.inputs[0].properties.n: expected a string, got a number",
            ],
        );
        check(
            json!({"inputs": [{"id": "x", "properties": {}, "idproperty": "email"}]}),
            &["$.inputs[0].idproperty: property not declared by the spec"],
        );
        check(json!({"input": []}), &["$: missing required property `inputs`"]);
        check(json!({"inputs": {}}), &["$.inputs: expected an array, got an object"]);
    }

    #[test]
    fn enums_refs_and_path_templates_are_resolved() {
        let specs = specs();
        let search = json!({
            "filterGroups": [{"filters": [{"propertyName": "email", "operator": "EQUALS", "value": "a"}]}],
            "properties": [], "sorts": [], "limit": 1, "after": "0"
        });
        let problems = specs.validate_request("POST", "/crm/v3/objects/contacts/search", Some(&search)).unwrap_err();
        assert!(
            problems[0].starts_with("$.filterGroups[0].filters[0].operator: \"EQUALS\" is not one of"),
            "{problems:?}"
        );

        let groups = specs.find("GET", "/crm/v3/properties/notes/groups").unwrap();
        assert_eq!(groups.template, "/crm/v3/properties/{objectType}/groups");
        assert_eq!(groups.params["objectType"], "notes");
        let property = specs.find("GET", "/crm/v3/properties/contacts/tributary_identity").unwrap();
        assert_eq!(property.template, "/crm/v3/properties/{objectType}/{propertyName}");
        assert_eq!(property.params["propertyName"], "tributary_identity");
        let associate = specs.find("POST", "/crm/v4/associations/notes/contacts/batch/associate/default").unwrap();
        assert_eq!(associate.params["fromObjectType"], "notes");
        assert_eq!(associate.params["toObjectType"], "contacts");
        assert!(specs.find("POST", "/crm/v3/objects/contacts/batch/frobnicate").is_none());

        let error = json!({"status": "error", "message": "m", "correlationId": "c", "category": "VALIDATION_ERROR"});
        specs.validate_response("POST", UPSERT, 400, &error).unwrap();
        let incomplete = json!({"status": "COMPLETE", "results": []});
        let problems = specs.validate_response("POST", UPSERT, 200, &incomplete).unwrap_err();
        assert!(problems.iter().any(|p| p.contains("`startedAt`")), "{problems:?}");
    }
}
