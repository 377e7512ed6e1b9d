//! The dup family, close_range, and what exec closes: the close-on-exec
//! flags fdtrace tracks, and the inherited-fds finding.
//!
//! Each scenario runs in both modes: `<scenario>::run` (`fdtrace run --
//! fdops`) and `<scenario>::pid` (`fdtrace --pid <fdops>`). Needs root and a
//! built fdtrace (see `fdtrace_tests::fdtrace_bin`). Each test traces only
//! the processes it started, so the tests may run in parallel (cargo test's
//! default).

use fdtrace_tests::{
    Expect, Mode, Session, both_modes, free_fd, proc_cloexec, proc_comm, proc_fds,
};

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

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
