//! `cargo xtask bench`: what fdtrace costs, against a naive bpftrace leak
//! tracker and against empty programs on the same hooks.
//!
//! Every figure comes from `fdloop` (tests/src/bin/fdloop.rs), a tight loop of
//! one kind of syscall that times itself. Each (mode, condition) pair is
//! measured once per round, rounds interleave the conditions (their order
//! rotates from round to round), and the report takes the median across
//! rounds. Progress goes to stderr, the report to stdout.

pub mod child;
mod extras;
mod metrics;
mod node;
mod progtime;
mod python;
mod report;
mod tax;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::proc::{self, capture, is_root};
use crate::setup::{self, Tools};
use crate::tasks::{Workspace, build_fdtrace};
use child::{Proc, Usage, check_interrupted};

/// The fdloop modes, in report order.
pub const MODES: [&str; 4] = ["open", "socket", "pipe", NO_FD_MODE];
/// The mode whose syscall makes no fd.
pub const NO_FD_MODE: &str = "getppid";
/// `--stack-rate` for a stack per new fd: above any loop's rate here (the
/// budget is counted per 100 ms: this is 10 million fds per slot).
const EVERY_FD_STACK_RATE: &str = "100000000";

/// Longest a loop run may take, tracer start included.
const LOOP_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a tracer may take to attach (fdtrace loads and verifies its
/// programs; bpftrace compiles its script).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a tracer gets to detach after SIGINT before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A naive leak tracker, as a user would write it: live fds in a map keyed by
/// (pid, fd), inserted on a successful exit of openat/socket/pipe2 and
/// deleted on entry to close, for the pid given as $1. pipe2's fds are in the
/// user array whose address sys_enter_pipe2 sees, so it is kept per thread
/// until sys_exit_pipe2. BEGIN runs once every probe is attached: its line
/// tells the bench that tracing is on.
const BPFTRACE_SCRIPT: &str = r#"
BEGIN { printf("ready\n"); }
tracepoint:syscalls:sys_exit_openat /pid == $1 && args->ret >= 0/ { @fds[pid, args->ret] = 1; }
tracepoint:syscalls:sys_exit_socket /pid == $1 && args->ret >= 0/ { @fds[pid, args->ret] = 1; }
tracepoint:syscalls:sys_enter_pipe2 /pid == $1/ { @pipefd[tid] = (uint64)args->fildes; }
tracepoint:syscalls:sys_exit_pipe2 /pid == $1/ {
  if (args->ret == 0) {
    $p = @pipefd[tid];
    @fds[pid, *(int32*)uptr($p)] = 1;
    @fds[pid, *(int32*)uptr($p + 4)] = 1;
  }
  delete(@pipefd[tid]);
}
tracepoint:syscalls:sys_enter_close /pid == $1/ { delete(@fds[pid, args->fd]); }
END { clear(@fds); clear(@pipefd); }
"#;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds per (mode, condition); the report takes medians across them
    /// [default: 5, or 1 with --quick; the node watch: 3, or 1]
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// Smoke check: 1 round of short loops (the numbers mean little)
    #[arg(long)]
    quick: bool,
    /// Multiply the loop iterations (sized for ~0.4 s per untraced run)
    #[arg(long, value_name = "X", default_value_t = 1.0)]
    scale: f64,
    /// Bench this fdtrace binary instead of building the workspace's
    /// (e.g. to compare two builds)
    #[arg(long, value_name = "PATH")]
    fdtrace: Option<PathBuf>,
    /// Only the node section: a synthetic node of 300 processes watched by
    /// `fdtrace --all` and by process-exporter, the tax of node-wide tracing
    /// on nginx and on fork+exec, and the node-wide bpftrace tracker's
    /// program time
    #[arg(long)]
    node: bool,
    /// With --node: only these parts of it (repeatable) [default: all]
    #[arg(long, value_enum, value_name = "PART", requires = "node")]
    node_part: Vec<NodePart>,
    /// Only the Python section: the added cost of a Python stack and of the
    /// first-use check, under each CPython fdtrace reads
    #[arg(long, conflicts_with = "node")]
    python: bool,
    /// Only the cost of `--metrics` on the synthetic node (part of --node):
    /// `fdtrace --all` with and without it, scraped once a second, then
    /// ten times a second
    #[arg(long)]
    metrics_cost: bool,
}

