//! Phase 4, pure: samples in, a report out. Per-process figures, the sites
//! grouped from the labelled fds, least-squares leak rates over the window,
//! the forecast, the status and the findings. Nothing here reads the kernel,
//! /proc or a file: every input is in [`ProcessSample`], so all of it is
//! tested without root.
mod containers;
mod findings;
mod process;
mod rates;
mod report;
pub mod short_lived;
mod status;

use std::{collections::HashMap, rc::Rc, time::Duration};

use fdtrace_common::{FD_KINDS, FdKind};
use foldhash::HashMap as FastMap;

pub use containers::{Attribution, ContainerReport, Containers};
pub use findings::{
    Errno, Finding, FindingKind, SiteFigures, close_wait, fd_error, inherited, leak,
};
pub use process::{Config, GROWING_RATE, ProcessAnalysis, fd_error_key};
pub use rates::{Series, display_rate, seconds_to_emfile};
pub use report::{
    Ending, Loss, Notice, ProcessFigures, ProcessReport, ProcessSummary, Report, Resync,
    SessionCounts, SessionEnd, SiteReport, Start, Summary, Totals,
};
pub use status::{Status, Thresholds, pct_used, status};

/// Symbolized frames of a call-site stack, innermost first.
pub type Stack = Rc<Vec<String>>;

/// The Python side of a call site of a Python process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonFrames {
    /// "qualname (file:line)", innermost first.
    pub stack: Vec<String>,
    /// The first frame of the user's own code (outside the standard
    /// library and installed packages), and the library call it made:
    /// "httpx AsyncClient.get".
    pub user_frame: Option<String>,
    pub via: Option<String>,
}

pub type PythonSite = Rc<PythonFrames>;

/// The TCP state of a socket, as far as the analysis looks at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    CloseWait,
    Listen,
    Other,
}

/// What one fd is, for grouping.
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    /// Shared: a report groups every fd by it, and many fds share one text.
    pub text: Rc<str>,
    /// A TCP socket's inode, to look its state up again at later reports
    /// (reading the states walks the kernel's whole TCP hash: only
    /// processes holding TCP sockets pay it).
    pub socket_inode: Option<u64>,
    /// May change later (an unconnected socket): not final.
    pub provisional: bool,
}

/// One live fd of a process, labelled.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelledFd {
    pub fd: u32,
    /// On the kernel's clock; 0 for fds that were there before fdtrace.
    pub created_ns: u64,
    /// There before fdtrace attached: stack and age unknown.
    pub preexisting: bool,
    pub kind: FdKind,
    /// Canonical call-site stack id (see enrich::symbols).
    pub stack: u64,
    /// None when it is too young to be a leak candidate, or was closed
    /// before it could be named.
    pub label: Option<Label>,
}

/// Whether an fd counts as a leak candidate: pre-existing, or at least
/// `min_age_ns` old at `now_ns`.
pub fn is_candidate(preexisting: bool, created_ns: u64, now_ns: u64, min_age_ns: u64) -> bool {
    preexisting || now_ns.saturating_sub(created_ns) >= min_age_ns
}

/// The kernel's counts of one process at a report, as reconciled.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub open_fds: u64,
    pub by_kind: [u64; FD_KINDS],
    /// Open when tracing of the process began: found by the attach walk, or
    /// copied from the parent at fork.
    pub preexisting: u64,
    pub opened: u64,
    pub closed: u64,
    pub emfile: u64,
    pub enfile: u64,
    pub stacks_not_sampled: u64,
    pub shares_fd_table: bool,
}

/// Everything one report knows of one process.
pub struct ProcessSample<'a> {
    pub pid: u32,
    pub ppid: Option<u32>,
    pub comm: &'a str,
    /// Unix time of the report.
    pub ts: f64,
    /// Seconds since fdtrace started.
    pub t: f64,
    /// The kernel's clock (CLOCK_MONOTONIC) at the report.
    pub now_ns: u64,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
    pub counts: Counts,
    /// Kernel count minus /proc's; None when the process was too busy.
    pub drift: Option<i64>,
    pub resync: Option<Resync>,
    /// Its live fds, and a number that changes whenever they do.
    pub fds: &'a [LabelledFd],
    pub fds_version: u64,
    /// TCP states of its sockets, by inode.
    pub tcp_states: &'a FastMap<u64, TcpState>,
    /// Symbolized stacks by canonical id.
    pub stacks: &'a HashMap<u64, Stack>,
    /// Its cgroup, container and pod.
    pub attribution: Rc<Attribution>,
    /// Python stacks by canonical id, for the sites of a Python process.
    pub python: &'a HashMap<u64, PythonSite>,
}

/// What was asked, for the record that opens a report.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub pids: Vec<u32>,
    pub command: Option<Vec<String>>,
    pub follow: bool,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub window: Duration,
    pub min_age: Duration,
    pub top: usize,
    pub fail_on: Option<Status>,
    pub stacks: bool,
    pub thresholds: Thresholds,
}
