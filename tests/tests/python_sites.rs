//! Python call sites: fdtrace names the Python function and line that
//! created each leaking fd, in real programs under pyenv's 3.11.7, 3.12.1,
//! 3.13.0 and Debian's /usr/bin/python3, and says once why it cannot under
//! 3.10.
//!
//! One fdtrace run traces them all at once (so the file costs one run's
//! time, about 35 s): `fdtrace run --json --interval 1s --duration 30s
//! --top 40 --stack-rate 1000000 -- sh -c '<each python> tests/python/sites.py
//! ... & wait'`.
//! Each sites.py (see its header) leaks one fd per tick from each of seven
//! named functions (open() twice of one file, sqlite3.connect,
//! logging.FileHandler, subprocess.Popen pipes, http.client,
//! asyncio.open_connection), runs a healthy function that opens and closes,
//! and, under the supported versions, runs the field report's agent.py
//! (an httpx.AsyncClient per request, never closed) as a child; all
//! against tests/python/keepalive_server.py on 127.0.0.1, started by the
//! test outside fdtrace. Then it stops leaking, says `idle` with the number
//! of ticks done, and holds its fds.
//!
//! Checked, for each supported interpreter, on the last report of the
//! process (taken after it went idle, so its fds are still):
//! - each leaking function is exactly one site whose `py_stack` holds the
//!   function at the line of its `# @name` marker (computed from the source,
//!   not hard-coded), whose `user_frame` is that frame, of the right kind,
//!   with one open fd per tick done (what the program did; the fds of the
//!   file they share are also counted in /proc/PID/fd), and with a `leak`
//!   finding;
//! - the two functions leaking the same file are two sites of one resource;
//! - a leak at the end of a recursion 40 deep, whose 32 innermost frames
//!   span more than the window of the data stack the kernel reads in one
//!   go, in the main thread and in a thread of its own: each site's
//!   `py_stack` is exactly those 32;
//! - the healthy function is in no site and no finding;
//! - a thread blocked in open() of a FIFO: py-spy (PyPI), an independent
//!   reader of the process's memory, dumps its stack while it waits; the
//!   test then opens the FIFO for writing, and the site of the fd that
//!   open() returns must have that very stack (py-spy leaves out a thread's
//!   outermost frame, `Thread._bootstrap`);
//! - in the agent, `fetch_data_wrong` at its `@leak` line is the site of the
//!   leaked sockets, exactly one per request the agent made, named from
//!   the socket's first use (httpx creates it in a helper task, where none
//!   of the user's frames are on the stack), via httpx; `fetch_data_right`
//!   (one shared client) does not leak; fdtrace's sites of the agent hold
//!   exactly the sockets /proc/PID/fd shows (to the server: one per request
//!   and the shared client's; in all: those and the event loop's
//!   socketpair). The agent exec'd while fdtrace ran, and fds a process
//!   makes before fdtrace has found its interpreter have native stacks
//!   only (the exec event waits while a report runs, seconds on a loaded
//!   machine): the test lets the agent begin its requests once fdtrace's
//!   kernel map PY_LAYOUTS holds the agent's pid (bpftool);
//! - no `notice` for any of these processes.
//!
//! Under 3.10: exactly one `notice` in the whole run, for that process, with
//! the reason; its sites have the native stacks only, and it still leaks.
//!
//! Interpreters come from pyenv (`$PYENV_ROOT`, else `pyenv root`, else
//! ~/.pyenv) and Debian's package; httpx and py-spy from a venv per
//! interpreter (tests/python/venv.sh). A missing one fails its test, naming
//! what to install; so does bpftool. Needs root, like the other tests.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use fdtrace_tests::bpf_maps::{map_has_pid, map_of};
use fdtrace_tests::{
    PYDIR, fdtrace_bin, find_debian_python, find_pyenv_python, find_venv_of, now_ts,
    program_markers, py_spy, read_lines, require_root, tail,
};
use serde_json::Value;

/// Long enough for the slowest interpreter on a loaded machine: each
/// request of the agent makes an httpx client, whose SSL context loads the
/// CA bundle (tens of ms of CPU), and four agents run at once.
const DURATION_S: u64 = 30;
/// Ticks per second and seconds of leaking of each sites.py, and requests
/// its agent makes meanwhile.
const RATE: f64 = 2.0;
const LEAK_SECONDS: f64 = 8.0;
const AGENT_REQUESTS: u32 = 8;
/// How long the programs hold their fds once idle (they also go when their
/// parent is gone).
const HOLD_S: u64 = 40;
/// How long a thread may take to block in open() of its FIFO.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(15);
/// openat(2) on x86-64.
const SYS_OPENAT: &str = "257";

