//! The tests' environment: root, the fdtrace binary, the clock, and the
//! output of the children they start.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as fdtrace's `ts`.
pub fn now_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs_f64()
}

/// Fails unless the tests run as root: loading eBPF needs it.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "the fdtrace integration tests must run as root (euid 0, here {euid}): fdtrace needs \
         CAP_BPF and CAP_PERFMON to load and attach its eBPF programs, the tests read \
         /proc/PID/fd of the traced processes and run containers; run them with 'cargo xtask test' \
         or as root"
    );
}

/// The fdtrace binary: `$FDTRACE_BIN`, else `<workspace>/target/release/fdtrace`,
/// else `<workspace>/target/debug/fdtrace`. Fails when there is none.
pub fn fdtrace_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FDTRACE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "FDTRACE_BIN={} does not exist: fdtrace binary not found: run 'cargo xtask test'",
            p.display()
        );
        return p;
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent");
    for profile in ["release", "debug"] {
        let p = ws.join("target").join(profile).join("fdtrace");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "fdtrace binary not found: run 'cargo xtask test' (looked at $FDTRACE_BIN, {0}/target/release/fdtrace, {0}/target/debug/fdtrace)",
        ws.display()
    );
}

/// Reads `r` line by line on a thread of its own, handing each line (without
/// its newline) and the time it arrived to `each`, then `None` at the end.
/// Stops early when `each` returns false (the receiver is gone).
pub fn read_lines<R: Read + Send + 'static>(
    r: R,
    mut each: impl FnMut(Option<String>, f64) -> bool + Send + 'static,
) {
    thread::spawn(move || {
        let mut br = BufReader::new(r);
        loop {
            let mut buf = Vec::new();
            match br.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => {
                    each(None, now_ts());
                    return;
                }
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    if !each(Some(line), now_ts()) {
                        return;
                    }
                }
            }
        }
    });
}

pub(crate) fn spawn_collector<R: Read + Send + 'static>(mut r: R, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
}

/// The last `n` bytes of `s` (on a char boundary), for failure messages.
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
