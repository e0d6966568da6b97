//! Which gzip files and zip entries inside the layers are patched uncompressed (see
//! [`crate::layer::members`]).
//!
//! A target file is expanded when it is one gzip member that changed, whose source partner
//! is one gzip member too, and whose bytes a known encoder reproduces exactly (Debian's
//! `gzip -9n` changelogs and manual pages are GNU gzip's). Its partner is then expanded in
//! the source layer, so the patch codes the new text against the old text. Files without a
//! gzip partner are left compressed: expanding them would only move work to the device.
//!
//! A changed zip file (jar, wheel) whose partner is a zip too is looked into entry by entry
//! ([`crate::diff::zip_members`]): its changed deflated entries are expanded on the same
//! terms, while its headers and unchanged entries stay as they are.
//!
//! A changed AArch64 executable or shared library whose partner is one too has its code
//! seen with absolute call targets and page addresses ([`crate::layer::aarch64_code`]), in
//! both layers: code that only moved is then the same bytes.
//!
//! A changed x86-64 executable or shared library whose partner is one too has its code seen
//! with each reference coded in the partner's addresses ([`crate::layer::x86_64_code`]),
//! through the address map [`crate::diff::address_map`] derives; the partner is read as it is.
//! A file of up to 16 MiB gets the view only when a quick trial says it pays for its map.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rayon::prelude::*;

use crate::diff::address_map;
use crate::diff::material::Unpacked;
use crate::diff::pair::{Loc, Partner, SourceIndex};
use crate::diff::zip_members;
use crate::error::Result;
use crate::format::plan::{Member, RepackedMember, Wrapping, MAX_MEMBER_RAW_BYTES};
use crate::layer::aarch64_code::looks_like_aarch64_elf;
use crate::layer::exact::{fingerprint, Encoder};
use crate::layer::members::{inflate, looks_like_gzip, looks_like_zip, MIN_GZIP_BYTES, MIN_ZIP_BYTES};
use crate::layer::x86_64_code::looks_like_x86_64_elf;
use crate::layer::TarEntry;

/// Largest compressed gzip file considered.
pub const MAX_MEMBER_COMPRESSED_BYTES: u64 = 64 << 20;

/// Largest zip file looked into.
pub const MAX_ZIP_BYTES: u64 = 1 << 30;

/// The members chosen, by layer.
#[derive(Debug, Default)]
pub struct Expansion {
    /// Target layer index → its members, in tar order.
    pub target: HashMap<u32, Vec<RepackedMember>>,
    /// Source layer index → its members, in tar order.
    pub source: BTreeMap<u32, Vec<Member>>,
}

impl Expansion {
    /// Whether nothing is expanded.
    pub fn is_empty(&self) -> bool {
        self.target.is_empty()
    }
}

/// A target file that may be expanded, with its source partner.
struct Candidate {
    layer: u32,
    entry: usize,
    partner: Loc,
    kind: Kind,
}

/// What a candidate file is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gzip,
    Zip,
    Aarch64Elf,
    X8664Elf,
}

impl Kind {
    /// What the `len` bytes of a file's contents are, if either, from their first
    /// [`SNIFF_BYTES`] (`head`: all of them when fewer).
    fn of(head: &[u8], len: u64) -> Option<Kind> {
        if len <= MAX_MEMBER_COMPRESSED_BYTES && looks_like_gzip(head) {
            Some(Kind::Gzip)
        } else if len <= MAX_ZIP_BYTES && looks_like_zip(head) {
            Some(Kind::Zip)
        } else if len <= MAX_MEMBER_RAW_BYTES && looks_like_aarch64_elf(head) {
            Some(Kind::Aarch64Elf)
        } else if len <= MAX_MEMBER_RAW_BYTES && looks_like_x86_64_elf(head) {
            Some(Kind::X8664Elf)
        } else {
            None
        }
    }
}

/// What one candidate gives: target members and their source partners.
type Pieces = (Vec<RepackedMember>, Vec<Member>);

/// What [`Kind::of`] needs of a file: the first bytes of a gzip member's or a zip's header.
const SNIFF_BYTES: u64 = if MIN_GZIP_BYTES > MIN_ZIP_BYTES { MIN_GZIP_BYTES } else { MIN_ZIP_BYTES } as u64;

