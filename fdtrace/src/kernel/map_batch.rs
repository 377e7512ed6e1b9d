//! Reads every live-fd entry of the kernel map in a few syscalls
//! (BPF_MAP_LOOKUP_BATCH), instead of one lookup per fd number.
//! https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/hashtab.c (__htab_map_lookup_and_delete_batch)
use std::{
    collections::HashMap as StdHashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{HashMap, IterableMap as _, MapData};
use fdtrace_common::{FD_OPEN, FdInfo, FdKey};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Entries asked for per call; a hash bucket holding more makes the kernel
/// answer ENOSPC, and the chunk is doubled.
const CHUNK: u32 = 4096;

/// `union bpf_attr` as used by the batch commands (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The entry of open fd `fd` of `tgid` (entries of closed fds stay in the
/// map, without FD_OPEN).
pub fn open_fd(fds: &HashMap<MapData, FdKey, FdInfo>, tgid: u32, fd: u32) -> Option<FdInfo> {
    let info = fds.get(&FdKey { tgid, fd }, 0).ok()?;
    (info.flags & FD_OPEN != 0).then_some(info)
}

/// One live fd, as the kernel map has it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LiveFd {
    pub fd: u32,
    pub info: FdInfo,
}

/// Live fds of the processes `want` selects, grouped by tgid.
pub fn live_fds(
    fds: &HashMap<MapData, FdKey, FdInfo>,
    want: impl Fn(u32) -> bool,
) -> io::Result<StdHashMap<u32, Vec<LiveFd>>> {
    let mut out: StdHashMap<u32, Vec<LiveFd>> = StdHashMap::new();
    let map_fd = fds.map().fd().as_fd().as_raw_fd() as u32;
    lookup_all(map_fd, FdKey { tgid: 0, fd: 0 }, empty_info(), |k, v| {
        if v.flags & FD_OPEN != 0 && want(k.tgid) {
            out.entry(k.tgid)
                .or_default()
                .push(LiveFd { fd: k.fd, info: *v });
        }
    })?;
    Ok(out)
}

/// Every (tgid, slot) of the traced processes' map, in one or two
/// syscalls: a report lists them all, where iterating its keys costs a
/// syscall per process.
pub fn traced(procs: &HashMap<MapData, u32, u32>) -> io::Result<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    let map_fd = procs.map().fd().as_fd().as_raw_fd() as u32;
    lookup_all(map_fd, 0u32, 0u32, |&tgid, &slot| out.push((tgid, slot)))?;
    Ok(out)
}

/// Every entry of the hash map `map_fd` (keys of type K, values of type
/// V, both `#[repr(C)]` plain data as the kernel side defines them),
/// given to `each`; `zero_*` fill the buffers.
fn lookup_all<K: Copy, V: Copy>(
    map_fd: u32,
    zero_key: K,
    zero_value: V,
    mut each: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut chunk = CHUNK;
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // The batch token of a hash map is a bucket index (u32).
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        keys.resize(chunk as usize, zero_key);
        values.resize(chunk as usize, zero_value);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token_in as u64 },
            out_batch: &raw mut token_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd,
            ..Default::default()
        };
        // SAFETY: attr points at buffers of `count` keys and values that
        // outlive the call; the kernel writes at most that many, each of
        // the map's key and value size (K and V are the map's types).
        let err = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        match err.as_ref().and_then(io::Error::raw_os_error) {
            Some(libc::ENOSPC) => {
                chunk *= 2;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(err.unwrap_or_else(|| io::Error::other("bpf batch lookup"))),
        }
        for (k, v) in keys.iter().zip(&values).take(attr.count as usize) {
            each(k, v);
        }
        if err.is_some() {
            // ENOENT: that was the last bucket.
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
}

/// Inserts `entries` in as few syscalls as the kernel allows
/// (BPF_MAP_UPDATE_BATCH; it takes no BPF_NOEXIST, so an entry the kernel
/// side made meanwhile is overwritten: same fd, same kind, only its stack
/// and creation time are lost). Fails when the map is full.
pub fn insert_batch(
    fds: &HashMap<MapData, FdKey, FdInfo>,
    entries: &[(FdKey, FdInfo)],
) -> io::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let map_fd = fds.map().fd().as_fd().as_raw_fd() as u32;
    let keys: Vec<FdKey> = entries.iter().map(|e| e.0).collect();
    let values: Vec<FdInfo> = entries.iter().map(|e| e.1).collect();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd,
        ..Default::default()
    };
    // SAFETY: keys and values hold `count` elements and outlive the call;
    // the kernel only reads them.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop)
}

/// bpf(2) for the commands aya does not wrap (batch map operations here,
/// iterator links in iterators.rs). Returns the syscall's value (a new fd for
/// the commands that make one).
///
/// # Safety
/// Pointers in `attr` must be valid for the command: buffers of the
/// advertised sizes, alive for the call, writable where the kernel writes.
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: per the contract above; the size is the struct's.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn empty_info() -> FdInfo {
    FdInfo {
        created_ns: 0,
        site: 0,
        py_site: 0,
        py_use: 0,
        syscall: 0,
        kind: 0,
        flags: 0,
        detail: 0,
    }
}
