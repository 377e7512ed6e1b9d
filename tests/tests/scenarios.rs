//! fdtrace against fdops, every scenario in both modes: `<scenario>::run`
//! (`fdtrace run -- fdops`) and `<scenario>::pid` (`fdtrace --pid <fdops>`).
//!
//! Needs root and a built fdtrace (see `fdtrace_tests::fdtrace_bin`). Each
//! test traces only the processes it started, so the tests may run in
//! parallel (cargo test's default).

use std::time::Duration;

use fdtrace_tests::{Expect, Mode, Session, assert_kind_delta, proc_cloexec, proc_comm, proc_fds};
use serde_json::Value;

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

/// Generates `mod NAME { fn run(); fn pid(); }` calling `NAME(mode)`.
macro_rules! both_modes {
    ($name:ident) => {
        both_modes!($name, Mode::RUN, Mode::PID);
    };
    ($name:ident, $run:expr, $pid:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn run() {
                super::$name($run);
            }

            #[test]
            fn pid() {
                super::$name($pid);
            }
        }
    };
}

/// A free fd number in `pid` well above every open one.
fn free_fd(pid: i32) -> i32 {
    proc_fds(pid).unwrap().keys().max().copied().unwrap_or(2) + 10
}

// ---- open, close and failures -------------------------------------------

fn open_close(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let (a, _) = s.ostep(p, "open", 1, 0, &[("file", 1)]);
    let (b, _) = s.ostep(p, "open cloexec", 1, 0, &[("file", 1)]);
    assert!(!proc_cloexec(p, a.fd()) && proc_cloexec(p, b.fd()));
    s.ostep(p, "open_legacy", 1, 0, &[("file", 1)]);
    s.ostep(p, "openat2", 1, 0, &[("file", 1)]);
    let (c, _) = s.ostep(p, "openat2 cloexec", 1, 0, &[("file", 1)]);
    assert!(proc_cloexec(p, c.fd()));
    let (d, _) = s.ostep(p, "creat", 1, 0, &[("file", 1)]);

    // Failed calls change nothing.
    let before = s.last(p);
    let (_, after) = s.ostep(p, "open_missing", 0, 0, &[]);
    assert_eq!(after.open_fds, before.open_fds);
    let (_, after) = s.ostep(p, "close_bad", 0, 0, &[]);
    assert_eq!(after.open_fds, before.open_fds);

    s.ostep(p, &format!("close {}", a.fd()), 0, 1, &[("file", -1)]);
    s.ostep(
        p,
        &format!("close {} {}", b.fd(), d.fd()),
        0,
        2,
        &[("file", -2)],
    );

    // Bulk: 40 opened, then all closed; then churn leaves the count as it was.
    let (m, _) = s.ostep(p, "openmany 40", 40, 0, &[("file", 40)]);
    let list: Vec<String> = m.fds("fds").iter().map(|f| f.to_string()).collect();
    s.ostep(
        p,
        &format!("close {}", list.join(" ")),
        0,
        40,
        &[("file", -40)],
    );
    let before = s.last(p);
    let (_, after) = s.ostep(p, "churn 200", 200, 200, &[]);
    assert_eq!(after.open_fds, before.open_fds);
}
both_modes!(open_close);

// ---- sockets and pipes --------------------------------------------------------

fn sockets(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let (a, _) = s.ostep(p, "socket", 1, 0, &[("socket", 1)]);
    let (b, _) = s.ostep(p, "socket cloexec", 1, 0, &[("socket", 1)]);
    assert!(!proc_cloexec(p, a.fd()) && proc_cloexec(p, b.fd()));
    s.ostep(p, "socketpair", 2, 0, &[("socket", 2)]);
    let (sp, _) = s.ostep(p, "socketpair cloexec", 2, 0, &[("socket", 2)]);
    assert!(sp.fds("fds").iter().all(|&f| proc_cloexec(p, f)));
    let (acc4, _) = s.ostep(p, "accept4 cloexec", 3, 0, &[("socket", 3)]);
    let f = acc4.fds("fds");
    assert!(
        !proc_cloexec(p, f[0]) && proc_cloexec(p, f[2]),
        "accept4 SOCK_CLOEXEC"
    );
    let (acc, _) = s.ostep(p, "accept", 3, 0, &[("socket", 3)]);
    assert!(!proc_cloexec(p, acc.fds("fds")[2]));
    s.ostep(
        p,
        &format!("close {} {} {}", f[0], f[1], f[2]),
        0,
        3,
        &[("socket", -3)],
    );
    s.ostep(p, &format!("close {}", a.fd()), 0, 1, &[("socket", -1)]);
}
both_modes!(sockets);

