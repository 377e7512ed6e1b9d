//! Usage errors: fdtrace refuses a bad command line with exit code 2 and a
//! message, before it loads anything.

use std::time::Duration;

use fdtrace_tests::run_fdtrace;

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