/// The interpreters: (test label, how to find it, supported).
const PYTHONS: [(&str, Which, bool); 5] = [
    ("3.11", Which::Pyenv("3.11.7"), true),
    ("3.12", Which::Pyenv("3.12.1"), true),
    ("3.13", Which::Pyenv("3.13.0"), true),
    ("debian", Which::Debian, true),
    ("3.10", Which::Pyenv("3.10.13"), false),
];

#[derive(Clone, Copy)]
enum Which {
    Pyenv(&'static str),
    Debian,
}

/// The most frames fdtrace keeps of a Python stack, the innermost (the
/// README's limits).
const PY_MAX_FRAMES: usize = 32;

/// The leaking functions of sites.py and the kind of fd each leaks.
const LEAKS: [(&str, &str); 7] = [
    ("report_a", "file"),
    ("report_b", "file"),
    ("db_connect", "file"),
    ("log_handler", "file"),
    ("run_child", "pipe"),
    ("http_get", "socket"),
    ("open_stream", "socket"),
];

/// What one interpreter's sites.py did during the run.
#[derive(Default)]
struct Prog {
    python: PathBuf,
    /// Why it could not run, if so.
    missing: Option<String>,
    pid: Option<u32>,
    agent: Option<u32>,
    fifo_tid: Option<u32>,
    /// The version it reported.
    version: Option<String>,
    /// When it went idle, and the ticks it did.
    idle: Option<(f64, u64)>,
    /// Requests its agent made and when it said so (its `done` line), and
    /// what it printed.
    agent_requests: Option<(f64, u64)>,
    agent_out: String,
    /// When the test let the agent begin its requests (fdtrace held its
    /// layout in the kernel then).
    agent_go: Option<f64>,
    /// The agent's sockets in /proc when it said `done`: (TCP to the
    /// server, all).
    agent_sockets: Option<(usize, usize)>,
    /// py-spy's stack of the FIFO thread while it was blocked in open().
    fifo_stack: Option<Result<Vec<String>, String>>,
    /// The fds of the file report_a and report_b share, in /proc, at idle.
    report_fds: Option<usize>,
}

struct Run {
    progs: HashMap<&'static str, Prog>,
    events: Vec<Value>,
    /// stdout lines that are not JSON (the programs' own lines).
    other: Vec<String>,
    stderr: String,
    status: Option<ExitStatus>,
    notes: Vec<String>,
    args: Vec<String>,
    /// Set when the run itself could not be made.
    fatal: Option<String>,
    /// keepalive_server.py's port.
    port: u16,
}

/// Kills what it holds when dropped (also on a failed run).
#[derive(Default)]
struct Reaper {
    children: Vec<Child>,
    /// Pids of grandchildren: killed if they still run one of our programs.
    pids: Vec<u32>,
    dir: Option<PathBuf>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.pids {
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("sites.py") || c.contains("agent.py")
                })
                .unwrap_or(false);
            if ours {
                // SAFETY: kill of a process this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// `cmd` spawned so that it gets `sig` when the test process dies.
fn spawn_tied(cmd: &mut Command, sig: i32) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, sig);
            Ok(())
        });
    }
    cmd.spawn()
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn blocked_in(pid: u32, tid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next().map(str::to_owned)
}

fn sites_py() -> String {
    Path::new(PYDIR).join("sites.py").display().to_string()
}

fn agent_py() -> String {
    Path::new(PYDIR).join("agent.py").display().to_string()
}

/// The run, made once by whichever test asks first.
fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(make_run)
}

fn make_run() -> Run {
    require_root();
    let mut run = Run {
        progs: HashMap::new(),
        events: Vec::new(),
        other: Vec::new(),
        stderr: String::new(),
        status: None,
        notes: Vec::new(),
        args: Vec::new(),
        fatal: None,
        port: 0,
    };
    let mut reaper = Reaper::default();
    if let Err(e) = run_into(&mut run, &mut reaper) {
        run.fatal = Some(e);
    }
    run
}

