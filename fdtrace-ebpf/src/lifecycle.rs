//! Process life cycle: exec (every close-on-exec fd goes), fork (a followed
//! process's child starts with its parent's counts, the entries of the fds
//! that stay open across exec, and the rest lazily: see PROC_LAZY) and exit
//! (the table goes).
//!
//! fork and exit are BTF tracepoints (tp_btf): typed task pointers, no
//! tracefs and no format files to read offsets from.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated::bpf_loop,
    },
    programs::BtfTracePointContext,
};
use fdtrace_common::{
    EV_EXEC, EV_EXIT, EV_FORK, FD_KINDS, PROC_FOLLOW, PROC_LAZY, PROC_NODE, PROC_SHARED_TABLE,
    ProcStats, lowest_bit,
};

use crate::{
    global,
    iter::{TASK_FILES_OFF, TASK_PID_OFF, TASK_TGID_OFF, fd_bitmaps, read_u64},
    node, python,
    sys_exit::Call,
    table::{self, Bulk, Extra, bulk, emit, inexact, proc_of},
};

/// 1 when sched_process_exit has its `group_dead` argument (Linux 6.16+,
/// read from the tracepoint's BTF prototype by user space); 0 before, and
/// then the leader's exit ends the process.
#[unsafe(no_mangle)]
static EXIT_HAS_GROUP_DEAD: u32 = 0;

/// A successful execve/execveat of a traced process.
pub fn exec(c: &Call) {
    python::forget(c.tgid);
    // SAFETY: c.p is a live STATS element.
    let inherited = if unsafe { (*c.p).flags } & PROC_LAZY != 0 {
        table::exec_lazy(c.p, c.tgid)
    } else {
        bulk(c.p, c.tgid, 0, u32::MAX, Bulk::Exec, None)
    };
    let extra = Extra {
        syscall: c.nr,
        inherited,
        ..Extra::NONE
    };
    emit(
        EV_EXEC,
        c.tgid,
        bpf_get_current_pid_tgid() as u32,
        c.p,
        extra,
    );
}

/// A u32 or pointer-sized field of a task, at an offset from BTF.
#[inline(always)]
fn task_field<T>(task: *const u8, off: &u32) -> Option<T> {
    // SAFETY: the helper checks the address.
    unsafe { bpf_probe_read_kernel(task.add(global(off) as usize) as *const T) }.ok()
}

