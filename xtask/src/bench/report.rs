//! The bench report, on stdout.

use std::time::Duration;

use super::extras::Attach;
use super::progtime::{NodeProgTime, ProgTime};
use super::{Cond, MODES, NO_FD_MODE, Samples, Setting, TracedRun, median};

/// Ratios are printed only when the denominator is at least this many ns:
/// below it they are noise divided by noise.
const MIN_DENOMINATOR_NS: f64 = 5.0;

/// What one iteration of each mode does, and how many fds it opens.
fn iteration(mode: &str) -> (&'static str, u64) {
    match mode {
        "open" => ("openat(/dev/null) + close", 1),
        "socket" => ("socket(AF_UNIX, SOCK_STREAM) + close", 1),
        "pipe" => ("pipe2 + 2 closes", 2),
        _ => ("one raw getppid syscall (no fd)", 0),
    }
}

pub fn print(setting: &Setting, samples: &Samples, progs: &[ProgTime], attach: &[Attach]) {
    header(setting, samples);
    table(setting, samples);
    stacks(samples);
    raw(samples);
    program_time(progs);
    zero_loss(setting, samples);
    cpu(samples);
    attach_time(attach);
    watching(attach);
    memory(attach);
}

fn program_time(progs: &[ProgTime]) {
    println!();
    println!(
        "Time inside the tracers' BPF programs per iteration (kernel bpf_stats: run_time_ns and \
         run_cnt of every program the tracer holds, over the traced loop; medians over rounds). \
         Steady on a noisy machine; leaves out what a hook costs around its programs (bpftrace's \
         per-syscall perf tracepoints build a record first), which the wall figures above include:"
    );
    println!(
        "  {:<8} {:>13} {:>9} {:>14} {:>9} {:>18}",
        "mode", "fdtrace ns", "runs", "bpftrace ns", "runs", "fdtrace/bpftrace"
    );
    for p in progs {
        let ratio = if p.bpftrace.0 >= MIN_DENOMINATOR_NS {
            format!("{:.2}", p.fdtrace.0 / p.bpftrace.0)
        } else {
            "n/a".into()
        };
        println!(
            "  {:<8} {:>13.1} {:>9.2} {:>14.1} {:>9.2} {:>18}",
            p.mode, p.fdtrace.0, p.fdtrace.1, p.bpftrace.0, p.bpftrace.1, ratio
        );
    }
}

/// The goal for fdtrace's program time against the node-wide tracker's.
const GOAL_NODE_PROG_RATIO: f64 = 0.35;

/// Program time per traced openat+close: fdtrace `--no-stacks` against
/// today's bpftrace script and the node-wide tracker.
pub fn node_program_time(p: &NodeProgTime) {
    println!();
    println!(
        "=== time inside the programs per traced openat+close (`fdloop open {}`; kernel \
         bpf_stats; medians over rounds) ===",
        p.iters
    );
    println!(
        "fdtrace: `--no-stacks --pid` the loop (its programs' total over the loop / iterations, \
         so other processes' syscalls passing its hooks count against it); `--all --no-stacks`: \
         every process traced, the host's own runs over the loop taken out at their mean time \
         per run in a second before and after it (the runs column counts them; the more of \
         them, the noisier the figure). bpftrace script: \
         today's, filtered to the loop's pid. bpftrace node-wide: @live[pid, fd] = nsecs on \
         sys_exit_openat, a per-pid count(), delete on sys_enter_close, for every process (the \
         mean time per run of each of its two programs, summed: other processes' events run them \
         too, which the runs column shows)."
    );
    println!(
        "  {:<28} {:>10} {:>14} {:>18}",
        "tracer", "ns", "runs/iter", "fdtrace / this"
    );
    let (ft, _) = p.fdtrace_no_stacks;
    let all = p.fdtrace_all.map(|(ns, runs, _)| (ns, runs));
    let rows = [
        ("fdtrace --no-stacks --pid", Some(p.fdtrace_no_stacks)),
        ("fdtrace --no-stacks --all", all),
        ("bpftrace script (pid)", Some(p.bpftrace_light)),
        ("bpftrace node-wide", Some(p.bpftrace_node)),
    ];
    for (name, fig) in rows {
        let Some((ns, runs)) = fig else {
            let why = p.fdtrace_all_error.as_deref().unwrap_or("no figure");
            println!("  {name:<28} ERROR: {why}");
            continue;
        };
        let ratio = if ns >= MIN_DENOMINATOR_NS {
            format!("{:.2}", ft / ns)
        } else {
            "n/a".into()
        };
        println!("  {name:<28} {ns:>10.1} {runs:>14.2} {ratio:>18}");
    }
    if let Some((_, _, share)) = p.fdtrace_all {
        println!(
            "  (--all: {:.0}% of its program runs over the loop were the host's)",
            100.0 * share
        );
    }
    let (heavy, _) = p.bpftrace_node;
    if heavy >= MIN_DENOMINATOR_NS {
        for (what, ns) in [("--pid", Some(ft)), ("--all", all.map(|a| a.0))] {
            let Some(ns) = ns else { continue };
            let r = ns / heavy;
            println!(
                "  goal: fdtrace {what} <= {GOAL_NODE_PROG_RATIO}x the node-wide tracker: {r:.2}x: {}",
                super::node::verdict(r <= GOAL_NODE_PROG_RATIO)
            );
        }
    }
}

