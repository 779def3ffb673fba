//! The NBD server's handshake and option haggling, driven over an in-memory stream.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // What the server sent is for tests; here only a panic or a hang counts.
    let _sent = udm_export::nbd::fuzz_handshake(data);
});
