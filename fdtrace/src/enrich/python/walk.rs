//! The user-space frame walker: what the kernel side does at a syscall,
//! done from /proc/PID/mem, for `fdtrace py-stack` and as the tests' oracle
//! for the kernel's walk. The same frames in the same order: the thread
//! state list from `_PyRuntime`, then one read per frame (where the kernel
//! reads most frames in one window of the data stack: the oracle reads
//! each on its own, so a window that went wrong would show).
use fdtrace_common::{
    NO_FIELD,
    python::{PY_FRAME_READ, PY_MAX_INTERPRETERS, PY_MAX_THREADS, PyFrame, PyLayout},
};

use super::mem::{Mem, u64_at};

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("cannot read {what} at {addr:#x}: {err}")]
    Read {
        what: &'static str,
        addr: u64,
        err: std::io::Error,
    },
    #[error("thread {0} has no Python thread state (not a Python thread, or not started yet)")]
    NoThreadState(u32),
}

fn read(mem: &Mem, what: &'static str, addr: u64, len: u32) -> Result<Vec<u8>, WalkError> {
    mem.bytes(addr, len as usize)
        .map_err(|err| WalkError::Read { what, addr, err })
}

/// The thread state whose `native_thread_id` is `tid`: the GIL is released
/// around blocking calls, so the "current thread state" of 3.11's gilstate
/// or 3.12's `_Py_tss_tstate` is NULL at a syscall; the list from
/// `_PyRuntime.interpreters.head` has every thread of every interpreter.
pub fn thread_state(mem: &Mem, l: &PyLayout, tid: u32) -> Result<u64, WalkError> {
    // One read of a thread state covers the fields used.
    let ts_len = l
        .tstate_next
        .max(l.tstate_native_thread_id)
        .max(l.tstate_frame)
        + 8;
    let mut interp = mem
        .u64(l.runtime + u64::from(l.runtime_interpreters_head))
        .map_err(|err| WalkError::Read {
            what: "_PyRuntime",
            addr: l.runtime,
            err,
        })?;
    for _ in 0..PY_MAX_INTERPRETERS {
        if interp == 0 {
            break;
        }
        let mut ts = mem
            .u64(interp + u64::from(l.interp_threads_head))
            .map_err(|err| WalkError::Read {
                what: "interpreter state",
                addr: interp,
                err,
            })?;
        for _ in 0..PY_MAX_THREADS {
            if ts == 0 {
                break;
            }
            let b = read(mem, "thread state", ts, ts_len)?;
            if u64_at(&b, l.tstate_native_thread_id) == u64::from(tid) {
                return Ok(ts);
            }
            ts = u64_at(&b, l.tstate_next);
        }
        interp = mem
            .u64(interp + u64::from(l.interp_next))
            .map_err(|err| WalkError::Read {
                what: "interpreter state",
                addr: interp,
                err,
            })?;
    }
    Err(WalkError::NoThreadState(tid))
}

/// The frames of thread state `ts`, innermost first, at most `max`: each
/// frame's code object and instruction offset. C-stack shim frames
/// (3.12+) are passed over without following their code, which on 3.13 is
/// not a code object.
pub fn frames(mem: &Mem, l: &PyLayout, ts: u64, max: usize) -> Result<Vec<PyFrame>, WalkError> {
    let mut frame = mem
        .u64(ts + u64::from(l.tstate_frame))
        .map_err(|err| WalkError::Read {
            what: "thread state",
            addr: ts,
            err,
        })?;
    if l.cframe_current_frame != NO_FIELD && frame != 0 {
        frame = mem
            .u64(frame + u64::from(l.cframe_current_frame))
            .map_err(|err| WalkError::Read {
                what: "_PyCFrame",
                addr: frame,
                err,
            })?;
    }
    let mut out = Vec::new();
    // Shim frames count against the bound too: it bounds the reads.
    for _ in 0..max * 2 {
        if frame == 0 || out.len() == max {
            break;
        }
        let b = read(mem, "frame", frame, PY_FRAME_READ)?;
        let owner = u32::from(b[l.frame_owner as usize]);
        if owner != l.owner_cstack {
            let code = u64_at(&b, l.frame_code);
            let instr = u64_at(&b, l.frame_instr);
            let first = code.wrapping_add(u64::from(l.code_adaptive));
            out.push(PyFrame {
                code,
                offset: instr.wrapping_sub(first) as i64,
            });
        }
        frame = u64_at(&b, l.frame_previous);
    }
    Ok(out)
}
