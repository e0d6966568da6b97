//! Where a new x86-64 executable's call frame information was in the old one: segments of
//! its address map ([`crate::diff::address_map`]) that place each frame description entry
//! (FDE), common entry (CIE), LSDA and `.eh_frame_hdr` at its old address, so that the
//! converter ([`crate::layer::call_frames`]) sees an entry that only moved as the old bytes.
//!
//! Entries are matched by what they describe: an FDE of the new file goes with the one FDE
//! of the old file whose function is at the old address the code's map gives the new
//! function; its LSDA with that FDE's LSDA; a CIE with the one CIE of the same bytes. Between
//! two matched FDEs, as many unmatched FDEs on each side are taken as the same functions in
//! order, changed: they, their LSDAs and their functions' starts are placed too, so that
//! calls to a function whose code changed still read as before.

use std::collections::{HashMap, HashSet};

use crate::format::address_map::Projection;
use crate::layer::call_frames::{records, Record, HDR_BYTES};

/// A section of a file: its bytes' offset and size, and its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    /// File offset.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Address of its first byte.
    pub address: u64,
}

impl Place {
    fn bytes<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        &data[self.offset as usize..(self.offset + self.size) as usize]
    }
}

/// A file's `.eh_frame` and `.eh_frame_hdr`, where it has them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameSections {
    /// `.eh_frame`.
    pub eh_frame: Option<Place>,
    /// `.eh_frame_hdr`.
    pub eh_frame_hdr: Option<Place>,
}

/// Pieces of the map, as (new address, old address, length), in order of new address, not
/// overlapping on either side: each matched entry where it was (and each changed function's
/// start, over as many bytes as the shorter of the two), neighbours that moved by one amount
/// joined (LSDAs reach to the next of the same shift).
pub fn matched(new: &[u8], new_sections: &FrameSections, old: &[u8], old_sections: &FrameSections, code: &Projection) -> Vec<(u32, u32, u32)> {
    let mut out: Vec<(u32, u32, u32, bool)> = Vec::new();
    if let (Some(n), Some(o)) = (new_sections.eh_frame, old_sections.eh_frame) {
        let (old_records, new_records) = (records(o.bytes(old), o.address as u32), records(n.bytes(new), n.address as u32));
        let mut cies: HashMap<&[u8], Option<u32>> = HashMap::new();
        for r in &old_records {
            if let Record::Cie { address, bytes } = r {
                cies.entry(bytes).and_modify(|a| *a = None).or_insert(Some(*address));
            }
        }
        for r in &new_records {
            if let Record::Cie { address, bytes } = r {
                if let Some(Some(at)) = cies.get(bytes.as_slice()) {
                    out.push((*address, *at, bytes.len() as u32, false));
                }
            }
        }
        let (old_fdes, new_fdes) = (fdes(&old_records), fdes(&new_records));
        let mut by_function: HashMap<u32, Option<usize>> = HashMap::new();
        for (j, f) in old_fdes.iter().enumerate() {
            by_function.entry(f.function).and_modify(|a| *a = None).or_insert(Some(j));
        }
        // FDEs whose function the code's map places on an old FDE's function, in order.
        let mut pairs: Vec<(usize, usize)> = Vec::new();
        let mut taken = HashSet::new();
        for (i, f) in new_fdes.iter().enumerate() {
            if let Some(Some(j)) = by_function.get(&code.to_old(f.function)) {
                if taken.insert(*j) {
                    pairs.push((i, *j));
                }
            }
        }
        // Between two such pairs in the same order on both sides, as many FDEs on each side:
        // taken as the same functions, changed, in order.
        let mut gaps = Vec::new();
        for w in pairs.windows(2) {
            let ((i1, j1), (i2, j2)) = (w[0], w[1]);
            if i2 > i1 + 1 && j2 > j1 && i2 - i1 == j2 - j1 {
                gaps.extend((1..i2 - i1).map(|k| (i1 + k, j1 + k)));
            }
        }
        for (&(i, j), changed) in pairs.iter().map(|p| (p, false)).chain(gaps.iter().map(|p| (p, true))) {
            let (a, b) = (&new_fdes[i], &old_fdes[j]);
            out.push((a.address, b.address, a.len.min(b.len), false));
            if let (Some(l), Some(ol)) = (a.lsda, b.lsda) {
                out.push((l, ol, 1, true));
            }
            if changed {
                // The function itself: the code's map did not place it (it changed), so its
                // callers would see another distance to it.
                out.push((a.function, b.function, a.function_len.min(b.function_len).max(1), false));
            }
        }
    }
    if let (Some(n), Some(o)) = (new_sections.eh_frame_hdr, old_sections.eh_frame_hdr) {
        if n.size >= HDR_BYTES as u64 && o.size >= HDR_BYTES as u64 {
            out.push((n.address as u32, o.address as u32, HDR_BYTES as u32, false));
        }
    }
    // One piece per address on each side.
    out.sort_unstable();
    let (mut new_seen, mut old_seen) = (HashSet::new(), HashSet::new());
    out.retain(|p| new_seen.insert(p.0) && old_seen.insert(p.1));
    // LSDAs reach to the next piece when it has their shift.
    for i in 0..out.len().saturating_sub(1) {
        let (a, b) = (out[i], out[i + 1]);
        if a.3 && i64::from(b.1) - i64::from(b.0) == i64::from(a.1) - i64::from(a.0) {
            out[i].2 = b.0 - a.0;
        }
    }
    // Not overlapping on either side: the first kept.
    let mut end = 0u64;
    out.retain(|p| {
        let keep = u64::from(p.0) >= end;
        end = end.max(u64::from(p.0) + u64::from(p.2));
        keep
    });
    let mut by_old: Vec<usize> = (0..out.len()).collect();
    by_old.sort_unstable_by_key(|&i| out[i].1);
    let mut drop = vec![false; out.len()];
    let mut end = 0u64;
    for i in by_old {
        if u64::from(out[i].1) < end {
            drop[i] = true;
        } else {
            end = u64::from(out[i].1) + u64::from(out[i].2);
        }
    }
    out.iter().zip(drop).filter(|(_, d)| !d).map(|(p, _)| (p.0, p.1, p.2)).collect()
}

