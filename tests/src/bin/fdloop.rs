//! `fdloop`: a tight syscall loop for `cargo xtask bench`.
//!
//! ```text
//! fdloop MODE ITERATIONS [--wait]
//! fdloop hold N
//! fdloop node idle|churn|leak NAME N
//! ```
//!
//! MODE is one of
//! - `open`: openat(AT_FDCWD, "/dev/null", O_RDONLY) + close
//! - `socket`: socket(AF_UNIX, SOCK_STREAM, 0) + close
//! - `pipe`: pipe2(fds, 0) + two closes
//! - `getppid`: the raw getppid syscall (cheap, and not an fd syscall)
//! - `forkexec`: fork + execve("/bin/true") in the child + waitpid, from a
//!   parent holding [`FORK_HELD`] close-on-exec fds on /dev/null (opened
//!   before `--wait`, so a tracer attaching meanwhile finds them)
//!
//! The loop is timed with clock_gettime(CLOCK_MONOTONIC) and one line is
//! printed on stdout: `fdloop MODE ns_per_iter=<float> iters=<n> utime_us=<n>
//! stime_us=<n>`; the last two are fdloop's own CPU time so far
//! (getrusage(RUSAGE_SELF)), so that a parent that reaps fdloop (like
//! `fdtrace run`) can have its own CPU time told apart from fdloop's.
//! With `--wait`, fdloop first blocks reading one byte from stdin, so that a
//! tracer can attach before the timed loop starts.
//!
//! `hold N` opens N fds on /dev/null, prints `fdloop hold pid=P opened=N`,
//! then blocks reading stdin until a byte or end of file, and exits.
//!
//! `node` is a process of the bench's synthetic node: it renames itself NAME
//! (its comm, what process-exporter groups by), then `idle` opens N fds on
//! /dev/null and keeps them, `churn` does N fd operations a second (N/2
//! openat + close pairs) and `leak` opens N fds a second and never closes
//! them. It prints `fdloop node pid=P name=NAME active=A opened=O closed=C`
//! once ready and after every byte read on stdin; each byte toggles the
//! activity (a churner starts active, a leaker paused), end of file ends it.
//! The work is paced by the clock in ticks of [`TICK_MS`] ms.
//!
//! Any failing syscall ends fdloop with exit code 1 and a message on stderr.

use std::ffi::CStr;
use std::io::Write as _;
use std::process::ExitCode;

const DEV_NULL: &CStr = c"/dev/null";
/// fds the `forkexec` parent holds: a service's table, copied by each fork.
const FORK_HELD: u64 = 1000;
/// What the `forkexec` child runs.
const TRUE_BIN: &CStr = c"/bin/true";
/// The pacing tick of `node` processes.
const TICK_MS: u64 = 10;

#[derive(Clone, Copy)]
enum Mode {
    Open,
    Socket,
    Pipe,
    Getppid,
    ForkExec,
}

impl Mode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Mode::Open),
            "socket" => Some(Mode::Socket),
            "pipe" => Some(Mode::Pipe),
            "getppid" => Some(Mode::Getppid),
            "forkexec" => Some(Mode::ForkExec),
            _ => None,
        }
    }
}

/// The failing call and its errno.
struct Failure(&'static str, std::io::Error);

fn last_error(call: &'static str) -> Failure {
    Failure(call, std::io::Error::last_os_error())
}

fn open_dev_null() -> Result<libc::c_int, Failure> {
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe { libc::openat(libc::AT_FDCWD, DEV_NULL.as_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        return Err(last_error("openat"));
    }
    Ok(fd)
}

fn close(fd: libc::c_int) -> Result<(), Failure> {
    // SAFETY: closes an fd this program opened.
    if unsafe { libc::close(fd) } != 0 {
        return Err(last_error("close"));
    }
    Ok(())
}

/// One iteration of `mode`.
#[inline(always)]
fn step(mode: Mode) -> Result<(), Failure> {
    match mode {
        Mode::Open => close(open_dev_null()?),
        Mode::Socket => {
            // SAFETY: plain socket(2) call.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                return Err(last_error("socket"));
            }
            close(fd)
        }
        Mode::Pipe => {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: fds has room for the two fds pipe2 writes.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), 0) } != 0 {
                return Err(last_error("pipe2"));
            }
            close(fds[0])?;
            close(fds[1])
        }
        Mode::Getppid => {
            // SAFETY: getppid takes no argument and cannot fail.
            let r = unsafe { libc::syscall(libc::SYS_getppid) };
            if r < 0 {
                return Err(last_error("getppid"));
            }
            Ok(())
        }
        Mode::ForkExec => fork_exec_true(),
    }
}