/// The parts of the node section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NodePart {
    /// The synthetic node watched by process-exporter and fdtrace --all.
    Watch,
    /// nginx and fork+exec, untraced and under each tracer.
    Tax,
    /// Time inside the programs per traced openat+close.
    Progtime,
}

/// The conditions each mode is measured under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cond {
    /// fdloop alone.
    Untraced,
    /// fdloop run and traced by fdtrace.
    Fdtrace,
    /// fdloop traced by fdtrace taking a user stack for every new fd
    /// (`--stack-rate` above the loop's rate; fd modes only).
    FdtraceStacks,
    /// fdloop untraced while fdtrace traces a sleeping process.
    FdtraceTax,
    /// fdloop untraced while empty programs sit on fdtrace's hooks.
    Noop,
    /// fdloop traced by the bpftrace script.
    Bpftrace,
    /// fdloop untraced while the bpftrace script traces a sleeping process.
    BpftraceTax,
}

impl Cond {
    pub const ALL: [Cond; 7] = [
        Cond::Untraced,
        Cond::Fdtrace,
        Cond::FdtraceStacks,
        Cond::FdtraceTax,
        Cond::Noop,
        Cond::Bpftrace,
        Cond::BpftraceTax,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Cond::Untraced => "untraced",
            Cond::Fdtrace => "fdtrace",
            Cond::FdtraceStacks => "fdtrace stacks",
            Cond::FdtraceTax => "fdtrace tax",
            Cond::Noop => "noop floor",
            Cond::Bpftrace => "bpftrace",
            Cond::BpftraceTax => "bpftrace tax",
        }
    }
}

/// The two programs under test.
pub struct Bins {
    pub fdtrace: PathBuf,
    pub fdloop: PathBuf,
}

/// fdloop's result line.
#[derive(Debug, Clone, Copy)]
pub struct LoopLine {
    pub ns: f64,
    pub iters: u64,
    /// fdloop's own CPU time when it printed the line.
    pub cpu: Usage,
}

/// One `fdtrace --json run -- fdloop` run.
#[derive(Debug, Clone)]
pub struct TracedRun {
    pub mode: &'static str,
    pub lp: LoopLine,
    /// Sum of the `lost` objects' counts.
    pub lost: u64,
    /// The `map_full` objects, as printed.
    pub map_full: Vec<String>,
    /// The `exit` object's opened_total (fdloop's exit).
    pub opened_total: Option<u64>,
    /// fdtrace's own CPU time (its rusage minus fdloop's, which it reaped).
    pub fdtrace_cpu: Usage,
    /// From starting fdtrace to its exit.
    pub wall: Duration,
}

/// Everything the rounds measured.
#[derive(Default)]
pub struct Samples {
    /// ns per iteration, per (mode index, condition), one per round.
    pub ns: BTreeMap<(usize, Cond), Vec<f64>>,
    pub traced: Vec<TracedRun>,
    /// Other tracers seen before any measurement: they tax every syscall too.
    pub others: BTreeSet<String>,
}

impl Samples {
    fn push(&mut self, mode: usize, cond: Cond, ns: f64) {
        self.ns.entry((mode, cond)).or_default().push(ns);
    }
}

/// What the report header says about the run.
pub struct Setting {
    pub rounds: u32,
    pub quick: bool,
    pub iters: Vec<u64>,
    pub revision: String,
    pub kernel: String,
}

