//! x86-64 call frame information (`.eh_frame`, `.eh_frame_hdr`) seen in the old file's
//! addresses, beside the code view ([`crate::layer::x86_64_code`]).
//!
//! Every function of a Rust or C++ executable has a frame description entry (FDE) in
//! `.eh_frame`, and a row in the sorted table of `.eh_frame_hdr`. Each FDE points at its
//! function and at its common entry (CIE), and the table at both the function and the FDE, all
//! as distances from where the pointer itself is. When code moves, every one of those
//! distances changes although the entries did not. Through the span's [`Projection`] (which
//! places the new file's functions, entries and tables at their old addresses) each distance
//! is seen as the distance between the old addresses, so an entry that only moved is the
//! same bytes as in the old file.
//!
//! Only 32-bit PC-relative pointers (`DW_EH_PE_pcrel | DW_EH_PE_sdata4`, 0x1b) are converted,
//! and the table only when it is `datarel | sdata4` (0x3b) with a `udata4` count: what
//! GCC, Clang and Rust's linkers write. Lengths, entry identifiers, CIEs and everything else
//! pass as they are, so both directions find the same fields.
//!
//! [`Projection`]: crate::format::address_map::Projection

use std::collections::HashMap;

use crate::format::address_map::Projection;
use crate::layer::x86_64_code::{relative, Direction};

/// The only pointer encoding converted: 32-bit signed, relative to the pointer's address.
pub const PCREL_SDATA4: u8 = 0x1b;

/// The table encoding of `.eh_frame_hdr` converted: 32-bit signed, relative to the table's
/// section.
pub const DATAREL_SDATA4: u8 = 0x3b;

/// The count encoding of `.eh_frame_hdr` required: 32-bit unsigned.
pub const UDATA4: u8 = 0x03;

/// The longest record converted (with its length field); a longer one, and everything after
/// it in its section, passes as it is.
pub const MAX_RECORD_BYTES: usize = 64 << 10;

/// The most CIEs remembered per section; FDEs of later ones pass as they are (but for their
/// CIE pointer).
pub const MAX_CIES: usize = 1 << 12;

/// Bytes of `.eh_frame_hdr` before its table.
pub const HDR_BYTES: usize = 12;

/// What a CIE says about the FDEs that point at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cie {
    /// The FDEs' function pointer (and length) are PC-relative 32-bit.
    pub pcrel4: bool,
    /// The FDEs carry augmentation data (the CIE's augmentation starts with `z`).
    pub z: bool,
    /// Their LSDA pointer, first in that data, is PC-relative 32-bit.
    pub lsda_pcrel4: bool,
}

/// An unsigned LEB128 number at `at` of at most 5 bytes, and where it ends.
fn uleb(b: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for i in 0..5 {
        let byte = *b.get(at + i)?;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((v, at + i + 1));
        }
    }
    None
}

/// The size of a pointer in encoding `e`, if fixed and unaligned.
fn pointer_size(e: u8) -> Option<usize> {
    if e & 0x70 == 0x50 {
        return None;
    }
    match e & 0x0f {
        0x00 | 0x04 | 0x0c => Some(8),
        0x02 | 0x0a => Some(2),
        0x03 | 0x0b => Some(4),
        _ => None,
    }
}

