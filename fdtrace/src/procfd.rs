//! What /proc says about a process: the ground truth fdtrace seeds from and
//! checks its kernel counts against.
use std::{fs, io, os::unix::fs::MetadataExt as _};

use fdtrace_common::FdKind;
use procfs::process::{FDTarget, Process};

/// One open fd as /proc shows it.
#[derive(Clone, Copy, Debug)]
pub struct ProcFd {
    pub fd: u32,
    pub kind: FdKind,
    pub cloexec: bool,
}

/// Number of open fds. Since Linux 6.2 `stat(/proc/PID/fd)` reports it in
/// st_size without walking the table; older kernels report 0, then the
/// directory is counted.
/// https://github.com/torvalds/linux/blob/v6.18/fs/proc/fd.c (proc_fd_getattr)
pub fn fd_count(pid: u32) -> io::Result<u64> {
    let size = fs::metadata(format!("/proc/{pid}/fd"))?.size();
    if size > 0 {
        return Ok(size);
    }
    let n = Process::new(pid as i32)
        .and_then(|p| p.fd_count())
        .map_err(io::Error::other)?;
    Ok(n as u64)
}

/// Every open fd with its kind and close-on-exec bit.
pub fn list_fds(pid: u32) -> io::Result<Vec<ProcFd>> {
    let proc = Process::new(pid as i32).map_err(io::Error::other)?;
    let mut out = Vec::new();
    for info in proc.fd().map_err(io::Error::other)? {
        // An fd closed while we list it is simply not there.
        let Ok(info) = info else { continue };
        let Ok(fd) = u32::try_from(info.fd) else {
            continue;
        };
        let Some(cloexec) = fd_cloexec(pid, fd) else {
            continue;
        };
        out.push(ProcFd {
            fd,
            kind: kind_of(&info.target),
            cloexec,
        });
    }
    Ok(out)
}

/// Kind of one open fd; None when it is gone.
pub fn kind_of_fd(pid: u32, fd: u32) -> Option<FdKind> {
    let info = Process::new(pid as i32).ok()?.fd_from_fd(fd as i32).ok()?;
    Some(kind_of(&info.target))
}

/// O_CLOEXEC from the octal `flags:` line of /proc/PID/fdinfo/FD; None when
/// the fd is gone.
fn fd_cloexec(pid: u32, fd: u32) -> Option<bool> {
    const O_CLOEXEC: u32 = 0o2_000_000;
    let text = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())?;
    Some(flags & O_CLOEXEC != 0)
}

/// Kind from the /proc/PID/fd link target, named as the kernel names its
/// anonymous inodes (fs/anon_inodes.c callers).
pub fn kind_of(target: &FDTarget) -> FdKind {
    match target {
        FDTarget::Path(p) => {
            if p.starts_with("/memfd:") {
                FdKind::Memfd
            } else if p.starts_with("/dev/mqueue") {
                FdKind::Mqueue
            } else {
                FdKind::File
            }
        }
        FDTarget::Socket(_) | FDTarget::Net(_) => FdKind::Socket,
        FDTarget::Pipe(_) => FdKind::Pipe,
        FDTarget::MemFD(_) => FdKind::Memfd,
        FDTarget::AnonInode(name) => match name.trim_matches(|c| c == '[' || c == ']') {
            "eventfd" => FdKind::Eventfd,
            "eventpoll" => FdKind::Epoll,
            "timerfd" => FdKind::Timerfd,
            "signalfd" => FdKind::Signalfd,
            "inotify" => FdKind::Inotify,
            "fanotify" => FdKind::Fanotify,
            "userfaultfd" => FdKind::Userfaultfd,
            "perf_event" => FdKind::PerfEvent,
            "io_uring" => FdKind::IoUring,
            "pidfd" => FdKind::Pidfd,
            "fscontext" => FdKind::Mount,
            n if n.starts_with("bpf") => FdKind::Bpf,
            n if n.starts_with("memfd") => FdKind::Memfd,
            _ => FdKind::Unknown,
        },
        // pidfds on pidfs (6.9+) show as "pidfd:[N]".
        FDTarget::Other(name, _) if name == "pidfd" => FdKind::Pidfd,
        FDTarget::Other(..) | FDTarget::Unknown(..) => FdKind::Unknown,
    }
}

/// Identity and limits of a process, read once per report.
#[derive(Clone, Debug, Default)]
pub struct ProcInfo {
    pub comm: String,
    pub ppid: Option<u32>,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
}

/// None when the process is gone.
pub fn info(pid: u32) -> Option<ProcInfo> {
    use procfs::process::LimitValue;
    let proc = Process::new(pid as i32).ok()?;
    let stat = proc.stat().ok()?;
    let limit = |v: LimitValue| match v {
        LimitValue::Value(n) => Some(n),
        LimitValue::Unlimited => None,
    };
    let (soft_limit, hard_limit) = match proc.limits() {
        Ok(l) => (
            limit(l.max_open_files.soft_limit),
            limit(l.max_open_files.hard_limit),
        ),
        Err(_) => (None, None),
    };
    Some(ProcInfo {
        comm: stat.comm,
        ppid: u32::try_from(stat.ppid).ok(),
        soft_limit,
        hard_limit,
    })
}

pub fn exists(pid: u32) -> bool {
    // A thread id also has a /proc entry; fdtrace traces thread groups.
    Process::new(pid as i32)
        .and_then(|p| p.status())
        .is_ok_and(|s| s.tgid == pid as i32)
}
