//! What the `--metrics` endpoint costs, on the synthetic node of
//! [`super::node`]: `fdtrace --all` with and without `--metrics`, the
//! endpoint scraped once a second by a loop of HTTP GETs (what a Prometheus
//! with `scrape_interval: 1s` asks), in rounds that alternate the two: the
//! CPU of fdtrace's process per second of wall time, the scrape latency and
//! the size of a scrape. Then a run scraped ten times a second, whose
//! report interval shows whether a scrape ever holds a report back (the
//! scrape copies the last rendering; it must not).
//!
//! Both conditions print NDJSON, read and thrown away by the bench: the
//! reports' timestamps come from it, and the difference is the endpoint.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::child::check_interrupted;
use super::extras::cpu_time;
use super::node::{NodeProc, free_port, http_get, start_fdtrace_all, verdict};
use super::{Bins, STOP_GRACE, median};

/// After fdtrace's first line, before its CPU is counted (its start walks
/// every fd table of the host).
const WARMUP: Duration = Duration::from_secs(3);
/// Each run's measured window, and with --quick.
const WINDOW: Duration = Duration::from_secs(20);
const QUICK_WINDOW: Duration = Duration::from_secs(8);
/// fdtrace's report interval in every run.
const INTERVAL: Duration = Duration::from_secs(1);
/// The scrape interval of a Prometheus at `scrape_interval: 1s`, and the
/// fast one of the blocking check.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);
const FAST_SCRAPE_EVERY: Duration = Duration::from_millis(100);
/// A report later than this after the previous one is late.
const LATE: Duration = Duration::from_millis(1500);
/// The goal of issue 12, section 5: added CPU under 0.5% of a core.
const GOAL_ADDED_CORE_PCT: f64 = 0.5;

/// One run of `fdtrace --all`.
#[derive(Debug, Default)]
pub struct Run {
    /// fdtrace's utime+stime over the window, in % of a core.
    pub cpu_pct: f64,
    /// Seconds each answered scrape took.
    pub scrape_secs: Vec<f64>,
    pub scrape_errors: Vec<String>,
    /// The last answered scrape's body.
    pub last_body: String,
    /// Seconds between consecutive reports within the window.
    pub report_gaps: Vec<f64>,
}

/// Everything this section measured.
pub struct Figures {
    pub window: Duration,
    pub without: Vec<Run>,
    pub with: Vec<Run>,
    /// Scraped every [`FAST_SCRAPE_EVERY`].
    pub fast: Run,
    pub fdtrace_cmd: String,
}

/// `fdtrace --all --json --interval 1s`, plus `--metrics 127.0.0.1:PORT`.
fn args(metrics: Option<SocketAddr>) -> Vec<String> {
    let mut a: Vec<String> = ["--all", "--json", "--interval"].map(String::from).into();
    a.push(format!("{}s", INTERVAL.as_secs()));
    if let Some(addr) = metrics {
        a.push("--metrics".into());
        a.push(addr.to_string());
    }
    a
}

/// `rounds` rounds of a run without and one with `--metrics` (their order
/// alternating), then the fast-scrape run, over the running `node`.
pub fn measure(bins: &Bins, node: &[NodeProc], rounds: u32, quick: bool) -> Result<Figures> {
    let window = if quick { QUICK_WINDOW } else { WINDOW };
    eprintln!(
        "bench: metrics: {rounds} round(s) of fdtrace --all with and without --metrics over {} \
         processes, {window:?} each",
        node.len()
    );
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for metrics_first in [round % 2 == 0, round % 2 != 0] {
            check_interrupted()?;
            let scrape = metrics_first.then_some(SCRAPE_EVERY);
            eprintln!(
                "bench: metrics: round {}/{rounds}: {}",
                round + 1,
                if metrics_first { "with" } else { "without" }
            );
            let run = one_run(bins, scrape, window)?;
            if metrics_first {
                with.push(run);
            } else {
                without.push(run);
            }
        }
    }
    eprintln!("bench: metrics: scraped every {FAST_SCRAPE_EVERY:?} for {window:?}");
    let fast = one_run(bins, Some(FAST_SCRAPE_EVERY), window)?;
    Ok(Figures {
        window,
        without,
        with,
        fast,
        fdtrace_cmd: format!(
            "fdtrace {}",
            args(Some(([127, 0, 0, 1], 9464).into())).join(" ")
        ),
    })
}

