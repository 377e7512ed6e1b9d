//! Types shared by the eBPF programs and the user-space loader.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so its layout is the
//! same on both sides and no byte of a map value is left uninitialised.
#![cfg_attr(not(test), no_std)]

pub mod decode;
pub mod kind;
pub mod python;
pub mod syscalls;

/// Kind of object behind an fd, decided by the syscall that created it (or, for
/// fds that existed before attach, by the `/proc/PID/fd` link).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    Unknown = 0,
    File = 1,
    Socket = 2,
    Pipe = 3,
    Eventfd = 4,
    Epoll = 5,
    Timerfd = 6,
    Signalfd = 7,
    Inotify = 8,
    Fanotify = 9,
    Memfd = 10,
    Userfaultfd = 11,
    PerfEvent = 12,
    Bpf = 13,
    IoUring = 14,
    Pidfd = 15,
    Mount = 16,
    Mqueue = 17,
}

/// Number of [`FdKind`] values; the size of the per-kind live counters.
pub const FD_KINDS: usize = 18;

impl FdKind {
    pub const ALL: [FdKind; FD_KINDS] = [
        FdKind::Unknown,
        FdKind::File,
        FdKind::Socket,
        FdKind::Pipe,
        FdKind::Eventfd,
        FdKind::Epoll,
        FdKind::Timerfd,
        FdKind::Signalfd,
        FdKind::Inotify,
        FdKind::Fanotify,
        FdKind::Memfd,
        FdKind::Userfaultfd,
        FdKind::PerfEvent,
        FdKind::Bpf,
        FdKind::IoUring,
        FdKind::Pidfd,
        FdKind::Mount,
        FdKind::Mqueue,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FdKind::Unknown => "unknown",
            FdKind::File => "file",
            FdKind::Socket => "socket",
            FdKind::Pipe => "pipe",
            FdKind::Eventfd => "eventfd",
            FdKind::Epoll => "epoll",
            FdKind::Timerfd => "timerfd",
            FdKind::Signalfd => "signalfd",
            FdKind::Inotify => "inotify",
            FdKind::Fanotify => "fanotify",
            FdKind::Memfd => "memfd",
            FdKind::Userfaultfd => "userfaultfd",
            FdKind::PerfEvent => "perf_event",
            FdKind::Bpf => "bpf",
            FdKind::IoUring => "io_uring",
            FdKind::Pidfd => "pidfd",
            FdKind::Mount => "mount",
            FdKind::Mqueue => "mqueue",
        }
    }

    pub const fn from_u8(v: u8) -> FdKind {
        if (v as usize) < FD_KINDS {
            FdKind::ALL[v as usize]
        } else {
            FdKind::Unknown
        }
    }
}

/// Key of the live-fd map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
}

/// `FdInfo::flags`: the fd is closed by execve.
pub const FD_CLOEXEC: u8 = 1 << 0;
/// `FdInfo::flags`: the fd was open before fdtrace saw it (seeded at attach
/// by the walk of the process's fd table).
pub const FD_PREEXISTING: u8 = 1 << 1;

/// `FdInfo::flags`: fdtrace missed the fd's creation (a blind spot) and added
/// it when it resynced with /proc; `created_ns` is the resync time.
pub const FD_RESYNCED: u8 = 1 << 2;

/// `FdInfo::flags`: the number was reused before the close of its previous
/// fd reached fdtrace (threads racing on one table); that late close clears
/// this flag instead of removing the new fd.
pub const FD_CLOSE_PENDING: u8 = 1 << 3;

/// `FdInfo::flags`: the fd is open. A close clears every flag and leaves the
/// entry in place, so the next fd with that number is written over it
/// instead of allocating a map element (fds reuse the lowest free number:
/// a process's entries stay below its peak fd count). Entries without this
/// flag are not fds; they go when the process exits.
pub const FD_OPEN: u8 = 1 << 4;

