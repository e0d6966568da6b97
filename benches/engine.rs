//! Diff and apply throughput, in bytes of the target's uncompressed layers per second.
//!
//! Two inputs: a synthetic two-layer image (~8 MiB of text-like and code-like files,
//! generated deterministically, gzip layers) against a target where ~5% of the files are
//! edited and a few are added or removed; and the committed `corpus/sample` pair.
//! Each measured call is the whole operation, from the OCI layouts on disk to the written
//! delta or rebuilt image (unpacking, matching, encoding, packaging, verifying).
//!
//! A third group measures the gzip encoders on the synthetic target's tar: the applier's
//! exact re-encoders (one per encoder family it reproduces, and GNU gzip -9 as Debian's
//! packages compress their changelogs) beside flate2's fast level, which
//! is what `--fidelity content` recompression uses. The synthetic layers are written by the
//! Go 1.19 encoder port, as docker would, so the engine groups rebuild them bit for bit.
//!
//! A fourth group measures the aligner of approximate matches (`diff::approximate::align`, a
//! suffix array of the partner and bsdiff's scan) on an 8 MiB code-like file against a
//! version where code moved (insertions and deletions) and a tenth of the immediates changed.
//!
//! A fifth group measures the AArch64 code view (`layer::aarch64_code`) both ways, as the
//! applier reads a source executable's code and writes a target's, on 8 MiB of code-like
//! words (one in eight a `BL`, one in eight an `ADRP`).
//!
//! A sixth group measures the x86-64 code view (`layer::x86_64_code`) both ways, as the differ
//! sees a target executable's code and the applier writes it back, on 8 MiB of instructions
//! (two in seven with a 32-bit reference) through an address map of 4096 segments.
//!
//! `cargo bench --bench engine` (a few minutes on 2 cores).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use fleetdelta::diff::Fidelity;
use fleetdelta::image::manifest::{BlobRef, OCI_CONFIG, OCI_MANIFEST};
use fleetdelta::image::{Layout, LayoutWriter};
use fleetdelta::layer::exact::{Descriptor, Encoder, GoRelease, GzipHeader};
use fleetdelta::layer::Compression;
use fleetdelta::{apply, diff, ApplyOptions, DiffOptions, Digest, ImageRef, LayerOutput, Level, Silent};
use serde_json::json;
use tempfile::TempDir;

/// Path -> contents of one layer.
type Tree = BTreeMap<String, Vec<u8>>;

/// A small xorshift generator: the synthetic images must be identical on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: [&[u8]; 24] = [
    b"alpha ",
    b"beta ",
    b"gamma ",
    b"delta\n",
    b"fleet ",
    b"image ",
    b"layer ",
    b"0x1f ",
    b"return ",
    b"{}\n",
    b"config ",
    b"zeta ",
    b"import ",
    b"def ",
    b"self.",
    b"    ",
    b"if (",
    b") {\n",
    b"None",
    b"true",
    b"  \"name\": ",
    b"\"value\",\n",
    b"#include ",
    b"//",
];

/// Text-like contents: source code, configuration, documentation.
fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let w = rng.below(WORDS.len() as u64) as usize;
        out.extend_from_slice(WORDS[w]);
        if rng.below(16) == 0 {
            out.extend_from_slice(format!("{:x}", rng.next() & 0xffff).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Code-like binary contents: instructions drawn from a small per-file vocabulary, with
/// random immediates, so it compresses about as well as machine code does (~2x).
fn binary(rng: &mut Rng, len: usize) -> Vec<u8> {
    let vocabulary: Vec<[u8; 4]> = (0..96).map(|_| (rng.next() as u32).to_le_bytes()).collect();
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&vocabulary[rng.below(vocabulary.len() as u64) as usize]);
        if rng.below(3) == 0 {
            out.extend_from_slice(&(rng.next() as u32).to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A layer of `files` files totalling about `bytes`, sizes skewed toward small files as in
/// real root file systems.
fn synthetic_layer(rng: &mut Rng, prefix: &str, files: usize, bytes: usize) -> Tree {
    let mean = bytes / files;
    (0..files)
        .map(|i| {
            let len = match rng.below(10) {
                0..=5 => rng.below(mean as u64 / 2 + 1) as usize,
                6..=8 => mean / 2 + rng.below(mean as u64) as usize,
                _ => mean * 2 + rng.below(mean as u64 * 2) as usize,
            };
            if rng.below(2) == 0 {
                (format!("{prefix}/dir{}/file{i}.txt", i % 17), text(rng, len))
            } else {
                (format!("{prefix}/lib{}/file{i}.so", i % 13), binary(rng, len))
            }
        })
        .collect()
}

/// The target's version of a layer: about 5% of the files edited in place (insertions,
/// deletions, overwrites), 1% removed and 1% new.
fn evolve(rng: &mut Rng, layer: &Tree, prefix: &str) -> Tree {
    let mut out = Tree::new();
    for (path, data) in layer {
        match rng.below(100) {
            0 => {}
            1..=5 if !data.is_empty() => {
                let mut data = data.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(data.len() as u64 + 1) as usize;
                    let n = 1 + rng.below(200) as usize;
                    match rng.below(3) {
                        0 => drop(data.splice(at..at, text(rng, n))),
                        1 => drop(data.drain(at..(at + n).min(data.len()))),
                        _ => {
                            let end = (at + n).min(data.len());
                            let patch = binary(rng, end - at);
                            data[at..end].copy_from_slice(&patch);
                        }
                    }
                }
                out.insert(path.clone(), data);
            }
            _ => {
                out.insert(path.clone(), data.clone());
            }
        }
    }
    for i in 0..layer.len() / 100 {
        let len = 1 + rng.below(40 << 10) as usize;
        out.insert(format!("{prefix}/new/file{i}.bin"), binary(rng, len));
    }
    out
}

fn layer_tar(tree: &Tree) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in tree {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, &data[..]).expect("tar in memory");
    }
    b.into_inner().expect("tar in memory")
}

/// Go 1.19's `compress/gzip` at its default level, as docker writes layers.
fn go_gzip() -> Descriptor {
    Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_19 }, header: GzipHeader::go_stdlib_default() }
}

