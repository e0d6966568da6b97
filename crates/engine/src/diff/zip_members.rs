//! Which deflated entries of zip files (jars, wheels) are patched uncompressed (see
//! [`crate::layer::members`]).
//!
//! A security update of a Java library rebuilds its jar: most classes change a little,
//! and each changed class differs from its old version in every deflated byte. Given a
//! target zip and its source partner, [`find`] picks the target entries worth expanding:
//! deflated, changed (their compressed bytes are nowhere in the source zip), with a
//! partner entry in the source zip (same name, or the same name but for version numbers)
//! whose bytes no unchanged target entry copies, and reproduced byte for byte by a known
//! encoder. Their partners are expanded in the
//! source. A stored entry that is itself a zip (a jar nested in a Spring Boot jar) is
//! looked into the same way.
//!
//! Only the deflate streams change form: the zip's local headers, data descriptors and
//! central directory stay in the tar as they are, CRCs and sizes included.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;

use crate::diff::pair::similarity_key;
use crate::format::plan::{Member, RepackedMember, Wrapping, MAX_MEMBER_RAW_BYTES};
use crate::layer::exact::{fingerprint_deflate, Encoder};
use crate::layer::members::{inflate, looks_like_zip};

/// Entries with fewer compressed bytes are left compressed: listing them in the delta
/// costs about what expanding them saves.
pub const MIN_ENTRY_COMPRESSED_BYTES: u64 = 64;

/// How deep zips nested as stored entries are looked into (a jar in a jar is depth 1).
pub const MAX_NESTING: u32 = 2;

/// After this many changed entries that no encoder reproduces, and none that one does, a
/// zip's writer is taken to be one we do not know, and its other entries are not tried.
const MAX_UNKNOWN_BEFORE_GIVING_UP: u32 = 4;

/// Zip compression methods we look at (APPNOTE 4.4.5).
const STORED: u16 = 0;
const DEFLATED: u16 = 8;

/// The APPNOTE number of a method we look at, or `u16::MAX` (the crate's enum has a variant
/// for deflate only when a feature of it decodes deflate; its constants hold either way).
fn method_number(method: zip::CompressionMethod) -> u16 {
    if method == zip::CompressionMethod::STORE {
        STORED
    } else if method == zip::CompressionMethod::DEFLATE {
        DEFLATED
    } else {
        u16::MAX
    }
}

/// What [`find`] chose in one zip pair; offsets are from the start of each zip.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Target entries to expand, with their encoders, in offset order.
    pub target: Vec<RepackedMember>,
    /// Source entries to expand, in offset order, without repeats.
    pub source: Vec<Member>,
}

/// One entry of a zip archive, as far as expansion needs.
#[derive(Clone, Debug)]
struct ZipEntry {
    name: String,
    method: u16,
    /// Where its data (compressed bytes) starts in the zip.
    start: u64,
    /// Compressed length.
    len: u64,
    /// Uncompressed length, as the central directory says.
    size: u64,
    crc: u32,
}

impl ZipEntry {
    fn data<'a>(&self, zip: &'a [u8]) -> &'a [u8] {
        &zip[self.start as usize..(self.start + self.len) as usize]
    }
}

/// The stored and deflated entries of `zip`, in data order, or `None` when it is no zip we
/// read (a prefix before the first header, overlapping entries, data beyond the end).
/// Encrypted entries and other methods are left out: they are never expanded.
fn list(zip: &[u8]) -> Option<Vec<ZipEntry>> {
    let mut archive = zip::ZipArchive::new(Cursor::new(zip)).ok()?;
    if archive.offset() != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let f = archive.by_index_raw(i).ok()?;
        let method = method_number(f.compression());
        if f.encrypted() || !(method == STORED || method == DEFLATED) {
            continue;
        }
        let start = f.data_start()?;
        let len = f.compressed_size();
        if start.checked_add(len).is_none_or(|end| end > zip.len() as u64) {
            return None;
        }
        out.push(ZipEntry { name: String::from_utf8_lossy(f.name_raw()).into_owned(), method, start, len, size: f.size(), crc: f.crc32() });
    }
    out.sort_by_key(|e| e.start);
    if out.windows(2).any(|w| w[0].start + w[0].len > w[1].start) {
        return None;
    }
    Some(out)
}

/// The source entries, looked up by name, by name without version numbers, and by
/// compressed bytes.
struct SourceEntries<'a> {
    zip: &'a [u8],
    entries: Vec<ZipEntry>,
    by_name: HashMap<&'a str, usize>,
    by_key: HashMap<String, Vec<usize>>,
    by_crc: HashMap<(u32, u64), Vec<usize>>,
}

