//! Where a new x86-64 executable's code and data were in the old one: the [`AddressMap`] of
//! its code view ([`crate::layer::x86_64_code`]).
//!
//! Neither symbols nor debug information are needed (Debian strips its binaries). Both
//! files' code is decoded and every 32-bit reference in it blanked, so that a function that
//! only moved reads the same in both; windows of that code at instruction starts, and
//! windows of the other loaded sections at 8-byte steps, are hashed. A window found exactly
//! once in each file anchors a new address to an old one. Anchors in a row with the same
//! shift make a segment; segments that would claim the same old addresses keep the longest;
//! each segment then reaches forward to the next, as far as the old side has room. Segments
//! that hold no reference's end or target are dropped: they would only cost bytes.
//!
//! Call frame entries are then placed through that map ([`crate::diff::call_frames`]) and the
//! map is made again with them, so that `.eh_frame` and `.eh_frame_hdr` are seen in the old
//! file's addresses too ([`crate::layer::call_frames`]).

use std::collections::BTreeMap;

use object::elf::{FileHeader64, SHF_ALLOC, SHF_EXECINSTR, SHF_WRITE, SHT_NOBITS, SHT_RELA};
use object::read::elf::{FileHeader, SectionHeader};
use object::LittleEndian;

use crate::diff::approximate::compressed_len;
use crate::diff::call_frames::{self, FrameSections, Place};
use crate::error::{Error, Result};
use crate::format::address_map::{AddressMap, Projection, Segment, MAX_SEGMENTS};
use crate::layer::x86_64_code::{scan, Converter, Direction};

/// Bytes hashed per anchor window.
const WINDOW: usize = 24;

/// Anchors further apart than this do not make one segment.
const MAX_ANCHOR_GAP: u64 = 4096;

/// The fewest anchors a segment needs.
const MIN_ANCHORS: u32 = 2;

/// The fewest reference ends and targets a segment must hold to be kept.
const MIN_HITS: u32 = 1;

/// One in this many windows (by hash, so the same in both files) is an anchor candidate.
const SAMPLE: u64 = 2;

/// The code view of a changed x86-64 executable: the span of the file it covers (its code and
/// pointer ranges, and what lies between) and its map, which places them in the span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeView {
    /// Where the span starts in the file.
    pub offset: u64,
    /// How long it is.
    pub len: u64,
    /// Where the new file's addresses were in the old file, and the span's layout.
    pub map: AddressMap,
}

/// A loaded section: where it is in the file and in memory, and whether it is code.
#[derive(Clone, Copy, Debug)]
struct Section {
    offset: u64,
    size: u64,
    address: u64,
    code: bool,
    /// Writable data or relocations: where 64-bit pointers are.
    pointers: bool,
}

/// The loaded sections of an x86-64 ELF file with bytes in it, if it parses and every one
/// lies within the file and below 4 GiB of addresses; and where its call frame information is.
fn sections(data: &[u8]) -> Option<(Vec<Section>, FrameSections)> {
    let header = FileHeader64::<LittleEndian>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let mut out = Vec::new();
    let mut frames = FrameSections::default();
    let table = header.sections(endian, data).ok()?;
    for s in table.iter() {
        let flags = s.sh_flags(endian);
        if !flags.contains(SHF_ALLOC) || s.sh_type(endian) == SHT_NOBITS || s.sh_size(endian) == 0 {
            continue;
        }
        let code = flags.contains(SHF_EXECINSTR);
        let pointers = !code && (flags.contains(SHF_WRITE) || s.sh_type(endian) == SHT_RELA);
        let section = Section { offset: s.sh_offset(endian), size: s.sh_size(endian), address: s.sh_addr(endian), code, pointers };
        let end = section.offset.checked_add(section.size)?;
        if end > data.len() as u64 || section.address.checked_add(section.size)? > 1 << 32 {
            return None;
        }
        let place = Some(Place { offset: section.offset, size: section.size, address: section.address });
        match table.section_name(endian, s).ok() {
            Some(b".eh_frame") if !pointers && !code => frames.eh_frame = place,
            Some(b".eh_frame_hdr") if !pointers && !code => frames.eh_frame_hdr = place,
            _ => {}
        }
        out.push(section);
    }
    Some((out, frames))
}

