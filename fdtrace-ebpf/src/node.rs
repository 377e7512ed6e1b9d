//! Node mode (`--all`, `--cgroup`): the kernel side starts tracing a process
//! on its own, with no round trip to user space, when it appears in the
//! selection: forked by an untraced parent (a followed parent's child gets
//! a copy of its table instead, see lifecycle::fork), exec'd while
//! untraced (a user-mode helper the kernel started), or moved into a
//! selected cgroup (runc writes a container's init into its cgroup before
//! the exec). Such a process is registered at once, so its fd syscalls
//! count from then on, and flagged PROC_ADOPTED with an EV_ADOPT event:
//! user space seeds its table with the seed walk, which keeps the count
//! exact across the gap (see table::seed).
//!
//! With cgroup filters the selection follows moves both ways: a process
//! the selection named (PROC_NODE) that is moved out of it stops being
//! traced (EV_LEAVE, its state freed as at exit). With `--container` or
//! `--pod`, whose containers may start after fdtrace, user space is told
//! of each cgroup a process enters for the first time (EV_CGROUP) and
//! selects it if it is a container a filter names.
//!
//! Every traced process's ProcStats::cgroup follows its moves, in any mode:
//! user space re-reads who a process is only when that changes.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, generated::bpf_get_current_task},
    macros::map,
    maps::{HashMap, LruHashMap},
    programs::BtfTracePointContext,
};
use fdtrace_common::{
    CGROUP_MAX_DEPTH, CNT_RINGBUF_FULL, EV_ADOPT, EV_CGROUP, EV_LEAVE, EVENT_PATH_LEN, Event,
    NODE_ALL, NODE_CGROUPS, NODE_OFF, PROC_ADOPTED, PROC_FOLLOW, PROC_NODE, ProcStats,
};

use crate::{
    global,
    iter::{TASK_PID_OFF, TASK_TGID_OFF},
    maps::EVENTS,
    python,
    table::{self, Bulk, Extra, bulk, count, emit, proc_of},
};

/// `NODE_*`: what node mode selects (set by user space before load).
#[unsafe(no_mangle)]
static NODE_MODE: u32 = NODE_OFF;
/// fdtrace's own tgid: never traced by node mode.
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;
/// 1 when user space wants EV_CGROUP (`--container`, `--pod`).
#[unsafe(no_mangle)]
static NODE_WATCH: u32 = 0;
/// Offsets from BTF: `task_struct.flags`, `task_struct.cgroups`,
/// `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`, `cgroup.self.parent`
/// (the parent's `cgroup_subsys_state`) and `cgroup_subsys_state.cgroup`.
#[unsafe(no_mangle)]
static TASK_FLAGS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_CGROUPS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static CSS_SET_DFL_CGRP_OFF: u32 = 0;
#[unsafe(no_mangle)]
static CGROUP_KN_OFF: u32 = 0;
#[unsafe(no_mangle)]
static KERNFS_NODE_ID_OFF: u32 = 0;
#[unsafe(no_mangle)]
static CGROUP_PARENT_OFF: u32 = 0;
#[unsafe(no_mangle)]
static CSS_CGROUP_OFF: u32 = 0;

/// The selected cgroup v2 ids (the inode number of the cgroup's directory,
/// which is `kernfs_node.id`); a process in one of them or below is traced.
#[map]
pub static NODE_CGROUP_IDS: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// The cgroup ids user space was told of (EV_CGROUP) or found at start.
/// An LRU: a node makes and removes cgroups all along, and one evicted is
/// only told of again.
#[map]
pub static NODE_SEEN_CGROUPS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(8192, 0);

/// PF_KTHREAD (include/linux/sched.h): a kernel thread, with no fd table
/// of its own.
const PF_KTHREAD: u32 = 0x0020_0000;

#[inline(always)]
fn read<T>(base: u64, off: &u32) -> Option<T> {
    // SAFETY: the helper checks the address.
    unsafe { bpf_probe_read_kernel((base + u64::from(global(off))) as *const T) }.ok()
}

#[inline(always)]
pub fn active() -> bool {
    global(&NODE_MODE) != NODE_OFF
}

/// Whether `task` (a leader) is in the selection.
fn selected(task: u64, tgid: u32) -> bool {
    if tgid == global(&SELF_TGID) {
        return false;
    }
    match read::<u32>(task, &TASK_FLAGS_OFF) {
        Some(f) if f & PF_KTHREAD == 0 => {}
        _ => return false,
    }
    match global(&NODE_MODE) {
        NODE_ALL => true,
        NODE_CGROUPS => in_selected_cgroup(task),
        _ => false,
    }
}

/// The task's v2 cgroup (`task->cgroups->dfl_cgrp`, what
/// bpf_get_current_cgroup_id reads).
/// https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/helpers.c (bpf_get_current_cgroup_id)
fn dfl_cgroup(task: u64) -> Option<u64> {
    let cset = read::<u64>(task, &TASK_CGROUPS_OFF)?;
    read::<u64>(cset, &CSS_SET_DFL_CGRP_OFF)
}

/// A cgroup's id: its kernfs node's, the inode of its directory.
fn id_of(cgrp: u64) -> Option<u64> {
    let kn = read::<u64>(cgrp, &CGROUP_KN_OFF)?;
    read::<u64>(kn, &KERNFS_NODE_ID_OFF)
}

/// The task's v2 cgroup id, 0 when it cannot be read.
pub fn cgroup_id(task: u64) -> u64 {
    dfl_cgroup(task).and_then(id_of).unwrap_or(0)
}

