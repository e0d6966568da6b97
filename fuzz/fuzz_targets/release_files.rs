//! Release files and device-facts files are written by people and fetched by the device
//! agent from URLs: arbitrary text must parse or fail with an error, never panic; contracts
//! that parse must evaluate against facts that parse.
#![no_main]

use fleetdelta::release::{DeviceFacts, Release};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The input is tried whole as each kind, and split at its first NUL into a release and facts.
    let release = Release::parse(&text, "fuzz.yaml");
    let _ = DeviceFacts::parse(&text, "fuzz-facts.yaml");
    let Some((r, f)) = text.split_once('\0') else { return };
    let (Ok(release), Ok(facts)) = (Release::parse(r, "fuzz.yaml").or(release), DeviceFacts::parse(f, "fuzz-facts.yaml")) else { return };
    for service in &release.services {
        if let Some(contract) = &service.contract {
            let _ = contract.evaluate(&facts);
        }
    }
});
