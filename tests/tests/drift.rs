//! Drift: a process sharing its fd table makes the kernel count differ from
//! /proc; fdtrace must report it and resync.
//!
//! Each scenario runs in both modes: `<scenario>::run` (`fdtrace run --
//! fdops`) and `<scenario>::pid` (`fdtrace --pid <fdops>`). Needs root and a
//! built fdtrace (see `fdtrace_tests::fdtrace_bin`). Each test traces only
//! the processes it started, so the tests may run in parallel (cargo test's
//! default).

use fdtrace_tests::{Expect, Mode, Session, assert_kind_delta, both_modes};

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

/// A process sharing the fd table (clone(CLONE_FILES) without CLONE_VM or
/// CLONE_THREAD) opens fds in it: the traced parent's kernel count does not see
/// them (a documented blind spot), so fdtrace reports the drift -3, resyncs,
/// and counts exactly again; the resynced fds behave like any other. Without
/// following, the sharer is not traced; with it (`drift_resync_follow`), it is
/// traced as a process of its own with a copy of the table, which changes
/// nothing for the parent.
fn drift_resync(mode: Mode) {
    let follow = matches!(
        mode,
        Mode::Run { follow: true } | Mode::Pid { follow: true }
    );
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    s.ostep(p, "socket", 1, 0, &[("socket", 1)]);
    let before = s.last(p);
    let idx = s.mark();
    let (r, shown, after) = s.step_drift(0, "shared_open 3", -3, Expect::from_reply);
    assert_eq!(r.pid(), p, "{}", r.line);
    assert_eq!(r.opened(), 3, "{}", r.line);
    let fds = r.fds("fds");
    assert_eq!(fds.len(), 3, "{}", r.line);
    let sharer = r.num("sharer");
    assert!(
        shown.iter().any(|e| e["drift"] == -3),
        "one report should show the whole drift -3 (kernel count 3 below /proc): {shown:?}"
    );
    // The kernel side saw nothing of it: count and totals as before.
    for e in &shown {
        assert_eq!(e["open_fds"].as_u64(), Some(before.open_fds), "{e}");
        assert_eq!(e["opened_total"].as_u64(), Some(before.opened), "{e}");
    }
    // After the resync: /proc's count and kinds, and the 3 fds it found
    // counted as opened.
    assert_eq!(after.open_fds, before.open_fds + 3);
    assert_eq!(after.opened, before.opened + 3);
    assert_kind_delta(&before, &after, &[("file", 3)]);

    // Only a followed process's forks are looked at: then the parent is
    // marked as sharing its table.
    assert_eq!(
        after.obj["shares_fd_table"].as_bool(),
        Some(follow),
        "{}",
        after.obj
    );
    if follow {
        let ev = s.wait_event(idx, &format!("fork object for sharer {sharer}"), |e| {
            e["type"] == "fork" && e["pid"].as_i64() == Some(sharer)
        });
        assert_eq!(ev["ppid"].as_i64(), Some(p as i64), "{ev}");
        // Its own copy of the table, with its 3 opens, when it exited.
        let ev = s.wait_event(idx, &format!("exit object for sharer {sharer}"), |e| {
            e["type"] == "exit" && e["pid"].as_i64() == Some(sharer)
        });
        assert_eq!(ev["open_fds"].as_u64(), Some(after.open_fds), "{ev}");
        assert_eq!(ev["opened_total"].as_u64(), Some(3), "{ev}");
        assert_eq!(ev["closed_total"].as_u64(), Some(0), "{ev}");
    } else if let Some(e) = s.any_event(idx, |e| e["pid"].as_i64() == Some(sharer)) {
        s.fail(&format!(
            "sharer {sharer} is not followed, yet fdtrace reports on it: {e}"
        ));
    }

    // Exact again: new fds, and the resynced ones, are counted like any.
    s.ostep(p, "open", 1, 0, &[("file", 1)]);
    s.ostep(p, &format!("close {}", fds[0]), 0, 1, &[("file", -1)]);
    s.ostep(p, &format!("dup {}", fds[1]), 1, 0, &[("file", 1)]);
    s.ostep(
        p,
        &format!("close {} {}", fds[1], fds[2]),
        0,
        2,
        &[("file", -2)],
    );
    s.exit_target(0);
    s.expect_fdtrace_exit_0("its only traced process exited");
}
both_modes!(drift_resync, Mode::Run { follow: false }, Mode::PID);

#[test]
fn drift_resync_follow() {
    drift_resync(Mode::RUN);
}