fn pipes(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let (a, _) = s.ostep(p, "pipe", 2, 0, &[("pipe", 2)]);
    let (b, _) = s.ostep(p, "pipe2 cloexec", 2, 0, &[("pipe", 2)]);
    assert!(b.fds("fds").iter().all(|&f| proc_cloexec(p, f)));
    assert!(a.fds("fds").iter().all(|&f| !proc_cloexec(p, f)));
    s.ostep(
        p,
        &format!("close {}", a.fds("fds")[0]),
        0,
        1,
        &[("pipe", -1)],
    );
    let fb = b.fds("fds");
    s.ostep(
        p,
        &format!("close {} {}", fb[0], fb[1]),
        0,
        2,
        &[("pipe", -2)],
    );
}
both_modes!(pipes);

// ---- dup family and close-on-exec flags ----------------------------------------

fn dup_family(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let a = s.ostep(p, "open", 1, 0, &[("file", 1)]).0.fd();
    let sk = s.ostep(p, "socket", 1, 0, &[("socket", 1)]).0.fd();
    let pp = s.ostep(p, "pipe", 2, 0, &[("pipe", 2)]).0.fds("fds");

    s.ostep(p, &format!("dup {a}"), 1, 0, &[("file", 1)]);
    // dup2 onto an open fd: one opened, one closed (implicitly), count unchanged,
    // and the socket it replaced is now a file.
    let before = s.last(p);
    let (r, after) = s.ostep(
        p,
        &format!("dup2 {a} {sk}"),
        1,
        1,
        &[("file", 1), ("socket", -1)],
    );
    assert_eq!(r.num("replaced"), 1);
    assert_eq!(
        after.open_fds, before.open_fds,
        "dup2 onto an open fd keeps the count"
    );
    // dup2 onto a free fd.
    let free = free_fd(p);
    s.ostep(p, &format!("dup2 {a} {free}"), 1, 0, &[("file", 1)]);
    // dup2 of an fd onto itself does nothing.
    s.ostep(p, &format!("dup2 {a} {a}"), 0, 0, &[]);
    // dup3 O_CLOEXEC onto a free fd, then onto an open pipe end.
    let free = free_fd(p);
    s.ostep(p, &format!("dup3 {a} {free} cloexec"), 1, 0, &[("file", 1)]);
    assert!(proc_cloexec(p, free));
    s.ostep(
        p,
        &format!("dup3 {a} {} cloexec", pp[0]),
        1,
        1,
        &[("file", 1), ("pipe", -1)],
    );
    assert!(proc_cloexec(p, pp[0]));
    // fcntl F_DUPFD / F_DUPFD_CLOEXEC.
    let (r, _) = s.ostep(p, &format!("dupfd {a} 100"), 1, 0, &[("file", 1)]);
    assert!(r.fd() >= 100 && !proc_cloexec(p, r.fd()));
    let (r, _) = s.ostep(p, &format!("dupfd_cloexec {a} 200"), 1, 0, &[("file", 1)]);
    assert!(r.fd() >= 200 && proc_cloexec(p, r.fd()));
    // Flag changes open and close nothing.
    s.ostep(p, &format!("setfd {a} on"), 0, 0, &[]);
    assert!(proc_cloexec(p, a));
    s.ostep(p, &format!("setfd {a} off"), 0, 0, &[]);
    assert!(!proc_cloexec(p, a));
    s.ostep(p, &format!("fioclex {a}"), 0, 0, &[]);
    assert!(proc_cloexec(p, a));
    s.ostep(p, &format!("fionclex {a}"), 0, 0, &[]);
    assert!(!proc_cloexec(p, a));
}
both_modes!(dup_family);

