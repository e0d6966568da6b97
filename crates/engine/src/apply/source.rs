//! Source material for the applier: the uncompressed source layers a delta reads, as files
//! that are read with positioned reads (never mapped, so memory stays bounded).
//!
//! A delta whose patches read a source layer *expanded* (its listed gzip files and zip
//! entries seen inflated, see [`crate::layer::members`]) gets a view of it: the plain tar as
//! it is, plus one scratch file with the members' contents, read through a map of spans.
//! Only the members are written; the tar is never copied to make the view.
//!
//! Layers are prepared while the rebuild reads them: [`start`] returns the view at once and a
//! [`Preparer`] that decompresses the layer and inflates its members in order, on a thread of
//! its own, publishing how many bytes from the start can be read. A read waits for the bytes
//! it needs. Patches read their sources mostly forwards, so the rebuild follows the
//! decompression instead of waiting for all of it.
//!
//! A preparer runs at most [`PREPARE_AHEAD_BYTES`] past the furthest byte its readers have
//! asked for, no further than the layer's extent (the furthest byte the patches read, which the
//! applier finds before the rebuild) unless a read asks for more, and stops when the rebuild is
//! over, so that a layer the patches read only the start of is not decompressed whole (what is
//! not read cannot reach the output, which is verified against the target's digests anyway).
//! Each layer has a thread of its own, which costs memory only while it works; the work itself
//! is bounded by [`Permits`], one per `--jobs`, taken for one step (1 MiB of tar, or one
//! member) at a time and never held while waiting for readers. So a preparer waiting for its readers never keeps another layer, which
//! those readers may be waiting for, from being prepared.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{Scope, ScopedJoinHandle};

use crate::error::{Error, IoContext, Result};
use crate::format::plan::Member;
use crate::image::{Image, Layout};
use crate::layer::members::inflate_member;
use crate::layer::Compression;

/// Bytes decompressed between two publications of a layer's progress.
const PREPARE_STEP_BYTES: usize = 1 << 20;
/// How far a preparer runs past the furthest byte its readers have asked for.
pub const PREPARE_AHEAD_BYTES: u64 = 32 << 20;

/// One uncompressed source layer on disk, expanded as the delta reads it.
#[derive(Debug)]
pub struct SourceLayer {
    /// The plain tar.
    file: File,
    /// The members' contents and where they lie; empty when nothing is expanded.
    expanded: Option<Expanded>,
    /// How much of it is ready.
    ready: Arc<Readiness>,
    index: u32,
}

/// The inflated members of an expanded layer.
#[derive(Debug)]
struct Expanded {
    /// Their contents, one after the other.
    contents: File,
    /// One per member, in order.
    spans: Vec<Span>,
}

/// Where one member lies: in the expanded layer, in the contents file, and where the
/// plain tar resumes after it.
#[derive(Clone, Copy, Debug)]
struct Span {
    /// Expanded offset of its contents.
    expanded: u64,
    /// Length of its contents.
    raw_len: u64,
    /// Offset of its contents in the contents file.
    contents: u64,
    /// Offset in the plain tar of the byte after it.
    tar_end: u64,
}

/// How far a layer has been prepared, shared by its [`Preparer`] and its readers.
#[derive(Debug, Default)]
struct Readiness {
    state: Mutex<Ready>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Ready {
    /// Bytes of the (expanded) layer readable from its start.
    bytes: u64,
    /// Its length, once it is prepared whole.
    len: Option<u64>,
    /// The furthest byte a reader has asked for; 0 until one asks, and until then the
    /// preparer waits (unless it is among the first, see [`prepare`]).
    wanted: u64,
    /// No read goes past this byte, as far as the patches say (see
    /// [`SourceLayer::read_no_further_than`]): the preparer stops there unless a read asks for
    /// more.
    extent: Option<u64>,
    /// Preparing failed (its preparer returns the error).
    failed: bool,
    /// The rebuild gave up: the preparer stops.
    cancelled: bool,
}

impl Ready {
    /// Where the preparer may pause: [`PREPARE_AHEAD_BYTES`] past what readers asked for, or
    /// the layer's extent if that comes first. A read past the extent (which a hostile patch
    /// may ask for) still gets its bytes: the preparer never pauses before what is asked.
    fn enough(&self) -> u64 {
        let ahead = self.wanted.saturating_add(PREPARE_AHEAD_BYTES);
        self.extent.map_or(ahead, |extent| ahead.min(extent.max(self.wanted)))
    }
}

impl Readiness {
    fn update(&self, f: impl FnOnce(&mut Ready)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }

