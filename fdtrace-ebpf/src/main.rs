//! fdtrace's kernel side: keeps the live-fd table of every traced process.
//!
//! Hooks (chosen by measurement, see README "How it works"):
//! - `tp_btf/sys_exit` only: every fd-creating and fd-closing syscall, decoded
//!   from the saved user registers once the kernel has returned. One program
//!   per syscall is what every untraced process pays; a close that reaches
//!   sys_exit after another thread reused its number is told apart by
//!   FD_CLOSE_PENDING (see table::install);
//! - `sched/sched_process_fork` and `sched/sched_process_exit`: copy the table
//!   into a followed child, drop it when the whole thread group is gone.
#![no_std]
#![no_main]
// Atomic adds: the BPF target has no CAS, so core::sync::atomic has no fetch_add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod kind;
mod python;
mod maps;
mod seed;
mod syscalls;
mod table;

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_buf,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext, tracing::StackIdContext as _},
};
use core::ffi::c_void;
use fdtrace_common::{
    EV_EMFILE, EV_ENFILE, EV_EXEC, EV_EXIT, EV_FORK, EV_RLIMIT, FdKind, NO_FIELD, NO_SITE,
    PROC_FOLLOW, PROC_SHARED_TABLE, ProcStats, SITE_NOT_SAMPLED, StackWindow, WINDOW_WORDS,
};
use syscalls::*;
use table::{
    Bulk, Extra, Origin, bulk, emit, inexact, install, kind_of, proc_of, remove, set_cloexec,
};

use crate::maps::{STACKS, WINDOW_SCRATCH, WINDOWS};

/// Offset of `child_pid` in the sched_process_fork record; set by user space
/// from the tracepoint's format file (it moved between kernel versions).
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFF: u32 = NO_FIELD;
/// Offset of `group_dead` in the sched_process_exit record, or NO_FIELD on
/// kernels without it (then the leader's exit ends the process).
#[unsafe(no_mangle)]
static EXIT_GROUP_DEAD_OFF: u32 = NO_FIELD;

/// Stacks taken per process per 100 ms (`--stack-rate` / 10); 0 for none
/// (`--no-stacks`). The user stack walk is the largest part of the cost of a
/// traced fd creation; a process creating fds faster than the budget has
/// its fds over budget recorded without a stack.
#[unsafe(no_mangle)]
static STACKS_PER_SLOT: u32 = 100;

const SLOT_NS: u64 = 100_000_000;

#[inline(always)]
pub(crate) fn global(v: &u32) -> u32 {
    // SAFETY: read of a .rodata global the loader may have rewritten.
    unsafe { core::ptr::read_volatile(v) }
}

/// The syscall's saved user registers (x86_64 calling convention).
pub(crate) struct Regs(pub(crate) *const pt_regs);

impl Regs {
    // SAFETY (all): tp_btf gives a BTF-typed pt_regs pointer the verifier
    // lets us load from directly.
    #[inline(always)]
    fn nr(&self) -> u64 {
        unsafe { (*self.0).orig_rax }
    }
    #[inline(always)]
    fn a0(&self) -> u64 {
        unsafe { (*self.0).rdi }
    }
    #[inline(always)]
    fn a1(&self) -> u64 {
        unsafe { (*self.0).rsi }
    }
    #[inline(always)]
    fn a2(&self) -> u64 {
        unsafe { (*self.0).rdx }
    }
    #[inline(always)]
    fn a3(&self) -> u64 {
        unsafe { (*self.0).r10 }
    }
    #[inline(always)]
    fn a4(&self) -> u64 {
        unsafe { (*self.0).r8 }
    }
    #[inline(always)]
    fn sp(&self) -> u64 {
        unsafe { (*self.0).rsp }
    }
    #[inline(always)]
    fn bp(&self) -> u64 {
        unsafe { (*self.0).rbp }
    }
}