/// `FdInfo::site` when no call site was recorded.
pub const NO_SITE: u64 = u64::MAX;
/// `FdInfo::site`: the STACKS id is in the low 32 bits (ids are below the
/// map's size); the high 32 hold the low 32 bits of the return address into
/// the caller of frame 0's function, once user space has told the kernel
/// where that is kept (CALLER_SLOTS). Two callers of one libc wrapper that
/// has no frame pointer can get one kernel stack; these bits keep their
/// sites apart, and each gets its own saved window (WINDOWS).
pub const SITE_CALLER_SHIFT: u32 = 32;
/// The STACKS id of an `FdInfo::site` (neither NO_SITE nor SITE_NOT_SAMPLED).
pub const fn site_stack_id(site: u64) -> u32 {
    site as u32
}
/// The index of the lowest set bit of `w` (not 0), for the kernel side's
/// walks over fd bitmaps: BPF has no instruction for it (LLVM's expansion
/// of `trailing_zeros` needs a table, and a table would be a map).
#[inline(always)]
pub fn lowest_bit(w: u64) -> u32 {
    let b = w & w.wrapping_neg();
    let mut i = 0;
    if b & 0xffff_ffff_0000_0000 != 0 {
        i += 32;
    }
    if b & 0xffff_0000_ffff_0000 != 0 {
        i += 16;
    }
    if b & 0xff00_ff00_ff00_ff00 != 0 {
        i += 8;
    }
    if b & 0xf0f0_f0f0_f0f0_f0f0 != 0 {
        i += 4;
    }
    if b & 0xcccc_cccc_cccc_cccc != 0 {
        i += 2;
    }
    if b & 0xaaaa_aaaa_aaaa_aaaa != 0 {
        i += 1;
    }
    i
}

/// `FdInfo::site` when the stack was not taken because the process was over
/// its stack budget (see `ProcStats::stack_slot`).
pub const SITE_NOT_SAMPLED: u64 = u64::MAX - 1;

/// Value of the live-fd map: one per fd number a traced process has used,
/// open when [`FD_OPEN`] is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdInfo {
    /// `bpf_ktime_get_ns()` when the fd was created (0 for pre-existing fds).
    pub created_ns: u64,
    /// Call-site id (user stack id); [`NO_SITE`] when not recorded.
    pub site: u64,
    /// Python processes: the Python stack that created the fd (an id in
    /// PY_STACKS), or [`python::NO_PY_STACK`].
    pub py_site: u64,
    /// Sockets of Python processes: the Python stack of their first send,
    /// [`python::NO_PY_STACK`] before it, [`python::PY_USE_UNSAMPLED`] when
    /// it was seen without a stack.
    pub py_use: u64,
    /// Syscall number that created the fd (`u16::MAX` when pre-existing).
    pub syscall: u16,
    /// [`FdKind`] as u8.
    pub kind: u8,
    /// [`FD_OPEN`] | [`FD_CLOEXEC`] | [`FD_PREEXISTING`] | [`FD_RESYNCED`] |
    /// [`FD_CLOSE_PENDING`].
    pub flags: u8,
    /// Sockets from socket(2): `family << 16 | type` (SOCK_TYPE_MASK bits),
    /// so an unbound socket still has a protocol; 0 otherwise.
    pub detail: u32,
}

/// `ProcStats::flags`: children forked by this process are traced too.
pub const PROC_FOLLOW: u32 = 1 << 0;
/// `ProcStats::flags`: the process shares its fd table with another process
/// (clone with CLONE_FILES and without CLONE_THREAD); counts may drift and
/// user space resyncs.
pub const PROC_SHARED_TABLE: u32 = 1 << 1;
/// `ProcStats::flags`: the kernel side began tracing the process on its own
/// (node mode: a fork of an untraced parent, an exec or a move into a
/// selected cgroup) without knowing its fds: user space seeds its table
/// with the seed walk, as at attach.
pub const PROC_ADOPTED: u32 = 1 << 2;
/// `ProcStats::flags`: the process was forked by a followed parent and
/// its close-on-exec fds from then are still its parent's entries: the
/// LAZY map holds which of them it holds (one bit per fd, from the kernel's
/// fd table at fork), and a lookup of such an fd resolves to the parent's
/// entry. Most forks exec at once, and exec closes those fds: copying them
/// at fork was most of the cost of forking a process holding many fds.
/// The flag goes at exec.
pub const PROC_LAZY: u32 = 1 << 4;
/// `ProcStats::flags`: traced because node mode's cgroup selection names
/// it (not because it was given with `--pid` or forked by such a process):
/// it stops being traced when it is moved out of the selection.
pub const PROC_NODE: u32 = 1 << 3;
/// `ProcStats::flags`, set by user space only: the seed walk of the
/// process's fd table saw none of the fds /proc lists for it, so the kernel
/// side cannot be trusted to see its changes either (the sandbox init of
/// some hosts: no task_file visit, no syscall tracepoint). User space
/// recounts it from /proc at every report.
pub const PROC_HIDDEN: u32 = 1 << 5;