fn close_range(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let a = s.ostep(p, "open", 1, 0, &[("file", 1)]).0.fd();
    let sk = s.ostep(p, "socket", 1, 0, &[("socket", 1)]).0.fd();
    // Six fds at 300.. (mixed kinds), with a hole at the third.
    let mut high = Vec::new();
    for i in 0..6 {
        let (src, kind) = if i % 2 == 0 {
            (a, "file")
        } else {
            (sk, "socket")
        };
        let (r, _) = s.ostep(p, &format!("dupfd {src} 300"), 1, 0, &[(kind, 1)]);
        high.push(r.fd());
    }
    s.ostep(p, &format!("close {}", high[2]), 0, 1, &[("file", -1)]);
    let (lo, hi) = (high[0], high[5]);
    // CLOSE_RANGE_CLOEXEC closes nothing, marks them close-on-exec.
    let (r, _) = s.ostep(p, &format!("close_range {lo} {hi} cloexec"), 0, 0, &[]);
    assert_eq!(r.fds("fds").len(), 5);
    assert!(r.fds("fds").iter().all(|&f| proc_cloexec(p, f)));
    // close_range closes the five open ones in range.
    s.ostep(
        p,
        &format!("close_range {lo} {hi}"),
        0,
        5,
        &[("file", -2), ("socket", -3)],
    );
    // Up to the maximum fd.
    let mut top = Vec::new();
    for _ in 0..3 {
        top.push(
            s.ostep(p, &format!("dupfd {a} 500"), 1, 0, &[("file", 1)])
                .0
                .fd(),
        );
    }
    let (r, _) = s.ostep(
        p,
        &format!("close_range {} max", top[0]),
        0,
        3,
        &[("file", -3)],
    );
    assert_eq!(r.fds("fds"), top);
}
both_modes!(close_range);

// ---- fds of other kinds -------------------------------------------------------

fn anon_kinds(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let mut made = Vec::new();
    for (cmd, kind) in [
        ("eventfd", "eventfd"),
        ("eventfd cloexec", "eventfd"),
        ("eventfd legacy", "eventfd"),
        ("epoll", "epoll"),
        ("epoll cloexec", "epoll"),
        ("epoll legacy", "epoll"),
        ("timerfd", "timerfd"),
        ("timerfd cloexec", "timerfd"),
        ("signalfd", "signalfd"),
        ("signalfd cloexec", "signalfd"),
        ("signalfd legacy", "signalfd"),
        ("inotify", "inotify"),
        ("inotify cloexec", "inotify"),
        ("inotify legacy", "inotify"),
        ("memfd", "memfd"),
        ("memfd cloexec", "memfd"),
        ("pidfd", "pidfd"),
    ] {
        let (r, _) = s.ostep(p, cmd, 1, 0, &[(kind, 1)]);
        made.push((r.fd(), kind));
    }
    // Close one of each kind at a time.
    for (fd, kind) in made {
        s.ostep(p, &format!("close {fd}"), 0, 1, &[(kind, -1)]);
    }
}
both_modes!(anon_kinds);

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

/// Fds received with SCM_RIGHTS are counted under their real kind.
fn threads(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let (r, _) = s.ostep(p, "thread 12 5", 12, 5, &[("file", 7)]);
    assert_ne!(r.tid(), p, "the fds were made by another thread");
    let fds = r.fds("fds");
    assert_eq!(fds.len(), 7);
    // The main thread closes what the other one opened: one fd table.
    let list: Vec<String> = fds.iter().map(|f| f.to_string()).collect();
    s.ostep(
        p,
        &format!("close {}", list.join(" ")),
        0,
        7,
        &[("file", -7)],
    );
    s.ostep(p, "thread 3 3", 3, 3, &[]);
}
both_modes!(threads);

// ---- processes: fork, exec, exit ----------------------------------------------

