//! Operations on a traced process's fd table: the FDS entries and the
//! counters in its PROCS value, kept in step.
//!
//! Counters are updated with atomic adds: threads of one process share one fd
//! table and run these handlers concurrently on different CPUs.
use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_and, atomic_or, atomic_xadd},
};

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    bpf_probe_read_user_str_bytes,
    generated::{bpf_get_current_task, bpf_loop},
};
use fdtrace_common::{
    CNT_FDS_MAP_FULL, CNT_PROCS_MAP_FULL, CNT_RINGBUF_FULL, ENTRY_WORDS, EVENT_PATH_LEN, Event,
    FD_CLOEXEC, FD_CLOSE_PENDING, FD_KINDS, FD_OPEN, FD_PREEXISTING, FdInfo, FdKey, LAZY_CHUNK_FDS,
    LAZY_WORDS, LazyKey, NO_SITE, PROC_LAZY, ProcStats, entry_index, may_have_entry,
    python::NO_PY_STACK,
};

use crate::{
    iter::file_at,
    maps::{
        COUNTERS, EVENTS, EXEC_TALLY, FDS, FREE_SLOTS, LAZY, PROCS, SEED_FILES, STATS, TRACED,
        wake_flags,
    },
};

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = -17;

/// Most fds one bpf_loop may visit (the helper's own limit is 1 << 23).
const MAX_LOOP: u32 = 1 << 23;

/// Atomic add (BPF_ATOMIC | BPF_ADD); `u64::MAX` subtracts one. The BPF
/// target has no compare-and-swap, so core's atomic types offer no fetch_add.
#[inline(always)]
pub fn add64(field: *mut u64, delta: u64) {
    // SAFETY: `field` points into a map value that lives as long as the entry.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, delta) };
}

#[inline(always)]
fn kind_slot(p: *mut ProcStats, kind: u8) -> *mut u64 {
    let k = if (kind as usize) < FD_KINDS {
        kind as usize
    } else {
        0
    };
    // SAFETY: k < FD_KINDS.
    unsafe { (&raw mut (*p).by_kind).cast::<u64>().add(k) }
}

pub fn count(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        add64(c, 1);
    }
}

/// Marks the process's counts as possibly inexact: user space compares them
/// with /proc at the next interval and resyncs.
pub fn inexact(p: *mut ProcStats) {
    // SAFETY: p is a live STATS element.
    add64(unsafe { &raw mut (*p).inexact }, 1);
}

