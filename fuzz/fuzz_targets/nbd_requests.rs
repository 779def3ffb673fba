//! The NBD server's transmission-phase request decoder, after a valid handshake.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // What the server sent is for tests; here only a panic or a hang counts.
    let _sent = udm_export::nbd::fuzz_requests(data);
});
