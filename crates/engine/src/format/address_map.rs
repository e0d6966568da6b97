//! Address maps: where the code and data of a new executable were in the old one.
//!
//! An [`AddressMap`] lists segments of 32-bit addresses, each a range of the new file's
//! addresses and the range of the same length in the old file's addresses that holds the
//! same function or data. [`Projection`] extends it to a bijection of all 2^32 addresses, so
//! that anything computed through it can be turned back exactly, whatever the bytes: an
//! address inside a segment moves with it; the addresses outside every segment keep their
//! order, the k-th one of the new side going to the k-th one of the old side. Addresses below
//! every segment of both sides and above every segment of both sides are unchanged.
//!
//! The x86-64 code view ([`crate::layer::x86_64_code`]) codes each 32-bit reference of the
//! new code as the distance it has in the old file's addresses, so that a call whose caller
//! and callee both moved, by different amounts, is the same bytes as before.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::is_zero;

/// The most segments a map may have: the applier holds a map's segments twice with their
/// search index (about 112 bytes a segment in all), so this bounds its memory at about 7 MiB.
/// The differ needs one per run of code or data that moved by one amount (about 10,000 for a
/// 33 MB Rust executable).
pub const MAX_SEGMENTS: usize = 1 << 16;

/// The most pointer ranges a map may list (a real executable has one per writable section and
/// relocation table: a few dozen); the applier holds them all.
pub const MAX_POINTER_RANGES: usize = 1 << 12;

/// The map of one span of an x86-64 file, as `delta.json` carries it, with what the span
/// holds: its code, and ranges of 64-bit pointers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressMap {
    /// The address of the code's first byte in the new file (the address of the byte at span
    /// position `code_at + p` is `code + p`, modulo 2^32).
    pub code: u64,
    /// Where the code starts in the span.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub code_at: u64,
    /// How long the code is; to the end of the span when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_len: Option<u64>,
    /// The segments, three numbers each, in order of their new addresses: the gap from the
    /// end of the previous segment (from 0 for the first), the length (at least 1), and how
    /// much the old start minus the new start differs from the previous segment's (from 0).
    pub segments: Vec<i64>,
    /// Ranges of 64-bit pointers, two numbers each, in span order: the gap from the end of
    /// the previous range (from the span's start for the first) and the length, a multiple of
    /// 8. They do not overlap the code.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pointers: Vec<u64>,
    /// Where `.eh_frame` is: its span position, length and address (feature
    /// `x86-64-call-frames`, see [`crate::layer::call_frames`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eh_frame: Option<[u64; 3]>,
    /// Where `.eh_frame_hdr` is, the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eh_frame_hdr: Option<[u64; 3]>,
}

/// What a range of a span holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holds {
    /// x86-64 instructions, the first at address `ip`.
    Code {
        /// Address of the range's first byte.
        ip: u64,
    },
    /// 64-bit little-endian pointers.
    Pointers,
    /// Records of `.eh_frame`.
    EhFrame {
        /// Address of the range's first byte.
        address: u64,
    },
    /// `.eh_frame_hdr`: its header and table.
    EhFrameHdr {
        /// Address of the range's first byte.
        address: u64,
    },
}

impl Holds {
    /// What a reader calls it.
    fn noun(self) -> &'static str {
        match self {
            Holds::Code { .. } => "code",
            Holds::Pointers => "pointer range",
            Holds::EhFrame { .. } => ".eh_frame",
            Holds::EhFrameHdr { .. } => ".eh_frame_hdr",
        }
    }
}

/// A range of a span, in span positions, and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First position.
    pub start: u64,
    /// Position after the last.
    pub end: u64,
    /// What the bytes are.
    pub holds: Holds,
}

/// One segment: `len` new addresses from `new`, the same number of old ones from `old`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First new address.
    pub new: u32,
    /// First old address.
    pub old: u32,
    /// Number of addresses (at least 1).
    pub len: u32,
}

