//! What the analysis hands to the sinks: one [`Report`] per interval, a
//! [`Notice`] per event between reports, [`Start`] first and [`Summary`]
//! last.
use std::rc::Rc;

use fdtrace_common::{FD_KINDS, FdKind};
use serde::{Deserialize, Serialize};

use super::{
    Attribution, ContainerReport, Errno, Finding, PythonSite, Request, Stack, Status,
    short_lived::FoldedGroup,
};

/// The record that opens a report: what was asked.
#[derive(Clone, Debug, PartialEq)]
pub struct Start {
    pub ts: f64,
    pub request: Request,
}

/// What the kernel side could not keep since the last report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Events dropped: the ring buffer was full.
    RingBuffer { count: u64 },
    /// Fds not tracked: the fd map was full.
    FdsMapFull { count: u64, max_entries: u32 },
    /// Processes not traced: the process map was full.
    ProcsMapFull { count: u64, max_entries: u32 },
}

/// Why a process was resynced with /proc after its report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resync {
    /// A confirmed difference with /proc/PID/fd.
    Drift(i64),
    /// The kernel side said it could not follow a change exactly.
    Inexact,
}

/// Since tracing began: what the kernel side lost, and the drift
/// resyncs. Counters that only grow, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCounts {
    pub lost_events: u64,
    pub fds_map_full: u64,
    pub procs_map_full: u64,
    /// Processes resynced with /proc/PID/fd after a confirmed difference.
    pub drift_resyncs: u64,
}

impl SessionCounts {
    /// Adds what one report lost and resynced.
    pub fn add(&mut self, losses: &[Loss], processes: &[ProcessReport]) {
        for l in losses {
            match *l {
                Loss::RingBuffer { count } => self.lost_events += count,
                Loss::FdsMapFull { count, .. } => self.fds_map_full += count,
                Loss::ProcsMapFull { count, .. } => self.procs_map_full += count,
            }
        }
        self.drift_resyncs += processes
            .iter()
            .filter(|p| matches!(p.resync, Some(Resync::Drift(_))))
            .count() as u64;
    }
}

/// One report, every traced live process.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub ts: f64,
    /// Since the last report.
    pub losses: Vec<Loss>,
    /// Since tracing began, this report's losses included.
    pub counts: SessionCounts,
    pub processes: Vec<ProcessReport>,
    /// Each container (or host cgroup) with a traced process.
    pub containers: Vec<ContainerReport>,
}

#[derive(Clone, Debug)]
pub struct ProcessReport {
    pub figures: ProcessFigures,
    /// The fastest-growing sites (--top).
    pub sites: Vec<SiteReport>,
    /// Findings new at this report.
    pub findings: Vec<Finding>,
    /// A `leak` finding was made for it, at this report or before: its
    /// sites are worth naming even while its status is ok.
    pub leak_found: bool,
    pub resync: Option<Resync>,
    /// Its sockets in CLOSE_WAIT.
    pub close_wait: u64,
}

/// One process at one report.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessFigures {
    pub pid: u32,
    pub ppid: Option<u32>,
    pub comm: String,
    pub open_fds: u64,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
    pub pct_used: Option<f64>,
    pub by_kind: [u64; FD_KINDS],
    /// `open_fds == preexisting + opened - closed` whenever the count is exact.
    pub preexisting: u64,
    pub opened: u64,
    pub closed: u64,
    pub opened_per_s: f64,
    pub closed_per_s: f64,
    pub emfile: u64,
    pub enfile: u64,
    pub drift: Option<i64>,
    pub status: Status,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    /// Fds created over the --stack-rate budget (no call-site stack).
    pub stacks_not_sampled: u64,
    /// Shares its fd table with another process (clone CLONE_FILES without
    /// CLONE_THREAD): its counts may drift, and are resynced.
    pub shares_fd_table: bool,
    /// Its cgroup, container and pod.
    pub attribution: Rc<Attribution>,
}

/// One call site at one report.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteReport {
    pub id: String,
    pub kind: FdKind,
    pub resource: Rc<str>,
    pub stack: Stack,
    /// Python processes: the Python stack that made the site's fds.
    pub python: Option<PythonSite>,
    pub open_fds: u64,
    pub leak_per_s: f64,
    pub oldest_age_s: f64,
}

/// Fd totals of a process since tracing began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub open_fds: u64,
    pub opened: u64,
    pub closed: u64,
}

/// How a traced process ended, as far as fdtrace can know it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ending {
    /// It exited; only its parent learns the status, and that is not fdtrace.
    #[default]
    Exited,
    /// The `run` command exited with this code.
    Code(i32),
    /// The `run` command was killed by this signal.
    Signal(i32),
    /// A zombie when checked: it has exited and its fds are gone, its
    /// parent has not reaped it yet.
    Zombie,
    /// Still running, no longer traced: node mode's cgroup selection named
    /// it, and it was moved out of the selected cgroups.
    LeftSelection,
}

