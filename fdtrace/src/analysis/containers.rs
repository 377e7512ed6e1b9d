//! Per container: the figures of its traced processes added up at each
//! report, for the `container` records and the per-container metrics.
//! Processes outside any container are grouped by their cgroup
//! (`/system.slice/nginx.service`).
//!
//! The totals (opened, closed, EMFILE/ENFILE failures) include the
//! container's processes that exited, and a process moved to another
//! cgroup takes only what it did after the move to its new group: each
//! group's totals only grow, as the metrics counters need.
use std::collections::{HashMap, HashSet};

use super::{Errno, ProcessReport, Status, Totals};

/// How long the totals of a group with no traced process left are kept, in
/// case a process appears in it again (a service restarted in its cgroup):
/// its counters then go on from where they were.
pub const FORGET_AFTER_S: f64 = 300.0;

/// Who a process is: its cgroup, container and pod. `None` where it does
/// not apply (a host process has no container) or is not known.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attribution {
    /// The cgroup v2 path (as in the `0::` line of /proc/PID/cgroup).
    pub cgroup: Option<String>,
    /// The container's full id.
    pub container_id: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub container: Option<String>,
    pub pod_uid: Option<String>,
    /// Kubernetes's name of the QoS class (`Guaranteed`, `Burstable`,
    /// `BestEffort`).
    pub qos: Option<&'static str>,
    /// Its pid in its own pid namespace, when that is not the host's.
    pub pid_in_container: Option<u32>,
}

impl Attribution {
    /// The group a process is counted in: its container, else its cgroup;
    /// None when neither is known (its cgroup could not be read).
    fn key(&self) -> Option<GroupKey<&str>> {
        match (&self.container_id, &self.cgroup) {
            (Some(id), _) => Some(GroupKey::Container(id)),
            (None, Some(path)) => Some(GroupKey::Cgroup(path)),
            (None, None) => None,
        }
    }
}

/// A group's key: owned where it is kept across reports, borrowed from
/// the report's attributions where a report groups its processes (no
/// copy of each process's cgroup path at every report).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum GroupKey<S = String> {
    Container(S),
    Cgroup(S),
}

impl GroupKey {
    fn borrowed(&self) -> GroupKey<&str> {
        match self {
            GroupKey::Container(s) => GroupKey::Container(s),
            GroupKey::Cgroup(s) => GroupKey::Cgroup(s),
        }
    }
}

impl GroupKey<&str> {
    fn owned(self) -> GroupKey {
        match self {
            GroupKey::Container(s) => GroupKey::Container(s.to_owned()),
            GroupKey::Cgroup(s) => GroupKey::Cgroup(s.to_owned()),
        }
    }
}

/// One container (or host cgroup) at one report.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerReport {
    pub container_id: Option<String>,
    /// The outermost cgroup of its processes: the container's own (a
    /// process may sit in a sub-cgroup the container made).
    pub cgroup: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub container: Option<String>,
    pub pod_uid: Option<String>,
    pub qos: Option<&'static str>,
    /// Its traced live processes, and their pids (ascending).
    pub processes: u64,
    pub pids: Vec<u32>,
    pub open_fds: u64,
    /// The highest `open_fds / soft limit` of its processes, at most 1; None
    /// when none has a limit.
    pub fd_usage_ratio: Option<f64>,
    /// The sum of its processes' leak rates.
    pub leak_per_s: f64,
    /// The soonest of its processes' forecasts.
    pub seconds_to_emfile: Option<f64>,
    /// The worst of its processes' statuses.
    pub status: Status,
    /// Since tracing began, its exited processes included: fds opened and
    /// closed, EMFILE and ENFILE failures.
    pub opened: u64,
    pub closed: u64,
    pub emfile: u64,
    pub enfile: u64,
    /// Its processes' sockets in CLOSE_WAIT.
    pub close_wait: u64,
}

/// Counters that only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    pub opened: u64,
    pub closed: u64,
    pub emfile: u64,
    pub enfile: u64,
}

impl Counters {
    fn add(self, o: Counters) -> Counters {
        Counters {
            opened: self.opened + o.opened,
            closed: self.closed + o.closed,
            emfile: self.emfile + o.emfile,
            enfile: self.enfile + o.enfile,
        }
    }

