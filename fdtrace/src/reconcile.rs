//! Phase 2: keeping the kernel's tables equal to /proc (the ground truth):
//! seeding at attach, the drift check every interval, kind fixes for fds
//! the kernel could not name, and the resync after a non-zero drift.
use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use fdtrace_common::{
    FD_CLOEXEC, FD_KINDS, FD_OPEN, FD_PREEXISTING, FD_RESYNCED, FdInfo, FdKey, FdKind, NO_SITE,
    PROC_FOLLOW, PROC_HIDDEN, PROC_SHARED_TABLE, ProcStats, python::NO_PY_STACK,
};

use crate::{
    analysis::{Counts, Resync},
    kernel::{
        FdTable, Kernel, iterators,
        map_batch::{self, LiveFd},
        monotonic_ns,
    },
    procfd,
};

/// BPF_EXIST: update only if present, so an fd closed meanwhile stays gone.
const BPF_EXIST: u64 = 2;
/// BPF_NOEXIST: insert only if absent, so an entry the kernel side wrote
/// meanwhile (a syscall of the process since its registration) wins.
const BPF_NOEXIST: u64 = 1;

/// Tries to read the kernel count and /proc's at one moment when the table did
/// not change; a busy process may not give one within this many tries.
const TRIES: usize = 4;

/// The kernel's view of one process at a report.
pub struct Snapshot {
    pub stats: ProcStats,
    /// Kernel live count minus /proc's, taken while the table was still; None
    /// when the process changed its table during every try.
    pub drift: Option<i64>,
}

/// Starts tracing `pid`: registers it in the kernel filter, then has the
/// seed walk of its fd table write and count an entry for each fd (origin
/// "pre-existing"; see fdtrace-ebpf seed.rs). Returns the fds found, as the
/// walk named them, and those only /proc listed ([`seed_missed`]).
pub fn attach(k: &mut Kernel, pid: u32, follow: bool) -> Result<Vec<procfd::ProcFd>> {
    let flags = if follow { PROC_FOLLOW } else { 0 };
    // Already traced: a followed child of another traced process.
    k.register(pid, &ProcStats::new(pid, flags))?;
    let mut fds = iterators::list(k.seed.as_fd(), pid)
        .with_context(|| format!("reading the fd table of pid {pid}"))?;
    if let Some(n) = seed_missed(k, pid, &mut fds)? {
        say_hidden(pid, n);
    }
    Ok(fds)
}

/// Says once that `pid`, whose table the kernel walk does not see (`n`
/// fds in /proc), is counted from /proc ([`PROC_HIDDEN`]).
pub fn say_hidden(pid: u32, n: usize) {
    eprintln!(
        "fdtrace: pid {pid}: the kernel's walk of its fd table sees none of the {n} fds \
         /proc/{pid}/fd lists, so its syscalls are not trusted to be seen either; it is \
         counted from /proc at every report (opens and closes between reports, and their \
         call sites, are not seen)"
    );
}