/// An FDE whose function the converter sees.
struct Fde {
    address: u32,
    len: u32,
    function: u32,
    function_len: u32,
    lsda: Option<u32>,
}

/// The FDEs of `records` whose function the converter sees, in order.
fn fdes(records: &[Record]) -> Vec<Fde> {
    records
        .iter()
        .filter_map(|r| match *r {
            Record::Fde { address, len, function: Some(function), function_len, lsda } => {
                Some(Fde { address, len, function, function_len: function_len.unwrap_or(1), lsda })
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::address_map::Segment;
    use crate::layer::call_frames::tests::{cie_zplr, fde};

    #[test]
    fn changed_functions_between_matched_ones_are_paired_in_order() {
        let cie = cie_zplr();
        let at = |base: u32, k: u32| base + cie.len() as u32 + 24 * k;
        // Three functions; the middle one changed (the code's map does not place it).
        let (mut old, mut new) = (cie.clone(), cie.clone());
        for (k, (o, n)) in [(0x40_0000, 0x50_0000), (0x40_0100, 0x50_0200), (0x40_0300, 0x50_0300)].into_iter().enumerate() {
            old.extend(fde(at(0x1000, k as u32), 0x1000, o, 0x9000 + 16 * k as u32));
            new.extend(fde(at(0x2000, k as u32), 0x2000, n, 0xa000 + 32 * k as u32));
        }
        let code = Projection::new(&[Segment { new: 0x50_0000, old: 0x40_0000, len: 0x100 }, Segment { new: 0x50_0300, old: 0x40_0300, len: 0x100 }]);
        let place = |address: u64, size: usize| FrameSections { eh_frame: Some(Place { offset: 0, size: size as u64, address }), eh_frame_hdr: None };
        let pieces = matched(&new, &place(0x2000, new.len()), &old, &place(0x1000, old.len()), &code);
        // The middle FDE goes with the middle one, its function's start with the old one's,
        // over the function's length (0x40 in both).
        assert!(pieces.contains(&(at(0x2000, 1), at(0x1000, 1), 24)), "{pieces:x?}");
        assert!(pieces.contains(&(0x50_0200, 0x40_0100, 0x40)), "{pieces:x?}");
        assert!(pieces.contains(&(0xa020, 0x9010, 1)), "{pieces:x?}");
    }

    #[test]
    fn entries_are_matched_by_the_function_they_describe() {
        let cie = cie_zplr();
        let at = |base: u32| base + cie.len() as u32;
        // Old: functions f at 0x40_0000 and g at 0x40_0100; new: g first, then f, moved.
        let mut old = cie.clone();
        old.extend(fde(at(0x1000), 0x1000, 0x40_0000, 0x9000));
        old.extend(fde(at(0x1000) + 24, 0x1000, 0x40_0100, 0x9010));
        let mut new = cie.clone();
        new.extend(fde(at(0x2000), 0x2000, 0x50_0100, 0xa010));
        new.extend(fde(at(0x2000) + 24, 0x2000, 0x50_0000, 0xa000));
        let code = Projection::new(&[Segment { new: 0x50_0000, old: 0x40_0000, len: 0x200 }]);
        let place = |address: u64, size: usize| FrameSections { eh_frame: Some(Place { offset: 0, size: size as u64, address }), eh_frame_hdr: None };
        let pieces = matched(&new, &place(0x2000, new.len()), &old, &place(0x1000, old.len()), &code);
        assert_eq!(
            pieces,
            vec![
                (0x2000, 0x1000, cie.len() as u32),
                (at(0x2000), at(0x1000) + 24, 24),
                (at(0x2000) + 24, at(0x1000), 24),
                (0xa000, 0x9000, 0x10),
                (0xa010, 0x9010, 1),
            ]
        );
    }
}
