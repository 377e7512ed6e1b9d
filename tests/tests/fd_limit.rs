//! The fd limit: EMFILE from every fd-creating syscall, and RLIMIT_NOFILE
//! changed by another process.
//!
//! Each scenario runs in both modes: `<scenario>::run` (`fdtrace run --
//! fdops`) and `<scenario>::pid` (`fdtrace --pid <fdops>`). Needs root and a
//! built fdtrace (see `fdtrace_tests::fdtrace_bin`). Each test traces only
//! the processes it started, so the tests may run in parallel (cargo test's
//! default).

use fdtrace_tests::{Expect, Mode, Session, both_modes};

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

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
