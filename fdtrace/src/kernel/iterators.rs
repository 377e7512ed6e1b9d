//! Walks of one process's fd table by the kernel (iter/task_file programs),
//! each in one read: every open fd with its kind and close-on-exec bit,
//! instead of a readlink and an fdinfo read per fd from /proc (`fdtrace_seed`,
//! which at attach also writes and counts the fds' entries in the kernel,
//! and `fdtrace_names`, which only names them); and the kernel map's entries
//! of the open fds (`fdtrace_entries`).
//! https://docs.kernel.org/bpf/bpf_iterators.html
use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Read as _},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    str::FromStr as _,
};

use fdtrace_common::{EntryRecord, SEED_CLOEXEC, SEED_NO_CLOEXEC, SEED_NO_PATH, SeedRecord};
use procfs::process::FDTarget;

use super::map_batch::{self, LiveFd};
use crate::procfd::{self, ProcDir, ProcFd};

/// bpf(2) commands and the iterator attach type (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// `union bpf_attr` for BPF_LINK_CREATE of an iterator.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// `union bpf_iter_link_info`, task member: a non-zero pid restricts the
/// walk to that process (Linux 6.1+).
#[repr(C)]
#[derive(Default)]
struct IterLinkInfo {
    tid: u32,
    pid: u32,
    pid_fd: u32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_ITER_CREATE.
#[repr(C)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// Every open fd of `pid`. An fd whose link or close-on-exec bit the kernel
/// could not read is looked up in /proc instead (and kept, unnamed and not
/// close-on-exec, when /proc cannot say either).
pub fn list(prog: BorrowedFd<'_>, pid: u32) -> io::Result<Vec<ProcFd>> {
    Ok(parse(&walk(prog, pid)?)?.remove(&pid).unwrap_or_default())
}

/// [`list`] for every process at once, in one walk of every task's table
/// (node mode's start): each traced process's open fds, by tgid. The seed
/// program writes records for traced processes only.
pub fn list_all(prog: BorrowedFd<'_>) -> io::Result<BTreeMap<u32, Vec<ProcFd>>> {
    parse(&walk(prog, ALL_TASKS)?)
}

/// `bpf_iter_link_info.task.pid` 0: every task.
const ALL_TASKS: u32 = 0;

/// The kernel map's entries of the open fds of `pid`.
pub fn entries(prog: BorrowedFd<'_>, pid: u32) -> io::Result<Vec<LiveFd>> {
    parse_entries(&walk(prog, pid)?)
}

/// What iterator program `prog` writes for the fd table of `pid` (of every
/// task: [`ALL_TASKS`]).
fn walk(prog: BorrowedFd<'_>, pid: u32) -> io::Result<Vec<u8>> {
    let mut info = IterLinkInfo {
        pid,
        ..Default::default()
    };
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TRACE_ITER,
        iter_info: &raw mut info as u64,
        iter_info_len: size_of::<IterLinkInfo>() as u32,
        ..Default::default()
    };
    // SAFETY: attr and the link info it points at outlive the call.
    let link = unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("creating the fd-table iterator (Linux 6.1 or newer): {e}"),
        )
    })?;
    let mut attr = IterCreateAttr {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    // SAFETY: plain attr, no pointers.
    let iter = unsafe { bpf_fd(BPF_ITER_CREATE, &mut attr) }?;
    let mut data = Vec::new();
    File::from(iter).read_to_end(&mut data)?;
    Ok(data)
}

fn parse_entries(data: &[u8]) -> io::Result<Vec<LiveFd>> {
    const LEN: usize = size_of::<EntryRecord>();
    if !data.len().is_multiple_of(LEN) {
        return Err(io::Error::other("entries iterator: truncated record"));
    }
    Ok(data
        .chunks_exact(LEN)
        .map(|c| {
            // SAFETY: c holds LEN bytes the kernel wrote as an EntryRecord
            // (plain integers, any bit pattern valid); read unaligned.
            let r: EntryRecord = unsafe { c.as_ptr().cast::<EntryRecord>().read_unaligned() };
            LiveFd {
                fd: r.fd,
                info: r.info,
            }
        })
        .collect())
}

fn parse(data: &[u8]) -> io::Result<BTreeMap<u32, Vec<ProcFd>>> {
    const HDR: usize = size_of::<SeedRecord>();
    let truncated = || io::Error::other("seed iterator: truncated record");
    let mut out: BTreeMap<u32, Vec<ProcFd>> = BTreeMap::new();
    let mut dir = None;
    let mut rest = data;
    while !rest.is_empty() {
        let hdr = rest.get(..HDR).ok_or_else(truncated)?;
        let word = |i: usize| u32::from_ne_bytes(hdr[4 * i..4 * i + 4].try_into().unwrap());
        let (fd, flags, len, pid) = (word(0), word(1), word(2) as usize, word(3));
        let text = rest.get(HDR..HDR + len).ok_or_else(truncated)?;
        rest = &rest[HDR + len..];
        // /proc is read only for what the kernel walk could not.
        // An fd the walk saw is in the table even when /proc cannot say
        // more about it (closed since, or not readable by fdtrace: another
        // user's process without CAP_DAC_READ_SEARCH, or a process whose
        // links deny even root): it is listed, unnamed (kind unknown) and
        // not close-on-exec; the kernel marked the process inexact, and the
        // drift check settles a close.
        let target = if flags & SEED_NO_PATH != 0 {
            proc_dir(&mut dir, pid).ok().and_then(|d| d.target(fd))
        } else {
            let text = text.strip_suffix(&[0]).unwrap_or(text);
            FDTarget::from_str(&String::from_utf8_lossy(text)).ok()
        };
        let cloexec = if flags & SEED_NO_CLOEXEC != 0 {
            proc_dir(&mut dir, pid)
                .ok()
                .and_then(|d| d.cloexec(fd))
                .unwrap_or(false)
        } else {
            flags & SEED_CLOEXEC != 0
        };
        let kind = target
            .as_ref()
            .map_or(fdtrace_common::FdKind::Unknown, procfd::kind_of);
        out.entry(pid).or_default().push(ProcFd {
            fd,
            kind,
            cloexec,
            target,
        });
    }
    Ok(out)
}

