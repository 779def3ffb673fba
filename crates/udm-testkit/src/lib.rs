//! Test harness for udm's integration tests: a private `udmd` (its own runtime and state
//! directories), `udmsetup` invocations, tool detection with loud skips, and helpers for the
//! backing files whose bytes tests compare against.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod bounded;
pub mod conformance;
pub mod core;
pub mod host;
mod park;
mod pki;
pub mod vmlab;
pub use bounded::{ends_within, join_within, udmsetup_bg, within};
pub use park::{parked_below, parked_read, ParkedRead, CREATE_IP_OVER_O};
pub use pki::{issue, make_ca, pki, Pki};

/// Directory holding the workspace's binaries (the test executable lives in `<dir>/deps`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let deps = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if deps.ends_with("deps") {
        deps.parent().map(Path::to_path_buf).unwrap_or(deps)
    } else {
        deps
    }
}

/// Path of a workspace binary (`udmd`, `udmsetup`, `udm`); panics with advice when not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` before the tests (scripts/test.sh does)",
        p.display()
    );
    p
}

/// True when `tool` is on PATH; otherwise prints a loud SKIPPED line for `test`.
pub fn have(tool: &str, test: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED {test}: `{tool}` is not installed");
    }
    ok
}

/// True when running as root; otherwise prints a loud SKIPPED line.
pub fn root(test: &str) -> bool {
    let ok = host::is_root();
    if !ok {
        eprintln!("SKIPPED {test}: needs root");
    }
    ok
}

/// A private udmd.
pub struct Udmd {
    /// Holds the runtime, state and scratch directories.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Udmd {
    /// Starts a daemon with fresh directories.
    pub fn start() -> Udmd {
        Self::start_with(&[])
    }

    /// Starts a daemon with extra arguments (e.g. `--create ...`).
    pub fn start_with(extra: &[&str]) -> Udmd {
        let dir = tempfile::Builder::new()
            .prefix("udm-test")
            .tempdir()
            .expect("tempdir");
        let mut d = Udmd {
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    /// The running daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Runtime directory (control.sock, nbd.sock).
    pub fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// State directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A scratch path inside the test directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The NBD socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.runtime().join("nbd.sock")
    }

    /// An in-house NBD client of `export` over the Unix socket (simple replies).
    pub fn nbd_client(
        &self,
        export: &str,
    ) -> udm_export::nbd::client::Client<std::os::unix::net::UnixStream> {
        let s = std::os::unix::net::UnixStream::connect(self.nbd_socket())
            .expect("connect to the NBD socket");
        udm_export::nbd::client::Client::connect(s, export, false).expect("NBD handshake")
    }

    /// `nbd+unix:///NAME?socket=...` for an export.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }

    /// The TCP port the daemon logged last ("NBD listening on TCP addr=127.0.0.1:PORT"), for a
    /// daemon started with `--nbd-listen 127.0.0.1:0`.
    pub fn tcp_port(&self) -> u16 {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("NBD listening on TCP"))
            .unwrap_or_else(|| panic!("no TCP listener in the log:\n{log}"));
        let at = line.rfind("127.0.0.1:").expect("address in the log line") + "127.0.0.1:".len();
        line[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .expect("port")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("udmd.log"))
            .expect("log file");
        let mut cmd = Command::new(bin("udmd"));
        cmd.arg("--runtime-dir")
            .arg(self.runtime())
            .arg("--state-dir")
            .arg(self.state())
            .args(&self.extra)
            .env(
                "UDM_LOG",
                std::env::var("UDM_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn udmd");
        self.child = Some(child);
        let sock = self.runtime().join("control.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("udmd exited at start-up ({st}); log:\n{}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("udmd did not come up; log:\n{}", self.log());
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("udmd.log")).unwrap_or_default()
    }

    /// `kill -9` and start again on the same directories.
    pub fn crash_and_restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `kill -9` without restarting.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait for a clean exit, start again. A daemon that does not stop cleanly, or
    /// that panicked on any thread, fails the test that restarts it (with the log).
    pub fn restart(&mut self) {
        let clean = self.stop();
        assert!(
            clean,
            "udmd did not stop cleanly before the restart; log:\n{}",
            self.log()
        );
        self.assert_no_panic("before the restart");
        self.spawn();
    }

    /// Fails the calling test if the daemon's log shows a panic on any of its threads: a
    /// panicking worker thread need not take the daemon down, so nothing else would notice.
    pub fn assert_no_panic(&self, when: &str) {
        let log = self.log();
        assert!(
            !log.contains("panicked at"),
            "udmd panicked ({when}); log:\n{log}"
        );
    }

    /// SIGTERM and wait; returns the exit status success.
    pub fn stop(&mut self) -> bool {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a valid pid and signal number.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(st)) = c.try_wait() {
                    return st.success();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            return false;
        }
        true
    }

    /// Runs `udmsetup ARGS` against this daemon.
    pub fn udmsetup(&self, args: &[&str]) -> Output {
        self.udmsetup_stdin(args, None)
    }