/// Seeds the fds /proc lists for `pid` when the kernel walk (`walked`)
/// saw none of them: fdtrace's count must be /proc's. The sandbox init of
/// some hosts is such a process: root may list /proc/1/fd but not read its
/// links, and the task_file iterator visits none of its fds. Each is
/// written as a pre-existing entry, named from /proc where it can be and
/// `unknown` where not, and appended to `walked`. One stat when nothing is
/// missing.
///
/// Such a process is marked [`PROC_HIDDEN`]: on the host where this was
/// found the kernel runs no syscall tracepoint for it either, so its count
/// is taken from /proc at every report ([`check`]). Returns how many fds it
/// has then, for the caller to say so ([`say_hidden`]) where the user will
/// see it.
pub fn seed_missed(
    k: &mut Kernel,
    pid: u32,
    walked: &mut Vec<procfd::ProcFd>,
) -> Result<Option<usize>> {
    // A walk that saw any fd sees the table: an fd /proc lists beyond it
    // is one opened since, which its own syscall counts. So is one of a
    // process whose syscalls the kernel side has counted since its
    // registration. Writing either from here would count it twice, and the
    // counters' read-modify-write below would lose what the kernel added
    // meanwhile (a busy process opens and closes between the two).
    if !walked.is_empty() || k.stats_of(pid).is_none_or(|st| st.changes() != 0) {
        return Ok(None);
    }
    let extra = proc_only(pid, walked);
    if extra.is_empty() {
        return Ok(None);
    }
    let mut by_kind = [0u64; FD_KINDS];
    let (mut seeded, mut top) = (0u64, 0u32);
    for f in &extra {
        let info = found_entry(f, 0, FD_PREEXISTING);
        let key = FdKey {
            tgid: pid,
            fd: f.fd,
        };
        match k.fds.insert(key, info, BPF_NOEXIST) {
            Ok(()) => {
                seeded += 1;
                by_kind[usize::from(info.kind).min(FD_KINDS - 1)] += 1;
                top = top.max(f.fd + 1);
            }
            // Written by a syscall of the process since its registration.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("seeding the fds of pid {pid}: the fd map is full, raise --max-fds")
                });
            }
        }
    }
    // Read-modify-write of the counters, as the resync does: the kernel may
    // bump them in between, and the drift check repairs any difference.
    if let Some(mut stats) = k.stats_of(pid) {
        stats.seeded += seeded;
        for (c, n) in stats.by_kind.iter_mut().zip(by_kind) {
            *c += n;
        }
        stats.fd_hwm = stats.fd_hwm.max(top);
        stats.generation += 1;
        stats.flags |= PROC_HIDDEN;
        k.set_stats(pid, &stats)
            .with_context(|| format!("updating counters of pid {pid}"))?;
    }
    let n = extra.len();
    walked.extend(extra);
    Ok(Some(n))
}

/// The kernel entry user space writes for an open fd it found (`origin`:
/// [`FD_PREEXISTING`] at attach, [`FD_RESYNCED`] in a resync): no site and
/// no creating syscall, as the kernel's own seed writes it.
fn found_entry(f: &procfd::ProcFd, created_ns: u64, origin: u8) -> FdInfo {
    FdInfo {
        created_ns,
        site: NO_SITE,
        py_site: NO_PY_STACK,
        py_use: NO_PY_STACK,
        syscall: u16::MAX,
        kind: f.kind as u8,
        flags: FD_OPEN | origin | if f.cloexec { FD_CLOEXEC } else { 0 },
        detail: 0,
    }
}

/// The fds /proc/PID/fd lists that `walked` lacks, named from /proc where
/// their links can be read. Empty (after one stat) when the walk saw as
/// many fds as /proc counts, or when /proc cannot be read.
fn proc_only(pid: u32, walked: &[procfd::ProcFd]) -> Vec<procfd::ProcFd> {
    if procfd::fd_count(pid).is_ok_and(|n| n <= walked.len() as u64) {
        return Vec::new();
    }
    let Ok(listed) = procfd::fd_numbers(pid) else {
        return Vec::new();
    };
    let missed = missing(walked.iter().map(|f| f.fd), listed);
    if missed.is_empty() {
        return Vec::new();
    }
    named(pid, missed)
}

/// Fds `fds` of `pid`, named from /proc where their links can be read.
fn named(pid: u32, fds: Vec<u32>) -> Vec<procfd::ProcFd> {
    let dir = procfd::ProcDir::open(pid).ok();
    fds.into_iter()
        .map(|fd| {
            let target = dir.as_ref().and_then(|d| d.target(fd));
            procfd::ProcFd {
                fd,
                kind: target.as_ref().map_or(FdKind::Unknown, procfd::kind_of),
                cloexec: dir.as_ref().and_then(|d| d.cloexec(fd)).unwrap_or(false),
                target,
            }
        })
        .collect()
}

