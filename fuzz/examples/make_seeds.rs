//! Regenerates the seed corpus under `fuzz/seeds/` from the library itself:
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`.

use std::fs;
use std::path::Path;

use fleetdelta::layer::corrected::encode;
use fleetdelta_fuzz::corrections::{analysed, case, prefix, raw_input, TARGET_LAYER};
use fleetdelta_fuzz::{layer_tar, pseudo_random, BoxResult, Fixture};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> BoxResult<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)?;
    println!("{} ({} bytes)", dir.join(name).display(), bytes.len());
    Ok(())
}

/// A tar with one entry of every kind the indexer tells apart, plus a GNU long name.
fn mixed_tar() -> BoxResult<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "etc/", std::io::empty())?;
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o644);
    file.set_size(11);
    b.append_data(&mut file, "etc/hostname", &b"fleetdelta\n"[..])?;
    let long = format!("usr/share/{}/README", "long-directory-name".repeat(8));
    file.set_size(5);
    b.append_data(&mut file, &long, &b"hello"[..])?;
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    b.append_link(&mut link, "etc/localtime", "/usr/share/zoneinfo/UTC")?;
    let mut hard = tar::Header::new_gnu();
    hard.set_entry_type(tar::EntryType::Link);
    hard.set_size(0);
    b.append_link(&mut hard, "etc/hostname.bak", "etc/hostname")?;
    let mut fifo = tar::Header::new_gnu();
    fifo.set_entry_type(tar::EntryType::Fifo);
    fifo.set_size(0);
    b.append_data(&mut fifo, "run/fifo", std::io::empty())?;
    Ok(b.into_inner()?)
}

fn main() -> BoxResult<()> {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");

    // A difference chunk: mostly zeros with a few changed bytes, as approximate matches give.
    let differences: Vec<u8> = (0..4000u32).map(|i| if i % 97 < 2 { (i / 97) as u8 } else { 0 }).collect();
    let stream = fleetdelta::format::lzma::compress(&differences, fleetdelta::format::lzma::Effort::Strong)?;
    let mut chunk = (differences.len() as u16).to_le_bytes().to_vec();
    chunk.extend_from_slice(&stream);
    write(&seeds.join("difference_chunk"), "differences", &chunk)?;
    let mut with_differences = Vec::new();
    let header = fleetdelta::format::records::PatchHeader { target_layer: 0, tar_len: differences.len() as u64 + 1 };
    let mut w = fleetdelta::format::records::RecordWriter::new(&mut with_differences, header)?;
    w.write(&fleetdelta::format::records::Record::Differences { raw_len: differences.len() as u64, frame: stream })?;
    w.write(&fleetdelta::format::records::Record::AddDifferences(fleetdelta::format::records::SourceRange { layer: 0, offset: 0, len: differences.len() as u64 }))?;
    w.write(&fleetdelta::format::records::Record::Copy(fleetdelta::format::records::SourceRange { layer: 0, offset: 0, len: 1 }))?;
    w.write(&fleetdelta::format::records::Record::End)?;
    write(&seeds.join("patch_records"), "differences.patch", &with_differences)?;

    let fixture = Fixture::build()?;

    write(&seeds.join("patch_records"), "fixture.patch", &fixture.records)?;
    let mut tiny = Vec::new();
    let header = fleetdelta::format::records::PatchHeader { target_layer: 0, tar_len: 5 };
    let mut w = fleetdelta::format::records::RecordWriter::new(&mut tiny, header)?;
    use fleetdelta::format::records::{Record, SourceRange};
    w.write(&Record::Copy(SourceRange { layer: 0, offset: 512, len: 2 }))?;
    w.write(&Record::Chunk { prefix: vec![SourceRange { layer: 1, offset: 0, len: 16 }], raw_len: 3, frame: zstd::bulk::compress(b"abc", 1)? })?;
    w.write(&Record::Literal(3))?;
    w.write(&Record::End)?;
    write(&seeds.join("patch_records"), "tiny.patch", &tiny)?;


    let mut records = vec![0u8];
    records.extend_from_slice(&fixture.records);
    write(&seeds.join("delta_image"), "records", &records)?;
    let mut payload = vec![1u8];
    payload.extend_from_slice(&fixture.payload);
    write(&seeds.join("delta_image"), "payload", &payload)?;

    write(&seeds.join("tar_index"), "files.tar", &layer_tar(&[("a.txt", pseudo_random(1, 100, true)), ("bin/b", pseudo_random(2, 700, false))])?)?;
    write(&seeds.join("tar_index"), "mixed.tar", &mixed_tar()?)?;

    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/sample/v1");
    let image = fleetdelta::image::Layout::open(&sample)?.load_image(None)?;
    let mut pair = image.manifest.raw.clone();
    pair.push(0);
    pair.extend_from_slice(&image.config.raw);
    write(&seeds.join("manifest"), "oci-sample", &pair)?;
    let docker = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","size":2},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","size":5}]}"#;
    let mut pair = docker.to_vec();
    pair.push(0);
    pair.extend_from_slice(br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"]}}"#);
    write(&seeds.join("manifest"), "docker", &pair)?;

    corrections_seeds(&seeds.join("corrections"))
}

/// Seeded inputs (a tar and an encoder) for each kind of encoder, and raw inputs holding
/// valid correction streams, in each of the three raw modes.
fn corrections_seeds(dir: &Path) -> BoxResult<()> {
    let tar = layer_tar(&[("etc/motd", pseudo_random(3, 1500, true)), ("bin/tool", pseudo_random(4, 400, false))])?;
    let seeded_tar = &tar[..tar.len().min(3000)];
    // Encoder bytes: the low 3 bits pick flate2 (0-2), zlib (3, 4), GNU gzip (5),
    // klauspost (6) or pgzip (7); the high 5 bits the level.
    for (name, which) in [("flate2-1", 0x00u8), ("flate2-6", 0x28), ("flate2-9", 0x40), ("zlib-1", 0x03), ("zlib-6", 0x2b), ("gnu-9", 0x45), ("klauspost", 0x06), ("pgzip", 0x07)] {
        let mut input = vec![3, which];
        input.extend_from_slice(&u16::try_from(seeded_tar.len())?.to_le_bytes());
        input.extend_from_slice(seeded_tar);
        write(dir, &format!("seeded-{name}"), &input)?;
    }
    for (name, which, tar) in [("flate2-6", 0x28u8, &tar[..]), ("zlib-6", 0x2b, &tar[..]), ("flate2-6-small", 0x28, &pseudo_random(5, 200, true)[..])] {
        let (header, blob, stream) = analysed(which, tar).ok_or("analyze found the seed blob unusable")?;
        let records = zstd::decode_all(&stream[..])?;
        let deflate_len = u16::try_from(blob.len() - header.to_bytes()?.len() - 8)?;
        let raw = raw_input(deflate_len, tar, &records);
        let case = case(&raw).ok_or("no case in a raw seed")?;
        let mut rebuilt = Vec::new();
        encode(&case.header, TARGET_LAYER, case.blob_len, &case.tar[..], &case.stream[..], &mut rebuilt)?;
        assert_eq!(rebuilt[10..], blob[10..], "a raw seed rebuilds its blob (all but the header)");
        write(dir, &format!("raw-{name}"), &raw)?;
        if name == "flate2-6-small" {
            let mut records_only = raw_input(deflate_len, tar, &records[prefix().len()..]);
            records_only[0] = 0;
            write(dir, &format!("records-{name}"), &records_only)?;
            let mut stored = raw_input(deflate_len, tar, &stream);
            stored[0] = 2;
            write(dir, &format!("stored-{name}"), &stored)?;
        }
    }
    Ok(())
}