impl<'a> SourceEntries<'a> {
    fn new(zip: &'a [u8], entries: &'a [ZipEntry]) -> Self {
        let mut by_name = HashMap::new();
        let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
        let mut by_crc: HashMap<(u32, u64), Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_name.insert(e.name.as_str(), i);
            by_key.entry(similarity_key(&e.name)).or_default().push(i);
            by_crc.entry((e.crc, e.len)).or_default().push(i);
        }
        SourceEntries { zip, entries: entries.to_vec(), by_name, by_key, by_crc }
    }

    /// The source entry with exactly these compressed bytes (the patch copies them), if any.
    fn holding(&self, zip: &[u8], e: &ZipEntry) -> Option<usize> {
        let data = e.data(zip);
        self.by_crc.get(&(e.crc, e.len)).and_then(|found| found.iter().copied().find(|&i| self.entries[i].data(self.zip) == data))
    }

    /// The source entry that is probably an earlier version of `e`, by index.
    fn partner(&self, e: &ZipEntry) -> Option<usize> {
        self.by_name.get(e.name.as_str()).copied().or_else(|| {
            self.by_key.get(&similarity_key(&e.name)).and_then(|found| found.iter().copied().min_by_key(|&i| self.entries[i].size.abs_diff(e.size)))
        })
    }
}

/// Finds the entries of `target` (a zip) to expand, and their partners in `source` (the
/// zip it is probably a new version of). Returns nothing when either is no zip we read.
pub fn find(target: &[u8], source: &[u8]) -> Found {
    let mut found = Found::default();
    let mut state = WriterGuess::default();
    find_nested(target, source, 0, 0, 0, &mut state, &mut found);
    found.target.sort_by_key(|m| m.member.offset);
    found.source.sort();
    found.source.dedup();
    found
}

/// What the entries tried so far say about the zip's writer.
#[derive(Debug, Default)]
struct WriterGuess {
    /// The encoder that reproduced the last entry.
    encoder: Option<Encoder>,
    reproduced: u32,
    unknown: u32,
}

impl WriterGuess {
    fn given_up(&self) -> bool {
        self.reproduced == 0 && self.unknown >= MAX_UNKNOWN_BEFORE_GIVING_UP
    }
}