#[inline(always)]
pub fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The STATS slot `tgid` was registered in (the caller checks the slot's
/// tgid: it may be given back and reused).
#[inline(always)]
pub fn slot_of(tgid: u32) -> Option<u32> {
    match TRACED.get(tgid) {
        Some(&0) => None,
        Some(&s) => Some(u32::from(s) - 1),
        // SAFETY: plain read of a map value.
        None => unsafe { PROCS.get(tgid) }.copied(),
    }
}

#[inline(always)]
pub fn proc_of(tgid: u32) -> Option<*mut ProcStats> {
    proc_at(slot_of(tgid)?, tgid)
}

/// The counters in STATS slot `slot` if they are `tgid`'s.
#[inline(always)]
pub fn proc_at(slot: u32, tgid: u32) -> Option<*mut ProcStats> {
    let p = STATS.get_ptr_mut(slot)?;
    // SAFETY: p is an element of STATS; a slot given back and reused
    // carries another tgid.
    (unsafe { (*p).tgid } == tgid).then_some(p)
}

/// Starts tracing `tgid` with `stats`: takes a free STATS slot, registers
/// it in PROCS, then in TRACED (which the programs read first). False when
/// no slot or PROCS entry is left, or the process is registered already.
pub fn register(tgid: u32, stats: &ProcStats) -> bool {
    let Ok(Some(slot)) = FREE_SLOTS.pop() else {
        count(CNT_PROCS_MAP_FULL);
        return false;
    };
    let Some(p) = STATS.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: p is an element of STATS, free until PROCS names it; the
    // helper takes no arguments.
    unsafe {
        *p = *stats;
        (*p).registered_ns = bpf_ktime_get_ns();
    }
    // BPF_NOEXIST: user space may have registered the process meanwhile
    // (node mode lists /proc while children are being forked, and a child
    // is there before sched_process_fork runs); its seed walk counts the
    // table then, and this registration would leak that slot.
    if let Err(e) = PROCS.insert(tgid, slot, BPF_NOEXIST) {
        // SAFETY: as above.
        unsafe { (*p).tgid = 0 };
        let _ = FREE_SLOTS.push(slot, 0);
        if e != EEXIST {
            count(CNT_PROCS_MAP_FULL);
        }
        return false;
    }
    if let Some(t) = TRACED.get_ptr_mut(tgid) {
        // SAFETY: t is an element of TRACED; slots fit (max_procs <= 65535).
        unsafe { *t = (slot + 1) as u16 };
    }
    true
}

/// `tgid` (counters at `p`) is gone: the reverse of [`register`].
pub fn unregister(tgid: u32, p: *mut ProcStats) {
    if let Some(t) = TRACED.get_ptr_mut(tgid) {
        // SAFETY: t is an element of TRACED.
        unsafe { *t = 0 };
    }
    // SAFETY: plain read of a map value.
    let slot = unsafe { PROCS.get(tgid) }.copied();
    let _ = PROCS.remove(tgid);
    // SAFETY: p is an element of STATS.
    unsafe { (*p).tgid = 0 };
    if let Some(slot) = slot {
        let _ = FREE_SLOTS.push(slot, 0);
    }
}

/// The entry of open fd `fd` of `tgid`.
#[inline(always)]
pub fn open_entry(tgid: u32, fd: u32) -> Option<*mut FdInfo> {
    let info = FDS.get_ptr_mut(FdKey { tgid, fd })?;
    // SAFETY: info is a live FDS value.
    (unsafe { (*info).flags } & FD_OPEN != 0).then_some(info)
}

pub fn kind_of(p: *mut ProcStats, tgid: u32, fd: u32) -> u8 {
    if let Some(info) = open_entry(tgid, fd) {
        // SAFETY: read of a plain value; a concurrent close at worst yields
        // a stale kind, which the drift check catches.
        return unsafe { (*info).kind };
    }
    if lazy_bit(p, tgid, fd).is_some() {
        return inherited(p, fd).kind;
    }
    0
}

/// Ancestors a lazy fd's entry is looked for through (a lazily forked
/// process that forks again before its exec).
const LAZY_DEPTH: u32 = 4;

/// The LAZY word that holds fd `fd`'s bit for process `p` (`tgid`), and
/// the bit, when the bit is set: `p` holds that fd since its fork, with
/// no entry of its own.
#[inline(always)]
fn lazy_bit(p: *mut ProcStats, tgid: u32, fd: u32) -> Option<(*mut u64, u64)> {
    // SAFETY: p is a live STATS element.
    let (flags, end) = unsafe { ((*p).flags, (*p).lazy_end) };
    if flags & PROC_LAZY == 0 || fd >= end {
        return None;
    }
    let chunk = LAZY.get_ptr_mut(LazyKey {
        tgid,
        chunk: fd / LAZY_CHUNK_FDS,
    })?;
    let w = ((fd % LAZY_CHUNK_FDS) / 64) as usize;
    let bit = 1u64 << (fd % 64);
    // SAFETY: w < LAZY_WORDS: a word of the chunk.
    let word = unsafe { chunk.cast::<u64>().add(w) };
    // SAFETY: as above.
    (unsafe { core::ptr::read_volatile(word) } & bit != 0).then_some((word, bit))
}

/// Lazy fd `fd` of `p` is closed or replaced: its bit is cleared, and its
/// entry (see [`inherited`]) returned, if `p` held it. A fetch-and of the
/// bit, so that two threads do not both count it.
#[inline(always)]
fn take_lazy(p: *mut ProcStats, tgid: u32, fd: u32) -> Option<FdInfo> {
    let (word, bit) = lazy_bit(p, tgid, fd)?;
    // SAFETY: word is in a live LAZY value.
    let old = unsafe { atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(word, !bit) };
    (old & bit != 0).then(|| inherited(p, fd))
}

/// The entry lazy fd `fd` of `p` had at `p`'s fork: its parent's, if the
/// parent's entry for the number is older than the fork, open or closed
/// since (a close keeps the entry's fields but its flags: see
/// close_entry); through a lazy parent's own parent the same way. Else
/// (the parent replaced it since, or exited) an entry of kind unknown: the
/// count stays exact, and user space names unknown fds from /proc.
fn inherited(p: *mut ProcStats, fd: u32) -> FdInfo {
    // SAFETY: p is a live STATS element.
    let (mut tgid, mut fork_ns) = unsafe { ((*p).lazy_parent, (*p).fork_ns) };
    for _ in 0..LAZY_DEPTH {
        if let Some(e) = FDS.get_ptr_mut(FdKey { tgid, fd }) {
            // SAFETY: a live FDS value, copied.
            let mut e = unsafe { *e };
            if e.created_ns < fork_ns {
                // Open and close-on-exec in the child (the LAZY bits are
                // its close-on-exec fds at fork).
                e.flags = FD_OPEN | FD_CLOEXEC | (e.flags & FD_PREEXISTING);
                return e;
            }
            break;
        }
        let Some(pp) = proc_of(tgid) else {
            break;
        };
        if lazy_bit(pp, tgid, fd).is_none() {
            break;
        }
        // SAFETY: pp is a live STATS element.
        unsafe { (tgid, fork_ns) = ((*pp).lazy_parent, (*pp).fork_ns) };
    }
    FdInfo {
        created_ns: 0,
        site: NO_SITE,
        py_site: NO_PY_STACK,
        py_use: NO_PY_STACK,
        syscall: u16::MAX,
        kind: 0,
        flags: FD_OPEN | FD_PREEXISTING | FD_CLOEXEC,
        detail: 0,
    }
}

/// The entry of open fd `fd` of `tgid` for a report: its own, or for a
/// lazy fd the inherited one.
pub fn entry_for_report(tgid: u32, fd: u32) -> Option<FdInfo> {
    if let Some(info) = open_entry(tgid, fd) {
        // SAFETY: a live FDS value, copied.
        return Some(unsafe { *info });
    }
    let p = proc_of(tgid)?;
    lazy_bit(p, tgid, fd)?;
    Some(inherited(p, fd))
}

/// Drops the LAZY bits of `p` (at exec, which closed those fds, or at
/// exit) and its PROC_LAZY flag. Its own entries are the bulk loops'.
pub fn drop_lazy(p: *mut ProcStats, tgid: u32) {
    // SAFETY: p is a live STATS element.
    unsafe {
        if (*p).flags & PROC_LAZY == 0 {
            return;
        }
        let chunks = (*p).lazy_end.div_ceil(LAZY_CHUNK_FDS);
        let mut ctx = (tgid, 0u32);
        bpf_loop(chunks, drop_chunk as *mut c_void, (&raw mut ctx).cast(), 0);
        (*p).flags &= !PROC_LAZY;
        (*p).lazy_end = 0;
    }
}

extern "C" fn drop_chunk(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: ctx is drop_lazy's (tgid, _) on its stack.
    let tgid = unsafe { (*(ctx as *const (u32, u32))).0 };
    let _ = LAZY.remove(LazyKey { tgid, chunk: i });
    0
}

/// Writes the lazy bits of word `w` (fds `64 w ..`) of `tgid`.
pub fn set_lazy_word(tgid: u32, w: u32, bits: u64) -> bool {
    let key = LazyKey {
        tgid,
        chunk: w / LAZY_WORDS as u32,
    };
    let chunk = match LAZY.get_ptr_mut(key) {
        Some(c) => c,
        None => {
            if LAZY.insert(key, [0u64; LAZY_WORDS], 0).is_err() {
                count(CNT_FDS_MAP_FULL);
                return false;
            }
            match LAZY.get_ptr_mut(key) {
                Some(c) => c,
                None => return false,
            }
        }
    };
    let i = (w % LAZY_WORDS as u32) as usize;
    // SAFETY: i < LAZY_WORDS: a word of the chunk.
    unsafe { *chunk.cast::<u64>().add(i) = bits };
    true
}

/// Copies fd `fd` of `parent` (counters at `pp`) to `child`'s entries at
/// its fork, not counted: the child's counters start as the parent's. The
/// caller marks the fds it copies in the child's `entries`, a word at a
/// time (see [`mark_entries`]).
pub fn copy_to_child(pp: *mut ProcStats, parent: u32, cp: *mut ProcStats, child: u32, fd: u32) {
    let info = match open_entry(parent, fd) {
        // SAFETY: a live FDS value, copied.
        Some(e) => unsafe { *e },
        None => {
            if lazy_bit(pp, parent, fd).is_none() {
                // An fd the parent's count does not know either: the
                // drift check sees both.
                return;
            }
            inherited(pp, fd)
        }
    };
    if FDS.insert(FdKey { tgid: child, fd }, info, 0).is_err() {
        count(CNT_FDS_MAP_FULL);
        inexact(cp);
        return;
    }
    raise_hwm(cp, fd);
}

/// Where new fds come from: the syscall, and the user stack that called it
/// (an id in STACKS, or NO_SITE).
#[derive(Clone, Copy)]
pub struct Origin {
    pub syscall: u64,
    pub site: u64,
    /// FdInfo::detail of the new fds.
    pub detail: u32,
    /// bpf_ktime_get_ns() at sys_exit: the creation time of the new fds.
    pub now: u64,
}

/// A new fd `fd` appeared in process `tgid`. `replaces` is true when the
/// syscall atomically closes whatever `fd` was (dup2, dup3): an open entry is
/// then an implicit close. Otherwise the kernel only hands out free numbers,
/// so an open entry is an fd whose close has not reached fdtrace yet
/// (another thread's close still on its way to sys_exit): it is counted
/// closed now, and the new entry is marked so that the late close does not
/// remove it. Inlined: a BPF call takes at most five arguments.
#[inline(always)]
pub fn install(
    p: *mut ProcStats,
    tgid: u32,
    fd: u32,
    kind: u8,
    cloexec: bool,
    origin: Origin,
    replaces: bool,
) {
    let key = FdKey { tgid, fd };
    let mut info = FdInfo {
        created_ns: origin.now,
        site: origin.site,
        py_site: NO_PY_STACK,
        py_use: NO_PY_STACK,
        syscall: origin.syscall as u16,
        kind,
        flags: FD_OPEN | if cloexec { FD_CLOEXEC } else { 0 },
        detail: origin.detail,
    };
    // SAFETY: p is a live STATS element for the whole handler; entries are
    // live FDS values.
    unsafe {
        // The common case: the number was used before, and its entry is
        // rewritten in place (no element allocation, no bucket lock).
        let entry = match FDS.get_ptr_mut(key) {
            Some(e) => e,
            None => {
                // A number first used since a lazy fork held the inherited
                // fd (replaced by dup2, or closed by another thread whose
                // close has not reached sys_exit yet).
                if let Some(old) = take_lazy(p, tgid, fd) {
                    add64(kind_slot(p, old.kind), u64::MAX);
                    add64(&raw mut (*p).closed, 1);
                    if !replaces {
                        info.flags |= FD_CLOSE_PENDING;
                    }
                }
                match FDS.insert(key, info, BPF_NOEXIST) {
                    Ok(()) => {
                        counted_new(p, fd, kind);
                        return;
                    }
                    // Made meanwhile (by the seed walk, or a resync): rewrite
                    // it below.
                    Err(EEXIST) => match FDS.get_ptr_mut(key) {
                        Some(e) => e,
                        None => {
                            inexact(p);
                            return;
                        }
                    },
                    Err(_) => {
                        // Map full: the fd is real but untracked. Count it, and
                        // let the drift check report the difference.
                        count(CNT_FDS_MAP_FULL);
                        inexact(p);
                        return;
                    }
                }
            }
        };
        let flags = (*entry).flags;
        if flags & FD_OPEN != 0 {
            add64(kind_slot(p, (*entry).kind), u64::MAX);
            if flags & FD_PREEXISTING != 0 && seeded_is_this_fd(key, origin.now) {
                // The walk at attach found this very fd while its creating
                // syscall was on its way here: it was opened since tracing
                // began, not before.
                add64(&raw mut (*p).seeded, u64::MAX);
            } else {
                add64(&raw mut (*p).closed, 1);
                if !replaces {
                    info.flags |= FD_CLOSE_PENDING;
                }
            }
        }
        *entry = info;
        counted_new(p, fd, kind);
    }
}

/// How long after the walk saw a seeded fd its creating syscall may still
/// reach sys_exit and be recognised as that fd's own (see
/// [`seeded_is_this_fd`]): such a syscall was on its way when the walk ran,
/// microseconds before.
const SEED_RACE_NS: u64 = 1_000_000_000;

/// Whether the seeded entry `key` is of the fd now in the table at that
/// number, a syscall that made it exiting at `now`: the same `struct file`
/// as the walk saw, shortly after the walk. A new fd on a number whose
/// previous (seeded) fd another thread is still closing has another file:
/// the old one is only released after that close's sys_exit, so its address
/// cannot have been reused. The time bound keeps a later dup2 onto a seeded
/// fd that already shared the source's file (`2>&1` when both were the
/// terminal) an implicit close, as it is. Read only on the rare path of a
/// seeded entry that is open when a new fd gets its number.
fn seeded_is_this_fd(key: FdKey, now: u64) -> bool {
    // SAFETY: plain read of a map value.
    let Some(&[file, seen_ns]) = (unsafe { SEED_FILES.get(key) }) else {
        return false;
    };
    if now.wrapping_sub(seen_ns) > SEED_RACE_NS {
        return false;
    }
    // SAFETY: helper without arguments; the current task is the one whose
    // syscall is exiting, of the process `key.tgid`.
    let task = unsafe { bpf_get_current_task() };
    file_at(task, key.fd) == Some(file)
}

/// Fd `fd` of `tgid` was there before tracing began (the seed walk at
/// attach found it, its `struct file` at `file`): its entry is written and
/// counted as seeded. Any entry for the number, open or closed, was made
/// since the registration: the walk then saw an fd whose own syscall has
/// counted it, or is about to, and it is left alone. Not counted as opened.
pub fn seed(p: *mut ProcStats, tgid: u32, fd: u32, kind: u8, cloexec: bool, file: u64) {
    // A lazy fd of a child forked (by a traced parent) since the walk
    // began is counted already: in the parent's counts, which the child
    // started with.
    if lazy_bit(p, tgid, fd).is_some() {
        return;
    }
    let key = FdKey { tgid, fd };
    let info = FdInfo {
        created_ns: 0,
        site: NO_SITE,
        py_site: NO_PY_STACK,
        py_use: NO_PY_STACK,
        syscall: u16::MAX,
        kind,
        flags: FD_OPEN | FD_PREEXISTING | if cloexec { FD_CLOEXEC } else { 0 },
        detail: 0,
    };
    // Before the entry: a creating syscall that finds the entry open looks
    // here. Left over when the number has an entry already, where it is
    // never looked at (that entry is not a seeded one).
    // SAFETY: helper without arguments.
    let seen: [u64; 2] = [file, unsafe { bpf_ktime_get_ns() }];
    let _ = SEED_FILES.insert(key, seen, 0);
    // Odd from before the entry to after the counters: a fork of this
    // process meanwhile reads them again (see lifecycle::parent_counts).
    seed_seq_add(p);
    // BPF_NOEXIST: the element is only allocated when the number has no
    // entry, which is the one case to write.
    match FDS.insert(key, info, BPF_NOEXIST) {
        Ok(()) => {
            // SAFETY: p is a live STATS element.
            unsafe {
                add64(&raw mut (*p).seeded, 1);
                // Neither opened nor closed moves (see ProcStats::changes).
                add64(&raw mut (*p).generation, 1);
            }
            counted(p, fd, kind);
        }
        Err(EEXIST) => {}
        Err(_) => {
            count(CNT_FDS_MAP_FULL);
            inexact(p);
        }
    }
    seed_seq_add(p);
}

/// One step of `p`'s [`ProcStats::seed_seq`]; an atomic add, which orders
/// the seed's other writes after (or before) it.
#[inline(always)]
fn seed_seq_add(p: *mut ProcStats) {
    // SAFETY: p is a live STATS element.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(&raw mut (*p).seed_seq, 1) };
}

/// The counters of a new fd, once its entry is written.
#[inline(always)]
fn counted_new(p: *mut ProcStats, fd: u32, kind: u8) {
    // SAFETY: p is a live STATS element.
    add64(unsafe { &raw mut (*p).opened }, 1);
    counted(p, fd, kind);
}

/// The counters of an fd whose entry was just written, opened or seeded.
#[inline(always)]
fn counted(p: *mut ProcStats, fd: u32, kind: u8) {
    add64(kind_slot(p, kind), 1);
    entry_written(p, fd);
}

/// An entry for `fd` was written: it is marked in `entries`, and `fd_hwm`
/// raised past it.
#[inline(always)]
fn entry_written(p: *mut ProcStats, fd: u32) {
    mark_entry(p, fd);
    raise_hwm(p, fd);
}

/// Makes `fd_hwm` at least `fd + 1`. An atomic add of the shortfall, not a
/// store: the seed walk and the fd syscalls of several threads raise it at
/// once, and a store of a lower value after a higher one would shorten the
/// loops over the table (close_range, exec, the drop at exit) below fds that
/// have entries. Two raises from one reading overshoot, which only makes a
/// loop visit more numbers.
#[inline(always)]
fn raise_hwm(p: *mut ProcStats, fd: u32) {
    // SAFETY: p is a live STATS element.
    unsafe {
        let hwm = core::ptr::read_volatile(&raw const (*p).fd_hwm);
        if fd >= hwm {
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(
                &raw mut (*p).fd_hwm,
                fd + 1 - hwm,
            );
        }
    }
}

/// Whether `fd` may have an FDS entry of `p`'s. The word is read whatever
/// the bit, so that its address is computed before any branch on it (see
/// entry_index).
#[inline(always)]
fn has_entry_bit(p: *mut ProcStats, fd: u32) -> bool {
    let (w, bit) = entry_index(fd);
    // SAFETY: p is a live STATS element; w < ENTRY_WORDS.
    let v = unsafe { core::ptr::read_volatile((&raw const (*p).entries).cast::<u64>().add(w)) };
    may_have_entry(v, bit)
}

/// Marks the fds of `bits` of word `w` (fds `64 * w` to `64 * w + 63`) in
/// `p`'s [`ProcStats::entries`], if it covers them and they are not all set
/// yet: one atomic OR (threads set bits of one word at once). A lazy
/// fork marks the fds it copies this way, outside its per-fd loop, whose
/// verification a branch per fd made five times longer.
#[inline(always)]
pub fn mark_entries(p: *mut ProcStats, w: u32, bits: u64) {
    // The word is read before the check, as in entry_word.
    let covered = (w as usize) < ENTRY_WORDS;
    // SAFETY: p is a live STATS element; the index is below ENTRY_WORDS.
    unsafe {
        let word = (&raw mut (*p).entries)
            .cast::<u64>()
            .add(w as usize % ENTRY_WORDS);
        let v = core::ptr::read_volatile(word);
        if covered && v & bits != bits {
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, bits);
        }
    }
}