/// `/proc/PID/fd` of `pid`, opened once for a run of its records.
fn proc_dir(dir: &mut Option<(u32, ProcDir)>, pid: u32) -> io::Result<&ProcDir> {
    if dir.as_ref().is_none_or(|(p, _)| *p != pid) {
        *dir = Some((pid, ProcDir::open(pid)?));
    }
    Ok(&dir.as_ref().expect("opened above").1)
}

/// bpf(cmd, attr) for the commands that return a new fd.
///
/// # Safety
/// As [`map_batch::bpf`].
unsafe fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: per the contract above.
    let fd = unsafe { map_batch::bpf(cmd, attr) }?;
    // SAFETY: the kernel returned a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fdtrace_common::FdKind;

    fn record(fd: u32, flags: u32, text: &str) -> Vec<u8> {
        record_of(0, fd, flags, text)
    }

    fn record_of(pid: u32, fd: u32, flags: u32, text: &str) -> Vec<u8> {
        let mut text = text.as_bytes().to_vec();
        text.push(0);
        let mut out = Vec::new();
        for w in [fd, flags, text.len() as u32, pid] {
            out.extend(w.to_ne_bytes());
        }
        out.extend(text);
        out
    }

    #[test]
    fn records_as_the_iterator_writes_them() {
        let mut data = record(0, 0, "/dev/pts/3");
        data.extend(record(5, SEED_CLOEXEC, "socket:[4242]"));
        data.extend(record(9, SEED_CLOEXEC, "anon_inode:[eventfd]"));
        data.extend(record(12, 0, "pipe:[77]"));
        let fds = &parse(&data).expect("parses")[&0];
        let got: Vec<(u32, FdKind, bool)> = fds.iter().map(|f| (f.fd, f.kind, f.cloexec)).collect();
        assert_eq!(
            got,
            [
                (0, FdKind::File, false),
                (5, FdKind::Socket, true),
                (9, FdKind::Eventfd, true),
                (12, FdKind::Pipe, false),
            ]
        );
    }

    #[test]
    fn entries_as_the_iterator_writes_them() {
        let rec = |fd: u32, kind: FdKind, created_ns: u64| {
            let r = EntryRecord {
                fd,
                _pad: 0,
                info: fdtrace_common::FdInfo {
                    created_ns,
                    site: 7,
                    syscall: 257,
                    kind: kind as u8,
                    flags: fdtrace_common::FD_OPEN,
                    detail: 0,
                },
            };
            // SAFETY: EntryRecord is plain integers without padding.
            unsafe {
                std::slice::from_raw_parts((&raw const r).cast::<u8>(), size_of::<EntryRecord>())
            }
            .to_vec()
        };
        let mut data = rec(3, FdKind::File, 11);
        data.extend(rec(40, FdKind::Socket, 22));
        let got: Vec<(u32, u8, u64)> = parse_entries(&data)
            .expect("parses")
            .iter()
            .map(|f| (f.fd, f.info.kind, f.info.created_ns))
            .collect();
        assert_eq!(
            got,
            [(3, FdKind::File as u8, 11), (40, FdKind::Socket as u8, 22)]
        );
        assert!(parse_entries(&data[..data.len() - 1]).is_err());
    }

    /// The kernel could read neither the link nor the close-on-exec bit,
    /// and /proc has no such process: the fd is still listed.
    #[test]
    fn an_fd_nothing_can_name_is_kept() {
        let data = record_of(u32::MAX, 7, SEED_NO_PATH | SEED_NO_CLOEXEC, "");
        let fds = &parse(&data).expect("parses")[&u32::MAX];
        let got: Vec<(u32, FdKind, bool, bool)> = fds
            .iter()
            .map(|f| (f.fd, f.kind, f.cloexec, f.target.is_none()))
            .collect();
        assert_eq!(got, [(7, FdKind::Unknown, false, true)]);
    }

    #[test]
    fn a_cut_record_is_an_error() {
        let data = record(3, 0, "/tmp/x");
        assert!(parse(&data[..data.len() - 2]).is_err());
        assert!(parse(&data[..10]).is_err());
    }

    /// A walk of every task interleaves processes: each record says whose.
    #[test]
    fn records_of_several_processes_by_tgid() {
        let mut data = record_of(10, 0, 0, "/dev/null");
        data.extend(record_of(10, 4, 0, "pipe:[1]"));
        data.extend(record_of(20, 3, SEED_CLOEXEC, "socket:[2]"));
        let by_pid = parse(&data).expect("parses");
        let got: Vec<(u32, Vec<u32>)> = by_pid
            .iter()
            .map(|(pid, fds)| (*pid, fds.iter().map(|f| f.fd).collect()))
            .collect();
        assert_eq!(got, [(10, vec![0, 4]), (20, vec![3])]);
    }
}