/// The calling user stack's id in STACKS; NO_SITE without stacks, and
/// SITE_NOT_SAMPLED over the process's budget. The first time an id is seen,
/// the top of the user stack is saved with it (see StackWindow).
#[inline(always)]
fn user_site(ctx: &BtfTracePointContext, r: &Regs, p: *mut ProcStats, now: u64) -> u64 {
    if global(&STACKS_PER_SLOT) == 0 {
        return NO_SITE;
    }
    if !stack_budget(p, now) {
        // SAFETY: p is a live STATS element.
        table::add64(unsafe { &raw mut (*p).not_sampled }, 1);
        return SITE_NOT_SAMPLED;
    }
    let Ok(id) = ctx.get_stackid(&STACKS, u64::from(BPF_F_USER_STACK)) else {
        return NO_SITE;
    };
    // SAFETY: presence check only.
    if unsafe { WINDOWS.get(id as u32) }.is_none() {
        save_window(id as u32, r);
    }
    id as u64
}

/// Whether process `p` may take one more stack in the current slot (and
/// counts it): false without stacks or over the budget.
#[inline(always)]
pub(crate) fn stack_budget(p: *mut ProcStats, now: u64) -> bool {
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

fn save_window(id: u32, r: &Regs) {
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
        let _ = WINDOWS.insert(id, window, u64::from(BPF_NOEXIST));
    }
}

#[inline(always)]
fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the address.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// The syscall being handled, for the helpers of fdtrace_sys_exit (a BPF
/// call takes at most five arguments).
struct Call<'a> {
    ctx: &'a BtfTracePointContext,
    r: &'a Regs,
    p: *mut ProcStats,
    tgid: u32,
    nr: u64,
}

/// What a successful syscall did to the fd table.
pub(crate) enum Action {
    /// The return value is a new fd.
    New {
        kind: FdKind,
        cloexec: bool,
    },
    /// Two new fds written to a user `int[2]` (pipe, pipe2, socketpair).
    Pair {
        kind: FdKind,
        cloexec: bool,
        ptr: u64,
    },
    /// The return value is a copy of fd `src` (dup family, F_DUPFD).
    Dup {
        src: u32,
        cloexec: bool,
        replaces: bool,
    },
    /// openat2: O_CLOEXEC is in the user `struct open_how`.
    Openat2 {
        how: u64,
    },
    /// io_uring_setup: an fd unless IORING_SETUP_REGISTERED_FD_ONLY.
    IoUring {
        params: u64,
    },
    /// clone/clone3 in the parent: a pidfd when CLONE_PIDFD.
    Clone {
        flags: u64,
        pidfd_ptr: u64,
        clone3_args: u64,
    },
    SetCloexec {
        fd: u32,
        on: bool,
    },
    /// recvmsg/recvmmsg: fds passed with SCM_RIGHTS.
    Recv {
        msg: u64,
        multi: bool,
        cloexec: bool,
    },
    Exec,
    /// close(fd).
    Close {
        fd: u32,
    },
    /// close_range(first, last, flags).
    CloseRange {
        first: u32,
        last: u32,
        cloexec: bool,
    },
    /// RLIMIT_NOFILE of `target` (0: the caller) was set.
    Rlimit {
        target: u32,
    },
}

impl Action {
    /// Only creating syscalls can fail with EMFILE/ENFILE.
    fn creates(&self) -> bool {
        !matches!(
            self,
            Action::SetCloexec { .. }
                | Action::Close { .. }
                | Action::CloseRange { .. }
                | Action::Recv { .. }
                | Action::Exec
                | Action::Clone { .. }
                | Action::Rlimit { .. }
        )
    }
}

