//! Checks a JSON answer against the OpenAPI document (docs/api.yaml, parsed into JSON): the
//! subset of OpenAPI 3.0 the document uses ($ref, nullable, allOf, oneOf, enum, type,
//! properties, additionalProperties, items). Used by the API's unit tests and, through
//! `#[path]`, by the end-to-end test against a live VMM, so both check with the same rules.

use std::collections::BTreeMap;

use serde_json::Value;

/// The HTTP methods an OpenAPI path item may hold.
pub const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

/// Follows `$ref`s (JSON pointers into the document) until a value without one.
pub fn resolve<'a>(doc: &'a Value, mut value: &'a Value) -> &'a Value {
    while let Some(reference) = value.get("$ref").and_then(Value::as_str) {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs: {reference}"));
        value = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference}"));
    }
    value
}

/// (METHOD, path) of every documented operation, with the operation.
pub fn documented(doc: &Value) -> BTreeMap<(String, String), &Value> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let item = resolve(doc, item);
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.insert((method.to_uppercase(), path.clone()), op);
            }
        }
    }
    out
}

/// Whether `value` has exactly the shape `schema` documents: its type, its enum, and for an
/// object every documented property and no other (unless `additionalProperties`).
pub fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if value.is_null() {
        return if schema["nullable"] == true {
            Ok(())
        } else {
            Err(format!("{at}: null, but not nullable"))
        };
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check(doc, s, value, at)?;
        }
    }
    if let Some(one) = schema["oneOf"].as_array() {
        let fits = one
            .iter()
            .filter(|s| check(doc, s, value, at).is_ok())
            .count();
        if fits != 1 {
            return Err(format!("{at}: fits {fits} of the oneOf schemas, not one"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    let Some(kind) = schema["type"].as_str() else {
        return Ok(());
    };
    let fits = match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_u64() || value.is_i64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        other => return Err(format!("{at}: unknown type {other} in the document")),
    };
    if !fits {
        return Err(format!("{at}: {value} is not of type {kind}"));
    }
    match (kind, value) {
        ("object", Value::Object(fields)) => check_object(doc, schema, fields, at),
        ("array", Value::Array(items)) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check(doc, &schema["items"], item, &format!("{at}[{i}]"))),
        _ => Ok(()),
    }
}

fn check_object(
    doc: &Value,
    schema: &Value,
    fields: &serde_json::Map<String, Value>,
    at: &str,
) -> Result<(), String> {
    let empty = serde_json::Map::new();
    let properties = schema["properties"].as_object().unwrap_or(&empty);
    let additional = &schema["additionalProperties"];
    for (key, value) in fields {
        let at = format!("{at}.{key}");
        match properties.get(key) {
            Some(s) => check(doc, s, value, &at)?,
            None if additional.is_object() => check(doc, additional, value, &at)?,
            None => return Err(format!("{at}: sent but not documented")),
        }
    }
    if let Some(missing) = properties.keys().find(|k| !fields.contains_key(*k)) {
        return Err(format!("{at}.{missing}: documented but not sent"));
    }
    Ok(())
}

/// The schema of `op`'s JSON answer with `status`; None if that status is not documented.
pub fn response_schema<'a>(doc: &'a Value, op: &'a Value, status: u16) -> Option<&'a Value> {
    let response = op["responses"].get(status.to_string())?;
    let schema = &resolve(doc, response)["content"]["application/json"]["schema"];
    (!schema.is_null()).then_some(schema)
}
