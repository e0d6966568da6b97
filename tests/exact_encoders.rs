//! End to end: blobs written by the real tools at test time are reproduced byte for byte
//! by `fleetdelta::layer::exact`, and fingerprinted back to the right descriptor.
//!
//! Needs Debian's golang-go, golang-github-klauspost-compress-dev,
//! golang-github-klauspost-pgzip-dev, umoci, gzip, pigz and zip, and Go 1.27 (Debian sid's
//! golang-1.27, which `tools/test` installs into a cache and names in
//! `FLEETDELTA_GO127_ROOT`); a missing tool fails the test.

mod common;

use common::random;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use fleetdelta::layer::exact::pgzip::UMOCI_BLOCK_SIZE;
use fleetdelta::layer::exact::{fingerprint, fingerprint_deflate, Descriptor, Encoder, GoRelease, GzipHeader};

/// Runs `cmd` with `input` on stdin; returns stdout, failing loudly if the tool is missing.
fn run(cmd: &mut Command, input: &[u8]) -> Vec<u8> {
    let name = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e} (is the tool installed? see tools/test)"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{name} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The Go generator, built once from tools/exact-gen with Debian's Go and -dev sources.
fn exact_gen() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_exact_gen("exact-gen", Path::new("go"), None))
}

/// The environment variable naming Go 1.27's GOROOT (set by tools/test).
const GO127_ROOT_VAR: &str = "FLEETDELTA_GO127_ROOT";

/// The same generator built with Go 1.27 (its `stdgzip` is Go 1.27's `compress/gzip`).
/// Go 1.27 is not packaged for bookworm: tools/test installs Debian sid's golang-1.27
/// into a cache and passes its GOROOT in `FLEETDELTA_GO127_ROOT`. Without it the tests
/// that need it fail rather than skip.
fn exact_gen_go127() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = std::env::var_os(GO127_ROOT_VAR).unwrap_or_else(|| {
            panic!(
                "{GO127_ROOT_VAR} is not set: run tools/test, which installs Go 1.27 (Debian sid's \
                 golang-1.27-go and golang-1.27-src) into a cache and sets it to that GOROOT"
            )
        });
        let root = PathBuf::from(root);
        let go = root.join("bin/go");
        let version = Command::new(&go)
            .arg("version")
            .env("GOROOT", &root)
            .env("GOTOOLCHAIN", "local")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} ({GO127_ROOT_VAR} must be a Go 1.27 GOROOT; run tools/test)", go.display()));
        let version = String::from_utf8_lossy(&version.stdout);
        assert!(version.starts_with("go version go1.27"), "{GO127_ROOT_VAR} is not Go 1.27: {version}");
        build_exact_gen("exact-gen-go1.27", &go, Some(&root))
    })
}