fn fork(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    s.ostep(p, "open cloexec", 1, 0, &[("file", 1)]);
    let sp = s
        .ostep(p, "socketpair", 2, 0, &[("socket", 2)])
        .0
        .fds("fds");

    // Two control pipes (4 fds) made, the child's ends (2) closed.
    let idx = s.mark();
    let (r, _) = s.ostep(p, "fork", 4, 2, &[("pipe", 2)]);
    let c = r.num("child") as i32;
    let ev = s.wait_event(idx, &format!("fork object for child {c}"), |e| {
        e["type"] == "fork" && e["pid"].as_i64() == Some(c as i64)
    });
    assert_eq!(ev["ppid"].as_i64(), Some(p as i64), "fork object: {ev}");
    assert!(ev["ts"].as_f64().is_some(), "fork object: {ev}");
    // The child holds the inherited fds (and its ends of the control pipes).
    let snap = s.check(c, r.at, idx, Expect::first());
    assert_eq!(snap.proc.len() as i64, r.num("child_nfds"));
    assert_eq!(snap.comm, "fdops");

    // The child works on its own table; the parent's does not move.
    s.ostep(c, &format!("child {c} open"), 1, 0, &[("file", 1)]);
    s.ostep(c, &format!("child {c} socketpair"), 2, 0, &[("socket", 2)]);
    s.ostep(
        c,
        &format!("child {c} close {}", sp[0]),
        0,
        1,
        &[("socket", -1)],
    );
    s.ostep(
        c,
        &format!("child {c} dup2 {} {}", sp[1], free_fd(c)),
        1,
        0,
        &[("socket", 1)],
    );
    let now = fdtrace_tests::now_ts();
    s.check(p, now, s.mark(), Expect::totals(0, 0));
    assert!(
        proc_fds(p).unwrap().contains_key(&sp[0]),
        "the parent's copy is still open"
    );
    // And the other way round.
    s.ostep(p, &format!("close {}", sp[1]), 0, 1, &[("socket", -1)]);
    s.check(c, fdtrace_tests::now_ts(), s.mark(), Expect::totals(0, 0));

    // A grandchild, forked by the child, is followed too.
    let idx = s.mark();
    let (r, _) = s.ostep(c, &format!("child {c} fork"), 4, 2, &[("pipe", 2)]);
    let g = r.num("child") as i32;
    let ev = s.wait_event(idx, &format!("fork object for grandchild {g}"), |e| {
        e["type"] == "fork" && e["pid"].as_i64() == Some(g as i64)
    });
    assert_eq!(ev["ppid"].as_i64(), Some(c as i64), "fork object: {ev}");
    s.check(g, r.at, idx, Expect::first());
    s.ostep(
        g,
        &format!("child {c} child {g} pipe"),
        2,
        0,
        &[("pipe", 2)],
    );
    s.exit_child(&format!("child {c} "), c, g);

    // The child exits: an exit object with its final counts; the parent goes on.
    s.exit_child("", p, c);
    s.ostep(p, "open", 1, 0, &[("file", 1)]);
    s.exit_target(0);
    s.expect_fdtrace_exit_0("its last traced process exited");
}
both_modes!(fork, Mode::RUN, Mode::PID_FOLLOW);

/// Without following, children are not traced.
fn nofollow(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let idx = s.mark();
    let (r, _) = s.ostep(p, "fork", 4, 2, &[("pipe", 2)]);
    let c = r.num("child") as i32;
    let rc = s.send_to(0, &format!("child {c} open"));
    assert_eq!(rc.pid(), c);
    // Several intervals go by: fdtrace must never report on the child.
    s.settle(Duration::from_millis(500));
    s.check(p, fdtrace_tests::now_ts(), s.mark(), Expect::totals(0, 0));
    if let Some(e) = s.any_event(idx, |e| {
        e["pid"].as_i64() == Some(c as i64) && e["type"] != "fork"
    }) {
        s.fail(&format!(
            "child {c} is not followed, yet fdtrace reports on it: {e}"
        ));
    }
    s.exit_target(0);
    s.expect_fdtrace_exit_0("the only traced process exited");
}
both_modes!(nofollow, Mode::Run { follow: false }, Mode::PID);