/// `cargo xtask bench`.
pub fn bench(tools: &Tools, args: &Args) -> Result<ExitCode> {
    if !is_root() {
        bail!(
            "the bench loads eBPF programs and installs packages: run `cargo xtask bench` as root"
        );
    }
    if args.scale.is_nan() || args.scale <= 0.0 || args.scale.is_infinite() {
        bail!("--scale must be a positive number");
    }
    setup::setup(tools)?;
    setup::ensure_tracefs()?;
    let ws = Workspace::locate()?;
    let bins = build(&ws, tools, args.fdtrace.as_deref())?;
    ensure_packages(args.node)?;
    child::install_signal_flag();
    child::become_subreaper();
    let result = if args.metrics_cost {
        measure_metrics_cost(&bins, args, &ws)
    } else if args.node {
        measure_node(&bins, args, &ws)
    } else if args.python {
        measure_python(&bins, args, &ws)
    } else {
        measure_and_report(&bins, args, &ws)
    };
    child::sweep_orphans();
    result.map(|()| ExitCode::SUCCESS)
}

/// Everything after the builds.
fn measure_and_report(bins: &Bins, args: &Args, ws: &Workspace) -> Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 5 });
    let target = if args.quick { 0.04 } else { 0.4 } * args.scale;
    let iters = calibrate(bins, target)?;
    let samples = {
        // The accounting taxes every program run: off for the wall clock.
        let _stats = progtime::StatsSwitch::set(false)?;
        measure_rounds(bins, rounds, &iters)?
    };
    let progs = progtime::measure(bins, &iters, rounds)?;
    let py = python::measure(bins, &ws.root, rounds, args.quick)?;
    let attach = extras::attach_figures(bins)?;
    let setting = Setting {
        rounds,
        quick: args.quick,
        iters,
        revision: revision(&ws.root),
        kernel: kernel_release(),
    };
    report::print(&setting, &samples, &progs, &attach);
    python::print(&py);
    Ok(())
}

/// The Python section alone.
fn measure_python(bins: &Bins, args: &Args, ws: &Workspace) -> Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 5 });
    let py = python::measure(bins, &ws.root, rounds, args.quick)?;
    section_header("Python section", ws, args.quick);
    python::print(&py);
    Ok(())
}

/// The node section. The node watch is printed as soon as it is done:
/// the tax and program-time parts that follow take minutes of their own.
fn measure_node(bins: &Bins, args: &Args, ws: &Workspace) -> Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 5 });
    let target = if args.quick { 0.04 } else { 0.4 } * args.scale;
    let part = |p| args.node_part.is_empty() || args.node_part.contains(&p);
    let (figures, tax, progs) = {
        // The accounting taxes every program run: off for the wall clock.
        let _stats = progtime::StatsSwitch::set(false)?;
        let figures = if part(NodePart::Watch) {
            let mut node = node::start_node(bins)?;
            let watch_rounds = args.rounds.unwrap_or(if args.quick {
                node::QUICK_ROUNDS
            } else {
                node::ROUNDS
            });
            let watch = node::watch_node(bins, &mut node, args.quick, watch_rounds)?;
            Some((watch, metrics::measure(bins, &node, rounds, args.quick)?))
        } else {
            None
        };
        let tax = if part(NodePart::Tax) {
            Some(tax::measure(bins, rounds, args.quick)?)
        } else {
            None
        };
        let progs = if part(NodePart::Progtime) {
            let open = calibrate_mode(bins, "open", target)?;
            Some(progtime::node_measure(bins, open, rounds)?)
        } else {
            None
        };
        (figures, tax, progs)
    };
    section_header("node section", ws, args.quick);
    if let Some((f, m)) = &figures {
        node::print(f);
        metrics::print(m);
    }
    if let Some(t) = &tax {
        tax::print(t);
    }
    if let Some(p) = &progs {
        report::node_program_time(p);
    }
    Ok(())
}

/// The `--metrics` cost alone, on the synthetic node.
fn measure_metrics_cost(bins: &Bins, args: &Args, ws: &Workspace) -> Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 5 });
    let figures = {
        let _stats = progtime::StatsSwitch::set(false)?;
        let node = node::start_node(bins)?;
        metrics::measure(bins, &node, rounds, args.quick)?
    };
    section_header("--metrics cost", ws, args.quick);
    metrics::print(&figures);
    Ok(())
}

fn section_header(name: &str, ws: &Workspace, quick: bool) {
    println!();
    println!("=== fdtrace bench: {name} ===");
    println!(
        "revision {}, kernel {}, {} CPUs{}",
        revision(&ws.root),
        kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick {
            " (--quick: a smoke check, short runs, not a measurement)"
        } else {
            ""
        }
    );
}

