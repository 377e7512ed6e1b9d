//! What a syscall does to the caller's fd table, from its number and
//! arguments alone (x86_64).
//!
//! The kernel program runs [`decode`] on every syscall of every process,
//! before any map lookup: every call it returns None for leaves there. So it
//! reads an argument only once the number says it is needed (through
//! [`SyscallArgs`], inlined into register loads), and it is a plain match
//! the verifier follows without loops. The host tests below pin the
//! semantics of each syscall family.
use crate::{FdKind, syscalls::*};

/// The six syscall arguments, read on demand: `arg(0)` is the first
/// (`rdi` on x86_64), `arg(3)` the fourth (`r10`).
pub trait SyscallArgs {
    fn arg(&self, i: usize) -> u64;
}

impl SyscallArgs for [u64; 6] {
    #[inline(always)]
    fn arg(&self, i: usize) -> u64 {
        if i < 6 { self[i] } else { 0 }
    }
}

/// What a successful syscall does to the fd table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The return value is a new fd.
    New { kind: FdKind, cloexec: bool },
    /// Two new fds written to the user `int[2]` at `ptr` (pipe, pipe2,
    /// socketpair).
    Pair {
        kind: FdKind,
        cloexec: bool,
        ptr: u64,
    },
    /// The return value is a copy of fd `src` (dup family, F_DUPFD);
    /// `replaces`: whatever the new number held is closed (dup2, dup3).
    Dup {
        src: u32,
        cloexec: bool,
        replaces: bool,
    },
    /// openat2: a new file; O_CLOEXEC is in the user `struct open_how` at
    /// `how` (its first u64, `flags`).
    Openat2 { how: u64 },
    /// io_uring_setup: a new fd unless the user `struct io_uring_params`
    /// at `params` asks for IORING_SETUP_REGISTERED_FD_ONLY.
    IoUring { params: u64 },
    /// clone (`flags`, `pidfd_ptr`) or clone3 (the user `struct clone_args`
    /// at `clone3_args`): in the parent, a pidfd when CLONE_PIDFD.
    Clone {
        flags: u64,
        pidfd_ptr: u64,
        clone3_args: u64,
    },
    /// The close-on-exec bit of `fd` is set (`on`) or cleared.
    SetCloexec { fd: u32, on: bool },
    /// recvmsg (`multi` false: one `struct user_msghdr` at `msg`) or
    /// recvmmsg (an array of `struct mmsghdr`): fds passed with SCM_RIGHTS.
    Recv {
        msg: u64,
        multi: bool,
        cloexec: bool,
    },
    /// execve/execveat: every close-on-exec fd goes.
    Exec,
    /// close(fd).
    Close { fd: u32 },
    /// close_range(first, last, flags): closes, or with CLOSE_RANGE_CLOEXEC
    /// marks close-on-exec.
    CloseRange {
        first: u32,
        last: u32,
        cloexec: bool,
    },
    /// RLIMIT_NOFILE of process `target` (0: the caller) was set.
    Rlimit { target: u32 },
}

impl Effect {
    /// Whether the call makes fds of its own, so that a failure with
    /// EMFILE/ENFILE means it hit the limit.
    pub const fn creates(&self) -> bool {
        !matches!(
            self,
            Effect::SetCloexec { .. }
                | Effect::Close { .. }
                | Effect::CloseRange { .. }
                | Effect::Recv { .. }
                | Effect::Exec
                | Effect::Clone { .. }
                | Effect::Rlimit { .. }
        )
    }
}

#[inline(always)]
const fn new(kind: FdKind, cloexec: bool) -> Option<Effect> {
    Some(Effect::New { kind, cloexec })
}

#[inline(always)]
fn dup(src: u64, cloexec: bool, replaces: bool) -> Option<Effect> {
    Some(Effect::Dup {
        src: src as u32,
        cloexec,
        replaces,
    })
}

