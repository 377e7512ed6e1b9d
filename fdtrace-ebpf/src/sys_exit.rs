//! The syscall hook: decodes every syscall at sys_exit (fdtrace-common's
//! `decode`, from the number and arguments alone, before any map lookup)
//! and hands what changes a traced process's fd table to its family's
//! handler.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    programs::BtfTracePointContext,
};
use fdtrace_common::{
    EV_EMFILE, EV_ENFILE, EV_RLIMIT, NO_SITE, ProcStats,
    decode::{Effect, decode, socket_detail},
    syscalls::{CREAT, EBADF, EMFILE, ENFILE, OPEN, OPENAT, OPENAT2},
};

use crate::{
    fd_close, fd_create, lifecycle, node,
    regs::Regs,
    scm_rights,
    stack::user_site,
    table::{self, Extra, Origin, emit, proc_of},
};

/// The syscall being handled, for the family handlers (a BPF call takes at
/// most five arguments).
pub struct Call<'a> {
    pub ctx: &'a BtfTracePointContext,
    pub r: &'a Regs,
    pub p: *mut ProcStats,
    pub tgid: u32,
    pub nr: u64,
}

#[inline(always)]
pub fn handle(ctx: &BtfTracePointContext) {
    let r = Regs(ctx.arg(0));
    let nr = r.nr();
    // Every unrelated syscall of every process leaves here.
    let Some(effect) = decode(nr, &r) else {
        return;
    };
    let tgid = table::tgid();
    let ret: i64 = ctx.arg(1);
    if let Effect::Rlimit { target } = effect {
        // The target may be traced while the caller (prlimit) is not.
        let target = if target == 0 { tgid } else { target };
        if ret == 0
            && let Some(p) = proc_of(target)
        {
            let extra = Extra {
                syscall: nr,
                ..Extra::NONE
            };
            emit(EV_RLIMIT, target, tgid, p, extra);
        }
        return;
    }
    let Some(p) = proc_of(tgid) else {
        if ret == 0 && matches!(effect, Effect::Exec) && node::active() {
            node::exec(tgid);
        }
        return;
    };
    let call = Call {
        ctx,
        r: &r,
        p,
        tgid,
        nr,
    };
    if let Effect::Close { fd } = effect {
        // close() releases the fd whatever it returns (EINTR included); only
        // EBADF means there was nothing to close.
        // https://github.com/torvalds/linux/blob/v6.18/fs/open.c (SYSCALL_DEFINE1(close))
        if ret != -EBADF {
            table::remove(p, tgid, fd);
        }
        return;
    }
    if ret < 0 {
        if effect.creates() {
            failed(&call, -ret);
        }
        return;
    }
    // The stack walk is paid only for calls that made fds (SCM_RIGHTS: only
    // when a message carried some, see scm_rights).
    // One clock read per syscall: the fds' creation time and the stack budget.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let origin = Origin {
        syscall: nr,
        now,
        site: if effect.creates() || matches!(effect, Effect::Clone { .. }) {
            user_site(ctx, &r, p, now)
        } else {
            NO_SITE
        },
        detail: socket_detail(nr, &r),
    };
    let fd = ret as u32;
    match effect {
        Effect::New { kind, cloexec } => fd_create::new(&call, fd, kind, cloexec, origin),
        Effect::Pair { kind, cloexec, ptr } => fd_create::pair(&call, ptr, kind, cloexec, origin),
        Effect::Dup {
            src,
            cloexec,
            replaces,
        } => fd_create::dup(&call, src, fd, cloexec, replaces, origin),
        Effect::Openat2 { how } => fd_create::openat2(&call, fd, how, origin),
        Effect::IoUring { params } => fd_create::io_uring(&call, fd, params, origin),
        Effect::Clone {
            flags,
            pidfd_ptr,
            clone3_args,
        } => {
            // Only the parent (ret = child pid > 0) gets the pidfd.
            if ret != 0 {
                fd_create::clone_pidfd(&call, flags, pidfd_ptr, clone3_args, origin);
            }
        }
        Effect::SetCloexec { fd, on } => table::set_cloexec(p, tgid, fd, on),
        Effect::Recv {
            msg,
            multi,
            cloexec,
        } => scm_rights::recv_fds(&call, msg, if multi { ret } else { 1 }, cloexec),
        Effect::Exec => {
            if ret == 0 {
                lifecycle::exec(&call);
            }
        }
        Effect::CloseRange {
            first,
            last,
            cloexec,
        } => fd_close::close_range(&call, first, last, cloexec),
        Effect::Rlimit { .. } | Effect::Close { .. } => {}
    }
}

/// A creating call failed: EMFILE/ENFILE are counted and reported with the
/// calling stack and, for the open family, the path asked for.
fn failed(c: &Call, errno: i64) {
    let (p, tgid, nr, r) = (c.p, c.tgid, c.nr, c.r);
    let (field, ev) = match errno {
        // SAFETY: p is a live STATS element.
        EMFILE => (unsafe { &raw mut (*p).emfile }, EV_EMFILE),
        ENFILE => (unsafe { &raw mut (*p).enfile }, EV_ENFILE),
        _ => return,
    };
    table::add64(field, 1);
    use fdtrace_common::decode::SyscallArgs as _;
    let path = match nr {
        OPEN | CREAT => r.arg(0),
        OPENAT | OPENAT2 => r.arg(1),
        _ => 0,
    };
    let extra = Extra {
        syscall: nr,
        // SAFETY: helper without arguments.
        site: user_site(c.ctx, r, p, unsafe { bpf_ktime_get_ns() }),
        path,
        ..Extra::NONE
    };
    emit(ev, tgid, bpf_get_current_pid_tgid() as u32, p, extra);
}
