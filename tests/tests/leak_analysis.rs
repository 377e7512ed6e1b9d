//! Leak analysis: fdtrace against programs that leak fds at known rates
//! (tests/leakers/), checked against those rates, the status thresholds and
//! /proc.
//!
//! Each test runs one leaker for [`DURATION`] under
//! `fdtrace --json --interval 1s --window 10s --duration 16s`, by `--pid` once
//! the leaker printed `ready <pid>` (Python: the interpreter's start-up is not
//! traced, the `subprocess` children are not followed), or under `fdtrace run`
//! (the C leaker: traced from its first syscall, its stacks symbolized from its
//! debug info). Then it checks the last report of the leaking pid: the `site`
//! objects printed with its last `process` object (the fastest-growing site
//! must have the kind and resource of the leak and its rate, ±20%), the
//! process's `leak_per_s` (±20%), `seconds_to_emfile` (±25% of
//! (fd_soft_limit - open_fds) / true rate, from the same object) and `status`
//! (against the thresholds), plus the findings and the exit code.
//!
//! The ground truth: each leaker calls its leak at a constant rate paced on the
//! monotonic clock (the k-th call at t0 + k/rate), and the test checks that
//! rate on /proc/PID/fd during the run, so a leaker starved by a busy machine
//! fails as such, not as an fdtrace error.
//!
//! Running time: every run takes about 20 s and the tests would wait for each
//! other two at a time (cargo test runs as many tests at once as there are
//! CPUs), so the first test to start launches the runs of all the selected
//! tests at once, in background threads, and each test then waits for its own
//! run (see [`outcome`]). Each run traces only the processes it started, and
//! everything it started is killed when it ends. If the test process dies
//! instead, its children go too: the ones it spawns get `PR_SET_PDEATHSIG`
//! (fdtrace SIGTERM, the others SIGKILL), and the leakers exit by themselves
//! once orphaned (leak2, fdtrace's child under `run`, cannot use
//! PR_SET_PDEATHSIG: it fires when the parent *thread* that forked it ends).
//! Only the temporary directories stay; the next run removes them.
//!
//! One more test drives fdops instead ([`sites_count_fds_once_old_enough`]):
//! the site objects against /proc under `--min-age`.
//!
//! Needs root, gcc, python3 and a built fdtrace, like the other tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use fdtrace_tests::{
    KINDS, Mode, Session, fdtrace_bin, now_ts, proc_comm, proc_fds, read_lines, require_root, tail,
};
use serde_json::Value;

const FDOPS: &str = env!("CARGO_BIN_EXE_fdops");

/// The leaker programs.
const LEAKERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/leakers");

const INTERVAL: &str = "1s";
const WINDOW: &str = "10s";
const WINDOW_S: f64 = 10.0;
/// How long fdtrace runs (`--duration`).
const DURATION: Duration = Duration::from_secs(16);
/// The RLIMIT_NOFILE soft limit every leaker sets itself.
const SOFT_LIMIT: u64 = 1024;

/// Tolerance of a leak rate reported by fdtrace against the true rate.
const RATE_TOL: f64 = 0.20;
/// Tolerance of `seconds_to_emfile` against (limit - open_fds) / true rate.
const ETA_TOL: f64 = 0.25;
/// Tolerance of the leak rate measured on /proc against the nominal one (a
/// leaker outside it did not do its job: the run proves nothing).
const TRUTH_TOL: f64 = 0.10;

/// Status thresholds (fdtrace's defaults).
const WARN_PCT: f64 = 80.0;
const CRIT_PCT: f64 = 90.0;
const WARN_WITHIN_S: f64 = 3600.0;
const CRIT_WITHIN_S: f64 = 300.0;

// Rates (fds per second), chosen so that the expected status holds for any
// rate within RATE_TOL of the true one: 1024 fds within 5 minutes is critical,
// the logging leak (2/s: about 500 s to EMFILE) is a warning.
const HTTP_RATE: f64 = 20.0;
const SQLITE_RATE: f64 = 20.0;
const POPEN_RATE: f64 = 10.0;
const LOGGING_RATE: f64 = 2.0;
const LEAK2_SOCKET_RATE: f64 = 12.0;
const LEAK2_FILE_RATE: f64 = 5.0;
/// Churn of healthy.py (open+close iterations per second).
const HEALTHY_CHURN: f64 = 200.0;

/// How long a leaker (or the HTTP server) may take to print its first line.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long fdtrace may take to load and attach, on a busy 2-CPU machine
/// running all the tests at once.
const START_TIMEOUT: Duration = Duration::from_secs(30);

// ---- the scenarios --------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scn {
    Http,
    Sqlite,
    Popen,
    Logging,
    Leak2,
    Healthy,
}

impl Scn {
    const ALL: [Scn; 6] = [
        Scn::Http,
        Scn::Sqlite,
        Scn::Popen,
        Scn::Logging,
        Scn::Leak2,
        Scn::Healthy,
    ];