/// Builds tools/exact-gen with the `go` command given (and its GOROOT, if not the system's).
fn build_exact_gen(name: &str, go: &Path, goroot: Option<&Path>) -> PathBuf {
    // Cargo's per-target scratch directory: reused across runs, so Go's cache is too.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("exact-gen");
    let mut cmd = Command::new(go);
    cmd.args(["build", "-o"])
        .arg(&bin)
        .arg("./tools/exact-gen")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", dir.join("cache"))
        // Never fetch another toolchain: build with exactly this one.
        .env("GOTOOLCHAIN", "local");
    if let Some(root) = goroot {
        cmd.env("GOROOT", root);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e} (install golang-go)", go.display()));
    assert!(
        out.status.success(),
        "building tools/exact-gen with {} failed (install golang-go golang-github-klauspost-compress-dev \
         golang-github-klauspost-pgzip-dev): {}",
        go.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Word soup with a skewed vocabulary: compresses like source text.
fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the ",
        "layer ",
        "delta ",
        "fn ",
        "impl ",
        "return ",
        "{\n",
        "}\n",
        "let ",
        "mut ",
        "self",
        ".",
        ", ",
        "struct ",
        "0x",
        "ff",
        "registry",
        "image ",
        "blob ",
        "=",
        "(",
        ")",
        ";\n    ",
        "// comment about ",
    ];
    let r = random(len, seed);
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0;
    while out.len() < len {
        let k = usize::from(r[i % r.len()]);
        out.extend_from_slice(WORDS[(k * k / 256 * WORDS.len()) / 256].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// A tar of real binaries and libraries (a few MiB), like a container layer.
fn tar_of_binaries(limit: u64) -> Vec<u8> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("/usr/bin").unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut builder = tar::Builder::new(Vec::new());
    let mut total = 0;
    for f in files {
        let Ok(meta) = std::fs::symlink_metadata(&f) else { continue };
        if !meta.is_file() || total + meta.len() > limit {
            continue;
        }
        total += meta.len();
        builder.append_path_with_name(&f, f.strip_prefix("/").unwrap()).unwrap();
    }
    builder.into_inner().unwrap()
}

/// The inputs every encoder is checked on.
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let b = UMOCI_BLOCK_SIZE as usize;
    let mut mixed = text(300_000, 1);
    mixed.extend(random(200_000, 2));
    mixed.extend(vec![0u8; 150_000]);
    mixed.extend(text(400_000, 3));
    vec![
        ("empty", Vec::new()),
        ("one-byte", b"x".to_vec()),
        ("tiny", b"hello hello hello hello hello world\n".to_vec()),
        ("small-text", text(5_000, 4)),
        ("text-3MiB", text(3 << 20, 5)),
        ("random-1MiB", random(1 << 20, 6)),
        ("zeros-1MiB", vec![0u8; 1 << 20]),
        ("exactly-one-block", text(b, 7)),
        ("exactly-two-blocks", text(2 * b, 8)),
        ("two-blocks-plus-one", text(2 * b + 1, 9)),
        ("tail-shorter-than-dict", text(b + 100, 10)),
        ("mixed", mixed),
        ("tar-of-binaries", tar_of_binaries(6 << 20)),
    ]
}

fn check(desc: &Descriptor, input: &[u8], real: &[u8], what: &str) {
    let ours = desc.encode_to_vec(input).unwrap();
    if ours != real {
        let at = ours.iter().zip(real).position(|(a, b)| a != b).unwrap_or(ours.len().min(real.len()));
        panic!("{what}: {desc:?} differs from the real tool at byte {at} (ours {} bytes, real {})", ours.len(), real.len());
    }
}

#[test]
fn pgzip_matches_klauspost_pgzip_1_2_5() {
    for (name, input) in corpus() {
        for block in [UMOCI_BLOCK_SIZE, 1 << 20, 100_000] {
            let real = run(Command::new(exact_gen()).args(["pgzip", &block.to_string()]), &input);
            let desc = Descriptor { encoder: Encoder::Pgzip { block_size: block }, header: GzipHeader::klauspost_default() };
            check(&desc, &input, &real, &format!("{name} block {block}"));
        }
    }
}

#[test]
fn klauspost_gzip_matches_klauspost_compress_1_15_12() {
    for (name, input) in corpus() {
        let real = run(Command::new(exact_gen()).arg("kpgzip"), &input);
        let desc = Descriptor { encoder: Encoder::KlauspostGzip, header: GzipHeader::klauspost_default() };
        check(&desc, &input, &real, name);
    }
}

#[test]
fn go_gzip_matches_go_1_19_compress_gzip() {
    for (name, input) in corpus() {
        let real = run(Command::new(exact_gen()).arg("stdgzip"), &input);
        let desc = Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_19 }, header: GzipHeader::go_stdlib_default() };
        check(&desc, &input, &real, name);
    }
}

#[test]
fn go_gzip_matches_go_1_27_compress_gzip() {
    for (name, input) in corpus() {
        let real = run(Command::new(exact_gen_go127()).arg("stdgzip"), &input);
        let desc = Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_27 }, header: GzipHeader::go_stdlib_default() };
        check(&desc, &input, &real, name);
    }
}

