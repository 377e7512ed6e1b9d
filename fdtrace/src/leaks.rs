//! Leak analysis of one process: its live fds grouped into call sites, each
//! site's net growth rate (least squares over a sliding window), the
//! process's forecast against its own RLIMIT_NOFILE, its status, and the
//! findings worth a person's attention.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    rc::Rc,
    time::Duration,
};

use fdtrace_common::{FD_PREEXISTING, FdKind};
// A grouping hashes each live fd of a process twice (its label, its site):
// foldhash, several times faster than SipHash on these short keys, and
// seeded per process run like std's.
use foldhash::{HashMap as FastMap, HashMapExt as _, HashSet as FastSet, HashSetExt as _};
use procfs::net::TcpState;

use crate::{
    label::{self, Label, Links, Sockets},
    procfd::ProcFd,
    scan::LiveFd,
};

/// When a process counts as heading for EMFILE.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub warn_pct: f64,
    pub crit_pct: f64,
    pub warn_within: Duration,
    pub crit_within: Duration,
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub window: Duration,
    pub min_age: Duration,
    pub thresholds: Thresholds,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Status {
    // Failing on `ok` would fail every run.
    #[value(skip)]
    Ok,
    Warning,
    Critical,
    Exhausted,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Critical => "critical",
            Status::Exhausted => "exhausted",
        }
    }
}

/// A call site: the creating stack, the fd kind and the resource label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SiteKey {
    pub stack: u64,
    pub kind: u8,
    pub resource: Rc<str>,
}

impl SiteKey {
    /// Short, stable within a run: the hash of (pid, key).
    fn id(&self, pid: u32) -> String {
        let mut h = DefaultHasher::new();
        (pid, self).hash(&mut h);
        format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
    }
}

pub struct Site {
    pub id: String,
    pub key: SiteKey,
    /// (seconds since fdtrace started, open fds of the site).
    samples: VecDeque<(f64, f64)>,
    pub open: u64,
    pub leak_per_s: f64,
    pub oldest_age_s: f64,
    /// Its sockets in CLOSE_WAIT at the last report.
    pub close_wait: u64,
    /// Pre-existing fds (stack and age unknown).
    pub preexisting: bool,
}

/// Something a person should act on; sent once (when first seen).
#[derive(Clone, Debug)]
pub struct Finding {
    pub kind: &'static str,
    pub message: String,
    pub recommendation: String,
    pub site: Option<String>,
    pub count: Option<u64>,
    /// The fds concerned, "3 (pipe)", for inherited fds.
    pub fds: Option<Vec<String>>,
}

/// The live fds of a process grouped into sites, without what changes while
/// the fds stay (ages, socket states).
struct Groups {
    sites: FastMap<SiteKey, Group>,
    /// Fds old enough to count as leak candidates.
    candidates: u64,
    /// Holds until the fds change: no fd was too young to count, none went
    /// unlabelled, no label may still change.
    final_: bool,
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
    /// tracing (`attached_ns`).
    fn oldest_ns(&self, now_ns: u64, attached_ns: u64) -> u64 {
        let seen_ns = self.first_created.map_or(0, |c| now_ns.saturating_sub(c));
        if self.preexisting_fds {
            seen_ns.max(attached_ns)
        } else {
            seen_ns
        }
    }

    /// Its sockets in CLOSE_WAIT now (`sockets` is read on first need).
    fn close_wait(&self, sockets: &mut Option<Sockets>, pid: u32) -> u64 {
        if self.socket_inodes.is_empty() {
            return 0;
        }
        let table = sockets.get_or_insert_with(|| Sockets::read(pid));
        self.socket_inodes
            .iter()
            .filter(|&&i| {
                table
                    .get(i)
                    .is_some_and(|s| s.state == Some(TcpState::CloseWait))
            })
            .count() as u64
    }
}

pub struct ProcLeaks {
    cfg: Config,
    /// The last grouping, with the fds version it was made from, while it
    /// holds: a report of a process whose fds did not change reuses it.
    grouped: Option<(u64, Groups)>,
    /// (seconds, leak-candidate fds of the process).
    samples: VecDeque<(f64, f64)>,
    pub sites: HashMap<SiteKey, Site>,
    /// Labels of live fds by (fd, creation time): each fd is read from /proc
    /// once, at the first report it survives to. With each, the last report
    /// that saw the fd, so the labels of closed fds can be dropped.
    labels: FastMap<(u32, u64), (Label, u64)>,
    /// One copy of each label text: a process holding 19 000 fds on one file
    /// keeps one string, not 19 000.
    texts: FastSet<Rc<str>>,
    /// Groupings made, the stamp of `labels`.
    groupings: u64,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    pub status: Status,
    /// Worst status reached, for --fail-on.
    pub worst: Status,
    reported: HashSet<String>,
    pub findings: Vec<Finding>,
}

