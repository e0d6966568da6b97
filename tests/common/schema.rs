//! Checks that what a command printed matches its JSON Schema in `docs/schemas/`, with a
//! maintained validator (the `jsonschema` crate): the documented shape is the real one.

use std::path::Path;

use serde_json::Value;

/// Panics, naming every mismatch, unless `value` is valid against
/// `docs/schemas/<name>.schema.json`.
pub fn assert_valid(name: &str, value: &Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas").join(format!("{name}.schema.json"));
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: Value = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{} is no valid schema: {e}", path.display()));
    let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{} (at {})", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "the output does not match {}:\n  {}\n{value:#}", path.display(), errors.join("\n  "));
}

/// The schema of a command's output, told by its fields.
pub fn schema_of(value: &Value) -> &'static str {
    let has = |k: &str| value.get(k).is_some();
    if has("produces__release") {
        "release-update"
    } else if has("rejected") {
        "rejected"
    } else if has("delta_bytes") {
        "diff"
    } else if has("format_version") {
        "info"
    } else if has("delta_index") {
        "info-index"
    } else if has("missing_layers_bytes") {
        "pull"
    } else if has("written_manifest") {
        "apply"
    } else if has("deltas") && has("dry_run") {
        "gc"
    } else if has("installed") {
        "agent-status"
    } else if has("action") && has("forced") {
        "agent-action"
    } else if has("target_release") && has("complete") {
        "agent-report"
    } else if value.as_object().is_some_and(|o| !o.is_empty() && o.keys().all(|k| ["manifest", "fetched", "pushed", "loaded"].contains(&k.as_str()))) {
        "copy"
    } else {
        panic!("no command prints this JSON: {value:#}")
    }
}

/// [`assert_valid`] against the schema of the command that printed `value`.
pub fn assert_output(value: &Value) {
    assert_valid(schema_of(value), value);
}
