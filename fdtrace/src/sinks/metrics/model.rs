//! What `/metrics` shows, as pure functions of a report: the labels of a
//! container, the bound on the per-process series, which processes name
//! their sites, the site function label and `/healthz`'s staleness. The
//! container figures and their counters are the report's
//! (`analysis::containers`): the metrics add nothing up themselves.
use std::{
    cmp::Ordering,
    time::{Duration, Instant},
};

use crate::analysis::{Attribution, ContainerReport, ProcessFigures, ProcessReport, Status};

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
    /// The labels of a container of the report. Its `cgroup` is the
    /// container's own (the outermost of its processes'), also on the
    /// series of a process in a sub-cgroup of it, so that the rules'
    /// `{instance, cgroup}` lookups find its processes and sites.
    pub fn of_container(c: &ContainerReport) -> Self {
        Self::of([
            &c.namespace,
            &c.pod,
            &c.container,
            &c.container_id,
            &c.cgroup,
        ])
    }

    /// The labels of a process in no container of the report (its cgroup
    /// could not be read): whatever its attribution knows, empty mostly.
    pub fn of_process(a: &Attribution) -> Self {
        Self::of([
            &a.namespace,
            &a.pod,
            &a.container,
            &a.container_id,
            &a.cgroup,
        ])
    }

    fn of([namespace, pod, container, container_id, cgroup]: [&Option<String>; 5]) -> Self {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        ContainerLabels {
            namespace: text(namespace),
            pod: text(pod),
            container: text(container),
            container_id: text(container_id),
            cgroup: text(cgroup),
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

/// Whether a process's sites are exported: it had a leak finding (a slow
/// leak far from the limit still names its site) or its status is worse
/// than ok.
pub fn sites_wanted(p: &ProcessReport) -> bool {
    p.figures.status > Status::Ok || p.leak_found
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

/// `/healthz`: whether reports run, that is the last one (or the start of
/// tracing, before the first) is at most three intervals old; not while
/// fdtrace is still attaching (`last` None).
pub fn healthy(last: Option<Instant>, now: Instant, interval: Duration) -> bool {
    last.is_some_and(|last| now.saturating_duration_since(last) <= interval.saturating_mul(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risk_order_is_status_then_soonest_emfile_then_fullest_then_fastest() {
        let mut a = ProcessFigures::example(1, 10, Status::Warning);
        a.seconds_to_emfile = Some(900.0);
        let mut b = ProcessFigures::example(2, 10, Status::Warning);
        b.seconds_to_emfile = Some(100.0);
        let c = ProcessFigures::example(3, 900, Status::Ok);
        let mut d = ProcessFigures::example(4, 10, Status::Ok);
        d.leak_per_s = 2.0;
        let e = ProcessFigures::example(5, 10, Status::Exhausted);
        let all = [a, b, c, d, e];
        let order: Vec<u32> = bounded(&all, 10, 10).iter().map(|f| f.pid).collect();
        assert_eq!(order, [5, 2, 1, 3, 4]);
    }

    #[test]
    fn bound_is_top_k_plus_not_ok_up_to_max() {
        let mut all: Vec<ProcessFigures> = (1..=50)
            .map(|p| ProcessFigures::example(p, p.into(), Status::Ok))
            .collect();
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
        assert!(healthy(Some(t0), t0, i));
        assert!(healthy(Some(t0), t0 + Duration::from_millis(3000), i));
        assert!(!healthy(Some(t0), t0 + Duration::from_millis(3001), i));
        // A clock read before the report: not stale.
        assert!(healthy(Some(t0 + i), t0, i));
        // Still attaching: not tracing yet.
        assert!(!healthy(None, t0, i));
    }

    #[test]
    fn sites_wanted_for_a_leak_finding_or_worse_than_ok() {
        let ok = ProcessReport::of(ProcessFigures::example(1, 5, Status::Ok));
        assert!(!sites_wanted(&ok));
        assert!(sites_wanted(&ProcessReport::of(ProcessFigures::example(
            1,
            5,
            Status::Warning
        ))));
        // At the report of the finding and every one after it.
        let leaking = ProcessReport {
            leak_found: true,
            ..ok
        };
        assert!(sites_wanted(&leaking));
    }
}
