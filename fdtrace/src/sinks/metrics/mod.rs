//! `--metrics ADDR`: the figures of the last report as OpenMetrics text on
//! `/metrics`, and `/healthz`. At each report the sink renders a fresh
//! registry from the report alone (its containers, processes, sites and
//! session counts: nothing is added up here) and swaps the text in: a
//! scrape copies a pointer under a lock held for that copy only, so it
//! never waits for a report, never blocks one, and never reads /proc; the
//! series of a process or container that is gone simply are not in the
//! next rendering.
mod model;
mod server;

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::body::Bytes;
use prometheus_client::{
    encoding::{EncodeMetric, text::encode},
    metrics::{TypedMetric, counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use model::{ContainerLabels, SITES_PER_PROCESS, bounded, sites_wanted, user_function};

use super::Sink;
use crate::analysis::{ContainerReport, Notice, ProcessReport, Report, Start, Status, Summary};

/// The statuses each process has one `fdtrace_process_status` series of.
const STATUSES: [Status; 4] = [
    Status::Ok,
    Status::Warning,
    Status::Critical,
    Status::Exhausted,
];

/// What the server reads: the last rendering and when it was made.
struct Shared {
    exposition: Bytes,
    /// The last report, or the start of tracing before the first one; None
    /// while fdtrace attaches (the server answers from before then).
    last: Option<Instant>,
}

type SharedState = Arc<Mutex<Shared>>;

/// The per-process bound (`--metrics-top-processes`,
/// `--metrics-max-processes`).
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub top: usize,
    pub max: usize,
}

pub struct Metrics {
    shared: SharedState,
    bounds: Bounds,
}

impl Metrics {
    /// Binds `addr` (exactly that address) and serves it from a thread of
    /// its own. An address in use is an error naming it.
    pub fn serve(addr: SocketAddr, interval: Duration, bounds: Bounds) -> io::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared {
            exposition: Bytes::new(),
            last: None,
        }));
        server::spawn(addr, interval, shared.clone())?;
        Ok(Metrics::new(shared, bounds))
    }

    fn new(shared: SharedState, bounds: Bounds) -> Self {
        // A scrape before the first report sees fdtrace's own families.
        let text = render(&Report::default(), bounds, Duration::ZERO);
        shared.lock().unwrap_or_else(|e| e.into_inner()).exposition = Bytes::from(text);
        Metrics { shared, bounds }
    }

    /// The exposition of a report, and reports running.
    fn publish(&self, text: String) {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.exposition = Bytes::from(text);
        s.last = Some(Instant::now());
    }
}