    /// Waits while the preparer has no reader yet, is [`PREPARE_AHEAD_BYTES`] ahead of them,
    /// or has reached the layer's extent and what they asked for; false once it is cancelled.
    fn go_on(&self) -> bool {
        let mut ready = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !ready.cancelled && (ready.wanted == 0 || ready.bytes >= ready.enough()) {
            ready = self.changed.wait(ready).unwrap_or_else(PoisonError::into_inner);
        }
        !ready.cancelled
    }

    /// Whether the preparer was cancelled.
    fn cancelled(&self) -> bool {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).cancelled
    }

    /// Waits until bytes up to `end` can be read; returns how many can. Refuses a range past
    /// the layer's end, and a layer whose preparing failed or was given up.
    fn wait_for(&self, offset: u64, end: u64, index: u32) -> Result<u64> {
        let mut ready = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if end > ready.wanted {
            ready.wanted = end;
            // The preparer may be waiting for its readers.
            self.changed.notify_all();
        }
        loop {
            if let Some(len) = ready.len.filter(|len| end > *len) {
                return Err(Error::malformed("patch", format!("range {offset}+{} is outside source layer {index} ({len} bytes)", end - offset)));
            }
            if ready.bytes >= end {
                return Ok(ready.bytes);
            }
            if ready.failed || ready.cancelled {
                return Err(Error::malformed("patch", format!("reads source layer {index}, which could not be prepared")));
            }
            ready = self.changed.wait(ready).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl SourceLayer {
    /// Length of the (expanded) tar, once it is prepared whole.
    pub fn prepared_len(&self) -> Option<u64> {
        self.ready.state.lock().unwrap_or_else(PoisonError::into_inner).len
    }

    /// Reads `buf.len()` bytes at `offset` of the (expanded) tar, refusing ranges outside it;
    /// waits for them while the layer is being prepared.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(end) = offset.checked_add(buf.len() as u64) else {
            return Err(Error::malformed("patch", format!("range {offset}+{} is outside source layer {}", buf.len(), self.index)));
        };
        let ready = self.ready.wait_for(offset, end, self.index)?;
        let Some(expanded) = &self.expanded else {
            return self.file.read_exact_at(buf, offset).ctx(|| format!("reading source layer {}", self.index));
        };
        let (mut pos, mut done) = (offset, 0usize);
        while done < buf.len() {
            let (file, at, available) = expanded.locate(pos, ready);
            let n = (buf.len() - done).min(usize::try_from(available).unwrap_or(usize::MAX));
            let file = if file == Part::Tar { &self.file } else { &expanded.contents };
            file.read_exact_at(&mut buf[done..done + n], at).ctx(|| format!("reading source layer {}", self.index))?;
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    /// Says that the patches read no byte of the layer past `end`: its preparer stops there
    /// rather than running [`PREPARE_AHEAD_BYTES`] ahead of the reads, unless a read asks for
    /// more. A patch that copies a few bytes from the start of a large base layer no longer
    /// costs decompressing 32 MiB of it (and writing them to scratch space).
    pub fn read_no_further_than(&self, end: u64) {
        self.ready.update(|r| r.extent = Some(end));
    }

    /// Lets its preparer write the whole layer, however little of it is read.
    pub fn want_all(&self) {
        self.ready.update(|r| r.wanted = u64::MAX);
    }

    /// Tells its preparer to stop: the rebuild is over (done, or failed).
    pub fn cancel(&self) {
        self.ready.update(|r| r.cancelled = true);
    }
}

/// Which file a span of the expanded layer is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Tar,
    Contents,
}

/// The expanded offset up to which a layer with member `spans` is readable when `tar` bytes
/// of its plain tar are written and its first `inflated` members are.
fn readable(spans: &[Span], members: &[Member], tar: u64, inflated: usize) -> u64 {
    match (members.get(inflated), inflated.checked_sub(1).map(|i| spans[i])) {
        // Plain tar up to the next member, which is not there yet.
        (Some(m), _) => spans[inflated].expanded - (m.offset - tar.min(m.offset)),
        (None, Some(last)) => last.expanded + last.raw_len + tar.saturating_sub(last.tar_end),
        (None, None) => tar,
    }
}

impl Expanded {
    /// Where expanded offset `pos` (below `len`, the bytes readable) is read: the file, the
    /// offset in it, and how many bytes from there are contiguous.
    fn locate(&self, pos: u64, len: u64) -> (Part, u64, u64) {
        // The first member whose contents end after `pos` (empty members never do).
        let i = self.spans.partition_point(|s| s.expanded + s.raw_len <= pos);
        match self.spans.get(i) {
            Some(s) if pos >= s.expanded => (Part::Contents, s.contents + (pos - s.expanded), s.expanded + s.raw_len - pos),
            next => {
                // Plain tar, after member i-1 (or from the start) and before member i (or the end).
                let (expanded_start, tar_start) = i.checked_sub(1).map_or((0, 0), |p| (self.spans[p].expanded + self.spans[p].raw_len, self.spans[p].tar_end));
                let end = next.map_or(len, |s| s.expanded.min(len));
                (Part::Tar, tar_start + (pos - expanded_start), end - pos)
            }
        }
    }
}

/// Starts making source layer `index` available uncompressed, as the delta's patches read it:
/// returns its view, which can be read at once (reads wait), and the [`Preparer`] that
/// writes it, to run on another thread. A plain-tar blob is used in place; a compressed one
/// is decompressed into `dir`. The source is not hashed: every rebuilt layer is checked
/// against its diff_id before the output is committed, so a damaged source fails that
/// check, and a layer reused as it is is verified on its own copy. With `members`, the layer
/// is made available expanded (each member inflated into a file in `dir`; see
/// [`crate::layer::members`]); the expanded length may not exceed `limit`.
pub fn start<'a>(layout: &Layout, image: &Image, index: u32, dir: &Path, limit: u64, members: &'a [Member]) -> Result<(SourceLayer, Preparer<'a>)> {
    let layer = image.layers.get(index as usize).ok_or_else(|| Error::malformed("patch", format!("source layer {index} does not exist")))?;
    let what = format!("source layer {index} ({})", layer.blob.digest);
    start_blob(layout.open_blob(&layer.blob)?, layer.compression, what, index, dir, limit, members)
}

/// [`start`] for a layer blob already open: `blob`, compressed with `compression`, named `what`.
fn start_blob<'a>(
    blob: File,
    compression: Compression,
    what: String,
    index: u32,
    dir: &Path,
    limit: u64,
    members: &'a [Member],
) -> Result<(SourceLayer, Preparer<'a>)> {
    let (file, input) = if compression == Compression::None {
        let size = blob.metadata().ctx(|| format!("reading the size of {what}"))?.len();
        if size > limit {
            return Err(Error::TooLarge { what, limit });
        }
        (blob, Input::Tar { size })
    } else {
        let path = dir.join(format!("source-{index}.tar"));
        let file = File::options().read(true).write(true).create_new(true).open(&path).ctx(|| format!("creating {}", path.display()))?;
        let out = file.try_clone().ctx(|| format!("opening {}", path.display()))?;
        (file, Input::Compressed { blob, compression, out })
    };
    let read_tar = file.try_clone().ctx(|| format!("opening {what}"))?;
    let (expanded, contents) = if members.is_empty() {
        (None, None)
    } else {
        let spans = spans(members, limit, &what)?;
        let path = dir.join(format!("source-{index}.members"));
        let writer = File::create(&path).ctx(|| format!("creating {}", path.display()))?;
        let contents = File::open(&path).ctx(|| format!("opening {}", path.display()))?;
        (Some(Expanded { contents, spans }), Some(BufWriter::with_capacity(256 << 10, writer)))
    };
    let ready = Arc::new(Readiness::default());
    let spans = expanded.as_ref().map_or_else(Vec::new, |e| e.spans.clone());
    let preparer = Preparer { what, input: Some(input), read_tar, members, spans, contents, limit, ready: Arc::clone(&ready) };
    Ok((SourceLayer { file, expanded, ready, index }, preparer))
}

