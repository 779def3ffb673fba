//! Bounded waits for tests that drive operations which might hang: a hang fails the test with
//! what was waited for instead of blocking the test run.

use crate::{bin, run_tool, Udmd};
use std::io::Read;
use std::process::Output;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Waits for `t` at most `limit`; a thread still running fails the test.
pub fn join_within<T>(t: JoinHandle<T>, limit: Duration, what: &str) -> T {
    let deadline = Instant::now() + limit;
    while !t.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not finish within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    t.join().expect("the thread panicked")
}

/// Runs `f` on a thread and returns its result, failing the test if it takes longer than
/// `limit` (the thread is left behind: it may be blocked for good).
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {limit:?}"),
    }
}

/// True once `s` reads end of stream (or an error) within `limit`, whatever it reads before:
/// the peer closed the connection. The reading thread is left behind when it did not.
pub fn ends_within(mut s: impl Read + Send + 'static, limit: Duration) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 65536];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(limit).is_ok()
}

/// `udmsetup ARGS` against `d` on a thread (so that a hang can be detected with
/// [`join_within`]).
pub fn udmsetup_bg(d: &Udmd, args: &[&str]) -> JoinHandle<Output> {
    let exe = bin("udmsetup");
    let runtime = d.runtime();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool(&exe, &runtime, &args, None)
    })
}