/// One run of fdtrace over the node, scraped every `scrape` if given.
fn one_run(bins: &Bins, scrape: Option<Duration>, window: Duration) -> Result<Run> {
    let addr = match scrape {
        Some(_) => Some(SocketAddr::from(([127, 0, 0, 1], free_port()?))),
        None => None,
    };
    let mut ft = match start_fdtrace_all(bins, &args(addr))? {
        Ok(ft) => ft,
        Err(why) => bail!("{why}"),
    };
    let mut report_ts: Vec<f64> = Vec::new();
    let mut drain = |ft: &mut super::child::Proc, keep: bool| -> Result<()> {
        for line in ft.stdout()?.arrived() {
            if let Some(ts) = report_ts_of(&line)
                && keep
            {
                report_ts.push(ts);
            }
        }
        Ok(())
    };
    std::thread::sleep(WARMUP);
    drain(&mut ft, false)?;
    let cpu0 = cpu_time(ft.pid())?;
    let t0 = Instant::now();
    let mut run = Run::default();
    let mut next = t0;
    while t0.elapsed() < window {
        check_interrupted()?;
        if let (Some(addr), Some(every)) = (addr, scrape)
            && Instant::now() >= next
        {
            let t = Instant::now();
            match http_get(addr, "/metrics") {
                Ok(body) => {
                    run.scrape_secs.push(t.elapsed().as_secs_f64());
                    run.last_body = body;
                }
                Err(e) => run.scrape_errors.push(format!("{e:#}")),
            }
            next += every;
        }
        drain(&mut ft, true)?;
        let pause = match scrape {
            Some(_) => next.saturating_duration_since(Instant::now()),
            None => Duration::from_millis(50),
        };
        std::thread::sleep(pause.min(Duration::from_millis(50)));
    }
    let cpu = cpu_time(ft.pid())?.saturating_sub(cpu0);
    run.cpu_pct = 100.0 * cpu.as_secs_f64() / t0.elapsed().as_secs_f64();
    drain(&mut ft, true)?;
    if !ft.running()? {
        return Err(ft.fail("exited during the window"));
    }
    ft.stop(STOP_GRACE)?;
    run.report_gaps = gaps(&report_ts);
    Ok(run)
}

/// The report time of an NDJSON line: every report has a `container`
/// object per container or host cgroup, and the host always has one.
fn report_ts_of(line: &str) -> Option<f64> {
    if !line.starts_with(r#"{"type":"container""#) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("ts")?.as_f64()
}

/// The seconds between consecutive distinct report times.
pub fn gaps(ts: &[f64]) -> Vec<f64> {
    let mut t = ts.to_vec();
    t.sort_by(f64::total_cmp);
    t.dedup();
    t.windows(2).map(|w| w[1] - w[0]).collect()
}

/// The `q` quantile (0..1) of `xs`, nearest rank; None if empty.
pub fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len().max(1)) - 1).copied()
}

/// What one scrape holds: series (sample lines), families, bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Size {
    pub series: usize,
    pub families: usize,
    pub bytes: usize,
}

pub fn size(body: &str) -> Size {
    Size {
        series: body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count(),
        families: body.lines().filter(|l| l.starts_with("# TYPE ")).count(),
        bytes: body.len(),
    }
}

fn all(runs: &[Run], f: impl Fn(&Run) -> &[f64]) -> Vec<f64> {
    runs.iter().flat_map(|r| f(r).iter().copied()).collect()
}

fn ms(x: Option<f64>) -> String {
    x.map_or("-".into(), |s| format!("{:.2} ms", s * 1e3))
}

fn secs(x: Option<f64>) -> String {
    x.map_or("-".into(), |s| format!("{s:.3} s"))
}

fn late(gaps: &[f64]) -> usize {
    gaps.iter().filter(|&&g| g > LATE.as_secs_f64()).count()
}

