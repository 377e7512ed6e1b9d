//! Harness of the fdtrace integration tests (`tests/tests/*.rs`).
//!
//! A [`Session`] runs the real `fdtrace` binary with `--json --interval 100ms`
//! against the `fdops` helper (src/bin/fdops.rs), either as
//! `fdtrace run -- fdops` or as `fdtrace --pid <fdops pid>`. Lines of fdtrace's
//! stdout are read by a thread; those starting with `{` are JSON objects, those
//! starting with `@fdops ` are replies of the helper (under `run`, fdops writes
//! to fdtrace's stdout).
//!
//! Checking a step: send a command to fdops, wait for its reply (fdops is then
//! idle and its fd table stable), read `/proc/PID/fd`, and wait for a `process`
//! object for that pid with a `ts` later than the reply. That object must agree
//! with /proc: `open_fds` is the number of entries of /proc/PID/fd, `by_kind`
//! the kinds of those entries, `drift` 0, `comm`, `ppid` and the fd limits
//! those of /proc; and `opened_total`/`closed_total`/`emfile_errors` moved by
//! what the step did. The ground truth is always /proc, read by the test.
//! Only a step through a known blind spot ([`Session::step_drift`]) expects a
//! non-zero drift first, then the same exact report after fdtrace's resync.
//!
//! Everything spawned is killed when the session is dropped, so a failed test
//! leaves nothing running.

pub mod prometheus;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Sampling interval passed to fdtrace.
pub const INTERVAL: &str = "100ms";
/// How long a reply of fdops may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a `process` object (or another event) after a step.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long fdtrace may take to load its programs and report the first time.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long fdtrace may take to exit once it should.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Margin added to the time a reply was received before a `process` object
/// counts as taken after it: fdtrace prints `ts` rounded (to the millisecond),
/// so an object sampled a hair before the reply could otherwise look later.
pub const TS_SLACK: f64 = 0.002;

/// `O_CLOEXEC` as shown in the `flags:` line of /proc/PID/fdinfo (octal).
const FDINFO_O_CLOEXEC: u64 = 0o2000000;

/// Kinds of fd fdtrace reports in `by_kind`.
pub const KINDS: [&str; 18] = [
    "unknown",
    "file",
    "socket",
    "pipe",
    "eventfd",
    "epoll",
    "timerfd",
    "signalfd",
    "inotify",
    "fanotify",
    "memfd",
    "userfaultfd",
    "perf_event",
    "bpf",
    "io_uring",
    "pidfd",
    "mount",
    "mqueue",
];

/// Seconds since the Unix epoch, as fdtrace's `ts`.
pub fn now_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs_f64()
}

// ---- environment ------------------------------------------------------------

/// Fails unless the tests run as root: loading eBPF needs it.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "the fdtrace integration tests must run as root (euid 0, here {euid}): fdtrace needs \
         CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN to load and attach its eBPF programs, and the \
         tests read /proc/PID/fd of the traced processes; run them with 'cargo xtask test' \
         or as root"
    );
}

/// The fdtrace binary: `$FDTRACE_BIN`, else `<workspace>/target/release/fdtrace`,
/// else `<workspace>/target/debug/fdtrace`. Fails when there is none.
pub fn fdtrace_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FDTRACE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "FDTRACE_BIN={} does not exist: fdtrace binary not found: run 'cargo xtask test'",
            p.display()
        );
        return p;
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent");
    for profile in ["release", "debug"] {
        let p = ws.join("target").join(profile).join("fdtrace");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "fdtrace binary not found: run 'cargo xtask test' (looked at $FDTRACE_BIN, {0}/target/release/fdtrace, {0}/target/debug/fdtrace)",
        ws.display()
    );
}

// ---- /proc, the ground truth ------------------------------------------------

/// Open fds of `pid`: fd number -> link target, from /proc/PID/fd.
pub fn proc_fds(pid: i32) -> Result<BTreeMap<i32, String>, String> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("read {dir}: {e}"))?;
    let mut out = BTreeMap::new();
    for ent in rd {
        let ent = ent.map_err(|e| format!("read {dir}: {e}"))?;
        let name = ent.file_name().to_string_lossy().to_string();
        let fd: i32 = name
            .parse()
            .map_err(|_| format!("odd entry {name} in {dir}"))?;
        let target =
            std::fs::read_link(ent.path()).map_err(|e| format!("readlink {dir}/{name}: {e}"))?;
        out.insert(fd, target.to_string_lossy().to_string());
    }
    Ok(out)
}

/// Kind of an fd from its /proc/PID/fd link, named as fdtrace names kinds.
pub fn classify(target: &str) -> &'static str {
    if target.starts_with("socket:[") {
        return "socket";
    }
    if target.starts_with("pipe:[") {
        return "pipe";
    }
    if target.starts_with("/memfd:") {
        return "memfd";
    }
    if target.starts_with("pidfd:") {
        return "pidfd";
    }
    if let Some(anon) = target.strip_prefix("anon_inode:") {
        let a = anon.trim_start_matches('[').trim_end_matches(']');
        return match a {
            "eventfd" => "eventfd",
            "eventpoll" => "epoll",
            "timerfd" => "timerfd",
            "signalfd" => "signalfd",
            "inotify" => "inotify",
            "fanotify" => "fanotify",
            "userfaultfd" => "userfaultfd",
            "perf_event" => "perf_event",
            "io_uring" => "io_uring",
            "pidfd" => "pidfd",
            a if a.starts_with("bpf") => "bpf",
            _ => "unknown",
        };
    }
    if target.starts_with('/') {
        return "file";
    }
    "unknown"
}

/// Count of fds per kind (only non-zero kinds).
pub fn kinds_of(fds: &BTreeMap<i32, String>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for t in fds.values() {
        *m.entry(classify(t).to_string()).or_insert(0) += 1;
    }
    m
}

pub fn proc_comm(pid: i32) -> Result<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end_matches('\n').to_string())
        .map_err(|e| format!("read /proc/{pid}/comm: {e}"))
}

pub fn proc_ppid(pid: i32) -> Result<i64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    // comm may hold spaces and parentheses: fields restart after the last ')'.
    let rest = &s[s.rfind(')').ok_or("bad stat")? + 1..];
    rest.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("bad /proc/{pid}/stat: {s}"))
}

