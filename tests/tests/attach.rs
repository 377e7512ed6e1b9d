//! Attaching to a running process: the fds it already holds (seeded by the
//! kernel walk), a process busy opening and closing, a thread with a table
//! of its own.
//!
//! Needs root and a built fdtrace (see `fdtrace_tests::fdtrace_bin`).

use std::time::Duration;

use fdtrace_tests::{Expect, Session, proc_cloexec, proc_fds};
use serde_json::Value;

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

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

/// Pid 1, which on some hosts (this CI's sandbox init) lets root list
/// /proc/1/fd but not read its links, and whose fds the kernel's task_file
/// walk does not visit (nor do its syscalls reach the tracepoints): fdtrace
/// says so once, counts what /proc lists at every report, as `unknown`
/// where a link cannot be read, with no drift and no resync warning, while
/// pid 1 opens and closes fds (it serves the jobs of this CI). Elsewhere
/// (systemd, tini) it is a plain exact attach.
#[test]
fn init_is_counted_as_proc_lists_it() {
    let listed = || {
        std::fs::read_dir("/proc/1/fd")
            .expect("root lists /proc/1/fd")
            .count() as u64
    };
    let before = listed();
    let unreadable = std::fs::read_dir("/proc/1/fd")
        .unwrap()
        .filter(|e| std::fs::read_link(e.as_ref().unwrap().path()).is_err())
        .count() as u64;
    // What /proc listed while fdtrace ran: each report must be one of
    // these counts' range.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut lo, mut hi) = (u64::MAX, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let n = listed();
                (lo, hi) = (lo.min(n), hi.max(n));
                std::thread::sleep(Duration::from_millis(10));
            }
            (lo, hi)
        })
    };
    let f = fdtrace_tests::run_fdtrace(
        &[
            "--pid",
            "1",
            "--json",
            "--interval",
            "1s",
            "--duration",
            "3s",
        ],
        Duration::from_secs(30),
    );
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (lo, hi) = sampler.join().expect("sampler");
    let (lo, hi) = (lo.min(before), hi.max(before));
    assert!(f.status.success(), "fdtrace failed: {}", f.stderr);
    assert!(
        !f.stderr.contains("resync"),
        "no resync is needed or reported: {}",
        f.stderr
    );
    let hidden = f.stderr.contains("counted from /proc at every report");
    let reports: Vec<Value> = f
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("NDJSON"))
        .filter(|v| v["type"] == "process")
        .collect();
    assert!(reports.len() >= 2, "a report a second: {}", f.stdout);
    for r in &reports {
        let open = r["open_fds"].as_u64().expect("open_fds");
        assert!(
            (lo..=hi).contains(&open),
            "/proc/1/fd listed {lo} to {hi} fds while fdtrace ran, fdtrace counts {open}: {r}"
        );
        assert!(
            r["drift"].is_null() || r["drift"] == 0,
            "no drift against /proc: {r}"
        );
        if unreadable == before && before > 0 {
            // No link of pid 1 reads: every fd of it is `unknown`.
            assert_eq!(
                r["by_kind"]["unknown"].as_u64(),
                Some(open),
                "links root cannot read are `unknown`: {r}"
            );
            assert!(
                hidden,
                "a table the kernel walk cannot see is said to be counted from /proc: {}",
                f.stderr
            );
        }
    }
}
