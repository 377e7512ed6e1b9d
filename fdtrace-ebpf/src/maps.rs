//! Maps shared with user space. Sizes are defaults; user space overrides them
//! at load time (`EbpfLoader::set_max_entries`).
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, Queue, RingBuf, StackTrace},
};
use fdtrace_common::{
    CNT_LEN, EVENTS_RING_BYTES, EVENTS_WAKE_BYTES, FD_KINDS, FdInfo, FdKey, LAZY_WORDS, LazyKey,
    ProcStats, StackWindow,
};

/// Live fds of every traced process. Not preallocated: memory follows the
/// number of live fds, not the configured maximum.
#[map]
pub static FDS: HashMap<FdKey, FdInfo> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// Traced processes: tgid -> slot in STATS. User space lists the traced
/// processes here; the programs look a tgid up here only past TRACED's end.
#[map]
pub static PROCS: HashMap<u32, u32> = HashMap::with_max_entries(8192, 0);

/// Counters of each traced process, by slot (same size as PROCS).
#[map]
pub static STATS: Array<ProcStats> = Array::with_max_entries(8192, 0);

/// STATS slots not in use: taken at fork and attach, given back at exit.
/// User space fills it at load.
#[map]
pub static FREE_SLOTS: Queue<u32> = Queue::with_max_entries(8192, 0);

/// slot + 1 at index tgid when the process is traced, 0 otherwise: two
/// array lookups (which the verifier inlines) find a traced process's
/// counters, where a hash lookup would cost every fd syscall of every
/// process. Sized from /proc/sys/kernel/pid_max at load; a tgid past it
/// takes the PROCS lookup.
#[map]
pub static TRACED: Array<u16> = Array::with_max_entries(1 << 22, 0);

/// Process lifecycle and failure events.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// The flags of an EVENTS submit: no wake-up (user space drains the ring
/// every EVENTS_DRAIN_MS), unless EVENTS_WAKE_BYTES are pending.
#[inline(always)]
pub fn wake_flags() -> u64 {
    if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= EVENTS_WAKE_BYTES {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// Global counters (`CNT_*`), updated with atomic adds.
#[map]
pub static COUNTERS: Array<u64> = Array::with_max_entries(CNT_LEN, 0);

/// User stacks that created fds (call sites), by id; FdInfo::site points here.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// The top of the user stack when each site (FdInfo::site: a STACKS id and
/// its caller bits) was first seen.
#[map]
pub static WINDOWS: HashMap<u64, StackWindow> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Where, from the user stack pointer, the return address into the caller
/// of the function at a syscall's user address is kept, in bytes; written
/// by user space, which finds it by that function's call-frame information
/// the first time it unwinds a window from that address. Keyed by address
/// alone: forked children share their parent's layout, and a syscall
/// instruction of another library at the same address in another process
/// only makes its sites split by the word read there, never merge.
#[map]
pub static CALLER_SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Per-CPU room to read a StackWindow (too large for the BPF stack).
#[map]
pub static WINDOW_SCRATCH: PerCpuArray<StackWindow> = PerCpuArray::with_max_entries(1, 0);

/// The `struct file` each fd the seed walk wrote had when the walk saw it,
/// and when (bpf_ktime_get_ns), so that the fd's own creating syscall, if it reaches sys_exit after the
/// walk, is told apart from a new fd on a number whose close is still on its
/// way (see table::install). Only the moments after an attach need it: an
/// LRU of a fixed size keeps the last walk's fds.
#[map]
pub static SEED_FILES: LruHashMap<FdKey, [u64; 2]> = LruHashMap::with_max_entries(16384, 0);

/// Lazily inherited fds: which close-on-exec fds a process forked by a
/// followed parent still holds from its fork, one bit per fd (see
/// PROC_LAZY). Not preallocated: a chunk lives from a fork to its exec.
#[map]
pub static LAZY: HashMap<LazyKey, [u64; LAZY_WORDS]> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Per-CPU room for exec's count by kind of the fds left open.
#[map]
pub static EXEC_TALLY: PerCpuArray<[u64; FD_KINDS]> = PerCpuArray::with_max_entries(1, 0);