/// The numbers of `listed` that `walked` lacks, in order.
fn missing(walked: impl IntoIterator<Item = u32>, listed: Vec<u32>) -> Vec<u32> {
    let walked: HashSet<u32> = walked.into_iter().collect();
    let mut out: Vec<u32> = listed
        .into_iter()
        .filter(|fd| !walked.contains(fd))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// How long to wait before re-checking a non-zero drift: a syscall that has
/// put its fd in the table but not yet reached the sys_exit hook makes /proc
/// run ahead for a few microseconds.
const CONFIRM_AFTER: Duration = Duration::from_millis(5);

/// How long a process whose table did not change since its last exact
/// check goes without another: on a node most processes are idle, and
/// comparing each with /proc every report costs a dozen syscalls apiece;
/// this bounds how long a change fdtrace did not see (a blind spot) can
/// go unnoticed in an idle process.
const RECHECK_IDLE: Duration = Duration::from_secs(30);

/// None when the process is no longer traced (it exited). A drift is reported
/// only when a second look confirms it. In node mode (`skip_idle`), a
/// process whose table generation did not move since a check found it
/// exact is not compared again (drift 0, the last check's) until
/// [`RECHECK_IDLE`] has passed; one that shares its table with another
/// process always is (the other's changes do not move its generation).
/// Outside node mode a process the user named may share its table with an
/// untraced one: it is compared every report. A [`PROC_HIDDEN`] process
/// is recounted from /proc first: its drift is the recount's, against the
/// fds /proc listed then. `known`: its counters as the report's batch read
/// them, if it was in it.
pub fn check(
    k: &mut Kernel,
    pid: u32,
    known: Option<ProcStats>,
    state: &mut ReconcileState,
    skip_idle: bool,
) -> Option<Snapshot> {
    let stats = match known {
        Some(st) => st,
        None => k.stats_of(pid)?,
    };
    if stats.flags & PROC_HIDDEN != 0 {
        return recount(k, pid, state);
    }
    if skip_idle
        && stats.flags & PROC_SHARED_TABLE == 0
        && let Some((generation, at)) = state.exact
        && generation == stats.changes()
        && at.elapsed() < RECHECK_IDLE
    {
        return Some(Snapshot {
            stats,
            drift: Some(0),
        });
    }
    let mut snap = check_once(k, pid)?;
    if snap.drift.is_some_and(|d| d != 0) {
        std::thread::sleep(CONFIRM_AFTER);
        snap = check_once(k, pid)?;
    }
    state.exact = (snap.drift == Some(0)).then(|| (snap.stats.changes(), Instant::now()));
    Some(snap)
}

/// The figures of a [`PROC_HIDDEN`] process: its kernel table made equal
/// to what /proc lists (fds new since the last recount count as opened,
/// those gone as closed), then read back. The entries it holds are kept
/// here, so that a recount is one listing of /proc/PID/fd and nothing for
/// the fds that stayed, not a read of the whole fd map. None when it is no
/// longer traced; no drift when /proc could not be listed.
fn recount(k: &mut Kernel, pid: u32, state: &mut ReconcileState) -> Option<Snapshot> {
    state.exact = None;
    let mut held = match state.hidden.take() {
        Some(held) => held,
        // The first time: the entries the attach seeded, from the map.
        None => map_batch::live_fds(&k.fds, |t| t == pid)
            .ok()?
            .remove(&pid)
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.fd, e.info.kind))
            .collect(),
    };
    let listed = procfd::fd_numbers(pid);
    let drift = match listed {
        Ok(listed) => {
            let listed: HashSet<u32> = listed.into_iter().collect();
            let count = listed.len() as i64;
            if let Err(e) = follow_hidden(k, pid, &mut held, listed) {
                eprintln!("fdtrace: recounting pid {pid} from /proc: {e:#}");
            }
            k.stats_of(pid).map(|st| st.live() as i64 - count)
        }
        Err(_) => None,
    };
    state.hidden = Some(held);
    Some(Snapshot {
        stats: k.stats_of(pid)?,
        drift,
    })
}

