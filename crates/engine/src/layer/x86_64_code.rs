//! x86-64 code seen with its references coded in the old file's addresses.
//!
//! A rebuilt executable changes almost everywhere, although most of its functions are the
//! same: code and data moved, and every call, jump and RIP-relative address whose target
//! moved by another amount than the instruction encodes another distance. The differ derives
//! an [`AddressMap`] from the two files (which new addresses hold what old addresses held)
//! and the delta carries it. Each 32-bit reference of the new code is then seen as the
//! distance between the old addresses of its target and of its own instruction's end: a
//! reference whose instruction and target both moved, by any amounts the map knows, is the
//! same bytes as in the old file, and the differ pays for the references that really changed.
//! The old file is read as it is. This is Zucchini's idea (references expressed through the
//! matched old targets), coded as a bijection of the bytes so that the patch itself stays a
//! byte patch.
//!
//! The transform walks the span's instructions from its first byte, in 64-bit mode, with the
//! `iced-x86` decoder:
//! - a byte that does not start a valid instruction (whole inside the span) is skipped alone;
//! - a near branch with a 32-bit displacement (`CALL`, `JMP`, `Jcc` rel32, `XBEGIN`) has its
//!   displacement field converted; so has the 32-bit displacement of a RIP-relative memory
//!   operand; all other bytes are unchanged;
//! - except that a field starting less than 15 bytes after a skipped byte is left as it is:
//!   the failed decode may have read it (a VEX prefix followed by a call reads the call's
//!   field as its opcode), and it must read the same bytes in both directions.
//!
//! For a field holding `v` (little-endian, modulo 2^32) in an instruction ending at address
//! `e = code + p` (`p` the span position after the instruction, modulo 2^32), with `old` and
//! `new` the two directions of the map's [`Projection`]:
//! - seen (differ): `old(e + v) - old(e)`;
//! - back (applier): `new(old(e) + seen) - e`.
//!
//! Both directions leave every opcode, prefix and ModRM byte as it is, so they decode the
//! same instructions, and they are exact inverses for any bytes.
//!
//! [`AddressMap`]: crate::format::address_map::AddressMap

use std::io::{self, Write};

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};

use crate::error::Result;
use crate::format::address_map::{AddressMap, Holds, Projection, Region};
use crate::layer::call_frames::{self, Cies};

/// Bytes converted at a time by [`Converter`].
const BUFFER_BYTES: usize = 64 << 10;

/// The longest x86 instruction.
const MAX_INSTRUCTION_BYTES: usize = 15;

/// Which way references are converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// New distances to distances between old addresses: what the differ sees.
    ToOld,
    /// Back to the new file's bytes: what the applier writes.
    ToNew,
}

/// One instruction found by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its first byte, in the buffer scanned.
    pub start: usize,
    /// Its length (1 for a byte that starts no valid instruction).
    pub len: usize,
    /// Where its 32-bit reference field starts in the buffer, if it has one that is
    /// converted.
    pub field: Option<usize>,
}

