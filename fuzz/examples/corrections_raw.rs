//! Turns inputs of the `corrections` target into mode-1 (raw) inputs of the same case: the
//! tar and the whole decompressed correction stream, edits applied, so that a crash found
//! from a seeded input shows the stream `encode` was given.
//! `cargo run --manifest-path fuzz/Cargo.toml --example corrections_raw IN OUT`.

use fleetdelta_fuzz::corrections::{case, raw_input};
use fleetdelta_fuzz::BoxResult;

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = &args[..] else { return Err("usage: corrections_raw IN OUT".into()) };
    let data = std::fs::read(input)?;
    let case = case(&data).ok_or("no case in this input")?;
    let records = case.records.ok_or("a mode-2 input is raw already")?;
    let deflate_len = case.blob_len - (case.header.to_bytes()?.len() as u64 + 8);
    let raw = raw_input(u16::try_from(deflate_len)?, &case.tar, &records);
    std::fs::write(output, &raw)?;
    println!("{output}: {} bytes (tar {}, stream {})", raw.len(), case.tar.len(), records.len());
    Ok(())
}