impl ProcLeaks {
    pub fn new(cfg: Config) -> Self {
        ProcLeaks {
            cfg,
            grouped: None,
            samples: VecDeque::new(),
            sites: HashMap::new(),
            labels: FastMap::new(),
            texts: FastSet::new(),
            groupings: 0,
            leak_per_s: 0.0,
            seconds_to_emfile: None,
            status: Status::Ok,
            worst: Status::Ok,
            reported: HashSet::new(),
            findings: Vec::new(),
        }
    }

    /// Labels the fds found at attach from the walk that found them, so the
    /// first report does not walk the table a second time. Pre-existing fds
    /// have creation time 0 in the kernel map, and are cached under it.
    pub fn seed_labels(&mut self, pid: u32, found: Vec<ProcFd>) {
        let kinds: Vec<(u32, FdKind)> = found.iter().map(|f| (f.fd, f.kind)).collect();
        let links = Links::walked(pid, found);
        let mut sockets = None;
        for (fd, kind) in kinds {
            if let Some(l) = label::label(&links, fd, kind, 0, &mut sockets)
                && !l.provisional
            {
                self.remember((fd, 0), l);
            }
        }
    }

    /// The process exited: what was kept about its fds goes (its sites stay
    /// for the closing summary).
    pub fn forget_fds(&mut self) {
        self.labels = FastMap::new();
        self.texts = FastSet::new();
        self.grouped = None;
    }

    /// Caches the label of the fd `key` names, sharing its text.
    fn remember(&mut self, key: (u32, u64), mut l: Label) {
        match self.texts.get(&l.text) {
            Some(t) => l.text = t.clone(),
            None => {
                self.texts.insert(l.text.clone());
            }
        }
        self.labels.insert(key, (l, self.groupings));
    }

    /// Groups the live fds into sites, labelling those not labelled yet.
    fn group(
        &mut self,
        site_of: &mut dyn FnMut(u64) -> u64,
        links: &dyn Fn(usize) -> Option<Links>,
        fds: &[LiveFd],
        now_ns: u64,
    ) -> Groups {
        let min_age_ns = self.cfg.min_age.as_nanos() as u64;
        let mut sockets: Option<Sockets> = None;
        self.groupings += 1;
        let stamp = self.groupings;
        let mut unlabeled = 0;
        for f in fds {
            match self.labels.get_mut(&(f.fd, f.info.created_ns)) {
                Some(e) => e.1 = stamp,
                None => unlabeled += 1,
            }
        }
        // Labels of fds closed since the last report.
        self.labels.retain(|_, e| e.1 == stamp);
        self.texts.retain(|t| Rc::strong_count(t) > 1);
        let links = if unlabeled > 0 {
            links(unlabeled)
        } else {
            None
        };
        let mut out = Groups {
            sites: FastMap::new(),
            candidates: 0,
            final_: true,
        };
        for f in fds {
            let age_ns = now_ns.saturating_sub(f.info.created_ns);
            let preexisting = f.info.flags & FD_PREEXISTING != 0;
            if !preexisting && age_ns < min_age_ns {
                out.final_ = false; // a candidate at a later report
                continue;
            }
            out.candidates += 1;
            let cache_key = (f.fd, f.info.created_ns);
            let kind = FdKind::from_u8(f.info.kind);
            let (text, socket_inode) = match self.labels.get(&cache_key) {
                Some((l, _)) => (l.text.clone(), l.socket_inode),
                None => {
                    let Some(l) = links
                        .as_ref()
                        .and_then(|d| label::label(d, f.fd, kind, f.info.detail, &mut sockets))
                    else {
                        out.final_ = false;
                        continue; // closed since the map was read
                    };
                    let found = (l.text.clone(), l.socket_inode);
                    if l.provisional {
                        out.final_ = false;
                    } else {
                        self.remember(cache_key, l);
                    }
                    found
                }
            };
            let key = SiteKey {
                stack: site_of(f.info.site),
                kind: f.info.kind,
                resource: text,
            };
            let g = out.sites.entry(key).or_insert_with(|| Group {
                open: 0,
                first_created: None,
                preexisting_fds: false,
                preexisting,
                socket_inodes: Vec::new(),
            });
            g.open += 1;
            if preexisting {
                g.preexisting_fds = true;
            } else {
                let c = f.info.created_ns;
                g.first_created = Some(g.first_created.map_or(c, |m| m.min(c)));
            }
            g.socket_inodes.extend(socket_inode);
        }
        out
    }