fn run_into(run: &mut Run, reaper: &mut Reaper) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("fdtrace-pysites-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("make {}: {e}", dir.display()))?;
    reaper.dir = Some(dir.clone());
    // A venv python per supported interpreter (httpx for the agent); the
    // plain interpreter for 3.10, whose sites.py needs only the standard
    // library.
    let mut spy_venv = None;
    for (label, which, supported) in PYTHONS {
        let found = match which {
            Which::Pyenv(v) => find_pyenv_python(v),
            Which::Debian => find_debian_python(),
        };
        let prog = match found.and_then(|p| {
            if !supported {
                return Ok(p);
            }
            let bin = find_venv_of(&p)?;
            spy_venv.get_or_insert(bin.clone());
            Ok(bin.join("python"))
        }) {
            Ok(python) => Prog {
                python,
                ..Prog::default()
            },
            Err(e) => Prog {
                missing: Some(e),
                ..Prog::default()
            },
        };
        run.progs.insert(label, prog);
    }
    let spy_venv = spy_venv.ok_or("no supported interpreter: nothing to run")?;
    let server_py = run
        .progs
        .values()
        .find(|p| p.missing.is_none())
        .map(|p| p.python.clone())
        .expect("a supported interpreter");

    let mut server = spawn_tied(
        Command::new(&server_py)
            .arg(Path::new(PYDIR).join("keepalive_server.py"))
            .args(["--idle", "60", "--seconds", "120"])
            .stdout(Stdio::piped()),
        libc::SIGKILL,
    )
    .map_err(|e| format!("start keepalive_server.py: {e}"))?;
    let server_out = server.stdout.take().expect("piped");
    reaper.children.push(server);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server_out), &mut line)
        .map_err(|e| format!("read keepalive_server.py: {e}"))?;
    let port = match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["ready", p] => p.to_owned(),
        _ => {
            return Err(format!(
                "keepalive_server.py said {line:?}, not 'ready PORT'"
            ));
        }
    };
    run.port = port
        .parse()
        .map_err(|_| format!("keepalive_server.py's port {port:?}"))?;
    let url = format!("http://127.0.0.1:{port}/data");

    let mut script = String::new();
    for (label, _, supported) in PYTHONS {
        let p = &run.progs[label];
        if p.missing.is_some() {
            continue;
        }
        let d = dir.join(label);
        std::fs::create_dir_all(&d).map_err(|e| format!("make {}: {e}", d.display()))?;
        let _ = writeln!(
            script,
            "{} {} --label {} --dir {} --url {} --rate {RATE} --seconds {LEAK_SECONDS} \
             --agent-requests {AGENT_REQUESTS} --hold {HOLD_S}{} &",
            quote(&p.python.display().to_string()),
            quote(&sites_py()),
            label,
            quote(&d.display().to_string()),
            quote(&url),
            if supported { " --agent" } else { "" }
        );
    }
    script.push_str("wait\n");
    let duration = format!("{DURATION_S}s");
    run.args = [
        "run",
        "--json",
        "--interval",
        "1s",
        "--duration",
        &duration,
        "--top",
        "40",
        // Every fd gets its stack: the interpreter's start opens a burst of
        // files that can use up the default budget's 100 ms slot just
        // before the first tick, whose fds would then be "not sampled" (once
        // in CI: one fd of each leaking function).
        "--stack-rate",
        "1000000",
        "--",
        "sh",
        "-c",
        &script,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut fdtrace = spawn_tied(
        Command::new(fdtrace_bin())
            .args(&run.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        libc::SIGTERM,
    )
    .map_err(|e| format!("start fdtrace: {e}"))?;
    let stderr = Arc::new(Mutex::new(String::new()));
    {
        let stderr = stderr.clone();
        let mut err = fdtrace.stderr.take().expect("piped");
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
                if n == 0 {
                    break;
                }
                stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    read_lines(fdtrace.stdout.take().expect("piped"), move |l, at| {
        tx.send((l, at)).is_ok()
    });
    reaper.children.push(fdtrace);
    let until = Instant::now() + Duration::from_secs(DURATION_S + 20);
    // The FIFOs opened for writing, held until the run ends.
    let mut writers: Vec<File> = Vec::new();
    // The id of fdtrace's PY_LAYOUTS map, once found.
    let mut layouts_map = None;
    // Bytes of each program's events file already read.
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    // The programs hold fdtrace's stdout open after it ends (they share
    // it): the run ends when fdtrace exits, and what it wrote is read a
    // little longer.
    let mut drain_until = None;
    loop {
        let got = rx.recv_timeout(Duration::from_millis(100));
        let fdtrace_pid = reaper.children.last().expect("fdtrace").id();
        poll_programs(
            run,
            reaper,
            &dir,
            &spy_venv,
            &mut seen,
            &mut writers,
            (fdtrace_pid, &mut layouts_map),
        )?;
        match got {
            Ok((Some(line), _)) => match serde_json::from_str::<Value>(&line) {
                Ok(v) if v.is_object() => run.events.push(v),
                _ => run.other.push(line),
            },
            Ok((None, _)) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if drain_until.is_some_and(|d| now > d) {
            break;
        }
        if drain_until.is_none() {
            let fdtrace = reaper.children.last_mut().expect("fdtrace");
            if let Ok(Some(st)) = fdtrace.try_wait() {
                run.status = Some(st);
                drain_until = Some(now + Duration::from_millis(500));
            } else if now > until {
                run.notes
                    .push("fdtrace ran past its --duration: killed".into());
                break;
            }
        }
    }
    // Kept for a person to read after a failure.
    let dump = std::env::temp_dir().join("fdtrace-pysites-last.ndjson");
    let text: String = run.events.iter().map(|v| format!("{v}\n")).collect();
    if std::fs::write(&dump, text).is_ok() {
        run.notes
            .push(format!("fdtrace's JSON objects are in {}", dump.display()));
    }
    run.stderr = stderr.lock().unwrap().clone();
    drop(writers);
    Ok(())
}

/// Reads what the programs wrote since the last call: sites.py's events
/// (DIR/LABEL/events) and its agent's `done` line (DIR/LABEL/agent.out).
/// Lets each agent begin its requests (DIR/LABEL/agent.go) once fdtrace
/// (pid `fdtrace.0`) holds its interpreter's layout in the kernel.
fn poll_programs(
    run: &mut Run,
    reaper: &mut Reaper,
    dir: &Path,
    spy_venv: &Path,
    seen: &mut HashMap<&'static str, usize>,
    writers: &mut Vec<File>,
    fdtrace: (u32, &mut Option<u32>),
) -> Result<(), String> {
    let (fdtrace_pid, layouts_map) = fdtrace;
    let port = run.port;
    for (label, prog) in run.progs.iter_mut() {
        let d = dir.join(label);
        if let Some(agent) = prog.agent
            && prog.agent_go.is_none()
        {
            if layouts_map.is_none() {
                *layouts_map = map_of(fdtrace_pid, "PY_LAYOUTS")?;
            }
            if let Some(map) = *layouts_map
                && map_has_pid(map, agent)
            {
                File::create(d.join("agent.go"))
                    .map_err(|e| format!("create {}: {e}", d.join("agent.go").display()))?;
                prog.agent_go = Some(now_ts());
            }
        }
        if prog.agent.is_some()
            && prog.agent_requests.is_none()
            && let Ok(out) = std::fs::read_to_string(d.join("agent.out"))
        {
            prog.agent_requests =
                out.lines()
                    .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                        ["done", pid, n] if pid.parse().ok() == prog.agent => {
                            n.parse().ok().map(|n| (now_ts(), n))
                        }
                        _ => None,
                    });
            if prog.agent_requests.is_some() {
                prog.agent_sockets = prog.agent.and_then(|a| sockets_of(a, port));
            }
            prog.agent_out = out;
        }
        let Ok(text) = std::fs::read_to_string(d.join("events")) else {
            continue;
        };
        let from = seen.entry(label).or_insert(0);
        // Whole lines only: a line being written is read next time.
        let Some(end) = text.rfind('\n').map(|i| i + 1).filter(|&e| e > *from) else {
            continue;
        };
        let at = now_ts();
        for line in text[*from..end].lines() {
            let v: Value =
                serde_json::from_str(line).map_err(|e| format!("sites.py wrote {line:?}: {e}"))?;
            let pid = v["pid"].as_u64().map(|p| p as u32);
            match v["event"].as_str() {
                Some("ready") => {
                    prog.pid = pid;
                    prog.agent = v["agent"].as_u64().map(|p| p as u32);
                    prog.fifo_tid = v["fifo_tid"].as_u64().map(|p| p as u32);
                    prog.version = v["python"].as_str().map(str::to_owned);
                    reaper.pids.extend(prog.pid);
                    reaper.pids.extend(prog.agent);
                    if let (Some(pid), Some(tid)) = (prog.pid, prog.fifo_tid) {
                        let (stack, writer) = fifo_stage(spy_venv, pid, tid, &d.join("peer.fifo"));
                        prog.fifo_stack = Some(stack);
                        writers.extend(writer);
                    }
                }
                Some("idle") => {
                    prog.idle = Some((at, v["calls"].as_u64().unwrap_or(0)));
                    prog.report_fds = pid.and_then(|p| fds_to(p, &d.join("report.log")));
                }
                _ => return Err(format!("sites.py wrote {line:?}")),
            }
        }
        *from = end;
    }
    Ok(())
}

/// Waits for the FIFO thread to block in open(), takes py-spy's stack of
/// it, then opens the FIFO for writing so that its open() returns.
fn fifo_stage(
    spy_venv: &Path,
    pid: u32,
    tid: u32,
    fifo: &Path,
) -> (Result<Vec<String>, String>, Option<File>) {
    let start = Instant::now();
    while blocked_in(pid, tid).as_deref() != Some(SYS_OPENAT) {
        if start.elapsed() > BLOCK_TIMEOUT {
            return (
                Err(format!(
                    "thread {tid} of {pid} did not block in openat within {BLOCK_TIMEOUT:?} \
                     (in syscall {:?})",
                    blocked_in(pid, tid)
                )),
                None,
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let stack = py_spy(spy_venv, pid).and_then(|mut t| {
        t.remove(&u64::from(tid))
            .ok_or_else(|| format!("py-spy shows no thread {tid}"))
    });
    // Non-blocking, so that a failure shows as an error instead of a hang.
    // py-spy's ptrace stop interrupts the reader's open(), which the
    // kernel restarts: meanwhile the FIFO has no reader (ENXIO).
    let start = Instant::now();
    loop {
        let w = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo);
        match w {
            Ok(f) => return (stack, Some(f)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && start.elapsed() < BLOCK_TIMEOUT => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return (
                    Err(format!("open {} for writing: {e}", fifo.display())),
                    None,
                );
            }
        }
    }
}

/// Sockets of `pid` from /proc/PID/fd, by what /proc/PID/net says of them:
/// (TCP sockets connected to 127.0.0.1:`port`, all sockets).
fn sockets_of(pid: u32, port: u16) -> Option<(usize, usize)> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let inodes: Vec<u64> = rd
        .filter_map(|e| {
            let l = std::fs::read_link(e.ok()?.path()).ok()?;
            let l = l.to_str()?;
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    // rem_address 0100007F:PORT (127.0.0.1, little-endian hex), inode in
    // the tenth column.
    let peer = format!("0100007F:{port:04X}");
    let to_peer: HashSet<u64> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c.get(2) == Some(&peer.as_str())).then(|| c.get(9)?.parse().ok())?
        })
        .collect();
    Some((
        inodes.iter().filter(|i| to_peer.contains(i)).count(),
        inodes.len(),
    ))
}

/// How many fds of `pid` point at `path`, from /proc/PID/fd.
fn fds_to(pid: u32, path: &Path) -> Option<usize> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l == path)
            .count(),
    )
}