/// fork, execve("/bin/true") in the child, wait for it; its exit must be 0.
fn fork_exec_true() -> Result<(), Failure> {
    let argv = [TRUE_BIN.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: fdloop is single-threaded; the child only calls execve and
    // _exit, both async-signal-safe, on pointers made before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_error("fork"));
    }
    if pid == 0 {
        // SAFETY: NULL-terminated argv and envp of valid C strings.
        unsafe {
            libc::execve(TRUE_BIN.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for the child just forked.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(Failure("waitpid", err));
        }
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(Failure(
            "execve(/bin/true) in the child",
            std::io::Error::other(format!("wait status {status:#x}")),
        ));
    }
    Ok(())
}

fn monotonic_ns() -> Result<u128, Failure> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(last_error("clock_gettime"));
    }
    Ok(ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128)
}

/// Blocks until one byte (or end of file) arrives on stdin.
fn wait_stdin() -> Result<(), Failure> {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads at most one byte into `byte`.
        let n = unsafe { libc::read(0, (&raw mut byte).cast(), 1) };
        if n >= 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(Failure("read(stdin)", err));
        }
    }
}

/// Runs `iters` iterations; returns the nanoseconds per iteration.
fn timed_loop(mode: Mode, iters: u64) -> Result<f64, Failure> {
    let start = monotonic_ns()?;
    for _ in 0..iters {
        step(mode)?;
    }
    let end = monotonic_ns()?;
    Ok((end - start) as f64 / iters.max(1) as f64)
}

/// Writes one line with a single write(2).
fn say(line: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure("write(stdout)", e))
}

fn open_dev_null_cloexec() -> Result<libc::c_int, Failure> {
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe {
        libc::openat(
            libc::AT_FDCWD,
            DEV_NULL.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(last_error("openat"));
    }
    Ok(fd)
}

fn hold(n: u64) -> Result<(), Failure> {
    for _ in 0..n {
        open_dev_null()?;
    }
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    say(&format!("fdloop hold pid={pid} opened={n}\n"))?;
    wait_stdin()
}

/// This process's (user, system) CPU time in microseconds.
fn own_cpu_us() -> Result<(u64, u64), Failure> {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid rusage to fill.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Err(last_error("getrusage"));
    }
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    Ok((us(ru.ru_utime), us(ru.ru_stime)))
}

fn run_loop(mode_name: &str, mode: Mode, iters: u64, wait: bool) -> Result<(), Failure> {
    if let Mode::ForkExec = mode {
        for _ in 0..FORK_HELD {
            open_dev_null_cloexec()?;
        }
    }
    if wait {
        wait_stdin()?;
    }
    let ns = timed_loop(mode, iters)?;
    let (utime, stime) = own_cpu_us()?;
    say(&format!(
        "fdloop {mode_name} ns_per_iter={ns:.2} iters={iters} utime_us={utime} stime_us={stime}\n"
    ))
}

/// What a `node` process does while active.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    Idle,
    Churn,
    Leak,
}

/// Whether stdin has a byte or end of file within `timeout_ms`.
fn stdin_ready(timeout_ms: u64) -> Result<bool, Failure> {
    let mut pfd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout_ms).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(Failure("poll(stdin)", err));
    }
    Ok(r > 0)
}