/// What syscall `nr` with arguments `a` does to the fd table if it
/// succeeds; None for a syscall that leaves it alone.
#[inline(always)]
pub fn decode<A: SyscallArgs>(nr: u64, a: &A) -> Option<Effect> {
    use FdKind::*;
    let cloexec = |i: usize, bit: u64| a.arg(i) & bit != 0;
    match nr {
        OPEN => new(File, cloexec(1, O_CLOEXEC)),
        OPENAT | OPEN_BY_HANDLE_AT => new(File, cloexec(2, O_CLOEXEC)),
        // creat = open(O_CREAT | O_WRONLY | O_TRUNC): no flags argument.
        CREAT => new(File, false),
        OPENAT2 => Some(Effect::Openat2 { how: a.arg(2) }),
        SOCKET => new(Socket, cloexec(1, O_CLOEXEC)),
        ACCEPT => new(Socket, false),
        ACCEPT4 => new(Socket, cloexec(3, O_CLOEXEC)),
        SOCKETPAIR => Some(Effect::Pair {
            kind: Socket,
            cloexec: cloexec(1, O_CLOEXEC),
            ptr: a.arg(3),
        }),
        PIPE => Some(Effect::Pair {
            kind: Pipe,
            cloexec: false,
            ptr: a.arg(0),
        }),
        PIPE2 => Some(Effect::Pair {
            kind: Pipe,
            cloexec: cloexec(1, O_CLOEXEC),
            ptr: a.arg(0),
        }),
        DUP => dup(a.arg(0), false, false),
        DUP2 => dup(a.arg(0), false, true),
        DUP3 => dup(a.arg(0), cloexec(2, O_CLOEXEC), true),
        FCNTL => match a.arg(1) {
            F_DUPFD => dup(a.arg(0), false, false),
            F_DUPFD_CLOEXEC => dup(a.arg(0), true, false),
            F_SETFD => Some(Effect::SetCloexec {
                fd: a.arg(0) as u32,
                on: cloexec(2, FD_CLOEXEC),
            }),
            _ => None,
        },
        // The request is an unsigned int: the upper half of the register
        // is not part of it (fs/ioctl.c).
        IOCTL => match a.arg(1) & 0xffff_ffff {
            FIOCLEX => Some(Effect::SetCloexec {
                fd: a.arg(0) as u32,
                on: true,
            }),
            FIONCLEX => Some(Effect::SetCloexec {
                fd: a.arg(0) as u32,
                on: false,
            }),
            _ => None,
        },
        EVENTFD => new(Eventfd, false),
        EVENTFD2 => new(Eventfd, cloexec(1, O_CLOEXEC)),
        EPOLL_CREATE => new(Epoll, false),
        EPOLL_CREATE1 => new(Epoll, cloexec(0, O_CLOEXEC)),
        TIMERFD_CREATE => new(Timerfd, cloexec(1, O_CLOEXEC)),
        // signalfd on an existing signalfd (first argument not -1) updates
        // its mask and returns that fd (fs/signalfd.c do_signalfd4).
        SIGNALFD if a.arg(0) as i32 == -1 => new(Signalfd, false),
        SIGNALFD4 if a.arg(0) as i32 == -1 => new(Signalfd, cloexec(3, O_CLOEXEC)),
        INOTIFY_INIT => new(Inotify, false),
        INOTIFY_INIT1 => new(Inotify, cloexec(0, O_CLOEXEC)),
        FANOTIFY_INIT => new(Fanotify, cloexec(0, ONE_CLOEXEC)),
        MEMFD_CREATE => new(Memfd, cloexec(1, ONE_CLOEXEC)),
        MEMFD_SECRET => new(Memfd, cloexec(0, O_CLOEXEC)),
        USERFAULTFD => new(Userfaultfd, cloexec(0, O_CLOEXEC)),
        PERF_EVENT_OPEN => new(PerfEvent, cloexec(4, PERF_FLAG_FD_CLOEXEC)),
        BPF if bpf_cmd_returns_fd(a.arg(0)) => new(Bpf, true),
        IO_URING_SETUP => Some(Effect::IoUring { params: a.arg(1) }),
        // pidfds are always close-on-exec (kernel/pid.c pidfd_create).
        PIDFD_OPEN => new(Pidfd, true),
        // The copy of another process's fd: its kind is not in the call.
        PIDFD_GETFD => new(Unknown, true),
        OPEN_TREE | OPEN_TREE_ATTR => new(Mount, cloexec(2, O_CLOEXEC)),
        FSOPEN | FSMOUNT => new(Mount, cloexec(1, ONE_CLOEXEC)),
        FSPICK => new(Mount, cloexec(2, ONE_CLOEXEC)),
        // mq_open always sets O_CLOEXEC (ipc/mqueue.c do_mq_open).
        MQ_OPEN => new(Mqueue, true),
        CLONE => Some(Effect::Clone {
            flags: a.arg(0),
            pidfd_ptr: a.arg(2),
            clone3_args: 0,
        }),
        CLONE3 => Some(Effect::Clone {
            flags: 0,
            pidfd_ptr: 0,
            clone3_args: a.arg(0),
        }),
        RECVMSG => Some(Effect::Recv {
            msg: a.arg(1),
            multi: false,
            cloexec: cloexec(2, MSG_CMSG_CLOEXEC),
        }),
        RECVMMSG => Some(Effect::Recv {
            msg: a.arg(1),
            multi: true,
            cloexec: cloexec(3, MSG_CMSG_CLOEXEC),
        }),
        EXECVE | EXECVEAT => Some(Effect::Exec),
        CLOSE => Some(Effect::Close {
            fd: a.arg(0) as u32,
        }),
        CLOSE_RANGE => Some(Effect::CloseRange {
            first: a.arg(0) as u32,
            last: a.arg(1) as u32,
            cloexec: cloexec(2, CLOSE_RANGE_CLOEXEC),
        }),
        SETRLIMIT if a.arg(0) == RLIMIT_NOFILE => Some(Effect::Rlimit { target: 0 }),
        // prlimit64(pid, resource, new, old): only a new limit changes
        // anything.
        PRLIMIT64 if a.arg(1) == RLIMIT_NOFILE && a.arg(2) != 0 => Some(Effect::Rlimit {
            target: a.arg(0) as u32,
        }),
        _ => None,
    }
}

