//! Child processes for the bench: every one is owned by a [`Proc`] that ends
//! it (SIGINT, then SIGKILL) when dropped, so an error, a panic or Ctrl-C
//! leaves no tracer, sleeper or loop behind.

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Child, ChildStdin, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::proc::describe;

/// Set by SIGINT/SIGTERM/SIGHUP: the bench stops at the next check and its
/// guards end what it started.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// How long waits sleep between checks of [`INTERRUPTED`].
const SLICE: Duration = Duration::from_millis(100);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag. A handler (not SIG_IGN) is
/// reset to the default at exec, so children still get the default action.
pub fn install_signal_flag() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs an async-signal-safe handler (one atomic store).
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// Makes orphans of our children (e.g. the fdloop of an `fdtrace run` that
/// was stopped early) our children again, so that [`sweep_orphans`] ends them.
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes a plain integer flag.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Kills and reaps every child still there (call once all guards are gone).
pub fn sweep_orphans() {
    for pid in own_children() {
        eprintln!("bench: cleanup: killing leftover process {pid}");
        // SAFETY: pid is our unreaped child, so it cannot have been reused.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Our children, from /proc/self/task/*/children.
fn own_children() -> Vec<libc::pid_t> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        pids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok()),
        );
    }
    pids
}

/// Fails once a stop signal has arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The lines of one output stream of a child, read on their own thread so
/// the child never blocks on a full pipe.
pub struct Lines {
    rx: Receiver<String>,
    /// Every line received so far, for error messages.
    seen: Vec<String>,
    eof: bool,
}

impl Lines {
    fn new(stream: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
            eof: false,
        }
    }

    /// The next line; None at end of file. Fails on timeout or interrupt.
    fn next(&mut self, deadline: Instant) -> Result<Option<String>> {
        loop {
            check_interrupted()?;
            if self.eof {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out");
            }
            match self.rx.recv_timeout(left.min(SLICE)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    return Ok(Some(line));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
            }
        }
    }

    /// Waits for the first line that satisfies `pred`; other lines are kept
    /// in [`Lines::seen`] only.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        while let Some(line) = self.next(deadline)? {
            if pred(&line) {
                return Ok(line);
            }
        }
        bail!("the stream ended first")
    }

    /// Every line up to end of file.
    pub fn rest(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some(line) = self.next(deadline)? {
            out.push(line);
        }
        Ok(out)
    }

    /// The lines that arrived since the last read, without waiting.
    pub fn arrived(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line.clone());
            out.push(line);
        }
        out
    }

    /// The last `n` lines received (after taking what is already there).
    pub fn tail(&mut self, n: usize) -> String {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
        let start = self.seen.len().saturating_sub(n);
        self.seen[start..].join("\n")
    }
}

/// A running child that is ended when dropped.
pub struct Proc {
    name: String,
    child: Child,
    reaped: bool,
    stdin: Option<ChildStdin>,
    pub stdout: Option<Lines>,
    pub stderr: Option<Lines>,
}

/// CPU time of a reaped child, with that of the children it reaped itself.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub user: Duration,
    pub system: Duration,
}

impl Proc {
    /// Starts `cmd` (whose stdio the caller has set); piped streams are read
    /// on threads.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", describe(cmd)))?;
        Ok(Self {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            stdout: child.stdout.take().map(Lines::new),
            stderr: child.stderr.take().map(Lines::new),
            child,
            reaped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&mut self) -> Result<&mut Lines> {
        self.stdout
            .as_mut()
            .with_context(|| format!("{}'s stdout is not piped", self.name))
    }

    pub fn stderr(&mut self) -> Result<&mut Lines> {
        self.stderr
            .as_mut()
            .with_context(|| format!("{}'s stderr is not piped", self.name))
    }

    /// Writes one byte to the child's stdin (fdloop --wait's go signal).
    pub fn poke(&mut self) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("{}'s stdin is not piped", self.name))?;
        stdin
            .write_all(b"g")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to {}'s stdin", self.name))
    }

    /// What the child printed on stderr lately, for error messages.
    pub fn stderr_tail(&mut self) -> String {
        match self.stderr.as_mut() {
            Some(lines) => lines.tail(8),
            None => String::new(),
        }
    }

    /// A failure message that includes the child's last stderr lines.
    pub fn fail(&mut self, what: impl std::fmt::Display) -> anyhow::Error {
        let tail = self.stderr_tail();
        if tail.is_empty() {
            anyhow::anyhow!("{}: {what}", self.name)
        } else {
            anyhow::anyhow!("{}: {what}; its stderr:\n{tail}", self.name)
        }
    }

    /// Reaps the child if it has exited (wait4 with WNOHANG).
    fn try_reap(&mut self) -> Result<Option<(ExitStatus, Usage)>> {
        if self.reaped {
            bail!("{} was already reaped", self.name);
        }
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 fills it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to a status and a rusage; pid is our child.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(err).with_context(|| format!("waiting for {}", self.name));
        }
        if r == 0 {
            return Ok(None);
        }
        self.reaped = true;
        let tv = |t: libc::timeval| {
            Duration::from_micros(t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64)
        };
        let usage = Usage {
            user: tv(ru.ru_utime),
            system: tv(ru.ru_stime),
        };
        Ok(Some((ExitStatus::from_raw(status), usage)))
    }

    /// Whether the child is still running (not reaped).
    pub fn running(&mut self) -> Result<bool> {
        Ok(self.try_reap()?.is_none())
    }

    /// Waits for the child to exit and reaps it, polling every few ms.
    pub fn wait(&mut self, timeout: Duration) -> Result<(ExitStatus, Usage)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(done) = self.try_reap()? {
                return Ok(done);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a clean exit (code 0).
    pub fn wait_ok(&mut self, timeout: Duration) -> Result<(ExitStatus, Usage)> {
        let (status, usage) = self.wait(timeout)?;
        if !status.success() {
            return Err(self.fail(format!("exited with {status}")));
        }
        Ok((status, usage))
    }

    fn signal(&self, sig: libc::c_int) {
        if self.reaped {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid()) else {
            return;
        };
        // SAFETY: pid is our child and not reaped, so it cannot be reused.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// SIGINT (tracers detach and print their summary), then SIGKILL if it
    /// is still there after `grace`. Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.reaped {
            bail!("{} was already reaped", self.name);
        }
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some((status, _)) = self.try_reap()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.signal(libc::SIGKILL);
        let (status, _) = self.wait_uninterruptible(Duration::from_secs(5))?;
        Ok(status)
    }

    /// Like [`Proc::wait`], ignoring the interrupt flag (for cleanup).
    fn wait_uninterruptible(&mut self, timeout: Duration) -> Result<(ExitStatus, Usage)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(done) = self.try_reap()? {
                return Ok(done);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit after SIGKILL", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if let Err(err) = self.stop(Duration::from_secs(3)) {
            eprintln!("bench: cleanup: {err:#}");
        }
    }
}