/// Walks the instructions of `buf`, whose first byte starts one and has address `ip`,
/// calling `visit` for each. Stops before an instruction with fewer than 15 bytes left
/// unless `last` (the buffer ends the span), and returns where the next one starts.
pub fn scan(buf: &[u8], ip: u64, last: bool, mut visit: impl FnMut(Found)) -> usize {
    let mut decoder = Decoder::with_ip(64, buf, ip, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut pos = 0;
    // Fields before this may have been read by a failed decode.
    let mut read_until = 0;
    while pos < buf.len() && (last || buf.len() - pos >= MAX_INSTRUCTION_BYTES) {
        decoder.decode_out(&mut instruction);
        let len = instruction.len();
        if instruction.is_invalid() || len == 0 || pos + len > buf.len() {
            visit(Found { start: pos, len: 1, field: None });
            read_until = pos + MAX_INSTRUCTION_BYTES;
            pos += 1;
            // Within the buffer, so always accepted.
            if decoder.set_position(pos).is_err() {
                break;
            }
            decoder.set_ip(ip.wrapping_add(pos as u64));
            continue;
        }
        // Only a near branch or a RIP-relative operand has a field to convert: most
        // instructions have neither, and locating fields took 40% of the time spent decoding
        // and locating them (debian-update's apply).
        let branch = instruction.op0_kind() == OpKind::NearBranch64;
        let rip_relative = instruction.is_ip_rel_memory_operand();
        let field = match (branch || rip_relative).then(|| decoder.get_constant_offsets(&instruction)) {
            Some(o) if branch && o.has_immediate() && o.immediate_size() == 4 => Some(pos + o.immediate_offset()),
            Some(o) if rip_relative && o.has_displacement() && o.displacement_size() == 4 => Some(pos + o.displacement_offset()),
            _ => None,
        };
        visit(Found { start: pos, len, field: field.filter(|&f| f >= read_until) });
        pos += len;
    }
    pos
}

/// Converts the references of the instructions in `buf`, whose first byte starts one at
/// address `ip`; returns how many bytes are done (all when `last`, see [`scan`]).
pub fn convert(buf: &mut [u8], ip: u64, projection: &Projection, direction: Direction, last: bool) -> usize {
    let mut fields = Vec::new();
    let done = scan(buf, ip, last, |f| {
        if let Some(at) = f.field {
            fields.push((at, f.start + f.len));
        }
    });
    for (at, end) in fields {
        let e = ip.wrapping_add(end as u64) as u32;
        let v = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        buf[at..at + 4].copy_from_slice(&relative(projection, direction, e, v).to_le_bytes());
    }
    done
}

/// A distance `v` from address `base` converted: seen as `old(base + v) - old(base)`, written
/// back as `new(old(base) + s) - base` (modulo 2^32). References in code count from their
/// instruction's end; call frames from the pointer itself or their section's start.
pub fn relative(projection: &Projection, direction: Direction, base: u32, v: u32) -> u32 {
    match direction {
        Direction::ToOld => projection.to_old(base.wrapping_add(v)).wrapping_sub(projection.to_old(base)),
        Direction::ToNew => projection.to_new(projection.to_old(base).wrapping_add(v)).wrapping_sub(base),
    }
}

/// Whether `head` (a file's first bytes, at least 20) starts a little-endian 64-bit ELF
/// file for x86-64.
pub fn looks_like_x86_64_elf(head: &[u8]) -> bool {
    super::elf64_le_machine(head) == Some(object::elf::EM_X86_64.0)
}

/// Converts the 64-bit pointers of `words` (whole words): a word whose high 32 bits are
/// zero is an address, mapped as the direction says; any other word is left as it is.
pub fn convert_pointers(words: &mut [u8], projection: &Projection, direction: Direction) {
    for w in words.chunks_exact_mut(8) {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        if v >> 32 != 0 {
            continue;
        }
        let out = match direction {
            Direction::ToOld => projection.to_old(v as u32),
            Direction::ToNew => projection.to_new(v as u32),
        };
        w.copy_from_slice(&u64::from(out).to_le_bytes());
    }
}

/// Converts a span pushed in pieces of any size, writing what is done: its code's references
/// and its pointers, as its [`AddressMap`] places them; other bytes pass as they are.
///
/// [`AddressMap`]: crate::format::address_map::AddressMap
#[derive(Debug)]
pub struct Converter {
    projection: Projection,
    direction: Direction,
    regions: Vec<Region>,
    /// The region holding or following `at`.
    next: usize,
    /// Span position of the next byte pushed.
    at: u64,
    /// Code waiting for the rest of an instruction, or a partial pointer.
    buf: Vec<u8>,
    /// Address of `buf[0]`: in code, an instruction's start; in call frames, a record's.
    ip: u64,
    /// The CIEs of `.eh_frame` seen so far.
    cies: Cies,
    /// Where the converter is in a region of call frames.
    frames: Frames,
}

/// Where the converter is in a region of call frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frames {
    /// At a record of `.eh_frame`, or before `.eh_frame_hdr`'s header.
    Start,
    /// Converting this many more fields of `.eh_frame_hdr`'s table.
    Table(u64),
    /// The rest of the region passes as it is.
    Pass,
}