/// Whether the task's v2 cgroup or one of its ancestors is selected: a
/// cgroup made below a selected one after fdtrace started is selected too.
fn in_selected_cgroup(task: u64) -> bool {
    let Some(mut cgrp) = dfl_cgroup(task) else {
        return false;
    };
    for _ in 0..CGROUP_MAX_DEPTH {
        let Some(id) = id_of(cgrp) else {
            return false;
        };
        // SAFETY: plain read of a map value.
        if unsafe { NODE_CGROUP_IDS.get(id) }.is_some() {
            return true;
        }
        let parent = match read::<u64>(cgrp, &CGROUP_PARENT_OFF) {
            Some(css) if css != 0 => css,
            // The root: nothing above.
            _ => return false,
        };
        match read::<u64>(parent, &CSS_CGROUP_OFF) {
            Some(c) if c != 0 => cgrp = c,
            _ => return false,
        }
    }
    false
}

/// Starts tracing `tgid` (task `task`) if it is selected and untraced.
fn adopt(task: u64, tgid: u32) -> Option<()> {
    if !active() || proc_of(tgid).is_some() || !selected(task, tgid) {
        return None;
    }
    let mut st = ProcStats::new(tgid, PROC_FOLLOW | PROC_ADOPTED | PROC_NODE);
    st.cgroup = cgroup_id(task);
    if !table::register(tgid, &st) {
        return None;
    }
    let p = proc_of(tgid)?;
    emit(EV_ADOPT, tgid, 0, p, Extra::NONE);
    Some(())
}

/// A fork whose parent is not traced: the child (a process, not a thread)
/// is traced if it is selected. Its cgroup is the parent's here (the
/// child has not run yet; clone3's CLONE_INTO_CGROUP moved it already).
pub fn fork(child_task: u64, child: u32) {
    if read::<u32>(child_task, &TASK_PID_OFF) != Some(child) {
        return;
    }
    watch(child_task, child);
    let _ = adopt(child_task, child);
}

/// Tells user space of the task's cgroup if it has not been told of it
/// (`--container`, `--pod`): a container started after fdtrace is seen
/// when runc moves its init into its cgroup, or when a process is forked
/// straight into it (clone3 with CLONE_INTO_CGROUP).
fn watch(task: u64, tgid: u32) {
    if global(&NODE_WATCH) == 0 || tgid == global(&SELF_TGID) {
        return;
    }
    let id = cgroup_id(task);
    // BPF_NOEXIST: of two tasks entering it at once, one tells.
    if id == 0 || NODE_SEEN_CGROUPS.insert(id, 1, BPF_NOEXIST.into()).is_err() {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(CNT_RINGBUF_FULL);
        // Told next time a task enters it.
        let _ = NODE_SEEN_CGROUPS.remove(id);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: ev is the reserved, writable entry, filled field by field.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).kind = EV_CGROUP;
        (*ev).tgid = tgid;
        (*ev).aux = 0;
        (*ev).syscall = 0;
        (*ev).live = 0;
        (*ev).opened = 0;
        (*ev).closed = 0;
        (*ev).site = id;
        (*ev).inherited = 0;
        (*ev)._pad = 0;
        (*ev).comm = [0; 16];
        (*ev).path = [0; EVENT_PATH_LEN];
    }
    // At once: user space must select the cgroup (NODE_CGROUP_IDS) before
    // the task in it execs, which node mode's adoption waits for.
    entry.submit(u64::from(BPF_RB_FORCE_WAKEUP));
}

/// A successful exec of an untraced process.
pub fn exec(tgid: u32) {
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let _ = adopt(task, tgid);
}

/// cgroup_attach_task(dst_cgrp, path, task, threadgroup): `task` moved;
/// fired after the move (cgroup_migrate), so its css_set is the new one.
/// It fires for v1 hierarchies too: the v2 cgroup is read from the task,
/// not from `dst_cgrp`. A move of a single thread (cgroup.threads) is left
/// to its leader's.
/// https://github.com/torvalds/linux/blob/v6.18/kernel/cgroup/cgroup.c (cgroup_attach_task)
pub fn cgroup_attach(ctx: &BtfTracePointContext) {
    let task: u64 = ctx.arg(2);
    let (Some(tgid), Some(pid)) = (
        read::<u32>(task, &TASK_TGID_OFF),
        read::<u32>(task, &TASK_PID_OFF),
    ) else {
        return;
    };
    if pid != tgid {
        return;
    }
    let traced = proc_of(tgid);
    if let Some(p) = traced {
        // SAFETY: p is a live STATS element.
        unsafe { (*p).cgroup = cgroup_id(task) };
    }
    if global(&NODE_MODE) != NODE_CGROUPS {
        return;
    }
    watch(task, tgid);
    match traced {
        // SAFETY: p is a live STATS element.
        Some(p) if unsafe { (*p).flags } & PROC_NODE != 0 && !in_selected_cgroup(task) => {
            leave(tgid, p)
        }
        Some(_) => {}
        None => {
            let _ = adopt(task, tgid);
        }
    }
}

/// `tgid`, traced because the selection named it, was moved out of it:
/// reported with its last counters and forgotten, as at exit.
fn leave(tgid: u32, p: *mut ProcStats) {
    emit(EV_LEAVE, tgid, 0, p, Extra::NONE);
    python::forget(tgid);
    bulk(p, tgid, 0, u32::MAX, Bulk::Drop, None);
    table::drop_lazy(p, tgid);
    table::unregister(tgid, p);
}
