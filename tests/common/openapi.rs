//! The service's real answers checked against `docs/openapi.yaml`: the status must be
//! documented for the route and method, the media type among the documented ones, a
//! `Retry-After` documented too, and a JSON body valid against the documented schema (with the
//! `jsonschema` crate, the OpenAPI 3.0 schema turned into JSON Schema draft 4).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

/// An HTTP answer as the service gave it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The media type of `Content-Type`, without parameters, lower-case.
    pub media_type: Option<String>,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Answer {
    /// Reads a reqwest answer whole.
    pub async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let media_type = header("content-type").map(|t| t.split(';').next().unwrap().trim().to_ascii_lowercase());
        let retry_after = header("retry-after");
        let body = response.bytes().await.unwrap().to_vec();
        Answer { status, media_type, retry_after, body }
    }

    /// The body as JSON (panics, showing it, when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// `docs/openapi.yaml`, parsed.
pub fn spec() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml");
    serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every (method, route, status) the spec documents.
pub fn documented_statuses(spec: &Value) -> BTreeSet<(String, String, u16)> {
    let mut all = BTreeSet::new();
    for (route, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            for status in operation["responses"].as_object().into_iter().flat_map(|r| r.keys()) {
                all.insert((method.to_uppercase(), route.clone(), status.parse().unwrap_or_else(|_| panic!("{method} {route}: status {status}"))));
            }
        }
    }
    all
}

/// Panics, saying what disagrees, unless `answer` is one the spec documents for `method route`.
pub fn assert_documented(spec: &Value, method: &str, route: &str, answer: &Answer) {
    let what = format!("{method} {route} answered {} {}", answer.status, String::from_utf8_lossy(&answer.body));
    let operation = &spec["paths"][route][method.to_ascii_lowercase()];
    assert!(operation.is_object(), "{what}: docs/openapi.yaml has no {method} {route}");
    let responses = operation["responses"].as_object().unwrap();
    let Some(response) = responses.get(&answer.status.to_string()) else {
        panic!("{what}: status {} is not documented (documented: {:?})", answer.status, responses.keys().collect::<Vec<_>>())
    };
    let response = resolve(spec, response);

    if let Some(value) = &answer.retry_after {
        let documented = response["headers"].as_object().is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("retry-after")));
        assert!(documented, "{what}: sends Retry-After, which is not documented for {}", answer.status);
        assert!(value.parse::<u64>().is_ok(), "{what}: Retry-After {value:?} is not a number of seconds");
    }

    let Some(content) = response["content"].as_object() else {
        assert!(answer.body.is_empty(), "{what}: a body where none is documented");
        return;
    };
    let media_type = answer.media_type.as_deref().unwrap_or_else(|| panic!("{what}: no Content-Type"));
    let Some(documented) = content.get(media_type) else {
        panic!("{what}: media type {media_type} is not documented (documented: {:?})", content.keys().collect::<Vec<_>>())
    };
    let body: Value = if media_type == "application/json" {
        answer.json()
    } else {
        Value::String(String::from_utf8(answer.body.clone()).unwrap_or_else(|_| panic!("{what}: {media_type} that is not UTF-8")))
    };
    let schema = json_schema(spec, &documented["schema"], 0);
    let validator = jsonschema::options().with_draft(jsonschema::Draft::Draft4).build(&schema).unwrap_or_else(|e| panic!("{what}: schema {schema}: {e}"));
    let errors: Vec<String> = validator.iter_errors(&body).map(|e| format!("{e} (at {})", e.instance_path())).collect();
    assert!(errors.is_empty(), "{what}: the body does not match the documented schema:\n  {}\nschema: {schema:#}", errors.join("\n  "));
}

/// A `$ref` (`#/components/...`) followed; anything else as is.
fn resolve<'a>(spec: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("only local references are resolved: {reference}"));
            let target = spec.pointer(pointer).unwrap_or_else(|| panic!("{reference} is not in docs/openapi.yaml"));
            resolve(spec, target)
        }
        None => value,
    }
}

/// An OpenAPI 3.0 schema as a JSON Schema draft 4 one: references inlined, `nullable: true`
/// as a `null` type. Stricter than the spec in one way, for the test's sake: an object schema
/// that lists its properties allows no others, so a field the service sends is a documented
/// field (clients may still ignore fields they do not know).
fn json_schema(spec: &Value, schema: &Value, depth: usize) -> Value {
    assert!(depth < 32, "references nested too deep (a cycle?) at {schema}");
    let Value::Object(fields) = resolve(spec, schema) else { return schema.clone() };
    let mut out = Map::new();
    for (key, value) in fields {
        let converted = match key.as_str() {
            "properties" => Value::Object(value.as_object().unwrap().iter().map(|(k, v)| (k.clone(), json_schema(spec, v, depth + 1))).collect()),
            "items" | "not" => json_schema(spec, value, depth + 1),
            "additionalProperties" if value.is_object() => json_schema(spec, value, depth + 1),
            "allOf" | "anyOf" | "oneOf" => Value::Array(value.as_array().unwrap().iter().map(|v| json_schema(spec, v, depth + 1)).collect()),
            "nullable" => continue,
            _ => value.clone(),
        };
        out.insert(key.clone(), converted);
    }
    if fields.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(t) = out.get("type").cloned() {
            out.insert("type".into(), Value::Array(vec![t, Value::from("null")]));
        }
        if let Some(Value::Array(values)) = out.get_mut("enum") {
            values.push(Value::Null);
        }
    }
    if out.contains_key("properties") && !out.contains_key("additionalProperties") {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    Value::Object(out)
}
