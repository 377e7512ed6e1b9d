//! The live top view on a real terminal: fdtrace under tmux, tracing more
//! processes than the pane has lines, so that it takes the screen. The
//! screen is read with `capture-pane`; its counts are checked against
//! /proc/PID/fd, and the keys are typed with `send-keys`.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use fdtrace_tests::{fdtrace_bin, proc_fds, require_root};

/// The pane: 40 processes do not fit its 30 lines.
const PANE_COLS: u16 = 160;
const PANE_ROWS: u16 = 30;
const IDLE: usize = 39;
const IDLE_FDS: u64 = 20;
/// fds the leaker opens per second, against its soft limit: EMFILE in about
/// 200 s, critical (within 5 minutes) from its first rates on.
const LEAK_RATE: u64 = 5;
const LEAKER_SOFT_LIMIT: u64 = 1024;
/// fdtrace loads its programs and attaches to 40 processes on a loaded
/// machine.
const SCREEN_TIMEOUT: Duration = Duration::from_secs(60);
const KEY_TIMEOUT: Duration = Duration::from_secs(10);

/// An `fdloop node` process; dropping it closes its stdin (it exits) and
/// reaps it.
struct Node {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Kept open: fdloop reports on it after each toggle, and a closed pipe
    /// would end it.
    _stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl Node {
    /// `soft_limit`: its RLIMIT_NOFILE soft limit, if not the test's.
    fn start(kind: &str, name: &str, n: u64, soft_limit: Option<u64>) -> Node {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fdloop"));
        cmd.args(["node", kind, name, &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(soft) = soft_limit {
            // SAFETY: between fork and exec only async-signal-safe calls:
            // getrlimit and setrlimit.
            unsafe {
                cmd.pre_exec(move || {
                    let mut l = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    l.rlim_cur = soft.min(l.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        let mut child = cmd.spawn().expect("start fdloop");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        stdout
            .read_line(&mut line)
            .expect("read fdloop's ready line");
        let pid = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in fdloop's line {line:?}"));
        Node {
            stdin: child.stdin.take(),
            _stdout: stdout,
            child,
            pid,
        }
    }

    /// Starts or pauses its activity.
    fn toggle(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"x").expect("toggle fdloop");
        stdin.flush().expect("toggle fdloop");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            thread::sleep(Duration::from_millis(50));
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A tmux server of its own (`-L`), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The visible pane.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "top"])
    }

    /// The pane and its scrollback: what was printed after the screen was
    /// left.
    fn history(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-S", "-", "-t", "top"])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// The first capture of `what` that `ok` accepts, or a failure that shows
    /// the last one.
    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < timeout,
                "no {what} on the screen within {timeout:?}; the pane shows:\n{screen}\n\
                 and its history:\n{}",
                self.history()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// tmux, installed from Debian's packages when missing.
fn ensure_tmux() {
    let present = |()| {
        Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if present(()) {
        return;
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "tmux"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .expect("run apt-get");
    assert!(
        status.success() && present(()),
        "apt-get install tmux failed"
    );
}

/// The table row of `pid` on a screen, split into cells.
fn row_of(screen: &str, pid: u32) -> Option<Vec<String>> {
    let pid = pid.to_string();
    screen
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.get(1) == Some(&pid))
}

/// The open fds of a row's FDS/LIMIT cell.
fn open_fds(row: &[String]) -> u64 {
    row[3]
        .split('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no FDS/LIMIT in {row:?}"))
}

#[test]
fn top_view_redraws_in_place_and_quits_to_the_summary() {
    require_root();
    ensure_tmux();
    let idle: Vec<Node> = (0..IDLE)
        .map(|_| Node::start("idle", "topidle", IDLE_FDS, None))
        .collect();
    let mut leaker = Node::start("leak", "topleak", LEAK_RATE, Some(LEAKER_SOFT_LIMIT));
    leaker.toggle();

    let mut cmd = format!("{} --interval 500ms", fdtrace_bin().display());
    for pid in idle.iter().map(|n| n.pid).chain([leaker.pid]) {
        cmd.push_str(&format!(" --pid {pid}"));
    }
    // The shell keeps the pane after fdtrace ends, to read its summary and
    // exit code.
    let shell = format!("{cmd}; echo fdtrace exited with $?; sleep 600");
    let tmux = Tmux {
        socket: format!("fdtrace-top-{}", std::process::id()),
    };
    tmux.tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        &PANE_COLS.to_string(),
        "-y",
        &PANE_ROWS.to_string(),
        &shell,
    ]);

    let leaker_pid = leaker.pid;
    // The leaker is ranked first, critical, once the window has the three
    // reports of a rate.
    let first = tmux.wait_for("ranked leaker row", SCREEN_TIMEOUT, |s| {
        s.lines()
            .skip_while(|l| !l.contains("STATUS"))
            .nth(1)
            .is_some_and(|l| {
                l.starts_with("critical")
                    && l.contains(&leaker_pid.to_string())
                    && l.contains("topleak")
            })
    });
    let lines: Vec<&str> = first.lines().collect();
    assert!(
        lines[0].starts_with("fdtrace ") && lines[0].contains("40 processes"),
        "header: {first}"
    );
    for col in [
        "STATUS",
        "PID",
        "COMM",
        "FDS/LIMIT",
        "USED",
        "LEAK/s",
        "EMFILE IN",
        "TOP SITE",
    ] {
        assert!(lines[2].contains(col), "{col} in the header row: {first}");
    }
    assert!(
        lines.last().is_some_and(|l| l.starts_with("q quit")),
        "key help on the last line: {first}"
    );
    let row = row_of(&first, leaker_pid).expect("leaker row");
    assert_eq!(
        row[0], "critical",
        "a leaker at {LEAK_RATE} fds/s of {LEAKER_SOFT_LIMIT} is at risk: {row:?}"
    );
    assert!(
        row[3].ends_with(&format!("/{LEAKER_SOFT_LIMIT}")),
        "{row:?}"
    );

    // An idle process's count is /proc's.
    let idle_shown = idle
        .iter()
        .find_map(|n| row_of(&first, n.pid).map(|r| (n.pid, r)))
        .expect("an idle process on the screen");
    let proc_count = proc_fds(idle_shown.0 as i32).expect("read /proc").len() as u64;
    assert_eq!(open_fds(&idle_shown.1), proc_count, "{:?}", idle_shown.1);
    assert_eq!(idle_shown.1[2], "topidle");

    // Redrawn in place: the clock and the leaker's count move.
    let before = open_fds(&row);
    let second = tmux.wait_for("a redraw", KEY_TIMEOUT, |s| {
        s.lines().next() != first.lines().next()
            && row_of(s, leaker_pid).is_some_and(|r| open_fds(&r) > before)
    });
    assert_eq!(
        second.lines().count(),
        first.lines().count(),
        "the same screen, redrawn: {second}"
    );
    let after = open_fds(&row_of(&second, leaker_pid).unwrap());
    let live = proc_fds(leaker_pid as i32).expect("read /proc").len() as u64;
    assert!(
        after <= live,
        "the screen ({after}) cannot be ahead of /proc ({live}) for a process that only opens"
    );

    // The container view: every process is the host's here.
    tmux.keys(&["c"]);
    let containers = tmux.wait_for("the container view", KEY_TIMEOUT, |s| {
        s.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("containers"))
    });
    let host = containers
        .lines()
        .find(|l| l.contains("(host)"))
        .unwrap_or_else(|| panic!("no (host) row: {containers}"));
    assert_eq!(
        host.split_whitespace().nth(2),
        Some("40"),
        "40 processes: {host}"
    );
    tmux.keys(&["c"]);

    // A filter typed: only the leaker is left.
    tmux.keys(&["/", "topleak", "Enter"]);
    let filtered = tmux.wait_for("the filtered view", KEY_TIMEOUT, |s| {
        s.contains("filter: topleak (1 of 40)")
    });
    assert!(row_of(&filtered, leaker_pid).is_some(), "{filtered}");
    assert!(
        idle.iter().all(|n| row_of(&filtered, n.pid).is_none()),
        "{filtered}"
    );

    // q leaves the screen; the summary is printed on the normal screen.
    tmux.keys(&["q"]);
    let start = Instant::now();
    let history = loop {
        let h = tmux.history();
        if h.contains("fdtrace exited with") {
            break h;
        }
        assert!(
            start.elapsed() < KEY_TIMEOUT,
            "fdtrace did not end after q; the pane shows:\n{}",
            tmux.screen()
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(history.contains("fdtrace exited with 0"), "{history}");
    let summary = history
        .split("Summary (")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary after q: {history}"));
    assert!(
        summary.lines().any(
            |l| l.split_whitespace().next() == Some(&leaker_pid.to_string())
                && l.contains("topleak")
                && l.contains("running")
        ),
        "the leaker in the summary: {summary}"
    );
    assert!(
        !summary.contains("q quit"),
        "the summary is printed after the screen is left: {summary}"
    );
}

/// `--all` on a terminal: the screen from the first frame, even when every
/// process of the host would fit the pane as lines.
#[test]
fn all_takes_the_screen_from_the_first_frame() {
    require_root();
    ensure_tmux();
    let host = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
        })
        .count();
    // Room for every process of the host and as many again.
    let rows = (2 * host + 50).to_string();
    let shell = format!(
        "{} --all --no-stacks --interval 500ms; echo fdtrace exited with $?; sleep 600",
        fdtrace_bin().display()
    );
    let tmux = Tmux {
        socket: format!("fdtrace-top-all-{}", std::process::id()),
    };
    tmux.tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        &PANE_COLS.to_string(),
        "-y",
        &rows,
        &shell,
    ]);
    // Every capture until the screen shows is blank: no line output first.
    let start = Instant::now();
    let screen = loop {
        let s = tmux.screen();
        let first = s.lines().find(|l| !l.trim().is_empty());
        match first {
            Some(l) if l.starts_with("fdtrace ") && l.contains(" processes") => break s,
            Some(l) => panic!("line output before the screen: {l:?}\n{s}"),
            None => {}
        }
        assert!(
            start.elapsed() < SCREEN_TIMEOUT,
            "no screen within {SCREEN_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        screen
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("q quit")),
        "key help on the last line: {screen}"
    );
    // Once a report is in, its rows are the host's processes, with counts
    // that are /proc's (this shell of the pane holds still).
    let shown = tmux.wait_for("a report", SCREEN_TIMEOUT, |s| {
        s.lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(2)?.parse::<usize>().ok())
            .is_some_and(|n| n > 10)
    });
    let n: usize = shown
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        n + 10 < 2 * host + 50,
        "{n} processes fit the pane's {rows} lines"
    );
    tmux.keys(&["q"]);
    let start = Instant::now();
    let history = loop {
        let h = tmux.history();
        if h.contains("fdtrace exited with") {
            break h;
        }
        assert!(
            start.elapsed() < KEY_TIMEOUT,
            "fdtrace did not end after q; the pane shows:\n{}",
            tmux.screen()
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(history.contains("fdtrace exited with 0"), "{history}");
    assert!(history.contains("Summary ("), "{history}");
}
