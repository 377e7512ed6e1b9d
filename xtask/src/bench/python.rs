//! What Python call sites cost: the time of fdtrace's Python program
//! (`fdtrace_py_sys_exit`, a program of its own on the syscall hook, so
//! bpf_stats gives its time apart) per iteration of tests/python/fdloop.py,
//! seven frames deep, under each CPython fdtrace reads (pyenv's 3.11.7,
//! 3.12.1, 3.13.0 and Debian's /usr/bin/python3):
//! - `open`: a Python stack per new fd (every fd gets a stack: the budget
//!   is set above the loop's rate);
//! - `open, no stacks`: the same loop under `--no-stacks`: the program runs
//!   as often (it is attached once a traced process runs a supported
//!   CPython) but takes no stack; `open` minus this is the added cost of a
//!   Python stack;
//! - `send`: the first-use check of every send on a socket already used
//!   (two map lookups);
//! - `send, --all`: the same under `fdtrace --all`, where every process of
//!   the machine is traced, and `others, --all`: the program's mean time
//!   per run for the other processes' syscalls then (none is a Python's
//!   here: the check that the caller is a traced Python, which every
//!   syscall of a node pays once the program is attached).
//!
//! The program runs on every syscall of the machine once attached, and
//! returns at once for other processes'. On a busy machine those runs
//! outnumber the loop's: before each loop, with the loop's process idle
//! (blocked on its stdin), the program's runs over one second give the
//! rate and the cost of the other processes' runs, which are taken out of
//! the loop's figures (so `runs` should come out near the loop's own
//! syscalls: 2 an iteration for `open`, 1 for `send`).
//!
//! Goals (issue 14): at most 1.5 us per Python stack of 7 frames; with the
//! default budget (`--stack-rate` 1000 a second), at most 0.5% of a core per
//! process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::child::Proc;
use super::progtime::{StatsSwitch, prog_totals};
use super::{
    Bins, EVERY_FD_STACK_RATE, LOOP_TIMEOUT, STOP_GRACE, is_loop_line, median, pin_to_last_cpu,
    start_fdtrace_with, start_sleeper,
};
use crate::proc::capture;

/// The Python program's name; bpftool shows it whole from its BTF, or its
/// first 15 characters (BPF_OBJ_NAME_LEN) without.
const PY_PROG_NAME: &str = "fdtrace_py_sys_exit";

/// The goal per Python stack of seven frames, in ns.
const GOAL_NS: f64 = 1500.0;
/// How long the other processes' runs are counted before each loop.
const IDLE_WINDOW: Duration = Duration::from_secs(1);

/// fdtrace's default `--stack-rate`: the most stacks a process takes a
/// second, Python ones included.
const DEFAULT_STACK_RATE: f64 = 1000.0;
/// The goal for a process at that budget: a share of one core.
const GOAL_CORE_SHARE: f64 = 0.005;

/// The interpreters: (label, pyenv version or None for Debian's).
const PYTHONS: [(&str, Option<&str>); 4] = [
    ("3.11", Some("3.11.7")),
    ("3.12", Some("3.12.1")),
    ("3.13", Some("3.13.0")),
    ("debian", None),
];

/// Medians over rounds of (ns, runs) of the Python program per iteration,
/// under one interpreter.
pub struct PythonRow {
    pub label: &'static str,
    pub python: PathBuf,
    pub open: (f64, f64),
    pub bare: (f64, f64),
    pub send: (f64, f64),
    pub send_all: (f64, f64),
    /// ns per run of the other processes' syscalls under --all.
    pub others_all: f64,
}

pub struct PythonCost {
    pub iters: u64,
    pub rows: Vec<PythonRow>,
}

/// pyenv's root: $PYENV_ROOT, else `pyenv root`, else ~/.pyenv.
fn pyenv_root() -> PathBuf {
    if let Some(r) = std::env::var_os("PYENV_ROOT") {
        return PathBuf::from(r);
    }
    if let Ok(out) = Command::new("pyenv").arg("root").output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".pyenv")
}

/// The interpreter of a row, or what to install.
fn python(version: Option<&str>) -> Result<PathBuf> {
    let p = match version {
        Some(v) => pyenv_root().join("versions").join(v).join("bin/python3"),
        None => PathBuf::from("/usr/bin/python3"),
    };
    if !p.is_file() {
        match version {
            Some(v) => bail!(
                "the Python cost needs CPython {v} from pyenv ({} missing): `pyenv install {v}`",
                p.display()
            ),
            None => bail!("the Python cost needs /usr/bin/python3: `apt-get install python3`"),
        }
    }
    Ok(p)
}

