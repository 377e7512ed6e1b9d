//! Fds made and closed by every fd-creating syscall family: files and
//! failed opens, sockets, pipes, the anonymous-inode kinds, and fds of
//! another thread of the process.
//!
//! Each scenario runs in both modes: `<scenario>::run` (`fdtrace run --
//! fdops`) and `<scenario>::pid` (`fdtrace --pid <fdops>`). Needs root and a
//! built fdtrace (see `fdtrace_tests::fdtrace_bin`). Each test traces only
//! the processes it started, so the tests may run in parallel (cargo test's
//! default).

use fdtrace_tests::{Mode, Session, both_modes, proc_cloexec};

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

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

/// Fds opened by another thread are in the process's one fd table: counted
/// for the process, and closed by the main thread like its own.
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
