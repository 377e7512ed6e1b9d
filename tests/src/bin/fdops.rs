//! `fdops`: a helper process that performs file-descriptor operations on
//! command, for the fdtrace integration tests.
//!
//! Protocol: one command per line on stdin; after each command exactly one
//! reply line on stdout, written with a single write(2) so it never interleaves
//! with the lines of other writers on the same pipe (under `fdtrace run`, fdops
//! shares fdtrace's stdout). Then fdops blocks reading the next command, so it
//! is idle and its fd table is stable while the test looks at it. stdin is read
//! one byte at a time, so nothing is buffered and lost across `exec`.
//!
//! Replies:
//!
//! ```text
//! @fdops ready pid=P tid=T nfds=N opened=0 closed=0            (at start)
//! @fdops ok pid=P tid=T nfds=N opened=A closed=B [key=value ...]
//! @fdops err pid=P tid=T nfds=N opened=A closed=B msg=<text>
//! ```
//!
//! `pid` is the process that ran the command, `tid` the thread that did the fd
//! work, `nfds` the number of open fds afterwards, for debugging only (counted
//! with one poll(2) over every fd number below the soft limit: POLLNVAL marks
//! free ones; reading /proc/self/fd would itself open and close an fd and
//! skew the counts under test), `opened`/`closed` how many fds
//! the command created/closed in that process, implicit closes included (dup2
//! onto an open fd, close_range, close-on-exec at exec). Lists of fds are
//! comma separated (`fds=3,4`), empty lists are `-`. On error `opened`/`closed`
//! still tell what was done before the failure and `msg=` is last.
//!
//! "cloexec" as an argument means the close-on-exec variant of the call.
//! Every path opened is `/dev/null` unless told otherwise.
//!
//! | command                  | what it does                                                        | reply keys |
//! |--------------------------|---------------------------------------------------------------------|------------|
//! | `ping`                   | nothing                                                             | |
//! | `open [cloexec]`         | openat(AT_FDCWD, /dev/null, O_RDONLY[\|O_CLOEXEC])                  | fds |
//! | `openmany N [cloexec]`   | N × openat                                                          | fds |
//! | `open_legacy`            | open(2) (x86_64; openat elsewhere)                                  | fds |
//! | `open_missing`           | openat of a missing path: must fail with ENOENT                     | errno |
//! | `openat2 [cloexec]`      | openat2(2)                                                          | fds |
//! | `creat`                  | creat(2) of a temp file, unlinked right away (fd stays open)        | fds |
//! | `close FD...`            | close(2) each                                                       | |
//! | `close_bad [FD]`         | close(2) of a free fd number: must fail with EBADF                  | fd errno |
//! | `churn N`                | N × (openat + close)                                                | |
//! | `socket [cloexec]`       | socket(AF_UNIX, SOCK_STREAM[\|SOCK_CLOEXEC])                        | fds |
//! | `socketpair [cloexec]`   | socketpair(AF_UNIX, SOCK_STREAM[\|SOCK_CLOEXEC])                    | fds |
//! | `pipe`                   | pipe(2) (x86_64; pipe2(0) elsewhere)                                | fds |
//! | `pipe2 [cloexec]`        | pipe2(2)                                                            | fds |
//! | `accept4 [cloexec]`      | listen on 127.0.0.1:0, connect, accept4([SOCK_CLOEXEC])             | fds=listener,client,accepted |
//! | `accept`                 | the same with accept(2) (x86_64; accept4(0) elsewhere)              | fds=listener,client,accepted |
//! | `dup FD`                 | dup(2)                                                              | fds |
//! | `dup2 OLD NEW`           | dup2(2) (x86_64; dup3 elsewhere); implicit close if NEW was open    | fds replaced |
//! | `dup3 OLD NEW [cloexec]` | dup3(2); implicit close if NEW was open                             | fds replaced |
//! | `dupfd FD MIN`           | fcntl(FD, F_DUPFD, MIN)                                             | fds |
//! | `dupfd_cloexec FD MIN`   | fcntl(FD, F_DUPFD_CLOEXEC, MIN)                                     | fds |
//! | `setfd FD on\|off`       | fcntl(FD, F_SETFD, FD_CLOEXEC or 0)                                 | |
//! | `fioclex FD`             | ioctl(FD, FIOCLEX)                                                  | |
//! | `fionclex FD`            | ioctl(FD, FIONCLEX)                                                 | |
//! | `close_range LO HI [cloexec]` | close_range(LO, HI, 0 or CLOSE_RANGE_CLOEXEC); HI may be `max` | fds (the open fds in range) |
//! | `eventfd [cloexec\|legacy]`   | eventfd2(2) / eventfd(2)                                       | fds |
//! | `epoll [cloexec\|legacy]`     | epoll_create1(2) / epoll_create(2)                             | fds |
//! | `timerfd [cloexec]`      | timerfd_create(CLOCK_MONOTONIC)                                     | fds |
//! | `signalfd [cloexec\|legacy]`  | signalfd4(-1, {SIGUSR1}) / signalfd(-1, ...)                   | fds |
//! | `inotify [cloexec\|legacy]`   | inotify_init1(2) / inotify_init(2)                             | fds |
//! | `memfd [cloexec]`        | memfd_create("fdops")                                               | fds |
//! | `pidfd`                  | pidfd_open(getpid(), 0) (always close-on-exec)                      | fds |
//! | `scm [cloexec]`          | socketpair + /dev/null + pipe; sendmsg the 3 fds (SCM_RIGHTS), recvmsg them ([MSG_CMSG_CLOEXEC]); everything stays open | sp sent recv |
//! | `scm_many M`             | socketpair + /dev/null; M sendmsg, each passing the /dev/null fd (SCM_RIGHTS), then ONE recvmmsg(MSG_DONTWAIT) receives all M messages (M > 8 passes fdtrace's per-call cap) | sp sent recv (the M received fds) msgs |
//! | `shared_open N`          | clone(CLONE_FILES\|SIGCHLD) with a NULL stack: a child process SHARING this fd table opens N fds on /dev/null and _exits without closing them; this process reaps it. The N fds are now in this table: `opened`=N, though this process made no fd syscall (the child did) | fds (the N new ones) sharer (the child's pid, reaped) |
//! | `thread N M`             | a thread opens N fds and closes the first M; joined before replying | tid fds (still open) |
//! | `fork`                   | make two O_CLOEXEC control pipes, fork a child that stays alive holding the inherited fds (it closes its copies of the parent's pipe ends, the parent closes the child's), it serves commands from `child` | child child_nfds child_opened child_closed |
//! | `child PID CMD...`       | run CMD in forked child PID; the reply is the child's own reply (its pid, its counts); after `exit` the child is reaped and the parent closes its two pipe ends to it before the reply | + parent_closed (after exit) |
//! | `exec`                   | make a mix of close-on-exec and inherited fds with every mechanism (O_CLOEXEC, SOCK_CLOEXEC, F_SETFD on/off, FIOCLEX/FIONCLEX, F_DUPFD(_CLOEXEC), dup3 O_CLOEXEC, dup2/dup, pipe2, accept4, eventfd, memfd, pidfd, MSG_CMSG_CLOEXEC), then execve("/proc/self/exe", ["fdops", "--resume", ...]) to continue in command mode; the reply comes from the new image (same pid, comm now `exe`): `opened` = fds the mix made, `closed` = close-on-exec fds the exec closed (earlier ones included); the new image's dynamic loader opens and closes a few files of its own, not counted | exec=1 cloexec kept |
//! | `emfile K F [thread]`    | lower RLIMIT_NOFILE soft to (open fds + K), openat until EMFILE, then F-1 more failing openat, close the extra fds, restore the limit; with `thread` the work runs in a new thread | limit failed tid |
//! | `emfile_mixed K`         | the same, but after the first failing openat try once each of many other fd-creating syscalls, all must fail with EMFILE | limit failed syscalls tid |
//! | `exit [CODE]`            | reply, then _exit(CODE)                                             | |
//!
//! A forked child serves the same commands from a pipe and
//! replies through another; the parent forwards the reply. The parent's ends
//! of those pipes are close-on-exec, so children exit (end of file) when the
//! parent exits or execs.