/// Refuses a map of `delta.json` for `reason`.
fn bad<T>(reason: String) -> Result<T> {
    Err(Error::malformed("delta.json", format!("address map: {reason}")))
}

impl AddressMap {
    /// The map of `segments` (in order of new address, not overlapping on either side), for
    /// code starting at address `code`.
    pub fn new(code: u64, segments: &[Segment]) -> Self {
        let mut flat = Vec::with_capacity(segments.len() * 3);
        let (mut end, mut shift) = (0i64, 0i64);
        for s in segments {
            let this = i64::from(s.old) - i64::from(s.new);
            flat.extend([i64::from(s.new) - end, i64::from(s.len), this - shift]);
            (end, shift) = (i64::from(s.new) + i64::from(s.len), this);
        }
        AddressMap { code, segments: flat, ..Default::default() }
    }

    /// The segments, checked: whole triples, each within 32-bit addresses, in order, at least
    /// one address long, and overlapping no other on either side.
    pub fn segments(&self) -> Result<Vec<Segment>> {
        if !self.segments.len().is_multiple_of(3) {
            return bad(format!("{} numbers are not whole segments of three", self.segments.len()));
        }
        if self.segments.len() / 3 > MAX_SEGMENTS {
            return bad(format!("{} segments exceed the limit of {MAX_SEGMENTS}", self.segments.len() / 3));
        }
        let mut out = Vec::with_capacity(self.segments.len() / 3);
        let (mut end, mut shift) = (0i64, 0i64);
        for (k, t) in self.segments.chunks_exact(3).enumerate() {
            let (gap, len) = (t[0], t[1]);
            // Out of every 32-bit range when it overflows.
            shift = shift.checked_add(t[2]).unwrap_or(i64::MAX);
            let new = end.checked_add(gap);
            let old = new.and_then(|n| n.checked_add(shift));
            let fits = |start: Option<i64>| start.is_some_and(|s| s >= 0 && s.checked_add(len).is_some_and(|e| e <= 1 << 32));
            if gap < 0 || len < 1 || !fits(new) || !fits(old) {
                return bad(format!("segment {k} (gap {gap}, length {len}, shift {shift}) is out of order or outside 32-bit addresses"));
            }
            let (new, old) = (new.unwrap_or_default(), old.unwrap_or_default());
            out.push(Segment { new: new as u32, old: old as u32, len: len as u32 });
            end = new + len;
        }
        let mut by_old: Vec<&Segment> = out.iter().collect();
        by_old.sort_by_key(|s| s.old);
        if let Some(w) = by_old.windows(2).find(|w| u64::from(w[0].old) + u64::from(w[0].len) > u64::from(w[1].old)) {
            return bad(format!("segments at new addresses {:#x} and {:#x} overlap in old addresses", w[0].new, w[1].new));
        }
        Ok(out)
    }