/// Sets `fd`'s bit in `p`'s [`ProcStats::entries`] ([`mark_entries`] of
/// one bit: skipped when it is set already, as it is for every number but
/// a process's first use of it).
#[inline(always)]
fn mark_entry(p: *mut ProcStats, fd: u32) {
    mark_entries(p, fd / 64, 1 << (fd % 64));
}

/// `fd` of `tgid` was closed (nothing to do when fdtrace did not know it).
pub fn remove(p: *mut ProcStats, tgid: u32, fd: u32) {
    match FDS.get_ptr_mut(FdKey { tgid, fd }) {
        // SAFETY: info is a live FDS value.
        Some(info) if unsafe { (*info).flags } & FD_OPEN != 0 => close_entry(p, info),
        Some(_) => {}
        None => {
            if let Some(old) = take_lazy(p, tgid, fd) {
                add64(kind_slot(p, old.kind), u64::MAX);
                // SAFETY: p is a live STATS element.
                add64(unsafe { &raw mut (*p).closed }, 1);
            }
        }
    }
}

/// The fd of open entry `info` was closed.
#[inline(always)]
fn close_entry(p: *mut ProcStats, info: *mut FdInfo) {
    // SAFETY: p is a live STATS element, info a live FDS value.
    unsafe {
        if (*info).flags & FD_CLOSE_PENDING != 0 {
            // This close was of the number's previous fd, already counted
            // when the number was reused (see install).
            (*info).flags &= !FD_CLOSE_PENDING;
            return;
        }
        let kind = (*info).kind;
        // Closed: the entry stays for the number's next fd (see FD_OPEN).
        (*info).flags = 0;
        add64(kind_slot(p, kind), u64::MAX);
        // Moves ProcStats::changes: no generation bump.
        add64(&raw mut (*p).closed, 1);
    }
}