/// [`find`] for zips at offsets `target_at` and `source_at` of the outermost ones.
fn find_nested(target: &[u8], source: &[u8], target_at: u64, source_at: u64, depth: u32, guess: &mut WriterGuess, found: &mut Found) {
    if !looks_like_zip(target) || !looks_like_zip(source) {
        return;
    }
    let (Some(target_entries), Some(source_entries)) = (list(target), list(source)) else { return };
    let sources = SourceEntries::new(source, &source_entries);
    // Source entries whose compressed bytes the target keeps: the patch copies them, so they
    // stay compressed (a changed entry partnered with one is left compressed too).
    let held: HashSet<usize> = target_entries.iter().filter_map(|e| sources.holding(target, e)).collect();
    for e in &target_entries {
        if guess.given_up() && e.method == DEFLATED {
            continue;
        }
        if e.len < MIN_ENTRY_COMPRESSED_BYTES || sources.holding(target, e).is_some() {
            continue;
        }
        let Some(pi) = sources.partner(e).filter(|i| !held.contains(i)) else { continue };
        let p = &sources.entries[pi];
        match (e.method, p.method) {
            (DEFLATED, _) => {
                if e.size > MAX_MEMBER_RAW_BYTES {
                    continue;
                }
                let data = e.data(target);
                let Some(raw) = inflate(data, Wrapping::Deflate, e.size).filter(|raw| raw.len() as u64 == e.size && crc32fast::hash(raw) == e.crc) else {
                    continue;
                };
                let Some(encoder) = fingerprint_deflate(data, &raw, guess.encoder.as_ref()) else {
                    guess.unknown += 1;
                    continue;
                };
                guess.reproduced += 1;
                guess.encoder = Some(encoder.clone());
                found.target.push(RepackedMember::deflate(Member::deflate(target_at + e.start, e.len, e.size), encoder));
                // The source entry's real length, whatever its headers say.
                if let Some(raw) = (p.method == DEFLATED).then(|| inflate(p.data(source), Wrapping::Deflate, MAX_MEMBER_RAW_BYTES)).flatten() {
                    found.source.push(Member::deflate(source_at + p.start, p.len, raw.len() as u64));
                }
            }
            (STORED, STORED) if depth < MAX_NESTING => {
                find_nested(e.data(target), p.data(source), target_at + e.start, source_at + p.start, depth + 1, guess, found);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Text that compresses like source code: words from a small vocabulary, some lines
    /// changed by `version`.
    pub(crate) fn class_text(seed: u32, len: usize, version: u32) -> Vec<u8> {
        let words = ["public", "static", "void", "return", "final", "class", "import", "java.util.", "String", "int", "(", ")", ";", "{", "}", "\n"];
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        let mut out = Vec::with_capacity(len);
        let mut line = 0u32;
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let w = words[(x % words.len() as u32) as usize];
            out.extend_from_slice(w.as_bytes());
            out.push(b' ');
            if w == "\n" {
                line += 1;
                if line.is_multiple_of(37) {
                    out.extend_from_slice(format!("// version {version}\n").as_bytes());
                }
            }
        }
        out.truncate(len);
        out
    }

    /// A zip of `entries` (name, contents, deflated or stored), each deflated one by
    /// `encoder`: local headers, data, central directory, as `zip -D` lays them out.
    fn zip_with(entries: &[(&str, Vec<u8>, bool)], encoder: &Encoder) -> Vec<u8> {
        zip_by(entries, &|contents| encoder.deflate_to_vec(contents).unwrap())
    }

    fn zip_by(entries: &[(&str, Vec<u8>, bool)], compress: &dyn Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, contents, deflate) in entries {
            let data = if *deflate { compress(contents) } else { contents.clone() };
            let method: u16 = if *deflate { DEFLATED } else { STORED };
            let crc = crc32fast::hash(contents);
            let offset = out.len() as u32;
            let fixed = |sig: &[u8], out: &mut Vec<u8>| {
                out.extend_from_slice(sig);
                out.extend_from_slice(&20u16.to_le_bytes());
            };
            fixed(b"PK\x03\x04", &mut out);
            out.extend_from_slice(&0u16.to_le_bytes()); // flags
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&[0, 0, 0x21, 0]); // time, date
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(contents.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&data);
            central.extend_from_slice(b"PK\x01\x02");
            central.extend_from_slice(&20u16.to_le_bytes());
            central.extend_from_slice(&20u16.to_le_bytes());
            central.extend_from_slice(&0u16.to_le_bytes());
            central.extend_from_slice(&method.to_le_bytes());
            central.extend_from_slice(&[0, 0, 0x21, 0]);
            central.extend_from_slice(&crc.to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(contents.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]); // extra, comment, disk, internal and external attributes
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(b"PK\x05\x06");
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    fn zlib6() -> Encoder {
        Encoder::Zlib { level: 6 }
    }

    /// A jar whose entries change with `version`; `New.class` appears in version 2.
    fn jar(version: u32, encoder: &Encoder) -> Vec<u8> {
        let res = format!("org/example/res-{version}.txt");
        let mut entries = vec![
            ("META-INF/MANIFEST.MF", format!("Manifest-Version: 1.0\nImplementation-Version: {version}\n").into_bytes(), true),
            ("org/example/Same.class", class_text(1, 9000, 0), true),
            ("org/example/Changed.class", class_text(2, 20_000, version), true),
            ("org/example/Tiny.class", format!("v{version}").into_bytes(), true),
            (res.as_str(), class_text(3, 5000, version), true),
        ];
        if version > 1 {
            entries.push(("org/example/New.class", class_text(4, 3000, version), true));
        }
        zip_with(&entries, encoder)
    }

    #[test]
    fn changed_entries_with_partners_are_expanded_and_the_rest_left_alone() {
        let (source, target) = (jar(1, &zlib6()), jar(2, &zlib6()));
        let found = find(&target, &source);
        let target_entries = list(&target).unwrap();
        let name_at = |offset: u64| target_entries.iter().find(|e| e.start == offset).unwrap().name.clone();
        let names: Vec<String> = found.target.iter().map(|m| name_at(m.member.offset)).collect();
        // The manifest and Tiny are below the size floor, Same is unchanged, New has no partner.
        assert_eq!(names, ["org/example/Changed.class", "org/example/res-2.txt"]);
        assert!(found.target.iter().all(|m| m.encoder == Some(zlib6()) && m.member.wrapping == Wrapping::Deflate));
        assert_eq!(found.source.len(), 2);
        // Each member is a deflate stream that inflates to its raw length, at its offset.
        for m in found.target.iter().map(|m| &m.member).chain(&found.source) {
            let zip = if found.source.contains(m) { &source } else { &target };
            let data = &zip[m.offset as usize..(m.offset + m.compressed_len) as usize];
            assert_eq!(inflate(data, Wrapping::Deflate, u64::MAX).unwrap().len() as u64, m.raw_len);
        }
    }

    #[test]
    fn a_partner_whose_bytes_the_target_keeps_stays_compressed() {
        // The target keeps res-1.txt as it was and adds res-2.txt, whose partner by name
        // without numbers is res-1.txt: expanding it would cost the copy of res-1.txt.
        let old = class_text(3, 5000, 1);
        let source = zip_with(&[("org/example/res-1.txt", old.clone(), true)], &zlib6());
        let target = zip_with(&[("org/example/res-1.txt", old, true), ("org/example/res-2.txt", class_text(3, 5000, 2), true)], &zlib6());
        assert_eq!(find(&target, &source), Found::default());
    }

    #[test]
    fn every_encoder_we_port_is_recognised_in_a_zip() {
        for encoder in [Encoder::Zlib { level: 9 }, Encoder::GnuGzip { level: 6 }, Encoder::Zlib { level: 1 }, Encoder::KlauspostGzip] {
            let target = jar(2, &encoder);
            let found = find(&target, &jar(1, &encoder));
            assert_eq!(found.target.len(), 2, "{encoder:?}");
            // The encoder found may be another that writes the same bytes for these
            // entries (gzip's deflate and zlib's agree on short inputs).
            for m in &found.target {
                let data = &target[m.member.offset as usize..(m.member.offset + m.member.compressed_len) as usize];
                let raw = inflate(data, Wrapping::Deflate, u64::MAX).unwrap();
                assert_eq!(m.encoder.as_ref().unwrap().deflate_to_vec(&raw).unwrap(), data, "{encoder:?}");
            }
        }
    }

    #[test]
    fn a_jar_nested_as_a_stored_entry_is_looked_into() {
        let outer = |version: u32| {
            zip_with(
                &[("BOOT-INF/classes/App.class", class_text(9, 4000, 0), true), (&format!("BOOT-INF/lib/lib-{version}.0.jar"), jar(version, &zlib6()), false)],
                &zlib6(),
            )
        };
        let (source, target) = (outer(1), outer(2));
        let found = find(&target, &source);
        assert_eq!(found.target.len(), 2);
        let inner_start = list(&target).unwrap().iter().find(|e| e.name.ends_with(".jar")).unwrap().start;
        assert!(found.target.iter().all(|m| m.member.offset > inner_start));
        for m in &found.source {
            let data = &source[m.offset as usize..(m.offset + m.compressed_len) as usize];
            assert_eq!(inflate(data, Wrapping::Deflate, u64::MAX).unwrap().len() as u64, m.raw_len);
        }
    }

    #[test]
    fn zips_from_an_unknown_writer_are_given_up_on() {
        // flate2's zlib-rs backend: its streams are not zlib's.
        let zlib_rs = |contents: &[u8]| {
            let mut w = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            w.write_all(contents).unwrap();
            w.finish().unwrap()
        };
        let write = |version: u32| {
            let entries: Vec<(String, Vec<u8>, bool)> = (0..20).map(|i| (format!("c/{i}.class"), class_text(i, 3000, version), true)).collect();
            let entries: Vec<(&str, Vec<u8>, bool)> = entries.iter().map(|(n, c, d)| (n.as_str(), c.clone(), *d)).collect();
            zip_by(&entries, &zlib_rs)
        };
        let mut guess = WriterGuess::default();
        let mut found = Found::default();
        find_nested(&write(2), &write(1), 0, 0, 0, &mut guess, &mut found);
        assert_eq!(found, Found::default());
        // 20 changed entries, but only the first few were tried.
        assert_eq!((guess.unknown, guess.reproduced), (MAX_UNKNOWN_BEFORE_GIVING_UP, 0));
    }

    #[test]
    fn what_is_not_a_zip_we_read_gives_nothing() {
        let good = jar(1, &zlib6());
        assert_eq!(find(b"PK\x03\x04 but nothing else follows", &good), Found::default());
        let mut prefixed = b"#!/bin/sh\n".to_vec();
        prefixed.extend_from_slice(&good);
        assert_eq!(find(&prefixed, &good), Found::default());
        let mut truncated = jar(2, &zlib6());
        truncated.truncate(truncated.len() - 30);
        assert_eq!(find(&truncated, &good), Found::default());
    }
}