/// `NODE_MODE` (a global of the eBPF object): processes are traced only
/// when user space registers them (or a followed parent forks).
pub const NODE_OFF: u32 = 0;
/// `NODE_MODE`: every process of the host but kernel threads and fdtrace.
pub const NODE_ALL: u32 = 1;
/// `NODE_MODE`: the processes of the cgroups in the NODE_CGROUPS map and
/// every cgroup below them.
pub const NODE_CGROUPS: u32 = 2;
/// Deepest cgroup level the kernel side looks up from a process's cgroup
/// to find a selected ancestor (kubelet layouts are 3 to 5 deep).
pub const CGROUP_MAX_DEPTH: u32 = 32;

/// Per traced process (tgid) state, in a STATS slot.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcStats {
    /// Fds created since tracing started (pre-existing ones not included:
    /// see `seeded`).
    pub opened: u64,
    /// Fds closed since tracing started (explicit, implicit by dup2/dup3,
    /// close_range, close-on-exec).
    pub closed: u64,
    /// Fd-creating calls that failed with EMFILE (per-process limit).
    pub emfile: u64,
    /// Fd-creating calls that failed with ENFILE (system-wide limit).
    pub enfile: u64,
    /// Bumped on every change to this process's fd table; user space compares
    /// it around a /proc read to know that read was consistent.
    pub generation: u64,
    /// Times the kernel side could not be exact (a user-memory read failed, a
    /// full map, more fds than a loop may visit); user space resyncs.
    pub inexact: u64,
    /// Fds already open when tracing of the process began: found by the
    /// walk of its table at attach, or copied from the parent's at fork.
    /// `live() == seeded + opened - closed` at every moment the counters
    /// are read consistently.
    pub seeded: u64,
    /// One past the highest fd number seen: bound of the loops over the table.
    pub fd_hwm: u32,
    /// `PROC_*` flags.
    pub flags: u32,
    /// Open fds by [`FdKind`].
    pub by_kind: [u64; FD_KINDS],
    /// Stack budget: the 100 ms slot (`ktime / 100ms`) of the last stack
    /// taken, and how many were taken in it. Walking a user stack is most of
    /// the cost of a traced fd creation; past the budget fds get
    /// SITE_NOT_SAMPLED.
    pub stack_slot: u64,
    pub stacks_in_slot: u64,
    /// Fds created without a stack: over budget, or the stack map took no
    /// new stack (fdtrace-ebpf stack.rs).
    pub not_sampled: u64,
    /// The process's cgroup v2 id (`kernfs_node.id`, the inode of the
    /// cgroup's directory) as the kernel side last saw it: written when it
    /// registers the process (fork, node mode's adoption) and at every
    /// move of the process (`cgroup_attach_task`). 0 for a process user
    /// space registered and that has not moved since: user space reads
    /// its cgroup from /proc then.
    pub cgroup: u64,
    /// Whose counters these are: a STATS slot is reused after its process
    /// exits, and a reader checks this against the tgid it looked up.
    pub tgid: u32,
    /// With [`PROC_LAZY`]: the parent whose entries the inherited fds
    /// resolve to, when the fork was (bpf_ktime_get_ns), and one past the
    /// highest fd number the LAZY bits cover.
    pub lazy_parent: u32,
    pub fork_ns: u64,
    /// When this entry was made (bpf_ktime_get_ns, or CLOCK_MONOTONIC when
    /// user space made it): a later process under the same pid is a later
    /// entry, so a reader tells the two apart without reading /proc.
    pub registered_ns: u64,
    pub lazy_end: u32,
    /// Odd while the seed walk writes one of this process's fds (its
    /// entry, `seeded`, `by_kind`, `fd_hwm`): a fork reads the parent's
    /// counts and high-water mark when it is even and unchanged across the
    /// read, so the child's counts and LAZY bits cover the same fds.
    pub seed_seq: u32,
    /// Which fd numbers below `64 * ENTRY_WORDS` may have an FDS entry:
    /// bit `fd % 64` of word `fd / 64`, set by the kernel side when it
    /// writes an entry and never cleared while the process lives (a
    /// superset). Exec and exit visit only these numbers (and every number
    /// from `64 * ENTRY_WORDS` up to `fd_hwm`): a process that inherits one
    /// high fd has a high-water mark far above the few numbers it uses, and
    /// a fork+exec child's exit deleted a missing entry per number, 252
    /// here. User space, whose writes of this value may lose a bit the
    /// kernel set meanwhile, writes every bit set (see [`ProcStats::mark_all_entries`]).
    pub entries: [u64; ENTRY_WORDS],
}