fn exec(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let old = s.ostep(p, "open cloexec", 1, 0, &[("file", 1)]).0.fd();
    let keep = s.ostep(p, "socket", 1, 0, &[("socket", 1)]).0.fd();
    let (pp, _) = s.ostep(p, "pipe2 cloexec", 2, 0, &[("pipe", 2)]);

    let idx = s.mark();
    let (r, after) = s.step_expect(0, "exec", |r| Expect {
        exec: true,
        ..Expect::from_reply(r)
    });
    assert_eq!(r.pid(), p, "exec keeps the pid");
    assert_eq!(r.num("exec"), 1);
    let ev = s.wait_event(idx, &format!("exec object for pid {p}"), |e| {
        e["type"] == "exec" && e["pid"].as_i64() == Some(p as i64)
    });
    // execve of /proc/self/exe names the process "exe".
    let comm = proc_comm(p).unwrap();
    assert_eq!(
        ev["comm"].as_str(),
        Some(comm.as_str()),
        "exec object: {ev}"
    );
    assert_eq!(after.comm, comm);
    // Every close-on-exec fd is gone, every other one inherited.
    let now = proc_fds(p).unwrap();
    let mut gone = r.fds("cloexec");
    gone.push(old);
    gone.extend(pp.fds("fds"));
    for fd in gone {
        assert!(
            !now.contains_key(&fd),
            "close-on-exec fd {fd} survived exec: {now:?}"
        );
    }
    let mut kept = r.fds("kept");
    kept.push(keep);
    for fd in kept {
        assert!(
            now.contains_key(&fd),
            "fd {fd} should be inherited across exec: {now:?}"
        );
    }

    // The subprocess leak: what survived exec above stdio is reported, from
    // the kernel's table as it was at exec.
    let mut inherited: Vec<i32> = now.keys().copied().filter(|&fd| fd > 2).collect();
    inherited.sort_unstable();
    let finding = s.wait_event(idx, &format!("inherited finding for pid {p}"), |e| {
        e["type"] == "finding" && e["finding"] == "inherited" && e["pid"].as_i64() == Some(p as i64)
    });
    assert_eq!(
        finding["count"].as_u64(),
        Some(inherited.len() as u64),
        "{finding}"
    );
    let mut listed: Vec<i32> = finding["fds"]
        .as_array()
        .unwrap_or_else(|| panic!("fds list: {finding}"))
        .iter()
        .filter_map(|f| f.as_str()?.split(' ').next()?.parse().ok())
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, inherited, "{finding}");

    // Counting is exact again in the new image.
    s.ostep(p, "open", 1, 0, &[("file", 1)]);
    s.ostep(p, &format!("close {keep}"), 0, 1, &[("socket", -1)]);
    s.exit_target(0);
    s.expect_fdtrace_exit_0("its only traced process exited");
}
both_modes!(exec);

/// Fds open before fdtrace attached: their kinds and close-on-exec bits come
/// from the kernel walk at attach (the first snapshot checks the kinds
/// against /proc); exec must then close exactly the close-on-exec ones.
#[test]
fn exec_seeded() {
    let prep = [
        "open cloexec",
        "open",
        "pipe2 cloexec",
        "pipe",
        "socket cloexec",
        "socket",
        "eventfd cloexec",
        "memfd",
    ];
    let mut s = Session::start_prepared(FDOPS, &prep);
    let p = s.pid(0);
    let before = proc_fds(p).unwrap();
    let seeded_cloexec: Vec<i32> = before
        .keys()
        .copied()
        .filter(|&fd| proc_cloexec(p, fd))
        .collect();
    assert!(
        seeded_cloexec.len() >= 4,
        "prep made close-on-exec fds: {before:?}"
    );
    s.step_expect(0, "exec", |r| Expect {
        exec: true,
        ..Expect::from_reply(r)
    });
    let now = proc_fds(p).unwrap();
    for fd in seeded_cloexec {
        assert!(!now.contains_key(&fd), "fd {fd} survived exec: {now:?}");
    }
    s.ostep(p, "open", 1, 0, &[("file", 1)]);
    s.exit_target(0);
    s.expect_fdtrace_exit_0("its only traced process exited");
}