    /// Takes one report's view of the process: its live fds (from the kernel
    /// map) and `fds_version`, which changes whenever they do; `now_ns` on
    /// the kernel's clock, `t` seconds since start; `site_of` maps a kernel
    /// stack id to its canonical call-site stack; `links(n)` opens what
    /// names the process's fds when n need a label. Returns the findings
    /// that are new since the last report.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        pid: u32,
        site_of: &mut dyn FnMut(u64) -> u64,
        links: &dyn Fn(usize) -> Option<Links>,
        fds: &[LiveFd],
        fds_version: u64,
        now_ns: u64,
        t: f64,
        open_fds: u64,
        soft_limit: Option<u64>,
        failed: bool,
    ) -> Vec<Finding> {
        let attached_ns = (t * 1e9) as u64;
        // An outdated grouping goes before the new one is made, so that the
        // label texts only it held are let go.
        let kept = self.grouped.take().filter(|(v, _)| *v == fds_version);
        let groups = match kept {
            Some((_, g)) => g,
            None => self.group(site_of, links, fds, now_ns),
        };
        // Series: every known site gets a sample, 0 when it has no fd now.
        for (key, g) in &groups.sites {
            self.sites.entry(key.clone()).or_insert_with(|| Site {
                id: key.id(pid),
                key: key.clone(),
                samples: VecDeque::new(),
                open: 0,
                leak_per_s: 0.0,
                oldest_age_s: 0.0,
                close_wait: 0,
                preexisting: g.preexisting,
            });
        }
        // Sockets change state without a syscall of the process's: looked up
        // at every report.
        let mut sockets: Option<Sockets> = None;
        let window = self.cfg.window.as_secs_f64();
        for site in self.sites.values_mut() {
            let (n, age_ns, cw) = match groups.sites.get(&site.key) {
                Some(g) => (
                    g.open,
                    g.oldest_ns(now_ns, attached_ns),
                    g.close_wait(&mut sockets, pid),
                ),
                None => (0, 0, 0),
            };
            site.open = n;
            site.oldest_age_s = age_ns as f64 / 1e9;
            site.close_wait = cw;
            push(&mut site.samples, (t, n as f64), window);
            site.leak_per_s = slope(&site.samples);
        }
        let candidates = groups.candidates;
        if groups.final_ {
            self.grouped = Some((fds_version, groups));
        }
        self.sites
            .retain(|_, s| s.open > 0 || s.samples.iter().any(|&(_, n)| n > 0.0));

        push(&mut self.samples, (t, candidates as f64), window);
        self.leak_per_s = slope(&self.samples);
        self.seconds_to_emfile = match soft_limit {
            Some(l) if self.leak_per_s > 0.0 => {
                Some((l.saturating_sub(open_fds)) as f64 / self.leak_per_s)
            }
            _ => None,
        };
        self.status = status(
            open_fds,
            soft_limit,
            self.seconds_to_emfile,
            failed,
            &self.cfg.thresholds,
        );
        self.worst = self.worst.max(self.status);
        self.new_findings()
    }

    /// Sites by leak rate, fastest first.
    pub fn top_sites(&self, n: usize) -> Vec<&Site> {
        let mut v: Vec<&Site> = self.sites.values().filter(|s| s.open > 0).collect();
        v.sort_by(|a, b| {
            b.leak_per_s
                .total_cmp(&a.leak_per_s)
                .then(b.open.cmp(&a.open))
        });
        v.truncate(n);
        v
    }

    fn new_findings(&mut self) -> Vec<Finding> {
        let mut out = Vec::new();
        // A site that grows while the process does not is replacing fds of
        // another site (a pool refilling after attach: its old fds count as
        // pre-existing), not leaking.
        let enough = self.samples.len() >= 3 && self.leak_per_s >= LEAK_FINDING_RATE;
        // CLOSE_WAIT is about the peer: one finding per resource, whatever
        // the sites (pre-existing fds form a site of their own).
        let mut close_wait: HashMap<&str, (u64, &Site)> = HashMap::new();
        for s in self.sites.values() {
            if enough && !s.preexisting && s.leak_per_s >= LEAK_FINDING_RATE {
                let key = format!("leak {}", s.id);
                if self.reported.insert(key) {
                    out.push(leak_finding(s));
                }
            }
            if s.close_wait > 0 {
                let e = close_wait.entry(&s.key.resource).or_insert((0, s));
                e.0 += s.close_wait;
                if s.leak_per_s > e.1.leak_per_s {
                    e.1 = s;
                }
            }
        }
        for (resource, (n, s)) in close_wait {
            if self.reported.insert(format!("close_wait {resource}")) {
                out.push(close_wait_finding(s, n));
            }
        }
        self.findings.extend(out.iter().cloned());
        out
    }

    /// Records a finding that came from an event (EMFILE, inherited fds);
    /// None when one of that key was already reported.
    pub fn event_finding(&mut self, key: String, f: Finding) -> Option<Finding> {
        if !self.reported.insert(key) {
            return None;
        }
        self.findings.push(f.clone());
        Some(f)
    }
}