/// Makes the kernel entries of hidden process `pid`, `held` (fd -> kind),
/// those of `listed`: adds the new fds, named from /proc, drops the gone.
fn follow_hidden(
    k: &mut Kernel,
    pid: u32,
    held: &mut HashMap<u32, u8>,
    listed: HashSet<u32>,
) -> Result<()> {
    let gone: Vec<u32> = held
        .keys()
        .filter(|fd| !listed.contains(fd))
        .copied()
        .collect();
    let mut new: Vec<u32> = listed
        .into_iter()
        .filter(|fd| !held.contains_key(fd))
        .collect();
    if gone.is_empty() && new.is_empty() {
        return Ok(());
    }
    new.sort_unstable();
    let mut delta = [0i64; FD_KINDS];
    for fd in &gone {
        let _ = k.fds.remove(&FdKey { tgid: pid, fd: *fd });
        if let Some(kind) = held.remove(fd) {
            delta[usize::from(kind).min(FD_KINDS - 1)] -= 1;
        }
    }
    let created_ns = monotonic_ns();
    let entries: Vec<(FdKey, FdInfo)> = named(pid, new)
        .iter()
        .map(|f| {
            let key = FdKey {
                tgid: pid,
                fd: f.fd,
            };
            (key, found_entry(f, created_ns, FD_RESYNCED))
        })
        .collect();
    // Held only once written: a failed write is tried again next time.
    map_batch::insert_batch(&k.fds, &entries).with_context(|| {
        format!("adding the fds of pid {pid}: the fd map is full, raise --max-fds")
    })?;
    let mut top = 0;
    for (key, info) in &entries {
        held.insert(key.fd, info.kind);
        delta[usize::from(info.kind).min(FD_KINDS - 1)] += 1;
        top = top.max(key.fd + 1);
    }
    // Read-modify-write of the counters, as the resync does.
    let Some(mut stats) = k.stats_of(pid) else {
        return Ok(());
    };
    stats.opened += entries.len() as u64;
    stats.closed += gone.len() as u64;
    for (c, d) in stats.by_kind.iter_mut().zip(delta) {
        *c = c.saturating_add_signed(d);
    }
    stats.fd_hwm = stats.fd_hwm.max(top);
    stats.generation += 1;
    k.set_stats(pid, &stats)
        .with_context(|| format!("updating counters of pid {pid}"))
}

/// Makes the totals of `stats` add up to its count (`live() == seeded +
/// opened - closed`, as the kernel side keeps them) after user space
/// rewrote the count: a busy process's opens and closes between the
/// rewrite's read of the counters and its write are lost from both, and
/// what the count then differs by counts as opened or closed by the
/// rewrite. Without this, every later report of the process would show
/// totals off by what was lost.
fn balance(stats: &mut ProcStats) {
    let totals = i128::from(stats.seeded) + i128::from(stats.opened) - i128::from(stats.closed);
    let d = i128::from(stats.live()) - totals;
    let n = d.unsigned_abs() as u64;
    if d > 0 {
        stats.opened += n;
    } else {
        stats.closed += n;
    }
}

fn check_once(k: &Kernel, pid: u32) -> Option<Snapshot> {
    let mut stats = k.stats_of(pid)?;
    for _ in 0..TRIES {
        let Ok(count) = procfd::fd_count(pid) else {
            // /proc entry gone: exiting; the exit event follows.
            return Some(Snapshot { stats, drift: None });
        };
        let after = k.stats_of(pid)?;
        if after.changes() == stats.changes() {
            return Some(Snapshot {
                drift: Some(after.live() as i64 - count as i64),
                stats: after,
            });
        }
        stats = after;
    }
    Some(Snapshot { stats, drift: None })
}