use std::ffi::{CStr, CString};
use std::ptr;

use libc::{c_int, c_long, c_uint, c_void};

/// Internal argument telling a re-exec'd fdops to resume in command mode.
const RESUME_ARG: &str = "--resume";
/// After `exec` in a forked child: the command pipes it serves, `IN,OUT`.
const CHILD_IO_ARG: &str = "child_io";

/// A command failure: the message that goes into `msg=`.
type Res<T> = Result<T, String>;

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(e: c_int) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::ECHILD => "ECHILD",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ECONNREFUSED => "ECONNREFUSED",
        _ => return format!("E{e}"),
    };
    name.to_string()
}

fn gettid() -> c_int {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as c_int }
}

fn getpid() -> c_int {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

fn list(fds: &[c_int]) -> String {
    if fds.is_empty() {
        "-".to_string()
    } else {
        fds.iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn parse_list(s: &str) -> Vec<c_int> {
    if s == "-" {
        return Vec::new();
    }
    s.split(',').filter_map(|x| x.parse().ok()).collect()
}

/// Writes all of `buf` to `fd`; `buf` is one short line, so a pipe takes it in
/// one atomic write(2).
fn write_all(fd: c_int, buf: &[u8]) -> bool {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: the pointer and length come from a live slice.
        let n = unsafe { libc::write(fd, buf[off..].as_ptr().cast(), buf.len() - off) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        off += n as usize;
    }
    true
}

/// Reads one line from `fd`, a byte at a time (nothing read ahead). `None` at
/// end of file before any byte.
fn read_line(fd: c_int) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let mut b = 0u8;
        // SAFETY: reads one byte into a local.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return None;
        }
        if n == 0 {
            if line.is_empty() {
                return None;
            }
            break;
        }
        if b == b'\n' {
            break;
        }
        line.push(b);
    }
    Some(
        String::from_utf8_lossy(&line)
            .trim_end_matches('\r')
            .to_string(),
    )
}

/// Soft RLIMIT_NOFILE.
fn nofile_limit() -> libc::rlimit {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    rl
}

/// The open fds of this process, found with a single poll(2) over every
/// possible fd number: POLLNVAL marks the closed ones. Opens nothing.
fn open_fds() -> Vec<c_int> {
    let soft = nofile_limit().rlim_cur;
    let n = soft.min(1 << 20) as usize;
    let mut pfds: Vec<libc::pollfd> = (0..n)
        .map(|fd| libc::pollfd {
            fd: fd as c_int,
            events: 0,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a live array of n pollfd.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, 0) };
    if r < 0 {
        // Fall back to fcntl over the same range.
        return (0..n as c_int).filter(|&fd| is_open(fd)).collect();
    }
    pfds.iter()
        .filter(|p| p.revents & libc::POLLNVAL == 0)
        .map(|p| p.fd)
        .collect()
}

fn is_open(fd: c_int) -> bool {
    // SAFETY: F_GETFD has no side effect.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn is_cloexec(fd: c_int) -> bool {
    // SAFETY: F_GETFD has no side effect.
    let f = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    f >= 0 && f & libc::FD_CLOEXEC != 0
}

/// Lowest free fd number >= `min`.
fn free_fd_from(min: c_int) -> c_int {
    let mut fd = min;
    while is_open(fd) {
        fd += 1;
    }
    fd
}

fn flag(args: &[&str], name: &str) -> bool {
    args.contains(&name)
}

fn arg_int(args: &[&str], i: usize, what: &str) -> Res<c_long> {
    let s = args
        .get(i)
        .ok_or_else(|| format!("missing argument {what}"))?;
    s.parse::<c_long>()
        .map_err(|_| format!("bad {what}: {s:?}"))
}

fn arg_fd(args: &[&str], i: usize, what: &str) -> Res<c_int> {
    Ok(arg_int(args, i, what)? as c_int)
}

/// Fd-creation and close counters of one command, in one process. Shared by
/// threads (they share the fd table), so they are plain numbers added up
/// after the join.
#[derive(Default, Clone, Copy)]
struct Counts {
    opened: u64,
    closed: u64,
}

impl Counts {
    /// Checks the result of a call that returns a new fd.
    fn new_fd(&mut self, r: c_long, what: &str) -> Res<c_int> {
        if r < 0 {
            return Err(format!("{what}: {}", errno_name(errno())));
        }
        self.opened += 1;
        Ok(r as c_int)
    }

    /// Checks the result of a call that filled an `[c_int; 2]` with new fds.
    fn new_pair(&mut self, r: c_long, fds: [c_int; 2], what: &str) -> Res<[c_int; 2]> {
        if r < 0 {
            return Err(format!("{what}: {}", errno_name(errno())));
        }
        self.opened += 2;
        Ok(fds)
    }

    fn close(&mut self, fd: c_int) -> Res<()> {
        // SAFETY: closing an fd number; the tests decide which.
        if unsafe { libc::close(fd) } < 0 {
            return Err(format!("close({fd}): {}", errno_name(errno())));
        }
        self.closed += 1;
        Ok(())
    }

    fn open_devnull(&mut self, flags: c_int) -> Res<c_int> {
        // SAFETY: constant NUL-terminated path.
        let r = unsafe { libc::openat(libc::AT_FDCWD, c"/dev/null".as_ptr(), flags) };
        self.new_fd(r as c_long, "openat(/dev/null)")
    }
}

// ---- raw syscalls, so the syscall named is the syscall made ----------------

fn sys_pipe(c: &mut Counts) -> Res<[c_int; 2]> {
    let mut fds = [-1; 2];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: fds is a live [c_int; 2].
    let r = unsafe { libc::syscall(libc::SYS_pipe, fds.as_mut_ptr()) };
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: fds is a live [c_int; 2].
    let r = unsafe { libc::syscall(libc::SYS_pipe2, fds.as_mut_ptr(), 0) };
    c.new_pair(r, fds, "pipe")
}

fn sys_pipe2(c: &mut Counts, flags: c_int) -> Res<[c_int; 2]> {
    let mut fds = [-1; 2];
    // SAFETY: fds is a live [c_int; 2].
    let r = unsafe { libc::syscall(libc::SYS_pipe2, fds.as_mut_ptr(), flags) };
    c.new_pair(r, fds, "pipe2")
}

fn sys_socketpair(c: &mut Counts, flags: c_int) -> Res<[c_int; 2]> {
    let mut fds = [-1; 2];
    // SAFETY: fds is a live [c_int; 2].
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | flags,
            0,
            fds.as_mut_ptr(),
        )
    };
    c.new_pair(r as c_long, fds, "socketpair")
}

