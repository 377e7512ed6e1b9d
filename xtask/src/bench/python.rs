//! What Python call sites cost: the time of fdtrace's Python program
//! (`fdtrace_py_sys_exit`, a program of its own on the syscall hook, so
//! bpf_stats gives its time apart) per iteration of tests/python/fdloop.py
//! under CPython, seven frames deep:
//! - `open`: a Python stack per new fd (every fd gets a stack: the budget
//!   is set above the loop's rate);
//! - `send`: the first-use check of every send on a socket already used
//!   (two map lookups).
//!
//! Goal (issue 14): at most 1.5 us per Python stack of 7 frames.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::child::Proc;
use super::progtime::{StatsSwitch, prog_totals};
use super::{
    Bins, EVERY_FD_STACK_RATE, LOOP_TIMEOUT, STOP_GRACE, is_loop_line, median, start_fdtrace_with,
    start_sleeper,
};
use crate::proc::capture;

/// The Python program's name; bpftool shows it whole from its BTF, or its
/// first 15 characters (BPF_OBJ_NAME_LEN) without.
const PY_PROG_NAME: &str = "fdtrace_py_sys_exit";

/// The goal per Python stack of seven frames, in ns.
const GOAL_NS: f64 = 1500.0;

/// Medians over rounds of (ns, runs) of the Python program per iteration.
pub struct PythonCost {
    pub python: PathBuf,
    pub iters: u64,
    pub open: (f64, f64),
    pub send: (f64, f64),
}

/// The interpreter: Debian's python3, which every machine of the project
/// can install.
fn python() -> Result<PathBuf> {
    let p = PathBuf::from("/usr/bin/python3");
    if !p.is_file() {
        bail!("the Python cost needs /usr/bin/python3: `apt-get install python3`");
    }
    Ok(p)
}

pub fn measure(bins: &Bins, root: &Path, rounds: u32, quick: bool) -> Result<PythonCost> {
    let python = python()?;
    let script = root.join("tests/python/fdloop.py");
    let iters = if quick { 2_000 } else { 50_000 };
    let _stats = StatsSwitch::set(true)?;
    let (mut open, mut send) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        super::check_interrupted()?;
        eprintln!(
            "bench: Python program time {}/{rounds}: open, send",
            round + 1
        );
        open.push(one(bins, &python, &script, "open", iters)?);
        send.push(one(bins, &python, &script, "send", iters)?);
    }
    let med = |v: &[(f64, f64)]| {
        let ns: Vec<f64> = v.iter().map(|x| x.0).collect();
        let runs: Vec<f64> = v.iter().map(|x| x.1).collect();
        (median(&ns).unwrap_or(0.0), median(&runs).unwrap_or(0.0))
    };
    Ok(PythonCost {
        python,
        iters,
        open: med(&open),
        send: med(&send),
    })
}

/// (ns, runs) of the Python program per iteration of one loop, refused
/// when it did not run once per iteration at least (open and close, or
/// the send: it runs for every syscall).
fn one(bins: &Bins, python: &Path, script: &Path, mode: &str, n: u64) -> Result<(f64, f64)> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args([mode, &n.to_string(), "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut lp = Proc::spawn("fdloop.py", &mut cmd)?;
    // fdtrace ends once every traced process has exited: the sleeper keeps
    // it, and its counters, until the second reading.
    let sleeper = start_sleeper()?;
    let mut tr = start_fdtrace_with(
        bins,
        &["--stack-rate", EVERY_FD_STACK_RATE],
        &[lp.pid(), sleeper.pid()],
    )?;
    let id = python_prog(tr.pid())?;
    let before = prog_totals(tr.pid())?;
    lp.poke()?;
    let line = lp.stdout()?.wait_for(LOOP_TIMEOUT, is_loop_line);
    line.map_err(|e| lp.fail(format!("no result line: {e:#}")))?;
    let after = prog_totals(tr.pid())?;
    lp.wait_ok(LOOP_TIMEOUT)?;
    tr.stop(STOP_GRACE)?;
    drop(sleeper);
    let get = |m: &BTreeMap<u64, (u64, u64)>| m.get(&id).copied().unwrap_or((0, 0));
    let ((t0, c0), (t1, c1)) = (get(&before), get(&after));
    let (ns, runs) = (
        t1.saturating_sub(t0) as f64 / n as f64,
        c1.saturating_sub(c0) as f64 / n as f64,
    );
    if runs < 0.95 {
        bail!(
            "fdtrace's Python program ran {runs:.2} times per {mode} iteration: it is not \
             attached to the loop (is /usr/bin/python3 a supported CPython?)"
        );
    }
    Ok((ns, runs))
}

/// The id of the Python program among those fdtrace `pid` holds, by name
/// (bpftool).
fn python_prog(pid: u32) -> Result<u64> {
    for id in prog_totals(pid)?.keys() {
        let out = capture(Command::new("bpftool").args([
            "prog",
            "show",
            "id",
            &id.to_string(),
            "--json",
        ]))
        .with_context(|| format!("bpftool prog show id {id}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("bpftool printed {out}"))?;
        if v.get("name")
            .and_then(|n| n.as_str())
            .is_some_and(|n| n.len() >= 15 && PY_PROG_NAME.starts_with(n))
        {
            return Ok(*id);
        }
    }
    bail!("fdtrace (pid {pid}) holds no program named {PY_PROG_NAME}")
}

pub fn print(p: &PythonCost) {
    println!();
    println!(
        "Python call sites (`{} tests/python/fdloop.py MODE {}`, seven frames deep; time of \
         fdtrace's Python program per iteration, kernel bpf_stats, medians over rounds):",
        p.python.display(),
        p.iters
    );
    println!("  {:<6} {:>10} {:>8}  what", "mode", "ns", "runs");
    println!(
        "  {:<6} {:>10.1} {:>8.2}  a Python stack per new fd (goal: at most {GOAL_NS:.0} ns): {}",
        "open",
        p.open.0,
        p.open.1,
        if p.open.0 <= GOAL_NS { "met" } else { "MISSED" }
    );
    println!(
        "  {:<6} {:>10.1} {:>8.2}  the first-use check of each send on a used socket",
        "send", p.send.0, p.send.1
    );
}