/// Where the code is: from the first code section to the end of the last (file offsets), and
/// the address of its first byte.
fn code_span(sections: &[Section]) -> Option<(u64, u64, u64)> {
    let first = sections.iter().filter(|s| s.code).min_by_key(|s| s.offset)?;
    let end = sections.iter().filter(|s| s.code).map(|s| s.offset + s.size).max()?;
    Some((first.offset, end - first.offset, first.address))
}

/// A 64-bit hash of a window, seeded by what kind of bytes it is.
fn hash(window: &[u8], seed: u64) -> u64 {
    let word = |i: usize| u64::from_le_bytes(window[i..i + 8].try_into().expect("8 bytes"));
    let mut h = seed ^ word(0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= word(8).rotate_left(21).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    h ^= word(16).rotate_left(42).wrapping_mul(0x1656_67b1_9e37_79f9);
    h ^= h >> 29;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^ (h >> 32)
}

/// The sampled windows of a file, as (hash, address), sorted, with every hash found more
/// than once dropped; and when `references` is given, the end and target address of every
/// reference of its code.
fn windows(data: &[u8], sections: &[Section], mut references: Option<&mut Vec<(u32, u32)>>) -> Option<Vec<(u64, u32)>> {
    let mut out = Vec::new();
    let mut keep = |h: u64, address: u64| {
        if h.is_multiple_of(SAMPLE) {
            out.push((h, address as u32));
        }
    };
    let (offset, len, address) = code_span(sections)?;
    let raw = &data[offset as usize..(offset + len) as usize];
    // A copy of the code with its references blanked, and where its instructions start.
    let mut code = raw.to_vec();
    let mut instruction_starts = Vec::new();
    scan(raw, address, true, |f| {
        instruction_starts.push(f.start);
        if let Some(at) = f.field {
            if let Some(r) = references.as_mut() {
                let end = address.wrapping_add((f.start + f.len) as u64) as u32;
                let v = u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
                r.push((end, end.wrapping_add(v)));
            }
            code[at..at + 4].fill(0);
        }
    });
    for &s in &instruction_starts {
        if s + WINDOW <= code.len() {
            keep(hash(&code[s..s + WINDOW], 0), address + s as u64);
        }
    }
    drop(code);
    for s in sections.iter().filter(|s| !s.code) {
        let bytes = &data[s.offset as usize..(s.offset + s.size) as usize];
        let mut at = ((8 - s.address % 8) % 8) as usize;
        while at + WINDOW <= bytes.len() {
            keep(hash(&bytes[at..at + WINDOW], 0x5eed), s.address + at as u64);
            at += 8;
        }
    }
    out.sort_unstable();
    Some(out.chunk_by(|a, b| a.0 == b.0).filter(|same| same.len() == 1).map(|same| same[0]).collect())
}

/// A run of anchors with one shift: new addresses `start..end`, old = new + `shift`.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u64,
    end: u64,
    shift: i64,
    anchors: u32,
}

/// The runs that anchors `(new, old)` (sorted by new) make.
fn runs(anchors: &[(u32, u32)]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &(new, old) in anchors {
        let (new, shift) = (u64::from(new), i64::from(old) - i64::from(new));
        match runs.last_mut() {
            Some(r) if r.shift == shift && new <= r.end + MAX_ANCHOR_GAP => {
                r.end = new + WINDOW as u64;
                r.anchors += 1;
            }
            _ => runs.push(Run { start: new, end: new + WINDOW as u64, shift, anchors: 1 }),
        }
    }
    runs.retain(|r| r.anchors >= MIN_ANCHORS);
    runs
}