/// What a [`Preparer`] reads.
#[derive(Debug)]
enum Input {
    /// The blob is the plain tar, of `size` bytes.
    Tar { size: u64 },
    /// A compressed blob, decompressed into `out`.
    Compressed { blob: File, compression: Compression, out: File },
}

/// Writes one source layer's files for its [`SourceLayer`] (see [`start`]).
#[derive(Debug)]
pub struct Preparer<'a> {
    what: String,
    /// Taken when the work starts.
    input: Option<Input>,
    /// The tar, read for the members.
    read_tar: File,
    members: &'a [Member],
    /// The members' spans.
    spans: Vec<Span>,
    /// Where the members' contents are written.
    contents: Option<BufWriter<File>>,
    limit: u64,
    ready: Arc<Readiness>,
}

impl Preparer<'_> {
    /// Whether preparing writes anything: not for a plain-tar blob with no member to
    /// inflate, which is read in place and ready as soon as it is opened.
    pub fn has_work(&self) -> bool {
        !(matches!(self.input, Some(Input::Tar { .. })) && self.members.is_empty())
    }

    /// Writes the layer, publishing what can be read as it goes. Returns early, without
    /// error, when the rebuild gives up ([`SourceLayer::cancel`]).
    pub fn run(mut self, permits: &Permits) -> Result<()> {
        let result = self.write(permits);
        let ready = &self.ready;
        match result {
            Ok(Some(len)) => ready.update(|r| {
                r.bytes = len;
                r.len = Some(len);
            }),
            Ok(None) => {}
            Err(_) => ready.update(|r| r.failed = true),
        }
        result.map(drop)
    }

    /// The layer's length, or `None` when cancelled.
    fn write(&mut self, permits: &Permits) -> Result<Option<u64>> {
        let mut inflated = 0;
        let (blob, compression, mut out) = match self.input.take() {
            Some(Input::Compressed { blob, compression, out }) => (blob, compression, out),
            // The blob is the tar: only its members are written.
            Some(Input::Tar { size }) => return self.finish(size, &mut inflated, permits),
            // `run` takes the preparer: it never writes twice.
            None => return Err(Error::malformed(&self.what, "prepared twice")),
        };
        // Nothing is allocated before the first step: a layer nobody reads costs a thread.
        if !self.ready.go_on() {
            return Ok(None);
        }
        let mut decoder = compression.decoder(io::BufReader::with_capacity(64 << 10, blob))?;
        let mut buf = Vec::with_capacity(PREPARE_STEP_BYTES);
        let mut tar = 0u64;
        loop {
            if !self.ready.go_on() {
                return Ok(None);
            }
            let permit = permits.take();
            buf.clear();
            let n = (&mut decoder).take(PREPARE_STEP_BYTES as u64).read_to_end(&mut buf).ctx(|| format!("reading {}", self.what))?;
            if n == 0 {
                break;
            }
            tar += n as u64;
            if tar > self.limit {
                return Err(Error::TooLarge { what: self.what.clone(), limit: self.limit });
            }
            out.write_all(&buf[..n]).ctx(|| format!("writing {} decompressed", self.what))?;
            drop(permit);
            self.inflate_whole(tar, &mut inflated, permits, false)?;
        }
        self.finish(tar, &mut inflated, permits)
    }

    /// With `tar` bytes of the plain tar written, inflates the members whole in them after the
    /// first `inflated` ones, publishing what is readable after each, and taking a permit
    /// for each (after waiting for readers if `throttled`). Returns what is readable, or
    /// `None` when cancelled.
    fn inflate_whole(&mut self, tar: u64, inflated: &mut usize, permits: &Permits, throttled: bool) -> Result<Option<u64>> {
        let Some(contents) = &mut self.contents else {
            self.ready.update(|r| r.bytes = tar);
            return Ok(Some(tar));
        };
        loop {
            contents.flush().ctx(|| format!("writing the inflated files of {}", self.what))?;
            let readable = readable(&self.spans, self.members, tar, *inflated);
            self.ready.update(|r| r.bytes = readable);
            let Some(m) = self.members.get(*inflated).filter(|m| m.offset + m.compressed_len <= tar) else { return Ok(Some(readable)) };
            if if throttled { !self.ready.go_on() } else { self.ready.cancelled() } {
                return Ok(None);
            }
            let _permit = permits.take();
            let mut compressed = io::BufReader::with_capacity(64 << 10, At { file: &self.read_tar, at: m.offset }).take(m.compressed_len);
            inflate_member(&mut compressed, m, contents, &format!("{}: the {} at offset {}", self.what, m.wrapping.noun(), m.offset))?;
            *inflated += 1;
        }
    }

    /// With the whole tar (`tar` bytes) written: the members left, then the layer's length.
    fn finish(&mut self, tar: u64, inflated: &mut usize, permits: &Permits) -> Result<Option<u64>> {
        let Some(len) = self.inflate_whole(tar, inflated, permits, true)? else { return Ok(None) };
        if let Some(m) = self.members.get(*inflated) {
            return Err(Error::malformed(
                &self.what,
                format!("ends at byte {tar}, before the end of the {} at offset {} the delta lists", m.wrapping.noun(), m.offset),
            ));
        }
        if len > self.limit {
            return Err(too_large(&self.what, self.limit));
        }
        Ok(Some(len))
    }
}