impl Converter {
    /// Converts a span of `len` bytes laid out and mapped by `map` (checked).
    pub fn new(map: &AddressMap, len: u64, direction: Direction) -> Result<Self> {
        Ok(Self::with_regions(map.projection()?, map.regions(len)?, direction))
    }

    /// Converts a span that is all code, starting at address `ip`.
    pub fn code(projection: Projection, ip: u64, direction: Direction) -> Self {
        Self::with_regions(projection, vec![Region { start: 0, end: u64::MAX, holds: Holds::Code { ip } }], direction)
    }

    fn with_regions(projection: Projection, regions: Vec<Region>, direction: Direction) -> Self {
        Converter { projection, direction, regions, next: 0, at: 0, buf: Vec::with_capacity(BUFFER_BYTES), ip: 0, cies: Cies::default(), frames: Frames::Start }
    }

    /// Converts `data` and writes what is done to `output`; up to 14 bytes of code wait for
    /// the rest of their instruction, up to 7 of a pointer for the rest of it.
    pub fn write(&mut self, mut data: &[u8], output: &mut impl Write) -> io::Result<()> {
        while !data.is_empty() {
            while self.regions.get(self.next).is_some_and(|r| r.end <= self.at) {
                self.next += 1;
            }
            let Some(&region) = self.regions.get(self.next) else {
                self.at += data.len() as u64;
                return output.write_all(data);
            };
            if self.at < region.start {
                let n = (region.start - self.at).min(data.len() as u64) as usize;
                output.write_all(&data[..n])?;
                (self.at, data) = (self.at + n as u64, &data[n..]);
                continue;
            }
            if self.at == region.start {
                if let Holds::Code { ip: address } | Holds::EhFrame { address } | Holds::EhFrameHdr { address } = region.holds {
                    self.ip = address;
                }
                (self.cies, self.frames) = (Cies::default(), Frames::Start);
            }
            let n = (region.end - self.at).min(data.len() as u64).min((BUFFER_BYTES - self.buf.len()) as u64) as usize;
            self.buf.extend_from_slice(&data[..n]);
            (self.at, data) = (self.at + n as u64, &data[n..]);
            let ends = self.at == region.end;
            match region.holds {
                Holds::Code { .. } if ends || self.buf.len() == BUFFER_BYTES => {
                    let done = convert(&mut self.buf, self.ip, &self.projection, self.direction, ends);
                    output.write_all(&self.buf[..done])?;
                    self.ip = self.ip.wrapping_add(done as u64);
                    self.buf.drain(..done);
                }
                Holds::Code { .. } => {}
                Holds::Pointers => {
                    let whole = self.buf.len() / 8 * 8;
                    convert_pointers(&mut self.buf[..whole], &self.projection, self.direction);
                    output.write_all(&self.buf[..whole])?;
                    self.buf.drain(..whole);
                }
                Holds::EhFrame { .. } => self.eh_frame(ends, output)?,
                Holds::EhFrameHdr { address } => self.eh_frame_hdr(address as u32, ends, output)?,
            }
        }
        Ok(())
    }

    /// Writes the first `n` bytes of the buffer and drops them.
    fn emit(&mut self, n: usize, output: &mut impl Write) -> io::Result<()> {
        output.write_all(&self.buf[..n])?;
        self.buf.drain(..n);
        self.ip = self.ip.wrapping_add(n as u64);
        Ok(())
    }

    /// Converts and writes the whole records of `.eh_frame` buffered (all that is left when
    /// the region `ends`).
    fn eh_frame(&mut self, ends: bool, output: &mut impl Write) -> io::Result<()> {
        loop {
            if self.frames == Frames::Pass {
                return self.emit(self.buf.len(), output);
            }
            if self.buf.len() < 4 {
                return if ends { self.emit(self.buf.len(), output) } else { Ok(()) };
            }
            let Some(total) = call_frames::record_bytes(&self.buf) else {
                self.frames = Frames::Pass;
                continue;
            };
            if self.buf.len() < total {
                if ends {
                    self.frames = Frames::Pass;
                    continue;
                }
                return Ok(());
            }
            call_frames::convert_record(&mut self.buf[..total], self.ip as u32, &mut self.cies, &self.projection, self.direction);
            self.emit(total, output)?;
        }
    }