/// One byte from stdin: Some(()) for a byte, None at end of file.
fn read_byte() -> Result<Option<()>, Failure> {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads at most one byte into `byte`.
        let n = unsafe { libc::read(0, (&raw mut byte).cast(), 1) };
        match n {
            0 => return Ok(None),
            1 => return Ok(Some(())),
            _ => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Failure("read(stdin)", err));
                }
            }
        }
    }
}

/// Sets this process's comm (at most 15 bytes are kept).
fn set_name(name: &str) -> Result<(), Failure> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| Failure("prctl(PR_SET_NAME)", std::io::Error::other("NUL in name")))?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    if unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) } != 0 {
        return Err(last_error("prctl(PR_SET_NAME)"));
    }
    Ok(())
}

fn node(kind: NodeKind, name: &str, n: u64) -> Result<(), Failure> {
    set_name(name)?;
    let pid = std::process::id();
    let (mut opened, mut closed) = (0u64, 0u64);
    if kind == NodeKind::Idle {
        for _ in 0..n {
            open_dev_null()?;
        }
        opened = n;
    }
    let mut active = kind == NodeKind::Churn;
    let report = |active: bool, opened: u64, closed: u64| {
        say(&format!(
            "fdloop node pid={pid} name={name} active={} opened={opened} closed={closed}\n",
            u8::from(active)
        ))
    };
    report(active, opened, closed)?;
    // Operations due are counted from the start of the current active
    // spell, so a late tick catches up and the rate holds on average.
    let mut spell_start = monotonic_ns()?;
    let mut spell_done = 0u64;
    loop {
        if stdin_ready(TICK_MS)? {
            if read_byte()?.is_none() {
                return Ok(());
            }
            active = !active;
            spell_start = monotonic_ns()?;
            spell_done = 0;
            report(active, opened, closed)?;
        }
        if !active || kind == NodeKind::Idle {
            continue;
        }
        let elapsed = monotonic_ns()? - spell_start;
        let per_s = match kind {
            NodeKind::Churn => n / 2,
            _ => n,
        };
        let due = (elapsed * u128::from(per_s) / 1_000_000_000) as u64;
        for _ in spell_done..due {
            let fd = open_dev_null()?;
            opened += 1;
            if kind == NodeKind::Churn {
                close(fd)?;
                closed += 1;
            }
        }
        spell_done = spell_done.max(due);
    }
}

const USAGE: &str = "usage: fdloop open|socket|pipe|getppid|forkexec ITERATIONS [--wait]
       fdloop hold N
       fdloop node idle|churn|leak NAME N";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("node") {
        return node_main(&args[1..]);
    }
    let (Some(mode_name), Some(count)) = (args.first(), args.get(1)) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let Ok(count) = count.parse::<u64>() else {
        eprintln!("fdloop: not a count: {count}\n{USAGE}");
        return ExitCode::from(2);
    };
    let wait = match args.get(2).map(String::as_str) {
        None => false,
        Some("--wait") if args.len() == 3 => true,
        Some(other) => {
            eprintln!("fdloop: unexpected argument {other}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = if mode_name == "hold" {
        hold(count)
    } else if let Some(mode) = Mode::parse(mode_name) {
        run_loop(mode_name, mode, count, wait)
    } else {
        eprintln!("fdloop: unknown mode {mode_name}\n{USAGE}");
        return ExitCode::from(2);
    };
    finish(result)
}

fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(call, err)) => {
            eprintln!("fdloop: {call} failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `fdloop node KIND NAME N`.
fn node_main(args: &[String]) -> ExitCode {
    let [kind, name, n] = args else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let kind = match kind.as_str() {
        "idle" => NodeKind::Idle,
        "churn" => NodeKind::Churn,
        "leak" => NodeKind::Leak,
        other => {
            eprintln!("fdloop: unknown node kind {other}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let Ok(n) = n.parse::<u64>() else {
        eprintln!("fdloop: not a count: {n}\n{USAGE}");
        return ExitCode::from(2);
    };
    if name.is_empty() || name.len() > 15 {
        eprintln!("fdloop: NAME must be 1 to 15 bytes (the kernel's comm)\n{USAGE}");
        return ExitCode::from(2);
    }
    finish(node(kind, name, n))
}
