//! The NDJSON schema: one type per object, `type` naming it. README.md
//! ("JSON output") documents each; a unit test parses every example there.
use std::{borrow::Cow, collections::BTreeMap};

use fdtrace_common::FdKind;
use serde::{Deserialize, Serialize};

use crate::analysis::{
    ContainerReport, Ending, Errno, Finding, FindingKind, Loss, Notice, ProcessReport,
    ProcessSummary, Report, SessionEnd, SiteReport, Start, Status, Summary, display_rate,
};

/// Bumped when a field changes meaning.
pub const SCHEMA: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record<'a> {
    Start(StartRecord),
    Process(ProcessRecord<'a>),
    Container(ContainerRecord<'a>),
    Site(SiteRecord<'a>),
    Finding(FindingRecord),
    Fork(ForkRecord),
    Exec(ExecRecord),
    Exit(ExitRecord),
    Emfile(EmfileRecord),
    Rlimit(RlimitRecord),
    Notice(NoticeRecord),
    Lost(LostRecord),
    MapFull(MapFullRecord),
    Summary(SummaryRecord),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRecord {
    pub ts: f64,
    pub version: String,
    pub schema: u32,
    pub pids: Vec<u32>,
    pub command: Option<Vec<String>>,
    pub follow: bool,
    pub interval_s: f64,
    pub duration_s: Option<f64>,
    pub window_s: f64,
    pub min_age_s: f64,
    pub top: usize,
    pub stacks: bool,
    pub fail_on: Option<Status>,
    pub thresholds: ThresholdsRecord,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdsRecord {
    pub warn_pct: f64,
    pub crit_pct: f64,
    pub warn_within_s: f64,
    pub crit_within_s: f64,
}

/// The per-interval objects (process, site, container) borrow their text
/// from the report: a node's report writes hundreds of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRecord<'a> {
    pub ts: f64,
    pub pid: u32,
    pub ppid: Option<u32>,
    pub comm: Cow<'a, str>,
    pub open_fds: u64,
    pub fd_soft_limit: Option<u64>,
    pub fd_hard_limit: Option<u64>,
    pub pct_used: Option<f64>,
    /// Kind names are the program's own: no text allocated per record.
    pub by_kind: BTreeMap<Cow<'static, str>, u64>,
    pub preexisting_fds: u64,
    pub opened_total: u64,
    pub closed_total: u64,
    pub opened_per_s: f64,
    pub closed_per_s: f64,
    pub emfile_errors: u64,
    pub enfile_errors: u64,
    pub drift: Option<i64>,
    pub status: Status,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    pub stacks_not_sampled: u64,
    pub shares_fd_table: bool,
    pub cgroup: Option<Cow<'a, str>>,
    pub container_id: Option<Cow<'a, str>>,
    pub pod: Option<Cow<'a, str>>,
    pub namespace: Option<Cow<'a, str>>,
    pub container: Option<Cow<'a, str>>,
    pub pod_uid: Option<Cow<'a, str>>,
    pub qos: Option<Cow<'a, str>>,
    pub pid_in_container: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRecord<'a> {
    pub ts: f64,
    pub container_id: Option<Cow<'a, str>>,
    pub cgroup: Option<Cow<'a, str>>,
    pub pod: Option<Cow<'a, str>>,
    pub namespace: Option<Cow<'a, str>>,
    pub container: Option<Cow<'a, str>>,
    pub pod_uid: Option<Cow<'a, str>>,
    pub qos: Option<Cow<'a, str>>,
    pub processes: u64,
    pub open_fds: u64,
    pub fd_usage_ratio: Option<f64>,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    pub status: Status,
    pub opened_total: u64,
    pub closed_total: u64,
    pub emfile_errors: u64,
    pub enfile_errors: u64,
    pub close_wait: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRecord<'a> {
    pub ts: f64,
    pub pid: u32,
    pub site: Cow<'a, str>,
    pub kind: Cow<'a, str>,
    pub resource: Cow<'a, str>,
    pub stack: Cow<'a, [String]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub py_stack: Option<Cow<'a, [String]>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_frame: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Cow<'a, str>>,
    pub open_fds: u64,
    pub leak_per_s: f64,
    pub oldest_age_s: f64,
}

/// Something fdtrace says once about a process: why its Python frames
/// cannot be read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoticeRecord {
    pub ts: f64,
    pub pid: u32,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindingRecord {
    pub ts: f64,
    pub pid: u32,
    pub finding: FindingKind,
    pub message: String,
    pub recommendation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRecord {
    pub ts: f64,
    pub pid: u32,
    pub ppid: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRecord {
    pub ts: f64,
    pub pid: u32,
    pub comm: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRecord {
    pub ts: f64,
    pub pid: u32,
    pub comm: String,
    pub open_fds: u64,
    pub opened_total: u64,
    pub closed_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zombie: bool,
    /// Moved out of node mode's selected cgroups: still running, no longer
    /// traced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub left_selection: bool,
}

/// The `exit_code`, `signal` and `zombie` fields: how a process ended,
/// where fdtrace knows more than that it exited (or that it left the
/// selection: see [`left`]).
fn ending_fields(e: Option<Ending>) -> (Option<i32>, Option<i32>, bool) {
    match e {
        Some(Ending::Code(c)) => (Some(c), None, false),
        Some(Ending::Signal(s)) => (None, Some(s), false),
        Some(Ending::Zombie) => (None, None, true),
        Some(Ending::Exited | Ending::LeftSelection) | None => (None, None, false),
    }
}

/// Whether the process left node mode's selection rather than ended.
fn left(e: Option<Ending>) -> bool {
    e == Some(Ending::LeftSelection)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmfileRecord {
    pub ts: f64,
    pub pid: u32,
    pub tid: u32,
    pub syscall: String,
    pub errno: Errno,
    pub resource: Option<String>,
    pub stack: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlimitRecord {
    pub ts: f64,
    pub pid: u32,
    pub fd_soft_limit: Option<u64>,
    pub fd_hard_limit: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LostRecord {
    pub ts: f64,
    pub count: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapName {
    Fds,
    Procs,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapFullRecord {
    pub ts: f64,
    pub map: MapName,
    pub count: u64,
    pub max_entries: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryRecord {
    pub ts: f64,
    pub duration_s: f64,
    pub ended: SessionEnd,
    pub processes: Vec<SummaryProcess>,
    pub folded: Vec<SummaryFolded>,
}

/// Exited processes of one command, past the ones the summary lists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryFolded {
    /// null for the commands past the bound on commands.
    pub comm: Option<String>,
    pub processes: u64,
    pub opened_total: u64,
    pub closed_total: u64,
    pub emfile_errors: u64,
    pub enfile_errors: u64,
    /// The worst any of them reached.
    pub status: Status,
    pub findings: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    Running,
    Exited,
    /// Moved out of node mode's selected cgroups: running, not traced.
    #[serde(rename = "left_selection")]
    LeftSelection,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryProcess {
    pub pid: u32,
    pub comm: String,
    pub state: ProcessState,
    pub open_fds: u64,
    pub opened_total: u64,
    pub closed_total: u64,
    pub emfile_errors: u64,
    pub enfile_errors: u64,
    pub status: Status,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    pub sites: Vec<SummarySite>,
    pub findings: Vec<SummaryFinding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zombie: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummarySite {
    pub site: String,
    pub kind: String,
    pub resource: String,
    pub stack: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub py_stack: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_frame: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    pub open_fds: u64,
    pub leak_per_s: f64,
    pub oldest_age_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryFinding {
    pub finding: FindingKind,
    pub message: String,
    pub recommendation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<String>>,
    pub first_seen_ts: f64,
}

impl From<&Start> for StartRecord {
    fn from(s: &Start) -> Self {
        let r = &s.request;
        StartRecord {
            ts: s.ts,
            version: env!("CARGO_PKG_VERSION").to_string(),
            schema: SCHEMA,
            pids: r.pids.clone(),
            command: r.command.clone(),
            follow: r.follow,
            interval_s: r.interval.as_secs_f64(),
            duration_s: r.duration.map(|d| d.as_secs_f64()),
            window_s: r.window.as_secs_f64(),
            min_age_s: r.min_age.as_secs_f64(),
            top: r.top,
            stacks: r.stacks,
            fail_on: r.fail_on,
            thresholds: ThresholdsRecord {
                warn_pct: r.thresholds.warn_pct,
                crit_pct: r.thresholds.crit_pct,
                warn_within_s: r.thresholds.warn_within.as_secs_f64(),
                crit_within_s: r.thresholds.crit_within.as_secs_f64(),
            },
        }
    }
}

/// Open fds per kind, the kinds with none left out.
fn by_kind(counts: &[u64]) -> BTreeMap<Cow<'static, str>, u64> {
    FdKind::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (Cow::Borrowed(k.name()), *n))
        .collect()
}

fn finding_record(ts: f64, pid: u32, f: &Finding) -> FindingRecord {
    FindingRecord {
        ts,
        pid,
        finding: f.kind,
        message: f.message.clone(),
        recommendation: f.recommendation.to_string(),
        site: f.site.clone(),
        count: f.count,
        fds: f.fds.clone(),
    }
}

fn site_record<'a>(ts: f64, pid: u32, s: &'a SiteReport) -> SiteRecord<'a> {
    SiteRecord {
        ts,
        pid,
        site: Cow::Borrowed(&s.id),
        kind: Cow::Borrowed(s.kind.name()),
        resource: Cow::Borrowed(&s.resource),
        stack: Cow::Borrowed(&s.stack[..]),
        py_stack: s.python.as_ref().map(|p| Cow::Borrowed(&p.stack[..])),
        user_frame: s
            .python
            .as_ref()
            .and_then(|p| p.user_frame.as_deref().map(Cow::Borrowed)),
        via: s
            .python
            .as_ref()
            .and_then(|p| p.via.as_deref().map(Cow::Borrowed)),
        open_fds: s.open_fds,
        leak_per_s: display_rate(s.leak_per_s),
        oldest_age_s: s.oldest_age_s.round(),
    }
}

fn container_record(ts: f64, c: &ContainerReport) -> ContainerRecord<'_> {
    ContainerRecord {
        ts,
        container_id: borrowed(&c.container_id),
        cgroup: borrowed(&c.cgroup),
        pod: borrowed(&c.pod),
        namespace: borrowed(&c.namespace),
        container: borrowed(&c.container),
        pod_uid: borrowed(&c.pod_uid),
        qos: c.qos.map(Cow::Borrowed),
        processes: c.processes,
        open_fds: c.open_fds,
        // Four digits: 0.01% of a limit.
        fd_usage_ratio: c.fd_usage_ratio.map(|r| (r * 1e4).round() / 1e4),
        leak_per_s: display_rate(c.leak_per_s),
        seconds_to_emfile: c.seconds_to_emfile.map(f64::round),
        status: c.status,
        opened_total: c.opened,
        closed_total: c.closed,
        emfile_errors: c.emfile,
        enfile_errors: c.enfile,
        close_wait: c.close_wait,
    }
}

fn borrowed(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(Cow::Borrowed)
}

impl<'a> Record<'a> {
    /// The objects of one report, each handed to `f` as it is made:
    /// losses, then each process with its sites and new findings, then the
    /// containers. A resync is carried by the process's `drift`.
    pub fn of_report<E>(
        r: &'a Report,
        mut f: impl FnMut(Record<'a>) -> Result<(), E>,
    ) -> Result<(), E> {
        let ts = r.ts;
        for l in &r.losses {
            f(match *l {
                Loss::RingBuffer { count } => Record::Lost(LostRecord { ts, count }),
                Loss::FdsMapFull { count, max_entries } => Record::MapFull(MapFullRecord {
                    ts,
                    map: MapName::Fds,
                    count,
                    max_entries,
                }),
                Loss::ProcsMapFull { count, max_entries } => Record::MapFull(MapFullRecord {
                    ts,
                    map: MapName::Procs,
                    count,
                    max_entries,
                }),
            })?;
        }
        for p in &r.processes {
            Self::of_process(ts, p, &mut f)?;
        }
        for c in &r.containers {
            f(Record::Container(container_record(ts, c)))?;
        }
        Ok(())
    }

    fn of_process<E>(
        ts: f64,
        p: &'a ProcessReport,
        f: &mut impl FnMut(Record<'a>) -> Result<(), E>,
    ) -> Result<(), E> {
        let fig = &p.figures;
        let who = &*fig.attribution;
        f(Record::Process(ProcessRecord {
            ts,
            pid: fig.pid,
            ppid: fig.ppid,
            comm: Cow::Borrowed(&fig.comm),
            open_fds: fig.open_fds,
            fd_soft_limit: fig.soft_limit,
            fd_hard_limit: fig.hard_limit,
            pct_used: fig.pct_used,
            by_kind: by_kind(&fig.by_kind),
            preexisting_fds: fig.preexisting,
            opened_total: fig.opened,
            closed_total: fig.closed,
            opened_per_s: display_rate(fig.opened_per_s),
            closed_per_s: display_rate(fig.closed_per_s),
            emfile_errors: fig.emfile,
            enfile_errors: fig.enfile,
            drift: fig.drift,
            status: fig.status,
            leak_per_s: display_rate(fig.leak_per_s),
            seconds_to_emfile: fig.seconds_to_emfile.map(f64::round),
            stacks_not_sampled: fig.stacks_not_sampled,
            shares_fd_table: fig.shares_fd_table,
            cgroup: borrowed(&who.cgroup),
            container_id: borrowed(&who.container_id),
            pod: borrowed(&who.pod),
            namespace: borrowed(&who.namespace),
            container: borrowed(&who.container),
            pod_uid: borrowed(&who.pod_uid),
            qos: who.qos.map(Cow::Borrowed),
            pid_in_container: who.pid_in_container,
        }))?;
        for s in &p.sites {
            f(Record::Site(site_record(ts, fig.pid, s)))?;
        }
        for x in &p.findings {
            f(Record::Finding(finding_record(ts, fig.pid, x)))?;
        }
        Ok(())
    }
}

impl From<&Notice> for Record<'_> {
    fn from(n: &Notice) -> Self {
        match n {
            &Notice::Fork { ts, pid, ppid } => Record::Fork(ForkRecord { ts, pid, ppid }),
            Notice::Exec { ts, pid, comm } => Record::Exec(ExecRecord {
                ts: *ts,
                pid: *pid,
                comm: comm.clone(),
            }),
            Notice::Exit {
                ts,
                pid,
                comm,
                totals,
                ending,
            } => {
                let (exit_code, signal, zombie) = ending_fields(Some(*ending));
                Record::Exit(ExitRecord {
                    ts: *ts,
                    pid: *pid,
                    comm: comm.clone(),
                    open_fds: totals.open_fds,
                    opened_total: totals.opened,
                    closed_total: totals.closed,
                    exit_code,
                    signal,
                    zombie,
                    left_selection: left(Some(*ending)),
                })
            }
            Notice::FdError {
                ts,
                pid,
                tid,
                syscall,
                errno,
                resource,
                stack,
            } => Record::Emfile(EmfileRecord {
                ts: *ts,
                pid: *pid,
                tid: *tid,
                syscall: syscall.to_string(),
                errno: *errno,
                resource: resource.clone(),
                stack: stack.to_vec(),
            }),
            &Notice::Rlimit {
                ts,
                pid,
                soft_limit,
                hard_limit,
            } => Record::Rlimit(RlimitRecord {
                ts,
                pid,
                fd_soft_limit: soft_limit,
                fd_hard_limit: hard_limit,
            }),
            Notice::Finding { ts, pid, finding } => {
                Record::Finding(finding_record(*ts, *pid, finding))
            }
            Notice::Python { ts, pid, message } => Record::Notice(NoticeRecord {
                ts: *ts,
                pid: *pid,
                message: message.clone(),
            }),
        }
    }
}

impl From<&ProcessSummary> for SummaryProcess {
    fn from(p: &ProcessSummary) -> Self {
        let (exit_code, signal, zombie) = ending_fields(p.ending);
        SummaryProcess {
            exit_code,
            signal,
            zombie,
            pid: p.pid,
            comm: p.comm.clone(),
            state: if left(p.ending) {
                ProcessState::LeftSelection
            } else if p.exited {
                ProcessState::Exited
            } else {
                ProcessState::Running
            },
            open_fds: p.totals.open_fds,
            opened_total: p.totals.opened,
            closed_total: p.totals.closed,
            emfile_errors: p.emfile,
            enfile_errors: p.enfile,
            status: p.status,
            leak_per_s: display_rate(p.leak_per_s),
            seconds_to_emfile: p.seconds_to_emfile.map(f64::round),
            sites: p
                .sites
                .iter()
                .map(|s| {
                    let r = site_record(0.0, p.pid, s);
                    SummarySite {
                        site: r.site.into_owned(),
                        kind: r.kind.into_owned(),
                        resource: r.resource.into_owned(),
                        stack: r.stack.into_owned(),
                        py_stack: r.py_stack.map(Cow::into_owned),
                        user_frame: r.user_frame.map(Cow::into_owned),
                        via: r.via.map(Cow::into_owned),
                        open_fds: r.open_fds,
                        leak_per_s: r.leak_per_s,
                        oldest_age_s: r.oldest_age_s,
                    }
                })
                .collect(),
            findings: p
                .findings
                .iter()
                .map(|f| SummaryFinding {
                    finding: f.kind,
                    message: f.message.clone(),
                    recommendation: f.recommendation.to_string(),
                    site: f.site.clone(),
                    count: f.count,
                    fds: f.fds.clone(),
                    first_seen_ts: f.first_seen_ts,
                })
                .collect(),
        }
    }
}

impl From<&Summary> for SummaryRecord {
    fn from(s: &Summary) -> Self {
        SummaryRecord {
            ts: s.ts,
            duration_s: (s.duration_s * 10.0).round() / 10.0,
            ended: s.ended,
            processes: s.processes.iter().map(SummaryProcess::from).collect(),
            folded: s
                .folded
                .iter()
                .map(|g| SummaryFolded {
                    comm: g.comm.clone(),
                    processes: g.processes,
                    opened_total: g.opened,
                    closed_total: g.closed,
                    emfile_errors: g.emfile,
                    enfile_errors: g.enfile,
                    status: g.status,
                    findings: g.findings,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::analysis::short_lived::FoldedGroup;

    const README: &str = include_str!("../../../README.md");

    /// Every line of every ```json block of the README.
    fn readme_examples() -> Vec<Value> {
        let mut out = Vec::new();
        let mut inside = false;
        for line in README.lines() {
            match line.trim() {
                "```json" => inside = true,
                "```" => inside = false,
                l if inside && !l.is_empty() => out.push(
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("README example {l}: {e}")),
                ),
                _ => {}
            }
        }
        out
    }

    /// Equal as JSON, numbers compared as numbers (322 and 322.0 alike).
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            _ => a == b,
        }
    }

    #[test]
    fn every_readme_example_parses_into_its_type_and_back() {
        let examples = readme_examples();
        assert!(examples.len() >= 12, "{} examples", examples.len());
        for ex in &examples {
            let r: Record =
                serde_json::from_value(ex.clone()).unwrap_or_else(|e| panic!("{ex}: {e}"));
            let back = serde_json::to_value(&r).expect("serializes");
            // Same keys both ways: no field of the example is unknown to the
            // type (deny_unknown_fields), none of the type's is missing.
            assert!(same(ex, &back), "\n readme: {ex}\n type:   {back}");
        }
    }

    #[test]
    fn every_record_type_has_a_readme_example() {
        let types: Vec<String> = readme_examples()
            .iter()
            .map(|v| v["type"].as_str().unwrap_or_default().to_string())
            .collect();
        for ty in [
            "start",
            "process",
            "container",
            "site",
            "finding",
            "fork",
            "exec",
            "exit",
            "emfile",
            "rlimit",
            "notice",
            "lost",
            "map_full",
            "summary",
        ] {
            assert!(types.iter().any(|t| t == ty), "no README example of {ty}");
        }
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        let extra = r#"{"type":"lost","ts":1.0,"count":1,"more":2}"#;
        assert!(serde_json::from_str::<Record>(extra).is_err());
        let unknown = r#"{"type":"nope","ts":1.0}"#;
        assert!(serde_json::from_str::<Record>(unknown).is_err());
        let missing = r#"{"type":"lost","ts":1.0}"#;
        assert!(serde_json::from_str::<Record>(missing).is_err());
    }

    #[test]
    fn type_comes_first_and_options_are_null_or_absent() {
        let r = Record::Finding(FindingRecord {
            ts: 1.0,
            pid: 2,
            finding: FindingKind::Emfile,
            message: "m".into(),
            recommendation: "r".into(),
            site: None,
            count: None,
            fds: None,
        });
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"type":"finding","ts":1.0,"pid":2,"finding":"emfile","message":"m","recommendation":"r"}"#
        );
        let e = Record::Rlimit(RlimitRecord {
            ts: 1.0,
            pid: 2,
            fd_soft_limit: None,
            fd_hard_limit: Some(4),
        });
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"rlimit","ts":1.0,"pid":2,"fd_soft_limit":null,"fd_hard_limit":4}"#
        );
    }

    #[test]
    fn by_kind_leaves_out_empty_kinds() {
        let mut counts = [0u64; fdtrace_common::FD_KINDS];
        counts[FdKind::Socket as usize] = 40;
        counts[FdKind::File as usize] = 12;
        let m = by_kind(&counts);
        assert_eq!(m.len(), 2);
        assert_eq!(m["socket"], 40);
        assert_eq!(m["file"], 12);
    }

    fn records_of(report: &Report) -> Vec<Record<'_>> {
        let mut out = Vec::new();
        Record::of_report(report, |r| {
            out.push(r);
            Ok::<_, ()>(())
        })
        .unwrap();
        out
    }

    fn figures() -> crate::analysis::ProcessFigures {
        crate::analysis::ProcessFigures {
            comm: "idle".into(),
            hard_limit: None,
            pct_used: Some(0.5),
            opened: 9,
            closed: 4,
            leak_per_s: -0.04,
            ..crate::analysis::ProcessFigures::example(7, 5, Status::Ok)
        }
    }

    #[test]
    fn python_fields_only_for_python_sites() {
        let mut s = SiteReport {
            id: "abc".into(),
            kind: FdKind::Socket,
            resource: "tcp 127.0.0.1:8080".into(),
            stack: Default::default(),
            python: None,
            open_fds: 2,
            leak_per_s: 1.0,
            oldest_age_s: 3.0,
        };
        let native = serde_json::to_value(site_record(1.0, 7, &s)).unwrap();
        for k in ["py_stack", "user_frame", "via"] {
            assert!(native.get(k).is_none(), "{native}");
        }
        s.python = Some(std::rc::Rc::new(crate::analysis::PythonFrames {
            stack: vec!["fetch (/srv/a.py:3)".into()],
            user_frame: Some("fetch (/srv/a.py:3)".into()),
            via: None,
        }));
        let py = serde_json::to_value(site_record(1.0, 7, &s)).unwrap();
        assert_eq!(py["py_stack"], serde_json::json!(["fetch (/srv/a.py:3)"]));
        assert_eq!(py["user_frame"], "fetch (/srv/a.py:3)");
        assert!(py.get("via").is_none(), "{py}");
    }

    #[test]
    fn a_report_is_losses_then_each_process_with_its_sites_and_findings() {
        let site = SiteReport {
            id: "abc".into(),
            kind: FdKind::Pipe,
            resource: "pipe".into(),
            stack: Default::default(),
            python: None,
            open_fds: 2,
            leak_per_s: 0.0,
            oldest_age_s: 3.6,
        };
        let report = Report {
            ts: 5.0,
            losses: vec![Loss::RingBuffer { count: 3 }],
            counts: Default::default(),
            processes: vec![ProcessReport {
                figures: figures(),
                sites: vec![site],
                findings: vec![crate::analysis::close_wait("abc", "tcp 1.2.3.4:5", 1, 5.0)],
                leak_found: false,
                resync: Some(crate::analysis::Resync::Drift(-1)),
                close_wait: 0,
            }],
            containers: Vec::new(),
        };
        let records = records_of(&report);
        let types: Vec<String> = records
            .iter()
            .map(|r| {
                serde_json::to_value(r).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(types, ["lost", "process", "site", "finding"]);
        let process = serde_json::to_string(&records[1]).unwrap();
        // No "-0.0" from a slope just under zero, null for no forecast.
        assert!(
            process.contains(r#""leak_per_s":0.0,"seconds_to_emfile":null"#),
            "{process}"
        );
        let site = serde_json::to_value(&records[2]).unwrap();
        assert_eq!(site["oldest_age_s"], 4.0);
    }

    #[test]
    fn a_container_record_follows_the_processes_rounded() {
        let c = crate::analysis::ContainerReport {
            container_id: None,
            cgroup: Some("/system.slice/nginx.service".into()),
            pod: None,
            namespace: None,
            container: None,
            pod_uid: None,
            qos: None,
            processes: 2,
            pids: vec![7, 9],
            open_fds: 30,
            fd_usage_ratio: Some(2.0 / 3.0),
            leak_per_s: -0.0001,
            seconds_to_emfile: Some(321.6),
            status: Status::Warning,
            opened: 40,
            closed: 10,
            emfile: 1,
            enfile: 0,
            close_wait: 4,
        };
        let report = Report {
            ts: 5.0,
            losses: Vec::new(),
            counts: Default::default(),
            processes: Vec::new(),
            containers: vec![c],
        };
        let records = records_of(&report);
        assert_eq!(
            serde_json::to_string(&records[0]).unwrap(),
            r#"{"type":"container","ts":5.0,"container_id":null,"cgroup":"/system.slice/nginx.service","pod":null,"namespace":null,"container":null,"pod_uid":null,"qos":null,"processes":2,"open_fds":30,"fd_usage_ratio":0.6667,"leak_per_s":0.0,"seconds_to_emfile":322.0,"status":"warning","opened_total":40,"closed_total":10,"emfile_errors":1,"enfile_errors":0,"close_wait":4}"#
        );
    }

    #[test]
    fn the_summary_record_carries_state_and_first_seen() {
        let summary = Summary {
            ts: 9.0,
            duration_s: 21.94,
            ended: SessionEnd::Sighup,
            processes: vec![ProcessSummary {
                pid: 7,
                comm: "idle".into(),
                totals: crate::analysis::Totals {
                    open_fds: 5,
                    opened: 9,
                    closed: 4,
                },
                emfile: 1,
                enfile: 0,
                exited: true,
                reported: true,
                ending: Some(Ending::Signal(9)),
                status: Status::Exhausted,
                leak_per_s: 0.0,
                seconds_to_emfile: None,
                sites: Vec::new(),
                findings: vec![crate::analysis::fd_error(
                    "open",
                    None,
                    Errno::Emfile,
                    None,
                    3.0,
                )],
            }],
            folded: vec![FoldedGroup {
                comm: Some("true".into()),
                processes: 2000,
                opened: 4000,
                closed: 4100,
                emfile: 0,
                enfile: 0,
                status: Status::Ok,
                findings: 3,
            }],
        };
        let v = serde_json::to_value(Record::Summary(SummaryRecord::from(&summary))).unwrap();
        assert_eq!(
            serde_json::to_string(&SummaryRecord::from(&summary).folded).unwrap(),
            r#"[{"comm":"true","processes":2000,"opened_total":4000,"closed_total":4100,"emfile_errors":0,"enfile_errors":0,"status":"ok","findings":3}]"#
        );
        assert_eq!(v["duration_s"], 21.9);
        let p = &v["processes"][0];
        assert_eq!(p["state"], "exited");
        assert_eq!(p["status"], "exhausted");
        assert_eq!(p["emfile_errors"], 1);
        assert_eq!(p["findings"][0]["finding"], "emfile");
        assert_eq!(p["findings"][0]["first_seen_ts"], 3.0);
        assert_eq!(v["ended"], "sighup");
        assert_eq!(p["signal"], 9);
        assert!(p.get("exit_code").is_none() && p.get("zombie").is_none());
    }

    #[test]
    fn exit_records_say_how_the_process_ended() {
        let exit = |ending| {
            let n = Notice::Exit {
                ts: 1.0,
                pid: 2,
                comm: "sh".into(),
                totals: crate::analysis::Totals::default(),
                ending,
            };
            serde_json::to_value(Record::from(&n)).unwrap()
        };
        assert_eq!(exit(Ending::Code(7))["exit_code"], 7);
        assert_eq!(exit(Ending::Signal(9))["signal"], 9);
        assert_eq!(exit(Ending::Zombie)["zombie"], true);
        assert_eq!(exit(Ending::LeftSelection)["left_selection"], true);
        let plain = exit(Ending::Exited);
        for f in ["exit_code", "signal", "zombie", "left_selection"] {
            assert!(plain.get(f).is_none(), "{f} in {plain}");
        }
    }

    #[test]
    fn hostile_text_stays_one_line_and_lossless() {
        let comm = crate::escape::lossless(b"\x1b[31mEVIL\x1b[0m\n\xff");
        let n = Notice::Exec {
            ts: 1.0,
            pid: 2,
            comm,
        };
        let line = serde_json::to_string(&Record::from(&n)).unwrap();
        assert!(!line.contains('\n') && !line.contains('\x1b'), "{line}");
        let back: Record = serde_json::from_str(&line).unwrap();
        let Record::Exec(e) = back else {
            panic!("{line}")
        };
        assert_eq!(e.comm, "\x1b[31mEVIL\x1b[0m\n\\xff");
    }
}