    /// The name of its #[test] function (to honour cargo test's filters).
    fn test_name(self) -> &'static str {
        match self {
            Scn::Http => "http_client_leak",
            Scn::Sqlite => "sqlite_leak",
            Scn::Popen => "popen_leak",
            Scn::Logging => "logging_leak",
            Scn::Leak2 => "c_two_leaking_functions",
            Scn::Healthy => "healthy_program_no_leak",
        }
    }

    /// True net growth of the process's fds per second.
    fn rate(self) -> f64 {
        match self {
            Scn::Http => HTTP_RATE,
            Scn::Sqlite => SQLITE_RATE,
            Scn::Popen => POPEN_RATE,
            Scn::Logging => LOGGING_RATE,
            Scn::Leak2 => LEAK2_SOCKET_RATE + LEAK2_FILE_RATE,
            Scn::Healthy => 0.0,
        }
    }

    /// `fdtrace run` (traced from exec) rather than `--pid`.
    fn run_mode(self) -> bool {
        self == Scn::Leak2
    }

    /// More fdtrace flags, and the exit code fdtrace must end with.
    fn fail_on(self) -> (&'static [&'static str], i32) {
        match self {
            // It reaches critical: --fail-on makes the end exit 3.
            Scn::Leak2 => (&["--fail-on", "critical"], 3),
            // It never gets near critical: 0.
            Scn::Healthy => (&["--fail-on", "critical"], 0),
            _ => (&[], 0),
        }
    }

    fn index(self) -> usize {
        Scn::ALL.iter().position(|s| *s == self).unwrap()
    }
}

// ---- what a run produced ------------------------------------------------------

/// One fdtrace run against one leaker, for the checks.
struct Outcome {
    scn: Scn,
    /// fdtrace's arguments.
    args: Vec<String>,
    /// The leaker's pid.
    pid: i32,
    /// fdtrace's exit status; None if it had to be killed.
    status: Option<ExitStatus>,
    /// Every JSON object fdtrace printed, in order.
    events: Vec<Value>,
    /// Other lines of fdtrace's stdout.
    junk: Vec<String>,
    stderr: String,
    /// stderr of the leaker (and of the HTTP server, prefixed).
    leaker_stderr: String,
    /// When fdtrace was started (Unix seconds).
    started: f64,
    /// Leak rate of the leaker measured on /proc/PID/fd during the run, with
    /// the two counts and the seconds between them.
    truth: Option<(f64, usize, usize, f64)>,
    /// The HTTP server's port.
    port: Option<u16>,
    /// The directory the leaker writes into (canonical).
    dir: Option<PathBuf>,
    /// What went wrong while running (fdtrace killed, ...).
    notes: Vec<String>,
}

/// A line of a child's stdout, or its end (None).
type Line = (Option<String>, f64);

fn spawn_lines<R: Read + Send + 'static>(r: R) -> Receiver<Line> {
    let (tx, rx) = mpsc::channel();
    read_lines(r, move |line, at| tx.send((line, at)).is_ok());
    rx
}

fn spawn_collector<R: Read + Send + 'static>(mut r: R, into: Arc<Mutex<String>>, prefix: &str) {
    let prefix = prefix.to_string();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut first = true;
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut s = into.lock().unwrap();
                    if first {
                        s.push_str(&prefix);
                        first = false;
                    }
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        }
    });
}

/// Kills what it holds when dropped (children, pids that still have their
/// expected comm) and removes its directories.
#[derive(Default)]
struct Reaper {
    children: Vec<Child>,
    pids: Vec<(i32, String)>,
    dirs: Vec<PathBuf>,
}