/// The segments that `runs` make.
fn segments(mut runs: Vec<Run>, image_end: u64) -> Vec<Segment> {
    runs.sort_by_key(|r| r.start);
    // Not overlapping in new addresses: a run ends where the next starts.
    let mut clipped: Vec<Run> = Vec::with_capacity(runs.len());
    for r in runs {
        while let Some(last) = clipped.last_mut() {
            if last.end <= r.start {
                break;
            }
            last.end = r.start;
            if last.end <= last.start {
                clipped.pop();
            } else {
                break;
            }
        }
        clipped.push(r);
    }
    let old = |r: &Run, x: u64| (x as i64 + r.shift) as u64;
    // Nor in old addresses: the longest runs first.
    let mut order: Vec<usize> =
        (0..clipped.len()).filter(|&i| old(&clipped[i], clipped[i].start) as i64 >= 0 && old(&clipped[i], clipped[i].end) <= 1 << 32).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(clipped[i].end - clipped[i].start));
    let mut taken: BTreeMap<u64, u64> = BTreeMap::new();
    let mut kept = Vec::new();
    for i in order {
        let r = clipped[i];
        let (start, end) = (old(&r, r.start), old(&r, r.end));
        let before = taken.range(..end).next_back().is_some_and(|(_, &e)| e > start);
        if !before {
            taken.insert(start, end);
            kept.push(r);
        }
    }
    kept.sort_by_key(|r| r.start);
    // Each reaches forward to the next, as far as the old addresses after it are free.
    for i in 0..kept.len() {
        let next_new = kept.get(i + 1).map_or(image_end.max(kept[i].end), |n| n.start);
        let old_end = old(&kept[i], kept[i].end);
        let next_old = taken.range(old_end..).next().map_or(1 << 32, |(&s, _)| s);
        let reach = (next_new - kept[i].end).min(next_old - old_end);
        if let Some((_, e)) = taken.range_mut(..=old(&kept[i], kept[i].start)).next_back() {
            *e += reach;
        }
        kept[i].end += reach;
    }
    let mut out: Vec<Segment> = Vec::with_capacity(kept.len());
    for r in kept {
        push_merged(&mut out, Segment { new: r.start as u32, old: old(&r, r.start) as u32, len: (r.end - r.start) as u32 });
    }
    out
}

/// Appends `s` to `out`, or lengthens the last segment when `s` continues it on both sides.
fn push_merged(out: &mut Vec<Segment>, s: Segment) {
    match out.last_mut() {
        Some(l) if u64::from(l.new) + u64::from(l.len) == u64::from(s.new) && u64::from(l.old) + u64::from(l.len) == u64::from(s.old) => l.len += s.len,
        _ => out.push(s),
    }
}

/// The segments that hold the end or the target of some reference, or a pointer: the others
/// change nothing the view sees, and would cost bytes in the delta. Neighbours of one shift
/// merge.
fn used(segments: Vec<Segment>, references: &[(u32, u32)]) -> Vec<Segment> {
    let mut hits = vec![0u32; segments.len()];
    let mut hit = |x: u32| {
        let i = segments.partition_point(|s| s.new <= x);
        if let Some(i) = i.checked_sub(1) {
            if u64::from(x) < u64::from(segments[i].new) + u64::from(segments[i].len) {
                hits[i] += 1;
            }
        }
    };
    for &(end, target) in references {
        hit(end);
        hit(target);
    }
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for (s, h) in segments.into_iter().zip(hits) {
        if h >= MIN_HITS {
            push_merged(&mut out, s);
        }
    }
    out
}

/// Files up to this size are coded through their view only when [`worth_it`] says so; larger
/// ones always are (their maps cost little beside what moved code costs).
pub const TRIAL_MAX_BYTES: u64 = 16 << 20;

/// zstd level of the trial: what matters is the difference, cheaply.
const TRIAL_LEVEL: i32 = 3;

/// Whether `view` of `new` is estimated smaller than `new` as it is, its map included, both
/// compressed against `old`.
pub fn worth_it(new: &[u8], old: &[u8], view: &CodeView) -> Result<bool> {
    let (start, end) = (view.offset as usize, (view.offset + view.len) as usize);
    let mut seen = new[..start].to_vec();
    let mut converter = Converter::new(&view.map, view.len, Direction::ToOld)?;
    converter.write(&new[start..end], &mut seen).and_then(|()| converter.finish(&mut seen)).map_err(|e| Error::io("seeing x86-64 code", e))?;
    seen.extend_from_slice(&new[end..]);
    let map = serde_json::to_vec(&view.map).map_err(|e| Error::malformed("address map", e.to_string()))?.len() as u64;
    let (plain, through) = rayon::join(|| compressed_len(old, new, TRIAL_LEVEL, true), || compressed_len(old, &seen, TRIAL_LEVEL, true));
    Ok(through? + map / 2 < plain?)
}