pub fn measure(bins: &Bins, root: &Path, rounds: u32, quick: bool) -> Result<PythonCost> {
    let script = root.join("tests/python/fdloop.py");
    let iters = if quick { 2_000 } else { 50_000 };
    let pythons: Vec<(&'static str, PathBuf)> = PYTHONS
        .iter()
        .map(|&(label, v)| Ok((label, python(v)?)))
        .collect::<Result<_>>()?;
    let _stats = StatsSwitch::set(true)?;
    let mut rows = Vec::new();
    for (label, python) in pythons {
        let (mut open, mut bare, mut send) = (Vec::new(), Vec::new(), Vec::new());
        let (mut send_all, mut others_all) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            super::check_interrupted()?;
            eprintln!(
                "bench: Python program time under {label} {}/{rounds}: open, open with no \
                 stacks, send, send under --all",
                round + 1
            );
            let every = ["--stack-rate", EVERY_FD_STACK_RATE];
            open.push(one(bins, &python, &script, "open", iters, &every)?.own);
            let no_stacks = ["--no-stacks"];
            bare.push(one(bins, &python, &script, "open", iters, &no_stacks)?.own);
            send.push(one(bins, &python, &script, "send", iters, &every)?.own);
            let all = ["--all", "--stack-rate", EVERY_FD_STACK_RATE];
            let a = one(bins, &python, &script, "send", iters, &all)?;
            send_all.push(a.own);
            others_all.push(a.per_other);
        }
        let med = |v: &[(f64, f64)]| {
            let ns: Vec<f64> = v.iter().map(|x| x.0).collect();
            let runs: Vec<f64> = v.iter().map(|x| x.1).collect();
            (median(&ns).unwrap_or(0.0), median(&runs).unwrap_or(0.0))
        };
        rows.push(PythonRow {
            label,
            python,
            open: med(&open),
            bare: med(&bare),
            send: med(&send),
            send_all: med(&send_all),
            others_all: median(&others_all).unwrap_or(0.0),
        });
    }
    Ok(PythonCost { iters, rows })
}

/// What one loop measured.
struct Loop {
    /// (ns, runs) of the Python program per iteration (see [`own_share`]).
    own: (f64, f64),
    /// Its ns per run of the other processes' syscalls, in the idle window.
    per_other: f64,
}

