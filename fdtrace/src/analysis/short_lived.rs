//! Processes that came and went between two reports (a fork storm: a shell
//! loop, a build): one summary line per command rather than one per
//! process, and each finding they share once, with how many had it.
use std::collections::{BTreeMap, HashMap};

use super::{Ending, Finding, FindingKind, ProcessSummary};

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
