//! Structured READ replies of sparse devices: a large read sends the device's zero ranges as
//! `OFFSET_HOLE` chunks and its data as `OFFSET_DATA` chunks, in order, the last one `DONE`;
//! a small read, a read with `DF` (one chunk, however large) and a simple-reply connection
//! get the data itself. Checked chunk by chunk on the wire and against the device's content.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};

const MIB: u64 = 1 << 20;

/// One reply chunk: type, offset, and the bytes it stands for (zeroes for a hole).
struct Chunk {
    typ: u16,
    done: bool,
    offset: u64,
    data: Vec<u8>,
}

/// A 4 MiB memory device with data at [1 MiB, 1 MiB + 8 KiB) and [3 MiB - 128 KiB, 3 MiB),
/// the rest never written (holes reading as zeroes), exported as `disk`.
fn setup() -> (Arc<NbdServer>, Arc<MemDevice>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new();
    let dev = Arc::new(MemDevice::new(4 * MIB / 512));
    dev.submit(Bio::write(MIB / 512, &[0xa1; 8192])).unwrap();
    dev.submit(Bio::write(
        (3 * MIB - 128 * 1024) / 512,
        &[0xb2; 128 * 1024],
    ))
    .unwrap();
    server
        .add_export("disk", dev.clone(), NbdExportOptions::default())
        .unwrap();
    server.listen_unix(&dir.path().join("nbd.sock")).unwrap();
    (server, dev, dir)
}

fn connect(dir: &tempfile::TempDir, structured: bool) -> Client<UnixStream> {
    let s = UnixStream::connect(dir.path().join("nbd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Client::connect(s, "disk", structured).unwrap()
}

/// Sends a READ and collects its structured chunks up to the `DONE` one.
fn read_chunks(c: &mut Client<UnixStream>, flags: u16, offset: u64, len: u32) -> Vec<Chunk> {
    let handle = c.send(CMD_READ, flags, offset, len, &[]).unwrap();
    let s = c.stream();
    let mut out = Vec::new();
    loop {
        let h = read_array::<20>(s).unwrap();
        assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be64(&h[8..16]), handle);
        let mut p = vec![0u8; be32(&h[16..20]) as usize];
        std::io::Read::read_exact(s, &mut p).unwrap();
        let typ = be16(&h[6..8]);
        let done = be16(&h[4..6]) & REPLY_FLAG_DONE != 0;
        let data = match typ {
            REPLY_TYPE_OFFSET_DATA => p[8..].to_vec(),
            REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(p.len(), 12);
                vec![0u8; be32(&p[8..12]) as usize]
            }
            t => panic!("chunk type {t}"),
        };
        out.push(Chunk {
            typ,
            done,
            offset: be64(&p[0..8]),
            data,
        });
        if done {
            return out;
        }
    }
}

/// The chunks cover `[offset, offset + len)` in order and hold the device's bytes there.
fn check_cover(dev: &MemDevice, chunks: &[Chunk], offset: u64, len: usize) {
    let mut want = vec![0u8; len];
    dev.submit(Bio::read(offset / 512, &mut want)).unwrap();
    let mut at = offset;
    let mut got = Vec::new();
    for c in chunks {
        assert_eq!(c.offset, at, "chunks in order, without gaps");
        at += c.data.len() as u64;
        got.extend_from_slice(&c.data);
    }
    assert!(got == want, "the chunks hold the device's content");
    assert!(
        chunks.iter().rev().skip(1).all(|c| !c.done),
        "DONE only on the last chunk"
    );
}

#[test]
fn large_reads_send_holes_as_hole_chunks() {
    let (server, dev, dir) = setup();
    let mut c = connect(&dir, true);
    let chunks = read_chunks(&mut c, 0, 0, (4 * MIB) as u32);
    check_cover(&dev, &chunks, 0, (4 * MIB) as usize);
    let kinds: Vec<(u16, u64, usize)> = chunks
        .iter()
        .map(|c| (c.typ, c.offset, c.data.len()))
        .collect();
    let hole = REPLY_TYPE_OFFSET_HOLE;
    let data = REPLY_TYPE_OFFSET_DATA;
    assert_eq!(
        kinds,
        vec![
            (hole, 0, MIB as usize),
            (data, MIB, 8192),
            (hole, MIB + 8192, (2 * MIB - 128 * 1024 - 8192) as usize),
            (data, 3 * MIB - 128 * 1024, 128 * 1024),
            (hole, 3 * MIB, MIB as usize),
        ]
    );
    // A read that starts inside data and ends inside a hole.
    let chunks = read_chunks(&mut c, 0, MIB + 4096, (MIB / 2) as u32);
    check_cover(&dev, &chunks, MIB + 4096, (MIB / 2) as usize);
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[1].typ, hole);
    // The same data read whole: the in-house client lays holes and data together.
    assert_eq!(
        c.read(0, (4 * MIB) as u32).unwrap(),
        Reply::Ok(chunks_content(&dev, 0, 4 * MIB))
    );
    server.shutdown();
}

fn chunks_content(dev: &MemDevice, offset: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    dev.submit(Bio::read(offset / 512, &mut v)).unwrap();
    v
}

#[test]
fn small_reads_df_reads_and_simple_replies_carry_the_data() {
    let (server, dev, dir) = setup();
    let mut c = connect(&dir, true);
    // Below the sparse threshold: one data chunk, zeroes included.
    let chunks = read_chunks(&mut c, 0, 0, 128 * 1024);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].typ, REPLY_TYPE_OFFSET_DATA);
    check_cover(&dev, &chunks, 0, 128 * 1024);
    // DF: exactly one data chunk, even beyond the server's 1 MiB streaming chunk.
    let chunks = read_chunks(&mut c, CMD_FLAG_DF, 0, (3 * MIB) as u32);
    assert_eq!(chunks.len(), 1, "DF reads are not fragmented");
    assert_eq!(chunks[0].typ, REPLY_TYPE_OFFSET_DATA);
    check_cover(&dev, &chunks, 0, (3 * MIB) as usize);
    // Without structured replies: the data of a sparse range, as always.
    let mut c = connect(&dir, false);
    assert_eq!(
        c.read(0, (2 * MIB) as u32).unwrap(),
        Reply::Ok(chunks_content(&dev, 0, 2 * MIB))
    );
    server.shutdown();
}
