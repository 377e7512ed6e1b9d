//! Python stacks at a syscall: the kernel half of the user-space walker in
//! fdtrace/src/python/walk.rs, the same reads in the same order. NOT WIRED
//! YET: user space fills PY_LAYOUTS per Python process, and the fd-creating
//! paths call [`capture`] where they take a native stack (same budget).
//!
//! Cost (measured in the design note, python-frames.md): a
//! bpf_probe_read_user costs about the same whatever its size (8-64 bytes),
//! so a frame is read in one call of PY_FRAME_READ bytes, not field by
//! field: about 1 us for 7 frames. The thread state is looked up by native
//! thread id (the GIL is released in the syscall, so the "current" thread
//! state is NULL) and cached per tid, checked again on every use.
use aya_ebpf::{
    helpers::bpf_probe_read_user_buf,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use fdtrace_common::{
    NO_FIELD,
    python::{
        PY_FRAME_READ, PY_MAX_FRAMES, PY_MAX_INTERPRETERS, PY_MAX_THREADS, PyFrame, PyLayout,
        PyStack,
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
pub static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

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

/// The Python stack of thread `tid` of process `tgid` into this CPU's
/// PY_SCRATCH; None when the process is not a supported Python, the thread
/// has no thread state, or a read failed before the first frame.
#[inline(always)]
pub fn capture(tgid: u32, tid: u32) -> Option<*mut PyStack> {
    // SAFETY: PY_LAYOUTS values are written by user space before the
    // process is traced and not changed after.
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
            // SAFETY: out is this CPU's scratch value; n < PY_MAX_FRAMES.
            unsafe {
                (*out).frames[n] = PyFrame {
                    code,
                    offset: word(&buf, l.frame_instr).wrapping_sub(first) as i64,
                };
            }
            n += 1;
        }
        frame = word(&buf, l.frame_previous);
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
    Some(out)
}
