//! The analysis of one process across reports: its live fds grouped into
//! call sites, each site's net growth rate, the process's forecast against
//! its own RLIMIT_NOFILE, its status, and the findings.
use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    rc::Rc,
    time::Duration,
};

use fdtrace_common::FdKind;
// A grouping hashes each live fd of a process (its site): foldhash, several
// times faster than SipHash on these short keys, and seeded per process run
// like std's.
use foldhash::{HashMap as FastMap, HashMapExt as _};

use super::{
    Ending, Finding, FindingKind, LabelledFd, ProcessFigures, ProcessReport, ProcessSample,
    ProcessSummary, PythonSite, Series, SiteFigures, SiteReport, Stack, Status, TcpState,
    Thresholds, Totals, close_wait, is_candidate, leak, pct_used, seconds_to_emfile, status,
};

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub window: Duration,
    pub min_age: Duration,
    pub thresholds: Thresholds,
    /// Sites reported per process and report.
    pub top: usize,
}

/// A site growing at least this fast over the window is reported as a leak.
const LEAK_FINDING_RATE: f64 = 0.2;

/// Sites growing at least this fast are shown on a terminal and in the
/// summary.
pub const GROWING_RATE: f64 = 0.05;

/// A call site: the creating stack, the fd kind and the resource label,
/// and whether its fds were there before the tracing. Pre-existing fds have
/// no stack (NO_SITE), nor have fds created since whose stack could not be
/// taken (bpf_get_stackid fails, e.g. on a bucket collision in STACKS): the
/// flag keeps those apart, else a leak on a resource the process held at
/// attach (a leaker opening /dev/null with fd 2 on it) would be counted as
/// old fds and never reported.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SiteKey {
    stack: u64,
    /// FdKind as u8 (hashable).
    kind: u8,
    resource: Rc<str>,
    preexisting: bool,
}

impl SiteKey {
    /// Short, stable within a run: the hash of (pid, key).
    fn id(&self, pid: u32) -> String {
        let mut h = DefaultHasher::new();
        (pid, self).hash(&mut h);
        format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
    }
}

struct Site {
    id: String,
    key: SiteKey,
    /// Its open fds over the window.
    series: Series,
    open: u64,
    leak_per_s: f64,
    oldest_age_s: f64,
    /// Its sockets in CLOSE_WAIT at the last report.
    close_wait: u64,
}

impl Site {
    fn figures(&self) -> SiteFigures<'_> {
        SiteFigures {
            id: &self.id,
            kind: FdKind::from_u8(self.key.kind),
            resource: &self.key.resource,
            leak_per_s: self.leak_per_s,
            open: self.open,
            oldest_age_s: self.oldest_age_s,
        }
    }
}

/// The live fds of a process grouped into sites, without what changes while
/// the fds stay (ages, socket states).
struct Groups {
    sites: FastMap<SiteKey, Group>,
    /// Fds old enough to count as leak candidates.
    candidates: u64,
    /// Holds until the fds change: no fd was too young to count, none went
    /// unlabelled, no label may still change.
    settled: bool,
}

struct Group {
    open: u64,
    /// Earliest creation time among its fds that fdtrace saw created.
    first_created: Option<u64>,
    socket_inodes: Vec<u64>,
}

impl Group {
    /// Age of its oldest fd; pre-existing fds are as old as the tracing
    /// at least (`traced_ns`).
    fn oldest_ns(&self, preexisting: bool, now_ns: u64, traced_ns: u64) -> u64 {
        if preexisting {
            traced_ns
        } else {
            self.first_created.map_or(0, |c| now_ns.saturating_sub(c))
        }
    }

    fn close_wait(&self, states: &FastMap<u64, TcpState>) -> u64 {
        self.socket_inodes
            .iter()
            .filter(|i| states.get(i) == Some(&TcpState::CloseWait))
            .count() as u64
    }
}