pub fn set_cloexec(p: *mut ProcStats, tgid: u32, fd: u32, on: bool) {
    if !on
        && open_entry(tgid, fd).is_none()
        && let Some(mut info) = take_lazy(p, tgid, fd)
    {
        // A lazy fd that is to stay open across exec gets its own entry:
        // every fd that survives exec has one (see exec_lazy).
        info.flags &= !FD_CLOEXEC;
        if FDS.insert(FdKey { tgid, fd }, info, 0).is_err() {
            count(CNT_FDS_MAP_FULL);
            inexact(p);
            return;
        }
        entry_written(p, fd);
        // SAFETY: p is a live STATS element.
        add64(unsafe { &raw mut (*p).generation }, 1);
        return;
    }
    if let Some(info) = open_entry(tgid, fd) {
        // SAFETY: info is a live FDS value.
        unsafe {
            if on {
                (*info).flags |= FD_CLOEXEC;
            } else {
                (*info).flags &= !FD_CLOEXEC;
            }
            add64(&raw mut (*p).generation, 1);
        }
    }
}

/// Which bulk operation a bpf_loop over an fd range performs.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Bulk {
    /// close_range without CLOSE_RANGE_CLOEXEC.
    Close = 0,
    /// close_range with CLOSE_RANGE_CLOEXEC.
    MarkCloexec = 1,
    /// execve: every close-on-exec fd goes.
    Exec = 2,
    /// fork: copy the parent's table to the child.
    Copy = 3,
    /// The process is gone: drop its entries (no counting).
    Drop = 4,
}

