//! What `/metrics` shows, as pure functions of the reports: the container
//! grouping with counters that keep the exited processes, the bound on the
//! per-process series, the site function label and `/healthz`'s staleness.
use std::{
    cmp::Ordering,
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::analysis::{FindingKind, ProcessFigures, ProcessReport, Status};

/// The labels every per-container, per-process and site series carries.
/// Empty strings where they do not apply: Prometheus treats an empty label
/// as an absent one, so rules match the same way either way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub container_id: String,
    pub cgroup: String,
}

impl ContainerLabels {
    pub fn pairs(&self) -> [(&'static str, String); 5] {
        [
            ("namespace", self.namespace.clone()),
            ("pod", self.pod.clone()),
            ("container", self.container.clone()),
            ("container_id", self.container_id.clone()),
            ("cgroup", self.cgroup.clone()),
        ]
    }
}

/// The counters of one process as last known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub opened: u64,
    pub closed: u64,
    pub emfile: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.emfile += o.emfile;
    }
}

/// What the metrics keep of one process between reports.
#[derive(Clone, Debug)]
struct Proc {
    labels: ContainerLabels,
    counters: Counters,
    /// It had a `leak` finding: its sites are exported even while its status
    /// is ok (a slow leak far from the limit).
    leak_finding: bool,
    /// Reports in a row it was missing from.
    missing: u32,
}

/// One container at one report.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerFigures {
    pub labels: ContainerLabels,
    pub open_fds: u64,
    pub processes: u64,
    /// The worst open/soft-limit of its processes (0 when none has a limit).
    pub fd_usage_ratio: f64,
    pub leak_per_s: f64,
    /// The soonest of its processes; None when none leaks.
    pub seconds_to_emfile: Option<f64>,
    /// Its live processes' counters plus those of its exited ones.
    pub counters: Counters,
    pub close_wait: u64,
}

/// The processes and containers the metrics follow across reports.
#[derive(Debug, Default)]
pub struct Tracker {
    procs: HashMap<u32, Proc>,
    /// Counters of each container's exited processes; a container is known
    /// while it had a live process at the last report.
    exited: HashMap<ContainerLabels, Counters>,
}

impl Tracker {
    /// The labels of a process, if known.
    pub fn labels(&self, pid: u32) -> Option<&ContainerLabels> {
        self.procs.get(&pid).map(|p| &p.labels)
    }

    /// A process seen for the first time (forked, or first reported), or
    /// seen again after an exec (whose cgroup may have moved: runc puts a
    /// container's init into its cgroup before the exec).
    pub fn identified(&mut self, pid: u32, labels: ContainerLabels) {
        match self.procs.get_mut(&pid) {
            Some(p) => p.labels = labels,
            None => {
                self.procs.insert(
                    pid,
                    Proc {
                        labels,
                        counters: Counters::default(),
                        leak_finding: false,
                        missing: 0,
                    },
                );
            }
        }
    }

