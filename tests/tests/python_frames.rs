//! Python frames read from a live process's memory by `fdtrace py-stack`
//! (no BPF): the user-space walker, which is also the oracle of the kernel
//! side's walk.
//!
//! Each test runs tests/python/stacks.py under one interpreter (pyenv's
//! 3.11.7, 3.12.1, 3.13.0, Debian's /usr/bin/python3), from a directory whose
//! name is not ASCII, and waits until its main thread and its asyncio thread
//! are in read(2) and its worker thread in futex(2): their stacks are then
//! still. Checked:
//! - the main thread's frames, exactly: qualname, file and line of every
//!   frame, the lines from the `# @name` markers of the script;
//! - every thread's frames against CPython's own walk: faulthandler's dump
//!   of every thread on SIGUSR1 (file, line and co_name of every frame);
//! - every thread's frames against py-spy's `dump` (PyPI, installed with
//!   tests/python/venv.sh), an independent reader of the same memory. py-spy
//!   0.4.3 leaves out each thread's outermost frame (`<module>`,
//!   `Thread._bootstrap`) and, on 3.12+, frames of generators and
//!   coroutines, which CPython's faulthandler shows, and so does fdtrace:
//!   those are taken out of fdtrace's list before comparing;
//! - the user frame: the main thread's innermost frame is the user's, the
//!   worker's is `worker` via `queue Queue.get`;
//! - a coroutine's frames are in its thread's chain, under the event loop's;
//! - the version fdtrace reports is the interpreter's own.
//!
//! Interpreters come from pyenv (`$PYENV_ROOT`, else `pyenv root`, else
//! ~/.pyenv): a missing one fails the test, naming what to install.
//! fdtrace reads the children's memory: root, or the same user without
//! Yama's ptrace restrictions.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use fdtrace_tests::{PYDIR, debian_python, fdtrace_bin, markers, py_spy, pyenv_python, venv_of};
use serde_json::Value;

const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// x86-64 syscall numbers the threads of stacks.py block in.
const SYS_READ: &str = "0";
const SYS_FUTEX: &str = "202";

/// A child killed when dropped, so a failing test leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The syscall `tid` of `pid` is blocked in, from /proc (its first field).
fn blocked_in(pid: u32, tid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    s.split_whitespace().next().map(str::to_owned)
}

struct Stacks {
    child: Running,
    pid: u32,
    worker: u32,
    aio: u32,
    script: String,
    /// Where faulthandler writes on SIGUSR1.
    dump: PathBuf,
    /// `# @name` marker -> line number.
    lines: HashMap<String, u32>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// stacks.py copied into a fresh directory named `prøve-…` (a co_filename
/// that is a non-ASCII str), started, and left blocked.
fn start_stacks(python: &Path) -> Stacks {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fdtrace-prøve-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("make temp dir");
    let dir = TempDir(dir);
    let script = dir.0.join("stacks.py");
    std::fs::copy(Path::new(PYDIR).join("stacks.py"), &script).expect("copy stacks.py");
    let source = std::fs::read_to_string(&script).expect("read stacks.py");
    let lines = markers(&source);
    let dump = dir.0.join("faulthandler.txt");
    let mut child = Command::new(python)
        .arg(&script)
        .arg(&dump)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", python.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let child = Running(child);
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .expect("read stacks.py's first line");
    let v: Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("stacks.py printed {first:?}, not JSON: {e}"));
    let pid = v["pid"].as_u64().expect("pid") as u32;
    let worker = v["worker"].as_u64().expect("worker") as u32;
    let aio = v["aio"].as_u64().expect("aio") as u32;
    assert_eq!(pid, child.0.id(), "stacks.py's pid");
    let start = Instant::now();
    while blocked_in(pid, pid).as_deref() != Some(SYS_READ)
        || blocked_in(pid, aio).as_deref() != Some(SYS_READ)
        || blocked_in(pid, worker).as_deref() != Some(SYS_FUTEX)
    {
        assert!(
            start.elapsed() < SETTLE_TIMEOUT,
            "stacks.py under {} did not block in read and futex within {SETTLE_TIMEOUT:?} \
             (main: {:?}, aio: {:?}, worker: {:?})",
            python.display(),
            blocked_in(pid, pid),
            blocked_in(pid, aio),
            blocked_in(pid, worker)
        );
        thread::sleep(Duration::from_millis(20));
    }
    Stacks {
        child,
        pid,
        worker,
        aio,
        script: script.to_string_lossy().into_owned(),
        dump,
        lines,
        _dir: dir,
    }
}