#[repr(C)]
struct BulkCtx {
    p: *mut ProcStats,
    tgid: u32,
    /// Destination of Bulk::Copy.
    dst_tgid: u32,
    first: u32,
    op: Bulk,
    dst: *mut ProcStats,
    /// Bulk::Exec: fds numbered 3 and up that stay open across exec.
    inherited: u32,
    /// Bulk::Exec of a lazy process: the fds that stay open, by kind
    /// (FD_KINDS counters of EXEC_TALLY), or null.
    tally: *mut u64,
}

extern "C" fn bulk_step(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: ctx is the BulkCtx on bulk()'s stack, alive for the loop.
    let c = unsafe { &mut *(ctx as *mut BulkCtx) };
    let fd = c.first.wrapping_add(i);
    // Exec, Copy and Drop act on entries only: a number without one is
    // skipped before its hash lookup. close_range also closes the lazy
    // fds, which have none.
    if matches!(c.op, Bulk::Exec | Bulk::Copy | Bulk::Drop) && !has_entry_bit(c.p, fd) {
        return 0;
    }
    match c.op {
        Bulk::Close => remove(c.p, c.tgid, fd),
        Bulk::MarkCloexec => set_cloexec(c.p, c.tgid, fd, true),
        Bulk::Exec => {
            if let Some(info) = open_entry(c.tgid, fd) {
                // SAFETY: info is a live FDS value.
                if unsafe { (*info).flags } & FD_CLOEXEC != 0 {
                    close_entry(c.p, info);
                } else {
                    if fd > 2 {
                        c.inherited += 1;
                    }
                    if !c.tally.is_null() {
                        // SAFETY: info is a live FDS value; the index is
                        // below FD_KINDS, in the EXEC_TALLY value.
                        unsafe {
                            let k = (*info).kind as usize;
                            let k = if k < FD_KINDS { k } else { 0 };
                            *c.tally.add(k) += 1;
                        }
                    }
                }
            }
        }
        Bulk::Copy => {
            if let Some(info) = open_entry(c.tgid, fd) {
                // SAFETY: info is a live FDS value.
                let info = unsafe { *info };
                if FDS
                    .insert(
                        FdKey {
                            tgid: c.dst_tgid,
                            fd,
                        },
                        info,
                        0,
                    )
                    .is_ok()
                {
                    mark_entry(c.dst, fd);
                    // Open when the child's tracing began.
                    add64(kind_slot(c.dst, info.kind), 1);
                    // SAFETY: dst is a live STATS element.
                    add64(unsafe { &raw mut (*c.dst).seeded }, 1);
                } else {
                    count(CNT_FDS_MAP_FULL);
                    inexact(c.dst);
                }
            }
        }
        Bulk::Drop => {
            // Open and closed entries alike.
            let _ = FDS.remove(FdKey { tgid: c.tgid, fd });
        }
    }
    0
}

