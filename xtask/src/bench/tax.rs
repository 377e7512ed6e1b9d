//! The tax of whole-node tracing on real work: Debian's nginx serving a
//! small static file to wrk on loopback with `Connection: close` (an
//! accept, an open and two closes per request), and a fork+exec loop of a
//! parent holding 1000 fds (`fdloop forkexec`), each untraced, under
//! `fdtrace --all`, under `fdtrace --pid` of the workload (what tracing the
//! workload itself costs, not a node-wide figure) and under the heavier
//! bpftrace tracker run system-wide. Rounds interleave the conditions in an
//! order rotated per round; the report takes medians.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::child::{Proc, check_interrupted};
use super::node::{free_port, http_get, scratch_dir, start_fdtrace_all, verdict};
use super::{
    ATTACH_TIMEOUT, Bins, LOOP_TIMEOUT, STOP_GRACE, is_loop_line, median, parse_loop_line,
    start_fdtrace_with,
};

/// A leak tracker as a user would run it over a whole node: every live fd
/// from openat with its open time, a per-pid count of opens, deleted on
/// close (issue 11 section 4). BEGIN runs once every probe is attached.
pub const BPFTRACE_NODE_SCRIPT: &str = r#"
BEGIN { printf("ready\n"); }
tracepoint:syscalls:sys_exit_openat /args->ret >= 0/ { @live[pid, args->ret] = nsecs; @opens[pid] = count(); }
tracepoint:syscalls:sys_enter_close { delete(@live[pid, args->fd]); }
END { clear(@live); clear(@opens); }
"#;
/// Room for every live fd of a node in the tracker's map, as fdtrace's
/// default --max-fds (bpftrace's default of 4096 keys fills at once).
const BPFTRACE_MAP_KEYS: &str = "1048576";

/// The file nginx serves: a small static page.
const PAGE_BYTES: usize = 612;
/// wrk's connections and run length per measurement, and with --quick.
const WRK_CONNS: &str = "8";
const WRK_SECS: u64 = 5;
const QUICK_WRK_SECS: u64 = 2;
/// fork+exec iterations per run are sized for about this long untraced.
const FORK_TARGET: Duration = Duration::from_secs(2);
const QUICK_FORK_TARGET: Duration = Duration::from_millis(500);
/// The goal: fdtrace's loss at most this share of bpftrace's.
const GOAL_LOSS_SHARE: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaxCond {
    Untraced,
    FdtraceAll,
    FdtracePid,
    BpftraceAll,
}

impl TaxCond {
    const ALL: [TaxCond; 4] = [
        TaxCond::Untraced,
        TaxCond::FdtraceAll,
        TaxCond::FdtracePid,
        TaxCond::BpftraceAll,
    ];

    fn label(self) -> &'static str {
        match self {
            TaxCond::Untraced => "untraced",
            TaxCond::FdtraceAll => "fdtrace --all",
            TaxCond::FdtracePid => "fdtrace --pid",
            TaxCond::BpftraceAll => "bpftrace node-wide",
        }
    }
}

/// Rates per condition, one per round: nginx requests/s, fork+execs/s.
#[derive(Debug, Default)]
pub struct TaxFigures {
    pub rounds: u32,
    pub wrk_secs: u64,
    pub fork_iters: u64,
    pub nginx: BTreeMap<TaxCond, Vec<f64>>,
    pub fork: BTreeMap<TaxCond, Vec<f64>>,
    /// wrk's socket errors and non-2xx answers, summed, per condition.
    pub wrk_errors: BTreeMap<TaxCond, u64>,
    /// Why `fdtrace --all` could not run, if it could not.
    pub fdtrace_all: Option<String>,
}

/// Starts a tracer for `cond`; None for untraced. `pids` are the workload's
/// processes (for `fdtrace --pid`), `follow` adds `--follow`.
fn start_tracer(
    bins: &Bins,
    cond: TaxCond,
    pids: &[u32],
    follow: bool,
    all_failed: &mut Option<String>,
) -> Result<Option<Proc>> {
    match cond {
        TaxCond::Untraced => Ok(None),
        TaxCond::FdtraceAll => {
            if all_failed.is_some() {
                return Ok(None);
            }
            let args = ["--all", "--json", "--interval", "1s"].map(String::from);
            match start_fdtrace_all(bins, &args)? {
                Ok(p) => Ok(Some(p)),
                Err(why) => {
                    *all_failed = Some(why);
                    Ok(None)
                }
            }
        }
        TaxCond::FdtracePid => {
            let extra: &[&str] = if follow { &["--follow"] } else { &[] };
            Ok(Some(start_fdtrace_with(bins, extra, pids)?))
        }
        TaxCond::BpftraceAll => Ok(Some(start_bpftrace_node()?)),
    }
}