/// Writes an image of the given layer tars, gzip-compressed, as the `latest` tag of `dir`.
fn write_image(dir: &Path, layers: &[Vec<u8>]) {
    let w = LayoutWriter::create(dir).unwrap();
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let (d, n) = w.put_blob(&go_gzip().encode_to_vec(tar).unwrap()).unwrap();
        descriptors.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n}));
        diff_ids.push(Digest::of(tar).to_string());
    }
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap();
    let (cd, cn) = w.put_blob(&config).unwrap();
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd.to_string(), "size": cn}, "layers": descriptors}))
    .unwrap();
    let (md, mn) = w.put_blob(&manifest).unwrap();
    w.commit(&BlobRef { media_type: OCI_MANIFEST.into(), digest: md, size: mn }, "latest").unwrap();
}

fn oci(dir: &Path) -> ImageRef {
    ImageRef::parse(&format!("oci:{}", dir.display())).unwrap()
}

/// Total uncompressed size of an image's layers: the throughput unit.
fn uncompressed_layer_bytes(dir: &Path) -> u64 {
    let layout = Layout::open(dir).unwrap();
    let image = layout.load_image(None).unwrap();
    image
        .layers
        .iter()
        .map(|l| {
            let blob = std::fs::File::open(layout.blob_path(&l.blob.digest)).unwrap();
            std::io::copy(&mut l.compression.decoder(blob).unwrap(), &mut std::io::sink()).unwrap()
        })
        .sum()
}

/// A source/target pair on disk with a delta between them, made once per input.
struct Pair {
    work: TempDir,
    source: PathBuf,
    target: PathBuf,
    delta: PathBuf,
    /// The same delta at `--fidelity content`: layers recompressed by flate2, not re-encoded.
    content_delta: PathBuf,
    target_bytes: u64,
}

impl Pair {
    fn new(name: &str, work: TempDir, source: PathBuf, target: PathBuf) -> Pair {
        let delta = work.path().join("delta");
        let report = diff(&oci(&source), &oci(&target), &oci(&delta), &DiffOptions::default(), &Silent).unwrap();
        let content_delta = work.path().join("delta-content");
        let content_options = DiffOptions { fidelity: Fidelity::Content, ..DiffOptions::default() };
        diff(&oci(&source), &oci(&target), &oci(&content_delta), &content_options, &Silent).unwrap();
        let target_bytes = uncompressed_layer_bytes(&target);
        eprintln!(
            "{name}: target layers {:.2} MiB uncompressed; delta {} bytes, full pull {} bytes ({:.1}%)",
            target_bytes as f64 / (1 << 20) as f64,
            report.delta_bytes,
            report.full_pull_bytes,
            100.0 * report.delta_bytes as f64 / report.full_pull_bytes as f64
        );
        Pair { work, source, target, delta, content_delta, target_bytes }
    }

    /// A new empty directory for one measured call's output, removed (untimed) afterwards.
    fn output_dir(&self) -> TempDir {
        tempfile::Builder::new().prefix("out-").tempdir_in(self.work.path()).unwrap()
    }
}

