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
    WRITE = 1 as "write",
    OPEN = 2 as "open",
    CLOSE = 3 as "close",
    IOCTL = 16 as "ioctl",
    WRITEV = 20 as "writev",
    PIPE = 22 as "pipe",
    DUP = 32 as "dup",
    DUP2 = 33 as "dup2",
    SOCKET = 41 as "socket",
    ACCEPT = 43 as "accept",
    SENDTO = 44 as "sendto",
    SENDMSG = 46 as "sendmsg",
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
    SENDMMSG = 307 as "sendmmsg",
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
