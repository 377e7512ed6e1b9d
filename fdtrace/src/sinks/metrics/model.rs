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
    /// The labels of a process's attribution; empty where it has none.
    pub fn of(a: &crate::analysis::Attribution) -> Self {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        ContainerLabels {
            namespace: text(&a.namespace),
            pod: text(&a.pod),
            container: text(&a.container),
            container_id: text(&a.container_id),
            cgroup: text(&a.cgroup),
        }
    }

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
            c.close_wait += r.close_wait;
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::analysis::{Finding, ProcessReport};

    pub fn figures(pid: u32, open: u64, status: Status) -> ProcessFigures {
        ProcessFigures {
            pid,
            ppid: None,
            comm: format!("p{pid}"),
            open_fds: open,
            soft_limit: Some(1024),
            hard_limit: Some(4096),
            pct_used: Some(open as f64 / 10.24),
            by_kind: [0; fdtrace_common::FD_KINDS],
            preexisting: 0,
            opened: open,
            closed: 0,
            opened_per_s: 0.0,
            closed_per_s: 0.0,
            emfile: 0,
            enfile: 0,
            drift: Some(0),
            status,
            leak_per_s: 0.0,
            seconds_to_emfile: None,
            stacks_not_sampled: 0,
            shares_fd_table: false,
            attribution: Default::default(),
        }
    }

    pub fn report(f: ProcessFigures) -> ProcessReport {
        ProcessReport {
            figures: f,
            sites: Vec::new(),
            findings: Vec::new(),
            resync: None,
            close_wait: 0,
        }
    }

    pub fn labels(cgroup: &str) -> ContainerLabels {
        ContainerLabels {
            cgroup: cgroup.into(),
            ..Default::default()
        }
    }

    #[test]
    fn risk_order_is_status_then_soonest_emfile_then_fullest_then_fastest() {
        let mut a = figures(1, 10, Status::Warning);
        a.seconds_to_emfile = Some(900.0);
        let mut b = figures(2, 10, Status::Warning);
        b.seconds_to_emfile = Some(100.0);
        let c = figures(3, 900, Status::Ok);
        let mut d = figures(4, 10, Status::Ok);
        d.leak_per_s = 2.0;
        let e = figures(5, 10, Status::Exhausted);
        let all = [a, b, c, d, e];
        let order: Vec<u32> = bounded(&all, 10, 10).iter().map(|f| f.pid).collect();
        assert_eq!(order, [5, 2, 1, 3, 4]);
    }

    #[test]
    fn bound_is_top_k_plus_not_ok_up_to_max() {
        let mut all: Vec<ProcessFigures> =
            (1..=50).map(|p| figures(p, p.into(), Status::Ok)).collect();
        // Top 3 of 50 healthy processes: the fullest.
        let pids = |v: Vec<&ProcessFigures>| v.iter().map(|f| f.pid).collect::<Vec<_>>();
        assert_eq!(pids(bounded(&all, 3, 10)), [50, 49, 48]);
        // 8 not ok: all of them, worst first, above the top 3.
        for f in &mut all[..8] {
            f.status = Status::Warning;
        }
        all[0].status = Status::Critical;
        let got = pids(bounded(&all, 3, 10));
        assert_eq!(got.len(), 8);
        assert_eq!(got[..2], [1, 8]);
        assert!(got.iter().all(|&p| p <= 8), "{got:?}");
        // 8 not ok against a max of 5: the 5 worst.
        assert_eq!(bounded(&all, 3, 5).len(), 5);
        // No process, no series.
        assert!(bounded(&[], 20, 200).is_empty());
    }

    #[test]
    fn user_function_is_the_first_frame_of_the_programs_own_code() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let stack = s(&[
            "__open64_nocancel",
            "libc.so.6+0x1234",
            "std::fs::File::open (/rustc/0123abcd/library/std/src/fs.rs:373)",
            "fopen (../sysdeps/unix/sysv/linux/open64.c:41)",
            "inline_helper (/usr/include/x86_64-linux-gnu/bits/fcntl2.h:53)",
            "open_config (/srv/app/src/config.c:88)",
            "main (/srv/app/src/main.c:12)",
        ]);
        assert_eq!(
            user_function(&stack),
            "open_config (/srv/app/src/config.c:88)"
        );
        assert_eq!(user_function(&s(&["open64", "0x7f00dead"])), "");
        assert_eq!(user_function(&[]), "");
        // A file without a line is not a location to look at.
        assert_eq!(
            user_function(&s(&["f (/srv/a.c)", "g (/srv/a.c:3)"])),
            "g (/srv/a.c:3)"
        );
    }

    #[test]
    fn healthz_is_stale_after_three_intervals() {
        let t0 = Instant::now();
        let i = Duration::from_secs(1);
        assert!(healthy(t0, t0, i));
        assert!(healthy(t0, t0 + Duration::from_millis(3000), i));
        assert!(!healthy(t0, t0 + Duration::from_millis(3001), i));
        // A clock read before the report: not stale.
        assert!(healthy(t0 + i, t0, i));
    }

    #[test]
    fn containers_group_by_labels_and_take_worst_soonest_and_sums() {
        let mut t = Tracker::default();
        t.identified(1, labels("/a"));
        t.identified(2, labels("/a"));
        t.identified(3, labels("/b"));
        let mut p1 = figures(1, 512, Status::Ok);
        p1.leak_per_s = 1.0;
        p1.seconds_to_emfile = Some(512.0);
        let mut p2 = figures(2, 100, Status::Ok);
        p2.soft_limit = Some(200);
        p2.leak_per_s = 0.5;
        p2.seconds_to_emfile = Some(200.0);
        let mut p3 = figures(3, 7, Status::Ok);
        p3.soft_limit = None;
        let mut r1 = report(p1);
        r1.close_wait = 2;
        let c = t.report(&[r1, report(p2), report(p3)]);
        assert_eq!(c.len(), 2);
        let a = &c[0];
        assert_eq!(a.labels, labels("/a"));
        assert_eq!((a.open_fds, a.processes, a.close_wait), (612, 2, 2));
        assert_eq!(a.fd_usage_ratio, 0.5);
        assert_eq!(a.leak_per_s, 1.5);
        assert_eq!(a.seconds_to_emfile, Some(200.0));
        assert_eq!(a.counters.opened, 612);
        let b = &c[1];
        assert_eq!(
            (b.open_fds, b.fd_usage_ratio, b.seconds_to_emfile),
            (7, 0.0, None)
        );
    }

    #[test]
    fn container_counters_keep_exited_processes_and_go_with_the_container() {
        let mut t = Tracker::default();
        t.identified(1, labels("/a"));
        t.identified(2, labels("/a"));
        let mut p1 = figures(1, 5, Status::Ok);
        p1.opened = 40;
        p1.closed = 35;
        p1.emfile = 1;
        let p2 = figures(2, 5, Status::Ok);
        let c = t.report(&[report(p1.clone()), report(p2.clone())]);
        assert_eq!(
            c[0].counters,
            Counters {
                opened: 45,
                closed: 35,
                emfile: 1
            }
        );
        // pid 1 opens and closes 10 more and fails once more, then exits.
        t.emfile(1);
        t.exited(1, 50, 50);
        let c = t.report(&[report(p2.clone())]);
        assert_eq!(
            c[0].counters,
            Counters {
                opened: 55,
                closed: 50,
                emfile: 2
            }
        );
        assert_eq!(c[0].processes, 1);
        // The container's last process goes: its series and counters go.
        t.exited(2, 5, 0);
        assert!(t.report(&[]).is_empty());
        // A new process in the same cgroup starts the counters again.
        t.identified(3, labels("/a"));
        let c = t.report(&[report(figures(3, 4, Status::Ok))]);
        assert_eq!(c[0].counters.opened, 4);
    }

    #[test]
    fn a_process_gone_without_exit_event_keeps_its_counters_in_the_container() {
        let mut t = Tracker::default();
        t.identified(1, labels("/a"));
        t.identified(2, labels("/a"));
        let p1 = figures(1, 30, Status::Ok);
        let p2 = figures(2, 5, Status::Ok);
        t.report(&[report(p1), report(p2.clone())]);
        // Missing once (its exit event may follow), then for good.
        for _ in 0..3 {
            let c = t.report(&[report(p2.clone())]);
            assert_eq!(c[0].counters.opened, 35);
            assert_eq!(c[0].processes, 1);
        }
        assert!(t.labels(1).is_none());
    }

    #[test]
    fn sites_wanted_for_a_leak_finding_or_worse_than_ok() {
        let mut t = Tracker::default();
        t.identified(1, labels("/a"));
        let ok = figures(1, 5, Status::Ok);
        assert!(!t.sites_wanted(&ok));
        assert!(t.sites_wanted(&figures(1, 5, Status::Warning)));
        let mut r = report(ok.clone());
        r.findings.push(Finding {
            kind: FindingKind::Leak,
            message: String::new(),
            recommendation: "",
            site: None,
            count: None,
            fds: None,
            first_seen_ts: 0.0,
        });
        t.report(&[r]);
        // Kept at later reports, where the finding is no longer new.
        t.report(&[report(ok.clone())]);
        assert!(t.sites_wanted(&ok));
    }
}