/// Sites count only fds older than `--min-age`. A process that opens fds
/// and then changes nothing must have them counted once they are old
/// enough, although fdtrace keeps the grouping of a table that did not
/// change from one report to the next. Checked against /proc: once every
/// fd is older than min-age, the site objects of one report add up to the
/// process's fds.
#[test]
fn sites_count_fds_once_old_enough() {
    let min_age = Duration::from_secs(1);
    let mut s = Session::start_with(FDOPS, Mode::PID, 1, &["--min-age", "1s", "--top", "1000"]);
    let p = s.pid(0);
    for _ in 0..3 {
        s.ostep(p, "open", 1, 0, &[("file", 1)]);
    }
    let want = proc_fds(p).unwrap().len() as u64;
    // The reports so far saw the 3 fds too young to count.
    s.settle(min_age + Duration::from_millis(500));
    let is_report = |e: &Value| e["type"] == "process" && e["pid"].as_i64() == Some(p.into());
    let mut idx = s.mark();
    // The first report regroups (the fds became old enough); the second
    // reuses that grouping (nothing changed): both must hold every fd.
    for _ in 0..2 {
        let report = s.wait_event(idx, &format!("a report on pid {p}"), is_report);
        let ts = report["ts"].clone();
        // A report's site objects come before the next report's process object.
        let next = s.wait_event(idx, &format!("the report after ts {ts}"), |e| {
            is_report(e) && e["ts"] != ts
        });
        let sites: Vec<&Value> = s
            .events_since(idx)
            .iter()
            .filter(|e| e["type"] == "site" && e["pid"].as_i64() == Some(p.into()) && e["ts"] == ts)
            .collect();
        let in_sites: u64 = sites.iter().filter_map(|e| e["open_fds"].as_u64()).sum();
        assert_eq!(report["open_fds"].as_u64(), Some(want), "{report}");
        assert_eq!(
            in_sites, want,
            "the sites of the report at ts {ts} should hold all {want} fds of pid {p} \
             (/proc/{p}/fd): {sites:?}"
        );
        idx = s
            .events_since(0)
            .iter()
            .position(|e| *e == next)
            .expect("the next report was received");
    }
    s.exit_target(0);
    s.expect_fdtrace_exit_0("its only traced process exited");
}

/// RLIMIT_NOFILE changed by another, untraced process (prlimit(1) calls
/// prlimit64 on the traced pid): fdtrace reports the new limit at once and
/// its process objects carry it (checked against /proc by the harness).
fn rlimit_from_another_process(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let hard = std::fs::read_to_string(format!("/proc/{p}/limits"))
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .expect("Max open files line");
    let idx = s.mark();
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &p.to_string(), &format!("--nofile=512:{hard}")])
        .status()
        .expect("run prlimit(1)");
    assert!(st.success(), "prlimit failed: {st}");
    let ev = s.wait_event(idx, &format!("rlimit object for pid {p}"), |e| {
        e["type"] == "rlimit" && e["pid"].as_i64() == Some(p as i64)
    });
    assert_eq!(ev["fd_soft_limit"].as_u64(), Some(512), "{ev}");
    // The next reports carry it; the harness compares them with /proc.
    s.ostep(p, "open", 1, 0, &[("file", 1)]);
    assert_eq!(s.last(p).obj["fd_soft_limit"].as_u64(), Some(512));
}
both_modes!(rlimit_from_another_process);

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

fn exit(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    s.ostep(p, "openmany 5", 5, 0, &[("file", 5)]);
    s.ostep(p, "socketpair", 2, 0, &[("socket", 2)]);
    s.ostep(p, "churn 10", 10, 10, &[]);
    let ev = s.exit_target(0);
    assert_eq!(ev["pid"].as_i64(), Some(p as i64));
    s.expect_fdtrace_exit_0("its only traced process exited");
}
both_modes!(exit);

// ---- fd limit -----------------------------------------------------------------

fn emfile(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    for (cmd, want_failed, in_thread) in [("emfile 5 3", 3, false), ("emfile 4 2 thread", 2, true)]
    {
        let idx = s.mark();
        let (r, _) = s.step_expect(0, cmd, |r| Expect {
            emfile: r.num("failed") as u64,
            ..Expect::from_reply(r)
        });
        assert_eq!(r.num("failed"), want_failed, "{}", r.line);
        assert_eq!(r.opened(), r.closed(), "the extra fds are closed again");
        assert!(r.opened() >= 4, "{}", r.line);
        assert_eq!(in_thread, r.tid() != p, "{}", r.line);
        let evs = s.emfile_events(p, idx);
        for e in &evs {
            assert_eq!(e["syscall"], "openat", "{e}");
            assert_eq!(e["errno"], "EMFILE", "{e}");
            assert_eq!(e["tid"].as_i64(), Some(r.tid() as i64), "{e}");
            assert!(e["ts"].as_f64().is_some(), "{e}");
        }
    }
}
both_modes!(emfile);

