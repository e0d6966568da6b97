//! The differ reads the section and segment tables of any ELF file it finds in a layer, and
//! the applier turns AArch64 code spans into their seen form and back where a delta says
//! they are. With arbitrary bytes: the code span found lies inside the file, and a span
//! expanded then repacked gives the layer's bytes back, whatever its offset and length.
#![no_main]

use std::io::Write;

use fleetdelta::diff::members::code_span;
use fleetdelta::format::plan::{Member, RepackedMember};
use fleetdelta::layer::members::{expand, Repacker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((at, len)) = code_span(data) {
        assert!(len >= 4 && at.checked_add(len).is_some_and(|end| end <= data.len() as u64), "span {at}+{len} of {}", data.len());
    }
    // The first two bytes place the span in the rest, the layer.
    let [a, b, layer @ ..] = data else { return };
    let offset = u64::from(*a).min(layer.len() as u64);
    let len = (u64::from(*b) * 7).min(layer.len() as u64 - offset);
    let m = Member::aarch64_code(offset, len);
    let mut seen = Vec::new();
    let n = expand(layer, &[m], &mut seen, 1 << 20, "fuzz").expect("any bytes have a seen form");
    assert_eq!(n, layer.len() as u64);
    let members = [RepackedMember::aarch64_code(m)];
    let mut r = Repacker::new(Vec::new(), &members);
    for piece in seen.chunks(13) {
        r.write_all(piece).unwrap();
    }
    assert_eq!(r.finish().unwrap(), layer);
});
