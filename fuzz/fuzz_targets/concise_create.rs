//! The concise `dm-mod.create=` syntax on its own (table_text also tries it, after the table
//! text): whatever parses must print back to text that parses to the same devices.
#![no_main]
use udm_table::ConciseDevice;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(devs) = ConciseDevice::parse_list(&text) {
        let printed = ConciseDevice::format_list(&devs);
        match ConciseDevice::parse_list(&printed) {
            Ok(again) => assert_eq!(again, devs, "{text:?} printed as {printed:?}"),
            Err(e) => panic!("{text:?} printed as {printed:?}, which does not parse: {e}"),
        }
    }
});