/// The frames of a site's `py_stack`.
fn py_stack(site: &Value) -> Vec<String> {
    site["py_stack"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| f.as_str().unwrap_or("<not a string>").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

struct Check<'a> {
    run: &'a Run,
    label: &'static str,
    prog: &'a Prog,
}

impl Check<'_> {
    #[track_caller]
    fn fail(&self, msg: &str) -> ! {
        let mut s = format!("{}: {msg}\n", self.label);
        let r = self.run;
        let _ = writeln!(s, "--- fdtrace {}", r.args.join(" "));
        let _ = writeln!(
            s,
            "--- exit status {:?}; sites.py pid {:?}, agent {:?} (let go at {:?}), python {:?}, \
             idle {:?}",
            r.status,
            self.prog.pid,
            self.prog.agent,
            self.prog.agent_go,
            self.prog.version,
            self.prog.idle
        );
        for n in &r.notes {
            let _ = writeln!(s, "--- note: {n}");
        }
        let _ = writeln!(
            s,
            "--- agent.py said:\n{}",
            tail(&self.prog.agent_out, 2000)
        );
        let _ = writeln!(s, "--- fdtrace stderr:\n{}", tail(&r.stderr, 4000));
        let _ = writeln!(
            s,
            "--- other stdout lines (last 20): {:?}",
            &r.other[r.other.len().saturating_sub(20)..]
        );
        for pid in [self.prog.pid, self.prog.agent].into_iter().flatten() {
            let (_, sites) = self.last_report(pid);
            let _ = writeln!(s, "--- last sites of pid {pid}:");
            for v in sites {
                let _ = writeln!(s, "{v}");
            }
            let _ = writeln!(s, "--- findings and notices of pid {pid}:");
            for v in self.of(pid, "finding").chain(self.of(pid, "notice")) {
                let _ = writeln!(s, "{v}");
            }
        }
        panic!("{s}");
    }

    fn of<'b>(&'b self, pid: u32, ty: &'b str) -> impl Iterator<Item = &'b Value> + 'b {
        self.run
            .events
            .iter()
            .filter(move |v| v["type"] == ty && v["pid"].as_u64() == Some(u64::from(pid)))
    }

    /// The last `process` object of `pid` and its `site` objects (same ts).
    fn last_report(&self, pid: u32) -> (Option<&Value>, Vec<&Value>) {
        let Some(p) = self.of(pid, "process").last() else {
            return (None, Vec::new());
        };
        let ts = p["ts"].as_f64();
        let sites = self
            .of(pid, "site")
            .filter(|s| s["ts"].as_f64() == ts)
            .collect();
        (Some(p), sites)
    }

    /// The last report of `pid`, which must be from after `after` (a time
    /// the process's fds were already still).
    fn still_report(&self, pid: u32, after: f64) -> Vec<&Value> {
        let (p, sites) = self.last_report(pid);
        let Some(p) = p else {
            self.fail(&format!("no process object for pid {pid}"));
        };
        let ts = p["ts"].as_f64().unwrap_or(0.0);
        if ts < after + 1.0 {
            self.fail(&format!(
                "the last report of pid {pid} (ts {ts}) is not a full interval after it went \
                 idle ({after}): the run ended too early"
            ));
        }
        sites
    }

    fn leak_finding(&self, pid: u32, site: &Value) -> Option<&Value> {
        self.of(pid, "finding")
            .find(|f| f["finding"] == "leak" && f["site"] == site["site"])
    }

    fn basics(&self) -> (u32, f64, u64) {
        if let Some(e) = &self.run.fatal {
            self.fail(&format!("the run could not be made: {e}"));
        }
        if let Some(e) = &self.prog.missing {
            self.fail(e);
        }
        let Some(pid) = self.prog.pid else {
            self.fail("sites.py never said it was ready");
        };
        let Some((idle_at, calls)) = self.prog.idle else {
            self.fail("sites.py never went idle");
        };
        if calls < 4 {
            self.fail(&format!("sites.py made only {calls} ticks"));
        }
        match self.run.status {
            Some(st) if st.success() => {}
            other => self.fail(&format!(
                "fdtrace should have ended by itself (--duration), exit 0: {other:?}"
            )),
        }
        (pid, idle_at, calls)
    }
}

