//! Flag bits fdtrace decodes from syscall arguments (x86_64 values), and the
//! syscall numbers from fdtrace-common.
pub use fdtrace_common::syscalls::*;

/// O_CLOEXEC; SOCK_CLOEXEC, EFD_CLOEXEC, TFD_CLOEXEC, SFD_CLOEXEC, IN_CLOEXEC,
/// EPOLL_CLOEXEC and OPEN_TREE_CLOEXEC all share this value on x86_64.
pub const O_CLOEXEC: u64 = 0o2_000_000;
/// FAN_CLOEXEC, MFD_CLOEXEC, FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC, FSPICK_CLOEXEC.
pub const ONE_CLOEXEC: u64 = 1;
pub const PERF_FLAG_FD_CLOEXEC: u64 = 1 << 3;
pub const MSG_CMSG_CLOEXEC: u64 = 0x4000_0000;

pub const F_DUPFD: u64 = 0;
pub const F_SETFD: u64 = 2;
pub const F_DUPFD_CLOEXEC: u64 = 1030;
pub const FD_CLOEXEC: u64 = 1;
pub const FIONCLEX: u64 = 0x5450;
pub const FIOCLEX: u64 = 0x5451;

pub const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;

pub const CLONE_FILES: u64 = 0x400;
pub const CLONE_PIDFD: u64 = 0x1000;
pub const CLONE_THREAD: u64 = 0x10000;

/// IORING_SETUP_REGISTERED_FD_ONLY: io_uring_setup returns a registered ring
/// index, not an fd.
pub const IORING_SETUP_REGISTERED_FD_ONLY: u32 = 1 << 15;

pub const RLIMIT_NOFILE: u64 = 7;
/// The socket type without SOCK_NONBLOCK / SOCK_CLOEXEC.
pub const SOCK_TYPE_MASK: u32 = 0xf;

pub const EBADF: i64 = 9;
pub const EMFILE: i64 = 24;
pub const ENFILE: i64 = 23;

/// bpf(2) commands that return a new fd; every bpf fd is close-on-exec
/// (https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/syscall.c).
pub fn bpf_cmd_returns_fd(cmd: u64) -> bool {
    matches!(
        cmd,
        0 /* MAP_CREATE */
            | 5 /* PROG_LOAD */
            | 7 /* OBJ_GET */
            | 13 /* PROG_GET_FD_BY_ID */
            | 14 /* MAP_GET_FD_BY_ID */
            | 17 /* RAW_TRACEPOINT_OPEN */
            | 18 /* BTF_LOAD */
            | 19 /* BTF_GET_FD_BY_ID */
            | 28 /* LINK_CREATE */
            | 30 /* LINK_GET_FD_BY_ID */
            | 33 /* ITER_CREATE */
            | 36 /* TOKEN_CREATE */
    )
}
