//! Which gzip files inside the layers are patched uncompressed (see
//! [`crate::layer::members`]).
//!
//! A target file is expanded when it is one gzip member that changed, whose source partner
//! is one gzip member too, and whose bytes a known encoder reproduces exactly (Debian's
//! `gzip -9n` changelogs and manual pages are GNU gzip's). Its partner is then expanded in
//! the source layer, so the patch codes the new text against the old text. Files without a
//! gzip partner are left compressed: expanding them would only move work to the device.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rayon::prelude::*;

use crate::diff::material::Unpacked;
use crate::diff::pair::{Loc, Partner, SourceIndex};
use crate::format::plan::{Member, RepackedMember, MAX_MEMBER_RAW_BYTES};
use crate::layer::exact::{fingerprint, Encoder};
use crate::layer::members::{inflate, looks_like_gzip};

/// Largest compressed gzip file considered.
pub const MAX_MEMBER_COMPRESSED_BYTES: u64 = 64 << 20;

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
}

/// Finds the members to expand in `targets` (target layer index → unpacked layer), against
/// the source layers of `index`.
pub fn find(targets: &HashMap<u32, Unpacked>, index: &SourceIndex<'_>) -> Expansion {
    let mut candidates = Vec::new();
    for (&layer, target) in targets {
        for (entry, e) in target.index.entries.iter().enumerate() {
            if !e.has_content() || e.data_len > MAX_MEMBER_COMPRESSED_BYTES || !looks_like_gzip(target.bytes(e.content_range())) {
                continue;
            }
            let digest = target.content_digests[entry].as_ref().expect("entries with contents have digests");
            let Partner::Similar(partner) = index.partner(&e.path, digest, e.data_len) else { continue };
            let p = index.entry(partner);
            if p.data_len <= MAX_MEMBER_COMPRESSED_BYTES && looks_like_gzip(index.layers[partner.layer as usize].bytes(p.content_range())) {
                candidates.push(Candidate { layer, entry, partner });
            }
        }
    }
    // Each candidate costs an inflate and a few trial encodings: in parallel, in a stable
    // order so that the delta does not depend on scheduling.
    candidates.sort_by_key(|c| (c.layer, c.entry));
    let found: Vec<Option<(RepackedMember, Member)>> = candidates
        .par_iter()
        .map(|c| {
            let target = &targets[&c.layer];
            let e = &target.index.entries[c.entry];
            let data = target.bytes(e.content_range());
            let raw = inflate(data, MAX_MEMBER_RAW_BYTES)?;
            let descriptor = fingerprint(data, &raw).filter(|d| !matches!(d.encoder, Encoder::Pgzip { .. }))?;
            let p = index.entry(c.partner);
            let source_raw = inflate(index.layers[c.partner.layer as usize].bytes(p.content_range()), MAX_MEMBER_RAW_BYTES)?;
            let member = Member { offset: e.data_start, compressed_len: e.data_len, raw_len: raw.len() as u64 };
            let source = Member { offset: p.data_start, compressed_len: p.data_len, raw_len: source_raw.len() as u64 };
            Some((RepackedMember { member, descriptor }, source))
        })
        .collect();
    let mut out = Expansion::default();
    // A source file can partner several target files: each is listed once, in tar order.
    let mut source: BTreeMap<u32, BTreeSet<Member>> = BTreeMap::new();
    for (c, f) in candidates.iter().zip(found) {
        let Some((target, s)) = f else { continue };
        out.target.entry(c.layer).or_default().push(target);
        source.entry(c.partner.layer).or_default().insert(s);
    }
    out.source = source.into_iter().map(|(layer, set)| (layer, set.into_iter().collect())).collect();
    out
}