impl Ending {
    /// The status a shell would give: the code, or 128 + the signal.
    pub fn shell_status(self) -> Option<i32> {
        match self {
            Ending::Code(c) => Some(c),
            Ending::Signal(s) => Some(128 + s),
            Ending::Exited | Ending::Zombie | Ending::LeftSelection => None,
        }
    }
}

/// What ended the session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEnd {
    /// No traced process was left.
    #[default]
    AllExited,
    /// `--duration` ran out.
    Duration,
    Sigint,
    Sigterm,
    Sighup,
}

impl SessionEnd {
    pub fn text(self) -> &'static str {
        match self {
            SessionEnd::AllExited => "no traced process left",
            SessionEnd::Duration => "--duration reached",
            SessionEnd::Sigint => "SIGINT",
            SessionEnd::Sigterm => "SIGTERM",
            SessionEnd::Sighup => "SIGHUP",
        }
    }
}

/// An event between reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    Fork {
        ts: f64,
        pid: u32,
        ppid: u32,
    },
    Exec {
        ts: f64,
        pid: u32,
        comm: String,
    },
    Exit {
        ts: f64,
        pid: u32,
        comm: String,
        totals: Totals,
        ending: Ending,
    },
    /// A call that failed with EMFILE or ENFILE.
    FdError {
        ts: f64,
        pid: u32,
        tid: u32,
        syscall: &'static str,
        errno: Errno,
        resource: Option<String>,
        stack: Stack,
    },
    /// RLIMIT_NOFILE changed (None: unlimited).
    Rlimit {
        ts: f64,
        pid: u32,
        soft_limit: Option<u64>,
        hard_limit: Option<u64>,
    },
    /// Why a process's Python frames cannot be read (once per process).
    Python {
        ts: f64,
        pid: u32,
        message: String,
    },
    /// A finding from an event (EMFILE, inherited fds).
    Finding {
        ts: f64,
        pid: u32,
        finding: Finding,
    },
}

/// The closing summary.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub ts: f64,
    pub duration_s: f64,
    pub ended: SessionEnd,
    /// By pid, a reused pid once for each of its processes.
    pub processes: Vec<ProcessSummary>,
    /// The exited processes past [`short_lived::KEPT_EXITED`], by command.
    ///
    /// [`short_lived::KEPT_EXITED`]: super::short_lived::KEPT_EXITED
    pub folded: Vec<FoldedGroup>,
}

#[derive(Clone, Debug)]
pub struct ProcessSummary {
    pub pid: u32,
    pub comm: String,
    pub totals: Totals,
    pub emfile: u64,
    pub enfile: u64,
    pub exited: bool,
    /// It was in at least one report (lived through one).
    pub reported: bool,
    /// How it ended, once it has.
    pub ending: Option<Ending>,
    /// The worst status reached for a process that exited, the last one
    /// otherwise.
    pub status: Status,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    /// Its sites growing at 0.05 fds/s or more, fastest first (at most 3).
    pub sites: Vec<SiteReport>,
    /// Every finding, with its current figures.
    pub findings: Vec<Finding>,
}

/// Test fixtures for the modules that take reports in.
#[cfg(test)]
impl ProcessFigures {
    /// Process `p{pid}` holding `open` fds, all opened since tracing began,
    /// under limits of 1024 (soft) and 4096 (hard), with no drift; the
    /// tests set the figures they are about.
    pub fn example(pid: u32, open: u64, status: Status) -> Self {
        ProcessFigures {
            pid,
            ppid: None,
            comm: format!("p{pid}"),
            open_fds: open,
            soft_limit: Some(1024),
            hard_limit: Some(4096),
            pct_used: Some(open as f64 * 100.0 / 1024.0),
            by_kind: [0; FD_KINDS],
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
            attribution: Rc::default(),
        }
    }
}

#[cfg(test)]
impl ProcessReport {
    /// A report of `figures` alone: no sites, findings or resync.
    pub fn of(figures: ProcessFigures) -> Self {
        ProcessReport {
            figures,
            sites: Vec::new(),
            findings: Vec::new(),
            leak_found: false,
            resync: None,
            close_wait: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_counts_add_up_losses_and_drift_resyncs() {
        let mut c = SessionCounts::default();
        let p = |resync| ProcessReport {
            resync,
            ..ProcessReport::of(ProcessFigures::example(1, 0, Status::Ok))
        };
        let losses = [
            Loss::RingBuffer { count: 3 },
            Loss::FdsMapFull {
                count: 2,
                max_entries: 8,
            },
        ];
        c.add(
            &losses,
            &[
                p(Some(Resync::Drift(-2))),
                p(Some(Resync::Inexact)),
                p(None),
            ],
        );
        c.add(
            &[Loss::ProcsMapFull {
                count: 1,
                max_entries: 4,
            }],
            &[p(Some(Resync::Drift(1)))],
        );
        assert_eq!(
            c,
            SessionCounts {
                lost_events: 3,
                fds_map_full: 2,
                procs_map_full: 1,
                drift_resyncs: 2,
            }
        );
    }
}