/// Groups the candidate fds by site.
fn group(fds: &[LabelledFd], now_ns: u64, min_age_ns: u64) -> Groups {
    let mut out = Groups {
        sites: FastMap::new(),
        candidates: 0,
        settled: true,
    };
    for f in fds {
        if !is_candidate(f.preexisting, f.created_ns, now_ns, min_age_ns) {
            out.settled = false; // a candidate at a later report
            continue;
        }
        out.candidates += 1;
        let Some(label) = &f.label else {
            out.settled = false;
            continue; // closed before it could be named
        };
        if label.provisional {
            out.settled = false;
        }
        let key = SiteKey {
            stack: f.stack,
            kind: f.kind as u8,
            resource: label.text.clone(),
            preexisting: f.preexisting,
        };
        let g = out.sites.entry(key).or_insert_with(|| Group {
            open: 0,
            first_created: None,
            socket_inodes: Vec::new(),
        });
        g.open += 1;
        if !f.preexisting {
            let c = f.created_ns;
            g.first_created = Some(g.first_created.map_or(c, |m| m.min(c)));
        }
        g.socket_inodes.extend(label.socket_inode);
    }
    out
}

/// CLOSE_WAIT sockets per resource, with the fastest-growing site of each:
/// CLOSE_WAIT is about the peer, one finding per resource whatever the sites
/// (pre-existing fds form a site of their own).
fn close_wait_by_resource(sites: &HashMap<SiteKey, Site>) -> HashMap<&str, (u64, &Site)> {
    let mut out: HashMap<&str, (u64, &Site)> = HashMap::new();
    for s in sites.values().filter(|s| s.close_wait > 0) {
        let e = out.entry(&s.key.resource).or_insert((0, s));
        e.0 += s.close_wait;
        if s.leak_per_s > e.1.leak_per_s {
            e.1 = s;
        }
    }
    out
}

/// Counts at the last report, for the per-second rates and the summary.
#[derive(Clone, Copy, Debug)]
struct LastReport {
    t: f64,
    totals: Totals,
    emfile: u64,
    enfile: u64,
}

pub struct ProcessAnalysis {
    cfg: Config,
    /// The last grouping, with the fds version it was made from, while it
    /// holds: a report of a process whose fds did not change reuses it.
    grouped: Option<(u64, Groups)>,
    /// Leak-candidate fds of the process over the window.
    candidates: Series,
    sites: HashMap<SiteKey, Site>,
    last: Option<LastReport>,
    /// Final totals once it exited.
    exited: Option<Totals>,
    ending: Option<Ending>,
    leak_per_s: f64,
    seconds_to_emfile: Option<f64>,
    status: Status,
    /// Worst status reached, for --fail-on.
    worst: Status,
    reported: HashSet<String>,
    /// Every finding, kept with its current figures for the summary.
    findings: Vec<Finding>,
}

impl ProcessAnalysis {
    pub fn new(cfg: Config) -> Self {
        ProcessAnalysis {
            cfg,
            grouped: None,
            candidates: Series::new(cfg.window),
            sites: HashMap::new(),
            last: None,
            exited: None,
            ending: None,
            leak_per_s: 0.0,
            seconds_to_emfile: None,
            status: Status::Ok,
            worst: Status::Ok,
            reported: HashSet::new(),
            findings: Vec::new(),
        }
    }

    pub fn worst(&self) -> Status {
        self.worst
    }

    /// It was in a report already.
    pub fn reported(&self) -> bool {
        self.last.is_some()
    }

    /// Totals at the last report, if there was one.
    pub fn last_totals(&self) -> Option<Totals> {
        self.last.map(|l| l.totals)
    }

    /// The process exited with `totals` (those of the last report when its
    /// exit event was lost). False when its exit was already seen.
    pub fn exit(&mut self, totals: Totals, ending: Ending) -> bool {
        if self.exited.is_some() {
            return false;
        }
        self.exited = Some(totals);
        self.ending = Some(ending);
        self.grouped = None;
        true
    }

