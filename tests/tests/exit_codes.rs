//! fdtrace's exit codes and how it ends (see the CLI contract in README.md):
//! 0 normal end (duration over, SIGINT/SIGTERM, no traced process left),
//! 1 environment/privilege error, 2 no such pid (bad usage: cli_usage.rs).
//!
//! Needs root and a built fdtrace, like the other tests but cli_usage.rs.

use std::time::Duration;

use fdtrace_tests::{Mode, Session, run_fdtrace};

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

#[test]
fn missing_pid_exits_2() {
    let f = run_fdtrace(&["--pid", "999999999"], Duration::from_secs(15));
    assert_eq!(
        f.status.code(),
        Some(2),
        "fdtrace --pid 999999999 should exit 2 (no such pid), got {}\nstderr: {}",
        f.status,
        f.stderr
    );
    assert!(
        f.stderr.contains("999999999"),
        "the message on stderr should name the pid: {:?}",
        f.stderr
    );
}

#[test]
fn missing_pid_among_good_ones_exits_2() {
    // fdops is only a live pid here; fdtrace must refuse the whole command line.
    let mut s = std::process::Command::new(FDOPS)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn fdops");
    let live = s.id().to_string();
    let f = run_fdtrace(
        &["--json", "--pid", &live, "--pid", "999999999"],
        Duration::from_secs(15),
    );
    let _ = s.kill();
    let _ = s.wait();
    assert_eq!(f.status.code(), Some(2), "stderr: {}", f.stderr);
    assert!(f.stderr.contains("999999999"), "stderr: {:?}", f.stderr);
}

#[test]
fn missing_command_fails() {
    let cmd = "/nonexistent/fdtrace-test-no-such-command";
    let f = run_fdtrace(&["--json", "run", "--", cmd], Duration::from_secs(15));
    assert!(
        f.status.code().is_some_and(|c| c != 0),
        "fdtrace run of a missing command should exit non-zero, got {}\nstderr: {}",
        f.status,
        f.stderr
    );
    assert!(
        f.stderr.contains("fdtrace-test-no-such-command"),
        "the message on stderr should name the command: {:?}",
        f.stderr
    );
}

/// `--duration` ends tracing with 0 and leaves the traced process alone.
#[test]
fn pid_duration_ends_with_0() {
    let mut s = Session::start_with(FDOPS, Mode::PID, 1, &["--duration", "3s"]);
    s.expect_fdtrace_exit_0_within(Duration::from_secs(8), "--duration 3s");
    let r = s.send_to(0, "ping");
    assert_eq!(
        r.pid(),
        s.pid(0),
        "fdops still works after fdtrace detached"
    );
}

#[test]
fn run_duration_ends_with_0() {
    let mut s = Session::start_with(FDOPS, Mode::RUN, 1, &["--duration", "3s"]);
    s.expect_fdtrace_exit_0_within(Duration::from_secs(8), "--duration 3s");
}

fn signal_ends_with_0(mode: Mode, sig: i32) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    s.ostep(p, "open", 1, 0, &[("file", 1)]);
    let st = s.signal_fdtrace(sig);
    assert_eq!(
        st.code(),
        Some(0),
        "fdtrace should exit 0 on signal {sig}, got {st}"
    );
    if matches!(mode, Mode::Pid { .. }) {
        // Detaching leaves the traced process running.
        let r = s.send_to(0, "ping");
        assert_eq!(r.pid(), p);
    }
}

#[test]
fn pid_sigint_ends_with_0() {
    signal_ends_with_0(Mode::PID, libc::SIGINT);
}

#[test]
fn pid_sigterm_ends_with_0() {
    signal_ends_with_0(Mode::PID, libc::SIGTERM);
}

#[test]
fn run_sigterm_ends_with_0() {
    signal_ends_with_0(Mode::RUN, libc::SIGTERM);
}