/// (soft, hard) RLIMIT_NOFILE of `pid`.
pub fn proc_nofile(pid: i32) -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .map_err(|e| format!("read /proc/{pid}/limits: {e}"))?;
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix("Max open files") {
            let v: Vec<&str> = rest.split_whitespace().collect();
            if v.len() >= 2
                && let (Ok(a), Ok(b)) = (v[0].parse(), v[1].parse())
            {
                return Ok((a, b));
            }
        }
    }
    Err(format!("no 'Max open files' in /proc/{pid}/limits"))
}

/// Whether fd `fd` of `pid` is close-on-exec (from /proc/PID/fdinfo).
pub fn proc_cloexec(pid: i32, fd: i32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fdinfo/{fd}: {e}"));
    let flags = s
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
        .unwrap_or_else(|| panic!("no flags in /proc/{pid}/fdinfo/{fd}: {s}"));
    flags & FDINFO_O_CLOEXEC != 0
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` is a live process that is not a zombie.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => match s.rfind(')') {
            Some(i) => !s[i + 1..].trim_start().starts_with('Z'),
            None => false,
        },
        Err(_) => false,
    }
}

// ---- fdops replies ----------------------------------------------------------

/// One reply line of fdops: `@fdops STATUS key=value ...`.
#[derive(Clone, Debug)]
pub struct Reply {
    pub line: String,
    pub status: String,
    pub fields: HashMap<String, String>,
    /// When the test received it (Unix seconds).
    pub at: f64,
}

impl Reply {
    fn parse(line: &str, at: f64) -> Reply {
        let rest = line.strip_prefix("@fdops ").unwrap_or(line);
        let mut words = rest.splitn(2, ' ');
        let status = words.next().unwrap_or("").to_string();
        let body = words.next().unwrap_or("");
        let mut fields = HashMap::new();
        // msg= is last and may hold spaces.
        let (body, msg) = match body.find(" msg=") {
            Some(i) => (&body[..i], Some(&body[i + 5..])),
            None => match body.strip_prefix("msg=") {
                Some(m) => ("", Some(m)),
                None => (body, None),
            },
        };
        for w in body.split_whitespace() {
            if let Some((k, v)) = w.split_once('=') {
                fields.insert(k.to_string(), v.to_string());
            }
        }
        if let Some(m) = msg {
            fields.insert("msg".to_string(), m.to_string());
        }
        Reply {
            line: line.to_string(),
            status,
            fields,
            at,
        }
    }

    pub fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("fdops reply has no {key}=: {}", self.line))
    }

    pub fn num(&self, key: &str) -> i64 {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("fdops reply {key}={v} is not a number: {}", self.line))
    }

    pub fn fds(&self, key: &str) -> Vec<i32> {
        let v = self.get(key);
        if v == "-" {
            return Vec::new();
        }
        v.split(',')
            .map(|x| {
                x.parse()
                    .unwrap_or_else(|_| panic!("bad fd list {key}={v}: {}", self.line))
            })
            .collect()
    }

    pub fn fd(&self) -> i32 {
        let v = self.fds("fds");
        assert_eq!(v.len(), 1, "expected one fd: {}", self.line);
        v[0]
    }

    pub fn pid(&self) -> i32 {
        self.num("pid") as i32
    }

    pub fn tid(&self) -> i32 {
        self.num("tid") as i32
    }

    pub fn opened(&self) -> u64 {
        self.num("opened") as u64
    }

    pub fn closed(&self) -> u64 {
        self.num("closed") as u64
    }
}

// ---- snapshots ----------------------------------------------------------------

/// A `process` object checked against /proc.
#[derive(Clone, Debug)]
pub struct Snap {
    pub pid: i32,
    pub ts: f64,
    pub open_fds: u64,
    pub opened: u64,
    pub closed: u64,
    pub emfile: u64,
    pub enfile: u64,
    /// fdtrace's by_kind.
    pub by_kind: BTreeMap<String, u64>,
    /// /proc/PID/fd at that time.
    pub proc: BTreeMap<i32, String>,
    pub comm: String,
    pub obj: Value,
}

impl Snap {
    /// Kinds of /proc/PID/fd.
    pub fn proc_kinds(&self) -> BTreeMap<String, u64> {
        kinds_of(&self.proc)
    }

    pub fn kind(&self, k: &str) -> u64 {
        self.by_kind.get(k).copied().unwrap_or(0)
    }
}

/// Checks that going from `a` to `b` changed the kinds of fds (in /proc and in
/// fdtrace's by_kind, which [`Session::check`] already matched) by exactly
/// `delta`, every other kind unchanged.
pub fn assert_kind_delta(a: &Snap, b: &Snap, delta: &[(&str, i64)]) {
    let (pa, pb) = (a.proc_kinds(), b.proc_kinds());
    for k in KINDS {
        let want = delta
            .iter()
            .filter(|(n, _)| *n == k)
            .map(|(_, d)| *d)
            .sum::<i64>();
        let proc_d = *pb.get(k).unwrap_or(&0) as i64 - *pa.get(k).unwrap_or(&0) as i64;
        let trace_d = b.kind(k) as i64 - a.kind(k) as i64;
        assert_eq!(
            proc_d, want,
            "/proc/{}/fd: kind {k} changed by {proc_d}, the step should change it by {want} \
             (fdops did not do what it says?)\nbefore: {:?}\nafter: {:?}",
            b.pid, a.proc, b.proc
        );
        assert_eq!(
            trace_d, want,
            "fdtrace by_kind[{k}] of pid {} changed by {trace_d}, /proc changed by {want}\n\
             before: {}\nafter: {}",
            b.pid, a.obj, b.obj
        );
    }
}

/// What a step must have done to the counters of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Expect {
    /// opened_total must have grown by this much since the last check of the
    /// pid (None: not checked, for the first check of a process).
    pub opened: Option<u64>,
    pub closed: Option<u64>,
    /// emfile_errors must have grown by this much (and as many `emfile`
    /// objects must have come).
    pub emfile: u64,
    /// The step ran execve: the new image's dynamic loader opens and closes a
    /// few files before fdops replies; opened and closed may both exceed the
    /// expectation by the same small number.
    pub exec: bool,
    /// First check after attaching to an idle process: opened_total and
    /// closed_total must be 0.
    pub fresh_attach: bool,
}

impl Expect {
    pub fn totals(opened: u64, closed: u64) -> Expect {
        Expect {
            opened: Some(opened),
            closed: Some(closed),
            ..Expect::default()
        }
    }

    /// The counts fdops reported in its reply.
    pub fn from_reply(r: &Reply) -> Expect {
        Expect::totals(r.opened(), r.closed())
    }

    pub fn first() -> Expect {
        Expect::default()
    }
}

// ---- the session ------------------------------------------------------------

/// How fdtrace is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `fdtrace run [--no-follow] -- fdops`.
    Run { follow: bool },
    /// fdops started by the test, then `fdtrace --pid P [--follow]`.
    Pid { follow: bool },
}

impl Mode {
    pub const RUN: Mode = Mode::Run { follow: true };
    pub const PID: Mode = Mode::Pid { follow: false };
    pub const PID_FOLLOW: Mode = Mode::Pid { follow: true };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Fdtrace,
    Fdops(usize),
}

struct Msg {
    src: Src,
    /// None at end of file.
    line: Option<String>,
    at: f64,
}

/// An fdops process the test sends commands to.
struct Target {
    stdin: Option<ChildStdin>,
    pid: i32,
    /// Set when the test spawned it (--pid mode).
    child: Option<Child>,
    replies: VecDeque<Reply>,
    /// Its stdout reached end of file (--pid mode): it is gone.
    eof: bool,
}

/// One fdtrace run and the fdops process(es) it traces.
pub struct Session {
    pub mode: Mode,
    /// None until spawned (--pid mode spawns it after fdops is ready).
    fdtrace: Option<Child>,
    pub fdtrace_pid: i32,
    /// Whether fdtrace may end now (the test made it end).
    may_exit: bool,
    args: Vec<String>,
    targets: Vec<Target>,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    /// Every JSON object fdtrace printed, in order.
    pub events: Vec<Value>,
    /// stdout lines that were neither JSON nor fdops replies.
    junk: Vec<String>,
    stderr: Arc<Mutex<String>>,
    fdops_stderr: Arc<Mutex<String>>,
    /// Last checked snapshot per pid.
    last: HashMap<i32, Snap>,
    /// Other pids to kill at the end (forked children).
    extra_pids: Vec<i32>,
    exit_status: Option<ExitStatus>,
}

/// Reads `r` line by line on a thread of its own, handing each line (without
/// its newline) and the time it arrived to `each`, then `None` at the end.
/// Stops early when `each` returns false (the receiver is gone).
pub fn read_lines<R: Read + Send + 'static>(
    r: R,
    mut each: impl FnMut(Option<String>, f64) -> bool + Send + 'static,
) {
    thread::spawn(move || {
        let mut br = BufReader::new(r);
        loop {
            let mut buf = Vec::new();
            match br.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => {
                    each(None, now_ts());
                    return;
                }
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    if !each(Some(line), now_ts()) {
                        return;
                    }
                }
            }
        }
    });
}

fn spawn_reader<R: Read + Send + 'static>(r: R, src: Src, tx: Sender<Msg>) {
    read_lines(r, move |line, at| tx.send(Msg { src, line, at }).is_ok());
}

fn spawn_collector<R: Read + Send + 'static>(mut r: R, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
}

fn global_args() -> Vec<String> {
    vec!["--json".into(), "--interval".into(), INTERVAL.into()]
}

impl Session {
    /// Starts fdops under `fdtrace run` (Mode::Run) or starts fdops and then
    /// `fdtrace --pid` on it (Mode::Pid), and checks the first snapshot.
    pub fn start(fdops: &str, mode: Mode) -> Session {
        Session::start_many(fdops, mode, 1)
    }

    /// Like [`Session::start`]; in --pid mode with `n` fdops processes, all
    /// given to one fdtrace with repeated `--pid`.
    pub fn start_many(fdops: &str, mode: Mode, n: usize) -> Session {
        Session::start_with(fdops, mode, n, &[])
    }

    /// Like [`Session::start_many`], with more global fdtrace flags (before
    /// `run`).
    pub fn start_with(fdops: &str, mode: Mode, n: usize, extra: &[&str]) -> Session {
        Session::start_inner(fdops, mode, n, extra, &[])
    }

    /// `fdtrace --pid` on one fdops that first ran `prep`: the fds those
    /// commands made exist before fdtrace attaches (they are seeded).
    pub fn start_prepared(fdops: &str, prep: &[&str]) -> Session {
        Session::start_inner(fdops, Mode::PID, 1, &[], prep)
    }

    fn start_inner(fdops: &str, mode: Mode, n: usize, extra: &[&str], prep: &[&str]) -> Session {
        require_root();
        let bin = fdtrace_bin();
        let (tx, rx) = mpsc::channel();
        let mut args = global_args();
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut s = Session {
            mode,
            fdtrace: None,
            fdtrace_pid: 0,
            may_exit: false,
            args: Vec::new(),
            targets: Vec::new(),
            rx,
            tx,
            events: Vec::new(),
            junk: Vec::new(),
            stderr: Arc::new(Mutex::new(String::new())),
            fdops_stderr: Arc::new(Mutex::new(String::new())),
            last: HashMap::new(),
            extra_pids: Vec::new(),
            exit_status: None,
        };
        match mode {
            Mode::Run { follow } => {
                assert_eq!(n, 1, "run mode traces one fdops");
                args.push("run".into());
                if !follow {
                    args.push("--no-follow".into());
                }
                args.push("--".into());
                args.push(fdops.into());
                s.args = args;
                s.spawn_fdtrace(&bin, true);
                let ready = s.wait_reply(
                    0,
                    START_TIMEOUT,
                    "the first line of fdops under fdtrace run",
                );
                if ready.status != "ready" {
                    s.fail(&format!("fdops did not start: {}", ready.line));
                }
                let pid = ready.pid();
                s.targets[0].pid = pid;
                s.check_with(pid, ready.at, 0, Expect::first(), START_TIMEOUT);
            }
            Mode::Pid { follow } => {
                for i in 0..n {
                    let mut child = Command::new(fdops)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap_or_else(|e| panic!("spawn {fdops}: {e}"));
                    spawn_reader(child.stdout.take().unwrap(), Src::Fdops(i), s.tx.clone());
                    spawn_collector(child.stderr.take().unwrap(), s.fdops_stderr.clone());
                    s.targets.push(Target {
                        stdin: child.stdin.take(),
                        pid: child.id() as i32,
                        child: Some(child),
                        replies: VecDeque::new(),
                        eof: false,
                    });
                }
                for i in 0..n {
                    let ready = s.wait_reply(i, REPLY_TIMEOUT, "the first line of fdops");
                    if ready.status != "ready" || ready.pid() != s.targets[i].pid {
                        s.fail(&format!("fdops did not start: {}", ready.line));
                    }
                }
                for cmd in prep {
                    s.send_to(0, cmd);
                }
                for t in &s.targets {
                    args.push("--pid".into());
                    args.push(t.pid.to_string());
                }
                if follow {
                    args.push("--follow".into());
                }
                s.args = args;
                let attach_at = now_ts();
                s.spawn_fdtrace(&bin, false);
                for i in 0..n {
                    let pid = s.targets[i].pid;
                    let exp = Expect {
                        fresh_attach: true,
                        ..Expect::first()
                    };
                    s.check_with(pid, attach_at, 0, exp, START_TIMEOUT);
                }
            }
        }
        s
    }

    /// Spawns fdtrace with `self.args`; under `run` its stdin is the command
    /// channel of fdops.
    fn spawn_fdtrace(&mut self, bin: &Path, run: bool) {
        let mut child = Command::new(bin)
            .args(&self.args)
            .stdin(if run { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        self.fdtrace_pid = child.id() as i32;
        spawn_reader(child.stdout.take().unwrap(), Src::Fdtrace, self.tx.clone());
        spawn_collector(child.stderr.take().unwrap(), self.stderr.clone());
        if run {
            self.targets.push(Target {
                stdin: child.stdin.take(),
                pid: 0,
                child: None,
                replies: VecDeque::new(),
                eof: false,
            });
        }
        self.fdtrace = Some(child);
    }

    /// Pid of fdops number `t` (0 is the main one).
    pub fn pid(&self, t: usize) -> i32 {
        self.targets[t].pid
    }

    /// The last checked snapshot of `pid`.
    pub fn last(&self, pid: i32) -> Snap {
        self.last
            .get(&pid)
            .cloned()
            .unwrap_or_else(|| panic!("no snapshot of pid {pid} yet"))
    }

    /// Dumps what helps to understand a failure, then panics.
    #[track_caller]
    pub fn fail(&self, msg: &str) -> ! {
        let mut s = String::new();
        let _ = writeln!(s, "{msg}");
        let _ = writeln!(s, "--- fdtrace {}", self.args.join(" "));
        let err = self.stderr.lock().unwrap().clone();
        let _ = writeln!(
            s,
            "--- fdtrace stderr (last 6000 bytes):\n{}",
            tail(&err, 6000)
        );
        let ferr = self.fdops_stderr.lock().unwrap().clone();
        if !ferr.is_empty() {
            let _ = writeln!(s, "--- fdops stderr:\n{}", tail(&ferr, 2000));
        }
        let _ = writeln!(s, "--- last JSON objects of fdtrace:");
        for e in self
            .events
            .iter()
            .rev()
            .take(25)
            .collect::<Vec<_>>()
            .iter()
            .rev()
        {
            let _ = writeln!(s, "{e}");
        }
        if !self.junk.is_empty() {
            let _ = writeln!(s, "--- other stdout lines: {:?}", self.junk);
        }
        for t in &self.targets {
            if t.pid > 0 {
                let _ = writeln!(s, "--- /proc/{}/fd: {:?}", t.pid, proc_fds(t.pid));
            }
        }
        panic!("{s}");
    }

    /// Receives one message (up to `until`) and files it.
    fn pump(&mut self, until: Instant) -> bool {
        let left = until.saturating_duration_since(Instant::now());
        let msg = match self.rx.recv_timeout(left.min(Duration::from_millis(50))) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                self.poll_exit();
                return false;
            }
            Err(RecvTimeoutError::Disconnected) => return false,
        };
        let Some(line) = msg.line else {
            if let Src::Fdops(i) = msg.src {
                self.targets[i].eof = true;
            }
            return true;
        };
        let t = match msg.src {
            Src::Fdops(i) => Some(i),
            Src::Fdtrace if line.starts_with("@fdops ") => Some(0),
            Src::Fdtrace => None,
        };
        if let Some(i) = t {
            if line.starts_with("@fdops ") {
                let r = Reply::parse(&line, msg.at);
                // Forked children are killed at the end too.
                if let Some(c) = r.fields.get("child").and_then(|v| v.parse().ok()) {
                    self.extra_pids.push(c);
                }
                self.targets[i].replies.push_back(r);
            } else {
                self.junk.push(format!("fdops: {line}"));
            }
        } else if line.starts_with('{') {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.is_object() => self.events.push(v),
                _ => self.junk.push(line),
            }
        } else if !line.trim().is_empty() {
            self.junk.push(line);
        }
        true
    }

    fn poll_exit(&mut self) {
        if self.exit_status.is_none()
            && let Some(c) = self.fdtrace.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            self.exit_status = Some(st);
        }
    }

    /// Fails if fdtrace ended (it should run until the test is done with it).
    fn ensure_running(&mut self, waiting_for: &str) {
        self.poll_exit();
        if self.may_exit {
            return;
        }
        if let Some(st) = self.exit_status {
            // Let the readers catch the last lines.
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                self.pump(until);
            }
            self.fail(&format!(
                "fdtrace exited ({st}) while the test was waiting for {waiting_for}"
            ));
        }
    }

    fn wait_reply(&mut self, t: usize, timeout: Duration, what: &str) -> Reply {
        let until = Instant::now() + timeout;
        loop {
            if let Some(r) = self.targets[t].replies.pop_front() {
                return r;
            }
            if Instant::now() >= until {
                self.fail(&format!("no reply from fdops within {timeout:?}: {what}"));
            }
            if self.targets[t].eof {
                self.fail(&format!(
                    "fdops (pid {}) is gone; waiting for: {what}",
                    self.targets[t].pid
                ));
            }
            self.pump(until);
            if self.fdtrace.is_some() {
                self.ensure_running(what);
            }
        }
    }

    /// Sends a command to fdops number `t` and returns its reply, which must
    /// be `ok`.
    pub fn send_to(&mut self, t: usize, cmd: &str) -> Reply {
        let r = self.send_raw(t, cmd);
        if r.status != "ok" {
            self.fail(&format!("fdops command {cmd:?} failed: {}", r.line));
        }
        r
    }

    /// Sends a command and returns the reply, whatever its status.
    pub fn send_raw(&mut self, t: usize, cmd: &str) -> Reply {
        self.check_health();
        let line = format!("{cmd}\n");
        let stdin = self.targets[t].stdin.as_mut().expect("fdops stdin");
        if let Err(e) = stdin.write_all(line.as_bytes()).and_then(|_| stdin.flush()) {
            self.fail(&format!("cannot send {cmd:?} to fdops: {e}"));
        }
        self.wait_reply(t, REPLY_TIMEOUT, cmd)
    }

    /// Fails on `lost` objects and on stdout lines that are not JSON.
    fn check_health(&self) {
        if let Some(l) = self.events.iter().find(|e| e["type"] == "lost") {
            self.fail(&format!(
                "fdtrace lost events on a light load, counts can no longer be trusted: {l}"
            ));
        }
        if !self.junk.is_empty() {
            self.fail(&format!(
                "with --json, every stdout line of fdtrace must be a JSON object; got {:?}",
                self.junk
            ));
        }
    }

    /// Runs `cmd` on fdops 0 and checks the process that ran it (the reply's
    /// pid) against /proc, with the counts the reply reports.
    pub fn step(&mut self, cmd: &str) -> (Reply, Snap) {
        self.step_on(0, cmd)
    }

    pub fn step_on(&mut self, t: usize, cmd: &str) -> (Reply, Snap) {
        self.step_expect(t, cmd, Expect::from_reply)
    }

    /// Runs `cmd` on fdops 0, to be run by process `pid` (fdops 0 or, with
    /// `child PID ...`, a forked child); checks that the reply reports
    /// `opened`/`closed` fds (what the syscalls must have done), that fdtrace
    /// agrees, and that the kinds of fds changed by `kinds` (in /proc and in
    /// fdtrace) and nothing else.
    pub fn ostep(
        &mut self,
        pid: i32,
        cmd: &str,
        opened: u64,
        closed: u64,
        kinds: &[(&str, i64)],
    ) -> (Reply, Snap) {
        self.ostep_on(0, pid, cmd, opened, closed, kinds)
    }

    pub fn ostep_on(
        &mut self,
        t: usize,
        pid: i32,
        cmd: &str,
        opened: u64,
        closed: u64,
        kinds: &[(&str, i64)],
    ) -> (Reply, Snap) {
        let prev = self.last(pid);
        let (r, snap) = self.step_on(t, cmd);
        if r.pid() != pid {
            self.fail(&format!("{cmd:?} should run in pid {pid}: {}", r.line));
        }
        if r.opened() != opened || r.closed() != closed {
            self.fail(&format!(
                "{cmd:?} should open {opened} and close {closed} fds, fdops says: {}",
                r.line
            ));
        }
        assert_kind_delta(&prev, &snap, kinds);
        (r, snap)
    }

    /// Runs `cmd` on fdops `t`; `exp` builds the expectation from the reply.
    pub fn step_expect(
        &mut self,
        t: usize,
        cmd: &str,
        exp: impl FnOnce(&Reply) -> Expect,
    ) -> (Reply, Snap) {
        let idx = self.events.len();
        let r = self.send_to(t, cmd);
        let e = exp(&r);
        let snap = self.check_with(r.pid(), r.at, idx, e, EVENT_TIMEOUT);
        (r, snap)
    }

    /// Runs `cmd` on fdops `t`, a step fdtrace cannot follow exactly (a
    /// documented blind spot): the kernel's count of
    /// the process that ran it ends up `drift` (kernel minus /proc, non-zero)
    /// off. fdtrace must report that drift, then resync from /proc:
    ///
    /// - the non-zero drifts in the process objects of that pid, from the
    ///   command on, must add up to exactly `drift` (normally one object
    ///   carries it all; a report that falls while the step runs may carry it
    ///   before the reply, or a part of it);
    /// - an object taken after the reply that shows a drift has that whole
    ///   remaining drift, with `open_fds` = /proc count + that drift and
    ///   `by_kind` adding up to `open_fds`;
    /// - the next object with a non-null drift after the last one that showed
    ///   the drift is checked like any step (drift 0, open_fds and by_kind
    ///   equal to /proc, ...), counters against `exp` built from the reply:
    ///   the resync counts what it found opened or closed in the totals.
    ///
    /// Every other step keeps expecting drift 0. Returns the reply, the
    /// objects that showed the drift, and the snapshot after the resync.
    pub fn step_drift(
        &mut self,
        t: usize,
        cmd: &str,
        drift: i64,
        exp: impl FnOnce(&Reply) -> Expect,
    ) -> (Reply, Vec<Value>, Snap) {
        assert_ne!(drift, 0, "step_drift: a step without drift is a plain step");
        let idx = self.events.len();
        let r = self.send_to(t, cmd);
        let e = exp(&r);
        let pid = r.pid();
        let proc_now =
            proc_fds(pid).unwrap_or_else(|err| self.fail(&format!("pid {pid} gone? {err}")));
        let until = Instant::now() + EVENT_TIMEOUT;
        let mut scan = idx;
        let mut shown: Vec<Value> = Vec::new();
        let mut sum = 0i64;
        let mut last_ts = r.at;
        while sum != drift {
            while sum != drift && scan < self.events.len() {
                let ev = self.events[scan].clone();
                scan += 1;
                if ev["type"] != "process" || ev["pid"].as_i64() != Some(pid as i64) {
                    continue;
                }
                let Some(ts) = ev["ts"].as_f64() else {
                    self.fail(&format!("process object without a numeric ts: {ev}"));
                };
                let after_reply = ts > r.at + TS_SLACK;
                match ev["drift"].as_i64() {
                    // Too busy to compare: says nothing.
                    None if ev["drift"].is_null() => {}
                    None => self.fail(&format!("bad drift: {ev}")),
                    Some(0) if after_reply => self.fail(&format!(
                        "pid {pid}: after {cmd:?} fdtrace should report a drift of {drift} \
                         (kernel count minus /proc), then resync; this report, taken with the \
                         process idle, says drift 0 with {} drift reported before it{}\n\
                         object: {ev}\n/proc/{pid}/fd: {proc_now:?}",
                        sum,
                        if shown.is_empty() {
                            String::new()
                        } else {
                            format!(" in {shown:?}")
                        }
                    )),
                    Some(0) => {}
                    Some(d) => {
                        if after_reply {
                            let kernel = proc_now.len() as i64 + d;
                            if sum + d != drift || ev["open_fds"].as_i64() != Some(kernel) {
                                self.fail(&format!(
                                    "pid {pid}: after {cmd:?} fdtrace should report a drift of \
                                     {drift} in all ({sum} before this object), with open_fds = \
                                     {} (/proc) + drift; this report, taken with the process \
                                     idle, says drift {d}\nobject: {ev}\n/proc/{pid}/fd: {proc_now:?}",
                                    proc_now.len()
                                ));
                            }
                            let kinds: u64 = ev["by_kind"]
                                .as_object()
                                .map(|m| m.values().filter_map(Value::as_u64).sum())
                                .unwrap_or_else(|| self.fail(&format!("no by_kind: {ev}")));
                            if kinds as i64 != kernel {
                                self.fail(&format!("by_kind does not add up to open_fds: {ev}"));
                            }
                        }
                        sum += d;
                        last_ts = last_ts.max(ts);
                        shown.push(ev);
                    }
                }
            }
            if sum == drift {
                break;
            }
            if Instant::now() >= until {
                self.fail(&format!(
                    "pid {pid}: no process object with the drift {drift} that {cmd:?} causes \
                     within {EVENT_TIMEOUT:?} of its reply ({sum} reported: {shown:?})"
                ));
            }
            self.ensure_running(&format!("a process object for pid {pid} with a drift"));
            self.pump(until);
        }
        // Resynced: the next report is exact.
        let snap = self.check_with(pid, last_ts, idx, e, EVENT_TIMEOUT);
        (r, shown, snap)
    }

    /// Checks `pid` (idle since `after`) with the given expectation; events
    /// of the step are those from index `idx` on.
    pub fn check(&mut self, pid: i32, after: f64, idx: usize, exp: Expect) -> Snap {
        self.check_with(pid, after, idx, exp, EVENT_TIMEOUT)
    }

    /// Index of the next JSON object to come (to look for events of a step).
    pub fn mark(&self) -> usize {
        self.events.len()
    }

    fn check_with(
        &mut self,
        pid: i32,
        after: f64,
        idx: usize,
        exp: Expect,
        timeout: Duration,
    ) -> Snap {
        self.check_health();
        let proc_before =
            proc_fds(pid).unwrap_or_else(|e| self.fail(&format!("pid {pid} gone? {e}")));
        let until = Instant::now() + timeout;
        let mut seen = 0usize;
        let mut scan = 0usize;
        let obj = loop {
            let mut found = None;
            while scan < self.events.len() {
                let e = &self.events[scan];
                scan += 1;
                if e["type"] != "process" || e["pid"].as_i64() != Some(pid as i64) {
                    continue;
                }
                let Some(ts) = e["ts"].as_f64() else {
                    self.fail(&format!("process object without a numeric ts: {e}"));
                };
                if ts <= after + TS_SLACK {
                    continue;
                }
                seen += 1;
                let open = e["open_fds"].as_u64();
                if open != Some(proc_before.len() as u64) {
                    self.fail(&format!(
                        "pid {pid}: fdtrace says open_fds={} but /proc/{pid}/fd has {} entries \
                         (process idle since ts {after:.3})\nobject: {e}\n/proc/{pid}/fd: {proc_before:?}",
                        e["open_fds"],
                        proc_before.len()
                    ));
                }
                if e["drift"].is_null() {
                    // Too busy to compare in that interval: take a later one.
                    continue;
                }
                found = Some(e.clone());
                break;
            }
            if let Some(o) = found {
                break o;
            }
            if Instant::now() >= until {
                self.fail(&format!(
                    "pid {pid}: no process object with ts > {after:.3} and a non-null drift \
                     within {timeout:?} ({seen} with null drift)"
                ));
            }
            self.ensure_running(&format!("a process object for pid {pid}"));
            self.pump(until);
        };
        let proc_after =
            proc_fds(pid).unwrap_or_else(|e| self.fail(&format!("pid {pid} gone? {e}")));
        if proc_after != proc_before {
            self.fail(&format!(
                "the fd table of idle pid {pid} changed while the test looked at it \
                 (a test bug):\nbefore: {proc_before:?}\nafter: {proc_after:?}"
            ));
        }
        let snap = self.validate(pid, &obj, proc_before);
        self.check_counters(&snap, exp);
        if exp.emfile > 0 {
            // emfile objects travel through the ring buffer: let them come.
            let until = Instant::now() + EVENT_TIMEOUT;
            while self.emfile_events(pid, idx).len() < exp.emfile as usize && Instant::now() < until
            {
                self.pump(until);
            }
        }
        let n = self.emfile_events(pid, idx).len() as u64;
        if n != exp.emfile {
            self.fail(&format!(
                "pid {pid}: {n} emfile objects for this step, expected {}",
                exp.emfile
            ));
        }
        self.last.insert(pid, snap.clone());
        snap
    }

    /// `emfile` objects for `pid` from event index `idx` on.
    pub fn emfile_events(&self, pid: i32, idx: usize) -> Vec<Value> {
        self.events[idx.min(self.events.len())..]
            .iter()
            .filter(|e| e["type"] == "emfile" && e["pid"].as_i64() == Some(pid as i64))
            .cloned()
            .collect()
    }

    /// Checks the fields of a process object against /proc; returns the snapshot.
    fn validate(&self, pid: i32, obj: &Value, proc: BTreeMap<i32, String>) -> Snap {
        let num = |k: &str| -> u64 {
            obj[k].as_u64().unwrap_or_else(|| {
                self.fail(&format!(
                    "process object: {k} is missing or not a non-negative integer: {obj}"
                ))
            })
        };
        let drift = obj["drift"]
            .as_i64()
            .unwrap_or_else(|| self.fail(&format!("bad drift: {obj}")));
        if drift != 0 {
            self.fail(&format!(
                "pid {pid}: drift={drift} (kernel count minus /proc count) while the process \
                 was idle: {obj}\n/proc/{pid}/fd: {proc:?}"
            ));
        }
        let open_fds = num("open_fds");
        let mut by_kind = BTreeMap::new();
        match obj["by_kind"].as_object() {
            Some(m) => {
                for (k, v) in m {
                    if !KINDS.contains(&k.as_str()) {
                        self.fail(&format!("by_kind has an unknown kind {k:?}: {obj}"));
                    }
                    let n = v.as_u64().unwrap_or_else(|| {
                        self.fail(&format!("by_kind.{k} is not a count: {obj}"))
                    });
                    if n == 0 {
                        self.fail(&format!("by_kind must list only non-zero kinds: {obj}"));
                    }
                    by_kind.insert(k.clone(), n);
                }
            }
            None => self.fail(&format!("process object without by_kind: {obj}")),
        }
        if by_kind.values().sum::<u64>() != open_fds {
            self.fail(&format!("by_kind does not add up to open_fds: {obj}"));
        }
        let proc_kinds = kinds_of(&proc);
        let kinds_ok = by_kind == proc_kinds;
        if !kinds_ok {
            self.fail(&format!(
                "pid {pid}: by_kind {by_kind:?} but the fds in /proc/{pid}/fd are of kinds \
                 {proc_kinds:?}\n/proc/{pid}/fd: {proc:?}\nobject: {obj}"
            ));
        }
        let comm = obj["comm"]
            .as_str()
            .unwrap_or_else(|| self.fail(&format!("no comm: {obj}")));
        let want_comm = proc_comm(pid).unwrap_or_else(|e| self.fail(&e));
        if comm != want_comm {
            self.fail(&format!(
                "pid {pid}: comm {comm:?} but /proc says {want_comm:?}: {obj}"
            ));
        }
        let ppid = proc_ppid(pid).unwrap_or_else(|e| self.fail(&e));
        if obj["ppid"].as_i64() != Some(ppid) {
            self.fail(&format!(
                "pid {pid}: ppid {} but /proc says {ppid}: {obj}",
                obj["ppid"]
            ));
        }
        let (soft, hard) = proc_nofile(pid).unwrap_or_else(|e| self.fail(&e));
        if num("fd_soft_limit") != soft || num("fd_hard_limit") != hard {
            self.fail(&format!(
                "pid {pid}: fd limits {}/{} but /proc/{pid}/limits says {soft}/{hard}: {obj}",
                obj["fd_soft_limit"], obj["fd_hard_limit"]
            ));
        }
        let pct = obj["pct_used"]
            .as_f64()
            .unwrap_or_else(|| self.fail(&format!("no pct_used: {obj}")));
        let want_pct = open_fds as f64 * 100.0 / soft as f64;
        if (pct - want_pct).abs() > 0.051 {
            self.fail(&format!(
                "pid {pid}: pct_used {pct} but open_fds/soft limit is {want_pct:.3}%: {obj}"
            ));
        }
        for k in ["opened_per_s", "closed_per_s"] {
            match obj[k].as_f64() {
                Some(v) if v >= 0.0 => {}
                _ => self.fail(&format!("{k} missing or negative: {obj}")),
            }
        }
        Snap {
            pid,
            ts: obj["ts"].as_f64().unwrap_or_default(),
            open_fds,
            opened: num("opened_total"),
            closed: num("closed_total"),
            emfile: num("emfile_errors"),
            enfile: num("enfile_errors"),
            by_kind,
            proc,
            comm: comm.to_string(),
            obj: obj.clone(),
        }
    }

    fn check_counters(&self, s: &Snap, exp: Expect) {
        let pid = s.pid;
        if exp.fresh_attach && (s.opened != 0 || s.closed != 0) {
            self.fail(&format!(
                "pid {pid} was idle when fdtrace attached, yet opened_total={} closed_total={}: {}",
                s.opened, s.closed, s.obj
            ));
        }
        let Some(prev) = self.last.get(&pid) else {
            return;
        };
        let d_open = s.opened as i64 - prev.opened as i64;
        let d_close = s.closed as i64 - prev.closed as i64;
        let d_proc = s.proc.len() as i64 - prev.proc.len() as i64;
        if let (Some(o), Some(c)) = (exp.opened, exp.closed)
            && o as i64 - c as i64 != d_proc
        {
            self.fail(&format!(
                "test bug: fdops says opened {o} closed {c}, but /proc/{pid}/fd went from {} to {} \
                 entries",
                prev.proc.len(),
                s.proc.len()
            ));
        }
        if exp.exec {
            let (Some(o), Some(c)) = (exp.opened, exp.closed) else {
                return;
            };
            let extra_o = d_open - o as i64;
            let extra_c = d_close - c as i64;
            if extra_o != extra_c || !(0..=16).contains(&extra_o) {
                self.fail(&format!(
                    "pid {pid} across exec: opened_total +{d_open}, closed_total +{d_close}; fdops made \
                     {o} fds and exec closed {c} close-on-exec ones (closed {c}), so both should \
                     exceed those by the same small number (files of the dynamic loader)\n\
                     before: {}\nafter: {}",
                    prev.obj, s.obj
                ));
            }
        } else {
            if let Some(o) = exp.opened
                && d_open != o as i64
            {
                self.fail(&format!(
                    "pid {pid}: opened_total moved by {d_open}, the step opened {o}\nbefore: {}\nafter: {}",
                    prev.obj, s.obj
                ));
            }
            if let Some(c) = exp.closed
                && d_close != c as i64
            {
                self.fail(&format!(
                    "pid {pid}: closed_total moved by {d_close}, the step closed {c}\nbefore: {}\nafter: {}",
                    prev.obj, s.obj
                ));
            }
        }
        let d_emfile = s.emfile as i64 - prev.emfile as i64;
        if d_emfile != exp.emfile as i64 {
            self.fail(&format!(
                "pid {pid}: emfile_errors moved by {d_emfile}, expected {}\nbefore: {}\nafter: {}",
                exp.emfile, prev.obj, s.obj
            ));
        }
        if s.enfile != prev.enfile {
            self.fail(&format!("pid {pid}: enfile_errors moved: {}", s.obj));
        }
    }

    /// Waits for a JSON object from index `idx` on that satisfies `pred`.
    pub fn wait_event(&mut self, idx: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + EVENT_TIMEOUT;
        let mut scan = idx;
        loop {
            while scan < self.events.len() {
                if pred(&self.events[scan]) {
                    return self.events[scan].clone();
                }
                scan += 1;
            }
            if Instant::now() >= until {
                self.fail(&format!("no {what} within {EVENT_TIMEOUT:?}"));
            }
            if !self.pump(until) {
                self.poll_exit();
            }
        }
    }

    /// The JSON objects received from index `idx` on (no waiting).
    pub fn events_since(&self, idx: usize) -> &[Value] {
        &self.events[idx.min(self.events.len())..]
    }

    /// Whether any JSON object from `idx` on satisfies `pred` (no waiting).
    pub fn any_event(&self, idx: usize, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.events_since(idx).iter().find(|e| pred(e)).cloned()
    }

    /// Reads messages for a while (to let late events arrive).
    pub fn settle(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.pump(until);
        }
    }

    /// Sends `exit` to fdops `t` (main process), checks the `exit` object for
    /// it against its last snapshot.
    pub fn exit_target(&mut self, t: usize) -> Value {
        let pid = self.targets[t].pid;
        let idx = self.mark();
        // fdtrace may end as soon as its last traced process is gone.
        self.may_exit = true;
        let r = self.send_to(t, "exit");
        assert_eq!(r.pid(), pid);
        let v = self.expect_exit(pid, idx);
        if let Some(c) = self.targets[t].child.as_mut() {
            let _ = c.wait();
        }
        v
    }

    /// Makes forked child `child` of `parent` exit; checks its `exit` object,
    /// then the parent (which closes its two pipe ends to the child). `via` is
    /// the prefix that routes a command to `parent` ("" for fdops 0 itself,
    /// "child PID " for a forked child of it).
    pub fn exit_child(&mut self, via: &str, parent: i32, child: i32) -> Value {
        let idx = self.mark();
        let r = self.send_to(0, &format!("{via}child {child} exit"));
        assert_eq!(r.pid(), child, "the reply comes from the child: {}", r.line);
        let parent_closed = r.num("parent_closed") as u64;
        let v = self.expect_exit(child, idx);
        self.check(parent, r.at, idx, Expect::totals(0, parent_closed));
        v
    }

    /// Waits for the `exit` object of `pid` and checks it against the last
    /// snapshot of `pid` (taken when it was idle, just before it exited).
    pub fn expect_exit(&mut self, pid: i32, idx: usize) -> Value {
        let last = self.last(pid);
        let ev = self.wait_event(idx, &format!("exit object for pid {pid}"), |e| {
            e["type"] == "exit" && e["pid"].as_i64() == Some(pid as i64)
        });
        let until = Instant::now() + EVENT_TIMEOUT;
        while running(pid) && Instant::now() < until {
            thread::sleep(Duration::from_millis(20));
        }
        if running(pid) {
            self.fail(&format!(
                "fdtrace reported an exit of pid {pid}, which still runs: {ev}"
            ));
        }
        let got = |k: &str| ev[k].as_u64();
        if ev["comm"].as_str() != Some(last.comm.as_str()) {
            self.fail(&format!(
                "exit object: comm should be {:?}: {ev}",
                last.comm
            ));
        }
        if got("open_fds") != Some(last.proc.len() as u64) {
            self.fail(&format!(
                "exit object of pid {pid}: open_fds should be {} (its fds when it exited, \
                 per /proc just before): {ev}",
                last.proc.len()
            ));
        }
        if got("opened_total") != Some(last.opened) || got("closed_total") != Some(last.closed) {
            self.fail(&format!(
                "exit object of pid {pid}: opened_total/closed_total should be {}/{} \
                 (no fd was opened or closed since the last process object): {ev}",
                last.opened, last.closed
            ));
        }
        if ev["ts"].as_f64().is_none() {
            self.fail(&format!("exit object without ts: {ev}"));
        }
        self.last.remove(&pid);
        ev
    }

    /// Waits for fdtrace to end by itself; it must exit 0.
    pub fn expect_fdtrace_exit_0(&mut self, why: &str) {
        self.expect_fdtrace_exit_0_within(EXIT_TIMEOUT, why);
    }

    /// Waits up to `timeout` for fdtrace to end by itself; it must exit 0.
    pub fn expect_fdtrace_exit_0_within(&mut self, timeout: Duration, why: &str) {
        self.may_exit = true;
        let until = Instant::now() + timeout;
        loop {
            self.poll_exit();
            if let Some(st) = self.exit_status {
                if st.code() != Some(0) {
                    self.fail(&format!(
                        "fdtrace exited with {st} ({why}); it should exit 0"
                    ));
                }
                return;
            }
            if Instant::now() >= until {
                self.fail(&format!(
                    "fdtrace still runs {timeout:?} after {why}; it should exit 0"
                ));
            }
            self.pump(until);
        }
    }

    /// Fails if fdtrace has ended.
    pub fn expect_fdtrace_running(&mut self, why: &str) {
        self.may_exit = false;
        self.ensure_running(why);
    }

    /// Sends `sig` to fdtrace and waits for it to exit; returns its status.
    pub fn signal_fdtrace(&mut self, sig: i32) -> ExitStatus {
        assert!(self.fdtrace_pid > 0, "fdtrace not started");
        self.may_exit = true;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.fdtrace_pid, sig) };
        let until = Instant::now() + EXIT_TIMEOUT;
        loop {
            self.poll_exit();
            if let Some(st) = self.exit_status {
                return st;
            }
            if Instant::now() >= until {
                self.fail(&format!(
                    "fdtrace did not exit within {EXIT_TIMEOUT:?} of signal {sig}"
                ));
            }
            self.pump(until);
        }
    }
}

/// The last `n` bytes of `s` (on a char boundary), for failure messages.
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Kills `pid` if it still is one of ours (an fdops, whose comm is `fdops`, or
/// `exe` after it re-executed /proc/self/exe).
fn kill_fdops(pid: i32) {
    if pid <= 0 || !alive(pid) {
        return;
    }
    if let Ok(c) = proc_comm(pid)
        && (c == "fdops" || c == "exe")
    {
        // SAFETY: plain kill of a process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.poll_exit();
        if self.exit_status.is_none()
            && let Some(c) = self.fdtrace.as_mut()
        {
            // SAFETY: our own child.
            unsafe { libc::kill(self.fdtrace_pid, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.extra_pids.clone() {
            kill_fdops(pid);
        }
        for t in &mut self.targets {
            t.stdin.take();
            if let Some(c) = t.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            } else {
                kill_fdops(t.pid);
            }
        }
    }
}

// ---- one-shot runs (exit codes) --------------------------------------------

/// Result of running fdtrace to its end.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs fdtrace with `args` and stdin closed, kills it after `timeout`.
pub fn run_fdtrace(args: &[&str], timeout: Duration) -> Finished {
    require_root();
    let bin = fdtrace_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let out = Arc::new(Mutex::new(String::new()));
    let err = Arc::new(Mutex::new(String::new()));
    spawn_collector(child.stdout.take().unwrap(), out.clone());
    spawn_collector(child.stderr.take().unwrap(), err.clone());
    let until = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait fdtrace") {
            break st;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fdtrace {args:?} still ran after {timeout:?}\nstdout: {}\nstderr: {}",
                out.lock().unwrap(),
                err.lock().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    // Let the collectors drain the pipes.
    thread::sleep(Duration::from_millis(100));
    let stdout = out.lock().unwrap().clone();
    let stderr = err.lock().unwrap().clone();
    Finished {
        status,
        stdout,
        stderr,
    }
}
