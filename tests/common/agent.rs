//! Reading what `fleetdelta agent` said, for the agent's tests on processes and on the engine.

use std::process::{Child, Output};

use serde_json::Value;

/// The JSON report on stdout (the output in the panic message when it is not JSON), checked
/// against its schema (an update's report, `agent status`, an action's report).
pub fn report(out: &Output) -> Value {
    let value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    super::schema::assert_output(&value);
    value
}

/// One service's entry in a report.
pub fn outcome<'a>(report: &'a Value, service: &str) -> &'a Value {
    report["services"].as_array().unwrap().iter().find(|s| s["service"] == service).unwrap_or_else(|| panic!("no {service} in {report}"))
}

/// How a service's image came, by the report: `delta`, `layers`, `present`… (`none` when it
/// was not fetched). A delta must name a registry delta (`docker://…`).
pub fn fetched(report: &Value, service: &str) -> String {
    let f = &outcome(report, service)["fetched"];
    if f.is_null() {
        return "none".into();
    }
    let how = f["how"].as_str().unwrap_or_else(|| panic!("fetched without how: {f}")).to_string();
    if how == "delta" {
        assert!(f["delta"].as_str().is_some_and(|d| d.starts_with("docker://")), "{f}");
        assert!(f["received_bytes"].as_u64().is_some(), "{f}");
    }
    how
}

/// Waits for an agent started in the background (within [`super::COMMAND_SECONDS`]), which
/// must succeed.
pub fn finish(child: Child) -> Output {
    let out = super::wait_within(child, super::COMMAND_SECONDS, "an agent started in the background");
    assert!(out.status.success(), "agent failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}
