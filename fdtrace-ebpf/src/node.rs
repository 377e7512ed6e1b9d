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
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task},
    macros::map,
    maps::HashMap,
    programs::BtfTracePointContext,
};
use fdtrace_common::{
    CGROUP_MAX_DEPTH, EV_ADOPT, NODE_ALL, NODE_CGROUPS, NODE_OFF, PROC_ADOPTED, PROC_FOLLOW,
    ProcStats,
};

use crate::{
    global,
    iter::{TASK_PID_OFF, TASK_TGID_OFF},
    table::{self, Extra, emit, proc_of},
};

/// `NODE_*`: what node mode selects (set by user space before load).
#[unsafe(no_mangle)]
static NODE_MODE: u32 = NODE_OFF;
/// fdtrace's own tgid: never traced by node mode.
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;
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

/// Whether the task's v2 cgroup (`task->cgroups->dfl_cgrp`, what
/// bpf_get_current_cgroup_id reads) or one of its ancestors is selected:
/// a cgroup made below a selected one after fdtrace started is selected
/// too. https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/helpers.c (bpf_get_current_cgroup_id)
fn in_selected_cgroup(task: u64) -> bool {
    let Some(cset) = read::<u64>(task, &TASK_CGROUPS_OFF) else {
        return false;
    };
    let Some(mut cgrp) = read::<u64>(cset, &CSS_SET_DFL_CGRP_OFF) else {
        return false;
    };
    for _ in 0..CGROUP_MAX_DEPTH {
        let Some(kn) = read::<u64>(cgrp, &CGROUP_KN_OFF) else {
            return false;
        };
        let Some(id) = read::<u64>(kn, &KERNFS_NODE_ID_OFF) else {
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
    if !table::register(tgid, &ProcStats::new(tgid, PROC_FOLLOW | PROC_ADOPTED)) {
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
    let _ = adopt(child_task, child);
}

/// A successful exec of an untraced process.
pub fn exec(tgid: u32) {
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let _ = adopt(task, tgid);
}

/// cgroup_attach_task(dst_cgrp, path, task, threadgroup): `task` moved;
/// fired after the move (cgroup_migrate), so its css_set is the new one.
/// A move of a single thread (cgroup.threads) is left to its leader's.
/// https://github.com/torvalds/linux/blob/v6.18/kernel/cgroup/cgroup.c (cgroup_attach_task)
pub fn cgroup_attach(ctx: &BtfTracePointContext) {
    if global(&NODE_MODE) != NODE_CGROUPS {
        return;
    }
    let task: u64 = ctx.arg(2);
    let (Some(tgid), Some(pid)) = (
        read::<u32>(task, &TASK_TGID_OFF),
        read::<u32>(task, &TASK_PID_OFF),
    ) else {
        return;
    };
    if pid == tgid {
        let _ = adopt(task, tgid);
    }
}
