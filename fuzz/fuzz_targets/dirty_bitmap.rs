//! The dirty-bitmap file udmd reads for `export add --nbd --dirty-bitmap NAME=FILE`: decoding
//! arbitrary bytes must give an error or a bitmap whose queries stay in bounds, never panic or
//! allocate from unchecked header values.
#![no_main]
use std::path::Path;
use udm_types::DirtyBitmap;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(b) = DirtyBitmap::decode(data, Path::new("fuzz.bitmap")) else { return };
    let size = b.size();
    let covered: u64 = b.runs(0, u64::MAX).iter().map(|r| r.0).sum();
    assert_eq!(covered, size);
    let _ = b.runs(size / 3, 1 << 20);
    let _ = b.dirty().take(64).count();
    assert_eq!(DirtyBitmap::decode(&b.encode(), Path::new("again")).ok(), Some(b));
});
