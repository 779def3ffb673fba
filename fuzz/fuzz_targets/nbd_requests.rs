//! The NBD server's transmission-phase request decoder, after a valid handshake.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| udm_export::nbd::fuzz_requests(data));