    /// One report of the process.
    pub fn update(&mut self, s: &ProcessSample<'_>) -> ProcessReport {
        let traced_ns = (s.t * 1e9) as u64;
        // An outdated grouping goes before the new one is made, so that the
        // label texts only it held are let go.
        let kept = self.grouped.take().filter(|(v, _)| *v == s.fds_version);
        let reused = kept.is_some();
        let groups = match kept {
            Some((_, g)) => g,
            None => group(s.fds, s.now_ns, self.cfg.min_age.as_nanos() as u64),
        };
        // Series: every known site gets a sample, 0 when it has no fd now.
        // A grouping kept from the last report has its sites known already
        // (each has fds, so none was let go).
        for key in groups.sites.keys().filter(|_| !reused) {
            if self.sites.contains_key(key) {
                continue;
            }
            self.sites.insert(
                key.clone(),
                Site {
                    id: key.id(s.pid),
                    key: key.clone(),
                    series: Series::new(self.cfg.window),
                    open: 0,
                    leak_per_s: 0.0,
                    oldest_age_s: 0.0,
                    close_wait: 0,
                },
            );
        }
        for site in self.sites.values_mut() {
            let (n, age_ns, cw) = match groups.sites.get(&site.key) {
                Some(g) => (
                    g.open,
                    g.oldest_ns(site.key.preexisting, s.now_ns, traced_ns),
                    g.close_wait(s.tcp_states),
                ),
                None => (0, 0, 0),
            };
            site.open = n;
            site.oldest_age_s = age_ns as f64 / 1e9;
            site.close_wait = cw;
            site.series.push(s.t, n as f64);
            site.leak_per_s = site.series.slope();
        }
        let candidates = groups.candidates;
        if groups.settled {
            self.grouped = Some((s.fds_version, groups));
        }
        self.sites
            .retain(|_, site| site.open > 0 || site.series.any_positive());

        self.candidates.push(s.t, candidates as f64);
        self.leak_per_s = self.candidates.slope();
        let c = &s.counts;
        self.seconds_to_emfile = seconds_to_emfile(s.soft_limit, c.open_fds, self.leak_per_s);
        self.status = status(
            c.open_fds,
            s.soft_limit,
            self.seconds_to_emfile,
            c.emfile + c.enfile > 0,
            &self.cfg.thresholds,
        );
        self.worst = self.worst.max(self.status);

        let (opened_per_s, closed_per_s) = match self.last {
            Some(l) => {
                let dt = (s.t - l.t).max(1e-3);
                (
                    c.opened.saturating_sub(l.totals.opened) as f64 / dt,
                    c.closed.saturating_sub(l.totals.closed) as f64 / dt,
                )
            }
            None => (0.0, 0.0),
        };
        self.last = Some(LastReport {
            t: s.t,
            totals: Totals {
                open_fds: c.open_fds,
                opened: c.opened,
                closed: c.closed,
            },
            emfile: c.emfile,
            enfile: c.enfile,
        });
        let findings = self.new_findings(s.ts);
        self.refresh_findings();
        ProcessReport {
            figures: ProcessFigures {
                pid: s.pid,
                ppid: s.ppid,
                comm: s.comm.to_string(),
                open_fds: c.open_fds,
                soft_limit: s.soft_limit,
                hard_limit: s.hard_limit,
                pct_used: pct_used(c.open_fds, s.soft_limit),
                by_kind: c.by_kind,
                preexisting: c.preexisting,
                opened: c.opened,
                closed: c.closed,
                opened_per_s,
                closed_per_s,
                emfile: c.emfile,
                enfile: c.enfile,
                drift: s.drift,
                status: self.status,
                leak_per_s: self.leak_per_s,
                seconds_to_emfile: self.seconds_to_emfile,
                stacks_not_sampled: c.stacks_not_sampled,
                shares_fd_table: c.shares_fd_table,
                attribution: s.attribution.clone(),
            },
            sites: self.top_sites(self.cfg.top, s.stacks, s.python),
            findings,
            leak_found: self.findings.iter().any(|f| f.kind == FindingKind::Leak),
            resync: s.resync,
            close_wait: self.sites.values().map(|s| s.close_wait).sum(),
        }
    }

    /// Sites with open fds by leak rate, fastest first.
    fn top_sites(
        &self,
        n: usize,
        stacks: &HashMap<u64, Stack>,
        python: &HashMap<u64, PythonSite>,
    ) -> Vec<SiteReport> {
        let mut v: Vec<&Site> = self.sites.values().filter(|s| s.open > 0).collect();
        v.sort_by(|a, b| {
            b.leak_per_s
                .total_cmp(&a.leak_per_s)
                .then(b.open.cmp(&a.open))
        });
        v.truncate(n);
        v.into_iter()
            .map(|s| SiteReport {
                id: s.id.clone(),
                kind: FdKind::from_u8(s.key.kind),
                resource: s.key.resource.clone(),
                stack: stacks.get(&s.key.stack).cloned().unwrap_or_default(),
                python: python.get(&s.key.stack).cloned(),
                open_fds: s.open,
                leak_per_s: s.leak_per_s,
                oldest_age_s: s.oldest_age_s,
            })
            .collect()
    }