/// Every fd-creating syscall that fails with EMFILE is reported as such.
fn emfile_syscalls(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let idx = s.mark();
    let (r, _) = s.step_expect(0, "emfile_mixed 3", |r| Expect {
        emfile: r.num("failed") as u64,
        ..Expect::from_reply(r)
    });
    let mut want: Vec<String> = r.get("syscalls").split(',').map(String::from).collect();
    assert_eq!(want.len() as i64, r.num("failed"));
    let mut got: Vec<String> = s
        .emfile_events(p, idx)
        .iter()
        .map(|e| e["syscall"].as_str().unwrap_or("?").to_string())
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want, "syscalls of the emfile objects");
}
both_modes!(emfile_syscalls);

// ---- several processes ----------------------------------------------------------

/// `--pid A --pid B`: each is traced on its own; fdtrace ends with the last.
#[test]
fn pid_two_processes() {
    let mut s = Session::start_many(FDOPS, Mode::PID, 2);
    let (a, b) = (s.pid(0), s.pid(1));
    s.ostep_on(0, a, "open", 1, 0, &[("file", 1)]);
    s.check(b, fdtrace_tests::now_ts(), s.mark(), Expect::totals(0, 0));
    s.ostep_on(1, b, "socketpair", 2, 0, &[("socket", 2)]);
    s.check(a, fdtrace_tests::now_ts(), s.mark(), Expect::totals(0, 0));
    s.exit_target(0);
    s.expect_fdtrace_running("one of its two traced processes exited");
    s.ostep_on(1, b, "pipe", 2, 0, &[("pipe", 2)]);
    s.exit_target(1);
    s.expect_fdtrace_exit_0("both traced processes exited");
}

/// `fork` in fdops `p`, whose child must be traced: its fork object, and a
/// first snapshot checked against /proc. Returns the child's pid.
fn traced_fork(s: &mut Session, p: i32) -> i32 {
    let idx = s.mark();
    let (r, _) = s.ostep(p, "fork", 4, 2, &[("pipe", 2)]);
    let c = r.num("child") as i32;
    s.wait_event(idx, &format!("fork object for child {c}"), |e| {
        e["type"] == "fork" && e["pid"].as_i64() == Some(c as i64)
    });
    s.check(c, r.at, idx, Expect::first());
    c
}

/// More processes than `--max-procs`: the fork past the limit is counted and
/// reported as a full `procs` map, and the traced processes stay exact.
#[test]
fn procs_map_full() {
    let mut s = Session::start_with(FDOPS, Mode::RUN, 1, &["--max-procs", "2"]);
    let p = s.pid(0);
    let c = traced_fork(&mut s, p);

    // Both slots are taken: the next child is not traced.
    let idx = s.mark();
    let (r, _) = s.ostep(p, "fork", 4, 2, &[("pipe", 2)]);
    let untraced = r.num("child");
    let full = s.wait_event(idx, "a map_full object for procs", |e| {
        e["type"] == "map_full" && e["map"] == "procs"
    });
    assert_eq!(full["count"].as_u64(), Some(1), "{full}");
    assert_eq!(full["max_entries"].as_u64(), Some(2), "{full}");
    assert!(
        s.any_event(idx, |e| e["type"] == "fork"
            && e["pid"].as_i64() == Some(untraced))
            .is_none(),
        "child {untraced} is past --max-procs and must not be traced"
    );
    s.ostep(p, "open", 1, 0, &[("file", 1)]);
    s.ostep(c, &format!("child {c} open"), 1, 0, &[("file", 1)]);

    // A slot given back at exit is taken again by the next fork.
    s.exit_child("", p, c);
    let c2 = traced_fork(&mut s, p);
    s.exit_child("", p, c2);
    s.exit_target(0);
    s.expect_fdtrace_exit_0("its traced processes exited");
}

