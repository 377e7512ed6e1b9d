//! Usage errors: fdtrace refuses a bad command line or a bad option value
//! with exit code 2 and a message that says what is valid, before it loads
//! anything.
//!
//! The option checks run fdtrace as it is and need no root: fdtrace checks
//! its options before anything that needs privileges.

use std::time::Duration;

use fdtrace_tests::{run_fdtrace, run_fdtrace_rootless};

#[test]
fn bad_usage_exits_2() {
    for args in [
        &["--interval", "bogus", "--pid", "1"][..],
        &["--duration", "1parsec", "--pid", "1"][..],
        &["--pid"][..],
        &["--pid", "not-a-pid"][..],
        &["--no-such-flag"][..],
        &["run"][..],
    ] {
        let f = run_fdtrace(args, Duration::from_secs(15));
        assert_eq!(
            f.status.code(),
            Some(2),
            "fdtrace {args:?} should exit 2 (bad usage), got {}\nstderr: {}",
            f.status,
            f.stderr
        );
        assert!(
            !f.stderr.trim().is_empty(),
            "fdtrace {args:?}: no message on stderr"
        );
    }
}

/// No process has this pid (above the kernel's PID_MAX_LIMIT, 2^22): an
/// option fdtrace accepts gets it as far as the pid check, which fails with
/// exit 2 and names the pid, with no root and nothing loaded.
const NO_PID: &str = "999999999";

/// `fdtrace ARGS --pid NO_PID` run to its end.
fn run_with(args: &[&str]) -> fdtrace_tests::Finished {
    let mut argv = args.to_vec();
    argv.extend(["--pid", NO_PID]);
    run_fdtrace_rootless(&argv, Duration::from_secs(15))
}

/// fdtrace refuses `args` as a usage error (exit 2, clap's `error:` line, a
/// pointer to --help, nothing on stdout) whose message holds `says`.
fn refused(args: &[&str], says: &str) {
    let f = run_with(args);
    assert_eq!(
        f.status.code(),
        Some(2),
        "fdtrace {args:?} should exit 2 (bad usage), got {}\nstderr: {}",
        f.status,
        f.stderr
    );
    assert!(
        f.stderr.starts_with("error: ") && f.stderr.contains("--help"),
        "fdtrace {args:?}: not a usage message: {:?}",
        f.stderr
    );
    assert!(
        f.stderr.contains(says),
        "fdtrace {args:?}: the message should say {says:?}: {:?}",
        f.stderr
    );
    assert!(
        !f.stderr.contains(NO_PID),
        "fdtrace {args:?}: the option should be refused before the pid is looked up: {:?}",
        f.stderr
    );
    assert_eq!(f.stdout, "", "fdtrace {args:?}: stdout");
}

/// fdtrace accepts `args`: it goes on to the pid check.
fn accepted(args: &[&str]) {
    let f = run_with(args);
    assert!(
        f.status.code() == Some(2) && f.stderr.contains(&format!("no process with pid {NO_PID}")),
        "fdtrace {args:?} should pass its options and stop at the missing pid {NO_PID}, got {}\n\
         stderr: {}",
        f.status,
        f.stderr
    );
}

#[test]
fn window_shorter_than_3_intervals() {
    refused(
        &["--window", "0"],
        "--window 0s is shorter than 3 intervals of 1s: the leak rates need 3 reports in the \
         window; give --window 3s or longer",
    );
    refused(
        &["--window", "1s", "--interval", "1s"],
        "give --window 3s or longer",
    );
    refused(
        &["--window", "2s", "--interval", "700ms"],
        "give --window 2s 100ms or longer",
    );
    accepted(&["--window", "3s", "--interval", "1s"]);
}

#[test]
fn duration_shorter_than_one_interval() {
    refused(
        &["--duration", "0"],
        "--duration 0s is shorter than one interval (1s): fdtrace would stop before its first \
         report; give --duration 1s or longer",
    );
    refused(
        &["--duration", "1s", "--interval", "2s", "--window", "6s"],
        "give --duration 2s or longer",
    );
    accepted(&["--duration", "1s"]);
}

#[test]
fn pct_out_of_range() {
    let says = "give a percentage above 0 and at most 100";
    for opt in ["--warn-pct", "--crit-pct"] {
        for bad in ["150", "-5", "0", "NaN"] {
            refused(&[opt, bad], says);
        }
        refused(&[&format!("{opt}=-5")], says);
    }
    accepted(&["--warn-pct", "100", "--crit-pct", "100"]);
}

#[test]
fn crit_pct_below_warn_pct() {
    refused(
        &["--warn-pct", "80", "--crit-pct", "70"],
        "--crit-pct 70 is below --warn-pct 80: give --crit-pct between 80 and 100",
    );
    refused(
        &["--warn-pct", "95"],
        "--crit-pct 90 is below --warn-pct 95",
    );
    accepted(&["--warn-pct", "70", "--crit-pct", "70"]);
}

#[test]
fn crit_within_longer_than_warn_within() {
    refused(
        &["--crit-within", "2h"],
        "--crit-within 2h is longer than --warn-within 1h: give --crit-within 1h or shorter",
    );
    refused(
        &["--warn-within", "1m"],
        "--crit-within 5m is longer than --warn-within 1m",
    );
    accepted(&["--warn-within", "10m", "--crit-within", "10m"]);
}

/// Already refused before the other checks came (parse_interval); kept here
/// with the others so that every range of the README is checked.
#[test]
fn interval_zero() {
    refused(&["--interval", "0"], "the interval must be at least 10ms");
    accepted(&["--interval", "10ms", "--window", "30ms"]);
}

/// The largest --max-fds is the largest hash map the kernel creates (2^27
/// buckets, fdtrace's cli.rs says why); --max-procs was capped before.
#[test]
fn map_sizes_out_of_range() {
    for bad in ["0", "134217729"] {
        refused(
            &["--max-fds", bad],
            &format!("{bad} is not in 1..=134217728"),
        );
    }
    for bad in ["0", "65536"] {
        refused(&["--max-procs", bad], &format!("{bad} is not in 1..=65535"));
    }
    accepted(&["--max-fds", "1", "--max-procs", "1"]);
    accepted(&["--max-fds", "134217728", "--max-procs", "65535"]);
}

/// A `--host-root` that is not a directory is refused before anything is
/// loaded, naming it. One without `proc` is fine: /proc is fdtrace's own
/// (the DaemonSet mounts no host /proc).
#[test]
fn host_root_not_a_directory_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    let root = missing.to_str().expect("UTF-8 temp path");
    let me = std::process::id().to_string();
    let f = run_fdtrace_rootless(
        &["--host-root", root, "--pid", &me],
        Duration::from_secs(15),
    );
    assert_eq!(f.status.code(), Some(2), "stderr: {}", f.stderr);
    let says = format!("--host-root {root}: not a directory");
    assert!(f.stderr.contains(&says), "{:?} lacks {says:?}", f.stderr);
    assert!(f.stdout.is_empty(), "{}", f.stdout);
}