fn sys_socket(c: &mut Counts, domain: c_int, ty: c_int) -> Res<c_int> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::socket(domain, ty, 0) };
    c.new_fd(r as c_long, "socket")
}

fn sys_dup2(c: &mut Counts, old: c_int, new: c_int) -> Res<c_int> {
    let was_open = old != new && is_open(new);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_dup2, old, new) };
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: plain syscall.
    let r = unsafe {
        if old == new {
            libc::fcntl(old, libc::F_GETFD) as c_long
        } else {
            libc::syscall(libc::SYS_dup3, old, new, 0)
        }
    };
    if r < 0 {
        return Err(format!("dup2({old}, {new}): {}", errno_name(errno())));
    }
    if old != new {
        c.opened += 1;
        if was_open {
            c.closed += 1;
        }
    }
    Ok(new)
}

fn sys_dup3(c: &mut Counts, old: c_int, new: c_int, flags: c_int) -> Res<c_int> {
    let was_open = old != new && is_open(new);
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_dup3, old, new, flags) };
    if r < 0 {
        return Err(format!("dup3({old}, {new}): {}", errno_name(errno())));
    }
    c.opened += 1;
    if was_open {
        c.closed += 1;
    }
    Ok(new)
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

fn sys_openat2(c: &mut Counts, path: &CStr, flags: c_int) -> Res<c_int> {
    let how = OpenHow {
        flags: flags as u64,
        mode: 0,
        resolve: 0,
    };
    // SAFETY: path is NUL-terminated, how lives across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    c.new_fd(r, "openat2")
}

fn sys_open_legacy(c: &mut Counts, path: &CStr, flags: c_int) -> Res<c_int> {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: path is NUL-terminated.
    let r = unsafe { libc::syscall(libc::SYS_open, path.as_ptr(), flags, 0) };
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: path is NUL-terminated.
    let r = unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), flags, 0) };
    c.new_fd(r, "open")
}

fn sys_creat(c: &mut Counts, path: &CStr) -> Res<c_int> {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: path is NUL-terminated.
    let r = unsafe { libc::syscall(libc::SYS_creat, path.as_ptr(), 0o600) };
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: path is NUL-terminated.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
            0o600,
        )
    };
    c.new_fd(r, "creat")
}

fn sys_accept(c: &mut Counts, listener: c_int) -> Res<c_int> {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: null address pointers are allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_accept,
            listener,
            ptr::null_mut::<c_void>(),
            ptr::null_mut::<c_void>(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: null address pointers are allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_accept4,
            listener,
            ptr::null_mut::<c_void>(),
            ptr::null_mut::<c_void>(),
            0,
        )
    };
    c.new_fd(r, "accept")
}

fn sys_accept4(c: &mut Counts, listener: c_int, flags: c_int) -> Res<c_int> {
    // SAFETY: null address pointers are allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_accept4,
            listener,
            ptr::null_mut::<c_void>(),
            ptr::null_mut::<c_void>(),
            flags,
        )
    };
    c.new_fd(r, "accept4")
}

fn sys_eventfd(c: &mut Counts, legacy: bool, flags: c_int) -> Res<c_int> {
    #[cfg(target_arch = "x86_64")]
    if legacy {
        // SAFETY: plain syscall.
        let r = unsafe { libc::syscall(libc::SYS_eventfd, 0) };
        return c.new_fd(r, "eventfd");
    }
    let _ = legacy;
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_eventfd2, 0, flags) };
    c.new_fd(r, "eventfd2")
}

fn sys_epoll(c: &mut Counts, legacy: bool, flags: c_int) -> Res<c_int> {
    #[cfg(target_arch = "x86_64")]
    if legacy {
        // SAFETY: plain syscall.
        let r = unsafe { libc::syscall(libc::SYS_epoll_create, 8) };
        return c.new_fd(r, "epoll_create");
    }
    let _ = legacy;
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_epoll_create1, flags) };
    c.new_fd(r, "epoll_create1")
}

fn sys_timerfd(c: &mut Counts, flags: c_int) -> Res<c_int> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_timerfd_create, libc::CLOCK_MONOTONIC, flags) };
    c.new_fd(r, "timerfd_create")
}

fn sys_signalfd(c: &mut Counts, legacy: bool, flags: c_int) -> Res<c_int> {
    // The kernel's sigset is 8 bytes.
    let mask: u64 = 1 << (libc::SIGUSR1 - 1);
    #[cfg(target_arch = "x86_64")]
    if legacy {
        // SAFETY: mask lives across the call.
        let r = unsafe { libc::syscall(libc::SYS_signalfd, -1, &mask as *const u64, 8) };
        return c.new_fd(r, "signalfd");
    }
    let _ = legacy;
    // SAFETY: mask lives across the call.
    let r = unsafe { libc::syscall(libc::SYS_signalfd4, -1, &mask as *const u64, 8, flags) };
    c.new_fd(r, "signalfd4")
}

fn sys_inotify(c: &mut Counts, legacy: bool, flags: c_int) -> Res<c_int> {
    #[cfg(target_arch = "x86_64")]
    if legacy {
        // SAFETY: plain syscall.
        let r = unsafe { libc::syscall(libc::SYS_inotify_init) };
        return c.new_fd(r, "inotify_init");
    }
    let _ = legacy;
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_inotify_init1, flags) };
    c.new_fd(r, "inotify_init1")
}

fn sys_memfd(c: &mut Counts, flags: c_uint) -> Res<c_int> {
    // SAFETY: constant NUL-terminated name.
    let r = unsafe { libc::syscall(libc::SYS_memfd_create, c"fdops".as_ptr(), flags) };
    c.new_fd(r, "memfd_create")
}

fn sys_pidfd(c: &mut Counts) -> Res<c_int> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, getpid(), 0) };
    c.new_fd(r, "pidfd_open")
}

fn sys_fcntl_dup(c: &mut Counts, fd: c_int, cmd: c_int, min: c_int) -> Res<c_int> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::fcntl(fd, cmd, min) };
    c.new_fd(r as c_long, "fcntl(F_DUPFD*)")
}

fn sys_setfd(fd: c_int, on: bool) -> Res<()> {
    let v = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: plain syscall.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, v) } < 0 {
        return Err(format!("fcntl({fd}, F_SETFD): {}", errno_name(errno())));
    }
    Ok(())
}

fn sys_ioctl_clex(fd: c_int, on: bool) -> Res<()> {
    let req = if on { libc::FIOCLEX } else { libc::FIONCLEX };
    // SAFETY: FIOCLEX/FIONCLEX take no argument.
    if unsafe { libc::ioctl(fd, req) } < 0 {
        return Err(format!("ioctl({fd}, FIO(N)CLEX): {}", errno_name(errno())));
    }
    Ok(())
}