/// The exposition of one report; `took` is how long the report took.
fn render(report: &Report, bounds: Bounds, took: Duration) -> String {
    let mut reg = Registry::default();
    render_containers(&mut reg, &report.containers);
    render_processes(&mut reg, report, bounds);
    render_own(&mut reg, report, took);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

fn render_containers(reg: &mut Registry, containers: &[ContainerReport]) {
    let open = family::<Gauge>(
        reg,
        "fdtrace_container_open_fds",
        "Open fds of the container's traced processes",
    );
    let procs = family::<Gauge>(
        reg,
        "fdtrace_container_processes",
        "Traced processes of the container",
    );
    let ratio = family::<GaugeF>(
        reg,
        "fdtrace_container_fd_usage_ratio",
        "The worst open fds / soft RLIMIT_NOFILE of the container's processes, 0..1",
    );
    let leak = family::<GaugeF>(
        reg,
        "fdtrace_container_leak_rate_fds_per_second",
        "Net growth of the container's leak-candidate fds, summed over its processes",
    );
    let secs = family::<GaugeF>(
        reg,
        "fdtrace_container_seconds_to_emfile",
        "Forecast seconds until the first of the container's processes hits EMFILE; absent when none leaks",
    );
    // prometheus-client adds the _total of counters.
    let opened = family::<Counter>(
        reg,
        "fdtrace_container_fds_opened",
        "Fds opened by the container's processes, exited ones included",
    );
    let closed = family::<Counter>(
        reg,
        "fdtrace_container_fds_closed",
        "Fds closed by the container's processes, exited ones included",
    );
    let emfile = family::<Counter>(
        reg,
        "fdtrace_container_emfile_errors",
        "Calls of the container's processes that failed with EMFILE, exited ones included",
    );
    let cw = family::<Gauge>(
        reg,
        "fdtrace_container_close_wait_sockets",
        "Sockets of the container in CLOSE_WAIT",
    );
    for c in containers {
        let l = ContainerLabels::of_container(c).pairs().to_vec();
        open.get_or_create(&l).set(gauge_i(c.open_fds));
        procs.get_or_create(&l).set(gauge_i(c.processes));
        // No process with a limit: nothing is near one.
        ratio.get_or_create(&l).set(c.fd_usage_ratio.unwrap_or(0.0));
        leak.get_or_create(&l).set(c.leak_per_s);
        if let Some(s) = c.seconds_to_emfile {
            secs.get_or_create(&l).set(s);
        }
        opened.get_or_create(&l).inc_by(c.opened);
        closed.get_or_create(&l).inc_by(c.closed);
        emfile.get_or_create(&l).inc_by(c.emfile);
        cw.get_or_create(&l).set(gauge_i(c.close_wait));
    }
}

fn render_processes(reg: &mut Registry, report: &Report, bounds: Bounds) {
    let open = family::<Gauge>(reg, "fdtrace_process_open_fds", "Open fds of the process");
    let soft = family::<Gauge>(
        reg,
        "fdtrace_process_fd_soft_limit",
        "Soft RLIMIT_NOFILE; absent when unlimited",
    );
    let hard = family::<Gauge>(
        reg,
        "fdtrace_process_fd_hard_limit",
        "Hard RLIMIT_NOFILE; absent when unlimited",
    );
    let leak = family::<GaugeF>(
        reg,
        "fdtrace_process_leak_rate_fds_per_second",
        "Net growth of the process's leak-candidate fds",
    );
    let secs = family::<GaugeF>(
        reg,
        "fdtrace_process_seconds_to_emfile",
        "Forecast seconds until the process hits EMFILE; absent when it does not leak",
    );
    let status = family::<Gauge>(
        reg,
        "fdtrace_process_status",
        "1 for the process's status, 0 for the others",
    );
    let site_open = family::<Gauge>(
        reg,
        "fdtrace_site_open_fds",
        "Open fds created at the call site",
    );
    let site_leak = family::<GaugeF>(
        reg,
        "fdtrace_site_leak_rate_fds_per_second",
        "Net growth of the call site's fds",
    );

    // Each process carries its container's labels.
    let containers: HashMap<u32, ContainerLabels> = report
        .containers
        .iter()
        .flat_map(|c| {
            let l = ContainerLabels::of_container(c);
            c.pids.iter().map(move |&pid| (pid, l.clone()))
        })
        .collect();
    let labels_of = |p: &ProcessReport| {
        let f = &p.figures;
        containers
            .get(&f.pid)
            .cloned()
            .unwrap_or_else(|| ContainerLabels::of_process(&f.attribution))
            .pairs()
    };
    let by_pid: HashMap<u32, &ProcessReport> = report
        .processes
        .iter()
        .map(|p| (p.figures.pid, p))
        .collect();

    let figures = report.processes.iter().map(|p| &p.figures);
    for f in bounded(figures, bounds.top, bounds.max) {
        let mut l = vec![("pid", f.pid.to_string()), ("comm", f.comm.clone())];
        l.extend(labels_of(by_pid[&f.pid]));
        open.get_or_create(&l).set(gauge_i(f.open_fds));
        if let Some(s) = f.soft_limit {
            soft.get_or_create(&l).set(gauge_i(s));
        }
        if let Some(h) = f.hard_limit {
            hard.get_or_create(&l).set(gauge_i(h));
        }
        leak.get_or_create(&l).set(f.leak_per_s);
        if let Some(s) = f.seconds_to_emfile {
            secs.get_or_create(&l).set(s);
        }
        for st in STATUSES {
            let mut sl = l.clone();
            sl.push(("status", st.name().to_string()));
            status.get_or_create(&sl).set(i64::from(st == f.status));
        }
    }

    // Sites: the processes with a leak finding or worse than ok, worst
    // first, as many as the per-process series may be (all of them wanted,
    // the ok ones with a leak finding too).
    let wanted = report
        .processes
        .iter()
        .filter(|p| sites_wanted(p))
        .map(|p| &p.figures);
    for f in bounded(wanted, bounds.max, bounds.max) {
        let p = by_pid[&f.pid];
        let mut base = vec![("pid", f.pid.to_string())];
        base.extend(labels_of(p));
        for s in p.sites.iter().take(SITES_PER_PROCESS) {
            let mut l = base.clone();
            l.push(("kind", s.kind.name().to_string()));
            l.push(("resource", s.resource.to_string()));
            // A Python site's user frame is the user's own code; a native
            // stack's first frame of the program's own code otherwise.
            let function = match s.python.as_ref().and_then(|p| p.user_frame.as_deref()) {
                Some(f) => f,
                None => user_function(&s.stack),
            };
            l.push(("function", function.to_string()));
            site_open.get_or_create(&l).set(gauge_i(s.open_fds));
            site_leak.get_or_create(&l).set(s.leak_per_s);
        }
    }
}

fn render_own(reg: &mut Registry, report: &Report, took: Duration) {
    let counts = &report.counts;
    let traced = Gauge::<i64>::default();
    traced.set(gauge_i(report.processes.len() as u64));
    reg.register(
        "fdtrace_traced_processes",
        "Processes traced at the last report",
        traced,
    );
    let lost = Counter::<u64>::default();
    lost.inc_by(counts.lost_events);
    reg.register(
        "fdtrace_lost_events",
        "Kernel events dropped because the ring buffer was full",
        lost,
    );
    let full = family::<Counter>(
        reg,
        "fdtrace_map_full",
        "Fds or processes not tracked because the kernel map was full",
    );
    for (map, n) in [
        ("fds", counts.fds_map_full),
        ("procs", counts.procs_map_full),
    ] {
        full.get_or_create(&vec![("map", map.to_string())])
            .inc_by(n);
    }
    let drift = Counter::<u64>::default();
    drift.inc_by(counts.drift_resyncs);
    reg.register(
        "fdtrace_drift_resyncs",
        "Processes resynced with /proc/PID/fd after a confirmed count difference",
        drift,
    );
    let dur = GaugeF::default();
    dur.set(took.as_secs_f64());
    reg.register(
        "fdtrace_report_duration_seconds",
        "How long the last report took",
        dur,
    );
    let ts = GaugeF::default();
    ts.set(report.ts);
    reg.register(
        "fdtrace_last_report_timestamp_seconds",
        "Unix time of the last report (0 before the first)",
        ts,
    );
    reg.register(
        "fdtrace_build",
        "fdtrace's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_string())]),
    );
}

type Labels = Vec<(&'static str, String)>;
type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

/// A labelled family registered under `name`.
fn family<M>(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, M>
where
    M: EncodeMetric + TypedMetric + Default + Clone + Send + Sync + std::fmt::Debug + 'static,
{
    let f = Family::<Labels, M>::default();
    reg.register(name, help, f.clone());
    f
}

/// A count as an integer gauge (saturating: an i64 holds any real count).
fn gauge_i(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Sink for Metrics {
    /// Every process is attached: tracing has begun, and `/healthz`
    /// answers 200 from now on while reports run.
    fn start(&mut self, _: &Start) -> io::Result<()> {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.last = Some(Instant::now());
        Ok(())
    }

    fn notice(&mut self, _: &Notice) -> io::Result<()> {
        Ok(())
    }

    fn report(&mut self, report: &Report) -> io::Result<()> {
        // From the report's start (its ts, to the millisecond) to now, unrounded.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(report.ts, |d| d.as_secs_f64());
        let took = Duration::from_secs_f64((now - report.ts).max(0.0));
        self.publish(render(report, self.bounds, took));
        Ok(())
    }

    fn summary(&mut self, _: &Summary) -> io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, rc::Rc};

    use fdtrace_common::FdKind;

    use super::*;
    use crate::analysis::{
        Attribution, Containers, Loss, ProcessFigures, SessionCounts, SiteReport, Totals,
    };

    const BOUNDS: Bounds = Bounds { top: 20, max: 200 };

    /// The server answers while fdtrace still attaches (it binds first):
    /// /healthz says 503 until tracing has begun.
    #[test]
    fn healthz_waits_for_tracing_to_begin() {
        let shared = Arc::new(Mutex::new(Shared {
            exposition: Bytes::new(),
            last: None,
        }));
        let mut m = Metrics::new(shared.clone(), BOUNDS);
        let healthy = || {
            let last = shared.lock().unwrap().last;
            model::healthy(last, Instant::now(), Duration::from_secs(1))
        };
        assert!(!healthy(), "not while attaching");
        assert!(
            !shared.lock().unwrap().exposition.is_empty(),
            "fdtrace's own families from the start"
        );
        m.report(&Report::default()).unwrap();
        assert!(healthy(), "reports run");
    }

    /// The sample lines of `name` (exactly that metric name).
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
            })
            .collect()
    }

    fn site(resource: &str, open: u64, rate: f64, stack: &[&str]) -> SiteReport {
        SiteReport {
            id: resource.into(),
            kind: FdKind::Socket,
            resource: resource.into(),
            stack: Rc::new(stack.iter().map(|s| s.to_string()).collect()),
            open_fds: open,
            leak_per_s: rate,
            oldest_age_s: 1.0,
            python: None,
        }
    }

    fn attribution(cgroup: &str, pod: Option<(&str, &str, &str, String)>) -> Rc<Attribution> {
        let mut a = Attribution {
            cgroup: Some(cgroup.into()),
            ..Default::default()
        };
        if let Some((ns, pod, container, id)) = pod {
            a.namespace = Some(ns.into());
            a.pod = Some(pod.into());
            a.container = Some(container.into());
            a.container_id = Some(id);
        }
        Rc::new(a)
    }

    fn cart() -> Rc<Attribution> {
        attribution(
            "/kubepods.slice/x",
            Some(("shop", "cart-7f", "app", "ab".repeat(32))),
        )
    }

    /// The processes of `two`: a critical leaker in a pod, a healthy
    /// process outside any container.
    fn two_processes() -> Vec<ProcessReport> {
        let mut leaker = ProcessFigures::example(10, 300, Status::Critical);
        leaker.attribution = cart();
        leaker.comm = "say \"hi\"\n".into();
        leaker.leak_per_s = 4.0;
        leaker.seconds_to_emfile = Some(25.0);
        let mut r = ProcessReport::of(leaker);
        r.sites = (0..7)
            .map(|i| {
                site(
                    &format!("tcp 10.0.0.{i}:443"),
                    40 - i,
                    1.0 - i as f64 / 10.0,
                    &["connect", "dial (/srv/cart/net.go:42)"],
                )
            })
            .collect();
        let mut nginx = ProcessFigures::example(20, 12, Status::Ok);
        nginx.attribution = attribution("/system.slice/nginx.service", None);
        vec![r, ProcessReport::of(nginx)]
    }

    /// A report of `processes`, its containers made by the analysis.
    fn report_of(c: &mut Containers, ts: f64, processes: Vec<ProcessReport>) -> Report {
        Report {
            ts,
            losses: Vec::new(),
            counts: SessionCounts::default(),
            containers: c.report(ts, &processes),
            processes,
        }
    }

    fn two() -> Report {
        let mut r = report_of(&mut Containers::default(), 1000.5, two_processes());
        r.losses = vec![
            Loss::RingBuffer { count: 3 },
            Loss::FdsMapFull {
                count: 2,
                max_entries: 8,
            },
        ];
        r.counts.add(&r.losses, &r.processes);
        r
    }

    fn text(r: &Report, bounds: Bounds) -> String {
        render(r, bounds, Duration::from_millis(12))
    }

    #[test]
    fn every_family_of_the_issue_with_its_labels() {
        let t = text(&two(), BOUNDS);
        let types: BTreeSet<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        let want: BTreeSet<&str> = [
            "fdtrace_container_open_fds gauge",
            "fdtrace_container_processes gauge",
            "fdtrace_container_fd_usage_ratio gauge",
            "fdtrace_container_leak_rate_fds_per_second gauge",
            "fdtrace_container_seconds_to_emfile gauge",
            "fdtrace_container_fds_opened counter",
            "fdtrace_container_fds_closed counter",
            "fdtrace_container_emfile_errors counter",
            "fdtrace_container_close_wait_sockets gauge",
            "fdtrace_process_open_fds gauge",
            "fdtrace_process_fd_soft_limit gauge",
            "fdtrace_process_fd_hard_limit gauge",
            "fdtrace_process_leak_rate_fds_per_second gauge",
            "fdtrace_process_seconds_to_emfile gauge",
            "fdtrace_process_status gauge",
            "fdtrace_site_open_fds gauge",
            "fdtrace_site_leak_rate_fds_per_second gauge",
            "fdtrace_traced_processes gauge",
            "fdtrace_lost_events counter",
            "fdtrace_map_full counter",
            "fdtrace_drift_resyncs counter",
            "fdtrace_report_duration_seconds gauge",
            "fdtrace_last_report_timestamp_seconds gauge",
            "fdtrace_build info",
        ]
        .into();
        assert_eq!(types, want);
        assert!(t.ends_with("# EOF\n"));
        let pod = format!(
            r#"namespace="shop",pod="cart-7f",container="app",container_id="{}",cgroup="/kubepods.slice/x""#,
            "ab".repeat(32)
        );
        let host = r#"namespace="",pod="",container="",container_id="",cgroup="/system.slice/nginx.service""#;
        // Series order is not part of the exposition's meaning.
        let mut got = samples(&t, "fdtrace_container_open_fds");
        got.sort_unstable();
        let mut want = [
            format!("fdtrace_container_open_fds{{{pod}}} 300"),
            format!("fdtrace_container_open_fds{{{host}}} 12"),
        ];
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(
            samples(&t, "fdtrace_container_seconds_to_emfile"),
            [format!("fdtrace_container_seconds_to_emfile{{{pod}}} 25.0")],
            "absent for the container that does not leak"
        );
        assert!(t.contains(&format!(
            "fdtrace_container_fd_usage_ratio{{{pod}}} {}\n",
            300.0 / 1024.0
        )));
        assert!(t.contains(&format!(
            "fdtrace_container_fds_opened_total{{{pod}}} 300\n"
        )));
        let mut got = samples(&t, "fdtrace_container_emfile_errors_total");
        got.sort_unstable();
        let mut want = [
            format!("fdtrace_container_emfile_errors_total{{{pod}}} 0"),
            format!("fdtrace_container_emfile_errors_total{{{host}}} 0"),
        ];
        want.sort_unstable();
        assert_eq!(got, want, "from the first report, at 0");
        // prometheus-client escapes the quotes and the newline of a comm.
        let leaker = format!(r#"pid="10",comm="say \"hi\"\n",{pod}"#);
        assert!(
            t.contains(&format!("fdtrace_process_open_fds{{{leaker}}} 300\n")),
            "{t}"
        );
        assert!(t.contains(&format!("fdtrace_process_fd_soft_limit{{{leaker}}} 1024\n")));
        assert!(t.contains(&format!("fdtrace_process_fd_hard_limit{{{leaker}}} 4096\n")));
        assert!(t.contains(&format!(
            "fdtrace_process_leak_rate_fds_per_second{{{leaker}}} 4.0\n"
        )));
        assert!(t.contains(&format!(
            "fdtrace_process_seconds_to_emfile{{{leaker}}} 25.0\n"
        )));
        assert_eq!(samples(&t, "fdtrace_process_seconds_to_emfile").len(), 1);
        let status = samples(&t, "fdtrace_process_status");
        assert_eq!(status.len(), 8, "4 statuses of 2 processes");
        for (st, v) in [("ok", 0), ("warning", 0), ("critical", 1), ("exhausted", 0)] {
            let line = format!(r#"fdtrace_process_status{{{leaker},status="{st}"}} {v}"#);
            assert!(status.contains(&line.as_str()), "{line}");
        }
        // Sites: the top 5 of the critical process only, with the function.
        let sites = samples(&t, "fdtrace_site_open_fds");
        assert_eq!(sites.len(), 5, "{sites:?}");
        assert!(sites.contains(
            &format!(r#"fdtrace_site_open_fds{{pid="10",{pod},kind="socket",resource="tcp 10.0.0.0:443",function="dial (/srv/cart/net.go:42)"}} 40"#).as_str()
        ), "{sites:?}");
        assert!(
            !t.contains("10.0.0.5:443"),
            "the sixth site is not exported"
        );
        assert_eq!(
            samples(&t, "fdtrace_site_leak_rate_fds_per_second").len(),
            5
        );
        // Its own families.
        assert!(t.contains("fdtrace_lost_events_total 3\n"));
        assert!(t.contains("fdtrace_map_full_total{map=\"fds\"} 2\n"));
        assert!(t.contains("fdtrace_map_full_total{map=\"procs\"} 0\n"));
        assert!(t.contains("fdtrace_drift_resyncs_total 0\n"));
        assert!(t.contains("fdtrace_traced_processes 2\n"));
        assert!(t.contains("fdtrace_report_duration_seconds 0.012\n"));
        assert!(t.contains("fdtrace_last_report_timestamp_seconds 1000.5\n"));
        assert!(t.contains(&format!(
            "fdtrace_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn a_process_in_a_sub_cgroup_carries_its_containers_labels() {
        let mut ps = two_processes();
        // A worker the container's init moved into a cgroup of its own.
        let mut worker = ProcessFigures::example(11, 5, Status::Warning);
        let mut a = (*cart()).clone();
        a.cgroup = Some("/kubepods.slice/x/worker".into());
        worker.attribution = Rc::new(a);
        let mut w = ProcessReport::of(worker);
        w.sites = vec![site("tcp 10.9.9.9:80", 3, 0.5, &[])];
        ps.push(w);
        let t = text(&report_of(&mut Containers::default(), 1.0, ps), BOUNDS);
        assert_eq!(samples(&t, "fdtrace_container_processes").len(), 2);
        let line = samples(&t, "fdtrace_process_open_fds")
            .into_iter()
            .find(|l| l.contains(r#"pid="11""#))
            .expect("the worker's series");
        assert!(line.contains(r#"cgroup="/kubepods.slice/x"}"#), "{line}");
        // Its site, for the rules' {instance, cgroup} lookup, likewise;
        // with no frame of the program's own code, an empty function.
        assert!(
            samples(&t, "fdtrace_site_open_fds").iter().any(|l| l.contains(r#"pid="11""#)
                && l.contains(r#"cgroup="/kubepods.slice/x",kind="socket",resource="tcp 10.9.9.9:80",function="""#)),
            "{t}"
        );
    }

    #[test]
    fn container_counters_keep_exited_processes_and_never_go_down() {
        let mut c = Containers::default();
        let mut ps = two_processes();
        let mut helper = ProcessFigures::example(12, 4, Status::Ok);
        helper.attribution = cart();
        helper.opened = 50;
        helper.closed = 46;
        ps.push(ProcessReport::of(helper));
        let first = text(&report_of(&mut c, 1.0, ps), BOUNDS);
        let pod = format!(
            r#"namespace="shop",pod="cart-7f",container="app",container_id="{}",cgroup="/kubepods.slice/x""#,
            "ab".repeat(32)
        );
        assert!(first.contains(&format!(
            "fdtrace_container_fds_opened_total{{{pod}}} 350\n"
        )));
        // The helper opens 10 more, hits EMFILE twice, and exits between
        // two reports.
        c.fd_error(12, &cart(), crate::analysis::Errno::Emfile);
        c.fd_error(12, &cart(), crate::analysis::Errno::Emfile);
        c.exited(
            12,
            &cart(),
            Totals {
                open_fds: 0,
                opened: 60,
                closed: 60,
            },
        );
        let t = text(&report_of(&mut c, 2.0, two_processes()), BOUNDS);
        assert!(
            t.contains(&format!(
                "fdtrace_container_fds_opened_total{{{pod}}} 360\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!("fdtrace_container_fds_closed_total{{{pod}}} 60\n")),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "fdtrace_container_emfile_errors_total{{{pod}}} 2\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!("fdtrace_container_processes{{{pod}}} 1\n")),
            "{t}"
        );
        assert!(!t.contains(r#"pid="12""#));
    }

    #[test]
    fn series_of_a_gone_process_and_container_go_at_the_next_report() {
        let mut c = Containers::default();
        let mut r = report_of(&mut c, 1.0, two_processes());
        r.counts.lost_events = 3;
        assert!(text(&r, BOUNDS).contains(r#"pid="10""#));
        c.exited(10, &cart(), Totals::default());
        let mut ps = two_processes();
        ps.remove(0);
        let mut r = report_of(&mut c, 2.0, ps);
        r.counts.lost_events = 3;
        let t = text(&r, BOUNDS);
        assert!(!t.contains(r#"pid="10""#), "{t}");
        assert!(!t.contains("cart-7f"), "{t}");
        assert_eq!(samples(&t, "fdtrace_container_open_fds").len(), 1);
        // Counters of fdtrace itself are the session's, not the report's.
        assert!(t.contains("fdtrace_lost_events_total 3\n"));
    }

    #[test]
    fn per_process_series_bounded() {
        let t = text(&two(), Bounds { top: 1, max: 1 });
        assert_eq!(samples(&t, "fdtrace_process_open_fds").len(), 1);
        assert!(samples(&t, "fdtrace_process_open_fds")[0].contains(r#"pid="10""#));
        // The containers keep every process.
        assert_eq!(samples(&t, "fdtrace_container_processes").len(), 2);
        // 100 healthy processes, 3 not ok, top 5, max 4: the 4 worst, then
        // their sites only.
        let mut ps: Vec<ProcessReport> = (1..=100)
            .map(|pid| {
                let mut r = ProcessReport::of(ProcessFigures::example(pid, pid.into(), Status::Ok));
                r.sites = vec![site("pipe", 1, 1.0, &[])];
                r
            })
            .collect();
        for (i, st) in [
            (0, Status::Warning),
            (1, Status::Critical),
            (2, Status::Exhausted),
        ] {
            ps[i].figures.status = st;
        }
        let r = report_of(&mut Containers::default(), 1.0, ps);
        let t = text(&r, Bounds { top: 5, max: 4 });
        let pids: BTreeSet<&str> = samples(&t, "fdtrace_process_open_fds")
            .iter()
            .map(|l| l.split('"').nth(1).unwrap())
            .collect();
        assert_eq!(pids, ["1", "100", "2", "3", "99"].into(), "top 5 by risk");
        let site_pids: BTreeSet<&str> = samples(&t, "fdtrace_site_open_fds")
            .iter()
            .map(|l| l.split('"').nth(1).unwrap())
            .collect();
        assert_eq!(site_pids, ["1", "2", "3"].into(), "the not-ok ones");
        let t = text(&r, Bounds { top: 0, max: 2 });
        assert_eq!(samples(&t, "fdtrace_process_open_fds").len(), 2);
        assert_eq!(samples(&t, "fdtrace_site_open_fds").len(), 2);
    }

    #[test]
    fn a_leak_finding_names_the_sites_of_a_process_still_ok() {
        let mut ps = two_processes();
        ps[1].sites = vec![site("/var/log/app.N.log", 9, 0.01, &[])];
        let t = text(
            &report_of(&mut Containers::default(), 1.0, ps.clone()),
            BOUNDS,
        );
        assert!(!t.contains("app.N.log"));
        ps[1].leak_found = true;
        let t = text(&report_of(&mut Containers::default(), 1.0, ps), BOUNDS);
        assert!(t.contains(r#"pid="20",namespace="",pod="",container="",container_id="",cgroup="/system.slice/nginx.service",kind="socket",resource="/var/log/app.N.log",function=""} 9"#), "{t}");
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        // What another process controls: its comm, the paths it opens, the
        // names in its stack. fdtrace's text is already lossless (`\xNN`
        // for bytes that are not UTF-8); the exposition escapes `\`, `"`
        // and newlines, so no value can end its label or its line.
        let mut ps = two_processes();
        ps[0].figures.comm = "a\\\"} 1\nfake 2".into();
        ps[0].sites = vec![site(
            "/tmp/x\"} 9\n\\xff\u{202e}",
            1,
            1.0,
            &["evil\"} (/srv/a\nb.c:1)"],
        )];
        let t = text(&report_of(&mut Containers::default(), 1.0, ps), BOUNDS);
        assert!(t.contains(r#"comm="a\\\"} 1\nfake 2""#), "{t}");
        assert!(t.contains(r#"resource="/tmp/x\"} 9\n\\xff"#), "{t}");
        assert!(t.contains(r#"function="evil\"} (/srv/a\nb.c:1)""#), "{t}");
        // Every line is a comment or a sample of a family fdtrace makes.
        for l in t.lines() {
            assert!(l.starts_with("# ") || l.starts_with("fdtrace_"), "{l:?}");
        }
    }

    #[test]
    fn before_the_first_report_only_fdtraces_own_series() {
        let t = text(&Report::default(), BOUNDS);
        assert!(samples(&t, "fdtrace_container_open_fds").is_empty());
        assert!(samples(&t, "fdtrace_process_open_fds").is_empty());
        assert!(t.contains("fdtrace_traced_processes 0\n"));
        assert!(t.contains("fdtrace_lost_events_total 0\n"));
        assert!(t.contains("fdtrace_last_report_timestamp_seconds 0.0\n"));
    }
}