/// The section of the report.
pub fn print(f: &Figures) {
    println!();
    println!(
        "=== --metrics: its cost on the node ({} round(s) of {:.0} s per condition, medians \
         across rounds) ===",
        f.with.len(),
        f.window.as_secs_f64()
    );
    println!(
        "`{}`, with --metrics scraped by a loop of HTTP GETs on loopback once a second, against \
         the same without --metrics. CPU is fdtrace's utime+stime per second of wall time; \
         latencies are wall clock on a shared machine (not final).",
        f.fdtrace_cmd
    );
    let cpu = |runs: &[Run]| median(&runs.iter().map(|r| r.cpu_pct).collect::<Vec<_>>());
    let (cw, co) = (cpu(&f.with), cpu(&f.without));
    let scrapes = all(&f.with, |r| &r.scrape_secs);
    let errors: usize = f.with.iter().map(|r| r.scrape_errors.len()).sum();
    let gaps_with = all(&f.with, |r| &r.report_gaps);
    let gaps_without = all(&f.without, |r| &r.report_gaps);
    let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.2}%"));
    println!(
        "  {:<26} {:>22} {:>26}",
        "", "without --metrics", "with, scraped 1/s"
    );
    println!(
        "  {:<26} {:>22} {:>26}",
        "CPU, % of a core",
        pct(co),
        pct(cw)
    );
    println!(
        "  {:<26} {:>22} {:>26}",
        "scrape latency median/p99",
        "-",
        format!(
            "{} / {}",
            ms(median(&scrapes)),
            ms(quantile(&scrapes, 0.99))
        )
    );
    let sz = f.with.iter().rev().find(|r| !r.last_body.is_empty());
    println!(
        "  {:<26} {:>22} {:>26}",
        "scrape size",
        "-",
        sz.map_or("-".into(), |r| {
            let s = size(&r.last_body);
            format!("{} series, {} B", s.series, s.bytes)
        })
    );
    println!(
        "  {:<26} {:>22} {:>26}",
        "report interval median/max",
        format!(
            "{} / {}",
            secs(median(&gaps_without)),
            secs(quantile(&gaps_without, 1.0))
        ),
        format!(
            "{} / {}",
            secs(median(&gaps_with)),
            secs(quantile(&gaps_with, 1.0))
        )
    );
    match (cw, co) {
        (Some(w), Some(o)) => println!(
            "  added CPU: {:+.2}% of a core (goal under {GOAL_ADDED_CORE_PCT}%: {}); {} scrapes, \
             {errors} failed",
            w - o,
            verdict(w - o < GOAL_ADDED_CORE_PCT),
            scrapes.len()
        ),
        _ => println!("  added CPU: not judged (a condition has no run)"),
    }
    if let Some(e) = f.with.iter().flat_map(|r| &r.scrape_errors).next() {
        println!("  first failed scrape: {e}");
    }
    let fast = &f.fast;
    let fast_late = late(&fast.report_gaps);
    println!(
        "  scraped every {} ms: {} scrapes ({} failed), latency median {} p99 {}; report interval \
         median {} max {}, {fast_late} of {} later than {:.1} s; CPU {:.2}% of a core; a scrape \
         never holds a report back: {}",
        FAST_SCRAPE_EVERY.as_millis(),
        fast.scrape_secs.len(),
        fast.scrape_errors.len(),
        ms(median(&fast.scrape_secs)),
        ms(quantile(&fast.scrape_secs, 0.99)),
        secs(median(&fast.report_gaps)),
        secs(quantile(&fast.report_gaps, 1.0)),
        fast.report_gaps.len(),
        LATE.as_secs_f64(),
        fast.cpu_pct,
        verdict(fast_late == 0 && fast.scrape_errors.is_empty() && !fast.report_gaps.is_empty())
    );
    if late(&gaps_without) > 0 {
        println!(
            "  (without --metrics, {} of {} report intervals were late too: the machine is busy)",
            late(&gaps_without),
            gaps_without.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_of_distinct_report_times() {
        assert_eq!(gaps(&[3.0, 1.0, 1.0, 2.5]), [1.5, 0.5]);
        assert!(gaps(&[1.0]).is_empty());
        assert!(gaps(&[]).is_empty());
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&xs, 0.99), Some(99.0));
        assert_eq!(quantile(&xs, 1.0), Some(100.0));
        assert_eq!(quantile(&xs, 0.5), Some(50.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
        assert_eq!(quantile(&[], 0.99), None);
    }

    #[test]
    fn a_scrapes_size() {
        let body = "# HELP a x\n# TYPE a gauge\na{b=\"c\"} 1\na{b=\"d\"} 2\n# EOF\n";
        assert_eq!(
            size(body),
            Size {
                series: 2,
                families: 1,
                bytes: body.len()
            }
        );
    }

    #[test]
    fn report_times_from_container_objects_only() {
        let c = r#"{"type":"container","ts":100.5,"cgroup":"/"}"#;
        assert_eq!(report_ts_of(c), Some(100.5));
        assert_eq!(report_ts_of(r#"{"type":"process","ts":100.5}"#), None);
        assert_eq!(report_ts_of(r#"{"type":"container""#), None);
    }
}