/// listener (127.0.0.1:0), connected client, accepted socket.
fn tcp_accept(c: &mut Counts, use_accept4: bool, flags: c_int) -> Res<[c_int; 3]> {
    let l = sys_socket(c, libc::AF_INET, libc::SOCK_STREAM)?;
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    addr.sin_port = 0;
    let alen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: addr is a live sockaddr_in of size alen.
    if unsafe { libc::bind(l, (&addr as *const libc::sockaddr_in).cast(), alen) } < 0 {
        return Err(format!("bind: {}", errno_name(errno())));
    }
    // SAFETY: plain syscall.
    if unsafe { libc::listen(l, 4) } < 0 {
        return Err(format!("listen: {}", errno_name(errno())));
    }
    let mut len = alen;
    // SAFETY: addr and len are live and sized.
    if unsafe { libc::getsockname(l, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len) } < 0 {
        return Err(format!("getsockname: {}", errno_name(errno())));
    }
    let cl = sys_socket(c, libc::AF_INET, libc::SOCK_STREAM)?;
    // SAFETY: addr is a live sockaddr_in of size alen.
    if unsafe { libc::connect(cl, (&addr as *const libc::sockaddr_in).cast(), alen) } < 0 {
        return Err(format!("connect: {}", errno_name(errno())));
    }
    let a = if use_accept4 {
        sys_accept4(c, l, flags)?
    } else {
        sys_accept(c, l)?
    };
    Ok([l, cl, a])
}

/// Sends one byte with `fds` attached (SCM_RIGHTS) over `tx`.
fn send_fds(tx: c_int, fds: &[c_int]) -> Res<()> {
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut byte = [b'x'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain data; the pointers set below are live.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one header and the fds.
    unsafe {
        let cm = libc::CMSG_FIRSTHDR(&msg);
        (*cm).cmsg_level = libc::SOL_SOCKET;
        (*cm).cmsg_type = libc::SCM_RIGHTS;
        (*cm).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cm).cast::<c_int>(), fds.len());
    }
    // SAFETY: msg and everything it points to are live.
    if unsafe { libc::sendmsg(tx, &msg, 0) } < 0 {
        return Err(format!("sendmsg: {}", errno_name(errno())));
    }
    Ok(())
}

/// Sends `fds` over `tx` with SCM_RIGHTS and receives them on `rx`.
fn scm_pass(c: &mut Counts, tx: c_int, rx: c_int, fds: &[c_int], cloexec: bool) -> Res<Vec<c_int>> {
    let n = fds.len();
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    send_fds(tx, fds)?;

    let mut rbuf = vec![0u64; space.div_ceil(8)];
    let mut rbyte = [0u8];
    let mut riov = libc::iovec {
        iov_base: rbyte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: as above.
    let mut rmsg: libc::msghdr = unsafe { std::mem::zeroed() };
    rmsg.msg_iov = &mut riov;
    rmsg.msg_iovlen = 1;
    rmsg.msg_control = rbuf.as_mut_ptr().cast();
    rmsg.msg_controllen = space as _;
    let flags = if cloexec { libc::MSG_CMSG_CLOEXEC } else { 0 };
    // SAFETY: rmsg and everything it points to are live.
    if unsafe { libc::recvmsg(rx, &mut rmsg, flags) } < 0 {
        return Err(format!("recvmsg: {}", errno_name(errno())));
    }
    let mut got = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into rbuf.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(&rmsg);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_SOCKET && (*cm).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cm).cast::<c_int>();
                let cnt = ((*cm).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<c_int>();
                for i in 0..cnt {
                    got.push(*data.add(i));
                }
            }
            cm = libc::CMSG_NXTHDR(&rmsg, cm);
        }
    }
    c.opened += got.len() as u64;
    if got.len() != n {
        return Err(format!("recvmsg: got {} fds, sent {n}", got.len()));
    }
    if rmsg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err("recvmsg: control data truncated".to_string());
    }
    Ok(got)
}

/// Sends `fd` over `tx` in `m` separate SCM_RIGHTS messages (one byte and one
/// fd each), then receives all of them on `rx` with a single recvmmsg(2).
/// Over a stream socket each message still arrives on its own: a read stops
/// after a message that carries fds.
fn scm_many(c: &mut Counts, tx: c_int, rx: c_int, fd: c_int, m: usize) -> Res<Vec<c_int>> {
    let fd_size = std::mem::size_of::<c_int>();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_size as u32) } as usize;
    for i in 0..m {
        send_fds(tx, &[fd]).map_err(|e| format!("message #{i}: {e}"))?;
    }

    // One byte buffer, one iovec, one control buffer and one header per message.
    let mut bytes = vec![0u8; m];
    let mut cbufs: Vec<Vec<u64>> = (0..m).map(|_| vec![0u64; space.div_ceil(8)]).collect();
    let mut iovs: Vec<libc::iovec> = bytes
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: (b as *mut u8).cast(),
            iov_len: 1,
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(cbufs.iter_mut())
        .map(|(iov, cbuf)| {
            // SAFETY: mmsghdr is plain data.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = cbuf.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = space as _;
            h
        })
        .collect();
    // SAFETY: hdrs and every buffer it points to are live across the call.
    let r = unsafe {
        libc::recvmmsg(
            rx,
            hdrs.as_mut_ptr(),
            m as c_uint,
            libc::MSG_DONTWAIT,
            ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(format!("recvmmsg: {}", errno_name(errno())));
    }
    let mut got = Vec::new();
    let mut truncated = false;
    for h in &hdrs[..r as usize] {
        truncated |= h.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0;
        // SAFETY: walking the control messages the kernel wrote back.
        unsafe {
            let mut cm = libc::CMSG_FIRSTHDR(&h.msg_hdr);
            while !cm.is_null() {
                if (*cm).cmsg_level == libc::SOL_SOCKET && (*cm).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cm).cast::<c_int>();
                    let cnt = ((*cm).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / fd_size;
                    for i in 0..cnt {
                        got.push(ptr::read_unaligned(data.add(i)));
                    }
                }
                cm = libc::CMSG_NXTHDR(&h.msg_hdr, cm);
            }
        }
    }
    c.opened += got.len() as u64;
    if r as usize != m {
        return Err(format!("recvmmsg: got {r} messages, sent {m}"));
    }
    if got.len() != m {
        return Err(format!("recvmmsg: got {} fds, sent {m}", got.len()));
    }
    if truncated {
        return Err("recvmmsg: control data truncated".to_string());
    }
    Ok(got)
}

/// `clone(CLONE_FILES | SIGCHLD)` with a NULL stack (a fork whose child shares
/// this fd table); the child opens `n` fds on /dev/null and _exits without
/// closing them, so they stay in this process's table. Counted as opened here:
/// they are new fds of this process, though this process made no fd syscall.
fn shared_open(c: &mut Counts, n: usize) -> Res<Vec<(String, String)>> {
    let before = open_fds();
    let flags = (libc::CLONE_FILES | libc::SIGCHLD) as c_long;
    // SAFETY: without CLONE_VM the child runs on a copy of this memory, like
    // after fork(2); fdops is single-threaded here (threads are always joined),
    // and the child only makes raw syscalls before _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            0 as c_long,
            0 as c_long,
            0 as c_long,
            0 as c_long,
        )
    };
    if pid < 0 {
        return Err(format!("clone(CLONE_FILES): {}", errno_name(errno())));
    }
    if pid == 0 {
        let mut code = 0;
        for _ in 0..n {
            // SAFETY: constant NUL-terminated path.
            let r = unsafe { libc::openat(libc::AT_FDCWD, c"/dev/null".as_ptr(), libc::O_RDONLY) };
            if r < 0 {
                code = 1;
                break;
            }
        }
        // SAFETY: ends the child; the fds stay open in the shared table.
        unsafe { libc::_exit(code) };
    }
    let pid = pid as c_int;
    let mut status = 0;
    let w = loop {
        // SAFETY: waiting for our own child.
        let w = unsafe { libc::waitpid(pid, &mut status, 0) };
        if w >= 0 || errno() != libc::EINTR {
            break w;
        }
    };
    let fds: Vec<c_int> = open_fds()
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect();
    c.opened += fds.len() as u64;
    if w < 0 {
        return Err(format!("waitpid({pid}): {}", errno_name(errno())));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("child {pid} failed (wait status {status:#x})"));
    }
    if fds.len() != n {
        return Err(format!(
            "the child opened {n} fds, {} appeared here",
            fds.len()
        ));
    }
    // Not `child=`: the harness takes that for a live child to kill at the end.
    Ok(vec![kv("fds", list(&fds)), kv("sharer", pid)])
}

