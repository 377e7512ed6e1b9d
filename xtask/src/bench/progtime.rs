//! Time spent inside the tracers' BPF programs per loop iteration, from the
//! kernel's own accounting (bpf_stats: run_time_ns and run_cnt per program).
//!
//! On a noisy machine the wall-clock figures move by hundreds of ns between
//! rounds; the programs' own time does not. It leaves out what a hook costs
//! around its programs (for bpftrace's per-syscall perf tracepoints, the
//! record built before its program runs), which the wall figures include.
//! bpf_stats itself adds two clock reads per program run, to both tracers.

use std::fs;

use anyhow::{Context, Result, bail};

use super::child::Proc;
use super::{Bins, LOOP_TIMEOUT, MODES, NO_FD_MODE, STOP_GRACE, fdloop_cmd, is_loop_line, median};
use super::{start_bpftrace, start_fdtrace_on};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Per mode: median ns and program runs per iteration for fdtrace, bpftrace.
pub struct ProgTime {
    pub mode: &'static str,
    pub fdtrace: (f64, f64),
    pub bpftrace: (f64, f64),
}

/// Sets kernel.bpf_stats_enabled for its lifetime and restores the value
/// it found: the bench's wall-clock rounds must run without the accounting
/// (it taxes every program run), this section with it.
pub struct StatsSwitch {
    before: String,
}

impl StatsSwitch {
    pub fn set(on: bool) -> Result<StatsSwitch> {
        let before =
            fs::read_to_string(STATS_SYSCTL).with_context(|| format!("reading {STATS_SYSCTL}"))?;
        fs::write(STATS_SYSCTL, if on { "1" } else { "0" })
            .with_context(|| format!("writing {STATS_SYSCTL}"))?;
        Ok(StatsSwitch { before })
    }
}

impl Drop for StatsSwitch {
    fn drop(&mut self) {
        if let Err(e) = fs::write(STATS_SYSCTL, self.before.trim()) {
            eprintln!("bench: warning: could not restore {STATS_SYSCTL}: {e}");
        }
    }
}

/// `rounds` interleaved runs of each fd mode under each tracer.
pub fn measure(bins: &Bins, iters: &[u64], rounds: u32) -> Result<Vec<ProgTime>> {
    let _stats = StatsSwitch::set(true)?;
    let mut out = Vec::new();
    // The modes with fd events: getppid runs no traced program work.
    let fd_modes = MODES.iter().zip(iters).filter(|(m, _)| **m != NO_FD_MODE);
    for (&mode, &n) in fd_modes {
        let (mut ft, mut bt) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            super::check_interrupted()?;
            eprintln!("bench: program time: {mode} under fdtrace, then bpftrace");
            ft.push(checked(bins, mode, n, Tracer::Fdtrace)?);
            bt.push(checked(bins, mode, n, Tracer::Bpftrace)?);
        }
        let med = |v: &[(f64, f64)]| {
            let ns: Vec<f64> = v.iter().map(|x| x.0).collect();
            let runs: Vec<f64> = v.iter().map(|x| x.1).collect();
            (median(&ns).unwrap_or(0.0), median(&runs).unwrap_or(0.0))
        };
        out.push(ProgTime {
            mode,
            fdtrace: med(&ft),
            bpftrace: med(&bt),
        });
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug)]
enum Tracer {
    Fdtrace,
    Bpftrace,
}

impl Tracer {
    /// Program runs one iteration must cause: fdtrace runs once per
    /// syscall (at exit), bpftrace per probe (pipe2 has two).
    fn min_runs(self, mode: &str) -> f64 {
        match (self, mode) {
            (Tracer::Fdtrace, "pipe") => 3.0,
            (Tracer::Bpftrace, "pipe") => 4.0,
            _ => 2.0,
        }
    }
}

/// [`one`], refused when the programs ran fewer times than the loop's
/// syscalls need: never a figure that did not measure the loop.
fn checked(bins: &Bins, mode: &str, n: u64, tracer: Tracer) -> Result<(f64, f64)> {
    let want = tracer.min_runs(mode) * 0.95;
    let got = one(bins, mode, n, tracer)?;
    if got.1 < want {
        bail!(
            "{tracer:?}'s programs ran {:.2} times per {mode} iteration, expected at least {want:.2}",
            got.1
        );
    }
    Ok(got)
}

/// (program ns, program runs) per iteration of one loop under `tracer`.
fn one(bins: &Bins, mode: &str, n: u64, tracer: Tracer) -> Result<(f64, f64)> {
    let mut lp = Proc::spawn("fdloop", &mut fdloop_cmd(bins, mode, n, true))?;
    // fdtrace ends (and closes its programs) once every traced process has
    // exited: a sleeper keeps it, and its counters, there until the second
    // reading, which comes after fdloop's exit. Dropped after the tracer.
    let sleeper = super::start_sleeper()?;
    let mut tr = match tracer {
        Tracer::Fdtrace => start_fdtrace_on(bins, &[lp.pid(), sleeper.pid()])?,
        Tracer::Bpftrace => start_bpftrace(lp.pid())?,
    };
    let before = totals(tr.pid())?;
    lp.poke()?;
    let line = lp.stdout()?.wait_for(LOOP_TIMEOUT, is_loop_line);
    line.map_err(|e| lp.fail(format!("no result line: {e:#}")))?;
    let after = totals(tr.pid())?;
    lp.wait_ok(LOOP_TIMEOUT)?;
    tr.stop(STOP_GRACE)?;
    drop(sleeper);
    let n = n as f64;
    Ok((
        after.0.saturating_sub(before.0) as f64 / n,
        after.1.saturating_sub(before.1) as f64 / n,
    ))
}

/// Summed (run_time_ns, run_cnt) of the BPF programs process `pid` holds
/// fds to, from their fdinfo: no bpftool process whose own syscalls would
/// run the tracer's syscall hook between the two readings.
fn totals(pid: u32) -> Result<(u64, u64)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let (mut sum, mut progs) = ((0, 0), 0);
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry.with_context(|| format!("reading {dir}"))?;
        // An fd may close meanwhile: skip what cannot be read.
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        // Program fds (links name a prog_id too, without the counters).
        if field("prog_type:").is_none() {
            continue;
        }
        progs += 1;
        let (Some(t), Some(c)) = (field("run_time_ns:"), field("run_cnt:")) else {
            bail!("{dir}: a program's fdinfo has no run_time_ns/run_cnt (kernel too old?)");
        };
        sum.0 += t;
        sum.1 += c;
    }
    if progs == 0 {
        bail!("process {pid} holds no BPF program fd");
    }
    Ok(sum)
}
