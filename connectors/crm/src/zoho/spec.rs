//! Test support: Zoho's OpenAPI files (`shared/specs/zoho`), their
//! cross-file `$ref`s rewritten to the local copies, and a validator of the
//! subset the request bodies need (`$ref`, `type`, `nullable`, `enum`,
//! `required`, `properties`, `additionalProperties`, `items`, `oneOf`,
//! `anyOf`, `allOf`) and of query strings (every parameter declared by the
//! operation, the required ones present, values of the declared type).
//!
//! Zoho's request bodies reuse the record schemas of its answers, which mark
//! server-set fields (`id`, `Created_Time`, ...) `required`: `required` is
//! enforced on the body's top level (the wrapper) only. A `$ref` into a file
//! not in the copy (`users.json`, `modules.json`, ...) accepts anything.
//! Unknown properties are refused unless `additionalProperties` allows them.

use std::collections::HashMap;

use serde_json::Value;

const REMOTE: &str = "https://raw.githubusercontent.com/Zohocorp-Pvt-Ltd/crm-oas/refs/heads/main/v8.0/";

pub(super) struct Specs {
    docs: HashMap<String, Value>,
}

impl Specs {
    pub fn load() -> Specs {
        let dir = tributary_sdk::testkit::shared_dir().join("specs").join("zoho");
        let mut docs = HashMap::new();
        for name in ["record.json", "notes.json", "common.json", "fields.json"] {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let doc = serde_json::from_str(&text.replace(REMOTE, "./")).unwrap_or_else(|e| panic!("{name}: {e}"));
            docs.insert(name.to_owned(), doc);
        }
        Specs { docs }
    }

