//! The differ decodes the code and hashes the sections of any x86-64 ELF file it pairs, and
//! the applier turns x86-64 code spans back from their seen form through an address map
//! the delta carries. With arbitrary bytes: the code view found lies inside the file and its
//! map and layout are valid; a map made of arbitrary numbers is refused by name or is a
//! bijection; and a span (of code and pointers, or of call frames) seen through it then
//! repacked gives the layer's bytes back.
#![no_main]

use std::io::Write;

use fleetdelta::diff::address_map::x86_64_code;
use fleetdelta::format::address_map::AddressMap;
use fleetdelta::format::plan::{Member, RepackedMember};
use fleetdelta::layer::members::{expand, Repacker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(view) = x86_64_code(data, data) {
        assert!(view.offset.checked_add(view.len).is_some_and(|end| end <= data.len() as u64), "span {}+{} of {}", view.offset, view.len, data.len());
        view.map.projection().expect("the differ's maps are valid");
        view.map.regions(view.len).expect("the differ's layouts are valid");
    }
    // The first byte counts the segments, six bytes each (gap, length, shift); then two
    // bytes place the span in the rest, the layer, and a third lays it out: pointer words
    // first, then code, or call frames (`.eh_frame_hdr`, then `.eh_frame`).
    let Some((&count, rest)) = data.split_first() else { return };
    let count = usize::from(count % 8);
    if rest.len() < 6 * count + 2 {
        return;
    }
    let (numbers, rest) = rest.split_at(6 * count);
    let segments = numbers
        .chunks_exact(6)
        .flat_map(|s| {
            let [g0, g1, l0, l1, s0, s1] = [s[0], s[1], s[2], s[3], s[4], s[5]];
            [i64::from(u16::from_le_bytes([g0, g1])) * 16, i64::from(u16::from_le_bytes([l0, l1])), i64::from(i16::from_le_bytes([s0, s1])) * 16]
        })
        .collect();
    let mut map = AddressMap { code: 0x1000, segments, ..Default::default() };
    let Ok(projection) = map.projection() else { return };
    for x in [0u32, 0xfff, 0x1000, 0x1_0000, 0x10_0000, u32::MAX] {
        assert_eq!(projection.to_new(projection.to_old(x)), x);
    }
    let [a, b, c, layer @ ..] = rest else { return };
    let offset = u64::from(*a).min(layer.len() as u64);
    let len = (u64::from(*b) * 7).min(layer.len() as u64 - offset);
    let words = 8 * u64::from(c % 8);
    if words > 0 && words <= len {
        (map.pointers, map.code_at) = (vec![0, words], words);
    }
    if c & 0x40 != 0 {
        let rest = len.saturating_sub(map.code_at);
        let hdr = (u64::from(c >> 3 & 7) * 12 + 12).min(rest);
        map.code_len = Some(0);
        map.eh_frame_hdr = Some([map.code_at, hdr, 0x2000]);
        map.eh_frame = Some([map.code_at + hdr, rest - hdr, 0x2000 + hdr]);
    }
    if map.regions(len).is_err() {
        return;
    }
    let members = [RepackedMember::x86_64_code(Member::x86_64_code(offset, len), map)];
    let mut seen = Vec::new();
    let n = expand(layer, &members, &mut seen, 1 << 20, "fuzz").expect("any bytes have a seen form");
    assert_eq!(n, layer.len() as u64);
    let mut r = Repacker::new(Vec::new(), &members);
    for piece in seen.chunks(13) {
        r.write_all(piece).unwrap();
    }
    assert_eq!(r.finish().unwrap(), layer);
});