/// The CIE that the record `rec` (length and identifier included) is, if it is known: version
/// 1 or 3, and an augmentation of `z` followed by known letters, or none.
pub fn parse_cie(rec: &[u8]) -> Option<Cie> {
    let version = *rec.get(8)?;
    if version != 1 && version != 3 {
        return None;
    }
    let aug_len = rec.get(9..)?.iter().take(16).position(|&b| b == 0)?;
    let aug = &rec[9..9 + aug_len];
    let none = Cie { pcrel4: false, z: false, lsda_pcrel4: false };
    match aug.first() {
        None => return Some(none),
        Some(b'z') => {}
        Some(_) => return None,
    }
    let (_, at) = uleb(rec, 10 + aug_len)?; // code alignment
    let (_, at) = uleb(rec, at)?; // data alignment (signed: the same bytes)
    let at = if version == 1 { at + 1 } else { uleb(rec, at)?.1 }; // return address register
    let (data_len, mut at) = uleb(rec, at)?;
    let data_end = at.checked_add(usize::try_from(data_len).ok()?)?;
    let (mut fde, mut lsda) = (0u8, None);
    for &c in &aug[1..] {
        match c {
            b'L' => lsda = Some(*rec.get(at)?),
            b'R' => fde = *rec.get(at)?,
            b'P' => at += pointer_size(*rec.get(at)?)?,
            b'S' | b'B' | b'G' => continue,
            _ => return None,
        }
        at += 1;
    }
    (at <= data_end && data_end <= rec.len()).then_some(Cie { pcrel4: fde == PCREL_SDATA4, z: true, lsda_pcrel4: lsda == Some(PCREL_SDATA4) })
}

/// Where an FDE (record `rec`, of CIE `cie`) holds its function pointer and its LSDA pointer,
/// when they are converted.
pub fn fde_fields(rec: &[u8], cie: &Cie) -> (Option<usize>, Option<usize>) {
    if !cie.pcrel4 || rec.len() < 16 {
        return (None, None);
    }
    let lsda = if cie.z && cie.lsda_pcrel4 { uleb(rec, 16).and_then(|(len, at)| (len >= 4 && at + 4 <= rec.len()).then_some(at)) } else { None };
    (Some(8), lsda)
}

fn read(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// The CIEs of a section seen so far, by address.
#[derive(Debug, Default)]
pub struct Cies(HashMap<u32, Cie>);

impl Cies {
    /// Remembers the CIE record `rec` at `address` if it is known, up to [`MAX_CIES`].
    fn remember(&mut self, address: u32, rec: &[u8]) {
        if let Some(cie) = parse_cie(rec) {
            if self.0.len() < MAX_CIES {
                self.0.insert(address, cie);
            }
        }
    }
}

/// Converts one record of `.eh_frame` at address `address` (length field included, whole):
/// an FDE's CIE pointer, and its function and LSDA pointers when its CIE says they are
/// PC-relative 32-bit; a CIE is remembered and passes as it is.
pub fn convert_record(rec: &mut [u8], address: u32, cies: &mut Cies, p: &Projection, d: Direction) {
    if rec.len() < 8 {
        return;
    }
    let id = read(rec, 4);
    if id == 0 {
        cies.remember(address, rec);
        return;
    }
    // The CIE pointer counts back from its own address: seen as `old(f) - old(f - v)`.
    let f = address.wrapping_add(4);
    let (seen, real) = match d {
        Direction::ToOld => (p.to_old(f).wrapping_sub(p.to_old(f.wrapping_sub(id))), id),
        Direction::ToNew => {
            let real = f.wrapping_sub(p.to_new(p.to_old(f).wrapping_sub(id)));
            (real, real)
        }
    };
    put(rec, 4, seen);
    let Some(cie) = cies.0.get(&f.wrapping_sub(real)).copied() else { return };
    let (pc, lsda) = fde_fields(rec, &cie);
    for at in pc.into_iter().chain(lsda) {
        let v = read(rec, at);
        put(rec, at, relative(p, d, address.wrapping_add(at as u32), v));
    }
}

/// The function and LSDA addresses of an FDE record at `address` whose CIE is `cie` (real
/// bytes): what the differ matches old and new entries by.
pub fn fde_targets(rec: &[u8], address: u32, cie: &Cie) -> (Option<u32>, Option<u32>) {
    let (pc, lsda) = fde_fields(rec, cie);
    let target = |at: usize| address.wrapping_add(at as u32).wrapping_add(read(rec, at));
    (pc.map(target), lsda.map(target))
}

/// One record of a section of `.eh_frame` (real bytes), as the differ sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A CIE.
    Cie {
        /// Where it is.
        address: u32,
        /// Its bytes, length field included.
        bytes: Vec<u8>,
    },
    /// An FDE.
    Fde {
        /// Where it is.
        address: u32,
        /// Its length, length field included.
        len: u32,
        /// Its function's address, when converted.
        function: Option<u32>,
        /// Its function's length in bytes, when its address is converted.
        function_len: Option<u32>,
        /// Its LSDA's address, when converted.
        lsda: Option<u32>,
    },
}

