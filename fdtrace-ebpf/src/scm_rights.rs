//! recvmsg/recvmmsg: the fds passed with SCM_RIGHTS, read from the control
//! messages the kernel wrote back to user memory.
use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_loop};
use fdtrace_common::{FdKind, ProcStats};

use crate::{
    regs::read_user,
    stack::user_site,
    sys_exit::Call,
    table::{Origin, inexact, install},
};

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

/// `n` messages at `msgvec` (1 for recvmsg, the return value of recvmmsg).
pub fn recv_fds(c: &Call, msgvec: u64, n: i64, cloexec: bool) {
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
        // The kind is not in the message: named from /proc at the next
        // report.
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