fn header(s: &Setting, samples: &Samples) {
    println!();
    println!("=== fdtrace bench ===");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "revision {}, kernel {}, {cpus} CPUs, {} round(s){}",
        s.revision,
        s.kernel,
        s.rounds,
        if s.quick {
            " (--quick: a smoke check, short loops, not a measurement)"
        } else {
            ""
        }
    );
    println!(
        "conditions interleaved: each round measures every condition, in an order rotated per round"
    );
    println!(
        "every loop runs pinned to the last CPU (CPU {}), under every condition",
        cpus.saturating_sub(1)
    );
    println!("one iteration and iterations per run (sized for ~0.4 s untraced):");
    for (mode, n) in MODES.iter().zip(&s.iters) {
        println!("  {mode:<8} {:<38} {n} iterations", iteration(mode).0);
    }
    if !samples.others.is_empty() {
        println!(
            "WARNING: other tracers ran during the bench (seen between measurements); their hooks \
             tax every syscall, so every figure is skewed:"
        );
    }
    for o in &samples.others {
        println!("  {o}");
    }
}

fn med(samples: &Samples, mode: usize, cond: Cond) -> Option<f64> {
    median(samples.ns.get(&(mode, cond))?)
}

fn added(samples: &Samples, mode: usize, cond: Cond) -> Option<f64> {
    Some(med(samples, mode, cond)? - med(samples, mode, Cond::Untraced)?)
}

fn fmt_added(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:+.1}"))
}

fn fmt_ratio(num: Option<f64>, den: Option<f64>) -> String {
    match (num, den) {
        (Some(n), Some(d)) if d >= MIN_DENOMINATOR_NS => format!("{:.2}", n / d),
        _ => "n/a".into(),
    }
}

fn table(s: &Setting, samples: &Samples) {
    println!();
    println!(
        "MEDIANS over {} round(s), ns per iteration. `untraced` is the median itself; every \
         `+ns` is median(condition) - median(untraced).",
        s.rounds
    );
    println!(
        "Traced: fdloop traced by fdtrace / by the bpftrace script. Tax: fdloop NOT traced while \
         fdtrace / empty programs on fdtrace's hooks (noop floor) / bpftrace trace a sleeping process."
    );
    println!(
        "Ratios are of the added ns (n/a when the denominator is under {MIN_DENOMINATOR_NS} ns: noise)."
    );
    println!();
    println!(
        "{:<8} {:>9} | {:>11} {:>12} {:>9} | {:>11} {:>11} {:>12} {:>13} {:>12}",
        "", "", "traced", "", "fdtrace/", "tax", "", "", "fdtrace tax/", "fdtrace tax/"
    );
    println!(
        "{:<8} {:>9} | {:>11} {:>12} {:>9} | {:>11} {:>11} {:>12} {:>13} {:>12}",
        "mode",
        "untraced",
        "fdtrace +ns",
        "bpftrace +ns",
        "bpftrace",
        "fdtrace +ns",
        "noop +ns",
        "bpftrace +ns",
        "bpftrace tax",
        "noop floor"
    );
    for (i, mode) in MODES.iter().enumerate() {
        let untraced = med(samples, i, Cond::Untraced).map_or("-".into(), |x| format!("{x:.1}"));
        let a = |c| added(samples, i, c);
        println!(
            "{:<8} {:>9} | {:>11} {:>12} {:>9} | {:>11} {:>11} {:>12} {:>13} {:>12}",
            mode,
            untraced,
            fmt_added(a(Cond::Fdtrace)),
            fmt_added(a(Cond::Bpftrace)),
            fmt_ratio(a(Cond::Fdtrace), a(Cond::Bpftrace)),
            fmt_added(a(Cond::FdtraceTax)),
            fmt_added(a(Cond::Noop)),
            fmt_added(a(Cond::BpftraceTax)),
            fmt_ratio(a(Cond::FdtraceTax), a(Cond::BpftraceTax)),
            fmt_ratio(a(Cond::FdtraceTax), a(Cond::Noop)),
        );
    }
}

