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
use crate::{
    analysis::{
        Errno, FindingKind, Loss, Notice, ProcessReport, Report, Resync, Start, Status, Summary,
    },
    container::Attributor,
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
    attributor: Attributor,
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
        let mut m = Metrics {
            shared,
            bounds,
            tracker: Tracker::default(),
            attributor: Attributor::new("/"),
            lost_events: 0,
            map_full: [0; 2],
            drift_resyncs: 0,
        };
        // A scrape before the first report sees fdtrace's own families.
        m.publish(&Report::default(), &[], Duration::ZERO);
        Ok(m)
    }

    /// The container of `pid`, read from its cgroup (and the runtime's
    /// bundle for the pod and container names). Empty labels when it
    /// cannot be read (the process is gone).
    fn identify(&mut self, pid: u32) -> ContainerLabels {
        let Ok(id) = self.attributor.identify(pid) else {
            return ContainerLabels::default();
        };
        let names = id.names.ok().flatten();
        let name = |f: fn(&crate::container::bundle::Names) -> &Option<String>| {
            names
                .as_deref()
                .and_then(|n| f(n).clone())
                .unwrap_or_default()
        };
        ContainerLabels {
            namespace: name(|n| &n.namespace),
            pod: name(|n| &n.pod),
            container: name(|n| &n.container),
            container_id: id.cgroup.container_id.unwrap_or_default(),
            cgroup: id.cgroup.path,
        }
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
                l.push(("function", user_function(&s.stack).to_string()));
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
                let labels = match self.tracker.labels(*ppid) {
                    Some(l) => l.clone(),
                    None => self.identify(*pid),
                };
                self.tracker.identified(*pid, labels);
            }
            Notice::Exec { pid, .. } => {
                let labels = self.identify(*pid);
                self.tracker.identified(*pid, labels);
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
            if self.tracker.labels(pid).is_none() {
                let labels = self.identify(pid);
                self.tracker.identified(pid, labels);
            }
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
        let took = Duration::from_secs_f64((super::now() - report.ts).max(0.0));
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
