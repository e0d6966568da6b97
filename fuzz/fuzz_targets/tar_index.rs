//! The layer tar indexer on arbitrary bytes: errors are fine, panics are not, and every range
//! it reports must lie inside the archive, in order, with a path that cannot escape the root.
#![no_main]

use fleetdelta::layer::TarIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(index) = TarIndex::parse(data, "fuzz") else { return };
    assert_eq!(index.len, data.len() as u64);
    let mut content_end = 0;
    for e in &index.entries {
        assert!(e.meta_start <= e.data_start, "{e:?}: metadata after data");
        assert!(e.data_start.checked_add(e.data_len).is_some_and(|end| end <= index.len), "{e:?}: past the end");
        assert!(e.meta_start >= content_end, "{e:?}: overlaps the previous contents");
        assert!(!e.path.starts_with('/') && !e.path.split('/').any(|c| c == ".."), "{e:?}: unsafe path");
        if e.has_content() {
            content_end = e.content_range().end;
        }
    }
});