/// A site growing at least this fast over the window is reported as a leak.
const LEAK_FINDING_RATE: f64 = 0.2;

fn push(samples: &mut VecDeque<(f64, f64)>, s: (f64, f64), window: f64) {
    samples.push_back(s);
    while samples.front().is_some_and(|&(t, _)| t < s.0 - window) {
        samples.pop_front();
    }
}

/// Least-squares slope of (t, y): fds per second.
pub fn slope(samples: &VecDeque<(f64, f64)>) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mt, my) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), &(t, y)| (a + t / n, b + y / n));
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, y) in samples {
        num += (t - mt) * (y - my);
        den += (t - mt) * (t - mt);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

pub fn status(
    open: u64,
    soft: Option<u64>,
    secs: Option<f64>,
    failed: bool,
    th: &Thresholds,
) -> Status {
    if failed {
        return Status::Exhausted;
    }
    let pct = soft
        .filter(|&l| l > 0)
        .map(|l| open as f64 * 100.0 / l as f64)
        .unwrap_or(0.0);
    let within = |d: Duration| secs.is_some_and(|s| s <= d.as_secs_f64());
    if pct >= th.crit_pct || within(th.crit_within) {
        Status::Critical
    } else if pct >= th.warn_pct || within(th.warn_within) {
        Status::Warning
    } else {
        Status::Ok
    }
}

fn leak_finding(s: &Site) -> Finding {
    let kind = FdKind::from_u8(s.key.kind);
    let what = match kind {
        FdKind::Socket => format!("connections ({})", s.key.resource),
        FdKind::Pipe => "pipes".to_string(),
        FdKind::File => format!("files {}", s.key.resource),
        k => format!("{} fds", k.name()),
    };
    let recommendation = match kind {
        FdKind::Socket => {
            "Close each connection when done (a context manager or try/finally), or share one long-lived pooled client instead of creating one per request."
        }
        FdKind::Pipe => {
            "Close the pipes of every child you start (read them with communicate(), or close stdout/stderr) and wait() for it."
        }
        FdKind::File if s.key.resource.contains("sqlite") || s.key.resource.ends_with(".db") => {
            "Close each database connection (a context manager or a pool), or reuse one connection."
        }
        FdKind::File => {
            "Close each file when done (a context manager or try/finally); if a handler or client opens it, create that object once and reuse it."
        }
        _ => "Close these fds when done, or create the object that owns them once and reuse it.",
    };
    Finding {
        kind: "leak",
        message: format!(
            "{what} are opened and not closed: +{:.1} fds/s, {} open, oldest {:.0}s",
            s.leak_per_s, s.open, s.oldest_age_s
        ),
        recommendation: recommendation.to_string(),
        site: Some(s.id.clone()),
        count: Some(s.open),
        fds: None,
    }
}

fn close_wait_finding(s: &Site, n: u64) -> Finding {
    Finding {
        kind: "close_wait",
        message: format!(
            "{n} sockets to {} are in CLOSE_WAIT: the peer closed them and this process never did",
            s.key.resource
        ),
        recommendation: "Close the connection once the response is read, including on error paths; CLOSE_WAIT sockets only go away when the process closes them.".to_string(),
        site: Some(s.id.clone()),
        count: Some(n),
        fds: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: VecDeque<(f64, f64)> =
            (0..10).map(|i| (i as f64, 5.0 + 2.0 * i as f64)).collect();
        assert!((slope(&line) - 2.0).abs() < 1e-9);
        let flat: VecDeque<(f64, f64)> = (0..10).map(|i| (i as f64, [3.0, 5.0][i % 2])).collect();
        assert!(slope(&flat).abs() < 0.25);
        assert_eq!(slope(&VecDeque::from([(1.0, 4.0)])), 0.0);
    }

    #[test]
    fn status_thresholds() {
        let th = Thresholds {
            warn_pct: 80.0,
            crit_pct: 90.0,
            warn_within: Duration::from_secs(3600),
            crit_within: Duration::from_secs(300),
        };
        assert_eq!(status(10, Some(1024), None, false, &th), Status::Ok);
        assert_eq!(status(830, Some(1024), None, false, &th), Status::Warning);
        assert_eq!(status(930, Some(1024), None, false, &th), Status::Critical);
        assert_eq!(
            status(10, Some(1024), Some(1000.0), false, &th),
            Status::Warning
        );
        assert_eq!(
            status(10, Some(1024), Some(100.0), false, &th),
            Status::Critical
        );
        assert_eq!(status(10, Some(1024), None, true, &th), Status::Exhausted);
    }
}