/// The records of `.eh_frame` bytes `section` at `address`, as far as the converter walks.
pub fn records(section: &[u8], address: u32) -> Vec<Record> {
    let mut out = Vec::new();
    let mut cies = Cies::default();
    let mut at = 0usize;
    while let Some(total) = record_bytes(&section[at..]) {
        if at + total > section.len() {
            break;
        }
        let rec = &section[at..at + total];
        let a = address.wrapping_add(at as u32);
        if rec.len() >= 8 {
            let id = read(rec, 4);
            if id == 0 {
                cies.remember(a, rec);
                out.push(Record::Cie { address: a, bytes: rec.to_vec() });
            } else {
                let (function, lsda) = cies.0.get(&a.wrapping_add(4).wrapping_sub(id)).map_or((None, None), |cie| fde_targets(rec, a, cie));
                // The length follows the address, in the same 4-byte form.
                let function_len = function.map(|_| read(rec, 12));
                out.push(Record::Fde { address: a, len: total as u32, function, function_len, lsda });
            }
        }
        at += total;
    }
    out
}

/// How long the record starting `head` is (length field included), if the converter takes
/// it: its length is known (4 bytes here), not the 64-bit form, and at most
/// [`MAX_RECORD_BYTES`].
pub fn record_bytes(head: &[u8]) -> Option<usize> {
    let len = read(head.get(..4)?, 0);
    let total = (len as usize).checked_add(4)?;
    (len != u32::MAX && total <= MAX_RECORD_BYTES).then_some(total)
}

/// The number of table fields (two per row) that `.eh_frame_hdr`'s first [`HDR_BYTES`]
/// promise when it has the converted form, and converts its `.eh_frame` pointer; `None` (and
/// nothing converted) for any other header.
pub fn convert_hdr_header(head: &mut [u8], address: u32, p: &Projection, d: Direction) -> Option<u64> {
    if head[..4] != [1, PCREL_SDATA4, UDATA4, DATAREL_SDATA4] {
        return None;
    }
    let v = read(head, 4);
    put(head, 4, relative(p, d, address.wrapping_add(4), v));
    Some(u64::from(read(head, 8)) * 2)
}

