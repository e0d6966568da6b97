//! Pairing target files with source files: by content, by path, then by similar path.

use std::collections::HashMap;

use crate::diff::material::Unpacked;
use crate::digest::Digest;
use crate::layer::TarEntry;

/// Where an entry lives in the source image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Source layer index.
    pub layer: u32,
    /// Entry index in that layer.
    pub entry: u32,
}

/// The partner found for a target file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partner {
    /// The same contents exist in the source.
    Same(Loc),
    /// A file that is probably an earlier version of it.
    Similar(Loc),
    /// Nothing to diff against.
    None,
}

/// Lookup tables over every layer of the source image.
#[derive(Debug)]
pub struct SourceIndex<'a> {
    /// The unpacked source layers.
    pub layers: &'a [Unpacked],
    by_digest: HashMap<Digest, Loc>,
    by_path: HashMap<&'a str, Loc>,
    by_key: HashMap<String, Vec<Loc>>,
}

/// A path with every run of digits replaced by `#`, in lower case, `-` and `_` alike:
/// versioned names of one file agree (`libssl.so.3.0.11` and `libssl.so.3.0.13`,
/// `python3.11/` and `python3.12/`, the wheels `Flask-2.2.5-py3-none-any.whl` and
/// `flask-3.0.3-py3-none-any.whl`, `charset-normalizer` and `charset_normalizer`).
pub fn similarity_key(path: &str) -> String {
    let mut key = String::with_capacity(path.len());
    let mut in_digits = false;
    for c in path.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                key.push('#');
            }
            in_digits = true;
        } else {
            key.push(if c == '_' { '-' } else { c.to_ascii_lowercase() });
            in_digits = false;
        }
    }
    key
}

impl<'a> SourceIndex<'a> {
    /// Indexes the source layers. Upper layers win for paths, as in the assembled filesystem.
    pub fn build(layers: &'a [Unpacked]) -> Self {
        let mut by_digest = HashMap::new();
        let mut by_path = HashMap::new();
        let mut by_key: HashMap<String, Vec<Loc>> = HashMap::new();
        for (li, layer) in layers.iter().enumerate() {
            for (ei, e) in layer.index.entries.iter().enumerate() {
                let loc = Loc { layer: li as u32, entry: ei as u32 };
                by_path.insert(e.path.as_str(), loc);
                if let Some(d) = layer.content_digests[ei] {
                    by_digest.entry(d).or_insert(loc);
                    by_key.entry(similarity_key(&e.path)).or_default().push(loc);
                }
            }
        }
        SourceIndex { layers, by_digest, by_path, by_key }
    }

    /// The source entry at `loc`.
    pub fn entry(&self, loc: Loc) -> &'a TarEntry {
        &self.layers[loc.layer as usize].index.entries[loc.entry as usize]
    }

    fn has_content(&self, loc: Loc) -> bool {
        self.entry(loc).has_content()
    }

    /// The source entry at the same path, whatever its kind.
    pub fn at_path(&self, path: &str) -> Option<Loc> {
        self.by_path.get(path).copied()
    }

    /// Finds the best partner for a target file with contents.
    pub fn partner(&self, path: &str, digest: &Digest, len: u64) -> Partner {
        let same_path = self.at_path(path).filter(|l| self.has_content(*l));
        if let Some(loc) = same_path {
            if self.layers[loc.layer as usize].content_digests[loc.entry as usize].as_ref() == Some(digest) {
                return Partner::Same(loc);
            }
        }
        if let Some(loc) = self.by_digest.get(digest) {
            return Partner::Same(*loc);
        }
        if let Some(loc) = same_path {
            return Partner::Similar(loc);
        }
        self.by_key
            .get(&similarity_key(path))
            .and_then(|locs| locs.iter().min_by_key(|l| self.entry(**l).data_len.abs_diff(len)))
            .map_or(Partner::None, |l| Partner::Similar(*l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_keys_fold_version_numbers() {
        assert_eq!(similarity_key("usr/lib/libssl.so.3.0.11"), similarity_key("usr/lib/libssl.so.3.0.13"));
        assert_eq!(similarity_key("usr/lib/python3.11/os.py"), "usr/lib/python#.#/os.py");
        assert_ne!(similarity_key("a/b.txt"), similarity_key("a/c.txt"));
        assert_eq!(similarity_key("wheels/Flask-2.2.5-py3-none-any.whl"), similarity_key("wheels/flask-3.0.3-py3-none-any.whl"));
        assert_eq!(similarity_key("charset_normalizer-3.1.0.dist-info"), similarity_key("charset-normalizer-3.3.2.dist-info"));
    }
}