fn synthetic() -> Pair {
    let work = tempfile::Builder::new().prefix("fleetdelta-bench-").tempdir().unwrap();
    let mut rng = Rng::new(2024);
    let base = synthetic_layer(&mut rng, "usr", 600, 6 << 20);
    let app = synthetic_layer(&mut rng, "app", 300, 7 << 19);
    let (base2, app2) = (evolve(&mut rng, &base, "usr"), evolve(&mut rng, &app, "app"));
    let (source, target) = (work.path().join("v1"), work.path().join("v2"));
    write_image(&source, &[layer_tar(&base), layer_tar(&app)]);
    write_image(&target, &[layer_tar(&base2), layer_tar(&app2)]);
    Pair::new("synthetic", work, source, target)
}

fn sample() -> Pair {
    let work = tempfile::Builder::new().prefix("fleetdelta-bench-").tempdir().unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sample");
    Pair::new("sample", work, corpus.join("v1"), corpus.join("v2"))
}

/// Whole operations take from milliseconds to seconds: few samples, one call each.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>, bytes: u64) {
    group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Bytes(bytes));
}

fn bench_diff(c: &mut Criterion, name: &str, pair: &Pair, levels: &[Level]) {
    let mut group = c.benchmark_group(format!("diff/{name}"));
    configure(&mut group, pair.target_bytes);
    for level in levels {
        let options = DiffOptions { level: *level, ..DiffOptions::default() };
        group.bench_function(level.name(), |b| {
            b.iter_batched(
                || pair.output_dir(),
                |out| {
                    diff(&oci(&pair.source), &oci(&pair.target), &oci(out.path()), &options, &Silent).unwrap();
                    out
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn bench_apply(c: &mut Criterion, name: &str, pair: &Pair) {
    let mut group = c.benchmark_group(format!("apply/{name}"));
    configure(&mut group, pair.target_bytes);
    // The exact rebuild (blobs byte for byte), the content one, and the rebuild loop alone
    // (plain tar layers out, nothing compressed).
    let uncompressed = ApplyOptions { layers: LayerOutput::Uncompressed, ..ApplyOptions::default() };
    for (variant, delta, options) in [
        ("default", &pair.delta, ApplyOptions::default()),
        ("content", &pair.content_delta, ApplyOptions::default()),
        ("uncompressed", &pair.delta, uncompressed),
    ] {
        group.bench_function(variant, |b| {
            b.iter_batched(
                || pair.output_dir(),
                |out| {
                    apply(&oci(&pair.source), &oci(delta), &oci(out.path()), &options, &Silent).unwrap();
                    out
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// The uncompressed tar of the target's last layer.
fn last_layer_tar(dir: &Path) -> Vec<u8> {
    let layout = Layout::open(dir).unwrap();
    let image = layout.load_image(None).unwrap();
    let layer = image.layers.last().unwrap();
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut layer.compression.decoder(std::fs::File::open(layout.blob_path(&layer.blob.digest)).unwrap()).unwrap(), &mut tar).unwrap();
    tar
}

fn bench_encoders(c: &mut Criterion, pair: &Pair) {
    let tar = last_layer_tar(&pair.target);
    let mut group = c.benchmark_group("encode");
    configure(&mut group, tar.len() as u64);
    group.bench_function("flate2-fast", |b| {
        b.iter(|| {
            let mut e = Compression::Gzip.encoder(Vec::with_capacity(tar.len() / 2)).unwrap();
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        })
    });
    let encoders = [
        ("pgzip-256k", Encoder::Pgzip { block_size: 256 << 10 }, GzipHeader::klauspost_default()),
        ("klauspost-gzip", Encoder::KlauspostGzip, GzipHeader::klauspost_default()),
        ("go1.19-gzip", Encoder::GoGzip { release: GoRelease::Go1_19 }, GzipHeader::go_stdlib_default()),
        ("go1.27-gzip", Encoder::GoGzip { release: GoRelease::Go1_27 }, GzipHeader::go_stdlib_default()),
        ("zlib-6", Encoder::Zlib { level: 6 }, GzipHeader::plain(0, 0, 3)),
        // What Debian packages' gzip files (changelogs, man pages) are rebuilt with.
        ("gnu-gzip-9", Encoder::GnuGzip { level: 9 }, GzipHeader::plain(0, 2, 3)),
    ];
    for (name, encoder, header) in encoders {
        let descriptor = Descriptor { encoder, header };
        group.bench_function(name, |b| b.iter(|| descriptor.encode_to_vec(&tar).unwrap()));
    }
    group.finish();
}

/// An executable-like pair for the aligner: `binary` contents, then a new version with a few
/// hundred insertions and deletions (code that moved) and every tenth 4-byte word changed in
/// its low byte (addresses that moved with it).
fn moved_code(rng: &mut Rng, len: usize) -> (Vec<u8>, Vec<u8>) {
    let old = binary(rng, len);
    let mut new = Vec::with_capacity(len + len / 64);
    let mut at = 0;
    while at < old.len() {
        let run = (1 + rng.below(64 << 10) as usize).min(old.len() - at);
        new.extend_from_slice(&old[at..at + run]);
        at += run;
        match rng.below(3) {
            0 => {
                let len = 1 + rng.below(512) as usize;
                new.extend_from_slice(&binary(rng, len));
            }
            1 => at += rng.below(256) as usize,
            _ => {}
        }
    }
    for word in new.chunks_mut(40) {
        word[0] = word[0].wrapping_add(8);
    }
    (old, new)
}

fn bench_align(c: &mut Criterion) {
    let (old, new) = moved_code(&mut Rng::new(20), 8 << 20);
    let mut group = c.benchmark_group("align");
    configure(&mut group, new.len() as u64);
    group.bench_function("moved-code-8MiB", |b| b.iter(|| diff::approximate::align(&old, &new).unwrap()));
    group.finish();
}

fn bench_aarch64_code(c: &mut Criterion) {
    use fleetdelta::layer::aarch64_code::{AbsoluteReader, RelativeWriter};
    use std::io::Read;
    let mut rng = Rng::new(21);
    let code: Vec<u8> = (0..(8 << 20) / 4)
        .flat_map(|i| {
            let r = rng.next() as u32;
            match i % 8 {
                1 => 0x9400_0000 | (r & 0x03ff_ffff),
                5 => 0x9000_0000 | (r & 0x60ff_ffe0),
                _ => r,
            }
            .to_le_bytes()
        })
        .collect();
    let mut group = c.benchmark_group("aarch64-code");
    configure(&mut group, code.len() as u64);
    group.bench_function("read-absolute-8MiB", |b| {
        b.iter(|| {
            let mut seen = Vec::with_capacity(code.len());
            AbsoluteReader::new(&code[..]).read_to_end(&mut seen).unwrap();
            seen
        })
    });
    group.bench_function("write-relative-8MiB", |b| {
        b.iter(|| {
            let (mut w, mut out) = (RelativeWriter::default(), Vec::with_capacity(code.len()));
            for piece in code.chunks(256 << 10) {
                w.write(piece, &mut out).unwrap();
            }
            w.finish(&mut out).unwrap();
            out
        })
    });
    group.finish();
}

fn bench_x86_64_code(c: &mut Criterion) {
    use fleetdelta::format::address_map::{Projection, Segment};
    use fleetdelta::layer::x86_64_code::{Converter, Direction};
    // Instructions as compilers emit them: register moves, calls, RIP-relative loads,
    // immediates, conditional branches, returns; addresses moved by a map of 4096 segments.
    let mut rng = Rng::new(22);
    let mut code = Vec::with_capacity(8 << 20);
    while code.len() < 8 << 20 {
        let r = rng.next();
        let v = (r >> 32) as u32 & 0x00ff_ffff;
        match r % 7 {
            0 => code.extend([0x48, 0x89, 0xc7]),
            1 => code.extend([&[0xe8][..], &v.to_le_bytes()].concat()),
            2 => code.extend([&[0x48, 0x8b, 0x05][..], &v.to_le_bytes()].concat()),
            3 => code.extend([0x48, 0x83, 0xc0, v as u8]),
            4 => code.extend([&[0x0f, 0x85][..], &v.to_le_bytes()].concat()),
            5 => code.push(0xc3),
            _ => code.extend([0x0f, 0x1f, 0x40, 0x00]),
        }
    }
    let segments: Vec<Segment> =
        (0..4096u32).map(|k| Segment { new: 0x40_0000 + k * 0x1000, old: 0x40_0000 + k * 0x1000 - (k % 64) * 16, len: 0x1000 - 1024 }).collect();
    let projection = Projection::new(&segments);
    let mut group = c.benchmark_group("x86-64-code");
    configure(&mut group, code.len() as u64);
    for (name, direction) in [("see-8MiB", Direction::ToOld), ("write-back-8MiB", Direction::ToNew)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let (mut w, mut out) = (Converter::code(projection.clone(), 0x40_0000, direction), Vec::with_capacity(code.len()));
                for piece in code.chunks(256 << 10) {
                    w.write(piece, &mut out).unwrap();
                }
                w.finish(&mut out).unwrap();
                out
            })
        });
    }
    group.finish();
}

fn engine(c: &mut Criterion) {
    bench_align(c);
    bench_aarch64_code(c);
    bench_x86_64_code(c);
    let pair = synthetic();
    bench_diff(c, "synthetic", &pair, &[Level::Fast, Level::Default]);
    bench_apply(c, "synthetic", &pair);
    bench_encoders(c, &pair);
    let pair = sample();
    bench_diff(c, "sample", &pair, &[Level::Default]);
    bench_apply(c, "sample", &pair);
}

criterion_group!(benches, engine);
criterion_main!(benches);
