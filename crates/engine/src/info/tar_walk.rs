//! Which entry of a tar each byte belongs to, for a tar that arrives in pieces of any size (a
//! patch rebuilding it): a small state machine over 512-byte blocks.
//!
//! An entry's bytes are its headers (its own, and the PAX records, GNU long name or long link
//! pseudo-entries before it) and the padding after its contents, all [`Part::Header`], and its
//! contents, [`Part::Contents`]. The end-of-archive blocks and anything after them make one last
//! pseudo-entry, [`EntryKind::EndOfArchive`]. A byte is attributed as it arrives: a header block
//! is known to be a header before it is complete, and its entry before its name is read.
//!
//! In an expanded tar (what a patch rebuilds for a layer whose gzip files and zip entries it
//! writes uncompressed, `docs/format.md` section 2.1) the headers still give the compressed
//! sizes: the walk is given the members and counts their uncompressed lengths instead.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::plan::Member;
use crate::format::retime::{header_checksum, header_size, BLOCK};

const BLOCK_LEN: usize = BLOCK as usize;

/// PAX records or a GNU long name longer than this are walked but not read: the entry keeps
/// the name its header gives.
const MAX_NAME_RECORDS_BYTES: usize = 1 << 20;

/// Offset of a header's type flag.
const TYPE_FLAG: usize = 156;
/// Offset of the flag of an old GNU sparse header saying that an extension block follows it.
const GNU_SPARSE_EXTENDED: usize = 482;
/// Offset of the same flag in a sparse extension block.
const GNU_SPARSE_EXTENSION_EXTENDED: usize = 504;

/// Which part of an entry a byte belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// Headers, PAX records, long names and padding.
    Header,
    /// The entry's contents.
    Contents,
}

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    /// A regular file (contiguous and old GNU sparse files included).
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A hard link.
    Hardlink,
    /// Anything else (devices, FIFOs, ...).
    Other,
    /// PAX records for every entry that follows (`g`).
    PaxGlobal,
    /// The end-of-archive blocks and whatever follows them.
    EndOfArchive,
}

impl EntryKind {
    fn of(type_flag: u8) -> Self {
        match type_flag {
            b'0' | 0 | b'7' | b'S' => EntryKind::File,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'5' => EntryKind::Dir,
            b'g' => EntryKind::PaxGlobal,
            _ => EntryKind::Other,
        }
    }
}

/// One entry of a walked tar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its path as the tar names it (PAX `path`, GNU long name, or ustar prefix and name).
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// The size of its contents in the layer (its header's, or PAX `size`).
    pub size: u64,
    /// Bytes of its headers, records and padding in the walked tar.
    pub header_bytes: u64,
    /// Bytes of its contents in the walked tar: more than `size` when members inside it are
    /// expanded.
    pub contents_bytes: u64,
    /// gzip files and zip entries inside it that the walked tar holds uncompressed.
    pub members: u32,
}

impl Entry {
    fn new() -> Self {
        Entry { path: String::new(), kind: EntryKind::Other, size: 0, header_bytes: 0, contents_bytes: 0, members: 0 }
    }
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// A header block is due or under way (its first bytes are in `TarWalk::block`).
    Header,
    /// `left` bytes of the current entry's records or contents to go, then `pad` bytes of padding.
    Data {
        part: Part,
        left: u64,
        pad: u64,
        /// The type flag of the pseudo-entry whose records these are (`x`, `L`, ...).
        records: Option<u8>,
        /// Whether the entry is complete after the padding.
        ends_entry: bool,
    },
    /// `left` bytes of padding to go.
    Padding { left: u64, ends_entry: bool },
    /// After the end-of-archive block.
    End,
}