/// `FdInfo::detail` of the sockets socket(2) and socketpair(2) make:
/// `family << 16 | type`, so a socket that is never bound or connected
/// still has a protocol; 0 for every other call.
#[inline(always)]
pub fn socket_detail<A: SyscallArgs>(nr: u64, a: &A) -> u32 {
    if nr == SOCKET || nr == SOCKETPAIR {
        ((a.arg(0) as u32) << 16) | (a.arg(1) as u32 & SOCK_TYPE_MASK)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(nr: u64, args: &[u64]) -> Option<Effect> {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        decode(nr, &a)
    }

    fn new_fd(kind: FdKind, cloexec: bool) -> Option<Effect> {
        Some(Effect::New { kind, cloexec })
    }

    const CLOEXEC: u64 = O_CLOEXEC;
    /// O_RDWR | O_CREAT | O_NONBLOCK: bits next to O_CLOEXEC that must not
    /// be read as it.
    const OTHER_OPEN_FLAGS: u64 = 0o2 | 0o100 | 0o4000;

    #[test]
    fn open() {
        assert_eq!(
            d(OPEN, &[0x1000, OTHER_OPEN_FLAGS, 0o644]),
            new_fd(FdKind::File, false)
        );
        assert_eq!(
            d(OPEN, &[0x1000, CLOEXEC | OTHER_OPEN_FLAGS]),
            new_fd(FdKind::File, true)
        );
    }

    #[test]
    fn openat_and_open_by_handle_at() {
        // AT_FDCWD as the unsigned register value.
        let at_fdcwd = -100i64 as u64;
        assert_eq!(
            d(OPENAT, &[at_fdcwd, 0x1000, CLOEXEC]),
            new_fd(FdKind::File, true)
        );
        assert_eq!(
            d(OPENAT, &[at_fdcwd, 0x1000, OTHER_OPEN_FLAGS, CLOEXEC]),
            new_fd(FdKind::File, false),
            "the mode (4th argument) is not the flags"
        );
        assert_eq!(
            d(OPEN_BY_HANDLE_AT, &[3, 0x1000, CLOEXEC]),
            new_fd(FdKind::File, true)
        );
    }

    #[test]
    fn openat2_reads_its_flags_from_open_how() {
        assert_eq!(
            d(OPENAT2, &[3, 0x1000, 0x2000, 24]),
            Some(Effect::Openat2 { how: 0x2000 })
        );
        assert!(Effect::Openat2 { how: 0 }.creates());
    }

    #[test]
    fn creat_is_never_cloexec() {
        assert_eq!(
            d(CREAT, &[0x1000, CLOEXEC]),
            new_fd(FdKind::File, false),
            "creat's second argument is a mode"
        );
    }

    #[test]
    fn socket_and_accept() {
        let (af_inet, sock_stream) = (2, 1);
        assert_eq!(
            d(SOCKET, &[af_inet, sock_stream | CLOEXEC, 0]),
            new_fd(FdKind::Socket, true)
        );
        assert_eq!(
            d(SOCKET, &[af_inet, sock_stream | 0o4000, 0]),
            new_fd(FdKind::Socket, false)
        );
        assert_eq!(d(ACCEPT, &[3, 0, 0]), new_fd(FdKind::Socket, false));
        assert_eq!(
            socket_detail(
                SOCKET,
                &[af_inet, sock_stream | CLOEXEC | 0o4000, 0, 0, 0, 0]
            ),
            (2 << 16) | 1
        );
        assert_eq!(socket_detail(ACCEPT, &[2, 1, 0, 0, 0, 0]), 0);
    }

    #[test]
    fn accept4() {
        assert_eq!(
            d(ACCEPT4, &[3, 0, 0, CLOEXEC]),
            new_fd(FdKind::Socket, true)
        );
        assert_eq!(
            d(ACCEPT4, &[3, 0, CLOEXEC, 0]),
            new_fd(FdKind::Socket, false),
            "the flags are the 4th argument"
        );
    }

    #[test]
    fn socketpair_writes_two_fds() {
        let (af_unix, sock_dgram) = (1, 2);
        assert_eq!(
            d(SOCKETPAIR, &[af_unix, sock_dgram | CLOEXEC, 0, 0x7000]),
            Some(Effect::Pair {
                kind: FdKind::Socket,
                cloexec: true,
                ptr: 0x7000
            })
        );
        assert_eq!(
            socket_detail(SOCKETPAIR, &[af_unix, sock_dgram, 0, 0x7000, 0, 0]),
            (1 << 16) | 2
        );
    }

    #[test]
    fn pipe_and_pipe2() {
        assert_eq!(
            d(PIPE, &[0x7000]),
            Some(Effect::Pair {
                kind: FdKind::Pipe,
                cloexec: false,
                ptr: 0x7000
            })
        );
        assert_eq!(
            d(PIPE2, &[0x7000, CLOEXEC]),
            Some(Effect::Pair {
                kind: FdKind::Pipe,
                cloexec: true,
                ptr: 0x7000
            })
        );
    }

    #[test]
    fn dup_dup2_dup3() {
        assert_eq!(
            d(DUP, &[5]),
            Some(Effect::Dup {
                src: 5,
                cloexec: false,
                replaces: false
            })
        );
        assert_eq!(
            d(DUP2, &[5, 9]),
            Some(Effect::Dup {
                src: 5,
                cloexec: false,
                replaces: true
            })
        );
        assert_eq!(
            d(DUP3, &[5, 9, CLOEXEC]),
            Some(Effect::Dup {
                src: 5,
                cloexec: true,
                replaces: true
            })
        );
    }

    #[test]
    fn fcntl_dupfd_and_setfd() {
        assert_eq!(
            d(FCNTL, &[4, F_DUPFD, 10]),
            Some(Effect::Dup {
                src: 4,
                cloexec: false,
                replaces: false
            })
        );
        assert_eq!(
            d(FCNTL, &[4, F_DUPFD_CLOEXEC, 10]),
            Some(Effect::Dup {
                src: 4,
                cloexec: true,
                replaces: false
            })
        );
        assert_eq!(
            d(FCNTL, &[4, F_SETFD, FD_CLOEXEC]),
            Some(Effect::SetCloexec { fd: 4, on: true })
        );
        assert_eq!(
            d(FCNTL, &[4, F_SETFD, 0]),
            Some(Effect::SetCloexec { fd: 4, on: false })
        );
        // F_GETFD, F_SETFL (O_CLOEXEC there means nothing), F_GETFL.
        for cmd in [1, 4, 3] {
            assert_eq!(d(FCNTL, &[4, cmd, CLOEXEC]), None, "fcntl cmd {cmd}");
        }
    }

    #[test]
    fn ioctl_fioclex_fionclex() {
        assert_eq!(
            d(IOCTL, &[6, FIOCLEX]),
            Some(Effect::SetCloexec { fd: 6, on: true })
        );
        assert_eq!(
            d(IOCTL, &[6, FIONCLEX]),
            Some(Effect::SetCloexec { fd: 6, on: false })
        );
        assert_eq!(
            d(IOCTL, &[6, (1 << 32) | FIOCLEX]),
            Some(Effect::SetCloexec { fd: 6, on: true }),
            "the request is 32 bits"
        );
        // TCGETS and FIONREAD change no fd.
        assert_eq!(d(IOCTL, &[6, 0x5401]), None);
        assert_eq!(d(IOCTL, &[6, 0x541b]), None);
    }

    #[test]
    fn eventfd() {
        assert_eq!(d(EVENTFD, &[0]), new_fd(FdKind::Eventfd, false));
        assert_eq!(d(EVENTFD2, &[0, CLOEXEC]), new_fd(FdKind::Eventfd, true));
        assert_eq!(d(EVENTFD2, &[CLOEXEC, 0]), new_fd(FdKind::Eventfd, false));
    }

    #[test]
    fn epoll() {
        assert_eq!(d(EPOLL_CREATE, &[CLOEXEC]), new_fd(FdKind::Epoll, false));
        assert_eq!(d(EPOLL_CREATE1, &[CLOEXEC]), new_fd(FdKind::Epoll, true));
        // epoll_ctl and epoll_wait make no fd.
        assert_eq!(d(233, &[3, 1, 4, 0]), None);
        assert_eq!(d(232, &[3, 0, 8, 0]), None);
    }

    #[test]
    fn timerfd() {
        let clock_monotonic = 1;
        assert_eq!(
            d(TIMERFD_CREATE, &[clock_monotonic, CLOEXEC]),
            new_fd(FdKind::Timerfd, true)
        );
        assert_eq!(
            d(TIMERFD_CREATE, &[clock_monotonic, 0o4000]),
            new_fd(FdKind::Timerfd, false)
        );
    }

    #[test]
    fn signalfd_creates_only_with_fd_minus_one() {
        let minus_one = u64::MAX;
        assert_eq!(
            d(SIGNALFD, &[minus_one, 0x7000, 8]),
            new_fd(FdKind::Signalfd, false)
        );
        assert_eq!(
            d(SIGNALFD4, &[minus_one, 0x7000, 8, CLOEXEC]),
            new_fd(FdKind::Signalfd, true)
        );
        // The int -1 in a register whose upper half is not set.
        assert_eq!(
            d(SIGNALFD4, &[0xffff_ffff, 0x7000, 8, 0]),
            new_fd(FdKind::Signalfd, false)
        );
        assert_eq!(d(SIGNALFD, &[5, 0x7000, 8]), None, "updates fd 5");
        assert_eq!(d(SIGNALFD4, &[5, 0x7000, 8, CLOEXEC]), None);
    }

    #[test]
    fn inotify() {
        assert_eq!(d(INOTIFY_INIT, &[]), new_fd(FdKind::Inotify, false));
        assert_eq!(d(INOTIFY_INIT1, &[CLOEXEC]), new_fd(FdKind::Inotify, true));
        // inotify_add_watch returns a watch descriptor, not an fd.
        assert_eq!(d(254, &[3, 0x1000, 0xfff]), None);
    }

    #[test]
    fn fanotify() {
        assert_eq!(d(FANOTIFY_INIT, &[1, 0]), new_fd(FdKind::Fanotify, true));
        assert_eq!(
            d(FANOTIFY_INIT, &[CLOEXEC, 0]),
            new_fd(FdKind::Fanotify, false),
            "FAN_CLOEXEC is bit 0, not O_CLOEXEC"
        );
    }

    #[test]
    fn memfd_create() {
        assert_eq!(
            d(MEMFD_CREATE, &[0x1000, 1]),
            new_fd(FdKind::Memfd, true),
            "MFD_CLOEXEC"
        );
        assert_eq!(
            d(MEMFD_CREATE, &[0x1000, 2]),
            new_fd(FdKind::Memfd, false),
            "MFD_ALLOW_SEALING only"
        );
    }

    #[test]
    fn memfd_secret() {
        assert_eq!(d(MEMFD_SECRET, &[CLOEXEC]), new_fd(FdKind::Memfd, true));
        assert_eq!(d(MEMFD_SECRET, &[0]), new_fd(FdKind::Memfd, false));
    }

    #[test]
    fn userfaultfd() {
        assert_eq!(
            d(USERFAULTFD, &[CLOEXEC | 0o4000]),
            new_fd(FdKind::Userfaultfd, true)
        );
        assert_eq!(d(USERFAULTFD, &[0]), new_fd(FdKind::Userfaultfd, false));
    }

    #[test]
    fn perf_event_open() {
        assert_eq!(
            d(
                PERF_EVENT_OPEN,
                &[0x1000, 0, u64::MAX, u64::MAX, PERF_FLAG_FD_CLOEXEC]
            ),
            new_fd(FdKind::PerfEvent, true)
        );
        assert_eq!(
            d(PERF_EVENT_OPEN, &[0x1000, 0, u64::MAX, u64::MAX, 0]),
            new_fd(FdKind::PerfEvent, false)
        );
    }

    #[test]
    fn bpf_only_the_commands_that_return_fds() {
        for cmd in [0, 5, 7, 13, 14, 17, 18, 19, 28, 30, 33, 36] {
            assert_eq!(
                d(BPF, &[cmd, 0x1000, 128]),
                new_fd(FdKind::Bpf, true),
                "cmd {cmd}"
            );
        }
        // MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, OBJ_PIN, PROG_ATTACH, LINK_UPDATE.
        for cmd in [1, 2, 6, 8, 29] {
            assert_eq!(d(BPF, &[cmd, 0x1000, 128]), None, "cmd {cmd}");
        }
    }

    #[test]
    fn io_uring_setup() {
        assert_eq!(
            d(IO_URING_SETUP, &[64, 0x7000]),
            Some(Effect::IoUring { params: 0x7000 })
        );
        // io_uring_enter and io_uring_register make no fd of their own.
        assert_eq!(d(426, &[3, 1, 1, 0]), None);
        assert_eq!(d(427, &[3, 2, 0x7000, 1]), None);
    }

    #[test]
    fn pidfd_open_and_getfd() {
        assert_eq!(d(PIDFD_OPEN, &[1234, 0]), new_fd(FdKind::Pidfd, true));
        assert_eq!(
            d(PIDFD_GETFD, &[3, 7, 0]),
            new_fd(FdKind::Unknown, true),
            "the kind of the copied fd is named from /proc later"
        );
    }

    #[test]
    fn open_tree() {
        let open_tree_clone = 1;
        assert_eq!(
            d(
                OPEN_TREE,
                &[u64::MAX - 99, 0x1000, open_tree_clone | CLOEXEC]
            ),
            new_fd(FdKind::Mount, true)
        );
        assert_eq!(
            d(OPEN_TREE_ATTR, &[3, 0x1000, open_tree_clone, 0x2000, 32]),
            new_fd(FdKind::Mount, false)
        );
    }

    #[test]
    fn fsopen_fsmount_fspick() {
        assert_eq!(d(FSOPEN, &[0x1000, 1]), new_fd(FdKind::Mount, true));
        assert_eq!(d(FSOPEN, &[0x1000, 0]), new_fd(FdKind::Mount, false));
        assert_eq!(d(FSMOUNT, &[3, 1, 0]), new_fd(FdKind::Mount, true));
        assert_eq!(d(FSPICK, &[3, 0x1000, 1]), new_fd(FdKind::Mount, true));
        assert_eq!(d(FSPICK, &[3, 0x1000, 0]), new_fd(FdKind::Mount, false));
        // fsconfig and move_mount make no fd.
        assert_eq!(d(431, &[3, 6, 0, 0, 0]), None);
        assert_eq!(d(429, &[3, 0, 3, 0, 0]), None);
    }

    #[test]
    fn mq_open_is_always_cloexec() {
        assert_eq!(
            d(MQ_OPEN, &[0x1000, 0o2, 0o600, 0]),
            new_fd(FdKind::Mqueue, true)
        );
    }

    #[test]
    fn clone_and_clone3_may_make_a_pidfd() {
        let flags = CLONE_PIDFD | 17;
        assert_eq!(
            d(CLONE, &[flags, 0, 0x7000, 0, 0]),
            Some(Effect::Clone {
                flags,
                pidfd_ptr: 0x7000,
                clone3_args: 0
            })
        );
        assert_eq!(
            d(CLONE3, &[0x7100, 88]),
            Some(Effect::Clone {
                flags: 0,
                pidfd_ptr: 0,
                clone3_args: 0x7100
            })
        );
        let e = d(CLONE, &[flags, 0, 0x7000]).unwrap();
        assert!(!e.creates(), "a failed clone is not an fd limit failure");
        // fork and vfork make no fd.
        assert_eq!(d(FORK, &[]), None);
        assert_eq!(d(VFORK, &[]), None);
    }

    #[test]
    fn recvmsg_and_recvmmsg() {
        assert_eq!(
            d(RECVMSG, &[3, 0x7000, MSG_CMSG_CLOEXEC]),
            Some(Effect::Recv {
                msg: 0x7000,
                multi: false,
                cloexec: true
            })
        );
        assert_eq!(
            d(RECVMMSG, &[3, 0x7000, 4, MSG_CMSG_CLOEXEC, 0]),
            Some(Effect::Recv {
                msg: 0x7000,
                multi: true,
                cloexec: true
            })
        );
        assert_eq!(
            d(RECVMMSG, &[3, 0x7000, MSG_CMSG_CLOEXEC, 0, 0]),
            Some(Effect::Recv {
                msg: 0x7000,
                multi: true,
                cloexec: false
            }),
            "recvmmsg's flags are the 4th argument"
        );
        // recvfrom and sendmsg carry no fds back.
        assert_eq!(d(45, &[3, 0x7000, 10, 0, 0, 0]), None);
        assert_eq!(d(46, &[3, 0x7000, 0]), None);
    }

    #[test]
    fn close() {
        assert_eq!(d(CLOSE, &[7]), Some(Effect::Close { fd: 7 }));
        assert_eq!(
            d(CLOSE, &[(1 << 32) | 7]),
            Some(Effect::Close { fd: 7 }),
            "an fd is an unsigned int"
        );
        assert!(!Effect::Close { fd: 7 }.creates());
    }

    #[test]
    fn close_range_closes_or_marks() {
        assert_eq!(
            d(CLOSE_RANGE, &[3, u32::MAX as u64, 0]),
            Some(Effect::CloseRange {
                first: 3,
                last: u32::MAX,
                cloexec: false
            })
        );
        assert_eq!(
            d(CLOSE_RANGE, &[3, 10, CLOSE_RANGE_CLOEXEC]),
            Some(Effect::CloseRange {
                first: 3,
                last: 10,
                cloexec: true
            })
        );
        // CLOSE_RANGE_UNSHARE alone closes.
        assert_eq!(
            d(CLOSE_RANGE, &[3, 10, 1 << 1]),
            Some(Effect::CloseRange {
                first: 3,
                last: 10,
                cloexec: false
            })
        );
    }

    #[test]
    fn execve_and_execveat() {
        assert_eq!(d(EXECVE, &[0x1000, 0x2000, 0x3000]), Some(Effect::Exec));
        assert_eq!(d(EXECVEAT, &[3, 0x1000, 0, 0, 0x1000]), Some(Effect::Exec));
        assert!(!Effect::Exec.creates());
    }

    #[test]
    fn setrlimit_and_prlimit64_of_nofile_only() {
        let rlimit_nproc = 6;
        assert_eq!(
            d(SETRLIMIT, &[RLIMIT_NOFILE, 0x7000]),
            Some(Effect::Rlimit { target: 0 })
        );
        assert_eq!(d(SETRLIMIT, &[rlimit_nproc, 0x7000]), None);
        assert_eq!(
            d(PRLIMIT64, &[4321, RLIMIT_NOFILE, 0x7000, 0]),
            Some(Effect::Rlimit { target: 4321 })
        );
        assert_eq!(
            d(PRLIMIT64, &[0, RLIMIT_NOFILE, 0x7000, 0x7100]),
            Some(Effect::Rlimit { target: 0 }),
            "pid 0 is the caller"
        );
        assert_eq!(
            d(PRLIMIT64, &[4321, RLIMIT_NOFILE, 0, 0x7100]),
            None,
            "a read of the limit changes nothing"
        );
        assert_eq!(d(PRLIMIT64, &[4321, rlimit_nproc, 0x7000, 0]), None);
        // getrlimit.
        assert_eq!(d(97, &[RLIMIT_NOFILE, 0x7000]), None);
    }

    #[test]
    fn unrelated_syscalls_leave_at_once() {
        // read, write, getppid, mmap, futex, nanosleep, epoll_wait, and
        // numbers no syscall has.
        for nr in [0, 1, 110, 9, 202, 35, 232, 999, u64::MAX] {
            assert_eq!(
                d(nr, &[3, CLOEXEC, CLOEXEC, CLOEXEC, 1, 1]),
                None,
                "nr {nr}"
            );
        }
    }

    #[test]
    fn only_fd_making_calls_count_emfile() {
        assert!(
            Effect::New {
                kind: FdKind::File,
                cloexec: false
            }
            .creates()
        );
        assert!(
            Effect::Pair {
                kind: FdKind::Pipe,
                cloexec: false,
                ptr: 0
            }
            .creates()
        );
        assert!(
            Effect::Dup {
                src: 1,
                cloexec: false,
                replaces: true
            }
            .creates()
        );
        assert!(Effect::IoUring { params: 0 }.creates());
        for e in [
            Effect::SetCloexec { fd: 1, on: true },
            Effect::Recv {
                msg: 0,
                multi: false,
                cloexec: false,
            },
            Effect::CloseRange {
                first: 0,
                last: 1,
                cloexec: false,
            },
            Effect::Rlimit { target: 0 },
        ] {
            assert!(!e.creates(), "{e:?}");
        }
    }

    #[test]
    fn every_decoded_syscall_has_a_name() {
        for nr in 0..600 {
            if d(nr, &[u64::MAX, RLIMIT_NOFILE, 1, 0, 0, 0]).is_some()
                || d(nr, &[0, 0, 0, 0, 0, 0]).is_some()
            {
                assert!(
                    name(nr).is_some(),
                    "syscall {nr} is decoded but has no name"
                );
            }
        }
    }
}