    /// The ranges of a span of `len` bytes that the view converts, in order, checked: the
    /// code and the pointer ranges lie inside the span and do not overlap, and each pointer
    /// range is whole words.
    pub fn regions(&self, len: u64) -> Result<Vec<Region>> {
        let code_end = match self.code_len {
            Some(n) => self.code_at.checked_add(n),
            None => Some(len),
        };
        let Some(code_end) = code_end.filter(|&e| e <= len && e >= self.code_at) else {
            return bad(format!("the code at {} ({:?} bytes) is outside the span of {len} bytes", self.code_at, self.code_len));
        };
        let mut out = vec![Region { start: self.code_at, end: code_end, holds: Holds::Code { ip: self.code } }];
        if !self.pointers.len().is_multiple_of(2) {
            return bad(format!("{} numbers are not whole pointer ranges of two", self.pointers.len()));
        }
        if self.pointers.len() / 2 > MAX_POINTER_RANGES {
            return bad(format!("{} pointer ranges exceed the limit of {MAX_POINTER_RANGES}", self.pointers.len() / 2));
        }
        let mut end = 0u64;
        for (k, r) in self.pointers.chunks_exact(2).enumerate() {
            let start = end.checked_add(r[0]);
            let stop = start.and_then(|s| s.checked_add(r[1]));
            let (Some(start), Some(stop)) = (start, stop) else { return bad(format!("pointer range {k} ends beyond 2^64")) };
            if r[1] == 0 || !r[1].is_multiple_of(8) || stop > len || (start < code_end && self.code_at < stop && code_end > self.code_at) {
                return bad(format!("pointer range {k} ({start}..{stop}) is empty, not whole words, outside the span of {len} bytes or over the code"));
            }
            out.push(Region { start, end: stop, holds: Holds::Pointers });
            end = stop;
        }
        let kinds = [(self.eh_frame, (|address| Holds::EhFrame { address }) as fn(u64) -> Holds), (self.eh_frame_hdr, |address| Holds::EhFrameHdr { address })];
        for (place, holds) in kinds {
            let Some([start, n, address]) = place else { continue };
            let holds = holds(address);
            let stop = start.checked_add(n).filter(|&e| e <= len);
            let (Some(stop), true) = (stop, address.checked_add(n).is_some_and(|e| e <= 1 << 32)) else {
                return bad(format!("{} at {start} ({n} bytes, address {address:#x}) is outside the span of {len} bytes or 32-bit addresses", holds.noun()));
            };
            out.push(Region { start, end: stop, holds });
        }
        out.sort_by_key(|r| r.start);
        out.retain(|r| r.end > r.start);
        if let Some(w) = out.windows(2).find(|w| w[0].end > w[1].start) {
            return bad(format!(
                "the {} at {}..{} overlaps the {} at {}..{}",
                w[0].holds.noun(),
                w[0].start,
                w[0].end,
                w[1].holds.noun(),
                w[1].start,
                w[1].end
            ));
        }
        Ok(out)
    }

    /// Whether the map converts call frame information (`.eh_frame` or `.eh_frame_hdr`).
    pub fn has_call_frames(&self) -> bool {
        self.eh_frame.is_some() || self.eh_frame_hdr.is_some()
    }

    /// The bijection this map defines, checked as [`AddressMap::segments`] says.
    pub fn projection(&self) -> Result<Projection> {
        Ok(Projection::new(&self.segments()?))
    }
}

/// One side's segments in address order, with how many segment addresses lie before each.
#[derive(Clone, Debug)]
struct Side {
    /// (start on this side, start on the other side, length), by start on this side.
    segments: Vec<(u64, u64, u64)>,
    /// `before[i]`: the total length of `segments[..i]` (one more entry than `segments`).
    before: Vec<u64>,
    /// `free[i]`: how many addresses outside every segment lie below `segments[i]`.
    free: Vec<u64>,
    /// Narrows the search of `segments` by their starts.
    starts: Buckets,
    /// Narrows the search of `free`.
    free_buckets: Buckets,
}

impl Side {
    fn new(mut segments: Vec<(u64, u64, u64)>) -> Side {
        segments.sort_unstable();
        let before: Vec<u64> = std::iter::once(0)
            .chain(segments.iter().scan(0, |total, s| {
                *total += s.2;
                Some(*total)
            }))
            .collect();
        let free: Vec<u64> = segments.iter().zip(&before).map(|(s, b)| s.0 - b).collect();
        let starts = Buckets::new(&segments.iter().map(|s| s.0).collect::<Vec<_>>());
        let free_buckets = Buckets::new(&free);
        Side { segments, before, free, starts, free_buckets }
    }

    /// Where `x` goes: through its segment if one holds it, else to the address of the same
    /// rank among the other side's free addresses.
    fn map(&self, x: u32, other: &Side) -> u32 {
        let x = u64::from(x);
        let i = self.starts.partition_point(&self.segments, |s| s.0 <= x, x);
        if i > 0 {
            let (start, to, len) = self.segments[i - 1];
            if x < start + len {
                return (to + (x - start)) as u32;
            }
        }
        // `x` is free: the segments wholly below it are the first `i`.
        let rank = x - self.before[i];
        // The other side's free address of that rank lies after every segment whose start
        // has at most `rank` free addresses below it.
        let k = other.free_buckets.partition_point(&other.free, |&f| f <= rank, rank);
        (rank + other.before[k]) as u32
    }
}