/// `fdtrace py-stack --json` of one thread.
fn py_stack(pid: u32, tid: u32) -> Value {
    let out = Command::new(fdtrace_bin())
        .args([
            "py-stack",
            "--json",
            "--pid",
            &pid.to_string(),
            "--tid",
            &tid.to_string(),
        ])
        .output()
        .expect("run fdtrace py-stack");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fdtrace py-stack --pid {pid} --tid {tid}: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("py-stack printed {stdout:?}: {e}"))
}

fn frames(v: &Value) -> Vec<String> {
    v["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| {
            assert!(f.get("error").is_none(), "a frame could not be read: {f}");
            f["frame"].as_str().expect("frame text").to_owned()
        })
        .collect()
}

/// CPython's own stacks of every thread, from faulthandler (which does not
/// give native thread ids); each frame is (file, line, co_name).
fn faulthandler_stacks(s: &Stacks) -> Vec<Vec<(String, u32, String)>> {
    // SAFETY: kill has no memory effects; the pid is our child's.
    assert_eq!(
        unsafe { libc::kill(s.pid as i32, libc::SIGUSR1) },
        0,
        "kill -USR1"
    );
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&s.dump).unwrap_or_default();
        // Complete once both threads' stacks end with a blank line or EOF
        // after the current thread's `<module>` frame.
        if text.contains("Current thread") && text.contains(" in <module>") {
            let mut threads = Vec::new();
            for block in text.split("\n\n") {
                let frames: Vec<_> = block
                    .lines()
                    .filter_map(|l| {
                        let rest = l.trim().strip_prefix("File \"")?;
                        let (file, rest) = rest.split_once("\", line ")?;
                        let (line, name) = rest.split_once(" in ")?;
                        Some((unescape(file), line.parse().ok()?, unescape(name)))
                    })
                    .collect();
                if !frames.is_empty() {
                    threads.push(frames);
                }
            }
            return threads;
        }
        assert!(
            start.elapsed() < SETTLE_TIMEOUT,
            "faulthandler wrote {text:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// faulthandler's text with its escapes (`\xf8`, `\u0444`, `\U0001f600`:
/// it writes non-ASCII that way) turned back into characters.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let esc = &rest[i + 1..];
        let n = match esc.chars().next() {
            Some('x') => 2,
            Some('u') => 4,
            Some('U') => 8,
            _ => panic!("faulthandler escape in {s:?}"),
        };
        let c = u32::from_str_radix(&esc[1..1 + n], 16).expect("hex escape");
        out.push(char::from_u32(c).expect("a character"));
        rest = &esc[1 + n..];
    }
    out.push_str(rest);
    out
}

/// fdtrace's frames match faulthandler's: same file and line, and the
/// qualname ends with faulthandler's co_name.
fn same_as_cpython(ours: &[String], theirs: &[(String, u32, String)]) -> bool {
    ours.len() == theirs.len()
        && ours.iter().zip(theirs).all(|(o, (file, line, name))| {
            o.ends_with(&format!(" ({file}:{line})"))
                && (o.starts_with(&format!("{name} (")) || o.contains(&format!(".{name} (")))
        })
}

