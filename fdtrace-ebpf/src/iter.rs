//! The task_file iterators over one process's fd table, walked by the kernel: the
//! seed and names iterators (every open fd, named; the seed iterator also
//! writes and counts its entry, at attach) and the entries iterator (the
//! kernel map's entry of every open fd).
//!
//! Attaching to a process that already holds fds needs each fd's kind and
//! close-on-exec bit. Read from /proc, that is a readlink and an fdinfo
//! open/read/close per fd (about 20 us each); these `iter/task_file`
//! programs write them all in one read of an iterator fd. User space creates the
//! iterator for one process (bpf_iter_link_info.task.pid), so the kernel
//! visits only that process's table, or, at a node-mode start, for every
//! task at once (one walk of the host, each record naming its tgid).
//! https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/task_iter.c (task_file_seq_show)
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{path, seq_file},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_d_path, bpf_seq_write},
    },
    macros::map,
    maps::PerCpuArray,
};
use fdtrace_common::{
    EntryRecord, NO_FIELD, SEED_CLOEXEC, SEED_NO_CLOEXEC, SEED_NO_PATH, SEED_PATH_MAX, SeedRecord,
    kind::classify,
};

use crate::{
    global,
    table::{self, inexact, proc_of},
};

/// Offsets in kernel structures this kernel's BTF gives (set by user space
/// before load; Rust has no CO-RE relocations): `file.f_path`,
/// `task_struct.files`, `files_struct.fdt`, `fdtable.close_on_exec`,
/// `fdtable.fd`.
#[unsafe(no_mangle)]
static FILE_F_PATH_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
pub static TASK_FILES_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static FILES_FDT_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static FDT_CLOEXEC_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static FDT_FD_OFF: u32 = NO_FIELD;
/// `fdtable.open_fds` and `fdtable.max_fds`: the bitmaps a lazy fork reads.
#[unsafe(no_mangle)]
static FDT_OPEN_FDS_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static FDT_MAX_FDS_OFF: u32 = NO_FIELD;
/// `task_struct.pid` and `task_struct.tgid`.
#[unsafe(no_mangle)]
pub static TASK_PID_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
pub static TASK_TGID_OFF: u32 = NO_FIELD;

const HDR: usize = core::mem::size_of::<SeedRecord>();

/// A record being built: header then link text (too large for the BPF stack).
#[repr(C)]
pub struct SeedBuf {
    hdr: SeedRecord,
    path: [u8; SEED_PATH_MAX],
}

#[map]
static SEED_SCRATCH: PerCpuArray<SeedBuf> = PerCpuArray::with_max_entries(1, 0);

/// struct bpf_iter_meta (include/linux/bpf.h).
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// struct bpf_iter__task_file (kernel/bpf/task_iter.c). `task` and `file`
/// are NULL on the last call, which ends the walk.
#[repr(C)]
pub struct TaskFileCtx {
    meta: *const IterMeta,
    task: *const u8,
    fd: u32,
    _pad: u32,
    file: *const u8,
}

/// The seed and names walks (`seed`: at attach, also write and count each
/// fd's entry; see table::seed).
#[inline(always)]
pub fn walk(ctx: &TaskFileCtx, seed: bool) {
    let _ = try_walk(ctx, seed);
}

#[inline(always)]
fn try_walk(ctx: &TaskFileCtx, seed: bool) -> Option<()> {
    let (task, file, fd) = (ctx.task, ctx.file, ctx.fd);
    if task.is_null() || file.is_null() {
        return None;
    }
    let tgid = leader_tgid(task)?;
    // A walk of every task's table at a node-mode start visits untraced
    // processes (kernel threads, fdtrace): nothing to seed or name.
    let traced = if seed { Some(proc_of(tgid)?) } else { None };
    let buf = SEED_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: buf is this CPU's scratch value; file is a BTF pointer the
    // verifier checks f_path against (the offset is a constant of .rodata).
    unsafe {
        let on_exec = cloexec(task, fd);
        let mut flags = match on_exec {
            Some(true) => SEED_CLOEXEC,
            Some(false) => 0,
            None => SEED_NO_CLOEXEC,
        };
        let f_path = file.add(global(&FILE_F_PATH_OFF) as usize) as *mut path;
        // The name /proc/PID/fd shows: d_path, with the dname of sockets,
        // pipes and anonymous inodes ("socket:[123]", "anon_inode:[eventfd]").
        let n = bpf_d_path(f_path, (&raw mut (*buf).path).cast(), SEED_PATH_MAX as u32);
        let len = if n > 0 && n as usize <= SEED_PATH_MAX {
            n as usize
        } else {
            flags |= SEED_NO_PATH;
            0
        };
        if seed && let Some(p) = traced {
            // The whole buffer, a constant length: the text ends at its NUL.
            let kind = if len == 0 {
                fdtrace_common::FdKind::Unknown
            } else {
                classify(&(*buf).path)
            };
            if on_exec.is_none() {
                // The bit is unknown: a resync at the next report.
                inexact(p);
            }
            table::seed(p, tgid, fd, kind as u8, on_exec == Some(true), file as u64);
        }
        (*buf).hdr = SeedRecord {
            fd,
            flags,
            path_len: len as u32,
            tgid,
        };
        let seq = (*ctx.meta).seq;
        bpf_seq_write(seq, buf as *const c_void, (HDR + len) as u32);
    }
    Some(())
}

