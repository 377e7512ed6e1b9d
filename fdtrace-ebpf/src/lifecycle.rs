//! Process life cycle: exec (every close-on-exec fd goes), fork (a followed
//! process's child gets a copy of its table) and exit (the table goes).
//!
//! fork and exit are BTF tracepoints (tp_btf): typed task pointers, no
//! tracefs and no format files to read offsets from.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    programs::BtfTracePointContext,
};
use fdtrace_common::{
    EV_EXEC, EV_EXIT, EV_FORK, PROC_FOLLOW, PROC_NODE, PROC_SHARED_TABLE, ProcStats,
};

use crate::{
    global,
    iter::{TASK_FILES_OFF, TASK_PID_OFF, TASK_TGID_OFF},
    node, python,
    sys_exit::Call,
    table::{self, Bulk, Extra, bulk, emit, proc_of},
};

/// 1 when sched_process_exit has its `group_dead` argument (Linux 6.16+,
/// read from the tracepoint's BTF prototype by user space); 0 before, and
/// then the leader's exit ends the process.
#[unsafe(no_mangle)]
static EXIT_HAS_GROUP_DEAD: u32 = 0;

/// A successful execve/execveat of a traced process.
pub fn exec(c: &Call) {
    python::forget(c.tgid);
    let inherited = bulk(c.p, c.tgid, 0, u32::MAX, Bulk::Exec, None);
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
    // SAFETY: pp is a live STATS element.
    st.fd_hwm = unsafe { (*pp).fd_hwm };
    st.cgroup = node::cgroup_id(ctask as u64);
    if !table::register(child, &st) {
        return None;
    }
    let cp = proc_of(child)?;
    python::fork(parent, child);
    bulk(pp, parent, 0, u32::MAX, Bulk::Copy, Some((child, cp)));
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
    table::unregister(tgid, p);
}