/// The code view of `new`, an x86-64 ELF file, against `old`, its partner: `None` unless both
/// parse, have code and share anchors.
pub fn x86_64_code(new: &[u8], old: &[u8]) -> Option<CodeView> {
    let ((new_sections, new_frames), (old_sections, old_frames)) = (sections(new)?, sections(old)?);
    let (offset, len, code) = code_span(&new_sections)?;
    let mut references = Vec::new();
    // Both files decoded at once.
    let (new_windows, old_windows) = rayon::join(|| windows(new, &new_sections, Some(&mut references)), || windows(old, &old_sections, None));
    let (new_windows, old_windows) = (new_windows?, old_windows?);
    let mut anchors = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < new_windows.len() && j < old_windows.len() {
        match new_windows[i].0.cmp(&old_windows[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                anchors.push((new_windows[i].1, old_windows[j].1));
                i += 1;
                j += 1;
            }
        }
    }
    anchors.sort_unstable();
    // The pointer ranges: the whole words (at addresses that are multiples of 8) of the
    // writable sections and relocation tables, as (file offset, length).
    let mut pointers: Vec<(u64, u64)> = new_sections
        .iter()
        .filter(|s| s.pointers)
        .filter_map(|s| {
            let skip = (8 - s.address % 8) % 8;
            let len = s.size.checked_sub(skip)? / 8 * 8;
            (len > 0).then_some((s.offset + skip, len))
        })
        .collect();
    pointers.sort_unstable();
    // Neither over the code nor over each other (sections of odd files may overlap).
    let mut end = 0;
    pointers.retain(|&(at, n)| {
        let clear = at >= end && (at + n <= offset || at >= offset + len);
        if clear {
            end = at + n;
        }
        clear
    });
    for &(at, len) in &pointers {
        for w in new[at as usize..(at + len) as usize].chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            if v >> 32 == 0 {
                references.push((v as u32, v as u32));
            }
        }
    }
    let image_end = new_sections.iter().map(|s| s.address + s.size).max()?;
    let mut segments = used(segments(runs(&anchors), image_end), &references);
    // Call frame information, over neither the code nor the pointers: its entries placed
    // through the code's map, then the map made again with them.
    let clear = |p: &Place| p.offset + p.size <= offset || p.offset >= offset + len;
    let clear = |p: &Option<Place>| p.filter(|p| clear(p) && pointers.iter().all(|&(at, n)| at + n <= p.offset || at >= p.offset + p.size));
    let frames = FrameSections { eh_frame: clear(&new_frames.eh_frame), eh_frame_hdr: clear(&new_frames.eh_frame_hdr) };
    let pieces = call_frames::matched(new, &frames, old, &old_frames, &Projection::new(&segments));
    if !pieces.is_empty() {
        let mut all = runs(&anchors);
        for &(n, o, l) in &pieces {
            let (start, shift) = (u64::from(n), i64::from(o) - i64::from(n));
            all.push(Run { start, end: start + u64::from(l), shift, anchors: MIN_ANCHORS });
            references.push((n, n));
        }
        segments = used(self::segments(all, image_end), &references);
    }
    if segments.is_empty() || segments.len() > MAX_SEGMENTS {
        return None;
    }
    // One span from the first pointer range, call frames or the code, whichever comes first
    // in the file, to the end of the last.
    let places = [frames.eh_frame, frames.eh_frame_hdr];
    let start = pointers.iter().map(|p| p.0).chain(places.iter().flatten().map(|p| p.offset)).chain([offset]).min()?;
    let end = pointers.iter().map(|p| p.0 + p.1).chain(places.iter().flatten().map(|p| p.offset + p.size)).chain([offset + len]).max()?;
    let mut map = AddressMap::new(code, &segments);
    map.code_at = offset - start;
    map.code_len = Some(len);
    if !pieces.is_empty() {
        let at = |p: Option<Place>| p.map(|p| [p.offset - start, p.size, p.address]);
        (map.eh_frame, map.eh_frame_hdr) = (at(frames.eh_frame), at(frames.eh_frame_hdr));
        // Sections of odd files may overlap each other: then neither is converted.
        if map.regions(end - start).is_err() {
            (map.eh_frame, map.eh_frame_hdr) = (None, None);
        }
    }
    let mut last = 0;
    for (at, n) in pointers {
        map.pointers.extend([at - start - last, n]);
        last = at - start + n;
    }
    Some(CodeView { offset: start, len: end - start, map })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz seed: a small x86-64 executable (a C program, stripped).
    fn elf() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/x86_64_code/elf-exec")).unwrap()
    }

    #[test]
    fn runs_of_anchors_make_segments_that_reach_to_the_next() {
        // Three anchors moved by -0x10, then four by +0x100, then one alone (noise).
        let anchors =
            [(0x1000, 0x0ff0), (0x1040, 0x1030), (0x1080, 0x1070), (0x2000, 0x2100), (0x2020, 0x2120), (0x2040, 0x2140), (0x2060, 0x2160), (0x3000, 0x500)];
        let segments = segments(runs(&anchors), 0x4000);
        assert_eq!(
            segments,
            [
                // The first reaches to the second.
                Segment { new: 0x1000, old: 0x0ff0, len: 0x1000 },
                // The second reaches to the end of the image.
                Segment { new: 0x2000, old: 0x2100, len: 0x2000 },
            ]
        );
    }

    #[test]
    fn segments_that_claim_the_same_old_addresses_keep_the_longest() {
        // Two runs moved onto the same old code: the longer one keeps it.
        let anchors = [(0x1000, 0x5000), (0x1100, 0x5100), (0x1200, 0x5200), (0x3000, 0x5000), (0x3040, 0x5040)];
        let segments = segments(runs(&anchors), 0x1218);
        assert_eq!(segments, [Segment { new: 0x1000, old: 0x5000, len: 0x218 }]);
    }

    #[test]
    fn segments_that_no_reference_uses_are_dropped() {
        let segments = [
            Segment { new: 0x1000, old: 0x1000, len: 0x100 },
            Segment { new: 0x1100, old: 0x1110, len: 0x100 },
            Segment { new: 0x1200, old: 0x1220, len: 0x100 },
        ];
        // A call from the first segment into the third; the second holds nothing.
        assert_eq!(used(segments.to_vec(), &[(0x1010, 0x1250)]), [segments[0], segments[2]]);
    }

    #[test]
    fn a_file_against_itself_maps_its_addresses_onto_themselves() {
        let data = elf();
        let view = x86_64_code(&data, &data).expect("a code view");
        assert!(view.offset + view.len <= data.len() as u64);
        let map = &view.map;
        assert!(map.code_len.is_some_and(|n| n > 0), "{map:?}");
        assert!(!map.pointers.is_empty(), "the relocations and .data.rel.ro hold pointers: {map:?}");
        let projection = map.projection().unwrap();
        for s in map.segments().unwrap() {
            assert_eq!(s.new, s.old);
            assert_eq!(projection.to_old(s.new), s.new);
        }
    }

    #[test]
    fn files_that_are_not_x86_64_executables_or_lie_have_no_view() {
        let data = elf();
        assert_eq!(x86_64_code(&data[..200], &data), None);
        assert_eq!(x86_64_code(b"#!/bin/sh\necho hello\n", &data), None);
        // A section table whose first section claims to run past the end of the file.
        let header = FileHeader64::<LittleEndian>::parse(&data[..]).unwrap();
        let endian = header.endian().unwrap();
        let (shoff, shentsize) = (header.e_shoff(endian) as usize, usize::from(header.e_shentsize(endian)));
        let mut long = data.clone();
        for k in 1..usize::from(header.e_shnum(endian)) {
            let size_at = shoff + k * shentsize + 32;
            long[size_at..size_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        }
        assert_eq!(x86_64_code(&long, &data), None);
    }
}
