//! Time spent inside the tracers' BPF programs per loop iteration, from the
//! kernel's own accounting (bpf_stats: run_time_ns and run_cnt per program).
//!
//! On a noisy machine the wall-clock figures move by hundreds of ns between
//! rounds; the programs' own time does not. It leaves out what a hook costs
//! around its programs (for bpftrace's per-syscall perf tracepoints, the
//! record built before its program runs), which the wall figures include.
//! bpf_stats itself adds two clock reads per program run, to both tracers.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::child::Proc;
use super::{Bins, LOOP_TIMEOUT, MODES, NO_FD_MODE, STOP_GRACE, fdloop_cmd, is_loop_line, median};
use super::{start_bpftrace, start_fdtrace_with};

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
    /// fdtrace with `--no-stacks`.
    FdtraceNoStacks,
    Bpftrace,
}

impl Tracer {
    /// Program runs one iteration must cause: fdtrace runs once per
    /// syscall (at exit), bpftrace per probe (pipe2 has two).
    fn min_runs(self, mode: &str) -> f64 {
        match (self, mode) {
            (Tracer::Fdtrace | Tracer::FdtraceNoStacks, "pipe") => 3.0,
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
    let pids = [lp.pid(), sleeper.pid()];
    let mut tr = match tracer {
        Tracer::Fdtrace => start_fdtrace_with(bins, &[], &pids)?,
        Tracer::FdtraceNoStacks => start_fdtrace_with(bins, &["--no-stacks"], &pids)?,
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

/// Summed (run_time_ns, run_cnt) of the BPF programs process `pid` holds.
fn totals(pid: u32) -> Result<(u64, u64)> {
    Ok(prog_totals(pid)?
        .values()
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)))
}

/// (run_time_ns, run_cnt) per id of the BPF programs process `pid` holds
/// fds to, from their fdinfo: no bpftool process whose own syscalls would
/// run the tracer's syscall hook between the two readings.
pub(super) fn prog_totals(pid: u32) -> Result<BTreeMap<u64, (u64, u64)>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut out = BTreeMap::new();
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
        let (Some(id), Some(t), Some(c)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            bail!("{dir}: a program's fdinfo has no prog_id/run_time_ns/run_cnt (kernel too old?)");
        };
        // Two fds of one program count once.
        out.insert(id, (t, c));
    }
    if out.is_empty() {
        bail!("process {pid} holds no BPF program fd");
    }
    Ok(out)
}

/// Per traced openat+close (`fdloop open`), medians over rounds of
/// (program ns, program runs) per iteration.
pub struct NodeProgTime {
    pub iters: u64,
    pub fdtrace_no_stacks: (f64, f64),
    /// `fdtrace --all --no-stacks`: (program ns per iteration with the
    /// host's own runs taken out, runs per iteration, share of the runs
    /// that were the host's), medians.
    pub fdtrace_all: Option<(f64, f64, f64)>,
    /// Why the `--all` figure is missing.
    pub fdtrace_all_error: Option<String>,
    pub bpftrace_light: (f64, f64),
    pub bpftrace_node: (f64, f64),
}

/// fdtrace `--no-stacks` (`--pid` the loop, and `--all`), today's bpftrace script (filtered to the loop's
/// pid) and the node-wide tracker, `rounds` interleaved runs each.
pub fn node_measure(bins: &Bins, n: u64, rounds: u32) -> Result<NodeProgTime> {
    let _stats = StatsSwitch::set(true)?;
    let (mut ft, mut light, mut heavy) = (Vec::new(), Vec::new(), Vec::new());
    let (mut all, mut all_error) = (Vec::new(), None);
    for round in 0..rounds {
        super::check_interrupted()?;
        eprintln!(
            "bench: node program time {}/{rounds}: open under fdtrace --no-stacks, fdtrace --all \
             --no-stacks, bpftrace, bpftrace node-wide",
            round + 1
        );
        ft.push(checked(bins, "open", n, Tracer::FdtraceNoStacks)?);
        if all_error.is_none() {
            match fdtrace_all(bins, n)? {
                Ok(x) => all.push(x),
                Err(why) => all_error = Some(why),
            }
        }
        light.push(checked(bins, "open", n, Tracer::Bpftrace)?);
        heavy.push(node_wide(bins, n)?);
    }
    let fdtrace_all = (!all.is_empty()).then(|| {
        let col = |f: fn(&(f64, f64, f64)) -> f64| {
            median(&all.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
        };
        (col(|x| x.0), col(|x| x.1), col(|x| x.2))
    });
    Ok(NodeProgTime {
        iters: n,
        fdtrace_no_stacks: med(&ft),
        fdtrace_all,
        fdtrace_all_error: all_error,
        bpftrace_light: med(&light),
        bpftrace_node: med(&heavy),
    })
}

/// How long the host's own runs of fdtrace's programs are sampled, before
/// and after the loop.
const BACKGROUND_WINDOW: Duration = Duration::from_secs(1);

/// One open loop under `fdtrace --all --no-stacks`, whose programs also run
/// for every syscall of every other process: (ns per iteration, runs per
/// iteration, the host's share of the runs). The host's runs over the loop
/// (all runs but the loop's two per iteration) are taken out at their mean
/// time per run in a window before and after the loop
/// ([`background_correction`]). Err(why) when this fdtrace cannot run --all.
fn fdtrace_all(bins: &Bins, n: u64) -> Result<std::result::Result<(f64, f64, f64), String>> {
    let mut lp = Proc::spawn("fdloop", &mut fdloop_cmd(bins, "open", n, true))?;
    let args = ["--all", "--no-stacks", "--json", "--interval", "1s"].map(String::from);
    let mut ft = match super::node::start_fdtrace_all(bins, &args)? {
        Ok(ft) => ft,
        Err(why) => return Ok(Err(why)),
    };
    // The start's walk of every table and the first reports.
    std::thread::sleep(Duration::from_secs(2));
    let window = |ft: &Proc| -> Result<(u64, u64)> {
        let a = totals(ft.pid())?;
        std::thread::sleep(BACKGROUND_WINDOW);
        let b = totals(ft.pid())?;
        Ok((b.0.saturating_sub(a.0), b.1.saturating_sub(a.1)))
    };
    let before = window(&ft)?;
    let a = totals(ft.pid())?;
    lp.poke()?;
    let line = lp.stdout()?.wait_for(LOOP_TIMEOUT, is_loop_line);
    line.map_err(|e| lp.fail(format!("no result line: {e:#}")))?;
    let b = totals(ft.pid())?;
    lp.wait_ok(LOOP_TIMEOUT)?;
    let after = window(&ft)?;
    ft.stop(STOP_GRACE)?;
    let (dt, dc) = (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1));
    if dc < 2 * n {
        bail!(
            "fdtrace --all's programs ran {dc} times over {n} iterations, expected at least {}",
            2 * n
        );
    }
    let bg = (before.0 + after.0, before.1 + after.1);
    let (ns, share) = background_correction(dt, dc, 2 * n, bg);
    Ok(Ok((ns / n as f64, dc as f64 / n as f64, share)))
}