fn version_of(python: &Path) -> String {
    let out = Command::new(python)
        .args(["-c", "import platform; print(platform.python_version())"])
        .output()
        .expect("run python");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn check(python: &Path) {
    let venv = venv_of(python);
    let s = start_stacks(python);
    let at = |func: &str, marker: &str| format!("{func} ({}:{})", s.script, s.lines[marker]);

    let main = py_stack(s.pid, s.pid);
    assert_eq!(
        main["python"].as_str(),
        Some(version_of(python).as_str()),
        "{main}"
    );
    let want = vec![
        at("inner", "inner"),
        at("gen", "gen"),
        at("Outer.method.<locals>.nested", "nested"),
        at("Outer.method", "method"),
        at("naïve_функция", "naive"),
        at("<module>", "module"),
    ];
    assert_eq!(frames(&main), want, "main thread of {}", python.display());
    assert_eq!(main["user_frame"].as_str(), Some(want[0].as_str()));
    assert_eq!(main["via"], Value::Null);

    let worker = py_stack(s.pid, s.worker);
    let wf = frames(&worker);
    assert!(wf.len() >= 3, "worker frames {wf:?}");
    assert!(
        wf[0].starts_with("Condition.wait ("),
        "worker frames {wf:?}"
    );
    assert!(wf[1].starts_with("Queue.get ("), "worker frames {wf:?}");
    assert_eq!(wf[2], at("worker", "worker"));
    assert!(
        wf.last().unwrap().starts_with("Thread._bootstrap ("),
        "worker frames {wf:?}"
    );
    assert_eq!(worker["user_frame"].as_str(), Some(wf[2].as_str()));
    assert_eq!(worker["via"].as_str(), Some("queue Queue.get"));

    let aio = py_stack(s.pid, s.aio);
    let af = frames(&aio);
    assert!(af.len() > 3, "aio frames {af:?}");
    assert_eq!(
        af[..2],
        [at("inner", "inner"), at("fetch_async", "async")],
        "aio frames {af:?}"
    );
    assert!(af.contains(&at("loop_thread", "loop")), "aio frames {af:?}");
    assert!(
        af.iter()
            .any(|f| f.starts_with("BaseEventLoop.run_until_complete (")),
        "aio frames {af:?}"
    );
    assert_eq!(aio["user_frame"].as_str(), Some(af[0].as_str()));

    let minor: u32 = main["python"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let as_py_spy_shows = |frames: &[String]| -> Vec<String> {
        frames[..frames.len() - 1]
            .iter()
            .filter(|f| minor < 12 || !(f.starts_with("gen (") || f.starts_with("fetch_async (")))
            .cloned()
            .collect()
    };
    let spy = py_spy(&venv, s.pid).unwrap_or_else(|e| panic!("{e}"));
    for (what, tid, ours) in [
        ("main", s.pid, &want),
        ("worker", s.worker, &wf),
        ("aio", s.aio, &af),
    ] {
        assert_eq!(
            spy.get(&u64::from(tid)),
            Some(&as_py_spy_shows(ours)),
            "{what}: py-spy vs fdtrace (all of fdtrace's: {ours:?})"
        );
    }

    let cpython = faulthandler_stacks(&s);
    assert_eq!(cpython.len(), 3, "faulthandler's threads: {cpython:?}");
    let with = |name: &str| {
        cpython
            .iter()
            .find(|t| t.iter().any(|f| f.2 == name))
            .unwrap_or_else(|| panic!("no thread with {name} in faulthandler's {cpython:?}"))
    };
    for (what, ours, theirs) in [
        ("main", &want, with("<module>")),
        ("worker", &wf, with("worker")),
        ("aio", &af, with("loop_thread")),
    ] {
        assert!(
            same_as_cpython(ours, theirs),
            "{what}: fdtrace {ours:?}, faulthandler {theirs:?}"
        );
    }
    drop(s.child);
}

#[test]
fn py_stack_pyenv_311() {
    check(&pyenv_python("3.11.7"));
}

#[test]
fn py_stack_pyenv_312() {
    check(&pyenv_python("3.12.1"));
}

#[test]
fn py_stack_pyenv_313() {
    check(&pyenv_python("3.13.0"));
}

#[test]
fn py_stack_debian_static() {
    check(&debian_python());
}

/// py-stack's error and exit code for `pid`.
fn py_stack_error(pid: u32) -> (Option<i32>, String) {
    let out = Command::new(fdtrace_bin())
        .args(["py-stack", "--pid", &pid.to_string()])
        .output()
        .expect("run fdtrace py-stack");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// An older CPython is named with the reason its frames are not read.
#[test]
fn py_stack_unsupported_310() {
    let python = pyenv_python("3.10.13");
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import sys; print('up', flush=True); sys.stdin.read()",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3.10");
    let stdout = child.stdout.take().expect("stdout");
    let child = Running(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "up");
    let pid = child.0.id();
    assert_eq!(
        py_stack_error(pid),
        (
            Some(1),
            format!(
                "fdtrace: Python frames are not available for pid {pid}: \
                 CPython 3.10 is not supported (3.11-3.13 are)"
            )
        )
    );
}

#[test]
fn py_stack_not_python() {
    let child = Running(
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep"),
    );
    let pid = child.0.id();
    // Until sleep has exec'd, the child is still this test's copy.
    let start = Instant::now();
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() != "sleep") {
        assert!(start.elapsed() < SETTLE_TIMEOUT, "sleep did not start");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        py_stack_error(pid),
        (Some(1), format!("fdtrace: process {pid} runs no CPython"))
    );
}
