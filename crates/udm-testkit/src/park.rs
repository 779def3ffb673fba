//! NBD requests parked on a suspended device of a test's udmd: the state in which control
//! operations must not wait for I/O while holding what releases it.

use crate::Udmd;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use udm_export::nbd::client::Client;
use udm_export::nbd::proto::CMD_READ;

/// A READ parked on a suspended device, with the client that sent it.
pub struct ParkedRead {
    /// The client (its socket reads time out after 10 s, so a lost reply fails the test).
    pub client: Client<UnixStream>,
    /// The handle of the parked READ of the export's first 4 KiB.
    pub handle: u64,
}

/// Connects to export `name` of `d` and sends a READ of its first 4 KiB, which the caller has
/// arranged to park (the device, or one below it, is suspended); waits 200 ms for it to arrive.
pub fn parked_read(d: &Udmd, name: &str) -> ParkedRead {
    let s = UnixStream::connect(d.nbd_socket()).expect("connect to the NBD socket");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut client = Client::connect(s, name, false).expect("NBD handshake");
    let handle = client
        .send(CMD_READ, 0, 0, 4096, &[])
        .expect("send the READ");
    std::thread::sleep(Duration::from_millis(200));
    ParkedRead { client, handle }
}

/// `udmsetup` arguments creating the interposer `ip` of `o` of [`parked_below`].
pub const CREATE_IP_OVER_O: [&str; 5] = [
    "create",
    "ip",
    "--interpose",
    "--table",
    "0 8192 linear o 0",
];

/// Disk `f0` (4 MiB, pattern seed 1) <- `low` <- `o` (both linear, 8192 sectors), `o` exported
/// over NBD and `low` suspended, with a READ of `o` parked in `low`.
pub fn parked_below(d: &Udmd) -> ParkedRead {
    d.disk("f0", 4 << 20, 1);
    d.ok(&["create", "low", "--table", "0 8192 linear f0 0"]);
    d.ok(&["create", "o", "--table", "0 8192 linear low 0"]);
    d.ok(&["export", "add", "o", "--nbd"]);
    d.ok(&["suspend", "low"]);
    parked_read(d, "o")
}
