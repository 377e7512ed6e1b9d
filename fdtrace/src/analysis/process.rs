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
    Finding, FindingKind, LabelledFd, ProcessFigures, ProcessReport, ProcessSample,
    ProcessSummary, Series, SiteFigures, SiteReport, Stack, Status, TcpState, Thresholds, Totals,
    close_wait, is_candidate, leak, pct_used, seconds_to_emfile, status,
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

/// A call site: the creating stack, the fd kind and the resource label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SiteKey {
    stack: u64,
    /// FdKind as u8 (hashable).
    kind: u8,
    resource: Rc<str>,
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
    /// Its first fds were pre-existing (stack and age unknown).
    preexisting: bool,
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
    /// Some of its fds were there before fdtrace attached.
    preexisting_fds: bool,
    /// Its first fd was pre-existing (Site::preexisting).
    preexisting: bool,
    socket_inodes: Vec<u64>,
}

impl Group {
    /// Age of its oldest fd; pre-existing fds are at least as old as the
    /// tracing (`traced_ns`).
    fn oldest_ns(&self, now_ns: u64, traced_ns: u64) -> u64 {
        let seen_ns = self.first_created.map_or(0, |c| now_ns.saturating_sub(c));
        if self.preexisting_fds {
            seen_ns.max(traced_ns)
        } else {
            seen_ns
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
        };
        let g = out.sites.entry(key).or_insert_with(|| Group {
            open: 0,
            first_created: None,
            preexisting_fds: false,
            preexisting: f.preexisting,
            socket_inodes: Vec::new(),
        });
        g.open += 1;
        if f.preexisting {
            g.preexisting_fds = true;
        } else {
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

    pub fn exited(&self) -> bool {
        self.exited.is_some()
    }

    /// Totals at the last report, if there was one.
    pub fn last_totals(&self) -> Option<Totals> {
        self.last.map(|l| l.totals)
    }

    /// The process exited with `totals` (those of the last report when its
    /// exit event was lost). False when its exit was already seen.
    pub fn exit(&mut self, totals: Totals) -> bool {
        if self.exited.is_some() {
            return false;
        }
        self.exited = Some(totals);
        self.grouped = None;
        true
    }

    /// One report of the process.
    pub fn update(&mut self, s: &ProcessSample<'_>) -> ProcessReport {
        let traced_ns = (s.t * 1e9) as u64;
        // An outdated grouping goes before the new one is made, so that the
        // label texts only it held are let go.
        let kept = self.grouped.take().filter(|(v, _)| *v == s.fds_version);
        let groups = match kept {
            Some((_, g)) => g,
            None => group(s.fds, s.now_ns, self.cfg.min_age.as_nanos() as u64),
        };
        // Series: every known site gets a sample, 0 when it has no fd now.
        for (key, g) in &groups.sites {
            self.sites.entry(key.clone()).or_insert_with(|| Site {
                id: key.id(s.pid),
                key: key.clone(),
                series: Series::new(self.cfg.window),
                open: 0,
                leak_per_s: 0.0,
                oldest_age_s: 0.0,
                close_wait: 0,
                preexisting: g.preexisting,
            });
        }
        for site in self.sites.values_mut() {
            let (n, age_ns, cw) = match groups.sites.get(&site.key) {
                Some(g) => (
                    g.open,
                    g.oldest_ns(s.now_ns, traced_ns),
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
            },
            sites: self.top_sites(self.cfg.top, s.stacks),
            findings,
            resync: s.resync,
        }
    }

    /// Sites with open fds by leak rate, fastest first.
    fn top_sites(&self, n: usize, stacks: &HashMap<u64, Stack>) -> Vec<SiteReport> {
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
            if enough && !s.preexisting && s.leak_per_s >= LEAK_FINDING_RATE {
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
            status: if self.exited.is_some() {
                self.worst
            } else {
                self.status
            },
            leak_per_s: self.leak_per_s,
            seconds_to_emfile: self.seconds_to_emfile,
            sites: self
                .top_sites(3, stacks)
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
