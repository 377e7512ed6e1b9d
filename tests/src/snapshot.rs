//! A `process` object checked against /proc, and what a step must have done
//! to it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{KINDS, Reply, kinds_of};

/// A `process` object checked against /proc.
#[derive(Clone, Debug)]
pub struct Snap {
    pub pid: i32,
    pub ts: f64,
    pub open_fds: u64,
    pub opened: u64,
    pub closed: u64,
    pub emfile: u64,
    pub enfile: u64,
    /// fdtrace's by_kind.
    pub by_kind: BTreeMap<String, u64>,
    /// /proc/PID/fd at that time.
    pub proc: BTreeMap<i32, String>,
    pub comm: String,
    pub obj: Value,
}

impl Snap {
    /// Kinds of /proc/PID/fd.
    pub fn proc_kinds(&self) -> BTreeMap<String, u64> {
        kinds_of(&self.proc)
    }

    pub fn kind(&self, k: &str) -> u64 {
        self.by_kind.get(k).copied().unwrap_or(0)
    }
}

/// Checks that going from `a` to `b` changed the kinds of fds (in /proc and in
/// fdtrace's by_kind, which [`Session::check`] already matched) by exactly
/// `delta`, every other kind unchanged.
pub fn assert_kind_delta(a: &Snap, b: &Snap, delta: &[(&str, i64)]) {
    let (pa, pb) = (a.proc_kinds(), b.proc_kinds());
    for k in KINDS {
        let want = delta
            .iter()
            .filter(|(n, _)| *n == k)
            .map(|(_, d)| *d)
            .sum::<i64>();
        let proc_d = *pb.get(k).unwrap_or(&0) as i64 - *pa.get(k).unwrap_or(&0) as i64;
        let trace_d = b.kind(k) as i64 - a.kind(k) as i64;
        assert_eq!(
            proc_d, want,
            "/proc/{}/fd: kind {k} changed by {proc_d}, the step should change it by {want} \
             (fdops did not do what it says?)\nbefore: {:?}\nafter: {:?}",
            b.pid, a.proc, b.proc
        );
        assert_eq!(
            trace_d, want,
            "fdtrace by_kind[{k}] of pid {} changed by {trace_d}, /proc changed by {want}\n\
             before: {}\nafter: {}",
            b.pid, a.obj, b.obj
        );
    }
}

/// What a step must have done to the counters of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Expect {
    /// opened_total must have grown by this much since the last check of the
    /// pid (None: not checked, for the first check of a process).
    pub opened: Option<u64>,
    pub closed: Option<u64>,
    /// emfile_errors must have grown by this much (and as many `emfile`
    /// objects must have come).
    pub emfile: u64,
    /// The step ran execve: the new image's dynamic loader opens and closes a
    /// few files before fdops replies; opened and closed may both exceed the
    /// expectation by the same small number.
    pub exec: bool,
    /// First check after attaching to an idle process: opened_total and
    /// closed_total must be 0.
    pub fresh_attach: bool,
}

impl Expect {
    pub fn totals(opened: u64, closed: u64) -> Expect {
        Expect {
            opened: Some(opened),
            closed: Some(closed),
            ..Expect::default()
        }
    }

    /// The counts fdops reported in its reply.
    pub fn from_reply(r: &Reply) -> Expect {
        Expect::totals(r.opened(), r.closed())
    }

    pub fn first() -> Expect {
        Expect::default()
    }
}
