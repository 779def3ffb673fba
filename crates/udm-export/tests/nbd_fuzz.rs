//! Property tests: arbitrary bytes in the handshake and in the transmission phase never make
//! the server panic or hang (the fuzz entry points serve an in-memory stream to its end).

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use proptest::prelude::*;
use udm_export::nbd::proto::*;
use udm_export::nbd::{fuzz_handshake, fuzz_requests};

fn request(cmd: u16, flags: u16, offset: u64, length: u32) -> Vec<u8> {
    Request {
        flags,
        cmd,
        handle: 1,
        offset,
        length,
    }
    .encode()
    .to_vec()
}

/// Plausible requests: valid magic, any command, flags, offsets and lengths, with write
/// payloads sometimes present, sometimes short.
fn plausible() -> impl Strategy<Value = Vec<u8>> {
    let one = (
        0u16..10,
        any::<u16>(),
        prop_oneof![Just(0u64), 0u64..40_000, any::<u64>()],
        prop_oneof![Just(0u32), 0u32..70_000, any::<u32>()],
        any::<bool>(),
    )
        .prop_map(|(cmd, flags, off, len, payload)| {
            let mut v = request(cmd, flags & 0x1f, off, len);
            if cmd == CMD_WRITE && payload {
                v.extend(std::iter::repeat_n(0xab, (len as usize).min(70_000)));
            }
            v
        });
    prop::collection::vec(one, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn handshake_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz_handshake(&data);
    }

    #[test]
    fn handshake_after_valid_prefix(opt in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend(option_request(opt % 16, &data));
        v.extend(option_request(OPT_GO, &info_request_data("fuzz", &[])));
        fuzz_handshake(&v);
    }

    #[test]
    fn requests_random_bytes(data in prop::collection::vec(any::<u8>(), 0..1024)) {
        fuzz_requests(&data);
    }

    #[test]
    fn requests_plausible(mode in any::<u8>(), reqs in plausible()) {
        let mut v = vec![mode];
        v.extend(reqs);
        fuzz_requests(&v);
    }
}

#[test]
fn fuzz_entry_points_handle_edge_cases() {
    fuzz_handshake(&[]);
    fuzz_requests(&[]);
    fuzz_requests(&[1]);
    let mut v = vec![1u8];
    v.extend(request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096));
    v.extend(request(CMD_BLOCK_STATUS, 0, 32256, 1));
    v.extend(request(CMD_WRITE, 0, 0, 0xffff_ffff));
    fuzz_requests(&v);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The entry points really serve (an entry point that did nothing would let the fuzzer find
/// nothing): the greeting, the fuzzed export's dirty bitmap among its contexts, and a read's
/// reply in the mode the first byte picks (even: simple, odd: structured).
#[test]
fn fuzz_entry_points_serve() {
    let out = fuzz_handshake(&[]);
    assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT", "no greeting");
    let mut hs = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    hs.extend(option_request(OPT_STRUCTURED_REPLY, &[]));
    hs.extend(option_request(
        OPT_LIST_META_CONTEXT,
        &meta_request_data("fuzz", &["qemu:dirty-bitmap:"]),
    ));
    let listed = fuzz_handshake(&hs);
    assert!(
        contains(&listed, b"qemu:dirty-bitmap:backup-fuzz"),
        "the fuzzed export has no dirty bitmap"
    );
    let read = request(CMD_READ, 0, 0, 512);
    for (mode, reply) in [(0u8, 16 + 512), (1, 20 + 8 + 512)] {
        let before = fuzz_requests(&[mode]);
        let out = fuzz_requests(&[&[mode][..], &read].concat());
        assert_eq!(out.len() - before.len(), reply, "mode {mode}");
        let magic = be32(&out[before.len()..]);
        if mode == 0 {
            assert_eq!(magic, SIMPLE_REPLY_MAGIC);
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            assert_eq!(be16(&out[before.len() + 6..]), REPLY_TYPE_OFFSET_DATA);
        }
    }
}