impl Reaper {
    fn kill_pids(&mut self) {
        for (pid, comm) in self.pids.drain(..) {
            if proc_comm(pid).is_ok_and(|c| c == comm) {
                // SAFETY: plain kill of a process this test started (checked
                // by its comm).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_pids();
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Spawns `cmd` so that it gets `sig` when the thread that spawned it ends.
fn spawn_tied(cmd: &mut Command, sig: i32) -> io::Result<Child> {
    // SAFETY: only prctl (async-signal-safe) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The real Python interpreter (`python3` here may be a pyenv shim, a shell
/// script that execs it: it would be the traced process otherwise).
fn python() -> Result<PathBuf, String> {
    static PY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("run python3: {e}: the leak tests need python3"))?;
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || p.is_empty() || !Path::new(&p).is_file() {
            return Err(format!(
                "python3 -c 'import sys; print(sys.executable)' gave {p:?} ({})",
                out.status
            ));
        }
        Ok(PathBuf::from(p))
    })
    .clone()
}

/// Waits for the first line of a child, `<word> <number>`; returns the number.
fn wait_first_line(rx: &Receiver<Line>, word: &str, what: &str) -> Result<i64, String> {
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok((Some(line), _)) => line
            .strip_prefix(word)
            .and_then(|r| r.trim().parse().ok())
            .ok_or_else(|| format!("{what}: first line {line:?}, expected '{word} N'")),
        Ok((None, _)) | Err(RecvTimeoutError::Disconnected) => {
            Err(format!("{what} ended before printing '{word} N'"))
        }
        Err(RecvTimeoutError::Timeout) => {
            Err(format!("{what} printed nothing within {READY_TIMEOUT:?}"))
        }
    }
}

fn fd_count(pid: i32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Removes the directories left by test processes that were killed (named
/// `fdtrace-leaks-<pid>-...` after a pid that is gone).
fn remove_stale_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("fdtrace-leaks-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh directory for one run; its name holds digits (the test's pid), so
/// that fdtrace's labels must show them as `N`.
fn make_dir(scn: Scn, reaper: &mut Reaper) -> Result<PathBuf, String> {
    let d = std::env::temp_dir().join(format!(
        "fdtrace-leaks-{}-{}",
        std::process::id(),
        scn.test_name()
    ));
    let _ = std::fs::remove_dir_all(&d);
    remove_stale_dirs();
    std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    reaper.dirs.push(d.clone());
    std::fs::canonicalize(&d).map_err(|e| format!("canonicalize {}: {e}", d.display()))
}

/// Runs scenario `scn` from start to end; everything it started is gone when
/// it returns.
fn run(scn: Scn) -> Result<Outcome, String> {
    let mut reaper = Reaper::default();
    let stderr_leaker = Arc::new(Mutex::new(String::new()));
    let mut port = None;
    let mut dir = None;
    let rate = |r: f64| format!("{r}");

    // The leaker's command line.
    let argv: Vec<String> = match scn {
        Scn::Leak2 => {
            let d = make_dir(scn, &mut reaper)?;
            let exe = d.join("leak2");
            let out = Command::new("gcc")
                .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
                .arg(&exe)
                .arg(Path::new(LEAKERS).join("leak2.c"))
                .output()
                .map_err(|e| format!("run gcc: {e}: the leak tests need gcc"))?;
            if !out.status.success() {
                return Err(format!(
                    "gcc leak2.c failed: {}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            dir = Some(d);
            vec![
                exe.to_string_lossy().to_string(),
                rate(LEAK2_SOCKET_RATE),
                rate(LEAK2_FILE_RATE),
            ]
        }
        _ => {
            let py = python()?.to_string_lossy().to_string();
            let script = |s: &str| format!("{LEAKERS}/{s}");
            match scn {
                Scn::Http => {
                    let mut srv = spawn_tied(
                        Command::new(&py)
                            .arg(script("http_server.py"))
                            .stdin(Stdio::null())
                            .stdout(Stdio::piped())
                            .stderr(Stdio::piped()),
                        libc::SIGKILL,
                    )
                    .map_err(|e| format!("spawn {py} http_server.py: {e}"))?;
                    let rx = spawn_lines(srv.stdout.take().unwrap());
                    spawn_collector(
                        srv.stderr.take().unwrap(),
                        stderr_leaker.clone(),
                        "[http_server.py] ",
                    );
                    reaper.children.push(srv);
                    let p = wait_first_line(&rx, "port", "http_server.py")?;
                    port = Some(p as u16);
                    vec![
                        py,
                        script("http_client_leak.py"),
                        rate(HTTP_RATE),
                        p.to_string(),
                    ]
                }
                Scn::Sqlite | Scn::Logging => {
                    let d = make_dir(scn, &mut reaper)?;
                    let (s, r) = if scn == Scn::Sqlite {
                        ("sqlite_leak.py", SQLITE_RATE)
                    } else {
                        ("logging_leak.py", LOGGING_RATE)
                    };
                    let v = vec![py, script(s), rate(r), d.to_string_lossy().to_string()];
                    dir = Some(d);
                    v
                }
                Scn::Popen => vec![py, script("popen_leak.py"), rate(POPEN_RATE)],
                Scn::Healthy => vec![py, script("healthy.py"), rate(HEALTHY_CHURN)],
                Scn::Leak2 => unreachable!(),
            }
        }
    };

    let bin = fdtrace_bin();
    let mut args: Vec<String> = [
        "--json",
        "--interval",
        INTERVAL,
        "--window",
        WINDOW,
        "--duration",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("{}s", DURATION.as_secs()));
    args.extend(scn.fail_on().0.iter().map(|s| s.to_string()));

    // --pid: start the leaker, wait for `ready`, then attach.
    let mut pid = 0;
    if !scn.run_mode() {
        let mut c = spawn_tied(
            Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            libc::SIGKILL,
        )
        .map_err(|e| format!("spawn {argv:?}: {e}"))?;
        let rx = spawn_lines(c.stdout.take().unwrap());
        spawn_collector(c.stderr.take().unwrap(), stderr_leaker.clone(), "");
        let cpid = c.id() as i32;
        reaper.children.push(c);
        let ready = wait_first_line(&rx, "ready", &argv[1])
            .map_err(|e| format!("{e}\nstderr: {}", stderr_leaker.lock().unwrap()))?;
        if ready != cpid as i64 {
            return Err(format!("{argv:?} says ready {ready}, its pid is {cpid}"));
        }
        pid = cpid;
        args.push("--pid".into());
        args.push(pid.to_string());
    } else {
        args.push("run".into());
        args.push("--".into());
        args.extend(argv.iter().cloned());
    }

    let started = now_ts();
    let t0 = Instant::now();
    let mut fdtrace = spawn_tied(
        Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        libc::SIGTERM,
    )
    .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let out = spawn_lines(fdtrace.stdout.take().unwrap());
    let stderr = Arc::new(Mutex::new(String::new()));
    spawn_collector(fdtrace.stderr.take().unwrap(), stderr.clone(), "");

    let mut o = Outcome {
        scn,
        args,
        pid,
        status: None,
        events: Vec::new(),
        junk: Vec::new(),
        stderr: String::new(),
        leaker_stderr: String::new(),
        started,
        truth: None,
        port,
        dir,
        notes: Vec::new(),
    };
    // /proc samples: a little after the start and a little before the end.
    let sample_at = [
        t0 + Duration::from_secs(3),
        t0 + DURATION - Duration::from_secs(2),
    ];
    let mut samples: Vec<(Instant, usize)> = Vec::new();
    let deadline = t0 + START_TIMEOUT + DURATION;
    let mut eof = false;
    let mut killed = false;
    loop {
        match out.recv_timeout(Duration::from_millis(20)) {
            Ok((Some(line), _)) => {
                if line.starts_with('{') {
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.is_object() => o.events.push(v),
                        _ => o.junk.push(line),
                    }
                } else if let Some(p) = line.strip_prefix("ready ") {
                    // Under `run`, the leaker writes to fdtrace's stdout.
                    match p.trim().parse::<i32>() {
                        Ok(p) if o.pid == 0 => {
                            o.pid = p;
                            reaper.pids.push((p, "leak2".into()));
                        }
                        _ => o.junk.push(line),
                    }
                } else if !line.trim().is_empty() {
                    o.junk.push(line);
                }
            }
            Ok((None, _)) | Err(RecvTimeoutError::Disconnected) => eof = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if o.pid > 0 && samples.len() < sample_at.len() && now >= sample_at[samples.len()] {
            if let Some(n) = fd_count(o.pid) {
                samples.push((now, n));
            } else {
                o.notes.push(format!(
                    "/proc/{}/fd unreadable {:?} after fdtrace started: the leaker died?",
                    o.pid,
                    now - t0
                ));
                samples.push((now, usize::MAX));
            }
        }
        if o.status.is_none()
            && let Ok(Some(st)) = fdtrace.try_wait()
        {
            o.status = Some(st);
            // The leaker under `run` shares fdtrace's stdout: without it the
            // pipe ends.
            reaper.kill_pids();
        }
        if eof && o.status.is_some() {
            break;
        }
        if o.status.is_none() && !killed && now >= deadline {
            killed = true;
            o.notes.push(format!(
                "fdtrace still ran {:?} after it started with --duration {}s: killed",
                now - t0,
                DURATION.as_secs()
            ));
            let _ = fdtrace.kill();
            let _ = fdtrace.wait();
            reaper.kill_pids();
        }
        if o.status.is_none() && now >= deadline + Duration::from_secs(5) {
            break;
        }
        if eof && o.status.is_none() {
            // stdout closed but fdtrace still runs: wait for it a little.
            if let Ok(Some(st)) = fdtrace.wait_timeout_compat(Duration::from_secs(5)) {
                o.status = Some(st);
            }
            break;
        }
    }
    let _ = fdtrace.kill();
    let _ = fdtrace.wait();
    if let [(ta, a), (tb, b)] = samples[..]
        && a != usize::MAX
        && b != usize::MAX
    {
        let dt = (tb - ta).as_secs_f64();
        o.truth = Some(((b as f64 - a as f64) / dt, a, b, dt));
    }
    drop(reaper);
    // Let the collectors drain.
    thread::sleep(Duration::from_millis(50));
    o.stderr = stderr.lock().unwrap().clone();
    o.leaker_stderr = stderr_leaker.lock().unwrap().clone();
    Ok(o)
}

/// `Child::wait` with a timeout (polling).
trait WaitTimeout {
    fn wait_timeout_compat(&mut self, d: Duration) -> io::Result<Option<ExitStatus>>;
}

impl WaitTimeout for Child {
    fn wait_timeout_compat(&mut self, d: Duration) -> io::Result<Option<ExitStatus>> {
        let until = Instant::now() + d;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---- running all the selected scenarios at once ---------------------------------

type Shared = Arc<Result<Outcome, String>>;

struct Slot {
    started: Mutex<bool>,
    done: Mutex<Option<Shared>>,
    cv: Condvar,
}

fn slots() -> &'static [Slot] {
    static SLOTS: OnceLock<Vec<Slot>> = OnceLock::new();
    SLOTS.get_or_init(|| {
        Scn::ALL
            .iter()
            .map(|_| Slot {
                started: Mutex::new(false),
                done: Mutex::new(None),
                cv: Condvar::new(),
            })
            .collect()
    })
}

/// Starts the run of `scn` in a background thread unless it is started.
fn start(scn: Scn) {
    let slot = &slots()[scn.index()];
    {
        let mut st = slot.started.lock().unwrap();
        if *st {
            return;
        }
        *st = true;
    }
    thread::spawn(move || {
        let r = panic::catch_unwind(AssertUnwindSafe(|| run(scn))).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("the run panicked: {msg}"))
        });
        *slot.done.lock().unwrap() = Some(Arc::new(r));
        slot.cv.notify_all();
    });
}

/// Whether the test of `scn` is selected by the command line of the test
/// binary (cargo test's filters, `--exact`, `--skip`). A guess that errs
/// either way is harmless: an unselected run started is only wasted, and a
/// selected run not started here starts when its test asks for it.
fn selected(scn: Scn) -> bool {
    const WITH_VALUE: [&str; 7] = [
        "--test-threads",
        "--skip",
        "--logfile",
        "--format",
        "--color",
        "--shuffle-seed",
        "-Z",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exact = args.iter().any(|a| a == "--exact");
    let name = scn.test_name();
    let hit = |f: &str| if exact { name == f } else { name.contains(f) };
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--skip" {
            if let Some(v) = args.get(i + 1) {
                skips.push(v.clone());
            }
            i += 2;
            continue;
        }
        if WITH_VALUE.contains(&a.as_str()) {
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            filters.push(a.clone());
        }
        i += 1;
    }
    (filters.is_empty() || filters.iter().any(|f| hit(f))) && !skips.iter().any(|s| hit(s))
}

/// The outcome of the run of `scn`: the first call starts the runs of all the
/// selected tests at once; each call waits for its own.
fn outcome(scn: Scn) -> Done {
    require_root();
    static PRESTART: Once = Once::new();
    PRESTART.call_once(|| {
        for s in Scn::ALL {
            if selected(s) {
                start(s);
            }
        }
    });
    start(scn);
    let slot = &slots()[scn.index()];
    let limit = READY_TIMEOUT * 2 + START_TIMEOUT + DURATION + Duration::from_secs(30);
    let until = Instant::now() + limit;
    let mut done = slot.done.lock().unwrap();
    while done.is_none() {
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{}: the run did not end within {limit:?}",
            scn.test_name()
        );
        done = slot.cv.wait_timeout(done, left).unwrap().0;
    }
    let r = done.clone().unwrap();
    if let Err(e) = &*r {
        panic!("{}: could not run the scenario: {e}", scn.test_name());
    }
    Done(r)
}

/// A finished run (it went through: [`outcome`] checked).
struct Done(Shared);

impl std::ops::Deref for Done {
    type Target = Outcome;

    fn deref(&self) -> &Outcome {
        self.0.as_ref().as_ref().expect("checked by outcome()")
    }
}

// ---- checks -------------------------------------------------------------------

/// `s` with every run of ASCII digits replaced by `N` (fdtrace's file labels).
fn digits_to_n(s: &str) -> String {
    let mut out = String::new();
    let mut in_digits = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('N');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
    out
}

/// The status the thresholds give.
fn status_for(open: f64, soft: f64, eta: Option<f64>, exhausted: bool) -> &'static str {
    let pct = open * 100.0 / soft;
    let eta = eta.unwrap_or(f64::INFINITY);
    if exhausted {
        "exhausted"
    } else if pct >= CRIT_PCT || eta <= CRIT_WITHIN_S {
        "critical"
    } else if pct >= WARN_PCT || eta <= WARN_WITHIN_S {
        "warning"
    } else {
        "ok"
    }
}

/// Function name of a stack frame: `func (file:line)`, `func`, or
/// `module+0xoff` (no function).
fn frame_func(frame: &str) -> &str {
    frame.split_whitespace().next().unwrap_or("")
}

fn stack_has(site: &Value, func: &str) -> bool {
    site["stack"].as_array().is_some_and(|st| {
        st.iter()
            .any(|f| f.as_str().is_some_and(|f| frame_func(f) == func))
    })
}

fn f64_of(v: &Value, k: &str) -> Option<f64> {
    v[k].as_f64()
}

fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs()
}

/// The last report of the leaking pid: its last `process` object that came
/// with `site` objects (those with the same ts), and those sites.
struct Report<'a> {
    process: &'a Value,
    sites: Vec<&'a Value>,
}