/// Release builds of fdtrace (unless `given`) and fdloop.
fn build(ws: &Workspace, tools: &Tools, given: Option<&Path>) -> Result<Bins> {
    let fdtrace = match given {
        Some(bin) if bin.is_file() => bin.to_path_buf(),
        Some(bin) => bail!("--fdtrace {}: no such file", bin.display()),
        None => build_fdtrace(ws, tools, true)?,
    };
    let args = [
        "build",
        "--release",
        "--package",
        "fdtrace-tests",
        "--bin",
        "fdloop",
    ];
    proc::run(&mut ws.cargo(tools, &args)?)?;
    let fdloop = ws.target_dir.join("release").join("fdloop");
    if !fdloop.is_file() {
        bail!("the build succeeded but {} is missing", fdloop.display());
    }
    Ok(Bins { fdtrace, fdloop })
}

/// bpftrace (the baseline) and bpftool (map memory), from Debian's
/// packages; for the node section also process-exporter, nginx and wrk
/// (each package is named as its program). Debian's policy-rc.d keeps the
/// packages' services from starting at install; the bench starts its own.
fn ensure_packages(node: bool) -> Result<()> {
    let mut wanted = vec![("bpftrace", "--version"), ("bpftool", "version")];
    if node {
        wanted.extend([
            ("prometheus-process-exporter", "-version"),
            ("nginx", "-v"),
            ("wrk", "--version"),
        ]);
    }
    let names: Vec<&str> = wanted.iter().map(|(p, _)| *p).collect();
    let missing: Vec<(&str, &str)> = wanted.into_iter().filter(|(p, a)| !runs(p, a)).collect();
    if missing.is_empty() {
        eprintln!("bench: {}: present", names.join(", "));
        return Ok(());
    }
    let progs: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
    eprintln!("bench: {}: missing: installing", progs.join(", "));
    proc::run(Command::new("apt-get").arg("update"))
        .context("apt-get update failed: check the network")?;
    proc::run(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&progs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("cannot install {} with apt-get", progs.join(" ")))?;
    // The same argument as above: one each program answers and exits on
    // (process-exporter takes any other word for a flag-less start, and
    // serves forever).
    for (prog, arg) in missing {
        if !runs(prog, arg) {
            bail!("{prog} was installed but does not run");
        }
    }
    Ok(())
}

/// Whether `prog arg` can be started (its exit code does not matter).
fn runs(prog: &str, arg: &str) -> bool {
    Command::new(prog)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Adds the other tracers running now to `seen`, warning about new ones.
/// Called when none of the bench's own tracers runs.
fn note_other_tracers(seen: &mut BTreeSet<String>) {
    for o in other_tracers() {
        if !seen.contains(&o) {
            eprintln!("bench: warning: another tracer is running and skews the figures: {o}");
            seen.insert(o);
        }
    }
}

/// Other fdtrace or bpftrace processes: they tax every syscall too.
fn other_tracers() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !matches!(comm.trim(), "fdtrace" | "bpftrace") {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        found.push(format!("pid {pid}: {}", cmdline.trim()));
    }
    found
}