// ---- the command loop -------------------------------------------------------

/// A forked child served through two pipes.
struct ChildCtl {
    pid: c_int,
    cmd_w: c_int,
    ack_r: c_int,
}

struct Ctx {
    /// Where commands come from (0, or a child's command pipe).
    input: c_int,
    /// Where replies go (1, or a child's reply pipe).
    out: c_int,
    /// True in a forked child.
    is_child: bool,
    children: Vec<ChildCtl>,
    tmp_seq: u64,
}

/// Result of one command: extra reply fields, or the error message; plus the
/// counters and the thread that did the work.
struct Outcome {
    counts: Counts,
    tid: c_int,
    result: Res<Vec<(String, String)>>,
}

fn kv(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

impl Ctx {
    fn send(&self, status: &str, counts: Counts, tid: c_int, fields: &[(String, String)]) {
        let mut line = format!(
            "@fdops {status} pid={} tid={tid} nfds={} opened={} closed={}",
            getpid(),
            open_fds().len(),
            counts.opened,
            counts.closed
        );
        for (k, v) in fields {
            line.push(' ');
            line.push_str(k);
            line.push('=');
            line.push_str(v);
        }
        line.push('\n');
        if !write_all(self.out, line.as_bytes()) {
            // Nobody listens any more.
            // SAFETY: ends the process.
            unsafe { libc::_exit(3) };
        }
    }

    fn reply(&self, o: Outcome) {
        match o.result {
            Ok(fields) => self.send("ok", o.counts, o.tid, &fields),
            Err(msg) => self.send("err", o.counts, o.tid, &[kv("msg", msg)]),
        }
    }

    fn serve(&mut self) -> ! {
        loop {
            let Some(line) = read_line(self.input) else {
                // End of input: the test (or the parent) is gone.
                // SAFETY: ends the process.
                unsafe { libc::_exit(0) };
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.is_empty() {
                continue;
            }
            match words[0] {
                // Forwarded: the child's reply is the reply.
                "child" => self.cmd_child(&words[1..]),
                "exit" => {
                    let code = words.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                    self.send("ok", Counts::default(), gettid(), &[kv("exiting", code)]);
                    // SAFETY: ends the process.
                    unsafe { libc::_exit(code) };
                }
                _ => {
                    let mut counts = Counts::default();
                    let mut tid = gettid();
                    let result = self.run(words[0], &words[1..], &mut counts, &mut tid);
                    self.reply(Outcome {
                        counts,
                        tid,
                        result,
                    });
                }
            }
        }
    }

    fn run(
        &mut self,
        cmd: &str,
        args: &[&str],
        c: &mut Counts,
        tid: &mut c_int,
    ) -> Res<Vec<(String, String)>> {
        let cloexec = flag(args, "cloexec");
        let legacy = flag(args, "legacy");
        let o_cloexec = if cloexec { libc::O_CLOEXEC } else { 0 };
        let sock_cloexec = if cloexec { libc::SOCK_CLOEXEC } else { 0 };
        let one = |fd: c_int| Ok(vec![kv("fds", fd)]);
        match cmd {
            "ping" => Ok(vec![]),
            "open" => one(c.open_devnull(libc::O_RDONLY | o_cloexec)?),
            "openmany" => {
                let n = arg_int(args, 0, "N")?;
                let mut fds = Vec::new();
                for _ in 0..n {
                    fds.push(c.open_devnull(libc::O_RDONLY | o_cloexec)?);
                }
                Ok(vec![kv("fds", list(&fds))])
            }
            "open_legacy" => one(sys_open_legacy(c, c"/dev/null", libc::O_RDONLY)?),
            "open_missing" => {
                // SAFETY: constant NUL-terminated path.
                let r = unsafe {
                    libc::openat(
                        libc::AT_FDCWD,
                        c"/nonexistent-fdops-dir/missing".as_ptr(),
                        libc::O_RDONLY,
                    )
                };
                if r >= 0 {
                    c.opened += 1;
                    c.close(r)?;
                    return Err("openat of a missing path succeeded".to_string());
                }
                let e = errno();
                if e != libc::ENOENT {
                    return Err(format!(
                        "openat of a missing path: {} (want ENOENT)",
                        errno_name(e)
                    ));
                }
                Ok(vec![kv("errno", "ENOENT")])
            }
            "openat2" => one(sys_openat2(c, c"/dev/null", libc::O_RDONLY | o_cloexec)?),
            "creat" => {
                self.tmp_seq += 1;
                let path = format!("/tmp/fdops-{}-{}", getpid(), self.tmp_seq);
                let cpath = CString::new(path).unwrap();
                let fd = sys_creat(c, &cpath)?;
                // SAFETY: NUL-terminated path. The fd stays open on the unlinked file.
                unsafe { libc::unlink(cpath.as_ptr()) };
                one(fd)
            }
            "close" => {
                if args.is_empty() {
                    return Err("close: no fd".to_string());
                }
                for i in 0..args.len() {
                    c.close(arg_fd(args, i, "FD")?)?;
                }
                Ok(vec![])
            }
            "close_bad" => {
                let fd = match args.first() {
                    Some(_) => arg_fd(args, 0, "FD")?,
                    None => open_fds().last().copied().unwrap_or(2) + 7,
                };
                if is_open(fd) {
                    return Err(format!("close_bad: fd {fd} is open"));
                }
                // SAFETY: closing a free fd number, which must fail.
                if unsafe { libc::close(fd) } == 0 {
                    c.closed += 1;
                    return Err(format!("close({fd}) of a free fd succeeded"));
                }
                let e = errno();
                if e != libc::EBADF {
                    return Err(format!("close({fd}): {} (want EBADF)", errno_name(e)));
                }
                Ok(vec![kv("fd", fd), kv("errno", "EBADF")])
            }
            "churn" => {
                let n = arg_int(args, 0, "N")?;
                for _ in 0..n {
                    let fd = c.open_devnull(libc::O_RDONLY)?;
                    c.close(fd)?;
                }
                Ok(vec![])
            }
            "socket" => one(sys_socket(
                c,
                libc::AF_UNIX,
                libc::SOCK_STREAM | sock_cloexec,
            )?),
            "socketpair" => Ok(vec![kv("fds", list(&sys_socketpair(c, sock_cloexec)?))]),
            "pipe" => Ok(vec![kv("fds", list(&sys_pipe(c)?))]),
            "pipe2" => Ok(vec![kv("fds", list(&sys_pipe2(c, o_cloexec)?))]),
            "accept4" => Ok(vec![kv("fds", list(&tcp_accept(c, true, sock_cloexec)?))]),
            "accept" => Ok(vec![kv("fds", list(&tcp_accept(c, false, 0)?))]),
            "dup" => {
                let fd = arg_fd(args, 0, "FD")?;
                // SAFETY: plain syscall.
                let r = unsafe { libc::dup(fd) };
                one(c.new_fd(r as c_long, "dup")?)
            }
            "dup2" => {
                let was_open = is_open(arg_fd(args, 1, "NEW")?);
                let fd = sys_dup2(c, arg_fd(args, 0, "OLD")?, arg_fd(args, 1, "NEW")?)?;
                Ok(vec![kv("fds", fd), kv("replaced", u8::from(was_open))])
            }
            "dup3" => {
                let was_open = is_open(arg_fd(args, 1, "NEW")?);
                let fd = sys_dup3(
                    c,
                    arg_fd(args, 0, "OLD")?,
                    arg_fd(args, 1, "NEW")?,
                    o_cloexec,
                )?;
                Ok(vec![kv("fds", fd), kv("replaced", u8::from(was_open))])
            }
            "dupfd" | "dupfd_cloexec" => {
                let fcmd = if cmd == "dupfd" {
                    libc::F_DUPFD
                } else {
                    libc::F_DUPFD_CLOEXEC
                };
                one(sys_fcntl_dup(
                    c,
                    arg_fd(args, 0, "FD")?,
                    fcmd,
                    arg_fd(args, 1, "MIN")?,
                )?)
            }
            "setfd" => {
                let on = match args.get(1) {
                    Some(&"on") => true,
                    Some(&"off") => false,
                    _ => return Err("setfd FD on|off".to_string()),
                };
                sys_setfd(arg_fd(args, 0, "FD")?, on)?;
                Ok(vec![])
            }
            "fioclex" | "fionclex" => {
                sys_ioctl_clex(arg_fd(args, 0, "FD")?, cmd == "fioclex")?;
                Ok(vec![])
            }
            "close_range" => {
                let lo = arg_int(args, 0, "LO")? as c_uint;
                let hi = match args.get(1) {
                    Some(&"max") => c_uint::MAX,
                    _ => arg_int(args, 1, "HI")? as c_uint,
                };
                let in_range: Vec<c_int> = open_fds()
                    .into_iter()
                    .filter(|&fd| (fd as c_uint) >= lo && (fd as c_uint) <= hi)
                    .collect();
                let fl = if cloexec {
                    libc::CLOSE_RANGE_CLOEXEC
                } else {
                    0
                };
                // SAFETY: plain syscall.
                if unsafe { libc::syscall(libc::SYS_close_range, lo, hi, fl) } < 0 {
                    return Err(format!("close_range: {}", errno_name(errno())));
                }
                if !cloexec {
                    c.closed += in_range.len() as u64;
                }
                Ok(vec![kv("fds", list(&in_range))])
            }
            "eventfd" => one(sys_eventfd(
                c,
                legacy,
                if cloexec { libc::EFD_CLOEXEC } else { 0 },
            )?),
            "epoll" => one(sys_epoll(
                c,
                legacy,
                if cloexec { libc::EPOLL_CLOEXEC } else { 0 },
            )?),
            "timerfd" => one(sys_timerfd(c, if cloexec { libc::TFD_CLOEXEC } else { 0 })?),
            "signalfd" => one(sys_signalfd(
                c,
                legacy,
                if cloexec { libc::SFD_CLOEXEC } else { 0 },
            )?),
            "inotify" => one(sys_inotify(
                c,
                legacy,
                if cloexec { libc::IN_CLOEXEC } else { 0 },
            )?),
            "memfd" => one(sys_memfd(c, if cloexec { libc::MFD_CLOEXEC } else { 0 })?),
            "pidfd" => one(sys_pidfd(c)?),
            "scm" => {
                let sp = sys_socketpair(c, 0)?;
                let null = c.open_devnull(libc::O_RDONLY)?;
                let p = sys_pipe2(c, 0)?;
                let sent = [null, p[0], p[1]];
                let got = scm_pass(c, sp[0], sp[1], &sent, cloexec)?;
                Ok(vec![
                    kv("sp", list(&sp)),
                    kv("sent", list(&sent)),
                    kv("recv", list(&got)),
                ])
            }
            "scm_many" => {
                let m = arg_int(args, 0, "M")?;
                let sp = sys_socketpair(c, 0)?;
                let null = c.open_devnull(libc::O_RDONLY)?;
                let got = scm_many(c, sp[0], sp[1], null, m.max(0) as usize)?;
                Ok(vec![
                    kv("sp", list(&sp)),
                    kv("sent", null),
                    kv("recv", list(&got)),
                    kv("msgs", m),
                ])
            }
            "shared_open" => {
                let n = arg_int(args, 0, "N")?;
                shared_open(c, n.max(0) as usize)
            }
            "thread" => {
                let n = arg_int(args, 0, "N")?;
                let m = arg_int(args, 1, "M")?;
                let h = std::thread::spawn(move || {
                    let mut tc = Counts::default();
                    let r: Res<Vec<c_int>> = (|| {
                        let mut fds = Vec::new();
                        for _ in 0..n {
                            fds.push(tc.open_devnull(libc::O_RDONLY)?);
                        }
                        for &fd in fds.iter().take(m.max(0) as usize) {
                            tc.close(fd)?;
                        }
                        Ok(fds.into_iter().skip(m.max(0) as usize).collect::<Vec<_>>())
                    })();
                    (tc, gettid(), r)
                });
                let (tc, t, r) = h.join().map_err(|_| "thread panicked".to_string())?;
                c.opened += tc.opened;
                c.closed += tc.closed;
                *tid = t;
                Ok(vec![kv("fds", list(&r?))])
            }
            "fork" => self.cmd_fork(c),
            "exec" => self.cmd_exec(c),
            "emfile" | "emfile_mixed" => {
                let k = arg_int(args, 0, "K")?;
                let f = if cmd == "emfile" {
                    arg_int(args, 1, "F")?.max(1)
                } else {
                    1
                };
                let mixed = cmd == "emfile_mixed";
                if flag(args, "thread") {
                    let h = std::thread::spawn(move || {
                        let mut tc = Counts::default();
                        let r = emfile(&mut tc, k, f, mixed);
                        (tc, gettid(), r)
                    });
                    let (tc, t, r) = h.join().map_err(|_| "thread panicked".to_string())?;
                    c.opened += tc.opened;
                    c.closed += tc.closed;
                    *tid = t;
                    r
                } else {
                    emfile(c, k, f, mixed)
                }
            }
            _ => Err(format!("unknown command {cmd:?}")),
        }
    }

    fn cmd_fork(&mut self, c: &mut Counts) -> Res<Vec<(String, String)>> {
        let cmdp = sys_pipe2(c, libc::O_CLOEXEC)?;
        let ackp = sys_pipe2(c, libc::O_CLOEXEC)?;
        // SAFETY: fdops is single-threaded here (threads are always joined).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", errno_name(errno())));
        }
        if pid == 0 {
            // Child: keep every inherited fd except the parent's pipe ends.
            let mut cc = Counts::default();
            let r = cc.close(cmdp[1]).and_then(|_| cc.close(ackp[0]));
            let mut child = Ctx {
                input: cmdp[0],
                out: ackp[1],
                is_child: true,
                children: Vec::new(),
                tmp_seq: 0,
            };
            child.reply(Outcome {
                counts: cc,
                tid: gettid(),
                result: r.map(|_| vec![kv("forked", 1)]),
            });
            child.serve();
        }
        c.close(cmdp[0])?;
        c.close(ackp[1])?;
        let ready =
            read_line(ackp[0]).ok_or_else(|| "child died before its first reply".to_string())?;
        self.children.push(ChildCtl {
            pid,
            cmd_w: cmdp[1],
            ack_r: ackp[0],
        });
        if !ready.starts_with("@fdops ok ") {
            return Err(format!("child: {ready}"));
        }
        let mut fields = vec![kv("child", pid)];
        for w in ready.split_whitespace() {
            for key in ["opened", "closed", "nfds"] {
                if let Some(v) = w.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                    fields.push(kv(&format!("child_{key}"), v));
                }
            }
        }
        Ok(fields)
    }

    fn cmd_child(&mut self, args: &[&str]) {
        let fail = |me: &Ctx, msg: String| {
            me.reply(Outcome {
                counts: Counts::default(),
                tid: gettid(),
                result: Err(msg),
            })
        };
        let Some(pid) = args.first().and_then(|s| s.parse::<c_int>().ok()) else {
            return fail(self, "child PID CMD...".to_string());
        };
        let Some(i) = self.children.iter().position(|ch| ch.pid == pid) else {
            return fail(self, format!("no child {pid}"));
        };
        let line = format!("{}\n", args[1..].join(" "));
        let ch = &self.children[i];
        if !write_all(ch.cmd_w, line.as_bytes()) {
            return fail(self, format!("child {pid}: cannot write its command"));
        }
        let Some(reply) = read_line(ch.ack_r) else {
            return fail(self, format!("child {pid} died without replying"));
        };
        if args.get(1) == Some(&"exit") {
            // Reap it, so it is gone (not a zombie) when the reply arrives.
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            let ch = self.children.remove(i);
            let mut c = Counts::default();
            let _ = c.close(ch.cmd_w);
            let _ = c.close(ch.ack_r);
            // The parent's own pipe ends closed here are not in this reply
            // (it is the child's); note them for the test.
            let line = format!("{reply} parent_closed={}\n", c.closed);
            let _ = write_all(self.out, line.as_bytes());
            return;
        }
        let _ = write_all(self.out, format!("{reply}\n").as_bytes());
    }

    fn cmd_exec(&mut self, c: &mut Counts) -> Res<Vec<(String, String)>> {
        let mut cloexec = Vec::new();
        let mut kept = Vec::new();
        // O_CLOEXEC vs plain open.
        cloexec.push(c.open_devnull(libc::O_RDONLY | libc::O_CLOEXEC)?);
        let plain = c.open_devnull(libc::O_RDONLY)?;
        kept.push(plain);
        // SOCK_CLOEXEC vs plain socket.
        cloexec.push(sys_socket(
            c,
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
        )?);
        kept.push(sys_socket(c, libc::AF_UNIX, libc::SOCK_STREAM)?);
        // F_SETFD on / off.
        let fd = c.open_devnull(libc::O_RDONLY)?;
        sys_setfd(fd, true)?;
        cloexec.push(fd);
        let fd = c.open_devnull(libc::O_RDONLY | libc::O_CLOEXEC)?;
        sys_setfd(fd, false)?;
        kept.push(fd);
        // FIOCLEX / FIONCLEX.
        let fd = c.open_devnull(libc::O_RDONLY)?;
        sys_ioctl_clex(fd, true)?;
        cloexec.push(fd);
        let fd = c.open_devnull(libc::O_RDONLY | libc::O_CLOEXEC)?;
        sys_ioctl_clex(fd, false)?;
        kept.push(fd);
        // F_DUPFD_CLOEXEC vs F_DUPFD.
        cloexec.push(sys_fcntl_dup(c, plain, libc::F_DUPFD_CLOEXEC, 0)?);
        kept.push(sys_fcntl_dup(c, plain, libc::F_DUPFD, 0)?);
        // dup3 O_CLOEXEC vs dup2 / dup of a close-on-exec fd (the copy is not).
        let target = free_fd_from(open_fds().last().copied().unwrap_or(2) + 1);
        cloexec.push(sys_dup3(c, plain, target, libc::O_CLOEXEC)?);
        let target = free_fd_from(target + 1);
        kept.push(sys_dup2(c, cloexec[0], target)?);
        // SAFETY: plain syscall.
        let r = unsafe { libc::dup(cloexec[0]) };
        kept.push(c.new_fd(r as c_long, "dup")?);
        // pipe2(O_CLOEXEC) vs pipe.
        cloexec.extend(sys_pipe2(c, libc::O_CLOEXEC)?);
        kept.extend(sys_pipe(c)?);
        // accept4(SOCK_CLOEXEC): listener and client stay.
        let t = tcp_accept(c, true, libc::SOCK_CLOEXEC)?;
        kept.extend(&t[..2]);
        cloexec.push(t[2]);
        // Close-on-exec fds of other kinds (pidfd_open is always close-on-exec).
        cloexec.push(sys_eventfd(c, false, libc::EFD_CLOEXEC)?);
        kept.push(sys_eventfd(c, false, 0)?);
        cloexec.push(sys_memfd(c, libc::MFD_CLOEXEC)?);
        cloexec.push(sys_pidfd(c)?);
        // SCM_RIGHTS with MSG_CMSG_CLOEXEC vs without.
        let sp = sys_socketpair(c, libc::SOCK_CLOEXEC)?;
        cloexec.extend(sp);
        cloexec.extend(scm_pass(c, sp[0], sp[1], &[plain], true)?);
        kept.extend(scm_pass(c, sp[0], sp[1], &[plain], false)?);

        for &fd in &cloexec {
            if !is_cloexec(fd) {
                return Err(format!("fd {fd} should be close-on-exec"));
            }
        }
        for &fd in &kept {
            if !is_open(fd) || is_cloexec(fd) {
                return Err(format!("fd {fd} should be open and inherited"));
            }
        }
        // A forked child keeps its command pipes across the exec: the new
        // image serves them again (their numbers travel in argv).
        if self.is_child {
            sys_setfd(self.input, false)?;
            sys_setfd(self.out, false)?;
        }
        // Every close-on-exec fd now open is closed by the exec, the ones made
        // by earlier commands included.
        let closing = open_fds().into_iter().filter(|&fd| is_cloexec(fd)).count() as u64;

        let argv_s = [
            "fdops".to_string(),
            RESUME_ARG.to_string(),
            format!("opened={}", c.opened),
            format!("closed={}", c.closed + closing),
            "exec=1".to_string(),
            format!("cloexec={}", list(&cloexec)),
            format!("kept={}", list(&kept)),
        ];
        let mut argv_s = argv_s.to_vec();
        if self.is_child {
            argv_s.push(format!("{CHILD_IO_ARG}={},{}", self.input, self.out));
        }
        let argv_c: Vec<CString> = argv_s
            .iter()
            .map(|s| CString::new(s.as_str()).unwrap())
            .collect();
        let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|s| s.as_ptr()).collect();
        argv.push(ptr::null());
        unsafe extern "C" {
            static environ: *const *const libc::c_char;
        }
        // SAFETY: argv is NULL-terminated and its strings live across the
        // call; environ is the process environment.
        unsafe { libc::execve(c"/proc/self/exe".as_ptr(), argv.as_ptr(), environ) };
        Err(format!("execve: {}", errno_name(errno())))
    }
}

