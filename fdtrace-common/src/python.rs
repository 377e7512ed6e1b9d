//! Where a traced CPython keeps its threads and frames: the layout the
//! kernel side's Python stack walker reads from a map, one value per traced
//! process, filled by user space from the process's own binary or libpython
//! (see fdtrace/src/python/).
//!
//! Fields are byte offsets into CPython's structures, all `u32`; a field a
//! version does not have is [`NO_FIELD`](crate::NO_FIELD).

/// Most Python frames captured per stack, innermost first.
pub const PY_MAX_FRAMES: usize = 32;

/// `FdInfo::py_site` / `py_use` when no Python stack was taken: an id in
/// the kernel's PY_STACKS map otherwise.
pub const NO_PY_STACK: u64 = 0;

/// `FdInfo::py_use` of a socket whose first send was seen without a stack
/// taken (over the stack budget, or no Python frame): later sends do not
/// try again.
pub const PY_USE_UNSAMPLED: u64 = u64::MAX;

/// Most interpreters and thread states visited when looking for a thread's
/// state: bounds for the kernel's loop (and the user-space walker's).
pub const PY_MAX_INTERPRETERS: u32 = 8;
pub const PY_MAX_THREADS: u32 = 256;

/// Bytes of a `_PyInterpreterFrame` read in one go: every field the walker
/// needs (code, previous, instruction pointer, owner) lies below this on
/// 3.11-3.13, and one read of a frame costs the same as one field.
pub const PY_FRAME_READ: u32 = 72;

/// Bytes of a `PyThreadState` read in one go from the lowest of
/// `native_thread_id`, the frame pointer (`cframe` or `current_frame`) and
/// `datastack_chunk`: all three lie within it on 3.11-3.13 (the farthest
/// apart, 3.11's 56 and 296, span 248 bytes); a layout whose fields do not
/// is read field by field, without the data stack window.
pub const PY_TSTATE_READ: u32 = 256;

/// Most bytes of a thread's data stack read in one go below its current
/// frame. CPython 3.11+ pushes the frames of Python-to-Python calls one
/// after the other in a chunk of the thread's data stack (at least 16 KiB,
/// Python/pystate.c `push_chunk`), so one read of the bytes between the
/// chunk's start and the current frame's end holds most frames of a stack:
/// a read costs about the same for 8 bytes as for a few KiB, much more
/// than decoding a frame from the bytes read. Frames outside it (generator
/// and coroutine frames live in their objects, C-stack shims on the C
/// stack, older chunks) are read one by one.
pub const PY_WINDOW: u32 = 4096;

/// The CPython layout of one process and the address of its `_PyRuntime`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyLayout {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    /// Address of `PyCode_Type`: a frame's code object has this `ob_type`.
    pub code_type: u64,
    /// `Py_Version` (`PY_VERSION_HEX`).
    pub version: u32,
    /// `_PyRuntime.interpreters.head`.
    pub runtime_interpreters_head: u32,
    /// `PyInterpreterState.next`.
    pub interp_next: u32,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u32,
    /// `PyThreadState.next`.
    pub tstate_next: u32,
    /// `PyThreadState.native_thread_id` (the kernel's tid).
    pub tstate_native_thread_id: u32,
    /// `PyThreadState.cframe` on 3.11 and 3.12 (a pointer to a `_PyCFrame`),
    /// `PyThreadState.current_frame` from 3.13.
    pub tstate_frame: u32,
    /// `PyThreadState.datastack_chunk`: the newest chunk of the thread's
    /// data stack (see [`PY_WINDOW`]); `NO_FIELD` for no window.
    pub tstate_datastack_chunk: u32,
    /// Keeps the u32 fields even in number (no padding).
    pub _pad: u32,
    /// `_PyCFrame.current_frame` on 3.11 and 3.12; `NO_FIELD` from 3.13
    /// (the thread state points at the frame itself).
    pub cframe_current_frame: u32,
    /// `_PyInterpreterFrame.f_code` (3.11, 3.12) or `f_executable` (3.13).
    pub frame_code: u32,
    /// `_PyInterpreterFrame.previous`.
    pub frame_previous: u32,
    /// `_PyInterpreterFrame.prev_instr` (3.11, 3.12) or `instr_ptr` (3.13).
    pub frame_instr: u32,
    /// `_PyInterpreterFrame.owner` (one byte).
    pub frame_owner: u32,
    /// The `owner` of the C-stack shim frames 3.12+ put in the chain
    /// (`FRAME_OWNED_BY_CSTACK`): skipped, and their code not followed;
    /// `NO_FIELD` on 3.11, which has none.
    pub owner_cstack: u32,
    /// `PyCodeObject.co_code_adaptive`: the first instruction.
    pub code_adaptive: u32,
    /// `PyCodeObject.co_filename`, `co_qualname`, `co_linetable`,
    /// `co_firstlineno`: read by user space only.
    pub code_filename: u32,
    pub code_qualname: u32,
    pub code_linetable: u32,
    pub code_firstlineno: u32,
    /// Where a `str`'s characters start: after `PyASCIIObject` for an ASCII
    /// string, after `PyCompactUnicodeObject` for a compact non-ASCII one.
    pub str_ascii_data: u32,
    pub str_compact_data: u32,
}

/// One captured Python frame: the code object running in it and the byte
/// offset of its instruction from the code's first one
/// (`instr - (code + co_code_adaptive)`); user space turns that into a line.
/// The offset is negative for a frame that has not started (3.11's
/// `prev_instr` is one code unit before the first instruction then).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub code: u64,
    pub offset: i64,
}

/// A thread's Python stack as the kernel side captures it: `len` frames,
/// innermost first; the rest of `frames` is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyStack {
    pub frames: [PyFrame; PY_MAX_FRAMES],
    pub len: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data; every byte is a field (no padding).
    unsafe impl aya::Pod for super::PyLayout {}
    unsafe impl aya::Pod for super::PyFrame {}
    unsafe impl aya::Pod for super::PyStack {}
}

// Shared with the kernel: 2 u64 then an even number of u32, no padding.
const _: () = assert!(core::mem::size_of::<PyLayout>() == 2 * 8 + 22 * 4);
const _: () = assert!(core::mem::size_of::<PyFrame>() == 16);
const _: () = assert!(core::mem::size_of::<PyStack>() == 16 * PY_MAX_FRAMES + 8);