/// Runs `op` over fds `first..end` of `tgid`, end bounded by the process's
/// high-water mark. Returns, for Bulk::Exec, the fds >= 3 left open.
pub fn bulk(
    p: *mut ProcStats,
    tgid: u32,
    first: u32,
    end: u32,
    op: Bulk,
    dst: Option<(u32, *mut ProcStats)>,
) -> u32 {
    bulk_tally(p, tgid, first, end, op, dst, core::ptr::null_mut())
}

/// [`bulk`], with Bulk::Exec's tally of the fds left open (see BulkCtx).
#[inline(always)]
fn bulk_tally(
    p: *mut ProcStats,
    tgid: u32,
    first: u32,
    end: u32,
    op: Bulk,
    dst: Option<(u32, *mut ProcStats)>,
    tally: *mut u64,
) -> u32 {
    // SAFETY: p is a live STATS element.
    let mut hwm = unsafe { (*p).fd_hwm };
    // A close_range also closes the lazy fds (the other loops leave them:
    // exec and exit drop them at once, and they are close-on-exec already).
    // SAFETY: as above.
    unsafe {
        if op == Bulk::Close && (*p).flags & PROC_LAZY != 0 && (*p).lazy_end > hwm {
            hwm = (*p).lazy_end;
        }
    }
    let end = if end > hwm { hwm } else { end };
    if first >= end {
        return 0;
    }
    let mut n = end - first;
    if n > MAX_LOOP {
        n = MAX_LOOP;
        inexact(p);
    }
    let (dst_tgid, dst) = match dst {
        Some(d) => d,
        None => (0, p),
    };
    let mut ctx = BulkCtx {
        p,
        tgid,
        dst_tgid,
        first,
        op,
        dst,
        inherited: 0,
        tally,
    };
    // SAFETY: the callback is a static function and ctx outlives the call.
    let done = unsafe { bpf_loop(n, bulk_step as *mut c_void, (&raw mut ctx).cast(), 0) };
    if done < n as i64 {
        inexact(p);
    }
    ctx.inherited
}