/// Blobs of both Go releases (and klauspost's gzip, the closest relative of Go 1.27's) are
/// fingerprinted to a descriptor that rebuilds them; wherever the three write different
/// bytes, to exactly the encoder that wrote the blob.
#[test]
fn go_releases_and_klauspost_are_fingerprinted_apart() {
    let writers = [
        (exact_gen(), "stdgzip", Encoder::GoGzip { release: GoRelease::Go1_19 }),
        (exact_gen_go127(), "stdgzip", Encoder::GoGzip { release: GoRelease::Go1_27 }),
        (exact_gen(), "kpgzip", Encoder::KlauspostGzip),
    ];
    let mut told_apart = Vec::new();
    for (name, input) in corpus() {
        let blobs: Vec<Vec<u8>> = writers.iter().map(|(gen, mode, _)| run(Command::new(gen).arg(mode), &input)).collect();
        for (i, (_, _, encoder)) in writers.iter().enumerate() {
            let blob = &blobs[i];
            let found = fingerprint(blob, &input).unwrap_or_else(|| panic!("{name}: {encoder:?} blob not fingerprinted"));
            assert_eq!(found.encode_to_vec(&input).unwrap(), *blob, "{name}: {encoder:?} blob -> {found:?}");
            if blobs.iter().enumerate().all(|(j, other)| j == i || other[10..] != blob[10..]) {
                assert_eq!(found.encoder, *encoder, "{name}: fingerprint confused {encoder:?}");
                told_apart.push((name, encoder.clone()));
            }
        }
    }
    // The releases write different bytes on anything but tiny or incompressible input.
    for name in ["small-text", "text-3MiB", "mixed", "tar-of-binaries"] {
        for (_, _, encoder) in &writers {
            assert!(told_apart.contains(&(name, encoder.clone())), "{name}: {encoder:?} not told apart");
        }
    }
}

/// A real umoci layer: `umoci repack` of a bundle holding text, random data and binaries.
#[test]
fn umoci_layers_are_reproduced_and_fingerprinted() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let bundle = dir.path().join("bundle");
    let umoci = |args: &[&str]| {
        let out = Command::new("umoci").args(args).output().unwrap_or_else(|e| panic!("cannot run umoci: {e} (install Debian's umoci)"));
        assert!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let image = format!("{}:t", layout.display());
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--rootless", "--image", &image, bundle.to_str().unwrap()]);
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    std::fs::write(rootfs.join("data/text"), text(2 << 20, 11)).unwrap();
    std::fs::write(rootfs.join("data/random"), random(700_000, 12)).unwrap();
    std::fs::write(rootfs.join("data/binaries.tar"), tar_of_binaries(3 << 20)).unwrap();
    umoci(&["repack", "--image", &image, bundle.to_str().unwrap()]);

    let mut layers = 0;
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let blob = std::fs::read(entry.unwrap().path()).unwrap();
        if !blob.starts_with(&[0x1f, 0x8b]) {
            continue;
        }
        layers += 1;
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut tar).unwrap();
        let desc = Descriptor { encoder: Encoder::Pgzip { block_size: UMOCI_BLOCK_SIZE }, header: GzipHeader::klauspost_default() };
        check(&desc, &tar, &blob, "umoci layer");
        assert_eq!(fingerprint(&blob, &tar), Some(desc));
    }
    assert_eq!(layers, 1, "expected the one layer umoci repack writes");
}

/// Writes a gzip member with the system zlib (Python's `zlib` module, linked to Debian's
/// zlib1g): `python3 -c ZLIB_PY LEVEL zlib|python-gzip`.
const ZLIB_PY: &str = concat!(
    "import sys, zlib, gzip\n",
    "level, mode = int(sys.argv[1]), sys.argv[2]\n",
    "data = sys.stdin.buffer.read()\n",
    "c = zlib.compressobj(level, zlib.DEFLATED, 31)\n",
    "raw = b''.join(c.compress(data[i:i + 65536]) for i in range(0, len(data), 65536)) + c.flush()\n",
    "out = raw if mode == 'zlib' else gzip.compress(data, compresslevel=level, mtime=1700000000)\n",
    "sys.stdout.buffer.write(out)\n",
);

/// zlib 1.2.13 as Debian's Python links it: raw zlib gzip members at every level, and
/// Python's own gzip writer (its header, zlib's deflate).
#[test]
fn zlib_matches_system_zlib_1_2_13_at_every_level() {
    for (name, input) in corpus() {
        for level in 1..=9u8 {
            // Every level on the small inputs; the big ones (slow in debug builds) at one
            // level of each matcher: 1 (deflate_fast) and 9 (deflate_slow, longest chains).
            let big = input.len() > (1 << 20) + 1;
            if big && ![1, 9].contains(&level) {
                continue;
            }
            let modes: &[&str] = if !big && [1, 6, 9].contains(&level) { &["zlib", "python-gzip"] } else { &["zlib"] };
            for &mode in modes {
                let real = run(Command::new("/usr/bin/python3").args(["-c", ZLIB_PY, &level.to_string(), mode]), &input);
                let (header, _) = GzipHeader::parse(&real).unwrap();
                let desc = Descriptor { encoder: Encoder::Zlib { level }, header };
                check(&desc, &input, &real, &format!("{name} {mode} -{level}"));
            }
        }
    }
}