/// What taking the creating user stack of every fd costs: fdtrace with
/// `--stack-rate` above the loop's rate against fdtrace with its default
/// budget (1000 per second per process, which the loops exceed at once, so
/// nearly all their fds go without a stack).
fn stacks(samples: &Samples) {
    println!();
    println!(
        "Stack capture: fdloop traced by fdtrace taking the user stack of every new fd \
         (`--stack-rate 100000000`), against the default budget (1000 stacks per second per \
         process, which these loops exceed, so almost none of their fds get one):"
    );
    println!(
        "  {:<8} {:>16} {:>17} {:>15} {:>12} {:>22}",
        "mode",
        "default +ns",
        "every fd +ns",
        "per stack ns",
        "bpftrace +ns",
        "every fd / bpftrace"
    );
    for (i, mode) in MODES.iter().enumerate() {
        let fds = iteration(mode).1;
        if fds == 0 {
            continue;
        }
        let a = |c| added(samples, i, c);
        let per_stack = a(Cond::FdtraceStacks)
            .zip(a(Cond::Fdtrace))
            .map(|(s, d)| format!("{:+.1}", (s - d) / fds as f64));
        println!(
            "  {:<8} {:>16} {:>17} {:>15} {:>12} {:>22}",
            mode,
            fmt_added(a(Cond::Fdtrace)),
            fmt_added(a(Cond::FdtraceStacks)),
            per_stack.unwrap_or("-".into()),
            fmt_added(a(Cond::Bpftrace)),
            fmt_ratio(a(Cond::FdtraceStacks), a(Cond::Bpftrace)),
        );
    }
}

fn raw(samples: &Samples) {
    println!();
    println!("Raw ns per iteration per round (absolute, in round order) [min .. max]:");
    for (i, mode) in MODES.iter().enumerate() {
        for cond in Cond::ALL {
            let Some(xs) = samples.ns.get(&(i, cond)) else {
                continue;
            };
            let list: Vec<String> = xs.iter().map(|x| format!("{x:8.1}")).collect();
            let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            println!(
                "  {mode:<8} {:<13} {}  [{min:.1} .. {max:.1}]",
                cond.label(),
                list.join(" ")
            );
        }
    }
}

fn runs_of<'a>(samples: &'a Samples, mode: &'a str) -> impl Iterator<Item = &'a TracedRun> {
    samples.traced.iter().filter(move |r| r.mode == mode)
}

