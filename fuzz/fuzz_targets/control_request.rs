//! The control protocol's request decoder (what udmd reads from its socket).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<udm_proto::RequestEnvelope>(data);
});