/// Steps of preparing that may run at once (decompressing a piece of a layer, inflating a
/// member): `--jobs` of them, whatever the number of layers.
#[derive(Debug)]
pub struct Permits {
    free: Mutex<usize>,
    changed: Condvar,
}

/// A step's permit, given back when dropped.
struct Permit<'a>(&'a Permits);

impl Permits {
    /// `n` permits (at least one).
    pub fn new(n: usize) -> Self {
        Permits { free: Mutex::new(n.max(1)), changed: Condvar::new() }
    }

    /// Waits for a permit.
    fn take(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        while *free == 0 {
            free = self.changed.wait(free).unwrap_or_else(PoisonError::into_inner);
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.0.changed.notify_one();
    }
}

/// Source layers being prepared on threads of their own (see [`prepare`]).
#[derive(Debug)]
pub struct Preparing<'scope> {
    /// What the preparers run at once returned.
    done: Result<()>,
    threads: Vec<ScopedJoinHandle<'scope, Result<()>>>,
}

impl Preparing<'_> {
    /// Waits for every preparer; the first error, if any.
    pub fn join(self) -> Result<()> {
        let mut first = self.done;
        for t in self.threads {
            let r = t.join().unwrap_or_else(|_| Err(Error::malformed("source layers", "a thread preparing them panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Runs `preparers`, each on a thread of `scope`, with `jobs` [`Permits`] among them. The
/// first `jobs` start at once; the others wait for their first reader.
/// A preparer with nothing to write ([`Preparer::has_work`]) is run at once, on this thread.
pub fn prepare<'scope, 'env: 'scope>(scope: &'scope Scope<'scope, 'env>, preparers: Vec<Preparer<'env>>, jobs: usize) -> Preparing<'scope> {
    let permits = Arc::new(Permits::new(jobs));
    let (busy, idle): (Vec<_>, Vec<_>) = preparers.into_iter().partition(Preparer::has_work);
    // Each runs, whatever another returned: a layer never prepared would keep its readers waiting.
    let done = idle.into_iter().map(|p| p.run(&permits)).fold(Ok(()), Result::and);
    let threads = busy
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            if i < jobs.max(1) {
                p.ready.update(|r| r.wanted = r.wanted.max(1));
            }
            let permits = Arc::clone(&permits);
            scope.spawn(move || p.run(&permits))
        })
        .collect();
    Preparing { done, threads }
}

/// The spans of `members` (in order, not overlapping), each ending at most `limit` bytes
/// into the expanded layer. Whether they lie inside the tar is checked as it is written.
fn spans(members: &[Member], limit: u64, what: &str) -> Result<Vec<Span>> {
    let (mut spans, mut tar_at, mut expanded_at, mut contents) = (Vec::with_capacity(members.len()), 0u64, 0u64, 0u64);
    for m in members {
        let gap = m.offset.checked_sub(tar_at).ok_or_else(|| Error::malformed(what, "members overlap or are out of order"))?;
        let tar_end = m
            .offset
            .checked_add(m.compressed_len)
            .ok_or_else(|| Error::malformed(what, format!("the {} at offset {} ends past any tar", m.wrapping.noun(), m.offset)))?;
        let start = expanded_at + gap;
        spans.push(Span { expanded: start, raw_len: m.raw_len, contents, tar_end });
        expanded_at = start.checked_add(m.raw_len).filter(|e| *e <= limit).ok_or_else(|| too_large(what, limit))?;
        contents += m.raw_len;
        tar_at = tar_end;
    }
    Ok(spans)
}

fn too_large(what: &str, limit: u64) -> Error {
    Error::TooLarge { what: format!("{what} (with its compressed files inflated)"), limit }
}

/// A `Read` of `file` from offset `at` on, by positioned reads.
struct At<'a> {
    file: &'a File,
    at: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::plan::Wrapping;
    use crate::test_bytes::noise;

    /// A gzip member of `data` (flate2, level 6).
    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// `tar` stored in `dir` as a blob compressed with `compression` (gzip or none).
    fn blob(dir: &Path, tar: &[u8], compression: Compression) -> File {
        let bytes = if compression == Compression::Gzip { gz(tar) } else { tar.to_vec() };
        let path = dir.join(format!("blob-{}", crate::digest::Digest::of(&bytes)));
        std::fs::write(&path, bytes).unwrap();
        File::open(path).unwrap()
    }

    /// Source layer `index` of `tar` stored gzip-compressed in `dir`, started.
    fn gzip_layer<'a>(dir: &Path, index: u32, tar: &[u8]) -> (SourceLayer, Preparer<'a>) {
        start_blob(blob(dir, tar, Compression::Gzip), Compression::Gzip, format!("l{index}"), index, dir, u64::MAX, &[]).unwrap()
    }

    /// A "tar" of plain runs and gzip members, the members listed as a delta lists them, and
    /// the expanded bytes a patch reads: `parts` are (bytes, whether it is a member).
    fn layer(parts: &[(Vec<u8>, bool)]) -> (Vec<u8>, Vec<Member>, Vec<u8>) {
        let (mut tar, mut members, mut expanded) = (Vec::new(), Vec::new(), Vec::new());
        for (bytes, member) in parts {
            if *member {
                let z = gz(bytes);
                members.push(Member { offset: tar.len() as u64, compressed_len: z.len() as u64, raw_len: bytes.len() as u64, wrapping: Wrapping::Gzip });
                tar.extend_from_slice(&z);
            } else {
                tar.extend_from_slice(bytes);
            }
            expanded.extend_from_slice(bytes);
        }
        (tar, members, expanded)
    }

    /// Runs `p` to its end on this thread, as if everything were read.
    fn run_whole(v: &SourceLayer, p: Preparer<'_>) -> Result<()> {
        v.want_all();
        p.run(&Permits::new(1))
    }

    fn text(seed: u32, n: usize) -> Vec<u8> {
        (0..n).map(|i| b"abcdefgh \n"[(i as u32 / 7 + seed) as usize % 10]).collect()
    }

    #[test]
    fn every_range_of_the_view_reads_as_the_expanded_tar() {
        // "aaaa" [member -> "XYZXY"] "bb" [empty member] [member -> "Q"] "cc"
        let (tar, members, expanded) = layer(&[
            (b"aaaa".to_vec(), false),
            (b"XYZXY".to_vec(), true),
            (b"bb".to_vec(), false),
            (vec![], true),
            (b"Q".to_vec(), true),
            (b"cc".to_vec(), false),
        ]);
        assert_eq!(expanded, b"aaaaXYZXYbbQcc");
        for compression in [Compression::None, Compression::Gzip] {
            let dir = tempfile::tempdir().unwrap();
            let (v, p) = start_blob(blob(dir.path(), &tar, compression), compression, "l".into(), 0, dir.path(), u64::MAX, &members).unwrap();
            run_whole(&v, p).unwrap();
            assert_eq!(v.prepared_len(), Some(expanded.len() as u64));
            for start in 0..expanded.len() {
                for end in start..=expanded.len() {
                    let mut buf = vec![0; end - start];
                    v.read_at(start as u64, &mut buf).unwrap();
                    assert_eq!(buf, &expanded[start..end], "{compression:?} {start}..{end}");
                }
            }
            assert!(v.read_at(10, &mut [0; 5]).unwrap_err().to_string().contains("outside source layer 0"));
        }
    }

    #[test]
    fn reads_wait_for_the_bytes_they_need_while_the_layer_is_prepared() {
        // Several MiB, so that the preparer publishes many times; members across the steps.
        let mut parts = Vec::new();
        for i in 0..12 {
            parts.push((noise(u64::from(i), 700_000), false));
            parts.push((text(i, 300_000 + i as usize * 1000), true));
        }
        let (tar, members, expanded) = layer(&parts);
        for compression in [Compression::None, Compression::Gzip] {
            let dir = tempfile::tempdir().unwrap();
            let (v, p) = start_blob(blob(dir.path(), &tar, compression), compression, "l".into(), 3, dir.path(), u64::MAX, &members).unwrap();
            std::thread::scope(|scope| {
                let preparing = prepare(scope, vec![p], 1);
                // Forwards, as a patch reads, in odd pieces; then one range near the start.
                let mut got = Vec::new();
                let mut buf = vec![0; 333_333];
                while got.len() < expanded.len() {
                    let n = buf.len().min(expanded.len() - got.len());
                    v.read_at(got.len() as u64, &mut buf[..n]).unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got == expanded, "{compression:?}: the expanded layer differs");
                v.read_at(5, &mut buf[..10]).unwrap();
                assert_eq!(&buf[..10], &expanded[5..15]);
                preparing.join().unwrap();
            });
            assert_eq!(v.prepared_len(), Some(expanded.len() as u64));
        }
    }

    #[test]
    fn a_layer_that_cannot_be_prepared_fails_its_readers_and_its_preparer() {
        let (tar, members, expanded) = layer(&[(noise(1, 3 << 20), false), (text(1, 1000), true), (b"end".to_vec(), false)]);
        // The gzip blob cut short: the decompression fails part way.
        let dir = tempfile::tempdir().unwrap();
        let whole = gz(&tar);
        let path = dir.path().join("cut");
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        let (v, p) = start_blob(File::open(&path).unwrap(), Compression::Gzip, "source layer 2 (cut)".into(), 2, dir.path(), u64::MAX, &members).unwrap();
        std::thread::scope(|scope| {
            let preparing = prepare(scope, vec![p], 1);
            let err = v.read_at(tar.len() as u64 - 2, &mut [0; 2]).unwrap_err().to_string();
            assert!(err.contains("source layer 2, which could not be prepared"), "{err}");
            let err = preparing.join().unwrap_err().to_string();
            assert!(err.contains("source layer 2 (cut)"), "{err}");
        });

        // A member the delta lists past the end of the tar.
        let mut listed = members.clone();
        listed.push(Member { offset: tar.len() as u64 - 1, compressed_len: 5, raw_len: 1, wrapping: Wrapping::Gzip });
        let dir = tempfile::tempdir().unwrap();
        let (v, p) = start_blob(blob(dir.path(), &tar, Compression::None), Compression::None, "l".into(), 0, dir.path(), u64::MAX, &listed).unwrap();
        let err = run_whole(&v, p).unwrap_err().to_string();
        assert!(err.contains(&format!("ends at byte {}, before the end of the gzip member at offset {}", tar.len(), tar.len() - 1)), "{err}");
        assert!(v.read_at(0, &mut [0; 1]).is_ok(), "bytes before the failure stay readable");
        assert!(v.read_at(expanded.len() as u64 - 1, &mut [0; 1]).unwrap_err().to_string().contains("could not be prepared"));

        // Larger than the limit, compressed or expanded.
        let dir = tempfile::tempdir().unwrap();
        let (v, p) = start_blob(blob(dir.path(), &tar, Compression::Gzip), Compression::Gzip, "l".into(), 0, dir.path(), 1 << 20, &[]).unwrap();
        assert!(matches!(run_whole(&v, p).unwrap_err(), Error::TooLarge { limit: 1048576, .. }));
        let dir = tempfile::tempdir().unwrap();
        let (v, p) =
            start_blob(blob(dir.path(), &tar, Compression::None), Compression::None, "l".into(), 0, dir.path(), expanded.len() as u64 - 1, &members).unwrap();
        assert!(matches!(run_whole(&v, p).unwrap_err(), Error::TooLarge { .. }));
    }

    #[test]
    fn a_cancelled_preparer_stops_and_its_readers_fail() {
        let tar = noise(9, 8 << 20);
        let dir = tempfile::tempdir().unwrap();
        let (v, p) = gzip_layer(dir.path(), 4, &tar);
        v.cancel();
        p.run(&Permits::new(1)).unwrap();
        assert_eq!(v.prepared_len(), None, "stopped before the end");
        assert!(v.read_at(tar.len() as u64 - 1, &mut [0; 1]).unwrap_err().to_string().contains("could not be prepared"));
    }

    #[test]
    fn a_plain_tar_with_nothing_to_inflate_is_ready_without_a_thread() {
        let tar = text(3, 100_000);
        let (plain, members, _) = layer(&[(text(4, 5000), false), (text(5, 3000), true)]);
        let dir = tempfile::tempdir().unwrap();
        let (v, p) = start_blob(blob(dir.path(), &tar, Compression::None), Compression::None, "l".into(), 0, dir.path(), u64::MAX, &[]).unwrap();
        assert!(!p.has_work());
        for (compression, listed) in [(Compression::Gzip, &[][..]), (Compression::None, &members[..])] {
            let (_, other) = start_blob(blob(dir.path(), &plain, compression), compression, "m".into(), 1, dir.path(), u64::MAX, listed).unwrap();
            assert!(other.has_work(), "{compression:?}, {} members", listed.len());
        }
        std::thread::scope(|scope| {
            let preparing = prepare(scope, vec![p], 1);
            // Ready when `prepare` returns: it ran here, not on a thread still to be scheduled.
            assert_eq!(v.prepared_len(), Some(tar.len() as u64));
            preparing.join().unwrap();
        });
        let mut buf = [0u8; 10];
        v.read_at(tar.len() as u64 - 10, &mut buf).unwrap();
        assert_eq!(buf, tar[tar.len() - 10..]);
    }

    #[test]
    fn one_thread_prepares_layers_read_back_and_forth() {
        // The rebuild reads layer B while A is unfinished, then A again: with one thread for
        // both, B is prepared after A, never while A waits for readers (which would deadlock).
        let a = text(5, 48 << 20);
        let b = text(6, 3 << 20);
        let dir = tempfile::tempdir().unwrap();
        let (va, pa) = gzip_layer(dir.path(), 0, &a);
        let (vb, pb) = gzip_layer(dir.path(), 1, &b);
        std::thread::scope(|scope| {
            let preparing = prepare(scope, vec![pa, pb], 1);
            let mut buf = [0u8; 10];
            va.read_at(0, &mut buf).unwrap();
            assert_eq!(buf, a[..10]);
            vb.read_at(b.len() as u64 - 10, &mut buf).unwrap();
            assert_eq!(buf, b[b.len() - 10..]);
            va.read_at(a.len() as u64 - 10, &mut buf).unwrap();
            assert_eq!(buf, a[a.len() - 10..]);
            preparing.join().unwrap();
        });
    }

    #[test]
    fn a_preparer_runs_only_so_far_ahead_of_its_readers() {
        let tar = text(3, (PREPARE_AHEAD_BYTES + (16 << 20)) as usize);
        let dir = tempfile::tempdir().unwrap();
        let (v, p) = gzip_layer(dir.path(), 0, &tar);
        std::thread::scope(|scope| {
            let preparing = prepare(scope, vec![p], 1);
            let mut start = [0u8; 10];
            v.read_at(0, &mut start).unwrap();
            assert_eq!(start, tar[..10]);
            let bytes = || v.ready.state.lock().unwrap().bytes;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while bytes() < PREPARE_AHEAD_BYTES && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // Ample time to decompress the 16 MiB left, were it not held back.
            std::thread::sleep(std::time::Duration::from_millis(500));
            assert!(v.prepared_len().is_none() && bytes() <= 10 + PREPARE_AHEAD_BYTES + PREPARE_STEP_BYTES as u64, "ran to {} bytes", bytes());
            // A read further on lets it go on.
            let mut end = [0u8; 10];
            v.read_at(tar.len() as u64 - 10, &mut end).unwrap();
            assert_eq!(end, tar[tar.len() - 10..]);
            v.cancel();
            preparing.join().unwrap();
        });
    }

    #[test]
    fn a_preparer_stops_at_the_extent_the_patches_read_unless_a_read_asks_for_more() {
        let tar = text(5, 12 << 20);
        let dir = tempfile::tempdir().unwrap();
        let (v, p) = gzip_layer(dir.path(), 0, &tar);
        v.read_no_further_than(2 << 20);
        std::thread::scope(|scope| {
            let preparing = prepare(scope, vec![p], 1);
            let mut start = [0u8; 10];
            v.read_at(0, &mut start).unwrap();
            assert_eq!(start, tar[..10]);
            // Ample time to decompress the whole 12 MiB, were it not held back.
            std::thread::sleep(std::time::Duration::from_millis(500));
            let bytes = || v.ready.state.lock().unwrap().bytes;
            assert!(bytes() >= 2 << 20 && bytes() <= (2 << 20) + PREPARE_STEP_BYTES as u64, "ran to {} bytes", bytes());
            // A read past the extent still gets its bytes.
            let mut end = [0u8; 10];
            v.read_at(tar.len() as u64 - 10, &mut end).unwrap();
            assert_eq!(end, tar[tar.len() - 10..]);
            v.cancel();
            preparing.join().unwrap();
        });
    }

    #[test]
    fn a_layer_nobody_reads_is_not_prepared() {
        // With one permit, the first layer may start at once; the second waits for a reader.
        let a = text(7, 1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let (va, pa) = gzip_layer(dir.path(), 0, &a);
        let (vb, pb) = gzip_layer(dir.path(), 1, &a);
        std::thread::scope(|scope| {
            let preparing = prepare(scope, vec![pa, pb], 1);
            let mut buf = [0u8; 10];
            va.read_at(a.len() as u64 - 10, &mut buf).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert_eq!(vb.ready.state.lock().unwrap().bytes, 0, "the layer nobody read was prepared");
            va.cancel();
            vb.cancel();
            preparing.join().unwrap();
        });
    }

    #[test]
    fn members_out_of_order_or_too_large_are_refused() {
        let m = |offset, compressed_len, raw_len| Member { offset, compressed_len, raw_len, wrapping: Wrapping::Gzip };
        assert!(spans(&[m(4, 3, 5), m(6, 1, 1)], u64::MAX, "l").unwrap_err().to_string().contains("out of order"));
        assert!(spans(&[m(u64::MAX - 1, 3, 5)], u64::MAX, "l").unwrap_err().to_string().contains("ends past any tar"));
        assert!(matches!(spans(&[m(0, 3, 61)], 60, "l").unwrap_err(), Error::TooLarge { limit: 60, .. }));
        assert!(spans(&[m(0, 3, 60)], 60, "l").is_ok());
    }
}