/// A radix index over sorted keys, so that finding how many keys are at most `x` searches
/// the few keys of `x`'s bucket instead of all of them. The x86-64 code view maps every
/// reference and pointer of a span, millions for a large executable, through maps of up to
/// [`MAX_SEGMENTS`] segments.
#[derive(Clone, Debug)]
struct Buckets {
    /// The smallest key: every bucket lies at or above it.
    base: u64,
    /// Bucket `b` holds keys in `base + (b << shift) .. base + ((b + 1) << shift)`.
    shift: u32,
    /// `first[b]`: how many keys lie below bucket `b`; one more entry than buckets.
    first: Vec<u32>,
}

impl Buckets {
    /// Indexes `keys` (ascending) with about two buckets per key.
    fn new(keys: &[u64]) -> Buckets {
        let (Some(&base), Some(&last)) = (keys.first(), keys.last()) else {
            return Buckets { base: 0, shift: 0, first: vec![0] };
        };
        let span = last - base;
        let mut shift = 0;
        while span >> shift > 2 * keys.len() as u64 {
            shift += 1;
        }
        let buckets = (span >> shift) as usize + 1;
        let mut first = Vec::with_capacity(buckets + 1);
        let mut below = 0;
        for b in 0..=buckets as u64 {
            let start = base + (b << shift);
            while below < keys.len() && keys[below] < start {
                below += 1;
            }
            first.push(below as u32);
        }
        Buckets { base, shift, first }
    }

    /// `items.partition_point(at_most)`, where `at_most(item)` says whether the item's key
    /// (as indexed) is at most `x`.
    #[inline]
    fn partition_point<T>(&self, items: &[T], at_most: impl Fn(&T) -> bool, x: u64) -> usize {
        if items.is_empty() || x < self.base {
            return 0;
        }
        let b = ((x - self.base) >> self.shift) as usize;
        if b + 1 >= self.first.len() {
            return items.len();
        }
        // The keys below bucket `b` are at most `x`; those from bucket `b + 1` on are above.
        let (lo, hi) = (self.first[b] as usize, self.first[b + 1] as usize);
        lo + items[lo..hi].partition_point(at_most)
    }
}

/// A bijection of 32-bit addresses built from an [`AddressMap`]: new to old and back.
#[derive(Clone, Debug)]
pub struct Projection {
    new: Side,
    old: Side,
}

impl Projection {
    /// The bijection of `segments` (not overlapping on either side: see
    /// [`AddressMap::segments`]).
    pub fn new(segments: &[Segment]) -> Self {
        let (new, old) =
            segments.iter().map(|s| ((u64::from(s.new), u64::from(s.old), u64::from(s.len)), (u64::from(s.old), u64::from(s.new), u64::from(s.len)))).unzip();
        Projection { new: Side::new(new), old: Side::new(old) }
    }

    /// The old address of new address `x`.
    pub fn to_old(&self, x: u32) -> u32 {
        self.new.map(x, &self.old)
    }