    /// Converts and writes `.eh_frame_hdr` (at `address`) buffered: its header, then whole
    /// table fields, which count from the section's start.
    fn eh_frame_hdr(&mut self, address: u32, ends: bool, output: &mut impl Write) -> io::Result<()> {
        loop {
            match self.frames {
                Frames::Start if self.buf.len() >= call_frames::HDR_BYTES => {
                    let fields = call_frames::convert_hdr_header(&mut self.buf[..call_frames::HDR_BYTES], address, &self.projection, self.direction);
                    self.frames = fields.map_or(Frames::Pass, Frames::Table);
                    self.emit(call_frames::HDR_BYTES, output)?;
                }
                Frames::Table(left) if left > 0 && self.buf.len() >= 4 => {
                    let n = left.min(self.buf.len() as u64 / 4);
                    call_frames::convert_hdr_fields(&mut self.buf[..n as usize * 4], address, &self.projection, self.direction);
                    self.frames = Frames::Table(left - n);
                    self.emit(n as usize * 4, output)?;
                }
                Frames::Table(0) => self.frames = Frames::Pass,
                Frames::Pass => return self.emit(self.buf.len(), output),
                _ => return if ends { self.emit(self.buf.len(), output) } else { Ok(()) },
            }
        }
    }

    /// Converts and writes the rest: the span ends here.
    pub fn finish(mut self, output: &mut impl Write) -> io::Result<()> {
        if let Some(Region { holds: Holds::Code { .. }, .. }) = self.regions.get(self.next) {
            convert(&mut self.buf, self.ip, &self.projection, self.direction, true);
        }
        output.write_all(&self.buf)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::format::address_map::Segment;
    use proptest::prelude::*;

    /// `call rel32` from address `at` to `target`.
    fn call(at: u32, target: u32) -> Vec<u8> {
        let mut b = vec![0xe8];
        b.extend(target.wrapping_sub(at + 5).to_le_bytes());
        b
    }

    /// `lea rax, [rip + disp32]` at `at` addressing `target`.
    fn lea(at: u32, target: u32) -> Vec<u8> {
        let mut b = vec![0x48, 0x8d, 0x05];
        b.extend(target.wrapping_sub(at + 7).to_le_bytes());
        b
    }

    fn converted(mut code: Vec<u8>, ip: u64, p: &Projection, direction: Direction) -> Vec<u8> {
        assert_eq!(convert(&mut code, ip, p, direction, true), code.len());
        code
    }

    #[test]
    fn references_that_moved_with_their_targets_are_the_old_bytes() {
        // Old: a call at 0x1000 to 0x3000 and a lea at 0x1005 of 0x8000. New: the caller
        // moved by 0x40, the callee by 0x100, the data by 0x20.
        let old: Vec<u8> = [call(0x1000, 0x3000), lea(0x1005, 0x8000)].concat();
        let new: Vec<u8> = [call(0x1040, 0x3100), lea(0x1045, 0x8020)].concat();
        let p = Projection::new(&[
            Segment { new: 0x1040, old: 0x1000, len: 0x100 },
            Segment { new: 0x3100, old: 0x3000, len: 0x100 },
            Segment { new: 0x8020, old: 0x8000, len: 0x100 },
        ]);
        assert_ne!(old, new);
        let seen = converted(new.clone(), 0x1040, &p, Direction::ToOld);
        assert_eq!(seen, old);
        assert_eq!(converted(seen, 0x1040, &p, Direction::ToNew), new);
    }

    #[test]
    fn other_bytes_and_short_branches_are_left_alone() {
        let p = Projection::new(&[Segment { new: 0, old: 0x777, len: 0x10000 }]);
        // jmp rel8, mov eax imm32, an invalid byte in 64-bit mode, a call cut by the end.
        let code = vec![0xeb, 0x10, 0xb8, 1, 2, 3, 4, 0x06, 0xe8, 1, 2];
        assert_eq!(converted(code.clone(), 0x100, &p, Direction::ToOld), code);
        let mut found = Vec::new();
        scan(&code, 0x100, true, |f| found.push((f.start, f.len, f.field)));
        assert_eq!(found[..4], [(0, 2, None), (2, 5, None), (7, 1, None), (8, 1, None)]);
    }

    #[test]
    fn a_field_that_a_failed_decode_read_is_left_alone() {
        // C5 E8 A1 is no instruction; skipped, it leaves a call at byte 1 whose field would
        // otherwise change what the decode at byte 0 sees (found by the property below).
        let p = Projection::new(&[Segment { new: 0x40_0000, old: 0x30_0000, len: 0x1000 }]);
        let code = vec![0xc5, 0xe8, 0xa1, 0, 0, 1, 0xe8, 0, 0, 0, 0];
        let seen = converted(code.clone(), 0x40_0000, &p, Direction::ToOld);
        assert_eq!(seen[..6], code[..6]);
        assert_eq!(converted(seen, 0x40_0000, &p, Direction::ToNew), code);
    }

    #[test]
    fn x86_64_elf_files_are_told_from_others() {
        let mut head = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 62, 0];
        assert!(looks_like_x86_64_elf(&head));
        head[18] = 183;
        assert!(!looks_like_x86_64_elf(&head));
        head[18] = 62;
        head[5] = 2;
        assert!(!looks_like_x86_64_elf(&head));
    }