/// Program time `dt` over `dc` runs of which `own` were the loop's: the
/// rest, the host's, cost the mean time per run of the background sample
/// `bg` (time, runs). Returns (the loop's time, the host's share of runs).
pub fn background_correction(dt: u64, dc: u64, own: u64, bg: (u64, u64)) -> (f64, f64) {
    let others = dc.saturating_sub(own) as f64;
    let per_run = if bg.1 == 0 {
        0.0
    } else {
        bg.0 as f64 / bg.1 as f64
    };
    let ns = (dt as f64 - others * per_run).max(0.0);
    (ns, others / dc.max(1) as f64)
}

fn med(v: &[(f64, f64)]) -> (f64, f64) {
    let ns: Vec<f64> = v.iter().map(|x| x.0).collect();
    let runs: Vec<f64> = v.iter().map(|x| x.1).collect();
    (median(&ns).unwrap_or(0.0), median(&runs).unwrap_or(0.0))
}

/// The node-wide tracker over one open loop. Its programs also run for
/// every other process's openat and close, so the figure is the sum over
/// its programs of their mean time per run (each runs once per iteration:
/// one on openat's exit, one on close's entry), not their total over the
/// loop's iterations. The runs figure says how many runs the node added.
fn node_wide(bins: &Bins, n: u64) -> Result<(f64, f64)> {
    let mut lp = Proc::spawn("fdloop", &mut fdloop_cmd(bins, "open", n, true))?;
    let mut bt = super::tax::start_bpftrace_node()?;
    let before = prog_totals(bt.pid())?;
    lp.poke()?;
    let line = lp.stdout()?.wait_for(LOOP_TIMEOUT, is_loop_line);
    line.map_err(|e| lp.fail(format!("no result line: {e:#}")))?;
    let after = prog_totals(bt.pid())?;
    lp.wait_ok(LOOP_TIMEOUT)?;
    bt.stop(STOP_GRACE)?;
    let (mut ns, mut runs, mut progs) = (0.0, 0u64, 0);
    for (id, (t, c)) in &after {
        let (t0, c0) = before.get(id).copied().unwrap_or((0, 0));
        let (dt, dc) = (t.saturating_sub(t0), c.saturating_sub(c0));
        if dc == 0 {
            // BEGIN and END: not per event.
            continue;
        }
        if dc < n {
            bail!("the node-wide tracker's program {id} ran {dc} times over {n} iterations");
        }
        ns += dt as f64 / dc as f64;
        runs += dc;
        progs += 1;
    }
    if progs != 2 {
        bail!("the node-wide tracker ran {progs} programs per event, expected 2 (openat, close)");
    }
    Ok((ns, runs as f64 / n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_host_runs_out() {
        // 1000 loop runs and 500 of the host's at 100 ns each (the sample's
        // mean): 150000 ns in all leave 100000 for the loop.
        let (ns, share) = background_correction(150_000, 1500, 1000, (2_000, 20));
        assert!((ns - 100_000.0).abs() < 1e-6);
        assert!((share - 1.0 / 3.0).abs() < 1e-9);
        // No host runs: nothing taken out; never below zero.
        assert_eq!(background_correction(5_000, 10, 10, (0, 0)).0, 5_000.0);
        assert_eq!(background_correction(10, 20, 10, (1_000, 1)).0, 0.0);
    }
}