/// After a drift, makes the kernel table of `pid` equal to /proc/PID/fd
/// (as the names walk lists it): adds the fds it lacks, drops those /proc
/// does not have, and recomputes the per-kind counts. What /proc lists and
/// fdtrace lacked was opened, and what fdtrace had and /proc lacks was
/// closed, while fdtrace was not looking: they count in the totals.
/// Returns how many fds the walk listed.
fn resync(k: &mut Kernel, pid: u32) -> Result<usize> {
    let mut walked = iterators::list(k.names.as_fd(), pid)?;
    let extra = proc_only(pid, &walked);
    walked.extend(extra);
    let listed: HashMap<u32, procfd::ProcFd> = walked.into_iter().map(|f| (f.fd, f)).collect();
    let before = k.stats_of(pid);
    let hwm = before.map_or(0, |s| s.fd_hwm);

    let mut by_kind = [0u64; FD_KINDS];
    let mut dropped = 0u64;
    let mut known = HashSet::new();
    // No fd number was ever used: nothing to read.
    let entries = if hwm == 0 {
        Vec::new()
    } else {
        map_batch::live_fds(&k.fds, |t| t == pid)?
            .remove(&pid)
            .unwrap_or_default()
    };
    for LiveFd { fd, info } in entries {
        if listed.contains_key(&fd) {
            by_kind[usize::from(info.kind).min(FD_KINDS - 1)] += 1;
            known.insert(fd);
        } else {
            // Gone since: a close fdtrace missed.
            if k.fds.remove(&FdKey { tgid: pid, fd }).is_ok() {
                dropped += 1;
            }
        }
    }
    // A lazily forked process holds its inherited close-on-exec fds
    // without entries (PROC_LAZY): they are known, of the kind /proc says.
    if let Some(st) = before {
        for f in listed.values() {
            if !known.contains(&f.fd) && k.holds_lazily(&st, f.fd) {
                by_kind[(f.kind as usize).min(FD_KINDS - 1)] += 1;
                known.insert(f.fd);
            }
        }
    }
    let created_ns = monotonic_ns();
    let mut top = hwm;
    let new: Vec<(FdKey, FdInfo)> = listed
        .values()
        .filter(|f| !known.contains(&f.fd))
        .map(|f| {
            top = top.max(f.fd + 1);
            let info = found_entry(f, created_ns, FD_RESYNCED);
            (
                FdKey {
                    tgid: pid,
                    fd: f.fd,
                },
                info,
            )
        })
        .collect();
    map_batch::insert_batch(&k.fds, &new).with_context(|| {
        format!("resyncing the fds of pid {pid}: the fd map is full, raise --max-fds")
    })?;
    for (_, info) in &new {
        by_kind[usize::from(info.kind).min(FD_KINDS - 1)] += 1;
    }
    // Read-modify-write of the counters: the kernel may bump them in between;
    // the next drift check sees and repairs any difference in the count,
    // and the totals are balanced against the count written.
    let Some(mut stats) = k.stats_of(pid) else {
        return Ok(listed.len()); // exited meanwhile
    };
    stats.opened += new.len() as u64;
    stats.closed += dropped;
    stats.by_kind = by_kind;
    balance(&mut stats);
    stats.fd_hwm = stats.fd_hwm.max(top);
    stats.generation += 1;
    k.set_stats(pid, &stats)
        .with_context(|| format!("updating counters of pid {pid}"))?;
    Ok(listed.len())
}

/// What to do about a process's drift at a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResyncStep {
    /// Counts agree: nothing to do.
    None,
    /// Resync with /proc.
    Resync,
    /// The last resync did not take (the same drift is back): report it,
    /// once, as an error.
    Failed,
    /// Failed before and not repaired since: already reported.
    Quiet,
}

/// Whether the resyncs of a process take. A resync that leaves the same
/// drift behind (a table the kernel walk cannot list as /proc does) would
/// otherwise be reported, and redone, as a fresh drift every interval.
#[derive(Clone, Copy, Debug, Default)]
struct ResyncTrack {
    /// The drift the last report resynced.
    resynced: Option<i64>,
    /// A resync did not take; cleared once the counts agree again.
    failed: bool,
}