/// A successful exec of lazy process `p`: the close-on-exec fds with
/// entries of their own are closed as in any exec; every fd left open has
/// an entry of its own (the others were copied at fork, or given one when
/// their close-on-exec bit was cleared), so the rest of the count are the
/// lazy fds exec closed, and the counts by kind are those of the entries
/// left. Stored, not added: exec leaves one thread
/// (https://github.com/torvalds/linux/blob/v6.18/fs/exec.c, de_thread).
/// Returns the fds >= 3 left open.
pub fn exec_lazy(p: *mut ProcStats, tgid: u32) -> u32 {
    let Some(t) = EXEC_TALLY.get_ptr_mut(0) else {
        inexact(p);
        return 0;
    };
    let t = t.cast::<u64>();
    // SAFETY: t is this CPU's EXEC_TALLY value of FD_KINDS counters; p is
    // a live STATS element.
    unsafe {
        for k in 0..FD_KINDS {
            *t.add(k) = 0;
        }
        let inherited = bulk_tally(p, tgid, 0, u32::MAX, Bulk::Exec, None, t);
        let mut left = 0u64;
        for k in 0..FD_KINDS {
            left += *t.add(k);
        }
        let live = (*p).live();
        if live >= left {
            add64(&raw mut (*p).closed, live - left);
        } else {
            inexact(p);
        }
        for k in 0..FD_KINDS {
            (*p).by_kind[k] = *t.add(k);
        }
        drop_lazy(p, tgid);
        add64(&raw mut (*p).generation, 1);
        inherited
    }
}