    fn new_findings(&mut self, ts: f64) -> Vec<Finding> {
        let mut out = Vec::new();
        // A site that grows while the process does not is replacing fds of
        // another site (a pool refilling after attach: its old fds count as
        // pre-existing), not leaking.
        let enough = self.candidates.len() >= 3 && self.leak_per_s >= LEAK_FINDING_RATE;
        let mut keys = Vec::new();
        for s in self.sites.values() {
            if enough && !s.key.preexisting && s.leak_per_s >= LEAK_FINDING_RATE {
                let key = format!("leak {}", s.id);
                if !self.reported.contains(&key) {
                    keys.push(key);
                    out.push(leak(s.figures(), ts));
                }
            }
        }
        for (resource, (n, s)) in close_wait_by_resource(&self.sites) {
            let key = format!("close_wait {resource}");
            if !self.reported.contains(&key) {
                keys.push(key);
                out.push(close_wait(&s.id, resource, n, ts));
            }
        }
        self.reported.extend(keys);
        self.findings.extend(out.iter().cloned());
        out
    }

    /// Brings the figures of the findings about sites up to date, keeping
    /// when they were first seen: the summary shows what is true at its end.
    fn refresh_findings(&mut self) {
        // Most processes have none: no index of their sites per report.
        if self.findings.is_empty() {
            return;
        }
        let by_id: HashMap<&str, &Site> = self
            .sites
            .values()
            .filter(|s| s.open > 0)
            .map(|s| (s.id.as_str(), s))
            .collect();
        let close_wait_now = close_wait_by_resource(&self.sites);
        for f in &mut self.findings {
            let first_seen_ts = f.first_seen_ts;
            let fresh = match f.kind {
                FindingKind::Leak => f
                    .site
                    .as_deref()
                    .and_then(|id| by_id.get(id))
                    .map(|s| leak(s.figures(), first_seen_ts)),
                FindingKind::CloseWait => close_wait_now
                    .iter()
                    .find(|(_, (_, s))| Some(s.id.as_str()) == f.site.as_deref())
                    .map(|(r, (n, s))| close_wait(&s.id, r, *n, first_seen_ts)),
                FindingKind::Emfile | FindingKind::Inherited => None,
            };
            if let Some(fresh) = fresh {
                *f = fresh;
            }
        }
    }

    /// Records a finding that came from an event (EMFILE, inherited fds)
    /// under `key`; None when one of that key was already reported, or when
    /// it is about nothing.
    pub fn event_finding(&mut self, key: String, f: Finding) -> Option<Finding> {
        if f.is_empty() || !self.reported.insert(key) {
            return None;
        }
        self.findings.push(f.clone());
        Some(f)
    }

    /// The process's line of the closing summary.
    pub fn summary(
        &self,
        pid: u32,
        comm: &str,
        stacks: &HashMap<u64, Stack>,
        python: &HashMap<u64, PythonSite>,
    ) -> ProcessSummary {
        let (emfile, enfile) = self.last.map_or((0, 0), |l| (l.emfile, l.enfile));
        let totals = self.exited.or(self.last_totals()).unwrap_or_default();
        ProcessSummary {
            pid,
            comm: comm.to_string(),
            totals,
            emfile,
            enfile,
            exited: self.exited.is_some(),
            reported: self.last.is_some(),
            ending: self.ending,
            status: if self.exited.is_some() {
                self.worst
            } else {
                self.status
            },
            leak_per_s: self.leak_per_s,
            seconds_to_emfile: self.seconds_to_emfile,
            sites: self
                .top_sites(3, stacks, python)
                .into_iter()
                .filter(|s| s.leak_per_s >= GROWING_RATE)
                .collect(),
            findings: self.findings.clone(),
        }
    }
}