impl ResyncTrack {
    /// `drift`: the confirmed non-zero drift of this report, if any;
    /// `inexact`: the kernel side said it could not follow a change.
    fn step(&mut self, drift: Option<i64>, inexact: bool) -> ResyncStep {
        match drift {
            None if inexact && !self.failed => {
                self.resynced = None;
                ResyncStep::Resync
            }
            None => {
                if !inexact {
                    *self = ResyncTrack::default();
                }
                ResyncStep::None
            }
            Some(_) if self.failed => ResyncStep::Quiet,
            Some(d) if self.resynced == Some(d) => {
                self.failed = true;
                ResyncStep::Failed
            }
            Some(d) => {
                self.resynced = Some(d);
                ResyncStep::Resync
            }
        }
    }

    /// The resync itself failed: reported once, like one that did not take.
    fn resync_failed(&mut self) -> ResyncStep {
        if std::mem::replace(&mut self.failed, true) {
            ResyncStep::Quiet
        } else {
            ResyncStep::Failed
        }
    }
}

/// Corrections to the kernel's per-kind counts, kept by user space.
///
/// Some syscalls do not say what the fd is (SCM_RIGHTS, pidfd_getfd, a dup of
/// such an fd): the kernel side records them as `unknown`. [`resolve_kinds`]
/// names them from /proc and rewrites their entries, so a later close is
/// counted under the real kind; the kernel incremented `unknown` but will
/// decrement the real kind, and this array holds the difference.
#[derive(Clone, Copy, Default)]
struct KindFix {
    delta: [i64; FD_KINDS],
    /// Unknown fds /proc could not name either: not looked up again until the
    /// kernel's unknown count moves.
    unnamed: u64,
}

impl KindFix {
    fn apply(&self, by_kind: &[u64; FD_KINDS]) -> [u64; FD_KINDS] {
        let mut out = *by_kind;
        for (o, d) in out.iter_mut().zip(self.delta) {
            *o = o.saturating_add_signed(d);
        }
        out
    }
}

/// Names the `unknown` fds of `pid` from /proc/PID/fd; `fds` are its open
/// entries as read from the kernel, and those renamed here are renamed in it
/// too (then it returns true). Runs only when the kernel counts unknown fds
/// that were not looked at yet.
fn resolve_kinds(
    k: &mut Kernel,
    pid: u32,
    stats: &ProcStats,
    fix: &mut KindFix,
    fds: &mut [LiveFd],
) -> bool {
    let unknown = stats.by_kind[FdKind::Unknown as usize].saturating_add_signed(fix.delta[0]);
    if unknown <= fix.unnamed {
        return false;
    }
    let (mut unnamed, mut renamed) = (0, false);
    let dir = procfd::ProcDir::open(pid).ok();
    for seen in fds {
        if seen.info.kind != FdKind::Unknown as u8 {
            continue;
        }
        let fd = seen.fd;
        let kind = dir
            .as_ref()
            .and_then(|d| d.target(fd))
            .map_or(FdKind::Unknown, |t| procfd::kind_of(&t));
        if kind == FdKind::Unknown {
            unnamed += 1;
            continue;
        }
        // Read again: the number may hold another fd since the report's read.
        let Some(mut info) = map_batch::open_fd(&k.fds, pid, fd) else {
            continue;
        };
        if info.created_ns != seen.info.created_ns || info.kind != FdKind::Unknown as u8 {
            continue;
        }
        info.kind = kind as u8;
        if k.fds
            .insert(FdKey { tgid: pid, fd }, info, BPF_EXIST)
            .is_ok()
        {
            seen.info.kind = kind as u8;
            renamed = true;
            fix.delta[FdKind::Unknown as usize] -= 1;
            fix.delta[kind as usize] += 1;
        }
    }
    fix.unnamed = unnamed;
    renamed
}

