//! Maps shared with user space. Sizes are defaults; user space overrides them
//! at load time (`EbpfLoader::set_max_entries`).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf, StackTrace},
};
use fdtrace_common::{CNT_LEN, FdInfo, FdKey, ProcStats, StackWindow};

/// Live fds of every traced process. Not preallocated: memory follows the
/// number of live fds, not the configured maximum.
#[map]
pub static FDS: HashMap<FdKey, FdInfo> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// Traced processes; presence of a tgid is the kernel-side filter.
#[map]
pub static PROCS: HashMap<u32, ProcStats> = HashMap::with_max_entries(8192, 0);

/// 1 at index tgid when PROCS may hold the process: a lookup the verifier
/// inlines, in front of the PROCS hash lookup that every fd syscall of every
/// process would otherwise pay. Sized from /proc/sys/kernel/pid_max at load;
/// a tgid past it takes the hash lookup.
#[map]
pub static TRACED: Array<u8> = Array::with_max_entries(1 << 22, 0);

/// Process lifecycle and failure events.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Global counters (`CNT_*`), updated with atomic adds.
#[map]
pub static COUNTERS: Array<u64> = Array::with_max_entries(CNT_LEN, 0);

/// User stacks that created fds (call sites), by id; FdInfo::site points here.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// The top of the user stack when each STACKS id was first seen.
#[map]
pub static WINDOWS: HashMap<u32, StackWindow> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Per-CPU room to read a StackWindow (too large for the BPF stack).
#[map]
pub static WINDOW_SCRATCH: PerCpuArray<StackWindow> = PerCpuArray::with_max_entries(1, 0);