/// A tar walked piece by piece; see the module documentation.
#[derive(Debug)]
pub struct TarWalk {
    /// Names the tar in errors.
    what: String,
    state: State,
    block: Box<[u8; BLOCK_LEN]>,
    filled: usize,
    /// The entry the bytes belong to, once its first header byte has arrived.
    current: Option<usize>,
    entries: Vec<Entry>,
    /// Offset in the walked tar of the next byte.
    pos: u64,
    /// Offset in the real (not expanded) tar of the next block boundary the walk reaches.
    real: u64,
    /// Members of the real tar (offset, compressed and raw lengths), in order, and the next
    /// one not yet reached.
    members: Vec<(u64, u64, u64)>,
    next_member: usize,
    /// Records of the pseudo-entry being read, unless they are too long.
    records: Vec<u8>,
    records_too_long: bool,
    /// What PAX records and GNU long names said about the entry whose header is due.
    pending_path: Option<String>,
    pending_size: Option<u64>,
    /// Contents and padding of an old GNU sparse file, due after its extension blocks.
    sparse_data: Option<(u64, u64)>,
}

impl TarWalk {
    /// A walk of the tar `what` names in errors, with `members` of the real tar (in tar
    /// order) uncompressed in it (none for a plain tar).
    pub fn new(what: &str, members: &[Member]) -> Self {
        TarWalk {
            what: what.to_string(),
            state: State::Header,
            block: Box::new([0; BLOCK_LEN]),
            filled: 0,
            current: None,
            entries: Vec::new(),
            pos: 0,
            real: 0,
            members: members.iter().map(|m| (m.offset, m.compressed_len, m.raw_len)).collect(),
            next_member: 0,
            records: Vec::new(),
            records_too_long: false,
            pending_path: None,
            pending_size: None,
            sparse_data: None,
        }
    }

    /// Walks `bytes`, the next bytes of the tar, calling `each(entry, part, n)` for each run
    /// of `n` of them that belongs to the same part of entry `entry` (an index into
    /// [`TarWalk::entries`]), in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut each: impl FnMut(usize, Part, usize)) -> Result<()> {
        while !bytes.is_empty() {
            let entry = match self.current {
                Some(e) => e,
                None => {
                    self.entries.push(Entry::new());
                    *self.current.insert(self.entries.len() - 1)
                }
            };
            let take = |left: u64| left.min(bytes.len() as u64) as usize;
            let (n, part) = match &mut self.state {
                State::End => (bytes.len(), Part::Header),
                State::Header => {
                    let n = (BLOCK_LEN - self.filled).min(bytes.len());
                    self.block[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                    self.filled += n;
                    (n, Part::Header)
                }
                State::Data { part, left, records, .. } => {
                    let n = take(*left);
                    *left -= n as u64;
                    if records.is_some() && !self.records_too_long {
                        if self.records.len() + n > MAX_NAME_RECORDS_BYTES {
                            self.records_too_long = true;
                            self.records = Vec::new();
                        } else {
                            self.records.extend_from_slice(&bytes[..n]);
                        }
                    }
                    (n, *part)
                }
                State::Padding { left, .. } => {
                    let n = take(*left);
                    *left -= n as u64;
                    (n, Part::Header)
                }
            };
            let e = &mut self.entries[entry];
            match part {
                Part::Header => e.header_bytes += n as u64,
                Part::Contents => e.contents_bytes += n as u64,
            }
            each(entry, part, n);
            self.pos += n as u64;
            bytes = &bytes[n..];
            self.settle()?;
        }
        Ok(())
    }

    /// The entries of the whole tar, the end of the archive included when it has one.
    /// Refuses a tar that ends inside an entry.
    pub fn finish(self) -> Result<Vec<Entry>> {
        let inside = match self.state {
            State::Header => self.filled > 0 || self.current.is_some(),
            State::End => false,
            State::Data { .. } | State::Padding { .. } => true,
        };
        if inside {
            let path = self.current.map(|e| self.entries[e].path.as_str()).filter(|p| !p.is_empty()).unwrap_or("an unnamed entry");
            return Err(Error::malformed(&self.what, format!("ends at byte {} inside {path}", self.pos)));
        }
        Ok(self.entries)
    }