fn zero_loss(s: &Setting, samples: &Samples) {
    println!();
    println!(
        "Zero loss (`fdtrace --json run -- fdloop`, every round): `lost` counts summed, \
         `map_full` objects, and the exit object's opened_total against the fds the loop opened \
         (the surplus is the loader's startup opens):"
    );
    for (mode, &iters) in MODES.iter().zip(&s.iters) {
        let expected = iters * iteration(mode).1;
        let runs: Vec<&TracedRun> = runs_of(samples, mode).collect();
        let lost: u64 = runs.iter().map(|r| r.lost).sum();
        let map_full: usize = runs.iter().map(|r| r.map_full.len()).sum();
        let totals: Vec<String> = runs
            .iter()
            .map(|r| match r.opened_total {
                Some(t) => format!("{t} ({:+})", t as i128 - i128::from(expected)),
                None => "no exit object".into(),
            })
            .collect();
        let all_ok = !runs.is_empty()
            && runs
                .iter()
                .all(|r| r.opened_total.is_some_and(|t| t >= expected));
        let verdict = if lost == 0 && map_full == 0 && all_ok {
            "OK"
        } else {
            "NOT OK"
        };
        println!(
            "  {mode:<8} lost={lost} map_full={map_full} opened_total >= {expected}: {} -> {verdict}",
            totals.join(", ")
        );
        for r in runs {
            for m in &r.map_full {
                println!("           {m}");
            }
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median_of(runs: &[&TracedRun], f: impl Fn(&TracedRun) -> f64) -> f64 {
    let xs: Vec<f64> = runs.iter().map(|r| f(r)).collect();
    median(&xs).unwrap_or(f64::NAN)
}

fn cpu(samples: &Samples) {
    println!();
    println!(
        "fdtrace's own CPU in `fdtrace run -- fdloop` (medians over rounds): its wait4 rusage minus \
         fdloop's own (fdtrace reaps fdloop). Its kernel-side (eBPF) work is charged to fdloop, not \
         here. The run is fdtrace's whole life: loading and attaching the programs, the loop, the exit."
    );
    println!(
        "  {:<8} {:>12} {:>10} {:>9} {:>9} {:>9} {:>13} {:>15}",
        "mode",
        "fd events/s",
        "loop s",
        "run s",
        "user s",
        "sys s",
        "user % core",
        "user+sys % core"
    );
    for mode in MODES {
        let runs: Vec<&TracedRun> = runs_of(samples, mode).collect();
        if runs.is_empty() {
            continue;
        }
        let per_iter = if mode == NO_FD_MODE {
            0.0
        } else {
            2.0 * iteration(mode).1 as f64
        };
        let ns = median_of(&runs, |r| r.lp.ns);
        let loop_s = median_of(&runs, |r| r.lp.ns * r.lp.iters as f64 / 1e9);
        let wall = median_of(&runs, |r| secs(r.wall));
        let user = median_of(&runs, |r| secs(r.fdtrace_cpu.user));
        let sys = median_of(&runs, |r| secs(r.fdtrace_cpu.system));
        let user_pct = median_of(&runs, |r| 100.0 * secs(r.fdtrace_cpu.user) / secs(r.wall));
        let all_pct = median_of(&runs, |r| {
            100.0 * secs(r.fdtrace_cpu.user + r.fdtrace_cpu.system) / secs(r.wall)
        });
        println!(
            "  {mode:<8} {:>12.0} {loop_s:>10.3} {wall:>9.3} {user:>9.4} {sys:>9.4} {user_pct:>12.2}% {all_pct:>14.2}%",
            per_iter * 1e9 / ns
        );
    }
    println!(
        "  (fd events = fds opened + fds closed; pipe counts 2 opens + 2 closes per iteration)"
    );
    event_cpu(samples);
}

/// fdtrace's user CPU in the open runs above that of the getppid runs (no fd
/// event, same startup): what handling the events costs it.
fn event_cpu(samples: &Samples) {
    let open: Vec<&TracedRun> = runs_of(samples, "open").collect();
    let idle: Vec<&TracedRun> = runs_of(samples, NO_FD_MODE).collect();
    if open.is_empty() || idle.is_empty() {
        return;
    }
    let user = |runs: &[&TracedRun]| median_of(runs, |r| secs(r.fdtrace_cpu.user));
    let extra = user(&open) - user(&idle);
    let loop_s = median_of(&open, |r| r.lp.ns * r.lp.iters as f64 / 1e9);
    println!(
        "  open vs getppid (same startup, no fd event): fdtrace user CPU {extra:+.4} s over the \
         {loop_s:.3} s open loop = {:+.2}% of one core while the loop runs",
        100.0 * extra / loop_s
    );
}

fn attach_time(attach: &[Attach]) {
    println!();
    println!(
        "Attach time (`fdtrace --pid PID... --json`, from its start to its first `process` line \
         for every PID; `fdloop hold N` opens N fds on /dev/null, on top of its stdio and what it \
         inherits):"
    );
    for a in attach {
        let check = match a.reported {
            Some(r) if r == a.proc_fds => format!("open_fds={r} = /proc/PID/fd count: OK"),
            Some(r) => format!("open_fds={r} but /proc/PID/fd has {}: MISMATCH", a.proc_fds),
            None => "no open_fds in a line: MISMATCH".into(),
        };
        let who = match a.procs {
            1 => "1 process holding".to_string(),
            n => format!("{n} processes each holding"),
        };
        println!(
            "  {who} {:>5} fds ({} in /proc/PID/fd): {:.3} s; {check}",
            a.held,
            a.proc_fds,
            secs(a.time)
        );
    }
    if let [big, small, ..] = attach {
        let dfd = big.proc_fds as f64 - small.proc_fds as f64;
        let dt = secs(big.time) - secs(small.time);
        if dfd > 0.0 && dt > 0.0 {
            println!(
                "  per fd found at attach: {:.1} us ((difference of the two times) / (difference of the fd counts))",
                dt * 1e6 / dfd
            );
        } else if dfd > 0.0 {
            println!(
                "  per fd found at attach: within the noise of the fixed cost (loading the \
                 programs): the few-fd attach took as long"
            );
        }
    }
}

/// fdtrace's cost while it reports on many fds that do not change.
fn watching(attach: &[Attach]) {
    for a in attach {
        let Some(w) = &a.watch else { continue };
        println!();
        println!(
            "Watching {} fds in {} idle processes (`--interval 1s`, from the first report on):",
            a.proc_fds, a.procs
        );
        let per_report = match w.reports {
            0 => "no report in that time: MISMATCH".to_string(),
            n => format!("{:.1} ms of CPU per report", secs(w.cpu) * 1e3 / n as f64),
        };
        println!(
            "  fdtrace CPU {:.2} s over {:.1} s = {:.1}% of one core; {} reports, {per_report}; \
             resident memory {} MiB",
            secs(w.cpu),
            secs(w.wall),
            100.0 * secs(w.cpu) / secs(w.wall),
            w.reports,
            w.rss_kib / 1024
        );
    }
}

fn memory(attach: &[Attach]) {
    println!();
    println!(
        "Kernel memory of fdtrace's FDS map (`bpftool map show --json`, bytes_memlock; on this \
         kernel a BPF_F_NO_PREALLOC hash map reports (element size + overhead) x live entries):"
    );
    for a in attach {
        let who = match a.procs {
            1 => "a process".to_string(),
            n => format!("{n} processes"),
        };
        match &a.map {
            Ok(m) => println!(
                "  tracing {who} with {:>7} fds: map id {} max_entries {}: {} bytes",
                a.proc_fds, m.id, m.max_entries, m.bytes_memlock
            ),
            Err(e) => println!(
                "  tracing {who} with {:>7} fds: unavailable: {e}",
                a.proc_fds
            ),
        }
    }
    let [big, small, ..] = attach else {
        return;
    };
    let (Ok(mb), Ok(ms)) = (&big.map, &small.map) else {
        println!("  per fd: unavailable");
        return;
    };
    println!(
        "  the fixed part (what the few-fd figure is almost all of) is the table's buckets, sized \
         by max_entries (--max-fds), not by use"
    );
    let dfd = big.proc_fds as f64 - small.proc_fds as f64;
    let dbytes = mb.bytes_memlock as f64 - ms.bytes_memlock as f64;
    if dfd <= 0.0 || dbytes <= 0.0 {
        println!(
            "  per fd: bytes_memlock did not grow with the fds ({} -> {} bytes): it does not \
             reflect usage here",
            ms.bytes_memlock, mb.bytes_memlock
        );
        return;
    }
    println!(
        "  per tracked fd: ({} - {}) bytes / ({} - {}) fds = {:.1} bytes",
        mb.bytes_memlock,
        ms.bytes_memlock,
        big.proc_fds,
        small.proc_fds,
        dbytes / dfd
    );
}