    /// What was done since `base` (saturating: a pid reused under the same
    /// entry starts again from 0).
    fn since(self, base: Counters) -> Counters {
        Counters {
            opened: self.opened.saturating_sub(base.opened),
            closed: self.closed.saturating_sub(base.closed),
            emfile: self.emfile.saturating_sub(base.emfile),
            enfile: self.enfile.saturating_sub(base.enfile),
        }
    }

    fn max(self, o: Counters) -> Counters {
        Counters {
            opened: self.opened.max(o.opened),
            closed: self.closed.max(o.closed),
            emfile: self.emfile.max(o.emfile),
            enfile: self.enfile.max(o.enfile),
        }
    }
}

/// A live process as last reported.
struct Member {
    key: GroupKey,
    last: Counters,
    /// Its counters when it joined the group (0, or those at a move).
    baseline: Counters,
}

/// What a group keeps beyond its live processes.
#[derive(Default)]
struct Kept {
    /// Added up from processes that exited or moved out.
    departed: Counters,
    /// The last report that had a process in it.
    last_seen_ts: f64,
}

/// The groups across reports.
#[derive(Default)]
pub struct Containers {
    members: HashMap<u32, Member>,
    kept: HashMap<GroupKey, Kept>,
}

impl Containers {
    /// The groups of one report's processes.
    pub fn report(&mut self, ts: f64, processes: &[ProcessReport]) -> Vec<ContainerReport> {
        let mut groups: HashMap<GroupKey<&str>, (ContainerReport, Counters)> = HashMap::new();
        for p in processes {
            let who = &*p.figures.attribution;
            let Some(key) = who.key() else { continue };
            let f = &p.figures;
            let now = Counters {
                opened: f.opened,
                closed: f.closed,
                emfile: f.emfile,
                enfile: f.enfile,
            };
            let m = self.members.entry(f.pid).or_insert_with(|| Member {
                key: key.owned(),
                last: Counters::default(),
                baseline: Counters::default(),
            });
            if m.key.borrowed() != key {
                // Moved: what it did until now stays with the old group.
                let done = m.last.since(m.baseline);
                let old = self.kept.entry(m.key.clone()).or_default();
                old.departed = old.departed.add(done);
                m.key = key.owned();
                m.baseline = m.last;
            }
            m.last = m.last.max(now);
            let mine = m.last.since(m.baseline);
            let (g, sum) = groups.entry(key).or_insert_with(|| {
                (
                    ContainerReport {
                        container_id: who.container_id.clone(),
                        cgroup: who.cgroup.clone(),
                        pod: None,
                        namespace: None,
                        container: None,
                        pod_uid: None,
                        qos: None,
                        processes: 0,
                        pids: Vec::new(),
                        open_fds: 0,
                        fd_usage_ratio: None,
                        leak_per_s: 0.0,
                        seconds_to_emfile: None,
                        status: Status::Ok,
                        opened: 0,
                        closed: 0,
                        emfile: 0,
                        enfile: 0,
                        close_wait: 0,
                    },
                    Counters::default(),
                )
            });
            *sum = sum.add(mine);
            if let Some(c) = &who.cgroup
                && g.cgroup.as_ref().is_none_or(|g| c.len() < g.len())
            {
                g.cgroup = Some(c.clone());
            }
            fill(&mut g.pod, &who.pod);
            fill(&mut g.namespace, &who.namespace);
            fill(&mut g.container, &who.container);
            fill(&mut g.pod_uid, &who.pod_uid);
            g.qos = g.qos.or(who.qos);
            g.processes += 1;
            g.pids.push(f.pid);
            g.open_fds += f.open_fds;
            if let Some(soft) = f.soft_limit.filter(|&l| l > 0) {
                let ratio = (f.open_fds as f64 / soft as f64).min(1.0);
                g.fd_usage_ratio = Some(g.fd_usage_ratio.map_or(ratio, |r| r.max(ratio)));
            }
            g.leak_per_s += f.leak_per_s;
            if let Some(s) = f.seconds_to_emfile {
                g.seconds_to_emfile = Some(g.seconds_to_emfile.map_or(s, |t| t.min(s)));
            }
            g.status = g.status.max(f.status);
            g.close_wait += p.close_wait;
        }
        // A process left out of this report but not exited yet (found gone
        // at this report: its exit event, or the next report, ends it)
        // still counts in its group's totals, or they would dip for one
        // report, which Prometheus takes for a counter reset.
        let reported: HashSet<u32> = processes.iter().map(|p| p.figures.pid).collect();
        for (pid, m) in &self.members {
            if !reported.contains(pid)
                && let Some((_, sum)) = groups.get_mut(&m.key.borrowed())
            {
                *sum = sum.add(m.last.since(m.baseline));
            }
        }
        let mut out: Vec<(GroupKey<&str>, ContainerReport)> = groups
            .into_iter()
            .map(|(key, (mut g, sum))| {
                g.pids.sort_unstable();
                let kept = self.kept.entry(key.owned()).or_default();
                kept.last_seen_ts = ts;
                let t = sum.add(kept.departed);
                (g.opened, g.closed, g.emfile, g.enfile) = (t.opened, t.closed, t.emfile, t.enfile);
                (key, g)
            })
            .collect();
        self.kept
            .retain(|_, k| ts - k.last_seen_ts <= FORGET_AFTER_S);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, g)| g).collect()
    }

    /// A call of `pid` failed with EMFILE or ENFILE (`who` is its
    /// attribution, or its parent's before its first report). The kernel's
    /// counts at the next report include it; counted here, it is not lost
    /// when the process exits before that report (the exit event carries
    /// no error counts).
    pub fn fd_error(&mut self, pid: u32, who: &Attribution, errno: Errno) {
        let m = match self.members.get_mut(&pid) {
            Some(m) => m,
            None => {
                let Some(key) = who.key() else { return };
                self.members.entry(pid).or_insert(Member {
                    key: key.owned(),
                    last: Counters::default(),
                    baseline: Counters::default(),
                })
            }
        };
        match errno {
            Errno::Emfile => m.last.emfile += 1,
            Errno::Enfile => m.last.enfile += 1,
        }
    }

    /// Process `pid` exited with `totals`, attributed to `who` (its own
    /// attribution if it was reported, else its parent's: a process that
    /// lived less than an interval still counts in its group's totals).
    pub fn exited(&mut self, pid: u32, who: &Attribution, totals: Totals) {
        let at_exit = Counters {
            opened: totals.opened,
            closed: totals.closed,
            emfile: 0,
            enfile: 0,
        };
        let (key, done) = match self.members.remove(&pid) {
            Some(m) => {
                let done = m.last.max(at_exit).since(m.baseline);
                (m.key, done)
            }
            None => match who.key() {
                Some(key) => (key.owned(), at_exit),
                None => return,
            },
        };
        let kept = self.kept.entry(key).or_default();
        kept.departed = kept.departed.add(done);
    }
}