    /// Moves past whatever the bytes fed so far completed: a header block, records,
    /// contents, padding (as many as are complete, empty ones included).
    fn settle(&mut self) -> Result<()> {
        loop {
            match self.state {
                State::Header if self.filled == BLOCK_LEN => {
                    self.filled = 0;
                    self.real += BLOCK;
                    self.state = self.header_block()?;
                }
                State::Data { left: 0, pad, records, ends_entry, .. } => {
                    if let Some(kind) = records {
                        self.read_records(kind);
                    }
                    self.state = State::Padding { left: pad, ends_entry };
                }
                State::Padding { left: 0, ends_entry } => {
                    if ends_entry {
                        self.current = None;
                    }
                    self.state = State::Header;
                }
                _ => return Ok(()),
            }
        }
    }

    /// What follows the header block just completed.
    fn header_block(&mut self) -> Result<State> {
        let entry = self.current.expect("a header block belongs to an entry");
        let block_start = self.pos - BLOCK;
        if let Some((contents, pad)) = self.sparse_data {
            // An old GNU sparse file's extension block: more follow while its flag is set.
            if self.block[GNU_SPARSE_EXTENSION_EXTENDED] != 0 {
                return Ok(State::Header);
            }
            self.sparse_data = None;
            return Ok(State::Data { part: Part::Contents, left: contents, pad, records: None, ends_entry: true });
        }
        if self.block.iter().all(|b| *b == 0) {
            let e = &mut self.entries[entry];
            e.kind = EntryKind::EndOfArchive;
            e.path = "(end of archive)".into();
            return Ok(State::End);
        }
        let header = tar::Header::from_byte_slice(&self.block[..]);
        if header.cksum().ok().map(u64::from) != Some(header_checksum(&self.block[..])) {
            return Err(Error::malformed(&self.what, format!("no valid tar header at byte {block_start}")));
        }
        let size = header_size(&self.block[..]).ok_or_else(|| Error::malformed(&self.what, format!("the header at byte {block_start} has no valid size")))?;
        let type_flag = self.block[TYPE_FLAG];
        match type_flag {
            b'x' | b'X' | b'L' | b'K' => {
                self.records.clear();
                self.records_too_long = false;
                Ok(self.data(Part::Header, size, Some(type_flag), false, entry))
            }
            b'g' => {
                let e = &mut self.entries[entry];
                e.kind = EntryKind::PaxGlobal;
                e.path = String::from_utf8_lossy(&header.path_bytes()).into_owned();
                e.size = size;
                Ok(self.data(Part::Header, size, None, true, entry))
            }
            _ => {
                let size = self.pending_size.take().unwrap_or(size);
                let path = self.pending_path.take().unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
                let e = &mut self.entries[entry];
                e.kind = EntryKind::of(type_flag);
                e.path = path;
                e.size = size;
                if type_flag == b'S' && self.block[GNU_SPARSE_EXTENDED] != 0 {
                    let State::Data { left, pad, .. } = self.data(Part::Contents, size, None, true, entry) else { unreachable!() };
                    self.sparse_data = Some((left, pad));
                    return Ok(State::Header);
                }
                Ok(self.data(Part::Contents, size, None, true, entry))
            }
        }
    }

    /// The state of `size` bytes of data of `entry` starting at the current real offset:
    /// their length in the walked tar (members inside them expanded), then their padding.
    fn data(&mut self, part: Part, size: u64, records: Option<u8>, ends_entry: bool, entry: usize) -> State {
        let start = self.real;
        let end = start.saturating_add(size);
        let mut len = i128::from(size);
        while let Some(&(offset, compressed, raw)) = self.members.get(self.next_member) {
            if offset >= end {
                break;
            }
            if offset >= start {
                len += i128::from(raw) - i128::from(compressed);
                self.entries[entry].members += 1;
            }
            self.next_member += 1;
        }
        let padded = size.div_ceil(BLOCK).saturating_mul(BLOCK);
        self.real = start.saturating_add(padded);
        State::Data { part, left: u64::try_from(len).unwrap_or(0), pad: padded - size, records, ends_entry }
    }