/// The key an EMFILE/ENFILE finding is reported once under: once per call
/// site and call.
pub fn fd_error_key(stack: u64, syscall: &str) -> String {
    format!("emfile {stack} {syscall}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{Counts, Label, LabelledFd};

    const TH: Thresholds = Thresholds {
        warn_pct: 80.0,
        crit_pct: 90.0,
        warn_within: Duration::from_secs(3600),
        crit_within: Duration::from_secs(300),
    };

    fn cfg() -> Config {
        Config {
            window: Duration::from_secs(60),
            min_age: Duration::ZERO,
            thresholds: TH,
            top: 10,
        }
    }

    fn fd(fd: u32, created_s: u64, text: &str) -> LabelledFd {
        LabelledFd {
            fd,
            created_ns: created_s * 1_000_000_000 + 1,
            preexisting: false,
            kind: FdKind::File,
            stack: 7,
            label: Some(Label {
                text: text.into(),
                socket_inode: None,
                provisional: false,
            }),
        }
    }

    struct Run {
        a: ProcessAnalysis,
        fds: Vec<LabelledFd>,
        version: u64,
        tcp: FastMap<u64, TcpState>,
        stacks: HashMap<u64, Stack>,
    }

    impl Run {
        fn new(cfg: Config) -> Self {
            Run {
                a: ProcessAnalysis::new(cfg),
                fds: Vec::new(),
                version: 0,
                tcp: FastMap::new(),
                stacks: HashMap::new(),
            }
        }

        /// A report at second `t` with the fds now in `self.fds`.
        fn report(&mut self, t: u64, soft_limit: Option<u64>) -> ProcessReport {
            self.version += 1;
            let counts = Counts {
                open_fds: self.fds.len() as u64,
                opened: self.fds.len() as u64,
                ..Counts::default()
            };
            self.a.update(&ProcessSample {
                pid: 42,
                ppid: Some(1),
                comm: "leaker",
                ts: 1000.0 + t as f64,
                t: t as f64,
                now_ns: t * 1_000_000_000 + 2,
                soft_limit,
                hard_limit: soft_limit,
                counts,
                drift: Some(0),
                resync: None,
                fds: &self.fds,
                fds_version: self.version,
                tcp_states: &self.tcp,
                stacks: &self.stacks,
                attribution: Default::default(),
                python: &HashMap::new(),
            })
        }
    }

    /// Two new fds of one file every second for `secs` seconds.
    fn leaking(secs: u64) -> (Run, Vec<ProcessReport>) {
        let mut r = Run::new(cfg());
        let mut reports = Vec::new();
        for t in 0..secs {
            let n = r.fds.len() as u32;
            r.fds.push(fd(n + 3, t, "/tmp/log-N.txt"));
            r.fds.push(fd(n + 4, t, "/tmp/log-N.txt"));
            reports.push(r.report(t, Some(1024)));
        }
        (r, reports)
    }

    #[test]
    fn a_growing_site_is_a_leak_once() {
        let (_, reports) = leaking(10);
        let leaks: Vec<&Finding> = reports
            .iter()
            .flat_map(|r| &r.findings)
            .filter(|f| f.kind == FindingKind::Leak)
            .collect();
        assert_eq!(leaks.len(), 1);
        let last = reports.last().unwrap();
        assert!((last.figures.leak_per_s - 2.0).abs() < 1e-9);
        assert_eq!(last.sites.len(), 1);
        assert_eq!(last.sites[0].open_fds, 20);
        assert!((last.sites[0].leak_per_s - 2.0).abs() < 1e-9);
        assert_eq!(&*last.sites[0].resource, "/tmp/log-N.txt");
        // (1024 - 20) / 2
        assert_eq!(last.figures.seconds_to_emfile, Some(502.0));
        assert_eq!(last.figures.status, Status::Warning);
    }

    #[test]
    fn the_summary_shows_current_figures_of_a_finding() {
        let (r, reports) = leaking(12);
        let first = reports
            .iter()
            .flat_map(|r| &r.findings)
            .find(|f| f.kind == FindingKind::Leak)
            .expect("a leak finding")
            .clone();
        let summary = r.a.summary(42, "leaker", &r.stacks, &HashMap::new());
        let f = summary
            .findings
            .iter()
            .find(|f| f.kind == FindingKind::Leak)
            .expect("the leak in the summary");
        // First seen when it was first reported, figures of now.
        assert_eq!(f.first_seen_ts, first.first_seen_ts);
        assert_eq!(f.count, Some(24));
        assert!(f.message.contains("24 open, oldest 11s"), "{}", f.message);
        assert_ne!(f.message, first.message);
        assert_eq!(summary.sites.len(), 1);
        assert_eq!(summary.totals.open_fds, 24);
    }

    #[test]
    fn an_idle_process_has_no_rate_and_no_forecast() {
        let mut r = Run::new(cfg());
        r.fds = (3..50).map(|n| fd(n, 0, "/etc/hosts")).collect();
        let mut last = None;
        for t in 0..30 {
            last = Some(r.report(t, Some(1024)));
        }
        let last = last.unwrap();
        assert_eq!(last.figures.leak_per_s, 0.0);
        assert_eq!(last.figures.seconds_to_emfile, None);
        assert_eq!(last.figures.status, Status::Ok);
        assert!(last.findings.is_empty());
    }

    #[test]
    fn a_kept_grouping_is_reused_while_the_fds_do_not_change() {
        let mut r = Run::new(cfg());
        r.fds = vec![fd(3, 0, "/a"), fd(4, 0, "/b")];
        r.report(1, None);
        // Same version, different list: a kept grouping ignores the list.
        let v = r.version;
        r.fds.push(fd(5, 0, "/c"));
        let rep = r.a.update(&ProcessSample {
            pid: 42,
            ppid: None,
            comm: "x",
            ts: 2.0,
            t: 2.0,
            now_ns: 2_000_000_002,
            soft_limit: None,
            hard_limit: None,
            counts: Counts::default(),
            drift: None,
            resync: None,
            fds: &r.fds,
            fds_version: v,
            tcp_states: &r.tcp,
            stacks: &r.stacks,
            attribution: Default::default(),
            python: &HashMap::new(),
        });
        assert_eq!(rep.sites.len(), 2);
        // A new version regroups.
        assert_eq!(r.report(3, None).sites.len(), 3);
    }

    #[test]
    fn young_or_unlabelled_fds_are_not_candidates() {
        let mut r = Run::new(Config {
            min_age: Duration::from_secs(30),
            ..cfg()
        });
        r.fds = vec![fd(3, 39, "/young")];
        let mut unlabelled = fd(4, 0, "/old");
        unlabelled.label = None;
        r.fds.push(unlabelled);
        r.fds.push(fd(5, 0, "/old"));
        let rep = r.report(40, None);
        assert_eq!(rep.sites.len(), 1);
        assert_eq!(&*rep.sites[0].resource, "/old");
        assert_eq!(rep.sites[0].open_fds, 1);
    }

    #[test]
    fn close_wait_sockets_are_one_finding_per_peer() {
        let mut r = Run::new(cfg());
        for n in 0..3 {
            let mut f = fd(3 + n, 0, "tcp 127.0.0.1:8080");
            f.kind = FdKind::Socket;
            f.label.as_mut().unwrap().socket_inode = Some(100 + u64::from(n));
            r.fds.push(f);
        }
        r.tcp.insert(100, TcpState::CloseWait);
        r.tcp.insert(101, TcpState::CloseWait);
        r.tcp.insert(102, TcpState::Other);
        let rep = r.report(1, None);
        let cw: Vec<&Finding> = rep
            .findings
            .iter()
            .filter(|f| f.kind == FindingKind::CloseWait)
            .collect();
        assert_eq!(cw.len(), 1);
        assert_eq!(cw[0].count, Some(2));
        assert_eq!(rep.close_wait, 2);
        assert!(r.report(2, None).findings.is_empty(), "reported once");
    }

    #[test]
    fn a_pool_refilling_is_not_a_leak() {
        // Pre-existing fds close while a new site grows: the process is flat.
        let mut r = Run::new(cfg());
        let mut reports = Vec::new();
        for t in 0..10u32 {
            r.fds = (0..10 - t)
                .map(|n| {
                    let mut f = fd(100 + n, 0, "tcp 10.0.0.5:5432");
                    f.preexisting = true;
                    f.created_ns = 0;
                    f
                })
                .chain((0..t).map(|n| fd(200 + n, u64::from(t), "tcp 10.0.0.5:5432")))
                .collect();
            reports.push(r.report(u64::from(t), Some(1024)));
        }
        assert!(reports.iter().all(|r| r.findings.is_empty()));
    }

    #[test]
    fn a_leak_on_the_resource_of_pre_existing_fds_is_found() {
        // The leaked fds' stack could not be taken (NO_SITE), and a
        // pre-existing fd on the same file has none either: the new fds are
        // a site of their own, and a leak.
        let mut r = Run::new(cfg());
        let mut old = fd(2, 0, "/dev/null");
        old.preexisting = true;
        old.created_ns = 0;
        old.stack = fdtrace_common::NO_SITE;
        r.fds.push(old);
        let mut found = Vec::new();
        for t in 0..8u32 {
            for n in 0..5 {
                let mut f = fd(3 + 5 * t + n, u64::from(t), "/dev/null");
                f.stack = fdtrace_common::NO_SITE;
                r.fds.push(f);
            }
            found.extend(r.report(u64::from(t), Some(1024)).findings);
        }
        let leaks: Vec<&Finding> = found
            .iter()
            .filter(|f| f.kind == FindingKind::Leak)
            .collect();
        assert_eq!(leaks.len(), 1, "{found:?}");
        // At the third report: the 15 fds since, without the old one.
        assert_eq!(leaks[0].count, Some(15));
        let last = r.report(8, Some(1024));
        assert_eq!(last.sites.len(), 2);
        let old_site = last.sites.iter().find(|s| s.open_fds == 1);
        assert_eq!(old_site.map(|s| s.leak_per_s), Some(0.0));
    }

    #[test]
    fn event_findings_once_per_key_and_never_empty() {
        let mut a = ProcessAnalysis::new(cfg());
        let f =
            crate::analysis::fd_error("openat", None, crate::analysis::Errno::Emfile, None, 1.0);
        assert!(a.event_finding("k".into(), f.clone()).is_some());
        assert!(a.event_finding("k".into(), f).is_none());
        let mut empty = crate::analysis::close_wait("s", "tcp x", 1, 1.0);
        empty.count = Some(0);
        assert!(a.event_finding("other".into(), empty).is_none());
        let mut nothing = crate::analysis::inherited("sh", vec!["3 (pipe)".into()], 1.0).unwrap();
        nothing.fds = Some(Vec::new());
        assert!(a.event_finding("inherited sh".into(), nothing).is_none());
    }

    #[test]
    fn exit_keeps_the_worst_status_for_the_summary() {
        let mut r = Run::new(cfg());
        r.fds = (0..950).map(|n| fd(n, 0, "/f")).collect();
        assert_eq!(r.report(1, Some(1000)).figures.status, Status::Critical);
        r.fds.clear();
        assert_eq!(r.report(2, Some(1000)).figures.status, Status::Ok);
        assert!(r.a.exit(
            Totals {
                open_fds: 0,
                opened: 950,
                closed: 950
            },
            Ending::Code(7)
        ));
        assert!(
            !r.a.exit(Totals::default(), Ending::Exited),
            "an exit is seen once"
        );
        let s = r.a.summary(42, "x", &r.stacks, &HashMap::new());
        assert!(s.exited);
        assert_eq!(s.status, Status::Critical);
        assert_eq!(s.totals.closed, 950);
        assert_eq!(s.ending, Some(Ending::Code(7)), "the first ending stays");
    }

    #[test]
    fn per_second_rates_from_consecutive_reports() {
        let mut r = Run::new(cfg());
        r.fds = vec![fd(3, 0, "/a")];
        let first = r.report(0, None);
        assert_eq!(first.figures.opened_per_s, 0.0);
        r.fds = (3..13).map(|n| fd(n, 0, "/a")).collect();
        let second = r.report(2, None);
        assert!((second.figures.opened_per_s - 4.5).abs() < 1e-9);
    }

    #[test]
    fn site_ids_are_stable_and_per_process() {
        let k = SiteKey {
            stack: 1,
            kind: FdKind::File as u8,
            resource: "/a".into(),
            preexisting: false,
        };
        assert_eq!(k.id(1), k.id(1));
        assert_ne!(k.id(1), k.id(2));
        assert_eq!(k.id(1).len(), 12);
    }
}
