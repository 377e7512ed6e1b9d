//! Python stacks at a syscall: the kernel half of the user-space walker in
//! fdtrace/src/enrich/python/walk.rs, the same frames in the same order.
//! User space fills PY_LAYOUTS per Python process; the fd-creating paths
//! call [`capture`] where they take a native stack (same budget), and
//! store the id it returns in the fd's entry.
//!
//! Cost: a bpf_probe_read_user costs about the same whatever its size
//! (~74 ns for 8 to 64 bytes in the design note, python-frames.md; more
//! than decoding a frame from bytes already read), so reads are few and
//! large: the thread state's native id, frame pointer and data stack chunk
//! in one call of PY_TSTATE_READ bytes; the frames of the data stack below
//! the current one in one call of up to PY_WINDOW bytes; a frame outside
//! it in one call of PY_FRAME_READ bytes, not field by field. The thread
//! state is looked up by native thread id (the GIL is released in the
//! syscall, so the "current" thread state is NULL) and cached per tid,
//! checked again on every use (the same read). A stack seen before is not
//! written again. `cargo xtask bench --python` gives the cost per CPython.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user_buf,
        generated::{bpf_loop, bpf_probe_read_user},
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use fdtrace_common::{
    FdInfo, FdKind, NO_FIELD, ProcStats, SITE_NOT_SAMPLED,
    decode::{Effect, SyscallArgs as _, decode},
    python::{
        NO_PY_STACK, PY_FRAME_READ, PY_MAX_FRAMES, PY_MAX_INTERPRETERS, PY_MAX_THREADS,
        PY_TSTATE_READ, PY_USE_UNSAMPLED, PY_WINDOW, PyFrame, PyLayout, PyStack,
    },
    syscalls::{SENDMMSG, SENDMSG, SENDTO, WRITE, WRITEV},
};

use crate::{
    global,
    regs::{Regs, read_user},
    stack::{STACKS_PER_SLOT, stack_budget},
    table::{add64, open_entry, proc_at, slot_of},
};

/// Traced Python processes: tgid -> layout and `_PyRuntime` address.
#[map]
pub static PY_LAYOUTS: HashMap<u32, PyLayout> = HashMap::with_max_entries(8192, 0);

/// The tgid of the Python process (one with a PY_LAYOUTS entry) in each
/// STATS slot, 0 for none: user space writes it with the layout. A slot
/// given back and reused holds another tgid, which the check sees.
#[map]
pub static PY_SLOTS: Array<u32> = Array::with_max_entries(8192, 0);

/// tid -> its PyThreadState, found once by the list walk.
#[map]
static PY_TSTATES: LruHashMap<u32, u64> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU room for a PyStack (larger than the BPF stack allows).
#[map]
static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for a thread state read, then for the data stack window
/// (see fdtrace_common::python::PY_WINDOW).
#[map]
static PY_DATASTACK: PerCpuArray<[u8; WINDOW]> = PerCpuArray::with_max_entries(1, 0);

/// Python stacks that created (or first used) fds, by id: a hash of their
/// frames, as STACKS keys native stacks, so an fd's entry holds one id.
/// Not preallocated: a session sees few distinct stacks.
#[map]
pub static PY_STACKS: HashMap<u64, PyStack> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

const EEXIST: i32 = -17;

const FRAME_READ: usize = PY_FRAME_READ as usize;
const TSTATE_READ: usize = PY_TSTATE_READ as usize;
const WINDOW: usize = PY_WINDOW as usize;
// The thread state is read into the window's room first.
const _: () = assert!(TSTATE_READ <= WINDOW && FRAME_READ <= WINDOW);