/// The kind of the contents of entry `e` of `layer`, from their first bytes.
fn kind_of(layer: &Unpacked, e: &TarEntry) -> Result<Option<Kind>> {
    let head = layer.read(e.data_start..e.data_start + e.data_len.min(SNIFF_BYTES))?;
    Ok(Kind::of(&head, e.data_len))
}

/// Finds the members to expand in `targets` (target layer index → unpacked layer), against
/// the source layers of `index`. Members are dropped once a layer's expanded tar would
/// exceed `limit` bytes. Files are read a pair of partners at a time per worker thread.
pub fn find(targets: &HashMap<u32, Unpacked>, index: &SourceIndex<'_>, limit: u64) -> Result<Expansion> {
    let mut candidates = Vec::new();
    for (&layer, target) in targets {
        for (entry, e) in target.index.entries.iter().enumerate() {
            if !e.has_content() {
                continue;
            }
            let Some(kind) = kind_of(target, e)? else { continue };
            let digest = target.content_digests[entry].as_ref().expect("entries with contents have digests");
            let Partner::Similar(partner) = index.partner(&e.path, digest, e.data_len) else { continue };
            if kind_of(&index.layers[partner.layer as usize], index.entry(partner))? == Some(kind) {
                candidates.push(Candidate { layer, entry, partner, kind });
            }
        }
    }
    // Each candidate costs an inflate and a few trial encodings: in parallel, in a stable
    // order so that the delta does not depend on scheduling.
    candidates.sort_by_key(|c| (c.layer, c.entry));
    let found: Vec<Pieces> = candidates
        .par_iter()
        .map(|c| {
            let target = &targets[&c.layer];
            let e = &target.index.entries[c.entry];
            // Mapped for this candidate only: its pages leave with the views.
            let target_view = target.view(e.content_range())?;
            let data = &target_view[..];
            let p = index.entry(c.partner);
            let source_view = index.layers[c.partner.layer as usize].view(p.content_range())?;
            let source_data = &source_view[..];
            Ok(match c.kind {
                Kind::Gzip => gzip_file(data, e.data_start, source_data, p.data_start).map_or_else(Default::default, |(t, s)| (vec![t], vec![s])),
                Kind::Zip => {
                    let found = zip_members::find(data, source_data);
                    let target = found.target.into_iter().map(|mut m| {
                        m.member.offset += e.data_start;
                        m
                    });
                    let source = found.source.into_iter().map(|m| Member { offset: m.offset + p.data_start, ..m });
                    (target.collect(), source.collect())
                }
                Kind::Aarch64Elf => match (code_span(data), code_span(source_data)) {
                    (Some((at, len)), Some((source_at, source_len))) => (
                        vec![RepackedMember::aarch64_code(Member::aarch64_code(e.data_start + at, len))],
                        vec![Member::aarch64_code(p.data_start + source_at, source_len)],
                    ),
                    _ => Default::default(),
                },
                Kind::X8664Elf => match address_map::x86_64_code(data, source_data) {
                    Some(view) if data.len() as u64 > address_map::TRIAL_MAX_BYTES || address_map::worth_it(data, source_data, &view)? => {
                        (vec![RepackedMember::x86_64_code(Member::x86_64_code(e.data_start + view.offset, view.len), view.map)], Vec::new())
                    }
                    _ => Default::default(),
                },
            })
        })
        .collect::<Result<_>>()?;
    let mut out = Expansion::default();
    // A source file can partner several target files: each is listed once, in tar order.
    let mut source: BTreeMap<u32, BTreeSet<Member>> = BTreeMap::new();
    let (mut growth, mut growth_source): (HashMap<u32, u64>, HashMap<u32, u64>) = Default::default();
    let grows = |m: &Member| m.raw_len.saturating_sub(m.compressed_len);
    for (c, (target, s)) in candidates.iter().zip(found) {
        let target_grows: u64 = target.iter().map(|m| grows(&m.member)).sum();
        let target_growth = growth.entry(c.layer).or_default();
        if targets[&c.layer].index.len + *target_growth + target_grows > limit {
            continue;
        }
        *target_growth += target_grows;
        // Source members only help: those that would not fit are left compressed.
        let listed = source.entry(c.partner.layer).or_default();
        let new: Vec<Member> = s.into_iter().filter(|m| !listed.contains(m)).collect();
        let new_grows: u64 = new.iter().map(grows).sum();
        let source_growth = growth_source.entry(c.partner.layer).or_default();
        if index.layers[c.partner.layer as usize].index.len + *source_growth + new_grows <= limit {
            *source_growth += new_grows;
            listed.extend(new);
        }
        if !target.is_empty() {
            out.target.entry(c.layer).or_default().extend(target);
        }
    }
    for members in out.target.values_mut() {
        members.sort_by_key(|m| m.member.offset);
    }
    source.retain(|_, set| !set.is_empty());
    out.source = source.into_iter().map(|(layer, set)| (layer, set.into_iter().collect())).collect();
    Ok(out)
}

