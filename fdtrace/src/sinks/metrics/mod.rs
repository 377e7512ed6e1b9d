//! `--metrics ADDR`: the figures of the last report as OpenMetrics text on
//! `/metrics`, and `/healthz`. At each report the sink renders a fresh
//! registry and swaps the text in: a scrape copies a pointer under a lock
//! held for that copy only, so it never waits for a report, never blocks
//! one, and never reads /proc; the series of a process or container that is
//! gone simply are not in the next rendering.
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

pub use model::ContainerLabels;
use model::{ContainerFigures, SITES_PER_PROCESS, Tracker, bounded, user_function};

use super::Sink;
use crate::analysis::{
    Errno, FindingKind, Loss, Notice, ProcessReport, Report, Resync, Start, Status, Summary,
};

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
    /// The last report, or the start before the first one.
    last: Instant,
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
    tracker: Tracker,
    lost_events: u64,
    map_full: [u64; 2],
    drift_resyncs: u64,
}

impl Metrics {
    /// Binds `addr` (exactly that address) and serves it on the current
    /// tokio runtime. An address in use is an error naming it.
    pub fn serve(addr: SocketAddr, interval: Duration, bounds: Bounds) -> io::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared {
            exposition: Bytes::new(),
            last: Instant::now(),
        }));
        server::spawn(addr, interval, shared.clone())?;
        Ok(Metrics::new(shared, bounds))
    }

    fn new(shared: SharedState, bounds: Bounds) -> Self {
        let mut m = Metrics {
            shared,
            bounds,
            tracker: Tracker::default(),
            lost_events: 0,
            map_full: [0; 2],
            drift_resyncs: 0,
        };
        // A scrape before the first report sees fdtrace's own families.
        m.publish(&Report::default(), &[], Duration::ZERO);
        m
    }

    fn publish(&mut self, report: &Report, containers: &[ContainerFigures], took: Duration) {
        let text = self.render(report, containers, took);
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.exposition = Bytes::from(text);
        s.last = Instant::now();
    }

    fn render(&self, report: &Report, containers: &[ContainerFigures], took: Duration) -> String {
        let mut reg = Registry::default();
        self.render_containers(&mut reg, containers);
        self.render_processes(&mut reg, &report.processes);
        self.render_own(&mut reg, report, took);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }

    fn render_containers(&self, reg: &mut Registry, containers: &[ContainerFigures]) {
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
            let l = c.labels.pairs().to_vec();
            open.get_or_create(&l).set(gauge_i(c.open_fds));
            procs.get_or_create(&l).set(gauge_i(c.processes));
            ratio.get_or_create(&l).set(c.fd_usage_ratio);
            leak.get_or_create(&l).set(c.leak_per_s);
            if let Some(s) = c.seconds_to_emfile {
                secs.get_or_create(&l).set(s);
            }
            opened.get_or_create(&l).inc_by(c.counters.opened);
            closed.get_or_create(&l).inc_by(c.counters.closed);
            emfile.get_or_create(&l).inc_by(c.counters.emfile);
            cw.get_or_create(&l).set(gauge_i(c.close_wait));
        }
    }

    fn render_processes(&self, reg: &mut Registry, processes: &[ProcessReport]) {
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

        let figures = processes.iter().map(|p| &p.figures);
        for f in bounded(figures, self.bounds.top, self.bounds.max) {
            let l = self.process_labels(f.pid, &f.comm);
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
        // first, as many as the per-process series may be.
        let by_pid: HashMap<u32, &ProcessReport> =
            processes.iter().map(|p| (p.figures.pid, p)).collect();
        let wanted = processes
            .iter()
            .map(|p| &p.figures)
            .filter(|f| self.tracker.sites_wanted(f));
        for f in bounded(wanted, 0, self.bounds.max) {
            let p = by_pid[&f.pid];
            let mut base = vec![("pid", f.pid.to_string())];
            base.extend(self.container_labels(f.pid));
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

    fn render_own(&self, reg: &mut Registry, report: &Report, took: Duration) {
        let traced = Gauge::<i64>::default();
        traced.set(gauge_i(report.processes.len() as u64));
        reg.register(
            "fdtrace_traced_processes",
            "Processes traced at the last report",
            traced,
        );
        let lost = Counter::<u64>::default();
        lost.inc_by(self.lost_events);
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
        for (map, n) in ["fds", "procs"].into_iter().zip(self.map_full) {
            full.get_or_create(&vec![("map", map.to_string())])
                .inc_by(n);
        }
        let drift = Counter::<u64>::default();
        drift.inc_by(self.drift_resyncs);
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

    fn container_labels(&self, pid: u32) -> [(&'static str, String); 5] {
        self.tracker
            .labels(pid)
            .cloned()
            .unwrap_or_default()
            .pairs()
    }

    fn process_labels(&self, pid: u32, comm: &str) -> Labels {
        let mut l = vec![("pid", pid.to_string()), ("comm", comm.to_string())];
        l.extend(self.container_labels(pid));
        l
    }
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
    fn start(&mut self, _: &Start) -> io::Result<()> {
        Ok(())
    }

    fn notice(&mut self, notice: &Notice) -> io::Result<()> {
        match notice {
            // A child is in its parent's cgroup until something moves it
            // (at the latest, before its exec).
            Notice::Fork { pid, ppid, .. } => {
                if let Some(l) = self.tracker.labels(*ppid).cloned() {
                    self.tracker.identified(*pid, l);
                }
            }
            Notice::Exit { pid, totals, .. } => {
                self.tracker.exited(*pid, totals.opened, totals.closed)
            }
            Notice::FdError {
                pid,
                errno: Errno::Emfile,
                ..
            } => self.tracker.emfile(*pid),
            Notice::Finding { pid, finding, .. } if finding.kind == FindingKind::Leak => {
                self.tracker.leak_finding(*pid)
            }
            _ => {}
        }
        Ok(())
    }

    fn report(&mut self, report: &Report) -> io::Result<()> {
        for p in &report.processes {
            let pid = p.figures.pid;
            // The enrich phase's attribution, which follows exec and cgroup
            // moves: a sink reads nothing itself.
            self.tracker
                .identified(pid, ContainerLabels::of(&p.figures.attribution));
            if matches!(p.resync, Some(Resync::Drift(_))) {
                self.drift_resyncs += 1;
            }
        }
        for l in &report.losses {
            match *l {
                Loss::RingBuffer { count } => self.lost_events += count,
                Loss::FdsMapFull { count, .. } => self.map_full[0] += count,
                Loss::ProcsMapFull { count, .. } => self.map_full[1] += count,
            }
        }
        let containers = self.tracker.report(&report.processes);
        // From the report's start (its ts, to the millisecond) to now, unrounded.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(report.ts, |d| d.as_secs_f64());
        let took = Duration::from_secs_f64((now - report.ts).max(0.0));
        self.publish(report, &containers, took);
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

    use super::{model::tests as m, *};
    use crate::analysis::SiteReport;

    fn sink(top: usize, max: usize) -> Metrics {
        let shared = Arc::new(Mutex::new(Shared {
            exposition: Bytes::new(),
            last: Instant::now(),
        }));
        Metrics::new(shared, Bounds { top, max })
    }

    fn text(m: &Metrics) -> String {
        let s = m.shared.lock().unwrap();
        String::from_utf8(s.exposition.to_vec()).unwrap()
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

    /// A report of a leaker in a pod and a healthy process outside any
    /// container.
    fn two(_: &mut Metrics) -> Report {
        let attribution = |cgroup: &str, pod: Option<(&str, &str, &str, String)>| {
            let mut a = crate::analysis::Attribution {
                cgroup: Some(cgroup.into()),
                ..Default::default()
            };
            if let Some((ns, pod, container, id)) = pod {
                a.namespace = Some(ns.into());
                a.pod = Some(pod.into());
                a.container = Some(container.into());
                a.container_id = Some(id);
            }
            std::rc::Rc::new(a)
        };
        let mut leaker = m::figures(10, 300, Status::Critical);
        leaker.attribution = attribution(
            "/kubepods.slice/x",
            Some(("shop", "cart-7f", "app", "ab".repeat(32))),
        );
        leaker.comm = "say \"hi\"\n".into();
        leaker.leak_per_s = 4.0;
        leaker.seconds_to_emfile = Some(25.0);
        let mut r = m::report(leaker);
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
        Report {
            ts: 1000.5,
            losses: vec![
                Loss::RingBuffer { count: 3 },
                Loss::FdsMapFull {
                    count: 2,
                    max_entries: 8,
                },
            ],
            processes: vec![r, {
                let mut nginx = m::figures(20, 12, Status::Ok);
                nginx.attribution = attribution("/system.slice/nginx.service", None);
                m::report(nginx)
            }],
            containers: Vec::new(),
        }
    }

    #[test]
    fn every_family_of_the_issue_with_its_labels() {
        let mut m = sink(20, 200);
        let r = two(&mut m);
        m.report(&r).unwrap();
        let t = text(&m);
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
        assert_eq!(
            samples(&t, "fdtrace_container_emfile_errors_total").len(),
            2,
            "from the first report, at 0"
        );
        // prometheus-client escapes the quotes and the newline of a comm.
        let leaker = format!(r#"pid="10",comm="say \"hi\"\n",{pod}"#);
        assert!(
            t.contains(&format!("fdtrace_process_open_fds{{{leaker}}} 300\n")),
            "{t}"
        );
        let status = samples(&t, "fdtrace_process_status");
        assert_eq!(status.len(), 8, "4 statuses of 2 processes");
        assert!(status.contains(
            &format!(r#"fdtrace_process_status{{{leaker},status="critical"}} 1"#).as_str()
        ));
        assert!(
            status
                .contains(&format!(r#"fdtrace_process_status{{{leaker},status="ok"}} 0"#).as_str())
        );
        // Sites: the top 5 of the critical process only, with the function.
        let sites = samples(&t, "fdtrace_site_open_fds");
        assert_eq!(sites.len(), 5, "{sites:?}");
        assert!(sites.contains(
            &format!(r#"fdtrace_site_open_fds{{pid="10",{pod},kind="socket",resource="tcp 10.0.0.0:443",function="dial (/srv/cart/net.go:42)"}} 40"#).as_str()
        ), "{sites:?}");
        // Its own families.
        assert!(t.contains("fdtrace_lost_events_total 3\n"));
        assert!(t.contains("fdtrace_map_full_total{map=\"fds\"} 2\n"));
        assert!(t.contains("fdtrace_map_full_total{map=\"procs\"} 0\n"));
        assert!(t.contains("fdtrace_traced_processes 2\n"));
        assert!(t.contains("fdtrace_last_report_timestamp_seconds 1000.5\n"));
        assert!(t.contains(&format!(
            "fdtrace_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn series_of_a_gone_process_and_container_go_at_the_next_report() {
        let mut m = sink(20, 200);
        let mut r = two(&mut m);
        m.report(&r).unwrap();
        assert!(text(&m).contains(r#"pid="10""#));
        m.notice(&Notice::Exit {
            ts: 0.0,
            pid: 10,
            comm: "x".into(),
            totals: Default::default(),
            ending: Default::default(),
        })
        .unwrap();
        r.processes.remove(0);
        r.losses.clear();
        m.report(&r).unwrap();
        let t = text(&m);
        assert!(!t.contains(r#"pid="10""#), "{t}");
        assert!(!t.contains("cart-7f"), "{t}");
        assert_eq!(samples(&t, "fdtrace_container_open_fds").len(), 1);
        // Counters of fdtrace itself never go down.
        assert!(t.contains("fdtrace_lost_events_total 3\n"));
    }

    #[test]
    fn per_process_series_bounded() {
        let mut m = sink(1, 1);
        let r = two(&mut m);
        m.report(&r).unwrap();
        let t = text(&m);
        assert_eq!(samples(&t, "fdtrace_process_open_fds").len(), 1);
        assert!(samples(&t, "fdtrace_process_open_fds")[0].contains(r#"pid="10""#));
        // The containers keep every process.
        assert_eq!(samples(&t, "fdtrace_container_processes").len(), 2);
    }

    #[test]
    fn before_the_first_report_only_fdtraces_own_series() {
        let m = sink(20, 200);
        let t = text(&m);
        assert!(samples(&t, "fdtrace_container_open_fds").is_empty());
        assert!(t.contains("fdtrace_traced_processes 0\n"));
        assert!(t.contains("fdtrace_lost_events_total 0\n"));
    }
}