/// Converts table fields of `.eh_frame_hdr` at `address` (whole fields): each a distance from
/// the section's start.
pub fn convert_hdr_fields(fields: &mut [u8], address: u32, p: &Projection, d: Direction) {
    for f in fields.chunks_exact_mut(4) {
        let v = read(f, 0);
        put(f, 0, relative(p, d, address, v));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::format::address_map::{AddressMap, Segment};
    use crate::layer::x86_64_code::tests::{segments, through};
    use proptest::prelude::*;

    /// A CIE of augmentation `aug` with augmentation data `data`.
    pub fn cie(aug: &[u8], data: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 0, 0, 0, 1];
        body.extend(aug);
        body.extend([0, 1, 0x78, 16, data.len() as u8]);
        body.extend(data);
        body.extend([0x0c, 7, 8, 0x90, 1, 0, 0]);
        let mut rec = (body.len() as u32).to_le_bytes().to_vec();
        rec.extend(body);
        rec
    }

    /// A CIE of augmentation `zPLR` (personality, LSDA and FDE pointers PC-relative).
    pub fn cie_zplr() -> Vec<u8> {
        cie(b"zPLR", &[0x9b, 0, 0, 0, 0, PCREL_SDATA4, PCREL_SDATA4])
    }

    /// An FDE at `at` of the CIE at `cie`, for a function at `function` with an LSDA at `lsda`.
    pub fn fde(at: u32, cie: u32, function: u32, lsda: u32) -> Vec<u8> {
        let mut rec = 20u32.to_le_bytes().to_vec();
        rec.extend((at + 4 - cie).to_le_bytes());
        rec.extend(function.wrapping_sub(at + 8).to_le_bytes());
        rec.extend(0x40u32.to_le_bytes());
        rec.push(4);
        rec.extend(lsda.wrapping_sub(at + 17).to_le_bytes());
        rec.extend([0x41, 0x0e, 0x10]);
        rec
    }

    #[test]
    fn cies_say_which_fde_pointers_are_pc_relative() {
        assert_eq!(parse_cie(&cie_zplr()), Some(Cie { pcrel4: true, z: true, lsda_pcrel4: true }));
        assert_eq!(parse_cie(&cie(b"zR", &[PCREL_SDATA4])), Some(Cie { pcrel4: true, z: true, lsda_pcrel4: false }));
        assert_eq!(parse_cie(&cie(b"zR", &[0x03])), Some(Cie { pcrel4: false, z: true, lsda_pcrel4: false }));
        assert_eq!(parse_cie(&cie(b"", &[])), Some(Cie { pcrel4: false, z: false, lsda_pcrel4: false }));
        // An augmentation letter it does not know: refused, not guessed.
        assert_eq!(parse_cie(&cie(b"zXR", &[0, PCREL_SDATA4])), None);
        assert_eq!(parse_cie(&cie(b"zR", &[])), None, "data shorter than its letters");
        let mut v2 = cie_zplr();
        v2[8] = 2;
        assert_eq!(parse_cie(&v2), None);
        assert_eq!(parse_cie(&cie_zplr()[..20]), None, "cut inside its augmentation data");
    }

    #[test]
    fn an_fde_that_moved_with_its_function_and_lsda_is_the_old_bytes() {
        // Old: CIE at 0x1000, FDE at 0x1020 for a function at 0x40_0000 with an LSDA at 0x9000.
        // New: everything moved by different amounts.
        let old = fde(0x1020, 0x1000, 0x40_0000, 0x9000);
        let new = fde(0x1120, 0x1100, 0x40_0400, 0x9800);
        let p = Projection::new(&[
            Segment { new: 0x1100, old: 0x1000, len: 0x40 },
            Segment { new: 0x9800, old: 0x9000, len: 0x10 },
            Segment { new: 0x40_0400, old: 0x40_0000, len: 0x40 },
        ]);
        let cie = cie_zplr();
        let mut cies = Cies::default();
        let mut c = cie.clone();
        convert_record(&mut c, 0x1100, &mut cies, &p, Direction::ToOld);
        assert_eq!(c, cie);
        let mut seen = new.clone();
        convert_record(&mut seen, 0x1120, &mut cies, &p, Direction::ToOld);
        assert_eq!(seen, old);
        let mut back = seen;
        convert_record(&mut back, 0x1120, &mut Cies(cies.0.clone()), &p, Direction::ToNew);
        assert_eq!(back, new);
        assert_eq!(fde_targets(&new, 0x1120, &parse_cie(&cie).unwrap()), (Some(0x40_0400), Some(0x9800)));
    }

    #[test]
    fn fdes_of_unknown_cies_keep_all_but_their_cie_pointer() {
        let p = Projection::new(&[Segment { new: 0x1000, old: 0x2000, len: 0x100 }]);
        let new = fde(0x1020, 0x1000, 0x40_0000, 0x9000);
        let mut seen = new.clone();
        convert_record(&mut seen, 0x1020, &mut Cies::default(), &p, Direction::ToOld);
        assert_eq!(seen[8..], new[8..]);
        let mut back = seen;
        convert_record(&mut back, 0x1020, &mut Cies::default(), &p, Direction::ToNew);
        assert_eq!(back, new);
    }

    #[test]
    fn the_hdr_table_is_converted_only_in_its_usual_form() {
        let p = Projection::new(&[Segment { new: 0x5000, old: 0x4000, len: 0x100 }, Segment { new: 0x40_0400, old: 0x40_0000, len: 0x40 }]);
        let mut head = [1, PCREL_SDATA4, UDATA4, DATAREL_SDATA4, 0, 0, 0, 0, 3, 0, 0, 0];
        assert_eq!(convert_hdr_header(&mut head.clone(), 0x5000, &p, Direction::ToOld), Some(6));
        head[3] = 0x1b;
        let before = head;
        assert_eq!(convert_hdr_header(&mut head, 0x5000, &p, Direction::ToOld), None);
        assert_eq!(head, before);
        let mut row = (0x40_0400u32 - 0x5000).to_le_bytes();
        convert_hdr_fields(&mut row, 0x5000, &p, Direction::ToOld);
        assert_eq!(u32::from_le_bytes(row), 0x40_0000 - 0x4000);
    }

    /// A `.eh_frame` of CIEs, FDEs pointing at them (or anywhere) with any pointers, and
    /// records of any bytes; with any tail.
    fn eh_frame() -> impl Strategy<Value = Vec<u8>> {
        let record = prop_oneof![
            Just(0u8).prop_map(|_| cie_zplr()),
            Just(0u8).prop_map(|_| cie(b"zR", &[PCREL_SDATA4])),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(f, l, id, random_id)| {
                let mut r = fde(0x1000, 0x1000, f, l);
                if random_id {
                    r[4..8].copy_from_slice(&id.to_le_bytes());
                }
                r
            }),
            prop::collection::vec(any::<u8>(), 0..40),
        ];
        prop::collection::vec(record, 0..40).prop_map(|records| {
            // FDEs point at the CIE written last, if any, from where they are.
            let mut out: Vec<u8> = Vec::new();
            let mut last_cie = None;
            for mut r in records {
                if r.len() >= 8 && r[4..8] == [0; 4] && r.len() > 12 {
                    last_cie = Some(out.len() as u32);
                } else if r.len() == 24 && u32::from_le_bytes(r[0..4].try_into().unwrap()) == 20 {
                    if let Some(c) = last_cie {
                        let at = out.len() as u32 + 4;
                        r[4..8].copy_from_slice(&(at - c).to_le_bytes());
                    }
                }
                out.extend(r);
            }
            out
        })
    }

    proptest! {
        #[test]
        fn call_frames_convert_the_same_in_any_pieces_and_back(
            frames in eh_frame(),
            table in prop::collection::vec(any::<u8>(), 0..200),
            count in 0u32..60,
            usual in any::<bool>(),
            segments in segments(0x1000, 0x800),
            step in 1usize..3000,
        ) {
            // The span: .eh_frame_hdr, then .eh_frame.
            let mut span = vec![1, PCREL_SDATA4, UDATA4, if usual { DATAREL_SDATA4 } else { 0x1b }, 9, 9, 9, 9];
            span.extend(count.to_le_bytes());
            span.extend(&table);
            let hdr_len = span.len() as u64;
            span.extend(&frames);
            let map = AddressMap {
                code_len: Some(0),
                eh_frame_hdr: Some([0, hdr_len, 0x1000 - hdr_len]),
                eh_frame: Some([hdr_len, frames.len() as u64, 0x1000]),
                ..AddressMap::new(0, &segments)
            };
            let whole = through(&map, &span, Direction::ToOld, span.len().max(1));
            prop_assert_eq!(&through(&map, &span, Direction::ToOld, step), &whole);
            prop_assert_eq!(through(&map, &whole, Direction::ToNew, step), span);
        }
    }
}