    /// An EMFILE error of `pid` since its last report (the exit figures do
    /// not hold it).
    pub fn emfile(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.counters.emfile += 1;
        }
    }

    pub fn leak_finding(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.leak_finding = true;
        }
    }

    /// `pid` exited with these totals: they go to its container's counters.
    pub fn exited(&mut self, pid: u32, opened: u64, closed: u64) {
        if let Some(p) = self.procs.remove(&pid) {
            let c = Counters {
                opened: opened.max(p.counters.opened),
                closed: closed.max(p.counters.closed),
                emfile: p.counters.emfile,
            };
            // A container with no live process at the last report is gone
            // with its series.
            if let Some(acc) = self.exited.get_mut(&p.labels) {
                *acc += c;
            }
        }
    }

    /// Takes in a report: the processes it holds must all have been
    /// identified. Returns each container's figures.
    pub fn report(&mut self, processes: &[ProcessReport]) -> Vec<ContainerFigures> {
        for p in self.procs.values_mut() {
            p.missing += 1;
        }
        for r in processes {
            let f = &r.figures;
            let Some(p) = self.procs.get_mut(&f.pid) else {
                continue;
            };
            p.missing = 0;
            // The kernel's counts include every EMFILE counted since the
            // last report.
            p.counters = Counters {
                opened: f.opened,
                closed: f.closed,
                emfile: f.emfile,
            };
            p.leak_finding |= r.findings.iter().any(|x| x.kind == FindingKind::Leak);
        }
        // A process missing from two reports in a row left without an exit
        // event (the session waits one report for it): its last figures
        // stay with its container.
        let gone: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.missing >= 2)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in gone {
            let c = self.procs[&pid].counters;
            self.exited(pid, c.opened, c.closed);
        }

        let mut by: HashMap<&ContainerLabels, ContainerFigures> = HashMap::new();
        for r in processes {
            let f = &r.figures;
            let Some(p) = self.procs.get(&f.pid) else {
                continue;
            };
            let c = by.entry(&p.labels).or_insert_with(|| ContainerFigures {
                labels: p.labels.clone(),
                open_fds: 0,
                processes: 0,
                fd_usage_ratio: 0.0,
                leak_per_s: 0.0,
                seconds_to_emfile: None,
                counters: Counters::default(),
                close_wait: 0,
            });
            c.open_fds += f.open_fds;
            c.processes += 1;
            if let Some(soft) = f.soft_limit.filter(|&s| s > 0) {
                c.fd_usage_ratio = c
                    .fd_usage_ratio
                    .max((f.open_fds as f64 / soft as f64).min(1.0));
            }
            c.leak_per_s += f.leak_per_s;
            c.seconds_to_emfile = match (c.seconds_to_emfile, f.seconds_to_emfile) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            c.close_wait += f.close_wait;
        }
        // Processes missing once still count: their exit event is on its
        // way, and their counters must not dip meanwhile.
        for p in self.procs.values() {
            if let Some(c) = by.get_mut(&p.labels) {
                c.counters += p.counters;
            }
        }
        self.exited.retain(|k, _| by.contains_key(k));
        let mut out: Vec<ContainerFigures> = by
            .into_values()
            .map(|mut c| {
                c.counters += *self.exited.entry(c.labels.clone()).or_default();
                c
            })
            .collect();
        out.sort_by(|a, b| a.labels.cmp(&b.labels));
        out
    }

    /// Whether `pid`'s sites are exported: a leak finding or a status worse
    /// than ok.
    pub fn sites_wanted(&self, f: &ProcessFigures) -> bool {
        f.status > Status::Ok || self.procs.get(&f.pid).is_some_and(|p| p.leak_finding)
    }
}

/// Worst first: status, then the soonest EMFILE, then the fullest table,
/// then the fastest leak (the pid last, for a stable order).
pub fn by_risk(a: &ProcessFigures, b: &ProcessFigures) -> Ordering {
    let secs = |f: &ProcessFigures| f.seconds_to_emfile.unwrap_or(f64::INFINITY);
    let pct = |f: &ProcessFigures| f.pct_used.unwrap_or(0.0);
    b.status
        .cmp(&a.status)
        .then(secs(a).total_cmp(&secs(b)))
        .then(pct(b).total_cmp(&pct(a)))
        .then(b.leak_per_s.total_cmp(&a.leak_per_s))
        .then(a.pid.cmp(&b.pid))
}

/// The processes that get per-process series, worst first: the `top` at
/// most risk, and every one whose status is not ok up to `max` in all.
pub fn bounded<'a>(
    procs: impl IntoIterator<Item = &'a ProcessFigures>,
    top: usize,
    max: usize,
) -> Vec<&'a ProcessFigures> {
    let mut v: Vec<&ProcessFigures> = procs.into_iter().collect();
    v.sort_by(|a, b| by_risk(a, b));
    let not_ok = v.iter().filter(|f| f.status > Status::Ok).count();
    v.truncate(top.max(not_ok.min(max)));
    v
}

/// Sites exported per process.
pub const SITES_PER_PROCESS: usize = 5;

/// The `function` label of a site: the innermost frame of the program's own
/// code, `function (file:line)`. Frames without a source location are
/// libraries without debug information (libc's wrappers, mostly) or
/// unsymbolized addresses; frames whose source is a toolchain's or the
/// system's (Rust's std under `/rustc/`, headers and sources under `/usr/`,
/// glibc's relative `../sysdeps/` paths) are not the user's either. Empty
/// when no frame qualifies.
pub fn user_function(stack: &[String]) -> &str {
    stack
        .iter()
        .find(|f| {
            let Some(loc) = f.strip_suffix(')').and_then(|f| f.rsplit_once(" (")) else {
                return false;
            };
            let file = loc.1;
            file.contains(':')
                && !file.starts_with("/rustc/")
                && !file.starts_with("/usr/")
                && !file.starts_with("../")
                && !file.starts_with("./")
        })
        .map_or("", String::as_str)
}

/// `/healthz`: whether reports run, that is the last one (or the start,
/// before the first) is at most three intervals old.
pub fn healthy(last: Instant, now: Instant, interval: Duration) -> bool {
    now.saturating_duration_since(last) <= interval.saturating_mul(3)
}
