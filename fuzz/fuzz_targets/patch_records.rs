//! The patch record reader on arbitrary bytes: it must end in `End` or an error, never panic,
//! and never allocate more than the format limits allow. A stream it accepts whole must be the
//! canonical encoding of the records it yields: writing them back gives the same bytes.
#![no_main]

use fleetdelta::format::records::{Record, RecordReader, RecordWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(reader) = RecordReader::new(data, 1 << 30) else { return };
    let mut reader = reader.allow_retimed(true).allow_add(true).allow_differences(true);
    let header = reader.header();
    let mut records = Vec::new();
    loop {
        match reader.next_record() {
            Ok(Record::End) => break,
            Ok(record) => records.push(record),
            Err(_) => return,
        }
    }
    assert!(reader.next_record().is_err(), "a record after End");
    let rest = reader.into_inner();
    let consumed = &data[..data.len() - rest.len()];

    let mut writer = RecordWriter::new(Vec::new(), header).expect("writing to memory");
    for record in records.iter().chain([&Record::End]) {
        writer.write(record).expect("writing to memory");
    }
    assert!(writer.into_inner() == consumed, "re-encoding the accepted records gives other bytes");
});