/// Lowers the soft fd limit to (open fds + k), opens until EMFILE, makes more
/// failing calls (f in all, or one per syscall when `mixed`), closes what it
/// opened and restores the limit.
fn emfile(c: &mut Counts, k: c_long, f: c_long, mixed: bool) -> Res<Vec<(String, String)>> {
    let saved = nofile_limit();
    let nopen = open_fds().len() as u64;
    let limit = nopen + k.max(0) as u64;
    let lowered = libc::rlimit {
        rlim_cur: limit,
        rlim_max: saved.rlim_max,
    };
    // SAFETY: valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) } < 0 {
        return Err(format!("setrlimit: {}", errno_name(errno())));
    }
    let mut extra = Vec::new();
    let mut failed = 0u64;
    let mut syscalls: Vec<&str> = Vec::new();
    let mut result = Ok(());
    // Open until the first EMFILE.
    loop {
        // SAFETY: constant NUL-terminated path.
        let r = unsafe { libc::openat(libc::AT_FDCWD, c"/dev/null".as_ptr(), libc::O_RDONLY) };
        if r >= 0 {
            c.opened += 1;
            extra.push(r);
            if extra.len() > 100_000 {
                result = Err("never hit EMFILE".to_string());
                break;
            }
            continue;
        }
        let e = errno();
        if e != libc::EMFILE {
            result = Err(format!("openat: {} (want EMFILE)", errno_name(e)));
        } else {
            failed += 1;
            syscalls.push("openat");
        }
        break;
    }
    if result.is_ok() {
        if mixed {
            result = emfile_others(&mut failed, &mut syscalls);
        } else {
            for _ in 1..f {
                // SAFETY: constant NUL-terminated path.
                let r =
                    unsafe { libc::openat(libc::AT_FDCWD, c"/dev/null".as_ptr(), libc::O_RDONLY) };
                if r >= 0 {
                    c.opened += 1;
                    extra.push(r);
                    result = Err("openat succeeded past the limit".to_string());
                    break;
                }
                let e = errno();
                if e != libc::EMFILE {
                    result = Err(format!("openat: {} (want EMFILE)", errno_name(e)));
                    break;
                }
                failed += 1;
                syscalls.push("openat");
            }
        }
    }
    for fd in extra.iter().copied() {
        c.close(fd)?;
    }
    // SAFETY: valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) } < 0 {
        return Err(format!("setrlimit (restore): {}", errno_name(errno())));
    }
    result?;
    Ok(vec![
        kv("limit", limit),
        kv("filled", extra.len()),
        kv("failed", failed),
        kv("syscalls", syscalls.join(",")),
    ])
}

