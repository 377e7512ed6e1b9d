//! What /proc says about a process: the ground truth fdtrace checks its
//! kernel counts against, and names fds from.
use std::{
    ffi::{CStr, CString},
    fs::{self, File},
    io::{self, Read as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    str::FromStr as _,
};

use fdtrace_common::{FdKind, kind::classify};
use procfs::process::{FDTarget, Process};

/// One open fd of a process: what the kernel walk (or /proc) says it is.
#[derive(Clone, Debug)]
pub struct ProcFd {
    pub fd: u32,
    pub kind: FdKind,
    pub cloexec: bool,
    /// What the fd points at; None when it could not be named.
    pub target: Option<FDTarget>,
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

/// The fd numbers /proc/PID/fd lists. Listing needs no access to the links:
/// a process whose links deny even root (here the sandbox's init) still
/// shows which fds it holds.
pub fn fd_numbers(pid: u32) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Some(fd) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            out.push(fd);
        }
    }
    Ok(out)
}

/// /proc/PID/fd, opened once: links are read relative to it, since a path
/// lookup per fd would dominate when a report labels many fds.
pub struct ProcDir {
    pid: u32,
    fd_dir: File,
}

impl ProcDir {
    pub fn open(pid: u32) -> io::Result<ProcDir> {
        Ok(ProcDir {
            pid,
            fd_dir: File::open(format!("/proc/{pid}/fd"))?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What `fd` points at; None when it is gone.
    pub fn target(&self, fd: u32) -> Option<FDTarget> {
        let name = CString::new(fd.to_string()).ok()?;
        let link = read_link_at(&self.fd_dir, &name)?;
        FDTarget::from_str(&link).ok()
    }

    /// The fd's close-on-exec bit from fdinfo; None when it is gone.
    pub fn cloexec(&self, fd: u32) -> Option<bool> {
        fd_cloexec(&format!("/proc/{}/fdinfo/{fd}", self.pid))
    }
}

fn read_link_at(dir: &File, name: &CStr) -> Option<String> {
    let mut buf = [0u8; 4096];
    // SAFETY: buf is writable for its length; name is NUL-terminated.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    // The traced process names its files: nothing of the name is lost.
    Some(crate::escape::lossless(&buf[..n]))
}

/// O_CLOEXEC from the octal `flags:` line of an fdinfo file; None when the
/// fd is gone.
fn fd_cloexec(path: &str) -> Option<bool> {
    // The flags line comes second; epoll and inotify fdinfo go on for long.
    let mut file = File::open(path).ok()?;
    let mut buf = [0u8; 512];
    let n = file.read(&mut buf).ok()?;
    parse_cloexec(&buf[..n])
}

/// O_CLOEXEC from the start of an fdinfo text; None without a valid
/// `flags:` line. An fdinfo line can carry text the process chose (an
/// inotify path, an eventfd's name), so only the flags line is trusted.
/// https://github.com/torvalds/linux/blob/v6.18/fs/proc/fd.c (seq_show)
fn parse_cloexec(text: &[u8]) -> Option<bool> {
    const O_CLOEXEC: u32 = 0o2_000_000;
    let flags = text
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"flags:"))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())?;
    Some(flags & O_CLOEXEC != 0)
}

/// Kind from the /proc/PID/fd link target: fdtrace-common's one rule over
/// the link text, as the kernel wrote it (procfs's parse, written back).
pub fn kind_of(target: &FDTarget) -> FdKind {
    let text = match target {
        FDTarget::Path(p) => return classify(p.as_os_str().as_encoded_bytes()),
        FDTarget::Socket(n) => format!("socket:[{n}]"),
        FDTarget::Net(n) => format!("net:[{n}]"),
        FDTarget::Pipe(n) => format!("pipe:[{n}]"),
        FDTarget::AnonInode(name) => format!("anon_inode:{name}"),
        FDTarget::MemFD(name) => format!("/memfd:{name}"),
        FDTarget::Other(kind, n) => format!("{kind}:[{n}]"),
        FDTarget::Unknown(kind, rest) => format!("{kind}:{rest}"),
    };
    classify(text.as_bytes())
}

/// Whether `pid` belongs to fdtrace's own user (effective uid), who may read
/// its /proc/PID/fd without CAP_DAC_READ_SEARCH. A process that is gone
/// counts as readable: there is nothing to warn about.
pub fn readable_by_owner(pid: u32) -> bool {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    fs::metadata(format!("/proc/{pid}")).map_or(true, |m| m.uid() == euid)
}

pub fn exists(pid: u32) -> bool {
    // A thread id also has a /proc entry; fdtrace traces thread groups.
    // Read as bytes: the Name line is the process's own comm, which need
    // not be UTF-8 (a parser that wants text calls such a process absent).
    std::fs::read(format!("/proc/{pid}/status")).is_ok_and(|s| tgid(&s) == Some(pid))
}

/// The `Tgid:` of a /proc/PID/status text. The kernel escapes `\n` and `\\`
/// in the Name line (`proc_task_name` in
/// <https://github.com/torvalds/linux/blob/v6.12/fs/proc/array.c>), so a comm
/// cannot make a line of its own.
fn tgid(status: &[u8]) -> Option<u32> {
    status
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"Tgid:"))
        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn tgid_of_a_status_whose_name_is_not_utf8() {
        let status = b"Name:\tlk\"} 1\\n\\\\\xff\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nPid:\t4243\n";
        assert_eq!(tgid(status), Some(4242));
        assert_eq!(tgid(b"Name:\tx\nPid:\t1\n"), None);
        assert_eq!(tgid(b"Tgid:\tnope\n"), None);
        assert!(exists(std::process::id()));
    }

    #[test]
    fn cloexec_from_the_flags_line() {
        let text = b"pos:\t0\nflags:\t02100002\nmnt_id:\t25\nino:\t7\n";
        assert_eq!(parse_cloexec(text), Some(true));
        assert_eq!(parse_cloexec(b"pos:\t0\nflags:\t0100002\n"), Some(false));
        assert_eq!(parse_cloexec(b"pos:\t0\nflags:\tzz\n"), None);
        assert_eq!(parse_cloexec(b"pos:\t0\n"), None);
    }

    proptest! {
        #[test]
        fn any_fdinfo_text_parses_or_is_refused(t in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_cloexec(&t);
        }

        /// Link texts as /proc gives them (lossless text of any bytes):
        /// procfs parses each, and each gets a kind, without a panic.
        #[test]
        fn any_link_text_gets_a_kind(bytes in proptest::collection::vec(any::<u8>(), 1..200)) {
            if let Ok(t) = FDTarget::from_str(&crate::escape::lossless(&bytes)) {
                let _ = kind_of(&t);
            }
        }
    }
}
