//! x86_64 syscall numbers of the calls fdtrace decodes, and their names.
//! arch/x86/entry/syscalls/syscall_64.tbl
//! (https://github.com/torvalds/linux/blob/v6.18/arch/x86/entry/syscalls/syscall_64.tbl)

macro_rules! syscalls {
    ($($name:ident = $nr:literal as $text:literal),* $(,)?) => {
        $(pub const $name: u64 = $nr;)*

        /// The syscall's name as in its man page.
        pub const fn name(nr: u64) -> Option<&'static str> {
            match nr {
                $($nr => Some($text),)*
                _ => None,
            }
        }
    };
}

syscalls! {
    OPEN = 2 as "open",
    CLOSE = 3 as "close",
    IOCTL = 16 as "ioctl",
    PIPE = 22 as "pipe",
    DUP = 32 as "dup",
    DUP2 = 33 as "dup2",
    SOCKET = 41 as "socket",
    ACCEPT = 43 as "accept",
    RECVMSG = 47 as "recvmsg",
    SOCKETPAIR = 53 as "socketpair",
    CLONE = 56 as "clone",
    FORK = 57 as "fork",
    VFORK = 58 as "vfork",
    EXECVE = 59 as "execve",
    FCNTL = 72 as "fcntl",
    CREAT = 85 as "creat",
    SETRLIMIT = 160 as "setrlimit",
    EPOLL_CREATE = 213 as "epoll_create",
    MQ_OPEN = 240 as "mq_open",
    INOTIFY_INIT = 253 as "inotify_init",
    OPENAT = 257 as "openat",
    SIGNALFD = 282 as "signalfd",
    TIMERFD_CREATE = 283 as "timerfd_create",
    EVENTFD = 284 as "eventfd",
    ACCEPT4 = 288 as "accept4",
    SIGNALFD4 = 289 as "signalfd4",
    EVENTFD2 = 290 as "eventfd2",
    EPOLL_CREATE1 = 291 as "epoll_create1",
    DUP3 = 292 as "dup3",
    PIPE2 = 293 as "pipe2",
    INOTIFY_INIT1 = 294 as "inotify_init1",
    PERF_EVENT_OPEN = 298 as "perf_event_open",
    RECVMMSG = 299 as "recvmmsg",
    FANOTIFY_INIT = 300 as "fanotify_init",
    PRLIMIT64 = 302 as "prlimit64",
    OPEN_BY_HANDLE_AT = 304 as "open_by_handle_at",
    MEMFD_CREATE = 319 as "memfd_create",
    BPF = 321 as "bpf",
    EXECVEAT = 322 as "execveat",
    USERFAULTFD = 323 as "userfaultfd",
    IO_URING_SETUP = 425 as "io_uring_setup",
    OPEN_TREE = 428 as "open_tree",
    FSOPEN = 430 as "fsopen",
    FSMOUNT = 432 as "fsmount",
    FSPICK = 433 as "fspick",
    PIDFD_OPEN = 434 as "pidfd_open",
    CLONE3 = 435 as "clone3",
    CLOSE_RANGE = 436 as "close_range",
    OPENAT2 = 437 as "openat2",
    PIDFD_GETFD = 438 as "pidfd_getfd",
    MEMFD_SECRET = 447 as "memfd_secret",
    OPEN_TREE_ATTR = 467 as "open_tree_attr",
}

// Flag bits fdtrace decodes from syscall arguments (x86_64 values, from the
// uapi headers named with each).

/// O_CLOEXEC (include/uapi/asm-generic/fcntl.h); SOCK_CLOEXEC, EFD_CLOEXEC,
/// TFD_CLOEXEC, SFD_CLOEXEC, IN_CLOEXEC, EPOLL_CLOEXEC and
/// OPEN_TREE_CLOEXEC all share this value on x86_64.
pub const O_CLOEXEC: u64 = 0o2_000_000;
/// FAN_CLOEXEC, MFD_CLOEXEC, FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC, FSPICK_CLOEXEC.
pub const ONE_CLOEXEC: u64 = 1;
/// include/uapi/linux/perf_event.h
pub const PERF_FLAG_FD_CLOEXEC: u64 = 1 << 3;
/// include/linux/socket.h
pub const MSG_CMSG_CLOEXEC: u64 = 0x4000_0000;

pub const F_DUPFD: u64 = 0;
pub const F_SETFD: u64 = 2;
pub const F_DUPFD_CLOEXEC: u64 = 1030;
pub const FD_CLOEXEC: u64 = 1;
/// include/uapi/asm-generic/ioctls.h
pub const FIONCLEX: u64 = 0x5450;
pub const FIOCLEX: u64 = 0x5451;

/// include/uapi/linux/close_range.h
pub const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;

/// include/uapi/linux/sched.h
pub const CLONE_FILES: u64 = 0x400;
pub const CLONE_PIDFD: u64 = 0x1000;
pub const CLONE_THREAD: u64 = 0x10000;

/// IORING_SETUP_REGISTERED_FD_ONLY: io_uring_setup returns a registered ring
/// index, not an fd (include/uapi/linux/io_uring.h).
pub const IORING_SETUP_REGISTERED_FD_ONLY: u32 = 1 << 15;

pub const RLIMIT_NOFILE: u64 = 7;
/// The socket type without SOCK_NONBLOCK / SOCK_CLOEXEC.
pub const SOCK_TYPE_MASK: u32 = 0xf;

pub const EBADF: i64 = 9;
pub const ENFILE: i64 = 23;
pub const EMFILE: i64 = 24;

/// bpf(2) commands that return a new fd; every bpf fd is close-on-exec
/// (https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/syscall.c).
pub const fn bpf_cmd_returns_fd(cmd: u64) -> bool {
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
