//! Processes: fork (followed or not), exit, several traced processes, and
//! the `procs` map full.
//!
//! Each scenario runs in both modes: `<scenario>::run` (`fdtrace run --
//! fdops`) and `<scenario>::pid` (`fdtrace --pid <fdops>`). Needs root and a
//! built fdtrace (see `fdtrace_tests::fdtrace_bin`). Each test traces only
//! the processes it started, so the tests may run in parallel (cargo test's
//! default).

use std::time::Duration;

use std::time::Instant;

use fdtrace_tests::bpf_maps::{fd_entries, map_of};
use fdtrace_tests::{Expect, Mode, Session, both_modes, free_fd, proc_fds};

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

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

/// A child of a parent holding many close-on-exec fds gets them lazily (no
/// entry copied at fork: see PROC_LAZY in fdtrace-common). One child that
/// does not exec closes, replaces, duplicates, un-marks and close_ranges
/// them, some after the parent closed its own copy; another execs. Every
/// step is checked against /proc (counts and kinds), as is the parent.
fn lazy_children(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let many = s
        .ostep(p, "openmany 40 cloexec", 40, 0, &[("file", 40)])
        .0
        .fds("fds");
    let sp = s
        .ostep(p, "socketpair cloexec", 2, 0, &[("socket", 2)])
        .0
        .fds("fds");
    let plain = s.ostep(p, "open", 1, 0, &[("file", 1)]).0.fd();

    let c = traced_fork(&mut s, p);
    // The parent drops its copies of fds the child still holds.
    s.ostep(
        p,
        &format!("close {} {}", sp[0], many[0]),
        0,
        2,
        &[("socket", -1), ("file", -1)],
    );
    let child = |cmd: String| format!("child {c} {cmd}");
    s.ostep(
        c,
        &child(format!("close {} {}", sp[0], many[0])),
        0,
        2,
        &[("socket", -1), ("file", -1)],
    );
    s.ostep(c, &child(format!("dup {}", many[1])), 1, 0, &[("file", 1)]);
    s.ostep(
        c,
        &child(format!("dup2 {} {}", sp[1], many[2])),
        1,
        1,
        &[("socket", 1), ("file", -1)],
    );
    s.ostep(c, &child(format!("fionclex {}", many[3])), 0, 0, &[]);
    s.ostep(
        c,
        &child(format!("close_range {} {}", many[10], many[19])),
        0,
        10,
        &[("file", -10)],
    );
    s.ostep(
        c,
        &child(format!("close {}", many[3])),
        0,
        1,
        &[("file", -1)],
    );
    s.ostep(c, &child(format!("close {plain}")), 0, 1, &[("file", -1)]);
    s.check(p, fdtrace_tests::now_ts(), s.mark(), Expect::totals(0, 0));
    s.exit_child("", p, c);

    // A child that execs: the close-on-exec fds it inherited go with the
    // ones it made.
    let c = traced_fork(&mut s, p);
    s.ostep(
        c,
        &format!("child {c} close {}", many[5]),
        0,
        1,
        &[("file", -1)],
    );
    let (r, after) = s.step_expect(0, &format!("child {c} exec"), |r| Expect {
        exec: true,
        ..Expect::from_reply(r)
    });
    assert_eq!(
        r.pid(),
        c,
        "the exec reply comes from the child: {}",
        r.line
    );
    assert_eq!(r.num("exec"), 1);
    assert_eq!(after.comm, fdtrace_tests::proc_comm(c).unwrap());
    // Every close-on-exec fd the child inherited and still held went with
    // the exec (the parent had closed many[0] before this fork, the child
    // many[5]: their numbers were free for the child's own fds).
    let now = fdtrace_tests::proc_fds(c).unwrap();
    for fd in many[1..]
        .iter()
        .chain(&sp[1..])
        .filter(|&&fd| fd != many[5])
    {
        assert!(
            !now.contains_key(fd),
            "inherited close-on-exec fd {fd} survived exec: {now:?}"
        );
    }
    s.ostep(c, &format!("child {c} open"), 1, 0, &[("file", 1)]);
    s.exit_child("", p, c);
    s.check(p, fdtrace_tests::now_ts(), s.mark(), Expect::totals(0, 0));
    s.exit_target(0);
    s.expect_fdtrace_exit_0("its last traced process exited");
}
both_modes!(lazy_children, Mode::RUN, Mode::PID_FOLLOW);

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

/// A child's entries leave the kernel's fd map (FDS, read with bpftool)
/// at its exit: its closed ones, kept for the number's next fd, and fds
/// above the low numbers the kernel side marks as used (ProcStats::entries),
/// up to its high-water mark.
fn exit_frees_entries(mode: Mode) {
    let mut s = Session::start(FDOPS, mode);
    let p = s.pid(0);
    let fds_map = match map_of(s.fdtrace_pid as u32, "FDS") {
        Ok(Some(id)) => id,
        Ok(None) => s.fail("fdtrace holds no map named FDS"),
        Err(e) => s.fail(&e),
    };
    let c = traced_fork(&mut s, p);
    let child = |cmd: String| format!("child {c} {cmd}");
    let src = s
        .ostep(c, &child("open".into()), 1, 0, &[("file", 1)])
        .0
        .fd() as u32;
    for high in [200, 300] {
        s.ostep(
            c,
            &child(format!("dup2 {src} {high}")),
            1,
            0,
            &[("file", 1)],
        );
    }
    s.ostep(c, &child(format!("close {src}")), 0, 1, &[("file", -1)]);
    let held = fd_entries(fds_map, c as u32).unwrap_or_else(|e| s.fail(&e));
    for fd in [src, 200, 300] {
        if !held.contains(&fd) {
            s.fail(&format!("child {c}: no FDS entry for fd {fd}: {held:?}"));
        }
    }
    s.exit_child("", p, c);
    // The exit event is sent before the program drops the entries.
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let left = fd_entries(fds_map, c as u32).unwrap_or_else(|e| s.fail(&e));
        if left.is_empty() {
            break;
        }
        if Instant::now() > until {
            s.fail(&format!(
                "child {c} exited, its FDS entries stayed: {left:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    s.exit_target(0);
    s.expect_fdtrace_exit_0("its last traced process exited");
}
both_modes!(exit_frees_entries, Mode::RUN, Mode::PID_FOLLOW);

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
