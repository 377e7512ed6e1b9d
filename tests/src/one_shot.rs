//! fdtrace run to its end, for its exit code and messages.

use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::env::spawn_collector;
use crate::{fdtrace_bin, require_root};

/// Result of running fdtrace to its end.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs fdtrace with `args` and stdin closed, kills it after `timeout`.
pub fn run_fdtrace(args: &[&str], timeout: Duration) -> Finished {
    require_root();
    run_fdtrace_rootless(args, timeout)
}

/// [`run_fdtrace`] as any user: for what fdtrace decides before it needs
/// privileges (its command line).
pub fn run_fdtrace_rootless(args: &[&str], timeout: Duration) -> Finished {
    let bin = fdtrace_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let out = Arc::new(Mutex::new(String::new()));
    let err = Arc::new(Mutex::new(String::new()));
    spawn_collector(child.stdout.take().unwrap(), out.clone());
    spawn_collector(child.stderr.take().unwrap(), err.clone());
    let until = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait fdtrace") {
            break st;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fdtrace {args:?} still ran after {timeout:?}\nstdout: {}\nstderr: {}",
                out.lock().unwrap(),
                err.lock().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    // Let the collectors drain the pipes.
    thread::sleep(Duration::from_millis(100));
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    Finished {
        status,
        stdout,
        stderr,
    }
}
