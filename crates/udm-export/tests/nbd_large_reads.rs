//! READs larger than the server's 1 MiB chunk are read and sent a chunk at a time (so a client
//! that never takes its replies cannot make the server hold whole payloads): the data must be
//! exactly what a whole-buffer read returns, with simple and with structured replies, and a
//! device error after the first chunk must never be reported as success: an error chunk with
//! structured replies, a disconnect with simple replies (the header already promised data).

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

#[path = "nbd_hostile/support.rs"]
mod support;

use std::sync::Arc;
use support::*;
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::NbdLimits;
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{Bio, BioKind, BlockDevice};
use udm_types::Errno;

const SECTORS: u64 = 128 << 11; // 128 MiB

fn patterned() -> Arc<MemDevice> {
    let d = Arc::new(MemDevice::new(SECTORS));
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..(SECTORS >> 11) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((mib as usize * 131 + i * 7 + i / 4096) % 251) as u8;
        }
        d.submit(Bio::write(mib << 11, &buf)).unwrap();
    }
    d
}

fn expect(d: &MemDevice, offset: u64, len: usize) -> Vec<u8> {
    d.contents()[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn large_reads_return_the_same_bytes_in_both_reply_modes() {
    let dev = patterned();
    let e = env(
        NbdLimits::default(),
        &[("p", dev.clone() as Arc<dyn BlockDevice>)],
    );
    for structured in [false, true] {
        let mut c = Client::connect(stream(&e.sock), "p", structured).unwrap();
        // Whole chunks, a partial last chunk, an odd start, the protocol maximum.
        for (off, len) in [
            (0u64, 2usize << 20),
            (512, (3 << 20) + 4096),
            (7 << 20, 32 << 20),
            ((96 << 20) + 1536, (5 << 20) - 512),
        ] {
            let got = c.read(off, len as u32).unwrap();
            assert!(
                got == Reply::Ok(expect(&dev, off, len)),
                "structured={structured} read {len} at {off} differs"
            );
        }
        // Pipelined large and small reads on one connection: every reply is whole.
        let mut handles = Vec::new();
        for i in 0..8u64 {
            let (off, len) = (i * (5 << 20), if i % 2 == 0 { 4 << 20 } else { 4096 });
            handles.push((c.send(0, 0, off, len as u32, &[]).unwrap(), off, len));
        }
        for _ in 0..handles.len() {
            let (h, r) = c
                .recv(|h| handles.iter().find(|x| x.0 == h).map(|x| x.2 as u32))
                .unwrap();
            let &(_, off, len) = handles.iter().find(|x| x.0 == h).unwrap();
            assert!(
                r == Reply::Ok(expect(&dev, off, len)),
                "pipelined read at {off}"
            );
        }
    }
}

#[test]
fn an_error_after_the_first_chunk_is_never_success() {
    let dev = patterned();
    let e = env(
        NbdLimits::default(),
        &[("p", dev.clone() as Arc<dyn BlockDevice>)],
    );
    // Sector 6144 is 3 MiB into a read at 0: the fourth chunk fails.
    dev.inject(Fault::range(6144, 6145, Errno::EIO).ops(&[BioKind::Read]));
    let mut s = Client::connect(stream(&e.sock), "p", true).unwrap();
    assert!(matches!(s.read(0, 8 << 20).unwrap(), Reply::Err(_)));
    // The connection is still usable after a structured error.
    assert_eq!(s.read(0, 4096).unwrap(), Reply::Ok(expect(&dev, 0, 4096)));
    let mut p = Client::connect(stream(&e.sock), "p", false).unwrap();
    match p.read(0, 8 << 20) {
        Ok(Reply::Ok(_)) => panic!("a failed read was reported as success"),
        Ok(r) => panic!("a simple reply cannot carry an error after its header: {r:?}"),
        Err(_) => {} // disconnected, as the protocol prescribes
    }
    // A failure in the first chunk is an ordinary error reply.
    let mut q = Client::connect(stream(&e.sock), "p", false).unwrap();
    assert!(matches!(q.read(3 << 20, 4 << 20).unwrap(), Reply::Err(_)));
    dev.clear_faults();
    assert_eq!(q.read(0, 4096).unwrap(), Reply::Ok(expect(&dev, 0, 4096)));
}