/// The node-wide bpftrace tracker, once its BEGIN line is out.
pub fn start_bpftrace_node() -> Result<Proc> {
    let mut cmd = Command::new("bpftrace");
    cmd.args(["-B", "line", "-e", BPFTRACE_NODE_SCRIPT])
        .env("BPFTRACE_MAP_KEYS_MAX", BPFTRACE_MAP_KEYS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut bt = Proc::spawn("bpftrace (node-wide)", &mut cmd)?;
    let ready = bt.stdout()?.wait_for(ATTACH_TIMEOUT, |l| l == "ready");
    ready.map_err(|e| bt.fail(format!("never attached: {e:#}")))?;
    Ok(bt)
}

fn stop(tracer: Option<Proc>) -> Result<()> {
    if let Some(mut t) = tracer {
        if !t.running()? {
            return Err(t.fail("exited during the measurement"));
        }
        t.stop(STOP_GRACE)?;
    }
    Ok(())
}

/// nginx from Debian's package, on 127.0.0.1 with its own config and files.
struct Nginx {
    proc: Proc,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    fn start() -> Result<Nginx> {
        let dir = scratch_dir("nginx")?;
        let www = dir.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("index.html"), "x".repeat(PAGE_BYTES))?;
        let port = free_port()?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&dir, port))?;
        // -e: the error log before the config is read (the compiled-in
        // /var/log/nginx may not exist).
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn("nginx", &mut cmd)?;
        let addr = ([127, 0, 0, 1], port).into();
        let mut tries = 0;
        while let Err(e) = http_get(addr, "/index.html") {
            check_interrupted()?;
            if !proc.running()? || tries > 100 {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                return Err(proc.fail(format!("does not serve: {e:#}; error.log:\n{log}")));
            }
            tries += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Nginx { proc, dir, port })
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.proc.pid();
        let mut pids = vec![master];
        let path = format!("/proc/{master}/task/{master}/children");
        let kids = std::fs::read_to_string(path).unwrap_or_default();
        pids.extend(
            kids.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
        pids
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.proc.stop(STOP_GRACE);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One worker (the loops are single-threaded too), no access log, temp
/// paths inside `dir`; as root the worker runs as nobody, so `dir` must be
/// world-readable (it is: 0755 from the default umask).
pub fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\n\
         daemon off;\n\
         master_process on;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n\
         }}\n"
    )
}

/// What wrk printed: requests/s, and socket errors plus non-2xx answers.
pub fn parse_wrk(out: &str) -> Result<(f64, u64)> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    let mut errors = 0;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok((rps, errors))
}

fn run_wrk(port: u16, secs: u64) -> Result<(f64, u64)> {
    let url = format!("http://127.0.0.1:{port}/index.html");
    let out = crate::proc::capture(Command::new("wrk").args([
        "-t1",
        "-c",
        WRK_CONNS,
        "-d",
        &format!("{secs}s"),
        "-H",
        "Connection: close",
        &url,
    ]))?;
    parse_wrk(&out)
}

/// `fdloop forkexec N` (with `--wait` when a tracer attaches to it first).
fn run_forkexec(
    bins: &Bins,
    n: u64,
    cond: TaxCond,
    all_failed: &mut Option<String>,
) -> Result<f64> {
    let attach = cond == TaxCond::FdtracePid;
    let mut cmd = super::fdloop_cmd(bins, "forkexec", n, attach);
    let mut lp = Proc::spawn("fdloop forkexec", &mut cmd)?;
    let tracer = if attach {
        let t = start_tracer(bins, cond, &[lp.pid()], true, all_failed)?;
        lp.poke()?;
        t
    } else {
        None
    };
    let line = lp.stdout()?.wait_for(LOOP_TIMEOUT, is_loop_line);
    let line = line.map_err(|e| lp.fail(format!("no result line: {e:#}")))?;
    lp.wait_ok(LOOP_TIMEOUT)?;
    if let Some(mut t) = tracer {
        // `fdtrace --pid` ends on its own once every process it traces has
        // (the loop, then its last child): it must have ended well.
        t.wait_ok(STOP_GRACE)?;
    }
    Ok(1e9 / parse_loop_line(&line)?.ns)
}