    /// The new address of old address `x`: the inverse of [`Projection::to_old`].
    pub fn to_new(&self, x: u32) -> u32 {
        self.old.map(x, &self.new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(new: u32, old: u32, len: u32) -> Segment {
        Segment { new, old, len }
    }

    #[test]
    fn addresses_move_with_their_segment_and_the_rest_keep_their_order() {
        // Code at 0x1000 grew by 0x10 before a function that moved to 0x2010.
        let p = Projection::new(&[seg(0x1000, 0x1000, 0x800), seg(0x2010, 0x2000, 0x100)]);
        assert_eq!(p.to_old(0x1010), 0x1010);
        assert_eq!(p.to_old(0x2020), 0x2010);
        // Below and far above every segment: unchanged.
        assert_eq!(p.to_old(0x10), 0x10);
        assert_eq!(p.to_old(u32::MAX), u32::MAX);
        // Free addresses between segments: in order, onto the old side's free addresses.
        assert_eq!(p.to_old(0x1800), 0x1800);
        // The new side has 0x10 more free addresses between the segments than the old: its
        // last 0x10 go to the old side's first free addresses after the segments.
        assert_eq!(p.to_old(0x1fff), 0x1fff);
        assert_eq!(p.to_old(0x2000), 0x2100);
        assert_eq!(p.to_old(0x2110), 0x2110);
        for x in [0u32, 0x17ff, 0x1800, 0x1fff, 0x2000, 0x200f, 0x2010, 0x210f, 0x2110, 0x8000_0000, u32::MAX] {
            assert_eq!(p.to_new(p.to_old(x)), x, "{x:#x}");
        }
    }

    #[test]
    fn maps_round_trip_through_json_numbers() {
        let segments = vec![seg(0x40_1000, 0x40_0ff0, 0x300), seg(0x40_2000, 0x40_2100, 1), seg(0x50_0000, 0x10, 0x20)];
        let map = AddressMap::new(0x40_1000, &segments);
        assert_eq!(map.regions(100).unwrap(), [Region { start: 0, end: 100, holds: Holds::Code { ip: 0x40_1000 } }]);
        assert_eq!(map.segments[..6], [0x40_1000, 0x300, -0x10, 0xd00, 1, 0x110]);
        let json = serde_json::to_string(&map).unwrap();
        let back: AddressMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back.segments().unwrap(), segments);
    }

    #[test]
    fn spans_hold_code_and_pointer_ranges_that_do_not_overlap() {
        let map = AddressMap { code: 0x40_2000, code_at: 0x1000, code_len: Some(0x800), pointers: vec![0x10, 0x40, 0x1800, 0x18], ..Default::default() };
        assert_eq!(
            map.regions(0x4000).unwrap(),
            [
                Region { start: 0x10, end: 0x50, holds: Holds::Pointers },
                Region { start: 0x1000, end: 0x1800, holds: Holds::Code { ip: 0x40_2000 } },
                Region { start: 0x1850, end: 0x1868, holds: Holds::Pointers },
            ]
        );
        let refused = |m: AddressMap, len: u64| m.regions(len).unwrap_err().to_string();
        // Past the span, over the code, not whole words, cut.
        assert!(refused(map.clone(), 0x1860).contains("outside the span"));
        assert!(refused(AddressMap { pointers: vec![0xff8, 0x10], ..map.clone() }, 0x4000).contains("over the code"));
        assert!(refused(AddressMap { pointers: vec![0, 12], ..map.clone() }, 0x4000).contains("not whole words"));
        assert!(refused(AddressMap { pointers: vec![0], ..map.clone() }, 0x4000).contains("not whole pointer ranges"));
        assert!(refused(AddressMap { code_len: Some(0x4000), ..map.clone() }, 0x4000).contains("outside the span"));
        // Too many ranges: refused before any is read.
        let many = AddressMap { code_len: Some(0), pointers: [0, 8].repeat(MAX_POINTER_RANGES + 1), ..map.clone() };
        assert!(refused(many, 1 << 20).contains("exceed the limit"));
        // Call frames: placed, and refused where they overlap another range or leave the span.
        let frames = AddressMap { eh_frame: Some([0x2000, 0x100, 0x50_0000]), eh_frame_hdr: Some([0x1f00, 0x100, 0x4f_ff00]), ..map.clone() };
        let regions = frames.regions(0x4000).unwrap();
        assert_eq!(regions[3], Region { start: 0x1f00, end: 0x2000, holds: Holds::EhFrameHdr { address: 0x4f_ff00 } });
        assert_eq!(regions[4], Region { start: 0x2000, end: 0x2100, holds: Holds::EhFrame { address: 0x50_0000 } });
        assert!(refused(AddressMap { eh_frame: Some([0x1ff0, 0x100, 0]), ..frames.clone() }, 0x4000).contains("overlaps"));
        assert!(refused(AddressMap { eh_frame: Some([0x3f00, 0x200, 0]), ..frames.clone() }, 0x4000).contains("outside the span"));
        assert!(refused(AddressMap { eh_frame: Some([0x2000, 0x100, u64::from(u32::MAX)]), ..frames }, 0x4000).contains("32-bit addresses"));
    }

    #[test]
    fn maps_that_overlap_leave_32_bits_or_are_cut_are_refused() {
        let refused = |segments: Vec<i64>| {
            let e = AddressMap { segments, ..Default::default() }.segments().unwrap_err().to_string();
            assert!(e.contains("address map"), "{e}");
            e
        };
        refused(vec![0, 10]);
        refused(vec![0, 0, 0]);
        refused(vec![-1, 10, 0]);
        refused(vec![0xffff_fff0, 0x20, 0]);
        refused(vec![0x100, 0x20, -0x200]);
        refused(vec![0x100, 0x20, i64::MAX, 0x100, 0x20, i64::MAX]);
        // Two segments claiming the same old addresses.
        let e = refused(vec![0x100, 0x20, 0, 0x10, 0x20, -0x30]);
        assert!(e.contains("overlap in old addresses"), "{e}");
    }

    /// Segments not overlapping on either side, from arbitrary numbers.
    fn segments() -> impl Strategy<Value = Vec<Segment>> {
        prop::collection::vec((0u32..0x1000, 1u32..0x1000, 0u32..0x4000), 0..40).prop_map(|raw| {
            let mut out: Vec<Segment> = Vec::new();
            let mut new = 0u32;
            for (gap, len, old) in raw {
                new = new.saturating_add(gap);
                let s = seg(new, old * 16, len);
                let clear = |o: &Segment| u64::from(s.old) + u64::from(s.len) <= u64::from(o.old) || u64::from(o.old) + u64::from(o.len) <= u64::from(s.old);
                if u64::from(new) + u64::from(len) <= 0x100_0000 && out.iter().all(clear) {
                    out.push(s);
                    new += len;
                }
            }
            out
        })
    }

    proptest! {
        #[test]
        fn every_projection_is_a_bijection(segments in segments(), probes in prop::collection::vec(any::<u32>(), 64), near in prop::collection::vec(0u32..0x200_0000, 256)) {
            let p = AddressMap::new(0, &segments).projection().unwrap();
            for &x in probes.iter().chain(&near) {
                prop_assert_eq!(p.to_new(p.to_old(x)), x);
                prop_assert_eq!(p.to_old(p.to_new(x)), x);
            }
            for s in &segments {
                prop_assert_eq!(p.to_old(s.new), s.old);
                prop_assert_eq!(p.to_old(s.new + s.len - 1), s.old + s.len - 1);
            }
        }

        #[test]
        fn buckets_find_what_a_search_of_every_key_finds(mut keys in prop::collection::vec(0u64..1 << 33, 0..300), probes in prop::collection::vec(0u64..1 << 33, 64)) {
            keys.sort_unstable();
            let buckets = Buckets::new(&keys);
            let near = keys.iter().flat_map(|&k| [k.saturating_sub(1), k, k + 1]);
            for x in probes.into_iter().chain(near).chain([0, u64::MAX >> 1]) {
                prop_assert_eq!(buckets.partition_point(&keys, |&k| k <= x, x), keys.partition_point(|&k| k <= x));
            }
        }

        #[test]
        fn free_addresses_keep_their_order(segments in segments(), mut xs in prop::collection::vec(0u32..0x200_0000, 2..64)) {
            let p = Projection::new(&segments);
            let free = |x: u32| !segments.iter().any(|s| x >= s.new && u64::from(x) < u64::from(s.new) + u64::from(s.len));
            xs.retain(|&x| free(x));
            xs.sort_unstable();
            xs.dedup();
            for w in xs.windows(2) {
                prop_assert!(p.to_old(w[0]) < p.to_old(w[1]));
            }
        }
    }
}