/// sched_process_fork(parent, child): runs in the parent once the child's
/// fd table exists (a copy, or the parent's own with CLONE_FILES).
/// https://github.com/torvalds/linux/blob/v6.18/kernel/fork.c (kernel_clone)
pub fn fork(ctx: &BtfTracePointContext) -> Option<()> {
    let parent = table::tgid();
    let (ptask, ctask): (*const u8, *const u8) = (ctx.arg(0), ctx.arg(1));
    // A thread (CLONE_THREAD, io_uring workers) joins the parent's group
    // and shares its table: nothing to copy.
    let child: u32 = task_field(ctask, &TASK_TGID_OFF)?;
    if child == parent {
        return None;
    }
    let Some(pp) = proc_of(parent) else {
        if node::active() {
            node::fork(ctask as u64, child);
        }
        return None;
    };
    // SAFETY: pp is a live STATS element.
    if unsafe { (*pp).flags } & PROC_FOLLOW == 0
        || task_field::<u32>(ctask, &TASK_PID_OFF)? != child
    {
        return None;
    }
    let mut shared = 0;
    // CLONE_FILES without CLONE_THREAD: one table, two processes.
    if task_field::<u64>(ctask, &TASK_FILES_OFF)? == task_field::<u64>(ptask, &TASK_FILES_OFF)? {
        shared = PROC_SHARED_TABLE;
        // SAFETY: pp is a live STATS element.
        unsafe { (*pp).flags |= PROC_SHARED_TABLE };
    }
    // A child of a process the node selection named is the selection's
    // too: it leaves it when moved out.
    // SAFETY: pp is a live STATS element.
    let selected = unsafe { (*pp).flags } & PROC_NODE;
    let mut st = ProcStats::new(child, PROC_FOLLOW | shared | selected);
    st.cgroup = node::cgroup_id(ctask as u64);
    // A table of its own: copied lazily (see PROC_LAZY). The child's table
    // is a copy of the parent's, so it starts with the parent's counts;
    // entries are copied now only for the fds that stay open across exec.
    // One table (CLONE_FILES) is the same table: its entries are copied.
    // The parent's counts and the fds they cover (below its high-water
    // mark), as one; None while the seed walk kept writing them, when the
    // child is counted as a process registered now (the same walk counts
    // it next: a new task is visited after its parent).
    let counted = if shared == 0 {
        parent_counts(pp, &mut st)
    } else {
        None
    };
    if counted.is_some() {
        st.seeded = st.live();
        st.flags |= PROC_LAZY;
        st.lazy_parent = parent;
        // SAFETY: a helper without arguments.
        st.fork_ns = unsafe { bpf_ktime_get_ns() };
    } else if shared != 0 {
        // SAFETY: pp is a live STATS element.
        st.fd_hwm = unsafe { (*pp).fd_hwm };
    }
    if !table::register(child, &st) {
        return None;
    }
    let cp = proc_of(child)?;
    python::fork(parent, child);
    if let Some(hwm) = counted {
        lazy_fork(pp, parent, cp, child, ctask as u64, hwm);
    } else if shared == 0 {
        // And the report resyncs it, should the walk have passed.
        inexact(cp);
    } else {
        bulk(pp, parent, 0, u32::MAX, Bulk::Copy, Some((child, cp)));
    }
    // The copy changed the child's table: a report that read it meanwhile
    // (PROCS named the child before the copy) must read it again.
    // SAFETY: cp is a live STATS element.
    table::add64(unsafe { &raw mut (*cp).generation }, 1);
    emit(EV_FORK, child, parent, cp, Extra::NONE);
    Some(())
}

/// sched_process_exit(task, group_dead): the process is gone once its last
/// thread exits.
/// https://github.com/torvalds/linux/blob/v6.18/kernel/exit.c (do_exit)
pub fn exit(ctx: &BtfTracePointContext) {
    let id = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((id >> 32) as u32, id as u32);
    let Some(p) = proc_of(tgid) else {
        return;
    };
    let group_dead = if global(&EXIT_HAS_GROUP_DEAD) != 0 {
        // A C bool: its low byte.
        ctx.arg::<u64>(1) as u8 != 0
    } else {
        pid == tgid
    };
    if !group_dead {
        return;
    }
    emit(EV_EXIT, tgid, pid, p, Extra::NONE);
    python::forget(tgid);
    bulk(p, tgid, 0, u32::MAX, Bulk::Drop, None);
    table::drop_lazy(p, tgid);
    table::unregister(tgid, p);
}

/// How many times a fork reads its parent's counts while the seed walk
/// writes them (a few atomic adds an fd) before it gives up.
const SEED_READS: usize = 4;

/// Copies the parent's per-kind counts to `st` and returns its
/// high-water mark, read when no seed walk was writing one of its fds: the
/// fds below that mark are the ones the counts cover. A fork during the
/// walk of its parent (at attach, or a node-mode start) would otherwise
/// count an fd the walk had not counted yet as LAZY, or the other way
/// round, and the child's walk, which leaves LAZY fds alone, would not
/// mend it. None (and no counts) when every read overlapped a write.
#[inline(always)]
fn parent_counts(pp: *mut ProcStats, st: &mut ProcStats) -> Option<u32> {
    for _ in 0..SEED_READS {
        // SAFETY: pp is a live STATS element; volatile reads of fields
        // another CPU's seed walk writes with atomic adds.
        unsafe {
            let seq = core::ptr::read_volatile(&raw const (*pp).seed_seq);
            if seq % 2 == 1 {
                continue;
            }
            for (c, k) in st.by_kind.iter_mut().zip((*pp).by_kind.iter()) {
                *c = core::ptr::read_volatile(k);
            }
            let hwm = core::ptr::read_volatile(&raw const (*pp).fd_hwm);
            if core::ptr::read_volatile(&raw const (*pp).seed_seq) == seq {
                return Some(hwm);
            }
        }
    }
    st.by_kind = [0; FD_KINDS];
    None
}