/// The tgid of `task` if it is its thread group's leader. The walk visits
/// every thread with a table of its own (after unshare(CLONE_FILES)); the
/// kernel skips only those sharing the leader's. /proc/PID/fd, the truth
/// fdtrace keeps to, is the leader's table.
/// https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/task_iter.c (task_seq_get_next)
fn leader_tgid(task: *const u8) -> Option<u32> {
    let read = |off: &u32| -> Option<u32> {
        // SAFETY: the helper checks the address.
        unsafe { bpf_probe_read_kernel(task.add(global(off) as usize) as *const u32) }.ok()
    };
    let tgid = read(&TASK_TGID_OFF)?;
    (read(&TASK_PID_OFF)? == tgid).then_some(tgid)
}

#[inline(always)]
pub fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: the helper checks the address.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok()
}

/// `task->files->fdt`.
#[inline(always)]
fn fdtable(task: u64) -> Option<u64> {
    let off = |g: &u32| u64::from(global(g));
    let files = read_u64(task + off(&TASK_FILES_OFF))?;
    read_u64(files + off(&FILES_FDT_OFF))
}

/// `task`'s fd table bitmaps, `open_fds` and `close_on_exec` (addresses of
/// u64 words, one bit per fd), and its size `max_fds`.
/// https://github.com/torvalds/linux/blob/v6.18/include/linux/fdtable.h (struct fdtable)
pub fn fd_bitmaps(task: u64) -> Option<(u64, u64, u32)> {
    let fdt = fdtable(task)?;
    let open = read_u64(fdt + u64::from(global(&FDT_OPEN_FDS_OFF)))?;
    let cloexec = read_u64(fdt + u64::from(global(&FDT_CLOEXEC_OFF)))?;
    // SAFETY: the helper checks the address.
    let max =
        unsafe { bpf_probe_read_kernel((fdt + u64::from(global(&FDT_MAX_FDS_OFF))) as *const u32) }
            .ok()?;
    Some((open, cloexec, max))
}

/// The fd's bit in its table's close_on_exec bitmap; None when a read
/// failed (user space then reads fdinfo).
/// https://github.com/torvalds/linux/blob/v6.18/include/linux/fdtable.h (close_on_exec)
fn cloexec(task: *const u8, fd: u32) -> Option<bool> {
    let fdt = fdtable(task as u64)?;
    let bits = read_u64(fdt + u64::from(global(&FDT_CLOEXEC_OFF)))?;
    let word = read_u64(bits + u64::from(fd / 64) * 8)?;
    Some(word & (1 << (fd % 64)) != 0)
}

/// The `struct file` at `fd` in `task`'s table (`fdt->fd[fd]`), as an
/// address; None when a read failed. The caller bounds `fd`: a number past
/// the table's end reads a word that is no file of that fd.
pub fn file_at(task: u64, fd: u32) -> Option<u64> {
    let fdt = fdtable(task)?;
    let fds = read_u64(fdt + u64::from(global(&FDT_FD_OFF)))?;
    read_u64(fds + u64::from(fd) * 8)
}

/// The entries walk.
#[inline(always)]
pub fn entries(ctx: &TaskFileCtx) {
    let _ = try_entries(ctx);
}

fn try_entries(ctx: &TaskFileCtx) -> Option<()> {
    let (task, fd) = (ctx.task, ctx.fd);
    if task.is_null() || ctx.file.is_null() {
        return None;
    }
    let tgid = leader_tgid(task)?;
    let info = table::entry_for_report(tgid, fd)?;
    let rec = EntryRecord { fd, _pad: 0, info };
    // SAFETY: seq is the iterator's seq_file; rec lives on the stack.
    unsafe {
        bpf_seq_write(
            (*ctx.meta).seq,
            (&raw const rec).cast(),
            size_of::<EntryRecord>() as u32,
        )
    };
    Some(())
}
