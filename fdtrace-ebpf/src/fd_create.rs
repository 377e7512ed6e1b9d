//! Syscalls that make fds: the new fds are installed in the table (see
//! table::install for numbers another thread's close has not released yet).
use fdtrace_common::{
    FdKind,
    syscalls::{CLONE_PIDFD, IORING_SETUP_REGISTERED_FD_ONLY, O_CLOEXEC},
};

use crate::{
    regs::read_user,
    sys_exit::Call,
    table::{Origin, inexact, install, kind_of},
};

/// The return value is a new fd.
#[inline(always)]
pub fn new(c: &Call, fd: u32, kind: FdKind, cloexec: bool, origin: Origin) {
    install(c.p, c.tgid, fd, kind as u8, cloexec, origin, false);
}

/// pipe, pipe2, socketpair: two fds in the user `int[2]` at `ptr`.
pub fn pair(c: &Call, ptr: u64, kind: FdKind, cloexec: bool, origin: Origin) {
    match read_user::<[i32; 2]>(ptr) {
        Some([a, b]) => {
            install(c.p, c.tgid, a as u32, kind as u8, cloexec, origin, false);
            install(c.p, c.tgid, b as u32, kind as u8, cloexec, origin, false);
        }
        None => inexact(c.p),
    }
}

/// `fd` is a copy of `src` (dup family, F_DUPFD): it has `src`'s kind.
pub fn dup(c: &Call, src: u32, fd: u32, cloexec: bool, replaces: bool, origin: Origin) {
    // dup2(fd, fd) returns fd and changes nothing.
    if !(replaces && src == fd) {
        let kind = kind_of(c.p, c.tgid, src);
        install(c.p, c.tgid, fd, kind, cloexec, origin, replaces);
    }
}

/// openat2: the flags are the first field of the user `struct open_how`.
pub fn openat2(c: &Call, fd: u32, how: u64, origin: Origin) {
    let flags = read_user::<u64>(how);
    let cloexec = flags.is_some_and(|f| f & O_CLOEXEC != 0);
    install(c.p, c.tgid, fd, FdKind::File as u8, cloexec, origin, false);
    if flags.is_none() {
        // The bit is unknown: a resync at the next report.
        inexact(c.p);
    }
}

/// io_uring_setup: an fd unless IORING_SETUP_REGISTERED_FD_ONLY, in
/// `struct io_uring_params { u32 sq_entries, cq_entries, flags; ... }`.
/// Ring fds are always close-on-exec (io_uring/io_uring.c).
pub fn io_uring(c: &Call, fd: u32, params: u64, origin: Origin) {
    let flags = read_user::<u32>(params + 8).unwrap_or(0);
    if flags & IORING_SETUP_REGISTERED_FD_ONLY == 0 {
        install(c.p, c.tgid, fd, FdKind::IoUring as u8, true, origin, false);
    }
}

/// clone/clone3 in the parent: the pidfd CLONE_PIDFD wrote to user memory.
pub fn clone_pidfd(c: &Call, flags: u64, pidfd_ptr: u64, clone3_args: u64, origin: Origin) {
    let (flags, ptr) = if clone3_args != 0 {
        // struct clone_args { u64 flags; u64 pidfd; ... }
        match read_user::<[u64; 2]>(clone3_args) {
            Some([f, ptr]) => (f, ptr),
            None => return,
        }
    } else {
        (flags, pidfd_ptr)
    };
    if flags & CLONE_PIDFD == 0 {
        return;
    }
    match read_user::<i32>(ptr) {
        Some(pidfd) => install(
            c.p,
            c.tgid,
            pidfd as u32,
            FdKind::Pidfd as u8,
            true,
            origin,
            false,
        ),
        None => inexact(c.p),
    }
}