/// Words of [`ProcStats::entries`]: fds 0 to 255.
pub const ENTRY_WORDS: usize = 4;

/// Where fd `fd`'s bit is in [`ProcStats::entries`]: a word index and the
/// bit, 0 for the numbers the words do not cover. The index is taken
/// modulo ENTRY_WORDS rather than checked first (it is then some word for
/// an uncovered fd, whose bit is 0): a check that LLVM places on another
/// copy of `fd` than the one the address is computed from leaves the
/// verifier with an unbounded offset into the map value.
pub const fn entry_index(fd: u32) -> (usize, u64) {
    let w = ((fd / 64) as usize) % ENTRY_WORDS;
    let bit = if fd < 64 * ENTRY_WORDS as u32 {
        1 << (fd % 64)
    } else {
        0
    };
    (w, bit)
}

/// Whether a number whose bit in [`ProcStats::entries`] is `bit` (from
/// [`entry_index`]) may have an FDS entry, the word being `v`: one the
/// words do not cover always may.
pub const fn may_have_entry(v: u64, bit: u64) -> bool {
    bit == 0 || v & bit != 0
}

impl ProcStats {
    /// Open fds right now: the per-kind counts summed (wrapping: a kind
    /// user space renamed may sit below zero in the kernel's count, see
    /// KindFix, and the sum is still exact).
    pub fn live(&self) -> u64 {
        self.by_kind.iter().fold(0u64, |a, &k| a.wrapping_add(k))
    }

    /// Moves on every change to the fd table: `generation` is bumped by
    /// changes that move neither `opened` nor `closed` (each only grows),
    /// so that an open or a close costs no third atomic add.
    pub fn changes(&self) -> u64 {
        self.generation
            .wrapping_add(self.opened)
            .wrapping_add(self.closed)
    }

    pub const fn new(tgid: u32, flags: u32) -> Self {
        ProcStats {
            tgid,
            lazy_parent: 0,
            fork_ns: 0,
            registered_ns: 0,
            lazy_end: 0,
            seed_seq: 0,
            opened: 0,
            closed: 0,
            emfile: 0,
            enfile: 0,
            generation: 0,
            inexact: 0,
            seeded: 0,
            fd_hwm: 0,
            flags,
            by_kind: [0; FD_KINDS],
            stack_slot: 0,
            stacks_in_slot: 0,
            not_sampled: 0,
            cgroup: 0,
            entries: [0; ENTRY_WORDS],
        }
    }

    /// Every number may have an entry: what user space writes with the
    /// counters, so that a bit the kernel side set between its read and
    /// its write is not lost (the kernel side only sets bits).
    pub fn mark_all_entries(&mut self) {
        self.entries = [u64::MAX; ENTRY_WORDS];
    }
}

/// Event kinds sent through the ring buffer.
pub const EV_FORK: u32 = 1;
pub const EV_EXEC: u32 = 2;
pub const EV_EXIT: u32 = 3;
pub const EV_EMFILE: u32 = 4;
pub const EV_ENFILE: u32 = 5;
/// A traced process's RLIMIT_NOFILE changed (setrlimit, or prlimit64 from
/// any process).
pub const EV_RLIMIT: u32 = 6;
/// Node mode began tracing the process on its own (see PROC_ADOPTED):
/// user space seeds its table.
pub const EV_ADOPT: u32 = 7;
/// Node mode stopped tracing the process (a PROC_NODE one): it was moved
/// out of the selected cgroups. The counters are its last ones; its kernel
/// state is freed, as at exit.
pub const EV_LEAVE: u32 = 8;
/// Node mode with `--container` / `--pod`: a process is in a cgroup v2
/// (id in `site`) user space was not told of yet, which it resolves to a
/// container and pod and selects if a filter names it.
pub const EV_CGROUP: u32 = 9;