/// Decodes the syscall from its number and arguments alone, before any map
/// lookup: unrelated syscalls of every process leave here.
#[inline(always)]
pub(crate) fn decode(nr: u64, r: &Regs) -> Option<Action> {
    use FdKind::*;
    let new = |kind, cloexec| Some(Action::New { kind, cloexec });
    match nr {
        OPEN => new(File, r.a1() & O_CLOEXEC != 0),
        OPENAT | OPEN_BY_HANDLE_AT => new(File, r.a2() & O_CLOEXEC != 0),
        CREAT => new(File, false),
        OPENAT2 => Some(Action::Openat2 { how: r.a2() }),
        SOCKET => new(Socket, r.a1() & O_CLOEXEC != 0),
        ACCEPT => new(Socket, false),
        ACCEPT4 => new(Socket, r.a3() & O_CLOEXEC != 0),
        SOCKETPAIR => Some(Action::Pair {
            kind: Socket,
            cloexec: r.a1() & O_CLOEXEC != 0,
            ptr: r.a3(),
        }),
        PIPE => Some(Action::Pair {
            kind: Pipe,
            cloexec: false,
            ptr: r.a0(),
        }),
        PIPE2 => Some(Action::Pair {
            kind: Pipe,
            cloexec: r.a1() & O_CLOEXEC != 0,
            ptr: r.a0(),
        }),
        DUP => Some(Action::Dup {
            src: r.a0() as u32,
            cloexec: false,
            replaces: false,
        }),
        DUP2 => Some(Action::Dup {
            src: r.a0() as u32,
            cloexec: false,
            replaces: true,
        }),
        DUP3 => Some(Action::Dup {
            src: r.a0() as u32,
            cloexec: r.a2() & O_CLOEXEC != 0,
            replaces: true,
        }),
        FCNTL => match r.a1() {
            F_DUPFD => Some(Action::Dup {
                src: r.a0() as u32,
                cloexec: false,
                replaces: false,
            }),
            F_DUPFD_CLOEXEC => Some(Action::Dup {
                src: r.a0() as u32,
                cloexec: true,
                replaces: false,
            }),
            F_SETFD => Some(Action::SetCloexec {
                fd: r.a0() as u32,
                on: r.a2() & FD_CLOEXEC != 0,
            }),
            _ => None,
        },
        IOCTL => match r.a1() & 0xffff_ffff {
            FIOCLEX => Some(Action::SetCloexec {
                fd: r.a0() as u32,
                on: true,
            }),
            FIONCLEX => Some(Action::SetCloexec {
                fd: r.a0() as u32,
                on: false,
            }),
            _ => None,
        },
        EVENTFD => new(Eventfd, false),
        EVENTFD2 => new(Eventfd, r.a1() & O_CLOEXEC != 0),
        EPOLL_CREATE => new(Epoll, false),
        EPOLL_CREATE1 => new(Epoll, r.a0() & O_CLOEXEC != 0),
        TIMERFD_CREATE => new(Timerfd, r.a1() & O_CLOEXEC != 0),
        // signalfd on an existing signalfd (first argument != -1) updates it.
        SIGNALFD if r.a0() as i32 == -1 => new(Signalfd, false),
        SIGNALFD4 if r.a0() as i32 == -1 => new(Signalfd, r.a3() & O_CLOEXEC != 0),
        INOTIFY_INIT => new(Inotify, false),
        INOTIFY_INIT1 => new(Inotify, r.a0() & O_CLOEXEC != 0),
        FANOTIFY_INIT => new(Fanotify, r.a0() & ONE_CLOEXEC != 0),
        MEMFD_CREATE => new(Memfd, r.a1() & ONE_CLOEXEC != 0),
        MEMFD_SECRET => new(Memfd, r.a0() & O_CLOEXEC != 0),
        USERFAULTFD => new(Userfaultfd, r.a0() & O_CLOEXEC != 0),
        PERF_EVENT_OPEN => new(PerfEvent, r.a4() & PERF_FLAG_FD_CLOEXEC != 0),
        BPF if bpf_cmd_returns_fd(r.a0()) => new(Bpf, true),
        IO_URING_SETUP => Some(Action::IoUring { params: r.a1() }),
        // pidfds are always close-on-exec (kernel/pid.c pidfd_create).
        PIDFD_OPEN => new(Pidfd, true),
        PIDFD_GETFD => new(Unknown, true),
        OPEN_TREE | OPEN_TREE_ATTR => new(Mount, r.a2() & O_CLOEXEC != 0),
        FSOPEN | FSMOUNT => new(Mount, r.a1() & ONE_CLOEXEC != 0),
        FSPICK => new(Mount, r.a2() & ONE_CLOEXEC != 0),
        // mq_open always sets O_CLOEXEC (ipc/mqueue.c do_mq_open).
        MQ_OPEN => new(Mqueue, true),
        CLONE => Some(Action::Clone {
            flags: r.a0(),
            pidfd_ptr: r.a2(),
            clone3_args: 0,
        }),
        CLONE3 => Some(Action::Clone {
            flags: 0,
            pidfd_ptr: 0,
            clone3_args: r.a0(),
        }),
        RECVMSG => Some(Action::Recv {
            msg: r.a1(),
            multi: false,
            cloexec: r.a2() & MSG_CMSG_CLOEXEC != 0,
        }),
        RECVMMSG => Some(Action::Recv {
            msg: r.a1(),
            multi: true,
            cloexec: r.a3() & MSG_CMSG_CLOEXEC != 0,
        }),
        EXECVE | EXECVEAT => Some(Action::Exec),
        CLOSE => Some(Action::Close { fd: r.a0() as u32 }),
        CLOSE_RANGE => Some(Action::CloseRange {
            first: r.a0() as u32,
            last: r.a1() as u32,
            cloexec: r.a2() & CLOSE_RANGE_CLOEXEC != 0,
        }),
        SETRLIMIT if r.a0() == RLIMIT_NOFILE => Some(Action::Rlimit { target: 0 }),
        // prlimit64(pid, resource, new, old): only a new limit changes anything.
        PRLIMIT64 if r.a1() == RLIMIT_NOFILE && r.a2() != 0 => Some(Action::Rlimit {
            target: r.a0() as u32,
        }),
        _ => None,
    }
}