/// Every condition, `rounds` times, nginx then fork+exec under each.
pub fn measure(bins: &Bins, rounds: u32, quick: bool) -> Result<TaxFigures> {
    let wrk_secs = if quick { QUICK_WRK_SECS } else { WRK_SECS };
    let mut nginx = Nginx::start()?;
    // Sized on an untraced run; the warm-up run is not counted.
    let probe = 200;
    run_forkexec(bins, probe / 4, TaxCond::Untraced, &mut None)?;
    let rate = run_forkexec(bins, probe, TaxCond::Untraced, &mut None)?;
    let target = if quick {
        QUICK_FORK_TARGET
    } else {
        FORK_TARGET
    };
    let fork_iters = ((rate * target.as_secs_f64()) as u64).max(50);
    eprintln!(
        "bench: tax: fork+exec {rate:.0}/s untraced: {fork_iters} per run; nginx on port {}",
        nginx.port
    );
    let mut f = TaxFigures {
        rounds,
        wrk_secs,
        fork_iters,
        ..TaxFigures::default()
    };
    for round in 0..rounds {
        let mut order = TaxCond::ALL;
        order.rotate_left(round as usize % TaxCond::ALL.len());
        for cond in order {
            check_interrupted()?;
            if cond == TaxCond::FdtraceAll && f.fdtrace_all.is_some() {
                continue;
            }
            eprintln!("bench: tax round {}/{rounds}: {}", round + 1, cond.label());
            let tracer = start_tracer(bins, cond, &nginx.pids(), false, &mut f.fdtrace_all)?;
            if cond == TaxCond::FdtraceAll && tracer.is_none() {
                continue;
            }
            let (rps, errors) = run_wrk(nginx.port, wrk_secs)
                .with_context(|| format!("wrk under `{}`", cond.label()))?;
            f.nginx.entry(cond).or_default().push(rps);
            *f.wrk_errors.entry(cond).or_default() += errors;
            // `fdtrace --pid` attaches to the fork loop itself; the
            // node-wide tracers stay on for it.
            let fork_tracer = match cond {
                TaxCond::FdtracePid => {
                    stop(tracer)?;
                    None
                }
                _ => tracer,
            };
            let r = run_forkexec(bins, fork_iters, cond, &mut f.fdtrace_all)
                .with_context(|| format!("fork+exec under `{}`", cond.label()))?;
            f.fork.entry(cond).or_default().push(r);
            stop(fork_tracer)?;
        }
    }
    if !nginx.proc.running()? {
        bail!("nginx exited during the measurements");
    }
    Ok(f)
}

/// (traced - untraced) / untraced, as a loss in percent (positive = slower).
pub fn loss_pct(untraced: f64, traced: f64) -> f64 {
    100.0 * (untraced - traced) / untraced
}

pub fn print(f: &TaxFigures) {
    println!();
    println!(
        "=== tax of whole-node tracing on real work (medians over {} round(s), conditions \
         interleaved, order rotated per round) ===",
        f.rounds
    );
    println!(
        "nginx (Debian's, 1 worker, on 127.0.0.1): `wrk -t1 -c{WRK_CONNS} -d{}s -H 'Connection: \
         close'` for a {PAGE_BYTES}-byte file (an accept, an open and two closes per request); \
         fork+exec: `fdloop forkexec {}`, a parent holding 1000 close-on-exec fds forking and \
         exec'ing /bin/true and waiting for it. `fdtrace --pid` traces the workload's own \
         processes (nginx's; the fork loop with --follow): not a node-wide figure.",
        f.wrk_secs, f.fork_iters
    );
    println!(
        "bpftrace node-wide: the tracker below (@live[pid, fd] = nsecs on sys_exit_openat, a \
         per-pid count(), delete on sys_enter_close), every process."
    );
    for (what, unit, data) in [("nginx", "req/s", &f.nginx), ("fork+exec", "/s", &f.fork)] {
        let base = data.get(&TaxCond::Untraced).and_then(|v| median(v));
        for cond in TaxCond::ALL {
            let label = cond.label();
            let Some(m) = data.get(&cond).and_then(|v| median(v)) else {
                let why = match (cond, &f.fdtrace_all) {
                    (TaxCond::FdtraceAll, Some(why)) => format!("ERROR: {why}"),
                    _ => "no figure".into(),
                };
                println!("  {what:<10} {label:<19} {why}");
                continue;
            };
            let loss = match (cond, base) {
                (TaxCond::Untraced, _) | (_, None) => String::new(),
                (_, Some(b)) => format!("  loss {:+.1}%", loss_pct(b, m)),
            };
            let raw: Vec<String> = data[&cond].iter().map(|x| format!("{x:.0}")).collect();
            let errors = match (what, f.wrk_errors.get(&cond)) {
                ("nginx", Some(&e)) if e > 0 => format!("  ({e} wrk errors)"),
                _ => String::new(),
            };
            println!(
                "  {what:<10} {label:<19} {m:>10.0} {unit}{loss}{errors}   [rounds: {}]",
                raw.join(" ")
            );
        }
        let loss_of = |c| Some(loss_pct(base?, median(data.get(&c)?)?));
        let noise = data.get(&TaxCond::Untraced).and_then(|v| spread_pct(v));
        let goal = judge(
            loss_of(TaxCond::FdtraceAll),
            loss_of(TaxCond::BpftraceAll),
            noise,
        );
        let noise = noise.map_or("one round: no spread".into(), |n| {
            format!("untraced rounds spread +-{n:.1}%")
        });
        println!("  {what:<10} goal: {goal} ({noise})");
    }
}