    /// Reads what the records of a pseudo-entry say about the entry that follows.
    fn read_records(&mut self, kind: u8) {
        if self.records_too_long {
            return;
        }
        match kind {
            b'L' => {
                let name = self.records.split(|b| *b == 0).next().unwrap_or_default();
                self.pending_path = Some(String::from_utf8_lossy(name).into_owned());
            }
            b'x' | b'X' => {
                for record in tar::PaxExtensions::new(&self.records).flatten() {
                    match record.key_bytes() {
                        b"path" => self.pending_path = Some(String::from_utf8_lossy(record.value_bytes()).into_owned()),
                        b"size" => self.pending_size = record.value().ok().and_then(|v| v.parse().ok()).or(self.pending_size),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::plan::Wrapping;

    /// A GNU header; paths too long for it are left to `tar::Builder::append_data`.
    fn header(path: &str, size: u64, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        if path.len() <= 100 {
            h.set_path(path).unwrap();
        }
        h.set_size(size);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    /// An entry of a test tar: its path, its kind and its contents.
    type Expected = (String, EntryKind, Vec<u8>);

    /// A tar with a short file, a directory, an empty file, a file whose path needs a GNU long
    /// name, a file named by PAX records (which also carry its size), a symlink and a
    /// file of exactly one block; with the files' contents.
    fn sample() -> (Vec<u8>, Vec<Expected>) {
        fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: Vec<u8>) -> Expected {
            b.append_data(&mut header(path, data.len() as u64, tar::EntryType::Regular), path, &data[..]).unwrap();
            (path.to_string(), EntryKind::File, data)
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut expected = vec![file(&mut b, "etc/short", b"hello".to_vec())];
        b.append(&header("etc/dir/", 0, tar::EntryType::Directory), &[][..]).unwrap();
        expected.push(("etc/dir/".into(), EntryKind::Dir, Vec::new()));
        expected.push(file(&mut b, "etc/empty", Vec::new()));
        let long = format!("usr/{}/long-name.txt", "d".repeat(150));
        expected.push(file(&mut b, &long, (0..2000u32).map(|i| (i % 251) as u8).collect()));
        let pax_path = format!("opt/{}/pax.bin", "p".repeat(120));
        let pax_data: Vec<u8> = (0..700u32).map(|i| (i * 7 % 256) as u8).collect();
        let rec = |k: &str, v: &str| {
            let body = format!(" {k}={v}\n");
            let mut n = body.len() + 1;
            while format!("{n}{body}").len() != n {
                n += 1;
            }
            format!("{n}{body}")
        };
        let records = rec("path", &pax_path) + &rec("size", &pax_data.len().to_string()) + &rec("mtime", "1.5");
        b.append(&header("PaxHeaders/x", records.len() as u64, tar::EntryType::XHeader), records.as_bytes()).unwrap();
        // The ustar size field says 0: the PAX size is the one that counts.
        b.append(&header("opt/truncated-name", 0, tar::EntryType::Regular), &[][..]).unwrap();
        let out = b.get_mut();
        out.extend_from_slice(&pax_data);
        out.resize(out.len().div_ceil(BLOCK_LEN) * BLOCK_LEN, 0);
        expected.push((pax_path, EntryKind::File, pax_data));
        let mut link = header("etc/link", 0, tar::EntryType::Symlink);
        link.set_link_name("short").unwrap();
        link.set_cksum();
        b.append(&link, &[][..]).unwrap();
        expected.push(("etc/link".into(), EntryKind::Symlink, Vec::new()));
        expected.push(file(&mut b, "etc/one-block", vec![b'x'; BLOCK_LEN]));
        (b.into_inner().unwrap(), expected)
    }

    /// What a walk found: the entries, and each one's contents and header bytes as
    /// attributed.
    #[derive(Debug)]
    struct Walked {
        entries: Vec<Entry>,
        contents: Vec<Vec<u8>>,
        headers: Vec<u64>,
    }

    /// Walks `tar` fed in pieces of the given lengths (cycled).
    fn walk(tar: &[u8], members: &[Member], pieces: &[usize]) -> Result<Walked> {
        let mut w = TarWalk::new("test tar", members);
        let (mut contents, mut headers) = (Vec::<Vec<u8>>::new(), Vec::<u64>::new());
        let (mut at, mut piece) = (0, 0);
        while at < tar.len() {
            let n = pieces[piece % pieces.len()].min(tar.len() - at);
            let bytes = &tar[at..at + n];
            let mut done = 0;
            w.feed(bytes, |e, part, len| {
                if contents.len() <= e {
                    contents.resize(e + 1, Vec::new());
                    headers.resize(e + 1, 0);
                }
                match part {
                    Part::Contents => contents[e].extend_from_slice(&bytes[done..done + len]),
                    Part::Header => headers[e] += len as u64,
                }
                done += len;
            })?;
            assert_eq!(done, n, "every byte attributed once");
            at += n;
            piece += 1;
        }
        Ok(Walked { entries: w.finish()?, contents, headers })
    }

    #[test]
    fn every_byte_goes_to_its_entry_whatever_the_pieces() {
        let (tar, expected) = sample();
        for pieces in [&[tar.len()][..], &[1], &[7, 511, 513], &[512], &[3, 1000, 1, 4096, 17]] {
            let Walked { entries, contents, headers } = walk(&tar, &[], pieces).unwrap();
            assert_eq!(entries.len(), expected.len() + 1, "{pieces:?}: {entries:#?}");
            for (i, (path, kind, data)) in expected.iter().enumerate() {
                let e = &entries[i];
                assert_eq!((&e.path, e.kind, e.size), (path, *kind, data.len() as u64), "{pieces:?}");
                assert_eq!(&contents[i], data, "{path} {pieces:?}");
                assert_eq!(e.contents_bytes, data.len() as u64);
                assert_eq!(e.header_bytes, headers[i]);
                // A header, its padding, and records and long names for those that need them.
                assert_eq!((e.header_bytes + e.contents_bytes) % BLOCK, 0, "{path}");
                let pseudo = if path.len() > 100 { 2 * BLOCK } else { 0 };
                assert!(e.header_bytes >= BLOCK + pseudo, "{path}: {}", e.header_bytes);
            }
            let end = entries.last().unwrap();
            assert_eq!((end.kind, end.contents_bytes), (EntryKind::EndOfArchive, 0));
            assert_eq!(end.header_bytes, 2 * BLOCK, "two zero blocks end a tar the tar crate writes");
            assert_eq!(entries.iter().map(|e| e.header_bytes + e.contents_bytes).sum::<u64>(), tar.len() as u64);
        }
    }

    #[test]
    fn a_global_pax_header_is_an_entry_of_its_own_and_the_end_takes_whatever_follows() {
        let mut tar = Vec::new();
        let records = b"22 comment=built here\n";
        tar.extend_from_slice(header("pax_global_header", records.len() as u64, tar::EntryType::XGlobalHeader).as_bytes());
        tar.extend_from_slice(records);
        tar.resize(2 * BLOCK_LEN, 0);
        tar.extend_from_slice(header("a", 3, tar::EntryType::Regular).as_bytes());
        tar.extend_from_slice(b"abc");
        tar.resize(4 * BLOCK_LEN, 0);
        tar.extend_from_slice(&[0; 2 * BLOCK_LEN]);
        tar.extend_from_slice(b"trailing garbage after the end");
        let Walked { entries, contents, .. } = walk(&tar, &[], &[100]).unwrap();
        assert_eq!(entries.iter().map(|e| e.kind).collect::<Vec<_>>(), [EntryKind::PaxGlobal, EntryKind::File, EntryKind::EndOfArchive]);
        assert_eq!((entries[0].header_bytes, entries[0].contents_bytes), (2 * BLOCK, 0));
        assert_eq!((entries[1].path.as_str(), &contents[1][..]), ("a", &b"abc"[..]));
        assert_eq!(entries[2].header_bytes, 2 * BLOCK + 30);
    }

    #[test]
    fn expanded_members_count_their_uncompressed_length() {
        let (tar, expected) = sample();
        // Expand the long-named file (entry 3): its contents become 5000 bytes, the header
        // still says 2000. And a 100-byte deflate stream inside the one-block file (entry 6)
        // becomes 10 bytes.
        let plain = walk(&tar, &[], &[tar.len()]).unwrap().entries;
        let start = |i: usize| plain[..i].iter().map(|e| e.header_bytes + e.contents_bytes).sum::<u64>() + plain[i].header_bytes - padding(&plain[i]);
        fn padding(e: &Entry) -> u64 {
            e.size.div_ceil(BLOCK) * BLOCK - e.size
        }
        let (long_at, block_at) = (start(3) as usize, start(6) as usize);
        let (long_raw, inner_raw) = (vec![b'L'; 5000], vec![b'i'; 10]);
        let mut expanded = tar[..long_at].to_vec();
        expanded.extend_from_slice(&long_raw);
        expanded.extend_from_slice(&tar[long_at + 2000..block_at + 200]);
        expanded.extend_from_slice(&inner_raw);
        expanded.extend_from_slice(&tar[block_at + 300..]);
        let members = [
            Member { offset: long_at as u64, compressed_len: 2000, raw_len: 5000, wrapping: Wrapping::Gzip },
            Member { offset: block_at as u64 + 200, compressed_len: 100, raw_len: 10, wrapping: Wrapping::Deflate },
        ];
        for pieces in [&[expanded.len()][..], &[1], &[333, 4096]] {
            let Walked { entries, contents, .. } = walk(&expanded, &members, pieces).unwrap();
            assert_eq!(entries.len(), expected.len() + 1);
            assert_eq!((entries[3].size, entries[3].contents_bytes, entries[3].members), (2000, 5000, 1));
            assert_eq!(contents[3], long_raw);
            assert_eq!((entries[6].size, entries[6].contents_bytes, entries[6].members), (512, 422, 1));
            assert_eq!(&contents[6][200..210], &inner_raw[..]);
            assert_eq!(entries[4].contents_bytes, 700, "the walk is back in step after the member");
            assert_eq!(entries.last().unwrap().kind, EntryKind::EndOfArchive);
        }
    }

    #[test]
    fn a_tar_cut_inside_an_entry_or_with_a_bad_header_is_refused() {
        let (tar, _) = sample();
        let err = walk(&tar[..700], &[], &[100]).unwrap_err().to_string();
        assert!(err.contains("ends at byte 700 inside etc/short"), "{err}");
        assert!(walk(&tar[..BLOCK_LEN + 3], &[], &[1]).is_err(), "cut inside the contents of the first file");
        let err = walk(&tar[..BLOCK_LEN * 2 + 100], &[], &[1]).unwrap_err().to_string();
        assert!(err.contains("inside an unnamed entry"), "cut inside a header: {err}");
        let mut corrupt = tar.clone();
        corrupt[BLOCK_LEN * 2 + 10] ^= 1;
        let err = walk(&corrupt, &[], &[4096]).unwrap_err().to_string();
        assert!(err.contains("no valid tar header at byte 1024"), "{err}");
        // Ending right after an entry, without end-of-archive blocks, is a complete tar.
        let Walked { entries, .. } = walk(&tar[..2 * BLOCK_LEN], &[], &[1]).unwrap();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn old_gnu_sparse_files_skip_their_extension_blocks() {
        let mut h = header("sparse", 600, tar::EntryType::GNUSparse);
        h.as_mut_bytes()[GNU_SPARSE_EXTENDED] = 1;
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        let mut extension = [0u8; BLOCK_LEN];
        extension[GNU_SPARSE_EXTENSION_EXTENDED] = 1;
        tar.extend_from_slice(&extension);
        tar.extend_from_slice(&[0u8; BLOCK_LEN]);
        tar.extend_from_slice(&[b's'; 600]);
        tar.resize(tar.len().div_ceil(BLOCK_LEN) * BLOCK_LEN, 0);
        tar.extend_from_slice(&[0; 2 * BLOCK_LEN]);
        let Walked { entries, contents, .. } = walk(&tar, &[], &[64]).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].header_bytes, &contents[0][..]), (3 * BLOCK + 424, &[b's'; 600][..]));
    }
}