/// A gzip file of the target at `offset` and its partner at `source_offset`: the members
/// to expand, if a known encoder reproduces the target's bytes.
fn gzip_file(data: &[u8], offset: u64, source_data: &[u8], source_offset: u64) -> Option<(RepackedMember, Member)> {
    let raw = inflate(data, Wrapping::Gzip, MAX_MEMBER_RAW_BYTES)?;
    let descriptor = fingerprint(data, &raw).filter(|d| !matches!(d.encoder, Encoder::Pgzip { .. }))?;
    let source_raw = inflate(source_data, Wrapping::Gzip, MAX_MEMBER_RAW_BYTES)?;
    let member = Member::gzip(offset, data.len() as u64, raw.len() as u64);
    Some((RepackedMember::gzip(member, descriptor), Member::gzip(source_offset, source_data.len() as u64, source_raw.len() as u64)))
}

/// Where the code of an ELF file is, as (offset, length) in the file: from the start of the
/// 4 KiB page (of addresses) holding its first executable section to the end of its last
/// one; executable segments when there are no section headers. `None` when the file does
/// not parse, holds no code, or its code's offsets and addresses disagree on word alignment.
pub fn code_span(data: &[u8]) -> Option<(u64, u64)> {
    use object::elf::{FileHeader64, PF_X, PT_LOAD, SHF_EXECINSTR, SHT_PROGBITS};
    use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
    let header = FileHeader64::<object::LittleEndian>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    // (file offset, size, address) of each piece of code.
    let mut code: Vec<(u64, u64, u64)> = header
        .sections(endian, data)
        .ok()?
        .iter()
        .filter(|s| s.sh_type(endian) == SHT_PROGBITS && s.sh_flags(endian).contains(SHF_EXECINSTR))
        .map(|s| (s.sh_offset(endian), s.sh_size(endian), s.sh_addr(endian)))
        .collect();
    if code.is_empty() {
        code = header
            .program_headers(endian, data)
            .ok()?
            .iter()
            .filter(|p| p.p_type(endian) == PT_LOAD && p.p_flags(endian).contains(PF_X))
            .map(|p| (p.p_offset(endian), p.p_filesz(endian), p.p_vaddr(endian)))
            .collect();
    }
    code.retain(|c| c.1 > 0);
    let &(offset, _, address) = code.iter().min_by_key(|c| c.0)?;
    let end = code.iter().map(|c| c.0.saturating_add(c.1)).max()?;
    let start = offset.checked_sub(address % 4096)?;
    (offset % 4 == address % 4 && end <= data.len() as u64 && end - start >= 4).then_some((start, end - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small AArch64 ELF file: `.text` of 256 bytes at file offset 64, address 0x400040.
    fn elf() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/aarch64_code/elf-text")).unwrap()
    }

    #[test]
    fn the_code_span_starts_at_the_page_of_the_first_code_address() {
        let data = elf();
        assert!(looks_like_aarch64_elf(&data));
        // 0x400040 is 64 bytes into its page: the span starts 64 bytes before .text.
        assert_eq!(code_span(&data), Some((0, 64 + 256)));
    }

    #[test]
    fn files_whose_tables_lie_have_no_code_span() {
        let data = elf();
        // .text's size past the end of the file.
        let mut long = data.clone();
        // The section headers start at 344; .text's is the second, its size at +32.
        let text_size = 344 + 64 + 32;
        long[text_size..text_size + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert_eq!(code_span(&long), None);
        // Offset and address disagreeing on word alignment.
        let mut skewed = data.clone();
        let text_addr = 344 + 64 + 16;
        skewed[text_addr..text_addr + 8].copy_from_slice(&0x400042u64.to_le_bytes());
        assert_eq!(code_span(&skewed), None);
        // Cut short, or no ELF at all.
        assert_eq!(code_span(&data[..100]), None);
        assert_eq!(code_span(b"#!/bin/sh\necho hello\n"), None);
    }
}
