//! dmsetup table text and the concise `dm-mod.create=` syntax.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| udm_table::fuzz_parse(data));