/// Waits until process `pid` is stopped (state T); returns the time then.
fn wait_stopped(pid: i32) -> f64 {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
        if state == Some(Some('T')) {
            return fdtrace_tests::now_ts();
        }
        assert!(
            std::time::Instant::now() < until,
            "pid {pid} did not stop: {stat}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child killed (after SIGCONT, in case it is stopped) when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let pid = self.0.id() as i32;
        // SAFETY: signals to our own child.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// `fdtrace --json --pid PID` with its process objects on a channel.
struct Watcher {
    _fdtrace: Killed,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watcher {
    fn start(pid: i32) -> Watcher {
        use std::process::{Command, Stdio};
        let mut ft = Command::new(fdtrace_tests::fdtrace_bin())
            .args(["--json", "--interval", "200ms", "--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fdtrace");
        let (tx, rx) = std::sync::mpsc::channel();
        fdtrace_tests::read_lines(ft.stdout.take().unwrap(), move |l, _| {
            l.is_some_and(|l| tx.send(l).is_ok())
        });
        Watcher {
            _fdtrace: Killed(ft),
            lines: rx,
        }
    }

    /// The first process object made after `after` (a timestamp) that
    /// compared the kernel's count with /proc's (drift not null).
    fn compared_after(&self, after: f64, what: &str) -> Value {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{what}: no report comparing with /proc: {e}"));
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["type"] == "process"
                && !v["drift"].is_null()
                && v["ts"].as_f64().is_some_and(|ts| ts > after)
            {
                return v;
            }
        }
    }
}

/// Attaching to a process that opens and closes fds flat out. The seed walk
/// writes each fd's entry in the kernel as it finds the fd, so one the
/// process closes meanwhile is not written back as open afterwards (when
/// user space wrote the entries after the walk, about one attach in five
/// counted one fd too many). Each round stops the process (SIGSTOP) a second
/// after attaching; its table is then still, and the first report that
/// compares must find fdtrace's count equal to /proc's: drift 0.
#[test]
fn attach_to_busy_process_is_exact() {
    use std::process::{Command, Stdio};
    fdtrace_tests::require_root();
    let busy = Command::new(env!("CARGO_BIN_EXE_fdloop"))
        .args(["open", "100000000000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start fdloop");
    let busy = Killed(busy);
    let pid = busy.0.id() as i32;
    for round in 1..=8 {
        // SAFETY: signal to our own child.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let w = Watcher::start(pid);
        std::thread::sleep(Duration::from_secs(1));
        // SAFETY: signal to our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        // Reports from before the stop may have compared at a moment the
        // loop was merely descheduled: only later ones count.
        let stopped = wait_stopped(pid);
        let report = w.compared_after(stopped, &format!("round {round}"));
        let proc_count = proc_fds(pid).expect("read /proc").len() as u64;
        assert_eq!(
            report["drift"].as_i64(),
            Some(0),
            "round {round}: fdtrace's count after attaching to a busy process, once it \
             stopped, against /proc/{pid}/fd ({proc_count} fds): {report}"
        );
        assert_eq!(report["open_fds"].as_u64(), Some(proc_count), "{report}");
    }
}

/// A thread that unshared its fd table (unshare(CLONE_FILES)) and opened 50
/// fds in it: /proc/PID/fd, the process's table, is the leader's, and so is
/// what fdtrace seeds from and reports. The kernel's walk of the process
/// also visits that thread's table; counting it would add 50 fds.
#[test]
fn thread_with_own_table_is_not_counted() {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};
    fdtrace_tests::require_root();
    const SCRIPT: &str = r#"
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
ready = threading.Event()
def own_table():
    if libc.unshare(0x400) != 0:  # CLONE_FILES
        print("unshare failed", ctypes.get_errno(), flush=True)
        os._exit(1)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(50)]
    ready.set()
    time.sleep(3600)
threading.Thread(target=own_table, daemon=True).start()
ready.wait()
print("ready", flush=True)
sys.stdin.read()
"#;
    let mut py = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3 (this test needs it)");
    let out = py.stdout.take().unwrap();
    let py = Killed(py);
    let pid = py.0.id() as i32;
    let mut first = String::new();
    BufReader::new(out)
        .read_line(&mut first)
        .expect("read python3");
    assert_eq!(first.trim(), "ready", "python3 said: {first}");
    let want = proc_fds(pid).expect("read /proc").len() as u64;
    let w = Watcher::start(pid);
    let report = w.compared_after(0.0, "thread_with_own_table");
    assert_eq!(
        (report["open_fds"].as_u64(), report["drift"].as_i64()),
        (Some(want), Some(0)),
        "pid {pid} holds {want} fds in /proc/{pid}/fd (its thread's own table \
         holds 50 more): {report}"
    );
}
