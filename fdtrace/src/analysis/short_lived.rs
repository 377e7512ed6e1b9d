//! Processes that came and went between two reports (a fork storm: a shell
//! loop, a build): one summary line per command rather than one per
//! process, and each finding they share once, with how many had it. And
//! what a session keeps of the processes that exited: their summaries,
//! the oldest folded into per-command totals past a bound, so that an
//! always-on tracer's memory does not grow with every process a node
//! starts.
use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{Ending, Finding, FindingKind, ProcessSummary, Status};

/// Exited processes whose summaries are kept whole; older ones are folded.
/// A summary of a short-lived process is a few hundred bytes.
pub const KEPT_EXITED: usize = 1000;
/// Commands the folded processes are totalled under; the processes of
/// further commands go into one group without a command, so that names
/// chosen by the traced processes cannot grow it either.
pub const FOLDED_COMMANDS: usize = 256;

/// Exited processes of one command whose summaries were folded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoldedGroup {
    /// None for the processes of the commands past [`FOLDED_COMMANDS`].
    pub comm: Option<String>,
    pub processes: u64,
    pub opened: u64,
    pub closed: u64,
    pub emfile: u64,
    pub enfile: u64,
    /// The worst status any of them reached.
    pub status: Status,
    /// How many findings they had, together.
    pub findings: u64,
}

impl FoldedGroup {
    fn new(comm: Option<String>) -> Self {
        FoldedGroup {
            comm,
            processes: 0,
            opened: 0,
            closed: 0,
            emfile: 0,
            enfile: 0,
            status: Status::Ok,
            findings: 0,
        }
    }
}

/// The summaries of the processes that exited, in exit order.
#[derive(Debug)]
pub struct Ended {
    kept: VecDeque<ProcessSummary>,
    /// Sorted by command (None first), one group per command.
    folded: Vec<FoldedGroup>,
    keep: usize,
    commands: usize,
    worst: Status,
}

impl Default for Ended {
    fn default() -> Self {
        Ended::with_bounds(KEPT_EXITED, FOLDED_COMMANDS)
    }
}

impl Ended {
    pub fn with_bounds(keep: usize, commands: usize) -> Self {
        Ended {
            kept: VecDeque::new(),
            folded: Vec::new(),
            keep,
            commands,
            worst: Status::Ok,
        }
    }

    pub fn push(&mut self, p: ProcessSummary) {
        self.worst = self.worst.max(p.status);
        self.kept.push_back(p);
        while self.kept.len() > self.keep {
            let Some(old) = self.kept.pop_front() else {
                break;
            };
            self.fold(old);
        }
    }

    fn fold(&mut self, p: ProcessSummary) {
        let comm = Some(p.comm);
        let at = match self.folded.binary_search_by(|g| g.comm.cmp(&comm)) {
            Ok(at) => at,
            Err(at) if self.named() < self.commands => {
                self.folded.insert(at, FoldedGroup::new(comm));
                at
            }
            // Past the bound: the group without a command, which sorts first.
            Err(_) => {
                if self.folded.first().is_none_or(|g| g.comm.is_some()) {
                    self.folded.insert(0, FoldedGroup::new(None));
                }
                0
            }
        };
        let g = &mut self.folded[at];
        g.processes += 1;
        g.opened += p.totals.opened;
        g.closed += p.totals.closed;
        g.emfile += p.emfile;
        g.enfile += p.enfile;
        g.status = g.status.max(p.status);
        g.findings += p.findings.len() as u64;
    }

    fn named(&self) -> usize {
        self.folded.len() - usize::from(self.folded.first().is_some_and(|g| g.comm.is_none()))
    }

    /// The summaries kept whole, oldest exit first.
    pub fn kept(&self) -> impl Iterator<Item = &ProcessSummary> {
        self.kept.iter()
    }

    /// The folded groups, by command, the one without a command last.
    pub fn folded(&self) -> Vec<FoldedGroup> {
        let mut out = self.folded.clone();
        let unnamed_first = out.first().is_some_and(|g| g.comm.is_none());
        out.rotate_left(usize::from(unnamed_first));
        out
    }

    /// The worst status any exited process reached.
    pub fn worst(&self) -> Status {
        self.worst
    }
}

/// The processes of one command that exited before their first report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandGroup {
    pub comm: String,
    pub processes: u64,
    pub opened: u64,
    pub closed: u64,
}

/// One finding shared by `processes` short-lived processes.
#[derive(Clone, Debug)]
pub struct SharedFinding<'a> {
    pub finding: &'a Finding,
    pub processes: u64,
}

/// The closing summary's processes, those that lived through a report apart
/// from those that did not.
#[derive(Clone, Debug, Default)]
pub struct SummaryGroups<'a> {
    /// Shown one by one.
    pub reported: Vec<&'a ProcessSummary>,
    /// By command, in command order.
    pub commands: Vec<CommandGroup>,
    /// The findings of the short-lived processes, each once, in the order
    /// first seen.
    pub findings: Vec<SharedFinding<'a>>,
}

/// Whether a process counts as short-lived: it exited before any report,
/// and fdtrace knows no more of its end (the `run` command's status, a
/// zombie) that its own line would say.
pub fn is_short_lived(p: &ProcessSummary) -> bool {
    p.exited && !p.reported && matches!(p.ending, None | Some(Ending::Exited))
}