/// Bytes of the events ring buffer (EVENTS).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// How often user space drains the events ring buffer between reports, in
/// ms, while events come. The kernel side submits events without waking
/// the reader: a wake-up is an interrupt the submitting CPU raises on
/// itself (irq_work), which on a VM is a trap to the hypervisor, and it was
/// most of the time of the fork and exit programs (tens of us a fork+exec
/// under `--all`).
pub const EVENTS_DRAIN_MS: u64 = 20;

/// How long user space waits to drain the ring again after a drain that
/// found nothing, in ms: a timer's wake-up costs too.
pub const EVENTS_IDLE_DRAIN_MS: u64 = 200;

/// Pending bytes in the events ring buffer from which a submit wakes the
/// reader at once: a burst (a fork storm) is drained before it fills the
/// ring, not at the next drain.
pub const EVENTS_WAKE_BYTES: u64 = 64 * 1024;

/// A ring-buffer event. Per-fd changes are not streamed: they live in the maps.
/// Only process lifecycle and failures travel, so the stream cannot be flooded
/// by a process that churns fds.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub ts_ns: u64,
    pub kind: u32,
    /// Process the event is about.
    pub tgid: u32,
    /// EV_FORK: the parent tgid. Otherwise the thread id.
    pub aux: u32,
    /// Syscall number (EV_EMFILE/EV_ENFILE), 0 otherwise.
    pub syscall: u32,
    /// Counters at the time of the event (final ones for EV_EXIT).
    pub live: u64,
    pub opened: u64,
    pub closed: u64,
    /// EV_EMFILE/EV_ENFILE: the failing call's user stack id, or NO_SITE.
    /// EV_CGROUP: the cgroup v2 id.
    pub site: u64,
    /// EV_EXEC: fds numbered 3 and up that survived exec (inherited without
    /// close-on-exec).
    pub inherited: u32,
    pub _pad: u32,
    /// The task's comm when the event happened (NUL-padded): a short-lived
    /// process may be gone before user space could read /proc.
    pub comm: [u8; 16],
    /// EV_EMFILE/EV_ENFILE of the open family: the path asked for (NUL-padded,
    /// truncated).
    pub path: [u8; EVENT_PATH_LEN],
}

pub const EVENT_PATH_LEN: usize = 64;

/// Words of user stack saved per call-site stack (see [`StackWindow`]).
pub const WINDOW_WORDS: usize = 64;

/// The top of the user stack when a call site was first seen. A libc syscall
/// wrapper built without frame pointers hides its caller from the
/// frame-pointer walk; that caller's return address is in these words, and
/// user space finds it there.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackWindow {
    /// Words at the user stack pointer, lowest address first.
    pub words: [u64; WINDOW_WORDS],
    /// The user stack pointer (address of `words[0]`) and frame pointer.
    pub sp: u64,
    pub bp: u64,
}

/// One open fd of a process, as the seed iterator (`iter/task_file`) writes
/// it to user space; `path_len` bytes of the fd's link text (what
/// readlink(/proc/PID/fd/N) shows, NUL included) follow.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeedRecord {
    pub fd: u32,
    /// [`SEED_CLOEXEC`] | [`SEED_NO_CLOEXEC`] | [`SEED_NO_PATH`].
    pub flags: u32,
    pub path_len: u32,
    /// The process whose table holds the fd (a walk of every task's table
    /// interleaves processes).
    pub tgid: u32,
}

/// `SeedRecord::flags`: the fd is closed by execve.
pub const SEED_CLOEXEC: u32 = 1 << 0;
/// `SeedRecord::flags`: the close-on-exec bit could not be read.
pub const SEED_NO_CLOEXEC: u32 = 1 << 2;
/// `SeedRecord::flags`: the kernel could not name the file (path_len is 0).
pub const SEED_NO_PATH: u32 = 1 << 1;
/// Longest link text a seed record carries (PATH_MAX).
pub const SEED_PATH_MAX: usize = 4096;