    /// The `(file, schema)` a `$ref` points to from `file`; `None` when the
    /// file is not in the copy.
    fn resolve<'a>(&'a self, file: &'a str, reference: &str) -> Option<(&'a str, &'a Value)> {
        let (target, pointer) = reference.split_once('#').unwrap_or((reference, ""));
        let (name, doc) = match target.trim_start_matches("./") {
            "" => self.docs.get_key_value(file)?,
            other => self.docs.get_key_value(other)?,
        };
        let node = doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {reference} in {file}"));
        Some((name.as_str(), node))
    }

    /// Follows `$ref`s to a concrete node.
    fn concrete<'a>(&'a self, mut file: &'a str, mut node: &'a Value) -> Option<(&'a str, &'a Value)> {
        while let Some(reference) = node.get("$ref").and_then(Value::as_str) {
            (file, node) = self.resolve(file, reference)?;
        }
        Some((file, node))
    }

    /// The operation for a concrete request: the path template with the most
    /// literal segments that matches.
    fn operation(&self, method: &str, path: &str) -> Option<(&str, &Value)> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let mut best: Option<(usize, &str, &Value)> = None;
        for (file, doc) in &self.docs {
            for (template, item) in doc["paths"].as_object().into_iter().flatten() {
                let parts: Vec<&str> = template.trim_matches('/').split('/').collect();
                if parts.len() != segments.len() {
                    continue;
                }
                let literal = parts.iter().filter(|p| !p.starts_with('{')).count();
                let matches = parts.iter().zip(&segments).all(|(p, s)| p.starts_with('{') || p == s);
                if let (true, Some(operation)) = (matches, item.get(method.to_lowercase()))
                    && best.as_ref().is_none_or(|(score, _, _)| literal > *score)
                {
                    best = Some((literal, file.as_str(), operation));
                }
            }
        }
        best.map(|(_, file, operation)| (file, operation))
    }

    /// Checks a request body against its operation's JSON request schema.
    pub fn validate_request(&self, method: &str, path: &str, body: &Value) -> Vec<String> {
        let Some((file, operation)) = self.operation(method, path) else {
            return vec![format!("no operation {method} {path} in the spec")];
        };
        let Some(request) = operation.get("requestBody") else {
            return vec![format!("{method} {path} takes no body in the spec")];
        };
        let Some((file, request)) = self.concrete(file, request) else { return vec!["unresolvable body".into()] };
        let Some(schema) = request.pointer("/content/application~1json/schema") else {
            return vec![format!("{method} {path} takes no JSON body")];
        };
        let mut problems = Vec::new();
        self.check(file, schema, body, "$", true, &mut problems);
        problems
    }

    /// Checks a request's query string against its operation's `in: query`
    /// parameters: none unknown, every required one present, each value of
    /// its declared `type` (and `enum`).
    pub fn validate_query(&self, method: &str, path: &str, query: &[(String, String)]) -> Vec<String> {
        let Some((file, operation)) = self.operation(method, path) else {
            return vec![format!("no operation {method} {path} in the spec")];
        };
        let mut declared: Vec<(String, bool, Value)> = Vec::new();
        for parameter in operation["parameters"].as_array().into_iter().flatten() {
            let Some((_, parameter)) = self.concrete(file, parameter) else { continue };
            if parameter["in"] != "query" {
                continue;
            }
            let Some(name) = parameter["name"].as_str() else { continue };
            let required = parameter["required"] == Value::Bool(true);
            declared.push((name.to_owned(), required, parameter["schema"].clone()));
        }
        let mut problems = Vec::new();
        for (name, required, _) in &declared {
            if *required && !query.iter().any(|(given, _)| given == name) {
                problems.push(format!("{method} {path}: the query parameter `{name}` is required"));
            }
        }
        for (name, value) in query {
            let Some((_, _, schema)) = declared.iter().find(|(declared, _, _)| declared == name) else {
                problems.push(format!("{method} {path}: unknown query parameter `{name}`"));
                continue;
            };
            let fits = match schema["type"].as_str() {
                Some("integer") => value.parse::<i64>().is_ok(),
                Some("number") => value.parse::<f64>().is_ok(),
                Some("boolean") => matches!(value.as_str(), "true" | "false"),
                _ => true,
            };
            if !fits {
                problems.push(format!("{method} {path}: `{name}={value}` is not a {}", schema["type"]));
            }
            if let Some(allowed) = schema["enum"].as_array()
                && !allowed.contains(&Value::String(value.clone()))
            {
                problems.push(format!("{method} {path}: `{name}={value}` is not one of {allowed:?}"));
            }
        }
        problems
    }

    fn check(&self, file: &str, schema: &Value, value: &Value, at: &str, top: bool, problems: &mut Vec<String>) {
        let Some((file, schema)) = self.concrete(file, schema) else { return };
        for (keyword, all) in [("oneOf", false), ("anyOf", false), ("allOf", true)] {
            if let Some(options) = schema.get(keyword).and_then(Value::as_array) {
                let results: Vec<Vec<String>> = options
                    .iter()
                    .map(|option| {
                        let mut found = Vec::new();
                        self.check(file, option, value, at, top, &mut found);
                        found
                    })
                    .collect();
                let passed = if all { results.iter().all(Vec::is_empty) } else { results.iter().any(Vec::is_empty) };
                if !passed {
                    problems.push(format!("{at}: matches no `{keyword}` option: {:?}", results.concat()));
                }
            }
        }
        if value.is_null() && schema["nullable"] == Value::Bool(true) {
            return;
        }
        if let Some(expected) = schema.get("type").and_then(Value::as_str) {
            let fits = match expected {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                _ => true,
            };
            if !fits {
                problems.push(format!("{at}: expected {expected}, got {value}"));
                return;
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            problems.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
        if let Some(object) = value.as_object() {
            if top {
                for name in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                    if !object.contains_key(name) {
                        problems.push(format!("{at}: `{name}` is required"));
                    }
                }
            }
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                let open = schema.get("additionalProperties").is_some_and(|extra| extra != &Value::Bool(false));
                for (name, item) in object {
                    match properties.get(name) {
                        Some(property) => self.check(file, property, item, &format!("{at}.{name}"), false, problems),
                        None if open => {}
                        None => problems.push(format!("{at}: unknown property `{name}`")),
                    }
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (index, item) in array.iter().enumerate() {
                self.check(file, items, item, &format!("{at}[{index}]"), false, problems);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Validates `body` for `method path`; the problems must mention each of `expected` (none: valid).
    fn check(method: &str, path: &str, body: Value, expected: &[&str]) {
        let problems = Specs::load().validate_request(method, path, &body);
        if expected.is_empty() {
            assert!(problems.is_empty(), "{method} {path}: {problems:?}");
        }
        for needle in expected {
            assert!(problems.iter().any(|p| p.contains(needle)), "{needle:?} not in {problems:?}");
        }
    }

    #[test]
    fn zoho_spec_validator_resolves_files_and_catches_mistakes() {
        let note = json!({ "Note_Title": "t", "Note_Content": "c",
            "Parent_Id": { "module": { "api_name": "Contacts" }, "id": "1" } });
        check("POST", "/crm/v8/Notes", json!({ "data": [note] }), &[]);
        check("POST", "/crm/v8/Notes", json!({ "data": [{ "Note_Text": "c" }] }), &["unknown property `Note_Text`"]);
        check("PUT", "/crm/v8/Notes", json!({ "data": [{ "Note_Title": 3 }] }), &["expected string"]);
        check("POST", "/crm/v8/Notes", json!({ "notes": [] }), &["`data` is required", "unknown property `notes`"]);
        check(
            "POST",
            "/crm/v8/Contacts/upsert",
            json!({ "data": [{ "Last_Name": "x" }], "duplicate_check_fields": ["Email"] }),
            &[],
        );
        check(
            "POST",
            "/crm/v8/Contacts/upsert",
            json!({ "data": {}, "duplicate_check_fields": "Email" }),
            &["expected array"],
        );
        check(
            "POST",
            "/crm/v8/settings/fields",
            json!({ "fields": [{ "field_label": "X", "data_type": "text", "length": 9 }] }),
            &[],
        );
        check(
            "POST",
            "/crm/v8/settings/fields",
            json!({ "fields": [{ "label": "X" }] }),
            &["unknown property `label`"],
        );
    }

    #[test]
    fn zoho_spec_validator_checks_query_strings() {
        let specs = Specs::load();
        let query = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let valid = |method: &str, path: &str, pairs: &[(&str, &str)]| {
            let problems = specs.validate_query(method, path, &query(pairs));
            assert!(problems.is_empty(), "{method} {path}: {problems:?}");
        };
        valid("DELETE", "/crm/v8/Notes", &[("ids", "1,2")]);
        valid("GET", "/crm/v8/Contacts/123", &[("fields", "Email,Lead_Source")]);
        valid("GET", "/crm/v8/Contacts", &[("fields", "Last_Name"), ("per_page", "1")]);
        valid("POST", "/crm/v8/settings/fields", &[("module", "Contacts")]);
        let problems = |method: &str, path: &str, pairs: &[(&str, &str)]| {
            specs.validate_query(method, path, &query(pairs)).join("\n")
        };
        assert!(problems("DELETE", "/crm/v8/Notes", &[]).contains("`ids` is required"));
        assert!(problems("DELETE", "/crm/v8/Notes", &[("ids", "1"), ("permanent", "true")]).contains("unknown query"));
        assert!(problems("GET", "/crm/v8/Contacts", &[("per_page", "many")]).contains("is not a"));
        assert!(problems("GET", "/crm/v8/Nowhere/at/all/x", &[]).contains("no operation"));
    }
}