fn check_supported(label: &'static str) {
    let run = run();
    let c = Check {
        run,
        label,
        prog: &run.progs[label],
    };
    let (pid, idle_at, calls) = c.basics();
    let script = sites_py();
    let m = program_markers("sites.py");
    let at = |func: &str| format!("{func} ({script}:{})", m[func]);
    let sites = c.still_report(pid, idle_at);

    // Each leaking function: one site, at its line, counted exactly.
    let mut ids = HashMap::new();
    for (func, kind) in LEAKS {
        let frame = at(func);
        let with: Vec<&&Value> = sites
            .iter()
            .filter(|s| py_stack(s).contains(&frame))
            .collect();
        let [s] = with[..] else {
            c.fail(&format!(
                "{} sites have {frame} in their py_stack, not one",
                with.len()
            ));
        };
        if s["user_frame"].as_str() != Some(frame.as_str()) {
            c.fail(&format!(
                "the user_frame of {func}'s site is not {frame}: {s}"
            ));
        }
        if s["kind"] != kind {
            c.fail(&format!("{func} leaks {kind} fds; its site: {s}"));
        }
        if s["open_fds"].as_u64() != Some(calls) {
            c.fail(&format!(
                "{func} leaked {calls} fds (one a tick), its site has {}: {s}",
                s["open_fds"]
            ));
        }
        if c.leak_finding(pid, s).is_none() {
            c.fail(&format!("no leak finding for {func}'s site {s}"));
        }
        ids.insert(func, (s["site"].clone(), s["resource"].clone()));
    }
    let (a, b) = (&ids["report_a"], &ids["report_b"]);
    if a.0 == b.0 || a.1 != b.1 {
        c.fail(&format!(
            "report_a and report_b leak the same file: two sites of one resource, got {a:?} \
             and {b:?}"
        ));
    }
    if c.prog.report_fds != Some(2 * calls as usize) {
        c.fail(&format!(
            "/proc/{pid}/fd at idle had {:?} fds to report.log, {calls} ticks made {}",
            c.prog.report_fds,
            2 * calls
        ));
    }

    // The recursions deeper than the frames kept: their innermost 32,
    // exactly (the leaking frame, then the recursing ones), though they
    // span more than the data stack window the kernel reads them from.
    let marked = |func: &str, marker: &str| format!("{func} ({script}:{})", m[marker]);
    let mut want = vec![marked("deep", "deep_leak")];
    want.resize(PY_MAX_FRAMES, marked("deep", "deep"));
    for file in ["deep.log", "deep_thread.log"] {
        // Digits of a resource's path are shown as N (its directory has the
        // run's pid and the version).
        let path = format!("/{file}");
        let with: Vec<&&Value> = sites
            .iter()
            .filter(|s| s["resource"].as_str().is_some_and(|r| r.ends_with(&path)))
            .collect();
        let [s] = with[..] else {
            c.fail(&format!("{} sites of *{path}, not one", with.len()));
        };
        if py_stack(s) != want || s["open_fds"].as_u64() != Some(calls) {
            c.fail(&format!(
                "the site of {file} should have {calls} fds and the py_stack {want:?}: {s}"
            ));
        }
    }

    // The healthy function is nowhere.
    let healthy = [at("healthy"), at("healthy_socket")];
    for s in c.of(pid, "site") {
        if py_stack(s).iter().any(|f| healthy.contains(f)) {
            c.fail(&format!(
                "healthy() closes what it opens, yet has a site: {s}"
            ));
        }
    }

    // The FIFO's stack: the one py-spy saw while open() waited.
    let spy = match &c.prog.fifo_stack {
        Some(Ok(s)) => s,
        Some(Err(e)) => c.fail(&format!("the FIFO thread: {e}")),
        None => c.fail("the FIFO stage did not run"),
    };
    let frame = at("open_peer");
    let with: Vec<&&Value> = sites
        .iter()
        .filter(|s| s["user_frame"].as_str() == Some(frame.as_str()))
        .collect();
    let [s] = with[..] else {
        c.fail(&format!(
            "{} sites have the user frame {frame}, not one",
            with.len()
        ));
    };
    let ours = py_stack(s);
    if ours.is_empty() || ours[..ours.len() - 1] != spy[..] || ours[0] != frame {
        c.fail(&format!(
            "the FIFO's site has py_stack {ours:?}; py-spy's stack of the thread blocked in \
             that open() was {spy:?} (py-spy leaves out the outermost frame)"
        ));
    }
    if !ours
        .last()
        .is_some_and(|f| f.starts_with("Thread._bootstrap ("))
    {
        c.fail(&format!("the FIFO thread's outermost frame: {ours:?}"));
    }

    // The agent: fetch_data_wrong, named from the sockets' first use.
    let Some(agent) = c.prog.agent else {
        c.fail("sites.py started no agent");
    };
    let Some((done_at, requests)) = c.prog.agent_requests else {
        c.fail("agent.py never said `done`");
    };
    let am = program_markers("agent.py");
    let wrong = format!("fetch_data_wrong ({}:{})", agent_py(), am["leak"]);
    let right = format!("fetch_data_right ({}:{})", agent_py(), am["healthy"]);
    let asites = c.still_report(agent, done_at);
    let with: Vec<&&Value> = asites
        .iter()
        .filter(|s| s["user_frame"].as_str() == Some(wrong.as_str()))
        .collect();
    let [s] = with[..] else {
        c.fail(&format!(
            "{} sites of the agent have the user frame {wrong}, not one",
            with.len()
        ));
    };
    if !py_stack(s).contains(&wrong) || s["kind"] != "socket" {
        c.fail(&format!("the agent's leaking site: {s}"));
    }
    if !s["via"].as_str().is_some_and(|v| v.starts_with("httpx ")) {
        c.fail(&format!("the agent's leak goes through httpx: {s}"));
    }
    // The agent began its requests once fdtrace held its interpreter's
    // layout in the kernel (the test let it then, see poll_programs): each
    // request's socket, first sent from fetch_data_wrong, is in this site,
    // and fdtrace's sockets of the agent are those of /proc/PID/fd.
    let Some((to_server, all)) = c.prog.agent_sockets else {
        c.fail("the agent's sockets were not read from /proc when it said `done`");
    };
    if s["open_fds"].as_u64() != Some(requests) {
        c.fail(&format!(
            "the agent made {requests} requests, each leaking a socket: {s}"
        ));
    }
    let sum = |f: &dyn Fn(&Value) -> bool| -> u64 {
        asites
            .iter()
            .filter(|n| f(n))
            .filter_map(|n| n["open_fds"].as_u64())
            .sum()
    };
    let peer = s["resource"].clone();
    let of_peer = sum(&|n| n["resource"] == peer);
    let sockets = sum(&|n| n["kind"] == "socket");
    // One a leaked client's, one the shared client's.
    if to_server as u64 != requests + 1 || of_peer != to_server as u64 || sockets != all as u64 {
        c.fail(&format!(
            "/proc/{agent}/fd held {to_server} sockets to the server ({requests} requests + the \
             shared client's) and {all} sockets in all; fdtrace's sites of {peer} hold \
             {of_peer}, its socket sites {sockets}"
        ));
    }
    if c.leak_finding(agent, s).is_none() {
        c.fail(&format!("no leak finding for the agent's site {s}"));
    }
    for s in c.of(agent, "site") {
        if s["user_frame"].as_str() == Some(right.as_str())
            && (s["open_fds"].as_u64().unwrap_or(0) > 1 || c.leak_finding(agent, s).is_some())
        {
            c.fail(&format!("fetch_data_right shares one client, no leak: {s}"));
        }
    }

    for p in [pid, agent] {
        if let Some(n) = c.of(p, "notice").next() {
            c.fail(&format!("CPython {:?} is supported: {n}", c.prog.version));
        }
    }
}