/// The Python program's time over one loop under fdtrace `extra`, refused
/// when it did not run once per iteration at least (open and close, or
/// the send: it runs for every syscall).
fn one(
    bins: &Bins,
    python: &Path,
    script: &Path,
    mode: &str,
    n: u64,
    extra: &[&str],
) -> Result<Loop> {
    let mut cmd = Command::new(python);
    pin_to_last_cpu(&mut cmd);
    cmd.arg(script)
        .args([mode, &n.to_string(), "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut lp = Proc::spawn("fdloop.py", &mut cmd)?;
    wait_reading_stdin(&mut lp)?;
    // fdtrace ends once every traced process has exited: the sleeper keeps
    // it, and its counters, until the second reading.
    let sleeper = start_sleeper()?;
    let mut tr = start_fdtrace_with(bins, extra, &[lp.pid(), sleeper.pid()])?;
    let id = python_prog(tr.pid())?;
    let get = |m: &BTreeMap<u64, (u64, u64)>| m.get(&id).copied().unwrap_or((0, 0));
    // The loop's process waits on its stdin: every run now is another
    // process's.
    let idle_from = Instant::now();
    let idle0 = get(&prog_totals(tr.pid())?);
    std::thread::sleep(IDLE_WINDOW);
    let before = get(&prog_totals(tr.pid())?);
    let idle_s = idle_from.elapsed().as_secs_f64();
    let started = Instant::now();
    lp.poke()?;
    let line = lp.stdout()?.wait_for(LOOP_TIMEOUT, is_loop_line);
    line.map_err(|e| lp.fail(format!("no result line: {e:#}")))?;
    let after = get(&prog_totals(tr.pid())?);
    let loop_s = started.elapsed().as_secs_f64();
    lp.wait_ok(LOOP_TIMEOUT)?;
    tr.stop(STOP_GRACE)?;
    drop(sleeper);
    let all_runs = after.1.saturating_sub(before.1) as f64 / n as f64;
    if all_runs < 0.95 {
        bail!(
            "fdtrace's Python program ran {all_runs:.2} times per {mode} iteration: it is not \
             attached to the loop (is {} a supported CPython?)",
            python.display()
        );
    }
    let (own, per_other) = own_share(idle0, before, idle_s, after, loop_s, n);
    Ok(Loop { own, per_other })
}

/// Waits until the loop's process is blocked reading its stdin (`--wait`):
/// its interpreter is up (a pyenv python maps libpython after its exec),
/// and from then until the poke it makes no syscall.
fn wait_reading_stdin(lp: &mut Proc) -> Result<()> {
    let path = format!("/proc/{}/syscall", lp.pid());
    let from = Instant::now();
    loop {
        // read(2) is syscall 0 on x86-64; its first argument, fd 0.
        let s = std::fs::read_to_string(&path).unwrap_or_default();
        if s.starts_with("0 0x0 ") {
            return Ok(());
        }
        if from.elapsed() > LOOP_TIMEOUT {
            return Err(lp.fail(format!(
                "not blocked reading its stdin after {LOOP_TIMEOUT:?} ({path}: {s:?})"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The program's (ns, runs) per iteration of the loop's own calls: from
/// its totals (ns, runs) at the start of the idle window, at its end (the
/// loop's start) and at the loop's end, the other processes' runs at the
/// idle window's rate and cost taken out; and the cost of one of those
/// other runs.
fn own_share(
    idle0: (u64, u64),
    before: (u64, u64),
    idle_s: f64,
    after: (u64, u64),
    loop_s: f64,
    n: u64,
) -> ((f64, f64), f64) {
    let d = |a: (u64, u64), b: (u64, u64)| {
        (
            b.0.saturating_sub(a.0) as f64,
            b.1.saturating_sub(a.1) as f64,
        )
    };
    let (idle_ns, idle_runs) = d(idle0, before);
    let (ns, runs) = d(before, after);
    let per_other = if idle_runs > 0.0 {
        idle_ns / idle_runs
    } else {
        0.0
    };
    let others = (idle_runs / idle_s * loop_s).min(runs);
    (
        (
            (ns - others * per_other).max(0.0) / n as f64,
            (runs - others) / n as f64,
        ),
        per_other,
    )
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

/// The added cost of a Python stack: `open` minus `open, no stacks`.
pub fn per_stack(r: &PythonRow) -> f64 {
    r.open.0 - r.bare.0
}

/// The share of one core a process taking stacks at the default budget
/// spends on them, for a cost per stack of `ns`.
pub fn core_share(ns: f64) -> f64 {
    DEFAULT_STACK_RATE * ns * 1e-9
}

pub fn print(p: &PythonCost) {
    println!();
    println!(
        "Python call sites (`PYTHON tests/python/fdloop.py MODE {}`, seven frames deep; time of \
         fdtrace's Python program per iteration, kernel bpf_stats, other processes' runs taken \
         out, medians over rounds; ns (runs per iteration)):",
        p.iters
    );
    println!(
        "  {:<7} {:>16} {:>16} {:>11} {:>16} {:>16} {:>14}  python",
        "python", "open", "open, no stacks", "per stack", "send", "send, --all", "others, --all"
    );
    let cell = |(ns, runs): (f64, f64)| format!("{ns:.0} ({runs:.2})");
    for r in &p.rows {
        println!(
            "  {:<7} {:>16} {:>16} {:>11.0} {:>16} {:>16} {:>14.0}  {}",
            r.label,
            cell(r.open),
            cell(r.bare),
            per_stack(r),
            cell(r.send),
            cell(r.send_all),
            r.others_all,
            r.python.display()
        );
    }
    println!(
        "  per stack: `open` minus `open, no stacks` (the stack walk of 7 frames and its \
         bookkeeping); goal at most {GOAL_NS:.0} ns;"
    );
    println!(
        "  at the default budget ({DEFAULT_STACK_RATE:.0} stacks a second per process): the \
         share of a core; goal at most {:.1}%.",
        GOAL_CORE_SHARE * 100.0
    );
    for r in &p.rows {
        let ns = per_stack(r);
        let share = core_share(ns);
        println!(
            "  {:<7} {ns:>6.0} ns a stack: {}; {:.3}% of a core: {}",
            r.label,
            if ns <= GOAL_NS { "met" } else { "MISSED" },
            share * 100.0,
            if share <= GOAL_CORE_SHARE {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    println!(
        "  send: the first-use check of each send on a used socket, every send of a traced \
         Python process; send, --all: the same under `fdtrace --all`; others, --all: ns a run \
         for the other processes' syscalls under --all (the check that the caller is a traced \
         Python, which every syscall of the node pays once a Python is traced)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_stack_cost_and_core_share() {
        let r = PythonRow {
            label: "3.12",
            python: PathBuf::from("/p"),
            open: (1700.0, 3.0),
            bare: (500.0, 3.0),
            send: (300.0, 1.0),
            send_all: (310.0, 1.0),
            others_all: 40.0,
        };
        assert_eq!(per_stack(&r), 1200.0);
        // 1000 stacks a second of 1.2 us: 1.2 ms a second.
        assert!((core_share(1200.0) - 0.0012).abs() < 1e-12);
    }

    #[test]
    fn other_processes_runs_are_taken_out() {
        // Idle second: 1000 runs of 100 ns. The loop: 2 s, 10_000
        // iterations, 22_000 runs of which 2000 others' (200_000 ns).
        let ((ns, runs), other) = own_share(
            (0, 0),
            (100_000, 1000),
            1.0,
            (100_000 + 5_200_000, 1000 + 22_000),
            2.0,
            10_000,
        );
        assert!((ns - 500.0).abs() < 1e-9, "{ns}");
        assert!((runs - 2.0).abs() < 1e-9, "{runs}");
        assert!((other - 100.0).abs() < 1e-9, "{other}");
        // Nothing else ran: nothing taken out.
        let (own, other) = own_share((0, 0), (0, 0), 1.0, (30_000, 20), 1.0, 10);
        assert_eq!((own, other), ((3000.0, 2.0), 0.0));
    }
}