/// At the fd limit: one call of each other fd-creating syscall; each must
/// fail with EMFILE.
fn emfile_others(failed: &mut u64, syscalls: &mut Vec<&'static str>) -> Res<()> {
    let mask: u64 = 1 << (libc::SIGUSR1 - 1);
    let how = OpenHow {
        flags: libc::O_RDONLY as u64,
        mode: 0,
        resolve: 0,
    };
    type Call<'a> = (&'static str, Box<dyn Fn() -> c_long + 'a>);
    // SAFETY (all closures): every pointer passed is live across its call.
    let calls: Vec<Call> = vec![
        (
            "openat2",
            Box::new(|| unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    libc::AT_FDCWD,
                    c"/dev/null".as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            }),
        ),
        (
            "socket",
            Box::new(|| unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0)
            }),
        ),
        (
            "socketpair",
            Box::new(|| {
                let mut pair = [-1 as c_int; 2];
                unsafe {
                    libc::syscall(
                        libc::SYS_socketpair,
                        libc::AF_UNIX,
                        libc::SOCK_STREAM,
                        0,
                        pair.as_mut_ptr(),
                    )
                }
            }),
        ),
        (
            "pipe2",
            Box::new(|| {
                let mut pair = [-1 as c_int; 2];
                unsafe { libc::syscall(libc::SYS_pipe2, pair.as_mut_ptr(), 0) }
            }),
        ),
        (
            "dup",
            Box::new(|| unsafe { libc::syscall(libc::SYS_dup, 0) }),
        ),
        (
            "fcntl",
            Box::new(|| unsafe { libc::syscall(libc::SYS_fcntl, 0, libc::F_DUPFD, 0) }),
        ),
        (
            "eventfd2",
            Box::new(|| unsafe { libc::syscall(libc::SYS_eventfd2, 0, 0) }),
        ),
        (
            "epoll_create1",
            Box::new(|| unsafe { libc::syscall(libc::SYS_epoll_create1, 0) }),
        ),
        (
            "timerfd_create",
            Box::new(|| unsafe {
                libc::syscall(libc::SYS_timerfd_create, libc::CLOCK_MONOTONIC, 0)
            }),
        ),
        (
            "signalfd4",
            Box::new(|| unsafe {
                libc::syscall(libc::SYS_signalfd4, -1, &mask as *const u64, 8, 0)
            }),
        ),
        (
            "inotify_init1",
            Box::new(|| unsafe { libc::syscall(libc::SYS_inotify_init1, 0) }),
        ),
        (
            "memfd_create",
            Box::new(|| unsafe { libc::syscall(libc::SYS_memfd_create, c"fdops".as_ptr(), 0) }),
        ),
        (
            "pidfd_open",
            Box::new(|| unsafe { libc::syscall(libc::SYS_pidfd_open, getpid(), 0) }),
        ),
    ];
    for (name, call) in calls {
        let r = call();
        if r >= 0 {
            // Nothing may be left open: this is an error path anyway.
            return Err(format!("{name} succeeded past the limit"));
        }
        let e = errno();
        if e != libc::EMFILE {
            return Err(format!("{name}: {} (want EMFILE)", errno_name(e)));
        }
        *failed += 1;
        syscalls.push(name);
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut ctx = Ctx {
        input: 0,
        out: 1,
        is_child: false,
        children: Vec::new(),
        tmp_seq: 0,
    };
    if args.get(1).map(String::as_str) == Some(RESUME_ARG) {
        // Back from `exec`: the reply of the exec command.
        let mut counts = Counts::default();
        let mut fields = Vec::new();
        for a in &args[2..] {
            let (k, v) = a.split_once('=').unwrap_or((a.as_str(), ""));
            match k {
                "opened" => counts.opened = v.parse().unwrap_or(0),
                "closed" => counts.closed = v.parse().unwrap_or(0),
                CHILD_IO_ARG => {
                    let io = parse_list(v);
                    if let [input, out] = io[..] {
                        ctx.input = input;
                        ctx.out = out;
                        ctx.is_child = true;
                    }
                }
                _ => fields.push(kv(k, v)),
            }
        }
        // Check what the exec did to the fds, so the reply can be trusted.
        let mut bad = Vec::new();
        for (k, v) in &fields {
            for fd in parse_list(v) {
                let open = is_open(fd);
                if (k == "cloexec" && open) || (k == "kept" && !open) {
                    bad.push(format!("{k}:{fd}"));
                }
            }
        }
        if bad.is_empty() {
            ctx.send("ok", counts, gettid(), &fields);
        } else {
            ctx.send(
                "err",
                counts,
                gettid(),
                &[kv("msg", format!("after exec: {}", bad.join(",")))],
            );
        }
    } else {
        ctx.send("ready", Counts::default(), gettid(), &[]);
    }
    ctx.serve();
}