/// The walk of a lazy fork over the child's fd table bitmaps: a step per
/// word of 64 fds, and within a word one per fd to copy (open, not
/// close-on-exec: usually 0, 1 and 2), not one per fd number. A parent
/// holding a thousand fds took a thousand steps, most doing nothing, and
/// 45 us a fork. (Counters the steps compare live in the callbacks'
/// arguments, not here: a precise counter in the context keeps the
/// verifier from finding two iterations' states alike.)
#[repr(C)]
struct ForkCtx {
    pp: *mut ProcStats,
    cp: *mut ProcStats,
    parent: u32,
    child: u32,
    open_fds: u64,
    cloexec: u64,
    /// The fds of the word being read still to copy, and its first fd.
    eager: u64,
    base: u32,
    failed: u32,
    /// The parent's high-water mark: only fds below it are lazy.
    hwm: u32,
}

/// Reads the child's `open_fds` and `close_on_exec` bitmaps up to the
/// parent's high-water mark: the close-on-exec fds are LAZY bits (one
/// store per 64 fds), the others are copied from the parent's entries.
/// Runs before the child first runs (sched_process_fork precedes
/// wake_up_new_task), so no syscall of the child sees a half-made table.
fn lazy_fork(
    pp: *mut ProcStats,
    parent: u32,
    cp: *mut ProcStats,
    child: u32,
    ctask: u64,
    hwm: u32,
) {
    let Some((open_fds, cloexec, max_fds)) = fd_bitmaps(ctask) else {
        inexact(cp);
        return;
    };
    let words = hwm.div_ceil(64).min(max_fds / 64);
    let n = words * 64;
    let mut ctx = ForkCtx {
        pp,
        cp,
        parent,
        child,
        open_fds,
        cloexec,
        eager: 0,
        base: 0,
        failed: 0,
        hwm,
    };
    // SAFETY: the callback is a static function and ctx outlives the call.
    let done = unsafe { bpf_loop(words, word_step as *mut c_void, (&raw mut ctx).cast(), 0) };
    // SAFETY: cp is a live STATS element.
    unsafe { (*cp).lazy_end = n };
    if done < i64::from(words) || ctx.failed != 0 {
        inexact(cp);
    }
}

/// Word `w` of the child's bitmaps.
extern "C" fn word_step(w: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: ctx is the ForkCtx on lazy_fork()'s stack, alive for the loop.
    let c = unsafe { &mut *(ctx as *mut ForkCtx) };
    let first = w * 64;
    let at = u64::from(w) * 8;
    let (Some(open), Some(cx)) = (read_u64(c.open_fds + at), read_u64(c.cloexec + at)) else {
        c.failed = 1;
        return 1;
    };
    // Only the fds below the parent's high-water mark are counted in the
    // parent's counts the child starts with (all of them once the parent
    // is seeded; the seed walk counts the child's others), and only their
    // entries are copied: an entry the walk wrote above it since the
    // child's counts were read is not in them, and the child's own walk
    // counts that fd.
    let below = match c.hwm.saturating_sub(first) {
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    };
    let lazy = open & cx & below;
    if lazy != 0 && !table::set_lazy_word(c.child, w, lazy) {
        c.failed = 1;
    }
    c.eager = open & !cx & below;
    if c.eager != 0 {
        table::mark_entries(c.cp, w, c.eager);
        c.base = first;
        // SAFETY: as in lazy_fork.
        unsafe { bpf_loop(64, copy_step as *mut c_void, ctx, 0) };
    }
    0
}

/// The lowest fd of the word's left to copy.
extern "C" fn copy_step(_i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: as in word_step.
    let c = unsafe { &mut *(ctx as *mut ForkCtx) };
    if c.eager == 0 {
        return 1;
    }
    let fd = c.base + lowest_bit(c.eager);
    c.eager &= c.eager - 1;
    table::copy_to_child(c.pp, c.parent, c.cp, c.child, fd);
    0
}