impl Outcome {
    fn name(&self) -> &'static str {
        self.scn.test_name()
    }

    fn is_pid(&self, v: &Value) -> bool {
        v["pid"].as_i64() == Some(self.pid as i64)
    }

    fn of_type<'a>(&'a self, ty: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events
            .iter()
            .filter(move |v| v["type"] == ty && self.is_pid(v))
    }

    fn findings<'a>(&'a self, kind: &'a str) -> Vec<&'a Value> {
        self.of_type("finding")
            .filter(|v| v["finding"] == kind)
            .collect()
    }

    /// Dumps what helps to understand a failure, then panics.
    #[track_caller]
    fn fail(&self, msg: &str) -> ! {
        let mut s = String::new();
        let _ = writeln!(s, "{}: {msg}", self.name());
        let _ = writeln!(s, "--- fdtrace {}", self.args.join(" "));
        let _ = writeln!(
            s,
            "--- leaker pid {}; fdtrace exit status {}; /proc rate {}",
            self.pid,
            match self.status {
                Some(st) => st.to_string(),
                None => "none (killed)".into(),
            },
            match self.truth {
                Some((r, a, b, dt)) => format!("{r:.2}/s ({a} -> {b} fds in {dt:.1}s)"),
                None => "unknown".into(),
            }
        );
        if let Some(t) = self.of_type("process").find_map(|v| f64_of(v, "ts")) {
            let _ = writeln!(
                s,
                "--- first process object {:.2} s after fdtrace started",
                t - self.started
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "--- note: {n}");
        }
        let _ = writeln!(
            s,
            "--- fdtrace stderr (last 4000 bytes):\n{}",
            tail(&self.stderr, 4000)
        );
        if !self.leaker_stderr.is_empty() {
            let _ = writeln!(s, "--- leaker stderr:\n{}", tail(&self.leaker_stderr, 2000));
        }
        let findings: Vec<&Value> = self
            .events
            .iter()
            .filter(|v| v["type"] == "finding")
            .collect();
        let _ = writeln!(s, "--- findings ({}; last 10):", findings.len());
        for v in findings.iter().rev().take(10).rev() {
            let _ = writeln!(s, "{v}");
        }
        let _ = writeln!(
            s,
            "--- last JSON objects of fdtrace ({} in all):",
            self.events.len()
        );
        let n = self.events.len();
        for v in &self.events[n.saturating_sub(30)..] {
            let _ = writeln!(s, "{v}");
        }
        if !self.junk.is_empty() {
            let j = &self.junk[self.junk.len().saturating_sub(10)..];
            let _ = writeln!(s, "--- other stdout lines (last 10): {j:?}");
        }
        panic!("{s}");
    }

    /// Checks that the run went as planned and the objects have the shape
    /// of the contract; returns the last report of the leaking pid.
    fn basics(&self) -> Report<'_> {
        if self.pid <= 0 {
            self.fail("the leaker never printed 'ready <pid>'");
        }
        let (_, want_exit) = self.scn.fail_on();
        match self.status.and_then(|s| s.code()) {
            Some(c) if c == want_exit => {}
            _ => self.fail(&format!(
                "fdtrace should have ended by itself (--duration) with exit code {want_exit}{}",
                if want_exit == 3 {
                    " (--fail-on critical, and the process reached critical)"
                } else {
                    ""
                }
            )),
        }
        // The leaker did its job (or the run proves nothing).
        let rate = self.scn.rate();
        match self.truth {
            None => self.fail("test environment: no /proc/PID/fd samples of the leaker"),
            Some((r, a, b, _)) => {
                let ok = if rate == 0.0 {
                    a.abs_diff(b) <= 2
                } else {
                    within(r, rate, TRUTH_TOL)
                };
                if !ok {
                    self.fail(&format!(
                        "test environment: the leaker's fds grew by {r:.2}/s on /proc \
                         ({a} -> {b}), it should leak {rate}/s (±{}%): machine too busy?",
                        TRUTH_TOL * 100.0
                    ));
                }
            }
        }
        // Shapes.
        for v in self.of_type("process") {
            for k in ["leak_per_s", "open_fds", "fd_soft_limit"] {
                if f64_of(v, k).is_none() {
                    self.fail(&format!("process object without a number {k}: {v}"));
                }
            }
            if !["ok", "warning", "critical", "exhausted"]
                .contains(&v["status"].as_str().unwrap_or(""))
            {
                self.fail(&format!("process object with a bad or no status: {v}"));
            }
            match v.get("seconds_to_emfile") {
                Some(Value::Null) => {}
                Some(x) if x.is_number() => {}
                _ => self.fail(&format!(
                    "process object: seconds_to_emfile must be a number or null: {v}"
                )),
            }
        }
        let mut ids: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut per_ts: BTreeMap<String, usize> = BTreeMap::new();
        for v in self.of_type("site") {
            let site = v["site"].as_str().unwrap_or("");
            let kind = v["kind"].as_str().unwrap_or("");
            let res = v["resource"].as_str();
            let stack_ok = v["stack"]
                .as_array()
                .is_some_and(|a| a.iter().all(|f| f.is_string()));
            let nums_ok = ["ts", "leak_per_s", "oldest_age_s"]
                .iter()
                .all(|k| f64_of(v, k).is_some())
                && v["open_fds"].as_u64().is_some()
                && f64_of(v, "oldest_age_s").is_some_and(|a| a >= 0.0);
            if site.is_empty() || !KINDS.contains(&kind) || res.is_none() || !stack_ok || !nums_ok {
                self.fail(&format!(
                    "site object not as the contract says (site: non-empty string, kind: one of \
                     {KINDS:?}, resource: string, stack: array of strings, open_fds: integer, \
                     leak_per_s/oldest_age_s: numbers, age >= 0): {v}"
                ));
            }
            let key = (kind.to_string(), res.unwrap().to_string());
            if let Some(prev) = ids.insert(site.to_string(), key.clone())
                && prev != key
            {
                self.fail(&format!(
                    "site id {site} is not stable: it was {prev:?}, now {key:?}: {v}"
                ));
            }
            *per_ts.entry(v["ts"].to_string()).or_default() += 1;
        }
        if let Some((ts, n)) = per_ts.iter().find(|(_, n)| **n > 10) {
            self.fail(&format!(
                "{n} site objects for pid {} at ts {ts}: --top defaults to 10",
                self.pid
            ));
        }
        for v in self.of_type("finding") {
            for k in ["finding", "message", "recommendation"] {
                if v[k].as_str().is_none_or(|s| s.is_empty()) {
                    self.fail(&format!("finding without {k}: {v}"));
                }
            }
        }
        // The last process object that came with sites.
        let procs: Vec<&Value> = self.of_type("process").collect();
        if procs.is_empty() {
            self.fail(&format!("no process object for pid {}", self.pid));
        }
        let sites: Vec<&Value> = self.of_type("site").collect();
        for (i, p) in procs.iter().enumerate().rev() {
            let ts = f64_of(p, "ts").unwrap_or(0.0);
            let with: Vec<&Value> = sites
                .iter()
                .copied()
                .filter(|s| (f64_of(s, "ts").unwrap_or(0.0) - ts).abs() < 0.5)
                .collect();
            if !with.is_empty() {
                if procs.len() - i > 3 {
                    self.fail(&format!(
                        "the last {} process objects of pid {} came without site objects",
                        procs.len() - i - 1,
                        self.pid
                    ));
                }
                return Report {
                    process: p,
                    sites: with,
                };
            }
        }
        // Even the healthy program has sites to report: its rotating pool of
        // files, its churn. --top lists the top sites whatever their rate.
        self.fail(&format!(
            "fdtrace printed no site object for pid {} (with a process object)",
            self.pid
        ));
    }

    /// Checks the process object of the last report against the true rate:
    /// leak_per_s, seconds_to_emfile and status.
    fn check_process(&self, p: &Value, want_status: &str) {
        let rate = self.scn.rate();
        let leak = f64_of(p, "leak_per_s").unwrap();
        let open = f64_of(p, "open_fds").unwrap();
        let soft = f64_of(p, "fd_soft_limit").unwrap();
        if soft != SOFT_LIMIT as f64 {
            self.fail(&format!(
                "fd_soft_limit should be {SOFT_LIMIT} (the leaker sets it): {p}"
            ));
        }
        if f64_of(p, "emfile_errors") != Some(0.0) {
            self.fail(&format!(
                "emfile_errors should be 0: the leaker stays far below its limit: {p}"
            ));
        }
        if !within(leak, rate, RATE_TOL) {
            self.fail(&format!(
                "process leak_per_s {leak} should be {rate} ±{}%: {p}",
                RATE_TOL * 100.0
            ));
        }
        let want_eta = (soft - open) / rate;
        let eta = f64_of(p, "seconds_to_emfile");
        match eta {
            Some(e) if within(e, want_eta, ETA_TOL) => {}
            _ => self.fail(&format!(
                "seconds_to_emfile should be ({soft} - {open}) / {rate} = {want_eta:.1} ±{}%: {p}",
                ETA_TOL * 100.0
            )),
        }
        // The status the thresholds give, with the true rate (unambiguous: the
        // same anywhere within the rate tolerance), and with fdtrace's numbers.
        let truth = status_for(open, soft, Some(want_eta), false);
        for k in [1.0 - RATE_TOL, 1.0 + RATE_TOL] {
            let s = status_for(open, soft, Some((soft - open) / (rate * k)), false);
            assert_eq!(
                s, truth,
                "test bug: the status of a {rate}/s leak at {open}/{soft} fds is ambiguous"
            );
        }
        assert_eq!(
            truth,
            want_status,
            "test bug: the rate of {} gives {truth}",
            self.name()
        );
        let status = p["status"].as_str().unwrap_or("");
        if status != truth {
            self.fail(&format!(
                "status {status:?}, should be {truth:?}: {open}/{soft} fds, about {want_eta:.0} s \
                 to EMFILE at the true {rate}/s (critical: >= {CRIT_PCT}% or <= {CRIT_WITHIN_S} s; \
                 warning: >= {WARN_PCT}% or <= {WARN_WITHIN_S} s): {p}"
            ));
        }
        let own = status_for(open, soft, eta, false);
        if status != own {
            self.fail(&format!(
                "status {status:?} does not follow from the object's own numbers (gives {own:?}): {p}"
            ));
        }
    }

    /// Checks a leaking site: its rate against `rate`, its age and count.
    fn check_site(&self, p: &Value, s: &Value, rate: f64, what: &str) {
        let leak = f64_of(s, "leak_per_s").unwrap();
        if !within(leak, rate, RATE_TOL) {
            self.fail(&format!(
                "{what}: leak_per_s {leak} should be {rate} ±{}%: {s}",
                RATE_TOL * 100.0
            ));
        }
        let n = s["open_fds"].as_u64().unwrap();
        // It has leaked since fdtrace attached (well over 10 s ago).
        if (n as f64) < rate * 8.0 || n > p["open_fds"].as_u64().unwrap_or(0) {
            self.fail(&format!(
                "{what}: open_fds {n} should be at least {} (8 s of a {rate}/s leak) and at most \
                 the process's {}: {s}",
                rate * 8.0,
                p["open_fds"]
            ));
        }
        let age = f64_of(s, "oldest_age_s").unwrap();
        let traced = f64_of(s, "ts").unwrap() - self.started;
        if !(5.0..=traced + 1.0).contains(&age) {
            self.fail(&format!(
                "{what}: oldest_age_s {age} should be over 5 s (it leaks since fdtrace attached) \
                 and at most the {traced:.1} s fdtrace ran: {s}"
            ));
        }
        // The same site (id) leaked in the earlier reports too.
        let id = s["site"].as_str().unwrap();
        let seen: BTreeSet<String> = self
            .of_type("site")
            .filter(|v| v["site"] == id)
            .map(|v| v["ts"].to_string())
            .collect();
        if seen.len() < 3 {
            self.fail(&format!(
                "{what}: site {id} appears in {} reports only; it leaks the whole run",
                seen.len()
            ));
        }
        if !self
            .findings("leak")
            .iter()
            .any(|f| f["site"].as_str().is_none_or(|x| x == id))
        {
            self.fail(&format!(
                "{what}: no `leak` finding for site {id} of pid {}",
                self.pid
            ));
        }
    }

    /// The site of the last report with the highest leak_per_s.
    fn top<'a>(&self, r: &Report<'a>) -> &'a Value {
        r.sites
            .iter()
            .copied()
            .max_by(|a, b| {
                f64_of(a, "leak_per_s")
                    .unwrap_or(f64::MIN)
                    .total_cmp(&f64_of(b, "leak_per_s").unwrap_or(f64::MIN))
            })
            .unwrap()
    }

    /// One leaking site: the top site has `kind` and `resource` and the
    /// whole rate; the process is at `status`.
    fn check_one_leak(&self, kind: &str, resource: &str, status: &str) {
        let r = self.basics();
        let top = self.top(&r);
        if top["kind"] != kind || top["resource"] != resource {
            self.fail(&format!(
                "the top site (highest leak_per_s) should be kind {kind:?}, resource \
                 {resource:?}: {top}"
            ));
        }
        self.check_site(r.process, top, self.scn.rate(), "top site");
        self.check_process(r.process, status);
    }
}

