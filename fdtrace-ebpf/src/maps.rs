//! Maps shared with user space. Sizes are defaults; user space overrides them
//! at load time (`EbpfLoader::set_max_entries`).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, RingBuf},
};
use fdtrace_common::{CNT_LEN, FdInfo, FdKey, ProcStats};

/// Live fds of every traced process. Not preallocated: memory follows the
/// number of live fds, not the configured maximum.
#[map]
pub static FDS: HashMap<FdKey, FdInfo> = HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// Traced processes; presence of a tgid is the kernel-side filter.
#[map]
pub static PROCS: HashMap<u32, ProcStats> = HashMap::with_max_entries(8192, 0);

/// Process lifecycle and failure events.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Global counters (`CNT_*`), updated with atomic adds.
#[map]
pub static COUNTERS: Array<u64> = Array::with_max_entries(CNT_LEN, 0);