#[btf_tracepoint(function = "sys_exit")]
pub fn fdtrace_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let r = Regs(ctx.arg(0));
    let nr = r.nr();
    let Some(action) = decode(nr, &r) else {
        return 0;
    };
    let tgid = table::tgid();
    let ret: i64 = ctx.arg(1);
    if let Action::Rlimit { target } = action {
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
        return 0;
    }
    let Some(p) = proc_of(tgid) else {
        return 0;
    };
    let call = Call {
        ctx: &ctx,
        r: &r,
        p,
        tgid,
        nr,
    };
    if let Action::Close { fd } = action {
        // close() releases the fd whatever it returns (EINTR included); only
        // EBADF means there was nothing to close.
        // https://github.com/torvalds/linux/blob/v6.18/fs/open.c (SYSCALL_DEFINE1(close))
        if ret != -EBADF {
            remove(p, tgid, fd);
        }
        return 0;
    }
    if ret < 0 {
        if action.creates() {
            failed(&call, -ret);
        }
        return 0;
    }
    let fd = ret as u32;
    // The stack walk is paid only for calls that made fds (SCM_RIGHTS: only
    // when a message carried some).
    // One clock read per syscall: the fds' creation time and the stack budget.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let site = if action.creates() || matches!(action, Action::Clone { .. }) {
        user_site(&ctx, &r, p, now)
    } else {
        NO_SITE
    };
    let origin = Origin {
        syscall: nr,
        now,
        site,
        // socket(family, type) and socketpair: the protocol of a socket
        // that may never be bound or connected.
        detail: if nr == SOCKET || nr == SOCKETPAIR {
            ((r.a0() as u32) << 16) | (r.a1() as u32 & SOCK_TYPE_MASK)
        } else {
            0
        },
    };
    match action {
        Action::New { kind, cloexec } => install(p, tgid, fd, kind as u8, cloexec, origin, false),
        Action::Pair { kind, cloexec, ptr } => match read_user::<[i32; 2]>(ptr) {
            Some([a, b]) => {
                install(p, tgid, a as u32, kind as u8, cloexec, origin, false);
                install(p, tgid, b as u32, kind as u8, cloexec, origin, false);
            }
            None => inexact(p),
        },
        Action::Dup {
            src,
            cloexec,
            replaces,
        } => {
            // dup2(fd, fd) returns fd and changes nothing.
            if !(replaces && src == fd) {
                install(p, tgid, fd, kind_of(tgid, src), cloexec, origin, replaces);
            }
        }
        Action::Openat2 { how } => match read_user::<u64>(how) {
            Some(flags) => install(
                p,
                tgid,
                fd,
                FdKind::File as u8,
                flags & O_CLOEXEC != 0,
                origin,
                false,
            ),
            None => {
                install(p, tgid, fd, FdKind::File as u8, false, origin, false);
                inexact(p);
            }
        },
        Action::IoUring { params } => {
            // struct io_uring_params { u32 sq_entries, cq_entries, flags; ... }
            let flags = read_user::<u32>(params + 8).unwrap_or(0);
            if flags & IORING_SETUP_REGISTERED_FD_ONLY == 0 {
                install(p, tgid, fd, FdKind::IoUring as u8, true, origin, false);
            }
        }
        Action::Clone {
            flags,
            pidfd_ptr,
            clone3_args,
        } => {
            // Only the parent (ret = child pid > 0) gets the pidfd.
            if ret == 0 {
                return 0;
            }
            let (flags, ptr) = if clone3_args != 0 {
                // struct clone_args { u64 flags; u64 pidfd; ... }
                match read_user::<[u64; 2]>(clone3_args) {
                    Some([f, ptr]) => (f, ptr),
                    None => return 0,
                }
            } else {
                (flags, pidfd_ptr)
            };
            if flags & CLONE_PIDFD != 0 {
                match read_user::<i32>(ptr) {
                    Some(pidfd) => install(
                        p,
                        tgid,
                        pidfd as u32,
                        FdKind::Pidfd as u8,
                        true,
                        origin,
                        false,
                    ),
                    None => inexact(p),
                }
            }
        }
        Action::SetCloexec { fd, on } => set_cloexec(p, tgid, fd, on),
        Action::Recv {
            msg,
            multi,
            cloexec,
        } => recv_fds(&call, msg, if multi { ret } else { 1 }, cloexec),
        Action::Exec => {
            if ret == 0 {
                python::forget(tgid);
                let inherited = bulk(p, tgid, 0, u32::MAX, Bulk::Exec, None);
                let extra = Extra {
                    syscall: nr,
                    inherited,
                    ..Extra::NONE
                };
                emit(EV_EXEC, tgid, bpf_get_current_pid_tgid() as u32, p, extra);
            }
        }
        Action::CloseRange {
            first,
            last,
            cloexec,
        } => {
            let op = if cloexec {
                Bulk::MarkCloexec
            } else {
                Bulk::Close
            };
            bulk(p, tgid, first, last.saturating_add(1), op, None);
        }
        Action::Rlimit { .. } | Action::Close { .. } => {}
    }
    0
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
    let path = match nr {
        OPEN | CREAT => r.a0(),
        OPENAT | OPENAT2 => r.a1(),
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

/// Most messages of one recvmmsg and control messages of one msghdr decoded;
/// beyond, the process is marked inexact and resynced from /proc.
const MAX_MSGS: u64 = 8;
const MAX_CMSGS: u32 = 4;
/// SCM_MAX_FD (include/net/scm.h).
const SCM_MAX_FD: u32 = 253;
const SOL_SOCKET: u32 = 1;
const SCM_RIGHTS: u32 = 1;
/// sizeof(struct mmsghdr), and the offset of msg_control (msg_controllen
/// follows it) in struct user_msghdr, on x86_64.
const MMSGHDR_SIZE: u64 = 64;
const MSG_CONTROL: u64 = 32;
const CMSG_HDR: u64 = 16;

fn recv_fds(c: &Call, msgvec: u64, n: i64, cloexec: bool) {
    for i in 0..MAX_MSGS {
        if i as i64 >= n {
            return;
        }
        scm_rights(c, msgvec + i * MMSGHDR_SIZE, cloexec);
    }
    if n as u64 > MAX_MSGS {
        inexact(c.p);
    }
}

#[repr(C)]
struct ScmCtx {
    p: *mut ProcStats,
    tgid: u32,
    cloexec: u32,
    data: u64,
    origin: Origin,
}

extern "C" fn scm_fd(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: ctx is the ScmCtx on scm_rights()'s stack.
    let c = unsafe { &*(ctx as *const ScmCtx) };
    match read_user::<i32>(c.data + 4 * i as u64) {
        Some(fd) => install(
            c.p,
            c.tgid,
            fd as u32,
            FdKind::Unknown as u8,
            c.cloexec != 0,
            c.origin,
            false,
        ),
        None => inexact(c.p),
    }
    0
}

/// Walks the control messages the kernel wrote back (msg_controllen is
/// updated to the bytes written) and installs every SCM_RIGHTS fd.
/// https://github.com/torvalds/linux/blob/v6.18/net/core/scm.c (scm_detach_fds)
fn scm_rights(c: &Call, msg: u64, cloexec: bool) {
    let (p, tgid) = (c.p, c.tgid);
    let Some([control, controllen]) = read_user::<[u64; 2]>(msg + MSG_CONTROL) else {
        return;
    };
    let mut off: u64 = 0;
    for _ in 0..MAX_CMSGS {
        if control == 0 || off + CMSG_HDR > controllen {
            return;
        }
        // struct cmsghdr { u64 cmsg_len; i32 cmsg_level; i32 cmsg_type; }
        let Some([len, lt]) = read_user::<[u64; 2]>(control + off) else {
            inexact(p);
            return;
        };
        if len < CMSG_HDR || off + len > controllen {
            return;
        }
        if lt as u32 == SOL_SOCKET && (lt >> 32) as u32 == SCM_RIGHTS {
            let mut n = ((len - CMSG_HDR) / 4) as u32;
            if n > SCM_MAX_FD {
                n = SCM_MAX_FD;
            }
            let mut scm = ScmCtx {
                p,
                tgid,
                cloexec: cloexec as u32,
                data: control + off + CMSG_HDR,
                origin: {
                    // SAFETY: helper without arguments.
                    let now = unsafe { bpf_ktime_get_ns() };
                    Origin {
                        syscall: c.nr,
                        site: user_site(c.ctx, c.r, c.p, now),
                        detail: 0,
                        now,
                    }
                },
            };
            // SAFETY: static callback; scm outlives the call.
            unsafe { bpf_loop(n, scm_fd as *mut c_void, (&raw mut scm).cast(), 0) };
        }
        off += (len + 7) & !7;
    }
    if off + CMSG_HDR <= controllen {
        inexact(p);
    }
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn fdtrace_fork(ctx: TracePointContext) -> u32 {
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &TracePointContext) -> Option<()> {
    // Runs in the parent, after the child's fd table was copied.
    // https://github.com/torvalds/linux/blob/v6.18/kernel/fork.c (kernel_clone)
    let parent = table::tgid();
    let pp = proc_of(parent)?;
    // SAFETY: pp is a live STATS element.
    let pflags = unsafe { (*pp).flags };
    if pflags & PROC_FOLLOW == 0 {
        return None;
    }
    let off = global(&FORK_CHILD_PID_OFF);
    if off == NO_FIELD {
        return None;
    }
    // SAFETY: offset from the tracepoint's own format file.
    let child: i32 = unsafe { ctx.read_at(off as usize) }.ok()?;
    // The record does not say thread or process: the forking syscall's
    // arguments, in the parent's saved user registers, do.
    // SAFETY: helpers on the current task.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    // SAFETY: kernel read of the current task's pt_regs.
    let saved: pt_regs = unsafe { bpf_probe_read_kernel(regs) }.ok()?;
    let flags = match saved.orig_rax {
        CLONE => saved.rdi,
        CLONE3 => read_user::<u64>(saved.rdi)?,
        FORK | VFORK => 0,
        // io_uring workers and other kernel-made threads.
        _ => return None,
    };
    if flags & CLONE_THREAD != 0 {
        return None;
    }
    let child = child as u32;
    let mut shared = 0;
    if flags & CLONE_FILES != 0 {
        shared = PROC_SHARED_TABLE;
        // SAFETY: pp is a live STATS element.
        unsafe { (*pp).flags |= PROC_SHARED_TABLE };
    }
    let mut st = ProcStats::new(child, PROC_FOLLOW | shared);
    // SAFETY: pp is a live STATS element.
    st.fd_hwm = unsafe { (*pp).fd_hwm };
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
    let extra = Extra {
        syscall: saved.orig_rax,
        ..Extra::NONE
    };
    emit(EV_FORK, child, parent, cp, extra);
    Some(())
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn fdtrace_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((id >> 32) as u32, id as u32);
    let Some(p) = proc_of(tgid) else {
        return 0;
    };
    let off = global(&EXIT_GROUP_DEAD_OFF);
    let group_dead = if off == NO_FIELD {
        pid == tgid
    } else {
        // SAFETY: offset from the tracepoint's own format file.
        unsafe { ctx.read_at::<u8>(off as usize) }.unwrap_or(0) != 0
    };
    if !group_dead {
        return 0;
    }
    emit(EV_EXIT, tgid, pid, p, Extra::NONE);
    python::forget(tgid);
    bulk(p, tgid, 0, u32::MAX, Bulk::Drop, None);
    table::unregister(tgid, p);
    0
}

/// Python stacks at sys_exit (see python.rs): attached, after
/// fdtrace_sys_exit, once a traced process runs a supported CPython, so
/// that no other session pays for it; its own program, so that the
/// verifier checks the stack walk apart from the fd table's paths.
#[btf_tracepoint(function = "sys_exit")]
pub fn fdtrace_py_sys_exit(ctx: BtfTracePointContext) -> i32 {
    python::sys_exit(&ctx);
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