/// GNU gzip 1.12 (Debian's `gzip`) at every level, as `gzip -Nn` writes a file: the
/// header (no name, no time, OS 3, XFL by level) and the deflate stream. The big inputs
/// (where gzip's block boundaries part from zlib's) at the levels Debian and users pick.
#[test]
fn gnu_gzip_matches_gzip_1_12_at_every_level() {
    let version = run(Command::new("gzip").arg("--version"), &[]);
    assert!(version.starts_with(b"gzip 1.12"), "expected Debian bookworm's gzip 1.12: {}", String::from_utf8_lossy(&version));
    for (name, input) in corpus() {
        for level in 1..=9u8 {
            if input.len() > (1 << 20) + 1 && ![1, 6, 9].contains(&level) {
                continue;
            }
            let real = run(Command::new("gzip").arg(format!("-{level}n")).arg("-c"), &input);
            let (header, _) = GzipHeader::parse(&real).unwrap();
            let desc = Descriptor { encoder: Encoder::GnuGzip { level }, header };
            check(&desc, &input, &real, &format!("{name} gzip -{level}n"));
            // Small inputs can give zlib's bytes too; the fingerprint finds an encoder that
            // reproduces the blob either way.
            let found = fingerprint(&real, &input).unwrap_or_else(|| panic!("{name} gzip -{level}n not fingerprinted"));
            assert_eq!(found.encode_to_vec(&input).unwrap(), real, "{name} gzip -{level}n");
        }
    }
    // The end of the input, where gzip's window (read whole, slid whole, two bytes zeroed
    // past the data) differs from zlib's: text then a tar's trailing zeros, ending at many
    // places relative to the 64 KiB window.
    for len in [65_536usize * 5 - 1352, 65_536 * 5, 65_536 * 5 + 7, 65_536 * 6 - 300, 100_000, 5_445_632 % 65_536 + 65_536 * 4] {
        let mut input = text(len.saturating_sub(1352), 21);
        input.resize(len, 0);
        for level in [6u8, 9] {
            let real = run(Command::new("gzip").arg(format!("-{level}n")).arg("-c"), &input);
            let (header, _) = GzipHeader::parse(&real).unwrap();
            check(&Descriptor { encoder: Encoder::GnuGzip { level }, header }, &input, &real, &format!("text + zeros, {len} bytes, gzip -{level}n"));
        }
    }
}

/// Writes a zip with Python's `zipfile` (the system zlib: what wheels are, and what Java's
/// `jar` writes too, on the same zlib): `python3 -c ZIPFILE_PY LEVEL OUT FILE...`.
const ZIPFILE_PY: &str = concat!(
    "import sys, zipfile\n",
    "level, out, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]\n",
    "with zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED, compresslevel=level) as z:\n",
    "    for f in files:\n",
    "        z.write(f, f.rsplit('/', 1)[-1])\n",
);

/// The deflated entries of the zip file `path`: (name, compressed bytes).
fn deflated_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let data = std::fs::read(path).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&data[..])).unwrap();
    let mut out = Vec::new();
    for i in 0..archive.len() {
        let f = archive.by_index_raw(i).unwrap();
        if f.compression() == zip::CompressionMethod::DEFLATE {
            let start = f.data_start().unwrap() as usize;
            out.push((f.name().unwrap().to_string(), data[start..start + f.compressed_size() as usize].to_vec()));
        }
    }
    out
}

/// Zip entries as Python's `zipfile` (wheels; zlib, like Java's `jar`) and Info-ZIP's `zip`
/// (gzip's deflate) write them, at the default level and the extremes: every deflated entry
/// is fingerprinted to an encoder that writes its bytes exactly.
#[test]
fn zip_entries_by_real_zip_writers_are_reproduced() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, input) in corpus() {
        let path = dir.path().join(name);
        std::fs::write(&path, &input).unwrap();
        files.push((name, path, input));
    }
    let paths: Vec<&Path> = files.iter().map(|(_, p, _)| p.as_path()).collect();
    for level in [6u8, 9, 1] {
        let by_python = dir.path().join(format!("python-{level}.zip"));
        run(Command::new("/usr/bin/python3").args(["-c", ZIPFILE_PY, &level.to_string()]).arg(&by_python).args(&paths), &[]);
        let by_info_zip = dir.path().join(format!("info-zip-{level}.zip"));
        run(Command::new("zip").current_dir(dir.path()).args(["-q", "-X", "-D", &format!("-{level}")]).arg(&by_info_zip).args(files.iter().map(|f| f.0)), &[]);
        for zip in [by_python, by_info_zip] {
            let entries = deflated_entries(&zip);
            assert!(entries.len() >= 8, "{}: {} deflated entries", zip.display(), entries.len());
            let mut hint = None;
            for (name, data) in entries {
                let (_, _, input) = files.iter().find(|f| f.0 == name).unwrap();
                let what = format!("{name} in {}", zip.file_name().unwrap().to_string_lossy());
                let found = fingerprint_deflate(&data, input, hint.as_ref()).unwrap_or_else(|| panic!("{what}: no encoder reproduces it"));
                assert_eq!(found.deflate_to_vec(input).unwrap(), data, "{what}: {found:?}");
                hint = Some(found);
            }
        }
    }
}