#[test]
fn sites_pyenv_311() {
    check_supported("3.11");
}

#[test]
fn sites_pyenv_312() {
    check_supported("3.12");
}

#[test]
fn sites_pyenv_313() {
    check_supported("3.13");
}

#[test]
fn sites_debian_static() {
    check_supported("debian");
}

/// 3.10: one notice, native stacks, and the leaks still found.
#[test]
fn sites_unsupported_310_notice() {
    let run = run();
    let c = Check {
        run,
        label: "3.10",
        prog: &run.progs["3.10"],
    };
    let (pid, idle_at, _) = c.basics();
    let notices: Vec<&Value> = run
        .events
        .iter()
        .filter(|v| v["type"] == "notice")
        .collect();
    let want = format!(
        "Python frames are not available for pid {pid}: CPython 3.10 is not supported \
         (3.11-3.13 are)"
    );
    match notices[..] {
        [n] if n["pid"].as_u64() == Some(u64::from(pid))
            && n["message"].as_str() == Some(want.as_str())
            && n["ts"].as_f64().is_some() => {}
        _ => c.fail(&format!(
            "the run should have exactly one notice, {{\"type\":\"notice\",\"pid\":{pid},\
             \"message\":{want:?}}}; it has {notices:?}"
        )),
    }
    let sites = c.still_report(pid, idle_at);
    let mut leaking = HashSet::new();
    for s in c.of(pid, "site") {
        if s.get("py_stack").is_some() || s.get("user_frame").is_some() {
            c.fail(&format!("no Python frames under 3.10: {s}"));
        }
    }
    for s in &sites {
        if c.leak_finding(pid, s).is_some() {
            leaking.insert(s["kind"].as_str().unwrap_or_default());
        }
    }
    if !["file", "pipe", "socket"]
        .iter()
        .all(|k| leaking.contains(k))
    {
        c.fail(&format!(
            "3.10's leaks of files, pipes and sockets are still found (native stacks and \
             resources): leaking kinds {leaking:?}"
        ));
    }
}