/// Half the range of `xs` in percent of their median: the noise a loss is
/// read against (None for fewer than 2 rounds).
pub fn spread_pct(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let m = median(xs)?;
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(50.0 * (max - min) / m)
}

/// The goal's verdict from the two losses (in percent) and the noise: not
/// judged when bpftrace's loss is within the noise, as there is then no
/// loss to take half of.
pub fn judge(fdtrace: Option<f64>, bpftrace: Option<f64>, noise: Option<f64>) -> String {
    let (Some(ft), Some(bt)) = (fdtrace, bpftrace) else {
        return "not judged: no fdtrace --all figure".into();
    };
    if bt <= noise.unwrap_or(0.0) {
        return format!("not judged: bpftrace's loss {bt:+.1}% is within the noise");
    }
    format!(
        "fdtrace --all's loss <= {GOAL_LOSS_SHARE} x bpftrace's: {:.2} x: {}",
        ft / bt,
        verdict(ft <= GOAL_LOSS_SHARE * bt)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:8080/index.html\n\
            \x20 1 threads and 8 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency   520.11us  300.20us   9.00ms   90.00%\n\
            \x20 41234 requests in 5.00s, 33.10MB read\n\
            \x20 Socket errors: connect 2, read 3, write 0, timeout 1\n\
            \x20 Non-2xx or 3xx responses: 4\n\
            Requests/sec:   8246.55\n\
            Transfer/sec:      6.62MB\n";
        let (rps, errors) = parse_wrk(out).expect("parses");
        assert!((rps - 8246.55).abs() < 1e-9);
        assert_eq!(errors, 10);
        assert!(parse_wrk("Running 5s test\n").is_err());
        let clean = "Requests/sec: 100.5\n";
        assert_eq!(parse_wrk(clean).expect("parses").1, 0);
    }

    #[test]
    fn nginx_conf_stays_in_its_dir() {
        let c = nginx_conf(Path::new("/tmp/x"), 8081);
        assert!(c.contains("listen 127.0.0.1:8081;"));
        assert!(c.contains("root /tmp/x/www;"));
        assert!(c.contains("pid /tmp/x/nginx.pid;"));
        assert!(!c.contains("/var/"));
    }

    #[test]
    fn judges_against_the_noise() {
        assert_eq!(spread_pct(&[100.0]), None);
        let n = spread_pct(&[90.0, 100.0, 110.0]).expect("3 rounds");
        assert!((n - 10.0).abs() < 1e-9);
        assert!(judge(None, Some(20.0), Some(1.0)).contains("no fdtrace --all"));
        assert!(judge(Some(1.0), Some(5.0), Some(10.0)).contains("within the noise"));
        assert!(judge(Some(1.0), Some(-3.0), None).contains("within the noise"));
        assert!(judge(Some(5.0), Some(20.0), Some(10.0)).ends_with(": MET"));
        assert!(judge(Some(15.0), Some(20.0), Some(10.0)).ends_with("NOT MET"));
    }

    #[test]
    fn loss_is_relative_to_untraced() {
        assert!((loss_pct(1000.0, 900.0) - 10.0).abs() < 1e-9);
        assert!(loss_pct(1000.0, 1100.0) < 0.0);
    }
}
