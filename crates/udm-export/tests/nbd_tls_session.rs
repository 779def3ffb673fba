//! The TLS session under the NBD server, below what real clients exercise: a corrupt record or
//! a non-TLS handshake ends the connection at once (rather than leaving it waiting for more
//! data), a TLS 1.3 key update asked for by the client is answered (the server's own key
//! update reaches the client before records under the new key), and after STARTTLS an
//! unknown export is called unknown, not "TLS required".

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

#[path = "nbd_tls/support.rs"]
mod support;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use udm_export::nbd::client::{read_option_reply, Reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{TcpSecurity, TlsCreds};
use udm_testkit::{ends_within, pki};

#[test]
fn after_starttls_an_unknown_export_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), false);
    let mut t = psk_client(starttls_agreed(s.port));
    for opt in [OPT_INFO, OPT_GO] {
        t.write_all(&option_request(opt, &info_request_data("nope", &[])))
            .unwrap();
        let (o, typ, msg) = read_option_reply(&mut t).unwrap();
        assert_eq!((o, typ), (opt, REP_ERR_UNKNOWN), "option {opt}");
        assert!(String::from_utf8_lossy(&msg).contains("nope"));
    }
    // The session still works: the real export opens.
    let mut cl = client_after_starttls(t, "vol");
    assert_eq!(cl.read(0, 512).unwrap(), Reply::Ok(vec![0; 512]));
}

/// A TLS application-data record whose contents are garbage (its authentication fails).
fn corrupt_record() -> Vec<u8> {
    let mut r = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    r.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    r
}

#[test]
fn a_corrupt_record_ends_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), false);
    let mut t = psk_client(starttls_agreed(s.port));
    // A working session first, then a record that does not decrypt.
    t.write_all(&option_request(OPT_STRUCTURED_REPLY, &[]))
        .unwrap();
    assert_eq!(read_option_reply(&mut t).unwrap().1, REP_ACK);
    let raw = t.get_mut();
    raw.write_all(&corrupt_record()).unwrap();
    assert!(
        ends_within(raw.try_clone().unwrap(), Duration::from_secs(5)),
        "the connection outlived a corrupt record"
    );
    wait_for_no_connections(&s);
}

#[test]
fn a_client_that_does_not_speak_tls_after_starttls_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), false);
    let mut c = starttls_agreed(s.port);
    // Not a ClientHello; the handshake fails now, not at its 30 s timeout.
    c.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    assert!(
        ends_within(c, Duration::from_secs(5)),
        "the connection outlived a failed TLS handshake"
    );
    wait_for_no_connections(&s);
}

fn wait_for_no_connections(s: &Srv) {
    let t = Instant::now();
    while s.server.memory().connections != 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.server.memory().connections, 0);
}

/// A rustls client trusting the test CA, after STARTTLS on `c`.
fn rustls_client(
    c: TcpStream,
    ca: &std::path::Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, c)
}

#[test]
fn a_key_update_the_client_asks_for_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let s = serve(TcpSecurity {
        tls: Some(Arc::new(TlsCreds::x509_dir(&p.server, false).unwrap())),
        allow_insecure: false,
    });
    let c = starttls_agreed(s.port);
    let t = rustls_client(c, &p.server.join("ca-cert.pem"));
    let mut cl = client_after_starttls(t, "vol");
    let data = vec![0x3c; 65536];
    assert_eq!(cl.write(0, &data).unwrap(), Reply::Ok(vec![]));
    for round in 0..3 {
        // KeyUpdate with update_requested goes out with the next request; the server must
        // send its own KeyUpdate before any record under its new key.
        cl.stream().inner.conn.refresh_traffic_keys().unwrap();
        assert_eq!(
            cl.read(0, 65536).unwrap(),
            Reply::Ok(data.clone()),
            "round {round}"
        );
    }
}
