//! The calling user stack of an fd-creating call: its id in STACKS, and the
//! top of the stack the first time an id is seen.
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_probe_read_user_buf,
    programs::{BtfTracePointContext, tracing::StackIdContext as _},
};
use fdtrace_common::{
    NO_SITE, ProcStats, SITE_CALLER_SHIFT, SITE_NOT_SAMPLED, StackWindow, WINDOW_WORDS,
};

use crate::{
    global,
    maps::{CALLER_SLOTS, STACKS, WINDOW_SCRATCH, WINDOWS},
    regs::{Regs, read_user},
    table,
};

/// Stacks taken per process per 100 ms (`--stack-rate` / 10); 0 for none
/// (`--no-stacks`). The user stack walk is the largest part of the cost of a
/// traced fd creation; a process creating fds faster than the budget has
/// its fds over budget recorded without a stack.
#[unsafe(no_mangle)]
pub static STACKS_PER_SLOT: u32 = 100;

const SLOT_NS: u64 = 100_000_000;

/// The calling user stack's id in STACKS; NO_SITE without stacks or when
/// STACKS took no new stack, and SITE_NOT_SAMPLED over the process's
/// budget. A stack-trace map keeps one stack per hash bucket and, without
/// BPF_F_REUSE_STACKID (which would rename the stacks of fds already
/// recorded), refuses a new stack whose bucket holds another, -EEXIST
/// (`__bpf_get_stackid`, <https://elixir.bootlin.com/linux/v6.18/source/kernel/bpf/stackmap.c>).
/// Both count in `not_sampled`; only the budget keeps the Python stack
/// from being taken too (python.rs `made_by`). Where user space knows the
/// caller's return address slot for this syscall address, the site carries
/// that address's low bits (see SITE_CALLER_SHIFT). The first time a site
/// is seen, the top of the user stack is saved with it (see StackWindow).
#[inline(always)]
pub fn user_site(ctx: &BtfTracePointContext, r: &Regs, p: *mut ProcStats, now: u64) -> u64 {
    if global(&STACKS_PER_SLOT) == 0 {
        return NO_SITE;
    }
    if !stack_budget(p, now) {
        // SAFETY: p is a live STATS element.
        table::add64(unsafe { &raw mut (*p).not_sampled }, 1);
        return SITE_NOT_SAMPLED;
    }
    let Ok(id) = ctx.get_stackid(&STACKS, u64::from(BPF_F_USER_STACK)) else {
        // SAFETY: p is a live STATS element.
        table::add64(unsafe { &raw mut (*p).not_sampled }, 1);
        return NO_SITE;
    };
    let site = with_caller(u64::from(id as u32), r);
    // SAFETY: presence check only.
    if unsafe { WINDOWS.get(site) }.is_none() {
        save_window(site, r);
    }
    site
}

/// `id` with the low 32 bits of the caller's return address above it, when
/// CALLER_SLOTS says where it is for this syscall address; `id` otherwise.
#[inline(always)]
fn with_caller(id: u64, r: &Regs) -> u64 {
    // SAFETY: a read of a value user space wrote whole.
    let Some(&slot) = (unsafe { CALLER_SLOTS.get(r.ip()) }) else {
        return id;
    };
    match read_user::<u64>(r.sp().wrapping_add(u64::from(slot))) {
        Some(ret) => id | (u64::from(ret as u32) << SITE_CALLER_SHIFT),
        None => id,
    }
}

/// Whether process `p` may take one more stack in the current 100 ms slot,
/// counted if so; false without stacks (`--no-stacks`) or over the budget.
/// Native and Python stacks (python.rs) share the budget.
#[inline(always)]
pub fn stack_budget(p: *mut ProcStats, now: u64) -> bool {
    let budget = u64::from(global(&STACKS_PER_SLOT));
    // SAFETY: p is a live STATS element. Threads race on the budget fields;
    // a lost update only shifts a few fds across the budget line.
    unsafe {
        let slot = now / SLOT_NS;
        if (*p).stack_slot != slot {
            (*p).stack_slot = slot;
            (*p).stacks_in_slot = 0;
        }
        if (*p).stacks_in_slot >= budget {
            return false;
        }
        (*p).stacks_in_slot += 1;
    }
    true
}

fn save_window(site: u64, r: &Regs) {
    let Some(w) = WINDOW_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let (sp, bp) = (r.sp(), r.bp());
    // SAFETY: w is this CPU's scratch value; the helper checks the address.
    unsafe {
        let words =
            core::slice::from_raw_parts_mut((&raw mut (*w).words).cast::<u8>(), WINDOW_WORDS * 8);
        if bpf_probe_read_user_buf(sp as *const u8, words).is_err() {
            return;
        }
        (*w).sp = sp;
        (*w).bp = bp;
        // By reference: the window is larger than the BPF stack.
        let window: &StackWindow = &*w;
        let _ = WINDOWS.insert(site, window, u64::from(BPF_NOEXIST));
    }
}
