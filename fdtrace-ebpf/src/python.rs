//! Python stacks at a syscall: the kernel half of the user-space walker in
//! fdtrace/src/python/walk.rs, the same reads in the same order. User space
//! fills PY_LAYOUTS per Python process; the fd-creating paths call
//! [`capture`] where they take a native stack (same budget), and store the
//! id it returns in the fd's entry.
//!
//! Cost (measured in the design note, python-frames.md): a
//! bpf_probe_read_user costs about the same whatever its size (8-64 bytes),
//! so a frame is read in one call of PY_FRAME_READ bytes, not field by
//! field: about 1 us for 7 frames. The thread state is looked up by native
//! thread id (the GIL is released in the syscall, so the "current" thread
//! state is NULL) and cached per tid, checked again on every use.
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::bpf_probe_read_user_buf,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use fdtrace_common::{
    NO_FIELD,
    python::{
        NO_PY_STACK, PY_FRAME_READ, PY_MAX_FRAMES, PY_MAX_INTERPRETERS, PY_MAX_THREADS, PyFrame,
        PyLayout, PyStack,
    },
};

use crate::read_user;

/// Traced Python processes: tgid -> layout and `_PyRuntime` address.
#[map]
pub static PY_LAYOUTS: HashMap<u32, PyLayout> = HashMap::with_max_entries(8192, 0);

/// tid -> its PyThreadState, found once by the list walk.
#[map]
static PY_TSTATES: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU room for a PyStack (larger than the BPF stack allows).
#[map]
static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

/// Python stacks that created (or first used) fds, by id: a hash of their
/// frames, as STACKS keys native stacks, so an fd's entry holds one id.
/// Not preallocated: a session sees few distinct stacks.
#[map]
pub static PY_STACKS: HashMap<u64, PyStack> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

const EEXIST: i32 = -17;

const FRAME_READ: usize = PY_FRAME_READ as usize;

/// An offset into a frame read as a u64's start, clamped so the verifier
/// sees the access inside the buffer (the layout comes from a map).
#[inline(always)]
fn word(buf: &[u8; FRAME_READ], off: u32) -> u64 {
    let o = (off as usize).min(FRAME_READ - 8);
    u64::from_le_bytes([
        buf[o],
        buf[o + 1],
        buf[o + 2],
        buf[o + 3],
        buf[o + 4],
        buf[o + 5],
        buf[o + 6],
        buf[o + 7],
    ])
}

/// Thread `tid`'s PyThreadState: the cached one if it still names `tid`,
/// else the walk of `_PyRuntime.interpreters.head -> threads.head -> next`.
#[inline(always)]
fn thread_state(l: &PyLayout, tid: u32) -> Option<u64> {
    let ntid = u64::from(l.tstate_native_thread_id);
    // SAFETY: a u64 value, copied out at once.
    if let Some(&ts) = unsafe { PY_TSTATES.get(tid) }
        && read_user::<u64>(ts + ntid) == Some(u64::from(tid))
    {
        return Some(ts);
    }
    let mut interp = read_user::<u64>(l.runtime + u64::from(l.runtime_interpreters_head))?;
    for _ in 0..PY_MAX_INTERPRETERS {
        if interp == 0 {
            return None;
        }
        let mut ts = read_user::<u64>(interp + u64::from(l.interp_threads_head))?;
        for _ in 0..PY_MAX_THREADS {
            if ts == 0 {
                break;
            }
            if read_user::<u64>(ts + ntid)? == u64::from(tid) {
                let _ = PY_TSTATES.insert(tid, ts, 0);
                return Some(ts);
            }
            ts = read_user::<u64>(ts + u64::from(l.tstate_next))?;
        }
        interp = read_user::<u64>(interp + u64::from(l.interp_next))?;
    }
    None
}

/// One step of the stack's id: FNV-1a's multiply over whole words, with
/// a shift so high bits reach low ones (code pointers differ in their
/// middle bits).
#[inline(always)]
fn mix(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    h ^ (h >> 29)
}

/// The Python stack of thread `tid` of process `tgid`, kept in PY_STACKS:
/// its id, or NO_PY_STACK when the process is not a supported Python, the
/// thread has no thread state or no frame, or the stack could not be kept.
#[inline(always)]
pub fn capture(tgid: u32, tid: u32) -> u64 {
    capture_into(tgid, tid).unwrap_or(NO_PY_STACK)
}

#[inline(always)]
fn capture_into(tgid: u32, tid: u32) -> Option<u64> {
    // SAFETY: PY_LAYOUTS values are written by user space before it reads
    // any stack of the process, and not changed while it runs that image.
    let l = unsafe { PY_LAYOUTS.get(tgid) }?;
    let out = PY_SCRATCH.get_ptr_mut(0)?;
    let ts = thread_state(l, tid)?;
    let mut frame = read_user::<u64>(ts + u64::from(l.tstate_frame))?;
    if l.cframe_current_frame != NO_FIELD && frame != 0 {
        frame = read_user::<u64>(frame + u64::from(l.cframe_current_frame))?;
    }
    let owner_at = (l.frame_owner as usize).min(FRAME_READ - 1);
    let mut buf = [0u8; FRAME_READ];
    let mut n = 0usize;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    // Shim frames count against the bound too: it bounds the reads.
    for _ in 0..PY_MAX_FRAMES * 2 {
        if frame == 0 || n >= PY_MAX_FRAMES {
            break;
        }
        // SAFETY: the helper checks the address.
        if unsafe { bpf_probe_read_user_buf(frame as *const u8, &mut buf) }.is_err() {
            break;
        }
        if u32::from(buf[owner_at]) != l.owner_cstack {
            let code = word(&buf, l.frame_code);
            let first = code.wrapping_add(u64::from(l.code_adaptive));
            let offset = word(&buf, l.frame_instr).wrapping_sub(first);
            h = mix(mix(h, code), offset);
            // SAFETY: out is this CPU's scratch value; n < PY_MAX_FRAMES.
            unsafe {
                (*out).frames[n] = PyFrame {
                    code,
                    offset: offset as i64,
                };
            }
            n += 1;
        }
        frame = word(&buf, l.frame_previous);
    }
    if n == 0 {
        return None;
    }
    // SAFETY: as above.
    unsafe {
        for i in 0..PY_MAX_FRAMES {
            if i >= n {
                (*out).frames[i] = PyFrame::default();
            }
        }
        (*out).len = n as u32;
    }
    let id = match mix(h, n as u64) {
        NO_PY_STACK => 1,
        id => id,
    };
    // SAFETY: out is this CPU's scratch value, copied by the helper.
    match PY_STACKS.insert(id, unsafe { &*out }, u64::from(BPF_NOEXIST)) {
        Ok(()) => Some(id),
        Err(EEXIST) => Some(id),
        // Full: the fd gets no Python stack rather than one user space
        // cannot read.
        Err(_) => None,
    }
}

/// A followed child starts as a copy of its parent: same interpreter, same
/// addresses.
#[inline(always)]
pub fn fork(parent: u32, child: u32) {
    // SAFETY: copied out at once.
    if let Some(l) = unsafe { PY_LAYOUTS.get(parent) } {
        let l = *l;
        let _ = PY_LAYOUTS.insert(child, l, 0);
    }
}

/// After exec (a new image) or exit, the layout no longer holds; user space
/// writes the new image's, if it is a Python.
#[inline(always)]
pub fn forget(tgid: u32) {
    let _ = PY_LAYOUTS.remove(tgid);
}