/// What an event carries beyond the process's counters.
#[derive(Clone, Copy)]
pub struct Extra {
    /// The syscall the event is about (EV_EMFILE, EV_EXEC, ...), 0 if none.
    pub syscall: u64,
    pub site: u64,
    pub inherited: u32,
    /// User pointer to a path to copy (0: none).
    pub path: u64,
}

impl Extra {
    pub const NONE: Extra = Extra {
        syscall: 0,
        site: NO_SITE,
        inherited: 0,
        path: 0,
    };
}

/// Sends an event about `tgid` with its current counters.
/// (BPF calls take at most five arguments: the rest travels in `extra`.)
pub fn emit(kind: u32, tgid: u32, aux: u32, p: *const ProcStats, extra: Extra) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(CNT_RINGBUF_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: p is a live STATS element; ev is the reserved, writable entry,
    // filled field by field so the 160-byte event never sits on the stack.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).kind = kind;
        (*ev).tgid = tgid;
        (*ev).aux = aux;
        (*ev).syscall = extra.syscall as u32;
        (*ev).live = (*p).live();
        (*ev).opened = (*p).opened;
        (*ev).closed = (*p).closed;
        (*ev).site = extra.site;
        (*ev).inherited = extra.inherited;
        (*ev)._pad = 0;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).path = [0; EVENT_PATH_LEN];
        if extra.path != 0 {
            let _ = bpf_probe_read_user_str_bytes(extra.path as *const u8, &mut (*ev).path);
        }
    }
    entry.submit(wake_flags());
}
