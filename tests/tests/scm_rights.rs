//! Fds passed with SCM_RIGHTS, and the recvmmsg cap past which fdtrace
//! resyncs.
//!
//! Each scenario runs in both modes: `<scenario>::run` (`fdtrace run --
//! fdops`) and `<scenario>::pid` (`fdtrace --pid <fdops>`). Needs root and a
//! built fdtrace (see `fdtrace_tests::fdtrace_bin`). Each test traces only
//! the processes it started, so the tests may run in parallel (cargo test's
//! default).

use fdtrace_tests::{Expect, Mode, Session, assert_kind_delta, both_modes, proc_cloexec};

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

/// Fds passed with SCM_RIGHTS: counts, kinds (resolved from /proc, the
/// syscall does not say) and MSG_CMSG_CLOEXEC.
fn scm_rights(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    // socketpair + /dev/null + pipe, and 3 received copies of the last three.
    let kinds = [("socket", 2), ("file", 2), ("pipe", 4)];
    let (r, _) = s.ostep(p, "scm", 8, 0, &kinds);
    let recv = r.fds("recv");
    assert_eq!(recv.len(), 3);
    assert!(recv.iter().all(|&f| !proc_cloexec(p, f)));
    let (rc, _) = s.ostep(p, "scm cloexec", 8, 0, &kinds);
    assert!(
        rc.fds("recv").iter().all(|&f| proc_cloexec(p, f)),
        "MSG_CMSG_CLOEXEC"
    );
    // The received fds are ordinary fds: closing them is counted.
    let cmd = format!("close {} {} {}", recv[0], recv[1], recv[2]);
    s.ostep(p, &cmd, 0, 3, &[("file", -1), ("pipe", -2)]);
}
both_modes!(scm_rights);

/// Messages fdtrace decodes per recvmmsg call (README, known blind spots).
const RECVMMSG_CAP: usize = 8;

/// SCM_RIGHTS fds received with one recvmmsg: up to the cap they are counted
/// like any; past it the process is marked inexact, the fds of the extra
/// messages are missed (a drift) and the resync brings them back.
fn scm_many_resync(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    // At the cap: exact. socketpair + /dev/null + 8 received copies of it.
    let n = RECVMMSG_CAP;
    let (r, _) = s.ostep(
        p,
        &format!("scm_many {n}"),
        3 + n as u64,
        0,
        &[("socket", 2), ("file", 1 + n as i64)],
    );
    assert_eq!(r.fds("recv").len(), n);

    // Past it: 10 messages of one fd each; fdtrace decodes 8 and the resync
    // finds the last 2.
    let m = RECVMMSG_CAP + 2;
    let before = s.last(p);
    let (r, shown, after) = s.step_drift(0, &format!("scm_many {m}"), -2, Expect::from_reply);
    let recv = r.fds("recv");
    assert_eq!(recv.len(), m, "{}", r.line);
    assert_eq!(r.opened(), 3 + m as u64, "{}", r.line);
    assert!(
        shown.iter().any(|e| e["drift"] == -2),
        "one report should show the whole drift -2: {shown:?}"
    );
    assert_kind_delta(&before, &after, &[("socket", 2), ("file", 1 + m as i64)]);

    // Exact again; the fds of the missed messages (added by the resync) and
    // of the decoded ones are closed like any other.
    let (last, first) = (recv[m - 1], recv[0]);
    s.ostep(p, &format!("close {last}"), 0, 1, &[("file", -1)]);
    s.ostep(p, &format!("close {first}"), 0, 1, &[("file", -1)]);
    s.ostep(p, &format!("dup {}", recv[m - 2]), 1, 0, &[("file", 1)]);
    s.ostep(p, "scm", 8, 0, &[("socket", 2), ("file", 2), ("pipe", 4)]);
}
both_modes!(scm_many_resync);
