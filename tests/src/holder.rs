//! `fdloop hold N`: a process holding N fds on /dev/null until its stdin
//! closes, for tests that need a process with a known, still table.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, ChildStdin, Command, Stdio},
};

/// A running `fdloop hold N`, ready (its N fds open); killed and reaped
/// when dropped, so a failed test leaves nothing behind.
pub struct Holder {
    child: Child,
    _stdin: ChildStdin,
}

impl Holder {
    /// Starts `fdloop` (the test's `env!("CARGO_BIN_EXE_fdloop")`) holding
    /// `n` fds and waits for its ready line.
    pub fn start(fdloop: &str, n: u32) -> Holder {
        let mut child = Command::new(fdloop)
            .args(["hold", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fdloop hold");
        let stdin = child.stdin.take().expect("piped stdin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("fdloop hold says it is ready");
        assert_eq!(
            line.trim_end(),
            format!("fdloop hold pid={} opened={n}", child.id()),
            "fdloop hold's ready line"
        );
        Holder {
            child,
            _stdin: stdin,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