/// One open fd of a process as the kernel map has it, written by the
/// entries iterator (`iter/task_file`) for every fd in the process's table
/// that has an open entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EntryRecord {
    pub fd: u32,
    pub _pad: u32,
    pub info: FdInfo,
}

/// Indexes into the global counters array.
pub const CNT_RINGBUF_FULL: u32 = 0;
pub const CNT_FDS_MAP_FULL: u32 = 1;
pub const CNT_PROCS_MAP_FULL: u32 = 2;
pub const CNT_LEN: u32 = 3;

/// Key of the LAZY map: a lazily forked process and a chunk of
/// [`LAZY_CHUNK_FDS`] fd numbers, whose value is one bit per fd
/// (`[u64; LAZY_WORDS]`): set while the process holds that inherited
/// close-on-exec fd without an entry of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LazyKey {
    pub tgid: u32,
    pub chunk: u32,
}

/// Words of a LAZY value, and the fd numbers one covers.
pub const LAZY_WORDS: usize = 16;
pub const LAZY_CHUNK_FDS: u32 = 64 * LAZY_WORDS as u32;

/// A kernel struct member offset user space has not set (it reads them
/// from the kernel's BTF and sets them as globals before load).
pub const NO_FIELD: u32 = u32::MAX;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data; every byte is a field (padding is explicit).
    unsafe impl aya::Pod for super::FdKey {}
    unsafe impl aya::Pod for super::FdInfo {}
    unsafe impl aya::Pod for super::ProcStats {}
    unsafe impl aya::Pod for super::LazyKey {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::StackWindow {}
}

// Layouts are shared with the kernel: a size change is an ABI change.
const _: () = assert!(core::mem::size_of::<FdKey>() == 8);
const _: () = assert!(core::mem::size_of::<SeedRecord>() == 16);
const _: () = assert!(core::mem::size_of::<FdInfo>() == 40);
const _: () = assert!(core::mem::size_of::<EntryRecord>() == 48);
const _: () = assert!(
    core::mem::size_of::<ProcStats>() == 12 * 8 + 8 + 8 * FD_KINDS + 8 + 16 + 8 * ENTRY_WORDS
);
const _: () = assert!(core::mem::size_of::<LazyKey>() == 8);
const _: () = assert!(core::mem::size_of::<Event>() == 64 + 16 + EVENT_PATH_LEN);

#[cfg(test)]
mod tests {
    use super::{ENTRY_WORDS, ProcStats, entry_index, lowest_bit, may_have_entry};

    #[test]
    fn entry_bits_cover_the_low_numbers_and_assume_an_entry_above() {
        let mut st = ProcStats::new(1, 0);
        let may = |st: &ProcStats, fd: u32| {
            let (w, bit) = entry_index(fd);
            may_have_entry(st.entries[w], bit)
        };
        let top = 64 * ENTRY_WORDS as u32;
        assert!((0..top).all(|fd| !may(&st, fd)));
        assert!(may(&st, top) && may(&st, u32::MAX));
        for fd in [0, 63, 64, 200, top - 1] {
            let (w, bit) = entry_index(fd);
            assert!(w < ENTRY_WORDS && bit != 0, "fd {fd}: ({w}, {bit:#x})");
            st.entries[w] |= bit;
        }
        let marked: Vec<u32> = (0..top).filter(|&fd| may(&st, fd)).collect();
        assert_eq!(marked, [0, 63, 64, 200, top - 1]);
        for fd in [top, top + 63, u32::MAX] {
            let (w, bit) = entry_index(fd);
            assert!(w < ENTRY_WORDS && bit == 0, "fd {fd}: ({w}, {bit:#x})");
        }
        st.mark_all_entries();
        assert!((0..top).all(|fd| may(&st, fd)));
    }

    #[test]
    fn lowest_bit_of_every_single_bit_and_of_mixed_words() {
        for i in 0..64 {
            assert_eq!(lowest_bit(1 << i), i);
            assert_eq!(lowest_bit(u64::MAX << i), i);
        }
        for w in [
            0b111u64,
            0x8000_0000_0000_0001,
            0x0010_0000_0000_0000,
            0xdead_beef_0000,
        ] {
            assert_eq!(lowest_bit(w), w.trailing_zeros());
        }
    }
}
