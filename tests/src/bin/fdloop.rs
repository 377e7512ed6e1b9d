//! `fdloop`: a tight syscall loop for `cargo xtask bench`.
//!
//! ```text
//! fdloop MODE ITERATIONS [--wait]
//! fdloop hold N
//! ```
//!
//! MODE is one of
//! - `open`: openat(AT_FDCWD, "/dev/null", O_RDONLY) + close
//! - `socket`: socket(AF_UNIX, SOCK_STREAM, 0) + close
//! - `pipe`: pipe2(fds, 0) + two closes
//! - `getppid`: the raw getppid syscall (cheap, and not an fd syscall)
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
//! Any failing syscall ends fdloop with exit code 1 and a message on stderr.

use std::ffi::CStr;
use std::io::Write as _;
use std::process::ExitCode;

const DEV_NULL: &CStr = c"/dev/null";

#[derive(Clone, Copy)]
enum Mode {
    Open,
    Socket,
    Pipe,
    Getppid,
}

impl Mode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Mode::Open),
            "socket" => Some(Mode::Socket),
            "pipe" => Some(Mode::Pipe),
            "getppid" => Some(Mode::Getppid),
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
    }
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
    if wait {
        wait_stdin()?;
    }
    let ns = timed_loop(mode, iters)?;
    let (utime, stime) = own_cpu_us()?;
    say(&format!(
        "fdloop {mode_name} ns_per_iter={ns:.2} iters={iters} utime_us={utime} stime_us={stime}\n"
    ))
}

const USAGE: &str =
    "usage: fdloop open|socket|pipe|getppid ITERATIONS [--wait]\n       fdloop hold N";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(call, err)) => {
            eprintln!("fdloop: {call} failed: {err}");
            ExitCode::FAILURE
        }
    }
}
