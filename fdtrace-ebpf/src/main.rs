//! fdtrace's kernel side: keeps the live-fd table of every traced process.
//! This file holds the program entry points only; each hook family has its
//! module:
//! - `sys_exit` (`tp_btf/sys_exit`): every syscall, decoded from the saved
//!   user registers once the kernel has returned (fdtrace-common's decode),
//!   then `fd_create`, `fd_close`, `scm_rights`, `lifecycle::exec`. One
//!   program on one hook is what every untraced process pays;
//! - `lifecycle` (`tp_btf/sched_process_fork`, `tp_btf/sched_process_exit`):
//!   copy the table into a followed child, drop it when the whole thread
//!   group is gone;
//! - `node` (with `tp_btf/cgroup_attach_task`): node mode, which starts
//!   tracing the processes of its selection by itself;
//! - `iter` (`iter/task_file`): the walks of one process's table user space
//!   reads (seed at attach, names, entries);
//! - `table` (the FDS entries and counters kept in step), `maps`, `stack`
//!   (call sites), `regs`.
#![no_std]
#![no_main]
// Atomic adds: the BPF target has no CAS, so core::sync::atomic has no fetch_add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod fd_close;
mod fd_create;
mod iter;
mod lifecycle;
mod maps;
mod node;
mod regs;
mod scm_rights;
mod stack;
mod sys_exit;
mod table;

use core::ffi::c_void;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

#[inline(always)]
pub(crate) fn global(v: &u32) -> u32 {
    // SAFETY: read of a .rodata global the loader may have rewritten.
    unsafe { core::ptr::read_volatile(v) }
}

#[btf_tracepoint(function = "sys_exit")]
pub fn fdtrace_sys_exit(ctx: BtfTracePointContext) -> i32 {
    sys_exit::handle(&ctx);
    0
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn fdtrace_fork(ctx: BtfTracePointContext) -> i32 {
    let _ = lifecycle::fork(&ctx);
    0
}

/// Node mode with cgroup filters: a process moved into a selected cgroup
/// is traced from then on.
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn fdtrace_cgroup_attach(ctx: BtfTracePointContext) -> i32 {
    node::cgroup_attach(&ctx);
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn fdtrace_exit(ctx: BtfTracePointContext) -> i32 {
    lifecycle::exit(&ctx);
    0
}

/// At attach: writes each fd's entry into FDS (unless the fd was made since
/// the process was registered, and has one already) and counts it, then
/// names it to user space. Done here, and not by user space after the walk,
/// so that an fd closed meanwhile is not written back as open, and so that
/// the counters are only ever moved by atomic adds.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn fdtrace_seed(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a bpf_iter__task_file.
    iter::walk(unsafe { &*(ctx as *const iter::TaskFileCtx) }, true);
    0
}

/// Names each fd to user space only: for labels, and for the resync after a
/// drift (which works out what to add and drop itself).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn fdtrace_names(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a bpf_iter__task_file.
    iter::walk(unsafe { &*(ctx as *const iter::TaskFileCtx) }, false);
    0
}

/// The entries iterator: the FDS entry of each fd in the table, for a report.
///
/// Reading a process's entries from the map itself means walking the whole
/// hash, every traced process's entries (closed ones included), about 0.3 us
/// an entry: a third of a second per report at a million tracked fds. The
/// table walk costs what the process holds. Fds the map lacks, and entries of
/// fds the table lacks, are left out; the drift check counts them.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub fn fdtrace_entries(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a bpf_iter__task_file.
    iter::entries(unsafe { &*(ctx as *const iter::TaskFileCtx) });
    0
}

/// An empty program on fdtrace's syscall hook: the kernel's own cost for the
/// hook, the floor `cargo xtask bench` compares against.
#[btf_tracepoint(function = "sys_exit")]
pub fn noop_sys_exit(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
