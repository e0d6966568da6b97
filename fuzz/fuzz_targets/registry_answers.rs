//! What a registry (or anyone pretending to be one) can send that we parse: image
//! references, `WWW-Authenticate` challenges, referrers indexes and auth files' keys go
//! through the same parsers as in production, on arbitrary text.
#![no_main]

use fleetdelta::registry::auth::Challenge;
use fleetdelta::registry::referrers::parse_index;
use fleetdelta::registry::RegistryRef;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(r) = RegistryRef::parse(&text) {
        // What we print parses back to the same reference.
        assert_eq!(RegistryRef::parse(&r.to_string()).ok(), Some(r.clone()));
        let _ = r.reference();
    }
    let _ = Challenge::parse(&text);
    let _ = parse_index(data, "fuzz");
});