    /// Bytes dense with calls, jumps and RIP-relative operands among arbitrary ones.
    fn code() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            any::<[u8; 4]>().prop_map(|v| [&[0xe8u8][..], &v].concat()),
            any::<[u8; 4]>().prop_map(|v| [&[0x0fu8, 0x85][..], &v].concat()),
            any::<[u8; 4]>().prop_map(|v| [&[0x48u8, 0x8b, 0x0d][..], &v].concat()),
            prop::collection::vec(any::<u8>(), 1..8),
        ];
        prop::collection::vec(piece, 0..400).prop_map(|v| v.concat())
    }

    /// Segments not overlapping on either side, from address `start` on, moved by up to
    /// 0x3000 either way.
    pub(crate) fn segments(start: u32, max_len: u32) -> impl Strategy<Value = Vec<Segment>> {
        prop::collection::vec((0u32..max_len, 1u32..max_len, -0x3000i64..0x3000), 0..12).prop_map(move |raw| {
            let mut segments: Vec<Segment> = Vec::new();
            let mut new = start;
            for (gap, len, shift) in raw {
                new += gap;
                let old = (i64::from(new) + shift).max(0) as u32;
                let clear = |o: &Segment| old + len <= o.old || o.old + o.len <= old;
                if segments.iter().all(clear) {
                    segments.push(Segment { new, old, len });
                }
                new += len;
            }
            segments
        })
    }

    fn projection() -> impl Strategy<Value = Projection> {
        segments(0x40_0000, 0x2000).prop_map(|s| Projection::new(&s))
    }

    proptest! {
        #[test]
        fn both_directions_are_inverse_on_any_bytes(code in code(), p in projection(), ip in 0x40_0000u64..0x40_4000) {
            let seen = converted(code.clone(), ip, &p, Direction::ToOld);
            prop_assert_eq!(converted(seen, ip, &p, Direction::ToNew), code);
        }

        #[test]
        fn pieces_of_any_size_give_the_bytes_of_the_whole(code in code(), p in projection(), cuts in prop::collection::vec(1usize..3000, 1..20)) {
            let whole = converted(code.clone(), 0x40_1000, &p, Direction::ToOld);
            let mut c = Converter::code(p.clone(), 0x40_1000, Direction::ToOld);
            let mut out = Vec::new();
            let mut rest = &code[..];
            for n in cuts.into_iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = n.min(rest.len());
                c.write(&rest[..n], &mut out).unwrap();
                rest = &rest[n..];
            }
            c.finish(&mut out).unwrap();
            prop_assert_eq!(out, whole);
        }
    }

    /// Pushes `span` through a converter of `map` in pieces of `step` bytes.
    pub(crate) fn through(map: &AddressMap, span: &[u8], direction: Direction, step: usize) -> Vec<u8> {
        let mut c = Converter::new(map, span.len() as u64, direction).unwrap();
        let mut out = Vec::new();
        for piece in span.chunks(step) {
            c.write(piece, &mut out).unwrap();
        }
        c.finish(&mut out).unwrap();
        out
    }

    #[test]
    fn pointers_move_with_their_targets_and_other_words_and_bytes_stay() {
        // A span: 16 bytes of other data, two pointer words, then code calling 0x3100.
        let map = AddressMap {
            code: 0x1040,
            code_at: 32,
            code_len: Some(5),
            pointers: vec![16, 16],
            ..AddressMap::new(0, &[Segment { new: 0x1040, old: 0x1000, len: 0x100 }, Segment { new: 0x3100, old: 0x3000, len: 0x100 }])
        };
        let mut span = vec![0x11u8; 16];
        span.extend(0x3140u64.to_le_bytes());
        span.extend(0x1_0000_3140u64.to_le_bytes());
        span.extend(call(0x1040, 0x3100));
        span.extend([0xe8, 0, 0, 0, 0]);
        let seen = through(&map, &span, Direction::ToOld, 3);
        assert_eq!(seen[..16], span[..16]);
        assert_eq!(seen[16..24], 0x3040u64.to_le_bytes(), "a pointer into a segment moves with it");
        assert_eq!(seen[24..32], span[24..32], "a word above 4 GiB is no address");
        assert_eq!(seen[32..37], call(0x1000, 0x3000)[..], "the call is the old one");
        assert_eq!(seen[37..], span[37..], "bytes after the code are not code");
        for step in [1, 7, 64] {
            assert_eq!(through(&map, &seen, Direction::ToNew, step), span);
        }
    }

    proptest! {
        #[test]
        fn spans_of_code_and_pointers_convert_the_same_in_any_pieces_and_back(
            code in code(),
            p in projection(),
            head in prop::collection::vec(any::<u8>(), 0..300),
            words in prop::collection::vec(0u64..0x50_0000, 0..64),
            step in 1usize..5000,
        ) {
            let mut span = head.clone();
            let pointers_at = span.len() as u64;
            span.extend(words.iter().flat_map(|w| w.to_le_bytes()));
            let code_at = span.len() as u64;
            span.extend(&code);
            span.extend(&head);
            let mut map = AddressMap { code: 0x40_1000, code_at, code_len: Some(code.len() as u64), ..Default::default() };
            if !words.is_empty() {
                map.pointers = vec![pointers_at, 8 * words.len() as u64];
            }
            let converter = |direction, bytes: &[u8], step| {
                let mut c = Converter::with_regions(p.clone(), map.regions(bytes.len() as u64).unwrap(), direction);
                let mut out = Vec::new();
                for piece in bytes.chunks(step) {
                    c.write(piece, &mut out).unwrap();
                }
                c.finish(&mut out).unwrap();
                out
            };
            let whole = converter(Direction::ToOld, &span, span.len().max(1));
            prop_assert_eq!(&converter(Direction::ToOld, &span, step), &whole);
            prop_assert_eq!(converter(Direction::ToNew, &whole, step), span);
        }
    }

    #[test]
    fn a_converter_gives_the_whole_buffers_result_across_its_buffer() {
        // Larger than the buffer, so that instructions straddle its refills.
        let mut code = Vec::new();
        let mut at = 0x40_0000u32;
        while code.len() < 3 * BUFFER_BYTES + 7 {
            let piece = if code.len() % 3 == 0 { call(at, at ^ 0x5555) } else { lea(at, at.wrapping_add(0x123)) };
            at += piece.len() as u32;
            code.extend(piece);
            code.push(0x90);
            at += 1;
        }
        let p = Projection::new(&[Segment { new: 0x40_0000, old: 0x30_0000, len: 0x1_0000 }, Segment { new: 0x41_0000, old: 0x50_0000, len: 0x4_0000 }]);
        let whole = converted(code.clone(), 0x40_0000, &p, Direction::ToOld);
        assert_ne!(whole, code);
        let mut c = Converter::code(p.clone(), 0x40_0000, Direction::ToOld);
        let mut out = Vec::new();
        for piece in code.chunks(4093) {
            c.write(piece, &mut out).unwrap();
        }
        c.finish(&mut out).unwrap();
        assert_eq!(out, whole);
        assert_eq!(converted(whole, 0x40_0000, &p, Direction::ToNew), code);
    }
}