    /// Runs `udmsetup ARGS` with `stdin`.
    pub fn udmsetup_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run_tool(&bin("udmsetup"), &self.runtime(), args, stdin)
    }

    /// Runs `udm ARGS` against this daemon.
    pub fn udm(&self, args: &[&str]) -> Output {
        run_tool(&bin("udm"), &self.runtime(), args, None)
    }

    /// Runs `udm --json ARGS`, asserting success (the daemon's log in the message); returns
    /// stdout.
    pub fn udm_json_out(&self, args: &[&str]) -> String {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.udm(&a);
        assert!(
            o.status.success(),
            "udm {args:?} failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `udm ARGS`, asserting failure; returns stderr.
    pub fn udm_fails(&self, args: &[&str]) -> String {
        failure("udm", args, self.udm(args))
    }

    /// `udm snapshot take DEVICE --cow PATH/COW --size 32M EXTRA...` (the COW file in this test's
    /// directory), asserting success; returns the output (stderr has `--timings` lines).
    pub fn take_snapshot(&self, device: &str, cow: &str, extra: &[&str]) -> Output {
        let cow = self.path(cow);
        let cow = cow.to_str().unwrap_or_default();
        let mut args = vec!["snapshot", "take", device, "--cow", cow, "--size", "32M"];
        args.extend_from_slice(extra);
        let o = self.udm(&args);
        assert!(
            o.status.success(),
            "udm snapshot take {device}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// Runs `udmsetup ARGS`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.udmsetup(args);
        assert!(
            o.status.success(),
            "udmsetup {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `udmsetup ARGS`, asserting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        failure("udmsetup", args, self.udmsetup(args))
    }

    /// A client of the control protocol.
    pub fn client(&self) -> udm_proto::ControlClient {
        udm_proto::ControlClient::connect(&self.runtime().join("control.sock"))
            .expect("control connection")
    }

    /// Creates a backing file of `bytes` filled with a pattern derived from `seed` and adds it as a
    /// disk named `name`; returns the file path.
    pub fn disk(&self, name: &str, bytes: u64, seed: u8) -> PathBuf {
        let p = self.path(&format!("{name}.img"));
        write_pattern_file(&p, bytes, seed);
        self.ok(&[
            "disk",
            "add",
            name,
            "--file",
            p.to_str().unwrap_or_default(),
        ]);
        p
    }
}

impl Drop for Udmd {
    /// Stops the daemon. A failed stop or a panic in the log fails the test, unless it is
    /// already failing (a second panic would abort the test binary).
    fn drop(&mut self) {
        let clean = self.stop();
        if std::thread::panicking() {
            if !clean {
                eprintln!("udmd did not stop cleanly; log:\n{}", self.log());
            }
            return;
        }
        assert!(clean, "udmd did not stop cleanly; log:\n{}", self.log());
        self.assert_no_panic("at the end of the test");
    }
}

/// Runs a udm tool with the daemon's runtime and state directories (the state directory is
/// the runtime's sibling), so defaults such as `udm track`'s metadata file stay in the test's
/// directory.
pub fn run_tool(exe: &Path, runtime: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(exe);
    if let Some(dir) = runtime.parent() {
        cmd.env("UDM_STATE_DIR", dir.join("state"));
    }
    cmd.env("UDM_RUNTIME_DIR", runtime)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tool");
    if let (Some(s), Some(mut i)) = (stdin, child.stdin.take()) {
        i.write_all(s.as_bytes()).expect("stdin");
    }
    child.wait_with_output().expect("tool output")
}

/// Fills a file with a deterministic pattern: every 512-byte sector holds its own number and
/// `seed`, so misplaced data is recognisable.
pub fn write_pattern_file(p: &Path, bytes: u64, seed: u8) {
    let f = std::fs::File::create(p).expect("create");
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        fill_pattern(&mut buf[..n], off / 512, seed);
        f.write_all_at(&buf[..n], off).expect("write");
        off += n as u64;
    }
}

/// The pattern of [`write_pattern_file`] for sectors starting at `sector`.
pub fn fill_pattern(buf: &mut [u8], sector: u64, seed: u8) {
    for (i, chunk) in buf.chunks_mut(512).enumerate() {
        let s = sector + i as u64;
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (s as u8)
                .wrapping_mul(31)
                .wrapping_add(j as u8)
                .wrapping_add(seed)
                ^ (s >> 8) as u8;
        }
        if chunk.len() >= 9 {
            chunk[..8].copy_from_slice(&s.to_le_bytes());
            chunk[8] = seed;
        }
    }
}

/// Reads `len` bytes at `off` from a file.
pub fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(p).expect("open");
    let mut v = vec![0u8; len];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off)).expect("seek");
    f.read_exact(&mut v).expect("read");
    v
}

/// Runs a shell command, returning (success, stdout, stderr).
pub fn sh(cmd: &str) -> (bool, String, String) {
    let o = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Reads the first `size` bytes of an export, 1 MiB per READ; any error reply fails the test.
pub fn read_whole<S: Read + Write>(
    c: &mut udm_export::nbd::client::Client<S>,
    size: u64,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(size as usize);
    for off in (0..size).step_by(1 << 20) {
        let len = (size - off).min(1 << 20) as u32;
        match c.read(off, len).expect("read") {
            udm_export::nbd::client::Reply::Ok(b) => v.extend_from_slice(&b),
            r => panic!("read at {off}: {r:?}"),
        }
    }
    v
}

/// The stderr of `TOOL ARGS`, which must have failed.
fn failure(tool: &str, args: &[&str], o: Output) -> String {
    assert!(
        !o.status.success(),
        "{tool} {args:?} unexpectedly succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The TCP port an in-process NBD server listens on (it was asked for port 0); panics when it
/// has no TCP listener.
pub fn nbd_tcp_port(server: &udm_export::nbd::NbdServer) -> u16 {
    server
        .listen_addrs()
        .iter()
        .find_map(|a| match a {
            udm_export::nbd::ListenAddr::Tcp(a) => Some(a.port()),
            _ => None,
        })
        .expect("the NBD server listens on TCP")
}