/// pigz is a zlib-family encoder we do not reproduce: the fingerprint must say so rather
/// than misidentify it.
#[test]
fn pigz_blobs_are_not_misidentified() {
    for (name, input) in corpus() {
        for level in ["-9n", "-6n"] {
            let real = run(Command::new("pigz").arg(level).arg("-c"), &input);
            if let Some(found) = fingerprint(&real, &input) {
                // Tiny inputs can coincide with another encoder's bytes; that is a correct answer.
                assert_eq!(found.encode_to_vec(&input).unwrap(), real, "{name} pigz {level}");
            }
        }
    }
}

/// Throughput of our ports beside the originals (Go programs, C zlib) on the same input. Not part of the
/// suite (it takes minutes); run it with a ~100 MB tar:
/// `FLEETDELTA_EXACT_BENCH=/tmp/usrlib.tar cargo test --release --test exact_encoders -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: needs FLEETDELTA_EXACT_BENCH=<tar> and a release build"]
fn throughput_against_the_originals() {
    let path = std::env::var("FLEETDELTA_EXACT_BENCH").expect("set FLEETDELTA_EXACT_BENCH to a tar file");
    let input = std::fs::read(&path).unwrap();
    let mb = input.len() as f64 / 1e6;
    let cases: [(&str, Vec<String>, Descriptor); 6] = [
        (
            "pgzip 256 KiB (umoci)",
            vec![exact_gen().display().to_string(), "pgzip".into(), "262144".into()],
            Descriptor { encoder: Encoder::Pgzip { block_size: UMOCI_BLOCK_SIZE }, header: GzipHeader::klauspost_default() },
        ),
        (
            "klauspost gzip",
            vec![exact_gen().display().to_string(), "kpgzip".into()],
            Descriptor { encoder: Encoder::KlauspostGzip, header: GzipHeader::klauspost_default() },
        ),
        (
            "Go 1.19 gzip",
            vec![exact_gen().display().to_string(), "stdgzip".into()],
            Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_19 }, header: GzipHeader::go_stdlib_default() },
        ),
        (
            "Go 1.27 gzip",
            vec![exact_gen_go127().display().to_string(), "stdgzip".into()],
            Descriptor { encoder: Encoder::GoGzip { release: GoRelease::Go1_27 }, header: GzipHeader::go_stdlib_default() },
        ),
        (
            "zlib -6 (C via python3)",
            vec!["/usr/bin/python3".into(), "-c".into(), ZLIB_PY.into(), "6".into(), "zlib".into()],
            Descriptor { encoder: Encoder::Zlib { level: 6 }, header: GzipHeader::plain(0, 0, 3) },
        ),
        (
            "zlib -9 (C via python3)",
            vec!["/usr/bin/python3".into(), "-c".into(), ZLIB_PY.into(), "9".into(), "zlib".into()],
            Descriptor { encoder: Encoder::Zlib { level: 9 }, header: GzipHeader::plain(0, 2, 3) },
        ),
    ];
    for (name, args, desc) in cases {
        let start = std::time::Instant::now();
        let real = run(Command::new(&args[0]).args(&args[1..]), &input);
        let reference = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let ours = desc.encode_to_vec(&input).unwrap();
        let rust = start.elapsed().as_secs_f64();
        assert!(ours == real, "{name}: output differs");
        println!("{name:24} {mb:.1} MB: original {reference:.2}s ({:.0} MB/s), port {rust:.2}s ({:.0} MB/s)", mb / reference, mb / rust);
    }
}