/// What reconciling keeps of one process between reports.
#[derive(Default)]
pub struct ReconcileState {
    kind_fix: KindFix,
    /// The kernel's `inexact` count at the last report.
    seen_inexact: u64,
    /// The table generation and time of the last check that found the
    /// kernel's count equal to /proc's.
    exact: Option<(u64, Instant)>,
    resyncs: ResyncTrack,
    /// How many fds the last resync's walk listed.
    last_listed: usize,
    /// A [`PROC_HIDDEN`] process's kernel entries (fd -> kind), as its last
    /// recount left them; None before the first.
    hidden: Option<HashMap<u32, u8>>,
}

/// The reconciled view of one process at a report.
pub struct Reconciled {
    pub counts: Counts,
    pub drift: Option<i64>,
    /// Resynced after this report's figures were taken.
    pub resync: Option<Resync>,
}

/// Names the `unknown` fds of the process, corrects the per-kind counts,
/// and resyncs its kernel table when the drift check (in `snap`) found a
/// difference or the kernel side said it could not follow a change. The
/// figures are those of `snap`: a resync shows in the next report.
pub fn reconcile(
    k: &mut Kernel,
    pid: u32,
    state: &mut ReconcileState,
    table: &mut FdTable,
    snap: &Snapshot,
) -> Reconciled {
    let st = &snap.stats;
    if resolve_kinds(k, pid, st, &mut state.kind_fix, &mut table.fds) {
        table.changed();
    }
    let counts = Counts {
        open_fds: st.live(),
        by_kind: state.kind_fix.apply(&st.by_kind),
        preexisting: st.seeded,
        opened: st.opened,
        closed: st.closed,
        emfile: st.emfile,
        enfile: st.enfile,
        stacks_not_sampled: st.not_sampled,
        shares_fd_table: st.flags & PROC_SHARED_TABLE != 0,
    };
    // The kernel side flags what it could not follow exactly (a user read
    // that failed, a loop cap): resync even when the count agrees.
    let inexact = st.inexact > state.seen_inexact;
    state.seen_inexact = st.inexact;
    let drift = snap.drift.filter(|&d| d != 0);
    let mut resync = None;
    let mut step = state.resyncs.step(drift, inexact);
    if step == ResyncStep::Resync {
        // Read the entries again next time, whatever part of the resync was
        // done.
        table.generation = None;
        match self::resync(k, pid) {
            Ok(listed) => {
                // The resync recounted every kind from the entries.
                state.kind_fix = KindFix::default();
                state.last_listed = listed;
                resync = Some(drift.map_or(Resync::Inexact, Resync::Drift));
            }
            Err(e) => {
                if state.resyncs.resync_failed() == ResyncStep::Failed {
                    eprintln!(
                        "fdtrace: resync of pid {pid} failed: {e:#}; its counts may stay off"
                    );
                }
                step = ResyncStep::Quiet;
            }
        }
    }
    if step == ResyncStep::Failed
        && let Some(d) = drift
    {
        let in_proc = counts.open_fds as i64 - d;
        eprintln!(
            "fdtrace: resync of pid {pid} does not take: drift {d:+} again after it, since the \
             kernel walk of its fd table lists {} fds where /proc/{pid}/fd lists {in_proc}; \
             its counts stay off by that much (not reported again)",
            state.last_listed
        );
    }
    Reconciled {
        counts,
        drift: snap.drift,
        resync,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_fix_moves_counts_between_kinds() {
        let mut fix = KindFix::default();
        fix.delta[FdKind::Unknown as usize] = -2;
        fix.delta[FdKind::Socket as usize] = 2;
        let mut by_kind = [0u64; FD_KINDS];
        by_kind[FdKind::Unknown as usize] = 3;
        by_kind[FdKind::File as usize] = 4;
        let fixed = fix.apply(&by_kind);
        assert_eq!(fixed[FdKind::Unknown as usize], 1);
        assert_eq!(fixed[FdKind::Socket as usize], 2);
        assert_eq!(fixed[FdKind::File as usize], 4);
        assert_eq!(fixed.iter().sum::<u64>(), by_kind.iter().sum::<u64>());
    }

    #[test]
    fn a_drift_is_resynced_and_cleared_when_it_takes() {
        let mut t = ResyncTrack::default();
        assert_eq!(t.step(None, false), ResyncStep::None);
        assert_eq!(t.step(Some(-3), false), ResyncStep::Resync);
        assert_eq!(t.step(None, false), ResyncStep::None, "it took");
        assert_eq!(
            t.step(Some(-3), false),
            ResyncStep::Resync,
            "a new drift after a good report is fresh"
        );
    }

    #[test]
    fn a_resync_that_does_not_take_is_reported_once() {
        let mut t = ResyncTrack::default();
        assert_eq!(t.step(Some(-281), false), ResyncStep::Resync);
        assert_eq!(t.step(Some(-281), false), ResyncStep::Failed);
        for _ in 0..5 {
            assert_eq!(t.step(Some(-281), false), ResyncStep::Quiet);
        }
        assert_eq!(
            t.step(Some(-282), false),
            ResyncStep::Quiet,
            "not a fresh drift while the table stays unwalkable"
        );
        assert_eq!(t.step(None, false), ResyncStep::None);
        assert_eq!(
            t.step(Some(-1), false),
            ResyncStep::Resync,
            "repaired since"
        );
    }

    #[test]
    fn a_different_drift_after_a_resync_is_resynced_again() {
        let mut t = ResyncTrack::default();
        assert_eq!(t.step(Some(2), false), ResyncStep::Resync);
        assert_eq!(t.step(Some(-1), false), ResyncStep::Resync);
    }

    #[test]
    fn inexact_changes_resync_until_a_resync_failed() {
        let mut t = ResyncTrack::default();
        assert_eq!(t.step(None, true), ResyncStep::Resync);
        assert_eq!(t.resync_failed(), ResyncStep::Failed);
        assert_eq!(t.resync_failed(), ResyncStep::Quiet);
        assert_eq!(t.step(None, true), ResyncStep::None);
        assert_eq!(t.step(None, false), ResyncStep::None);
        assert_eq!(t.step(None, true), ResyncStep::Resync);
    }

    #[test]
    fn what_proc_lists_and_the_walk_missed() {
        assert_eq!(missing([0, 1, 2], vec![2, 0, 1]), Vec::<u32>::new());
        assert_eq!(missing([], vec![7, 3, 3, 0]), vec![0, 3, 7]);
        assert_eq!(missing([3, 9], vec![9, 4, 3, 5]), vec![4, 5]);
        assert_eq!(
            missing([1, 2, 3], vec![]),
            Vec::<u32>::new(),
            "fds the walk saw and /proc no longer lists are the drift check's"
        );
    }

    #[test]
    fn balance_makes_the_totals_add_up_to_the_count() {
        let mut st = ProcStats::new(1, 0);
        st.by_kind[FdKind::File as usize] = 5;
        st.seeded = 3;
        st.opened = 10;
        st.closed = 9;
        balance(&mut st);
        assert_eq!((st.opened, st.closed), (11, 9));
        st.by_kind[FdKind::File as usize] = 1;
        balance(&mut st);
        assert_eq!((st.opened, st.closed), (11, 13));
        balance(&mut st);
        assert_eq!((st.opened, st.closed), (11, 13), "balanced already");
    }

    #[test]
    fn kind_fix_never_goes_below_zero() {
        let mut fix = KindFix::default();
        fix.delta[FdKind::Pipe as usize] = -5;
        let mut by_kind = [0u64; FD_KINDS];
        by_kind[FdKind::Pipe as usize] = 2;
        assert_eq!(fix.apply(&by_kind)[FdKind::Pipe as usize], 0);
    }
}