pub fn group(processes: &[ProcessSummary]) -> SummaryGroups<'_> {
    let mut out = SummaryGroups::default();
    let mut commands: BTreeMap<&str, CommandGroup> = BTreeMap::new();
    let mut findings: Vec<SharedFinding<'_>> = Vec::new();
    let mut index: HashMap<(FindingKind, &str), usize> = HashMap::new();
    for p in processes {
        if !is_short_lived(p) {
            out.reported.push(p);
            continue;
        }
        let g = commands.entry(&p.comm).or_insert_with(|| CommandGroup {
            comm: p.comm.clone(),
            ..CommandGroup::default()
        });
        g.processes += 1;
        g.opened += p.totals.opened;
        g.closed += p.totals.closed;
        for f in &p.findings {
            match index.get(&(f.kind, f.message.as_str())) {
                Some(&i) => findings[i].processes += 1,
                None => {
                    index.insert((f.kind, &f.message), findings.len());
                    findings.push(SharedFinding {
                        finding: f,
                        processes: 1,
                    });
                }
            }
        }
    }
    out.commands = commands.into_values().collect();
    out.findings = findings;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{Status, Totals, inherited};

    fn proc(pid: u32, comm: &str, exited: bool, reported: bool) -> ProcessSummary {
        ProcessSummary {
            pid,
            comm: comm.into(),
            totals: Totals {
                open_fds: 0,
                opened: 2,
                closed: 5,
            },
            emfile: 0,
            enfile: 0,
            exited,
            reported,
            ending: None,
            status: Status::Ok,
            leak_per_s: 0.0,
            seconds_to_emfile: None,
            sites: Vec::new(),
            findings: Vec::new(),
        }
    }

    #[test]
    fn past_the_bound_the_oldest_exited_are_folded_by_command() {
        let mut e = Ended::with_bounds(3, 2);
        for (pid, comm) in [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "d"), (6, "e")] {
            let mut p = proc(pid, comm, true, false);
            p.emfile = u64::from(pid);
            if pid == 3 {
                p.status = Status::Critical;
                p.findings
                    .push(inherited("a", vec!["3 (pipe)".into()], 1.0).unwrap());
            }
            e.push(p);
        }
        let kept: Vec<u32> = e.kept().map(|p| p.pid).collect();
        assert_eq!(kept, [4, 5, 6], "the newest exits are kept whole");
        let folded = e.folded();
        let group = |comm: Option<&str>, processes, emfile, status, findings| FoldedGroup {
            comm: comm.map(str::to_string),
            processes,
            opened: 2 * processes,
            closed: 5 * processes,
            emfile,
            enfile: 0,
            status,
            findings,
        };
        assert_eq!(
            folded,
            [
                group(Some("a"), 2, 4, Status::Critical, 1),
                group(Some("b"), 1, 2, Status::Ok, 0),
            ],
        );
        e.push(proc(7, "f", true, false));
        e.push(proc(8, "a", true, false));
        let folded = e.folded();
        assert_eq!(folded.len(), 3, "{folded:?}");
        assert_eq!(folded[0], group(Some("a"), 2, 4, Status::Critical, 1));
        assert_eq!(
            folded[2],
            group(None, 2, 4 + 5, Status::Ok, 0),
            "commands past the bound share one group, last"
        );
        assert_eq!(
            e.worst(),
            Status::Critical,
            "the worst status outlives folding"
        );
    }

    #[test]
    fn a_storm_is_one_line_per_command() {
        let mut ps = vec![proc(1, "sh", false, true)];
        ps.extend((0..300).map(|i| proc(10 + i, "true", true, false)));
        ps.push(proc(400, "sleep", true, false));
        let g = group(&ps);
        assert_eq!(g.reported.len(), 1);
        assert_eq!(g.reported[0].pid, 1);
        assert_eq!(
            g.commands,
            vec![
                CommandGroup {
                    comm: "sleep".into(),
                    processes: 1,
                    opened: 2,
                    closed: 5
                },
                CommandGroup {
                    comm: "true".into(),
                    processes: 300,
                    opened: 600,
                    closed: 1500
                },
            ]
        );
    }

    #[test]
    fn a_process_seen_in_a_report_or_still_running_is_shown_alone() {
        let mut run = proc(3, "sh", true, false);
        run.ending = Some(Ending::Code(7));
        let ps = [proc(1, "a", true, true), proc(2, "b", false, false), run];
        let g = group(&ps);
        assert_eq!(g.reported.len(), 3);
        assert!(g.commands.is_empty());
    }

    #[test]
    fn the_same_finding_of_many_short_lived_processes_is_kept_once_with_a_count() {
        let f = inherited("true", vec!["10 (/dev/null)".into()], 1.0).unwrap();
        let other = inherited("true", vec!["11 (pipe)".into()], 2.0).unwrap();
        let mut ps: Vec<ProcessSummary> = (0..50)
            .map(|i| {
                let mut p = proc(i, "true", true, false);
                p.findings.push(f.clone());
                p
            })
            .collect();
        ps[7].findings.push(other.clone());
        let g = group(&ps);
        assert_eq!(g.findings.len(), 2);
        assert_eq!(g.findings[0].processes, 50);
        assert_eq!(g.findings[0].finding.message, f.message);
        assert_eq!(g.findings[1].processes, 1);
    }
}
