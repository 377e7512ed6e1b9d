//! `fdtrace --pid` given a pyenv python (whose executable links
//! libpython3.X.so) right after its exec, before the dynamic loader has
//! mapped libpython: the process does not look like a Python yet, and
//! fdtrace must look again until it does, so that its fds get Python
//! stacks. The process is held at that point with ptrace (PTRACE_TRACEME:
//! the kernel stops a traced child right after a successful exec, before
//! any of its own code, the loader's included, runs).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use fdtrace_tests::{fdtrace_bin, pyenv_python, require_root};
use serde_json::Value;

/// Opens 5 fds from a function of its own once told to, then waits.
const SCRIPT: &str = r#"
import os, sys
def leak_here(n):
    return [open(os.devnull) for _ in range(n)]
sys.stdin.readline()
held = leak_here(5)
print("opened", flush=True)
sys.stdin.readline()
"#;

/// Killed and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn maps_name_libpython(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("maps")
        .contains("libpython")
}

#[test]
fn a_python_attached_before_its_loader_ran_gets_python_stacks() {
    require_root();
    let python = pyenv_python("3.12.1");
    let mut cmd = Command::new(&python);
    cmd.args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: ptrace(PTRACE_TRACEME) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut py = Killed(cmd.spawn().expect("start python"));
    let pid = py.0.id();
    let mut status = 0;
    // SAFETY: plain waitpid on our child.
    let got = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    assert!(
        got == pid as i32 && libc::WIFSTOPPED(status),
        "python stops at its exec: {status:#x}"
    );
    assert!(
        !maps_name_libpython(pid),
        "held before its loader mapped libpython"
    );

    let mut ft = Killed(
        Command::new(fdtrace_bin())
            .args(["--pid", &pid.to_string(), "--json", "--interval", "200ms"])
            .args(["--min-age", "0s", "--duration", "20s"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fdtrace"),
    );
    let (tx, objects) = mpsc::channel::<Value>();
    let out = ft.0.stdout.take().expect("stdout");
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str(&line) else {
                continue;
            };
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        objects
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("fdtrace wrote no {what} in 20 s"))
    };
    while next("start object")["type"] != "start" {}

    // SAFETY: our traced, stopped child; it runs on from here.
    let detached = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid as i32, 0, 0) };
    assert_eq!(detached, 0, "PTRACE_DETACH");
    let mut stdin = py.0.stdin.take().expect("stdin");
    let mut lines = BufReader::new(py.0.stdout.take().expect("stdout")).lines();
    // Its interpreter is up (libpython mapped) once it reads its stdin.
    let t = std::time::Instant::now();
    while !maps_name_libpython(pid) {
        assert!(t.elapsed() < Duration::from_secs(10), "python never ran");
        thread::sleep(Duration::from_millis(10));
    }
    // fdtrace looks again every 5 ms: let it find the interpreter.
    thread::sleep(Duration::from_millis(500));
    writeln!(stdin, "go").expect("tell python");
    let said = lines.next().expect("python's line").expect("read");
    assert_eq!(said, "opened");

    loop {
        let v = next("site of leak_here");
        // The site of the 5 new fds (not the /dev/null fd it was started
        // with, pre-existing at the attach).
        if v["type"] == "site"
            && v["pid"] == pid
            && v["resource"] == "/dev/null"
            && v["open_fds"] == 5
        {
            let frames: Vec<&str> = v["py_stack"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert!(
                frames.iter().any(|f| f.starts_with("leak_here ")),
                "the /dev/null site has the Python stack of leak_here: {v}"
            );
            break;
        }
    }
}