// ---- the tests ------------------------------------------------------------------

/// One TCP connection per request to a local HTTP server, never closed; the
/// server closed its side: the sockets sit in CLOSE_WAIT.
#[test]
fn http_client_leak() {
    let o = outcome(Scn::Http);
    let port = o.port.expect("port");
    o.check_one_leak("socket", &format!("tcp 127.0.0.1:{port}"), "critical");
    let cw = o.findings("close_wait");
    if !cw
        .iter()
        .any(|f| f["count"].as_u64().is_some_and(|c| c > 0))
    {
        o.fail(&format!(
            "no close_wait finding with a count > 0 for pid {} (its sockets to 127.0.0.1:{port} \
             are in CLOSE_WAIT); close_wait findings: {cw:?}",
            o.pid
        ));
    }
}

/// One sqlite3 connection (one fd on the database file) per call.
#[test]
fn sqlite_leak() {
    let o = outcome(Scn::Sqlite);
    let db = o.dir.as_ref().unwrap().join("db.sqlite");
    o.check_one_leak("file", &digits_to_n(&db.to_string_lossy()), "critical");
}

/// The stdout pipe of one subprocess.Popen per call, never read nor closed.
#[test]
fn popen_leak() {
    let o = outcome(Scn::Popen);
    o.check_one_leak("pipe", "pipe", "critical");
}

