//! Compresses stdin to stdout with one of fleetdelta's exact gzip encoder ports, the way the
//! applier does (streaming, pgzip blocks in parallel on rayon's pool), so a benchmark can
//! time the port as a process beside the original tool on the same tar.
//!
//! `exact_encode DESCRIPTOR_JSON < layer.tar > layer.tar.gz`, with a descriptor as in
//! `delta.json`, e.g. `{"encoder":{"kind":"zlib","level":9},"header":{"mtime":0,"xfl":2,"os":3}}`.
//! Exits 2 when this build does not know the descriptor's encoder. Used by
//! `tools/compare --encoders`.

use std::io::{BufReader, BufWriter, Write};
use std::process::ExitCode;

use fleetdelta::layer::exact::Descriptor;

fn main() -> ExitCode {
    let Some(json) = std::env::args().nth(1) else {
        eprintln!("usage: exact_encode DESCRIPTOR_JSON < TAR > GZ");
        return ExitCode::from(1);
    };
    let descriptor: Descriptor = match serde_json::from_str(&json) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("exact_encode: descriptor not known to this build: {e}");
            return ExitCode::from(2);
        }
    };
    let stdin = BufReader::with_capacity(1 << 20, std::io::stdin().lock());
    let mut stdout = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    match descriptor.encode(stdin, &mut stdout).map_err(|e| e.to_string()).and_then(|_| stdout.flush().map_err(|e| e.to_string())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exact_encode: {e}");
            ExitCode::from(1)
        }
    }
}
