//! MBR and GPT parsing of an arbitrary disk image, at 512- and 4096-byte logical blocks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = udm_io::partition::parse_image(data, 512);
    let _ = udm_io::partition::parse_image(data, 4096);
});