/// One logging.FileHandler per call: a slow leak, about 500 s to EMFILE.
#[test]
fn logging_leak() {
    let o = outcome(Scn::Logging);
    let log = o.dir.as_ref().unwrap().join("app.log");
    o.check_one_leak("file", &digits_to_n(&log.to_string_lossy()), "warning");
}

/// A C program leaking from two functions at two rates, under `fdtrace run`:
/// two sites, told apart by their stacks (symbolized from debug info), each
/// with its own rate; --fail-on critical makes fdtrace exit 3.
#[test]
fn c_two_leaking_functions() {
    let o = outcome(Scn::Leak2);
    let r = o.basics();
    let list = |v: &[&Value]| {
        v.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let find = |kind: &str, res: fn(&str) -> bool, func: &str, rate: f64| -> &Value {
        let cands: Vec<&Value> = r
            .sites
            .iter()
            .copied()
            .filter(|s| s["kind"] == kind && s["resource"].as_str().is_some_and(res))
            .filter(|s| f64_of(s, "leak_per_s").is_some_and(|x| x > rate / 2.0))
            .collect();
        match cands[..] {
            [s] => {
                if !stack_has(s, func) {
                    o.fail(&format!(
                        "the {kind} site leaking {rate}/s should have {func} in its stack \
                         (leak2 is built with -g -fno-omit-frame-pointer; note that the \
                         frame-pointer walk skips the direct caller of a libc wrapper that \
                         does not set up a frame, e.g. socket(), or stops in one that uses \
                         rbp for data, e.g. open64()): {s}"
                    ));
                }
                s
            }
            _ => o.fail(&format!(
                "expected one {kind} site leaking about {rate}/s in the last report, found \
                 {}:\n{}",
                cands.len(),
                list(&r.sites)
            )),
        }
    };
    let sock = find(
        "socket",
        |r| r.starts_with("udp"),
        "leak_sockets",
        LEAK2_SOCKET_RATE,
    );
    let file = find("file", |r| r == "/dev/null", "leak_files", LEAK2_FILE_RATE);
    if sock["site"] == file["site"]
        || stack_has(sock, "leak_files")
        || stack_has(file, "leak_sockets")
    {
        o.fail(&format!(
            "the two leaks should be two sites with their own stacks:\n{sock}\n{file}"
        ));
    }
    if o.top(&r)["site"] != sock["site"] {
        o.fail(&format!(
            "the top site should be the socket leak ({LEAK2_SOCKET_RATE}/s): {}",
            o.top(&r)
        ));
    }
    o.check_site(r.process, sock, LEAK2_SOCKET_RATE, "leak_sockets site");
    o.check_site(r.process, file, LEAK2_FILE_RATE, "leak_files site");
    o.check_process(r.process, "critical");
}

/// Busy but bounded fd use (200 open/close per second, a rotating pool, a
/// few long-lived fds): no leak.
#[test]
fn healthy_program_no_leak() {
    let o = outcome(Scn::Healthy);
    let r = o.basics();
    let p = r.process;
    let leak = f64_of(p, "leak_per_s").unwrap();
    if p["status"] != "ok" || leak.abs() >= 0.5 {
        o.fail(&format!(
            "the healthy program should be status ok with |leak_per_s| < 0.5: {p}"
        ));
    }
    if let Some(e) = f64_of(p, "seconds_to_emfile")
        && e <= WARN_WITHIN_S
    {
        o.fail(&format!(
            "seconds_to_emfile {e} for a program that does not leak: {p}"
        ));
    }
    if let Some(s) = r
        .sites
        .iter()
        .find(|s| f64_of(s, "leak_per_s").is_some_and(|x| x > 0.5))
    {
        o.fail(&format!(
            "a site of the healthy program leaks over 0.5 fds/s: {s}"
        ));
    }
    // Right after attaching, the fds of its rotating pool are pre-existing
    // (no site) and their replacements all come from one site, which grows
    // for one pool lifetime (1 s); once the window has passed that, nothing
    // may look like a leak.
    let first = o
        .of_type("process")
        .find_map(|v| f64_of(v, "ts"))
        .unwrap_or(f64::MAX);
    let settled = first + WINDOW_S + 1.0;
    if let Some(f) = o
        .findings("leak")
        .into_iter()
        .find(|f| f64_of(f, "ts").is_some_and(|t| t >= settled))
    {
        o.fail(&format!(
            "a leak finding for the healthy program, {WINDOW_S} s after the first report: {f}"
        ));
    }
    if let Some(f) = o.findings("emfile").first() {
        o.fail(&format!("an emfile finding for the healthy program: {f}"));
    }
}

// ---- sites against fdops -------------------------------------------------------

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