fn revision(root: &Path) -> String {
    capture(
        Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(root),
    )
    .map(|s| s.trim().to_owned())
    .unwrap_or_else(|_| "unknown".to_owned())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Iterations per mode so that an untraced run takes about `target` seconds.
fn calibrate(bins: &Bins, target: f64) -> Result<Vec<u64>> {
    MODES
        .iter()
        .map(|mode| calibrate_mode(bins, mode, target))
        .collect()
}

/// Iterations of `mode` so that an untraced run takes about `target` seconds.
fn calibrate_mode(bins: &Bins, mode: &str, target: f64) -> Result<u64> {
    let probe = if mode == NO_FD_MODE { 200_000 } else { 20_000 };
    // The first run warms caches; the second is the one that counts.
    run_untraced(bins, mode, probe)?;
    let lp = run_untraced(bins, mode, probe)?;
    let n = round_2_digits(target * 1e9 / lp.ns.max(1.0)).max(1000);
    eprintln!(
        "bench: {mode}: {:.0} ns/iter untraced: {n} iterations per run",
        lp.ns
    );
    Ok(n)
}

/// `x` rounded to two significant digits.
fn round_2_digits(x: f64) -> u64 {
    if x.is_nan() || x < 1.0 {
        return 1;
    }
    let scale = 10f64.powi(x.log10().floor() as i32 - 1);
    ((x / scale).round() * scale) as u64
}

/// All conditions for all modes, `rounds` times.
fn measure_rounds(bins: &Bins, rounds: u32, iters: &[u64]) -> Result<Samples> {
    let mut samples = Samples::default();
    for round in 0..rounds {
        let mut order = Cond::ALL;
        order.rotate_left(round as usize % Cond::ALL.len());
        for cond in order {
            check_interrupted()?;
            note_other_tracers(&mut samples.others);
            eprintln!("bench: round {}/{rounds}: {}", round + 1, cond.label());
            measure(bins, cond, iters, &mut samples)
                .with_context(|| format!("measuring `{}`", cond.label()))?;
        }
    }
    Ok(samples)
}

/// One condition for every mode.
fn measure(bins: &Bins, cond: Cond, iters: &[u64], samples: &mut Samples) -> Result<()> {
    let modes = MODES.iter().copied().zip(iters.iter().copied()).enumerate();
    match cond {
        Cond::Untraced => {
            for (i, (mode, n)) in modes {
                samples.push(i, cond, run_untraced(bins, mode, n)?.ns);
            }
        }
        Cond::Fdtrace => {
            for (i, (mode, n)) in modes {
                let run = run_fdtrace(bins, mode, n, &[])?;
                samples.push(i, cond, run.lp.ns);
                samples.traced.push(run);
            }
        }
        Cond::FdtraceStacks => {
            for (i, (mode, n)) in modes.filter(|(_, (m, _))| *m != NO_FD_MODE) {
                let run = run_fdtrace(bins, mode, n, &["--stack-rate", EVERY_FD_STACK_RATE])?;
                samples.push(i, cond, run.lp.ns);
            }
        }
        Cond::Bpftrace => {
            for (i, (mode, n)) in modes {
                samples.push(i, cond, run_bpftrace(bins, mode, n)?.ns);
            }
        }
        Cond::FdtraceTax | Cond::Noop | Cond::BpftraceTax => {
            for (i, ns) in measure_tax(bins, cond, iters)?.into_iter().enumerate() {
                samples.push(i, cond, ns);
            }
        }
    }
    Ok(())
}

/// The loops, untraced, while a tracer is attached to something else.
fn measure_tax(bins: &Bins, cond: Cond, iters: &[u64]) -> Result<Vec<f64>> {
    // Declared first so it is dropped (killed) after the tracer stops.
    let sleeper = match cond {
        Cond::Noop => None,
        _ => Some(start_sleeper()?),
    };
    let sleeper_pid = sleeper.as_ref().map_or(0, Proc::pid);
    let mut tracer = match cond {
        Cond::FdtraceTax => start_fdtrace_on(bins, &[sleeper_pid])?,
        Cond::BpftraceTax => start_bpftrace(sleeper_pid)?,
        _ => start_noop(bins)?,
    };
    let mut out = Vec::new();
    for (mode, &n) in MODES.iter().zip(iters) {
        out.push(run_untraced(bins, mode, n)?.ns);
    }
    if !tracer.running()? {
        return Err(tracer.fail("exited during the measurement"));
    }
    tracer.stop(STOP_GRACE)?;
    drop(sleeper);
    Ok(out)
}

/// `fdloop MODE N [--wait]`, stdout and stderr piped.
fn fdloop_cmd(bins: &Bins, mode: &str, n: u64, wait: bool) -> Command {
    let mut cmd = Command::new(&bins.fdloop);
    pin_to_last_cpu(&mut cmd);
    cmd.arg(mode).arg(n.to_string());
    if wait {
        cmd.arg("--wait").stdin(Stdio::piped());
    } else {
        cmd.stdin(Stdio::null());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs the command on the last online CPU. Every loop runs there, under
/// every condition: on a small VM a loop that migrates between CPUs moves
/// its own figure by 10% from run to run; pinned, by about 5%.
fn pin_to_last_cpu(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let cpu = cpus - 1;
    // SAFETY: between fork and exec the closure only calls
    // sched_setaffinity (async-signal-safe) on a cpu_set_t on its stack.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            // A failure (a CPU taken offline meanwhile) leaves the loop
            // unpinned: noisier, not wrong.
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

/// Parses `fdloop MODE ns_per_iter=X iters=N utime_us=U stime_us=S`.
pub fn parse_loop_line(line: &str) -> Result<LoopLine> {
    let field = |key: &str| -> Result<&str> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("no {key}= in fdloop's line `{line}`"))
    };
    let num = |key: &str| -> Result<u64> {
        field(key)?
            .parse()
            .with_context(|| format!("bad {key} in `{line}`"))
    };
    let ns: f64 = field("ns_per_iter")?
        .parse()
        .with_context(|| format!("bad ns_per_iter in `{line}`"))?;
    Ok(LoopLine {
        ns,
        iters: num("iters")?,
        cpu: Usage {
            user: Duration::from_micros(num("utime_us")?),
            system: Duration::from_micros(num("stime_us")?),
        },
    })
}

fn is_loop_line(line: &str) -> bool {
    line.starts_with("fdloop ")
}

/// fdloop alone.
fn run_untraced(bins: &Bins, mode: &str, n: u64) -> Result<LoopLine> {
    let mut lp = Proc::spawn("fdloop", &mut fdloop_cmd(bins, mode, n, false))?;
    let line = lp.stdout()?.wait_for(LOOP_TIMEOUT, is_loop_line);
    let line = line.map_err(|e| lp.fail(format!("no result line: {e:#}")))?;
    lp.wait_ok(LOOP_TIMEOUT)?;
    parse_loop_line(&line)
}

/// `fdtrace --json --interval 10s EXTRA... run -- fdloop MODE N`.
fn run_fdtrace(bins: &Bins, mode: &'static str, n: u64, extra: &[&str]) -> Result<TracedRun> {
    let mut cmd = Command::new(&bins.fdtrace);
    // fdloop inherits the CPU (fdtrace itself sleeps through the loop).
    pin_to_last_cpu(&mut cmd);
    cmd.args(["--json", "--interval", "10s"])
        .args(extra)
        .args(["run", "--"])
        .arg(&bins.fdloop)
        .args([mode, &n.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut ft = Proc::spawn("fdtrace run", &mut cmd)?;
    let lines = ft.stdout()?.rest(LOOP_TIMEOUT + ATTACH_TIMEOUT);
    let lines = lines.map_err(|e| ft.fail(format!("reading its output: {e:#}")))?;
    let (_, total) = ft.wait_ok(STOP_GRACE)?;
    let wall = started.elapsed();
    let Some(loop_line) = lines.iter().find(|l| is_loop_line(l)) else {
        return Err(ft.fail(format!(
            "no fdloop line in its output:\n{}",
            lines.join("\n")
        )));
    };
    let lp = parse_loop_line(loop_line)?;
    let mut run = TracedRun {
        mode,
        lp,
        lost: 0,
        map_full: Vec::new(),
        opened_total: None,
        fdtrace_cpu: Usage {
            user: total.user.saturating_sub(lp.cpu.user),
            system: total.system.saturating_sub(lp.cpu.system),
        },
        wall,
    };
    for line in lines.iter().filter(|l| l.starts_with('{')) {
        read_json_line(line, &mut run)?;
    }
    Ok(run)
}

/// Records what a JSON line of fdtrace says about losses and the exit.
fn read_json_line(line: &str, run: &mut TracedRun) -> Result<()> {
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("fdtrace printed bad JSON: {line}"))?;
    match v.get("type").and_then(|t| t.as_str()) {
        Some("lost") => run.lost += v.get("count").and_then(|c| c.as_u64()).unwrap_or(0),
        Some("map_full") => run.map_full.push(line.to_owned()),
        Some("exit") if run.opened_total.is_none() => {
            run.opened_total = v.get("opened_total").and_then(|c| c.as_u64());
        }
        _ => {}
    }
    Ok(())
}

/// fdloop traced by the bpftrace script: fdloop waits on stdin until
/// bpftrace's BEGIN line says every probe is attached.
fn run_bpftrace(bins: &Bins, mode: &str, n: u64) -> Result<LoopLine> {
    let mut lp = Proc::spawn("fdloop", &mut fdloop_cmd(bins, mode, n, true))?;
    let mut bt = start_bpftrace(lp.pid())?;
    lp.poke()?;
    let line = lp.stdout()?.wait_for(LOOP_TIMEOUT, is_loop_line);
    let line = line.map_err(|e| lp.fail(format!("no result line: {e:#}")))?;
    lp.wait_ok(LOOP_TIMEOUT)?;
    if !bt.running()? {
        return Err(bt.fail("exited during the measurement"));
    }
    bt.stop(STOP_GRACE)?;
    parse_loop_line(&line)
}

/// A process that makes no syscall for the tax conditions to trace.
fn start_sleeper() -> Result<Proc> {
    Proc::spawn(
        "sleep",
        Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// `fdtrace --json --pid PID...` (the default 1 s interval, as in
/// production), once its first line is out.
fn start_fdtrace_on(bins: &Bins, pids: &[u32]) -> Result<Proc> {
    start_fdtrace_with(bins, &[], pids)
}

/// `fdtrace --json EXTRA... --pid PID...`, once its first line is out.
fn start_fdtrace_with(bins: &Bins, extra: &[&str], pids: &[u32]) -> Result<Proc> {
    let mut cmd = Command::new(&bins.fdtrace);
    cmd.arg("--json").args(extra);
    for pid in pids {
        cmd.args(["--pid", &pid.to_string()]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut ft = Proc::spawn("fdtrace --pid", &mut cmd)?;
    let first = ft
        .stdout()?
        .wait_for(ATTACH_TIMEOUT, |l| l.starts_with('{'));
    first.map_err(|e| ft.fail(format!("no JSON line: {e:#}")))?;
    Ok(ft)
}

/// `fdtrace noop-hooks`, once it says its program is attached.
fn start_noop(bins: &Bins) -> Result<Proc> {
    let mut cmd = Command::new(&bins.fdtrace);
    cmd.arg("noop-hooks")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut noop = Proc::spawn("fdtrace noop-hooks", &mut cmd)?;
    let ready = noop
        .stderr()?
        .wait_for(ATTACH_TIMEOUT, |l| l.contains("attached"));
    ready.map_err(|e| noop.fail(format!("never said it attached: {e:#}")))?;
    Ok(noop)
}

/// The bpftrace script filtered to `pid`, once its BEGIN line is out (after
/// "Attaching N probes..." and the attachment itself).
fn start_bpftrace(pid: u32) -> Result<Proc> {
    let mut cmd = Command::new("bpftrace");
    cmd.args(["-B", "line", "-e", BPFTRACE_SCRIPT, &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut bt = Proc::spawn("bpftrace", &mut cmd)?;
    let ready = bt.stdout()?.wait_for(ATTACH_TIMEOUT, |l| l == "ready");
    ready.map_err(|e| bt.fail(format!("never attached: {e:#}")))?;
    Ok(bt)
}

/// The median of `xs` (None if empty).
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loop_line() {
        let lp =
            parse_loop_line("fdloop open ns_per_iter=2783.41 iters=200000 utime_us=12 stime_us=34")
                .expect("parses");
        assert_eq!(lp.iters, 200_000);
        assert!((lp.ns - 2783.41).abs() < 1e-9);
        assert_eq!(lp.cpu.user, Duration::from_micros(12));
        assert_eq!(lp.cpu.system, Duration::from_micros(34));
        assert!(parse_loop_line("fdloop open iters=3").is_err());
    }

    #[test]
    fn medians_and_rounding() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(round_2_digits(144_567.0), 140_000);
        assert_eq!(round_2_digits(1_049.0), 1_000);
        assert_eq!(round_2_digits(0.2), 1);
    }
}
