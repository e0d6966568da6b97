//! The retimed-span walker on arbitrary bytes and shifts: it must never panic, and walking a
//! span whole or in block-aligned pieces must give the same bytes and the same outcome.
#![no_main]

use fleetdelta::format::retime::Retimer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (i64, u16, Vec<u8>)| {
    let (shift, piece_blocks, span) = input;
    let mut whole = span.clone();
    let whole_result = Retimer::new(shift).apply(&mut whole).map_err(|e| e.to_string());

    let piece = 512 * (usize::from(piece_blocks % 64) + 1);
    let mut pieces = span.clone();
    let mut walker = Retimer::new(shift);
    let mut pieces_result = Ok(());
    for chunk in pieces.chunks_mut(piece) {
        if let Err(e) = walker.apply(chunk) {
            pieces_result = Err(e.to_string());
            break;
        }
    }
    assert_eq!(whole_result.is_ok(), pieces_result.is_ok(), "whole {whole_result:?}, in pieces {pieces_result:?}");
    if whole_result.is_ok() {
        assert!(whole == pieces, "the output depends on how the span is cut");
        assert_eq!(whole.len(), span.len());
    }
});