/// Sets `to` from `from` if it has no value yet.
fn fill(to: &mut Option<String>, from: &Option<String>) {
    if to.is_none() {
        to.clone_from(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::ProcessFigures;

    fn process(pid: u32, open: u64, soft: u64, opened: u64, status: Status) -> ProcessReport {
        ProcessReport::of(ProcessFigures {
            comm: "x".into(),
            soft_limit: Some(soft),
            hard_limit: Some(soft),
            pct_used: None,
            opened,
            closed: opened - open,
            ..ProcessFigures::example(pid, open, status)
        })
    }

    const ID: &str = "5f68f626d2ff4d67bbd3a38f89148d2772aa77f0df1417739d24ed7c1f202b81";

    /// A report of `processes`, each attributed to its pair.
    fn report(
        c: &mut Containers,
        ts: f64,
        processes: &[(&ProcessReport, &Attribution)],
    ) -> Vec<ContainerReport> {
        let reports: Vec<ProcessReport> = processes
            .iter()
            .map(|(p, who)| {
                let mut p = (*p).clone();
                p.figures.attribution = std::rc::Rc::new((*who).clone());
                p
            })
            .collect();
        c.report(ts, &reports)
    }

    fn in_pod(cgroup: &str) -> Attribution {
        Attribution {
            cgroup: Some(cgroup.into()),
            container_id: Some(ID.into()),
            pod: Some("web-0".into()),
            namespace: Some("shop".into()),
            container: Some("app".into()),
            pod_uid: Some("1b2c".into()),
            qos: Some("BestEffort"),
            pid_in_container: Some(1),
        }
    }

    fn host(cgroup: &str) -> Attribution {
        Attribution {
            cgroup: Some(cgroup.into()),
            ..Attribution::default()
        }
    }

    #[test]
    fn a_container_adds_up_its_processes() {
        let mut c = Containers::default();
        let mut a = process(10, 900, 1000, 950, Status::Critical);
        a.figures.leak_per_s = 2.0;
        a.figures.seconds_to_emfile = Some(50.0);
        a.close_wait = 3;
        let mut b = process(11, 20, 100, 30, Status::Ok);
        b.figures.leak_per_s = 0.5;
        b.figures.seconds_to_emfile = Some(160.0);
        b.figures.emfile = 2;
        let (wa, wb) = (
            in_pod("/kubepods/besteffort/pod1b2c/x"),
            in_pod("/kubepods/besteffort/pod1b2c/x/sub"),
        );
        let other = host("/system.slice/nginx.service");
        let n = process(12, 5, 1024, 5, Status::Ok);
        let out = report(&mut c, 1.0, &[(&a, &wa), (&b, &wb), (&n, &other)]);
        assert_eq!(out.len(), 2);
        let g = &out[0];
        assert_eq!(g.container_id.as_deref(), Some(ID));
        assert_eq!(g.cgroup.as_deref(), Some("/kubepods/besteffort/pod1b2c/x"));
        assert_eq!(
            (
                g.pod.as_deref(),
                g.namespace.as_deref(),
                g.container.as_deref()
            ),
            (Some("web-0"), Some("shop"), Some("app"))
        );
        assert_eq!((g.processes, g.open_fds), (2, 920));
        assert_eq!(g.fd_usage_ratio, Some(0.9));
        assert_eq!(g.leak_per_s, 2.5);
        assert_eq!(g.seconds_to_emfile, Some(50.0));
        assert_eq!(g.status, Status::Critical);
        assert_eq!((g.opened, g.closed, g.emfile, g.enfile), (980, 60, 2, 0));
        assert_eq!(g.close_wait, 3);
        let h = &out[1];
        assert_eq!(h.container_id, None);
        assert_eq!(h.cgroup.as_deref(), Some("/system.slice/nginx.service"));
        assert_eq!((h.processes, h.open_fds, h.pod.as_deref()), (1, 5, None));
        assert_eq!(h.seconds_to_emfile, None);
    }

    #[test]
    fn the_ratio_is_at_most_one_and_none_without_limits() {
        let mut c = Containers::default();
        // The limit lowered below what the process holds.
        let over = process(10, 300, 100, 300, Status::Critical);
        let mut unlimited = process(11, 5, 1, 5, Status::Ok);
        unlimited.figures.soft_limit = None;
        let (w, u) = (host("/a"), host("/b"));
        let out = report(&mut c, 1.0, &[(&over, &w), (&unlimited, &u)]);
        assert_eq!(out[0].fd_usage_ratio, Some(1.0));
        assert_eq!(out[1].fd_usage_ratio, None);
    }

    #[test]
    fn totals_keep_exited_processes() {
        let mut c = Containers::default();
        let w = in_pod("/kubepods/x");
        let a = process(10, 10, 1024, 100, Status::Ok);
        let b = process(11, 5, 1024, 50, Status::Ok);
        let out = report(&mut c, 1.0, &[(&a, &w), (&b, &w)]);
        assert_eq!(out[0].opened, 150);
        // b exits having opened 20 more since its report.
        c.exited(
            11,
            &w,
            Totals {
                open_fds: 0,
                opened: 70,
                closed: 70,
            },
        );
        let out = report(&mut c, 2.0, &[(&a, &w)]);
        assert_eq!(out[0].processes, 1);
        assert_eq!(out[0].opened, 170);
        assert_eq!(out[0].closed, 90 + 70);
        // A process that never had a report, attributed by its parent.
        c.exited(
            99,
            &w,
            Totals {
                open_fds: 0,
                opened: 4,
                closed: 4,
            },
        );
        assert_eq!(report(&mut c, 3.0, &[(&a, &w)])[0].opened, 174);
        // Nothing known of it: no group.
        c.exited(98, &Attribution::default(), Totals::default());
        assert_eq!(c.kept.len(), 1);
    }

    #[test]
    fn a_process_left_out_before_its_exit_keeps_its_totals_in_the_group() {
        let mut c = Containers::default();
        let w = host("/svc");
        let a = process(10, 5, 1024, 100, Status::Ok);
        let b = process(11, 5, 1024, 50, Status::Ok);
        assert_eq!(report(&mut c, 1.0, &[(&a, &w), (&b, &w)])[0].opened, 150);
        // b was found gone at this report; its exit comes after it.
        let out = report(&mut c, 2.0, &[(&a, &w)]);
        assert_eq!((out[0].opened, out[0].processes), (150, 1));
        assert_eq!(out[0].pids, [10]);
        c.exited(11, &w, Totals::default());
        assert_eq!(report(&mut c, 3.0, &[(&a, &w)])[0].opened, 150);
    }

    #[test]
    fn fd_errors_between_reports_stay_counted_after_the_exit() {
        let mut c = Containers::default();
        let w = in_pod("/kubepods/x");
        let mut a = process(10, 5, 1024, 10, Status::Exhausted);
        a.figures.emfile = 1;
        let b = process(11, 5, 1024, 10, Status::Ok);
        assert_eq!(report(&mut c, 1.0, &[(&a, &w), (&b, &w)])[0].emfile, 1);
        // Two more failures, then the exit, before the next report.
        c.fd_error(10, &w, Errno::Emfile);
        c.fd_error(10, &w, Errno::Enfile);
        c.exited(10, &w, Totals::default());
        let out = report(&mut c, 2.0, &[(&b, &w)]);
        assert_eq!((out[0].emfile, out[0].enfile), (2, 1));
        // A failure of a child not reported yet, which exits unreported.
        c.fd_error(12, &w, Errno::Emfile);
        assert_eq!(report(&mut c, 3.0, &[(&b, &w)])[0].emfile, 3);
        c.exited(12, &w, Totals::default());
        assert_eq!(report(&mut c, 4.0, &[(&b, &w)])[0].emfile, 3);
        // The kernel's count at a report includes the failures seen before.
        c.fd_error(11, &w, Errno::Emfile);
        let mut b2 = b.clone();
        b2.figures.emfile = 1;
        assert_eq!(report(&mut c, 5.0, &[(&b2, &w)])[0].emfile, 4);
    }

    #[test]
    fn a_moved_process_leaves_what_it_did_with_its_old_group() {
        let mut c = Containers::default();
        let (old, new) = (host("/old"), host("/new"));
        let stay = process(1, 1, 1024, 1, Status::Ok);
        let before = process(10, 10, 1024, 100, Status::Ok);
        report(&mut c, 1.0, &[(&stay, &old), (&before, &old)]);
        let after = process(10, 10, 1024, 130, Status::Ok);
        let out = report(&mut c, 2.0, &[(&stay, &old), (&after, &new)]);
        let by = |p: &str| out.iter().find(|g| g.cgroup.as_deref() == Some(p)).unwrap();
        // The old group keeps the 100 (monotonic); the new one gets what
        // came after the report that saw it in the old one.
        assert_eq!(by("/old").opened, 101);
        assert_eq!(by("/old").processes, 1);
        assert_eq!(by("/new").opened, 30);
    }

    #[test]
    fn an_empty_group_is_forgotten_after_a_while() {
        let mut c = Containers::default();
        let w = host("/svc");
        let a = process(10, 1, 1024, 10, Status::Ok);
        report(&mut c, 1.0, &[(&a, &w)]);
        c.exited(10, &w, Totals::default());
        // Restarted in its cgroup within FORGET_AFTER_S: counters go on.
        let b = process(20, 1, 1024, 5, Status::Ok);
        assert_eq!(report(&mut c, 100.0, &[(&b, &w)])[0].opened, 15);
        c.exited(20, &w, Totals::default());
        assert!(report(&mut c, 100.0 + FORGET_AFTER_S + 1.0, &[]).is_empty());
        assert!(c.kept.is_empty());
        // A process with no cgroup known is in no group.
        let lost = process(30, 1, 1024, 5, Status::Ok);
        assert!(report(&mut c, 1000.0, &[(&lost, &Attribution::default())]).is_empty());
    }
}
