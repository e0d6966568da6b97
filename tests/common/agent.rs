//! Reading what `fleetdelta agent` said, for the agent's tests on processes and on the engine.

use std::process::{Child, Output};

use serde_json::Value;

/// The JSON report on stdout (the output in the panic message when it is not JSON).
pub fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// One service's entry in a report.
pub fn outcome<'a>(report: &'a Value, service: &str) -> &'a Value {
    report["services"].as_array().unwrap().iter().find(|s| s["service"] == service).unwrap_or_else(|| panic!("no {service} in {report}"))
}

/// Waits for an agent started in the background, which must succeed.
pub fn finish(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "agent failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}