/// An offset into a read buffer as a u64's start, clamped so the verifier
/// sees the access inside the buffer (the layout comes from a map).
#[inline(always)]
fn word<const N: usize>(buf: &[u8; N], off: u32) -> u64 {
    let o = (off as usize).min(N - 8);
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

/// The walk of `_PyRuntime.interpreters.head -> threads.head -> next`,
/// one thread state a step (bpf_loop: the verifier checks the step once,
/// where a nested bounded loop would be explored iteration by iteration).
#[repr(C)]
struct TstateWalk {
    l: *const PyLayout,
    /// The interpreter whose thread list is walked, and the thread state
    /// to look at next (0: go on to the next interpreter).
    interp: u64,
    ts: u64,
    tid: u64,
    found: u64,
    interpreters: u32,
    _pad: u32,
}

extern "C" fn tstate_step(_i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: ctx is the TstateWalk on thread_state()'s stack; l points at
    // the PY_LAYOUTS value looked up there.
    let w = unsafe { &mut *(ctx as *mut TstateWalk) };
    let l = unsafe { &*w.l };
    if w.ts == 0 {
        if w.interpreters > 0 {
            let Some(next) = read_user::<u64>(w.interp + u64::from(l.interp_next)) else {
                return 1;
            };
            w.interp = next;
        }
        w.interpreters += 1;
        if w.interp == 0 || w.interpreters > PY_MAX_INTERPRETERS {
            return 1;
        }
        match read_user::<u64>(w.interp + u64::from(l.interp_threads_head)) {
            Some(ts) => w.ts = ts,
            None => return 1,
        }
        return 0;
    }
    match read_user::<u64>(w.ts + u64::from(l.tstate_native_thread_id)) {
        Some(t) if t == w.tid => {
            w.found = w.ts;
            return 1;
        }
        Some(_) => {}
        None => return 1,
    }
    match read_user::<u64>(w.ts + u64::from(l.tstate_next)) {
        Some(next) => w.ts = next,
        None => return 1,
    }
    0
}

/// What a frame walk starts from: thread `tid`'s frame pointer (`cframe`
/// on 3.11 and 3.12, `current_frame` from 3.13) and its newest data stack
/// chunk (0: not known), from the cached thread state if it still names
/// `tid`, else from the one found by the walk of every interpreter's
/// threads. `win` is room for one thread state read.
#[inline(always)]
fn thread_state(l: &PyLayout, tid: u32, win: &mut [u8; WINDOW]) -> Option<(u64, u64)> {
    // SAFETY: a u64 value, copied out at once.
    if let Some(&ts) = unsafe { PY_TSTATES.get(tid) }
        && let Some((t, frame, chunk)) = tstate_fields(l, ts, win)
        && t == u64::from(tid)
    {
        return Some((frame, chunk));
    }
    let ts = find_thread_state(l, tid)?;
    let (_, frame, chunk) = tstate_fields(l, ts, win)?;
    Some((frame, chunk))
}

/// The native thread id, the frame pointer and the data stack chunk of
/// thread state `ts`: one read when all three lie within PY_TSTATE_READ
/// bytes (3.11-3.13), else the first two field by field and no chunk.
#[inline(always)]
fn tstate_fields(l: &PyLayout, ts: u64, win: &mut [u8; WINDOW]) -> Option<(u64, u64, u64)> {
    let (ntid, frame, chunk) = (
        l.tstate_native_thread_id,
        l.tstate_frame,
        l.tstate_datastack_chunk,
    );
    let from = ntid.min(frame).min(chunk);
    if chunk != NO_FIELD && ntid.max(frame).max(chunk) - from <= (TSTATE_READ - 8) as u32 {
        // SAFETY: the helper checks the address; TSTATE_READ <= WINDOW.
        let buf = unsafe { &mut *(win.as_mut_ptr() as *mut [u8; TSTATE_READ]) };
        // SAFETY: as above.
        unsafe { bpf_probe_read_user_buf((ts + u64::from(from)) as *const u8, buf) }.ok()?;
        return Some((
            word(buf, ntid - from),
            word(buf, frame - from),
            word(buf, chunk - from),
        ));
    }
    Some((
        read_user::<u64>(ts + u64::from(ntid))?,
        read_user::<u64>(ts + u64::from(frame))?,
        0,
    ))
}

/// Thread `tid`'s PyThreadState found by the walk of every interpreter's
/// threads, cached.
#[inline(always)]
fn find_thread_state(l: &PyLayout, tid: u32) -> Option<u64> {
    let mut w = TstateWalk {
        l,
        interp: read_user::<u64>(l.runtime + u64::from(l.runtime_interpreters_head))?,
        ts: 0,
        tid: u64::from(tid),
        found: 0,
        interpreters: 0,
        _pad: 0,
    };
    // Each interpreter takes one step more than its threads.
    let steps = PY_MAX_INTERPRETERS * (PY_MAX_THREADS + 1);
    // SAFETY: static callback; w outlives the call.
    unsafe { bpf_loop(steps, tstate_step as *mut c_void, (&raw mut w).cast(), 0) };
    if w.found == 0 {
        return None;
    }
    let _ = PY_TSTATES.insert(tid, w.found, 0);
    Some(w.found)
}

/// One step of the stack's id: FNV-1a's multiply over whole words, with
/// a shift so high bits reach low ones (code pointers differ in their
/// middle bits).
#[inline(always)]
fn mix(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    h ^ (h >> 29)
}

/// The walk of a thread's frames, one frame a step: from the data stack
/// window when the frame lies in it, else with a read of its own.
#[repr(C)]
struct FrameWalk {
    l: *const PyLayout,
    out: *mut PyStack,
    /// The window: bytes `win_from..win_from + win_len` of the process.
    win: *const [u8; WINDOW],
    win_from: u64,
    win_len: u64,
    frame: u64,
    hash: u64,
    n: u32,
    _pad: u32,
}

/// The u64 at byte `off` of the window, `off` a multiple of 8 (the
/// window's start, frames and the pointer fields read are 8-aligned):
/// one load; clamped so the verifier sees it inside.
#[inline(always)]
fn window_word(win: &[u8; WINDOW], off: u64) -> u64 {
    let o = ((off as usize) & !7).min(WINDOW - 8);
    // SAFETY: o + 8 <= WINDOW and o is 8-aligned in an 8-aligned map value.
    unsafe { *(win.as_ptr().add(o) as *const u64) }
}

extern "C" fn frame_step(_i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: ctx is the FrameWalk on capture_into()'s stack; l, out and
    // win point at map values looked up there.
    let w = unsafe { &mut *(ctx as *mut FrameWalk) };
    let l = unsafe { &*w.l };
    let n = w.n as usize;
    if w.frame == 0 || n >= PY_MAX_FRAMES {
        return 1;
    }
    let (owner, code, instr, previous);
    let at = w.frame.wrapping_sub(w.win_from);
    if w.frame >= w.win_from && at + FRAME_READ as u64 <= w.win_len {
        // SAFETY: as above.
        let win = unsafe { &*w.win };
        let f = |off: u32| window_word(win, at + u64::from(off));
        let owner_at = (l.frame_owner & !7).min(FRAME_READ as u32 - 8);
        owner = (f(owner_at) >> (8 * (l.frame_owner & 7))) as u8;
        (code, instr, previous) = (f(l.frame_code), f(l.frame_instr), f(l.frame_previous));
    } else {
        let mut buf = [0u8; FRAME_READ];
        // SAFETY: the helper checks the address.
        if unsafe { bpf_probe_read_user_buf(w.frame as *const u8, &mut buf) }.is_err() {
            return 1;
        }
        owner = buf[(l.frame_owner as usize).min(FRAME_READ - 1)];
        (code, instr, previous) = (
            word(&buf, l.frame_code),
            word(&buf, l.frame_instr),
            word(&buf, l.frame_previous),
        );
    }
    if u32::from(owner) != l.owner_cstack {
        let first = code.wrapping_add(u64::from(l.code_adaptive));
        let offset = instr.wrapping_sub(first);
        w.hash = mix(mix(w.hash, code), offset);
        // SAFETY: out is this CPU's scratch value; n < PY_MAX_FRAMES.
        unsafe {
            (*w.out).frames[n] = PyFrame {
                code,
                offset: offset as i64,
            };
        }
        w.n += 1;
    }
    w.frame = previous;
    0
}

/// Reads the data stack below `frame`, the current frame, into `win`: from
/// the newest chunk's start (`chunk`), or WINDOW bytes below the frame's
/// end if the chunk starts lower, to the frame's end. Those bytes were all
/// written when their frames were pushed: a read of untouched pages above
/// the stack's top would fail (the helper cannot fault pages in). Returns
/// the window's start and length, length 0 for none (the current frame is
/// not in the chunk: a generator's or coroutine's; no chunk known; a
/// layout whose pointer fields are not 8-aligned; a failed read, and the
/// frames are then read one by one as without the window).
#[inline(always)]
fn window(l: &PyLayout, win: *mut [u8; WINDOW], frame: u64, chunk: u64) -> (u64, u64) {
    let aligned = (l.frame_code | l.frame_previous | l.frame_instr) & 7 == 0;
    if !aligned || chunk == 0 || frame < chunk {
        return (0, 0);
    }
    let end = frame.wrapping_add(FRAME_READ as u64);
    let from = chunk.max(end.wrapping_sub(WINDOW as u64));
    let len = end.wrapping_sub(from);
    if len > WINDOW as u64 || len < FRAME_READ as u64 || from & 7 != 0 {
        return (0, 0);
    }
    // SAFETY: win is this CPU's value of WINDOW bytes, len <= WINDOW; the
    // helper checks the address.
    let r = unsafe { bpf_probe_read_user(win.cast(), len as u32, from as *const c_void) };
    if r != 0 { (0, 0) } else { (from, len) }
}

/// The Python stack of thread `tid` of the process whose layout is `l`,
/// kept in PY_STACKS: its id, or NO_PY_STACK when the thread has no thread
/// state or no frame, or the stack could not be kept.
#[inline(always)]
pub fn capture(l: &PyLayout, tid: u32) -> u64 {
    capture_into(l, tid).unwrap_or(NO_PY_STACK)
}

#[inline(never)]
fn capture_into(l: &PyLayout, tid: u32) -> Option<u64> {
    let out = PY_SCRATCH.get_ptr_mut(0)?;
    let win = PY_DATASTACK.get_ptr_mut(0)?;
    // SAFETY: this CPU's value, used by this program run only.
    let (mut frame, chunk) = thread_state(l, tid, unsafe { &mut *win })?;
    if l.cframe_current_frame != NO_FIELD && frame != 0 {
        frame = read_user::<u64>(frame + u64::from(l.cframe_current_frame))?;
    }
    let (win_from, win_len) = window(l, win, frame, chunk);
    let mut w = FrameWalk {
        l,
        out,
        win,
        win_from,
        win_len,
        frame,
        hash: 0xcbf2_9ce4_8422_2325,
        n: 0,
        _pad: 0,
    };
    // Shim frames count against the bound too: it bounds the reads.
    // SAFETY: static callback; w outlives the call.
    unsafe {
        bpf_loop(
            (PY_MAX_FRAMES * 2) as u32,
            frame_step as *mut c_void,
            (&raw mut w).cast(),
            0,
        )
    };
    let n = w.n as usize;
    if n == 0 {
        return None;
    }
    let id = match mix(w.hash, n as u64) {
        NO_PY_STACK | PY_USE_UNSAMPLED => 1,
        id => id,
    };
    // Most stacks were seen before (a loop, a request handler): a lookup
    // costs less than the locked update that would find it there.
    // SAFETY: presence check only.
    if unsafe { PY_STACKS.get(id) }.is_some() {
        return Some(id);
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
    // SAFETY: out is this CPU's scratch value, copied by the helper. By
    // reference: a PyStack is larger than the BPF stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let kept = PY_STACKS.insert(id, unsafe { &*out }, u64::from(BPF_NOEXIST));
    match kept {
        Ok(()) => Some(id),
        Err(EEXIST) => Some(id),
        // Full: the fd gets no Python stack rather than one user space
        // cannot read.
        Err(_) => None,
    }
}

/// The Python half of the syscall hook, after fdtrace_sys_exit has
/// updated the fd table: a call of a Python process that made fds, with a
/// native stack taken (the same --stack-rate budget), gets its Python
/// stack in the new fds' entries; a send on a socket, the first one, in
/// its `py_use` (see [`first_use`]).
#[inline(always)]
pub fn sys_exit(ctx: &BtfTracePointContext) {
    let r = Regs(ctx.arg(0));
    let nr = r.nr();
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return;
    }
    // First the call, from its registers: most calls the hook sees make
    // no fd and send nothing (the program runs for every syscall of the
    // machine once attached), and they return before any map lookup.
    let send = matches!(nr, WRITE | WRITEV | SENDTO | SENDMSG | SENDMMSG);
    // Calls that make fds with a stack of their own (not SCM_RIGHTS, whose
    // fds the sender made, nor a pidfd).
    let made = if send {
        None
    } else {
        match decode(nr, &r) {
            Some(
                e @ (Effect::New { .. }
                | Effect::Openat2 { .. }
                | Effect::IoUring { .. }
                | Effect::Dup { .. }
                | Effect::Pair { .. }),
            ) => Some(e),
            _ => return,
        }
    };
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    // Then the process: under --all every process is traced, and the
    // slot's mark, two array reads, keeps the hash lookup below to Python
    // processes.
    let Some(slot) = slot_of(tgid) else {
        return;
    };
    if PY_SLOTS.get(slot) != Some(&tgid) {
        return;
    }
    // SAFETY: PY_LAYOUTS values are written by user space before it reads
    // any stack of the process, and not changed while it runs that image.
    let Some(l) = (unsafe { PY_LAYOUTS.get(tgid) }) else {
        return;
    };
    if send {
        if let Some(p) = proc_at(slot, tgid) {
            first_use(l, p, tgid, tid, r.arg(0) as u32);
        }
        return;
    }
    let fd = ret as u32;
    let (a, b) = match made {
        Some(Effect::New { .. } | Effect::Openat2 { .. } | Effect::IoUring { .. }) => (fd, None),
        Some(Effect::Dup { src, replaces, .. }) if !(replaces && src == fd) => (fd, None),
        Some(Effect::Pair { ptr, .. }) => match read_user::<[i32; 2]>(ptr) {
            Some([a, b]) => (a as u32, Some(b as u32)),
            None => return,
        },
        _ => return,
    };
    let Some(ea) = made_by(tgid, a, nr) else {
        return;
    };
    let py = capture(l, tid);
    // SAFETY: ea (and eb) are live FDS values.
    unsafe { (*ea).py_site = py };
    if let Some(b) = b
        && let Some(eb) = made_by(tgid, b, nr)
    {
        // SAFETY: as above.
        unsafe { (*eb).py_site = py };
    }
}

/// The entry of fd `fd` of `tgid` if syscall `nr` just made it within the
/// stack budget: without stacks (`--no-stacks`), or over the budget, an fd
/// gets no Python stack either. One whose native stack could not be taken
/// (NO_SITE with stacks on) still gets its Python stack.
#[inline(always)]
fn made_by(tgid: u32, fd: u32, nr: u64) -> Option<*mut FdInfo> {
    if global(&STACKS_PER_SLOT) == 0 {
        return None;
    }
    let e = open_entry(tgid, fd)?;
    // SAFETY: e is a live FDS value.
    let (syscall, site, py) = unsafe { ((*e).syscall, (*e).site, (*e).py_site) };
    (u64::from(syscall) == nr && site != SITE_NOT_SAMPLED && py == NO_PY_STACK).then_some(e)
}

/// A send on fd `fd` by thread `tid` of Python process `tgid` (layout `l`,
/// counters at `p`). The first one on a socket takes its Python stack, within the
/// process's stack budget, into the entry's `py_use`: async clients
/// create their sockets in a helper task, where none of the user's frames
/// are on the stack, and send from the user's own. Every later send costs
/// one more lookup (the entry).
#[inline(always)]
fn first_use(l: &PyLayout, p: *mut ProcStats, tgid: u32, tid: u32, fd: u32) {
    let Some(info) = open_entry(tgid, fd) else {
        return;
    };
    // SAFETY: info is a live FDS value. py_use is written here only, so
    // the marker needs no read-modify-write of the flags a close clears
    // concurrently; two threads sending at once may both take the stack.
    unsafe {
        if (*info).kind != FdKind::Socket as u8 || (*info).py_use != NO_PY_STACK {
            return;
        }
        (*info).py_use = PY_USE_UNSAMPLED;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if global(&STACKS_PER_SLOT) == 0 || !stack_budget(p, now) {
        return;
    }
    let id = capture(l, tid);
    if id != NO_PY_STACK {
        // SAFETY: as above; p is a live STATS element. The entry changed:
        // a report that read it before must read it again.
        unsafe {
            (*info).py_use = id;
            add64(&raw mut (*p).generation, 1);
        }
    }
}

/// A followed child starts as a copy of its parent: same interpreter, same
/// addresses.
#[inline(always)]
pub fn fork(parent: u32, child: u32) {
    // SAFETY: copied out at once.
    if let Some(l) = unsafe { PY_LAYOUTS.get(parent) } {
        let l = *l;
        if PY_LAYOUTS.insert(child, l, 0).is_ok() {
            mark(child, child);
        }
    }
}

/// Writes `value` in `tgid`'s PY_SLOTS mark.
#[inline(always)]
fn mark(tgid: u32, value: u32) {
    if let Some(slot) = slot_of(tgid)
        && let Some(m) = PY_SLOTS.get_ptr_mut(slot)
    {
        // SAFETY: m is an element of PY_SLOTS.
        unsafe { *m = value };
    }
}

/// After exec (a new image) or exit, the layout no longer holds; user space
/// writes the new image's, if it is a Python.
#[inline(always)]
pub fn forget(tgid: u32) {
    let _ = PY_LAYOUTS.remove(tgid);
    mark(tgid, 0);
}
