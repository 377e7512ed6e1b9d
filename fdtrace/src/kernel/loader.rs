//! Loads and attaches the eBPF programs, after checking what they need from
//! the machine: capabilities and kernel BTF. Every hook is a BTF tracepoint
//! or an iterator: no tracefs, debugfs or mount is needed.
use std::{fs, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, Queue, RingBuf, StackTraceMap},
    programs::{BtfTracePoint, Iter, ProgramFd},
};
use fdtrace_common::{
    FdInfo, FdKey, LAZY_CHUNK_FDS, LAZY_WORDS, LazyKey, PROC_LAZY, ProcStats, StackWindow,
    python::{PyLayout, PyStack},
};

use crate::error::Fatal;

/// The Python half of the syscall hook (fdtrace-ebpf python.rs).
const PY_PROG: &str = "fdtrace_py_sys_exit";
const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The loaded programs and the maps user space works with. Dropping it
/// detaches every program and frees the maps.
pub struct Kernel {
    /// Traced processes: tgid -> slot in `stats`.
    pub procs: HashMap<MapData, u32, u32>,
    pub stats: Array<MapData, ProcStats>,
    pub free_slots: Queue<MapData, u32>,
    pub fds: HashMap<MapData, FdKey, FdInfo>,
    pub counters: Array<MapData, u64>,
    pub stacks: StackTraceMap<MapData>,
    pub traced: Array<MapData, u16>,
    pub windows: HashMap<MapData, u64, StackWindow>,
    /// Where callers' return addresses are, by syscall address (fdtrace-ebpf
    /// maps.rs CALLER_SLOTS); taken by the symbolizer, which finds them.
    pub caller_slots: Option<HashMap<MapData, u64, u32>>,
    /// Node mode's selected cgroup ids (see fdtrace-ebpf node.rs).
    pub node_cgroups: HashMap<MapData, u64, u8>,
    pub events: Option<RingBuf<MapData>>,
    /// Python processes: tgid -> where their CPython keeps its frames.
    pub py_layouts: HashMap<MapData, u32, PyLayout>,
    /// Python stacks by id (FdInfo::py_site, py_use).
    pub py_stacks: HashMap<MapData, u64, PyStack>,
    /// The Python process of each STATS slot (fdtrace-ebpf python.rs).
    py_slots: Array<MapData, u32>,
    /// Lazily inherited fds of processes forked by followed parents
    /// (PROC_LAZY): a bit per fd, by chunk.
    pub lazy: HashMap<MapData, LazyKey, [u64; LAZY_WORDS]>,
    /// fdtrace_py_sys_exit is attached (at the first Python process).
    python_attached: bool,
    /// The seed iterator (iter/task_file): seeds the map at attach and
    /// names the fds it finds (seed::list).
    pub seed: ProgramFd,
    /// The names iterator (iter/task_file): names the fds only (seed::list).
    pub names: ProgramFd,
    /// The entries iterator (iter/task_file), for seed::entries.
    pub entries: ProgramFd,
    /// Keeps the programs attached.
    ebpf: Ebpf,
}

/// Map sizes and what to record, from the command line.
pub struct Limits {
    pub max_fds: u32,
    pub max_procs: u32,
    /// User stacks taken per process per second (call sites); 0 for none.
    pub stack_rate: u32,
    /// `NODE_*`: what the kernel side traces on its own.
    pub node: u32,
    /// Node mode tells user space of each cgroup a process enters for the
    /// first time (EV_CGROUP): `--container` and `--pod`.
    pub watch_cgroups: bool,
}

impl Kernel {
    pub fn load(limits: &Limits) -> Result<Self> {
        let (mut ebpf, btf) = open(limits)?;
        // Before the hooks: a fork in node mode (or of a followed parent)
        // takes a slot as soon as the programs run, and an empty queue is
        // a process lost to a "full" map.
        let free_slots = free_slots(take_map(&mut ebpf, "FREE_SLOTS")?, limits.max_procs)?;
        for (prog, hook) in [
            ("fdtrace_sys_exit", "sys_exit"),
            ("fdtrace_fork", "sched_process_fork"),
            ("fdtrace_exit", "sched_process_exit"),
            ("fdtrace_cgroup_attach", "cgroup_attach_task"),
        ] {
            attach_btf(&mut ebpf, &btf, prog, hook)?;
        }
        // Loaded now, so that a verifier refusal shows at start; attached
        // (after fdtrace_sys_exit, whose entries it completes) once a traced
        // process runs a supported CPython: every syscall of every process
        // pays for an attached program.
        let py: &mut BtfTracePoint = program(&mut ebpf, PY_PROG)?.try_into()?;
        py.load("sys_exit", &btf)
            .with_context(|| format!("loading {PY_PROG}"))?;
        Ok(Kernel {
            seed: task_file_iter(&mut ebpf, &btf, "fdtrace_seed")?,
            names: task_file_iter(&mut ebpf, &btf, "fdtrace_names")?,
            entries: task_file_iter(&mut ebpf, &btf, "fdtrace_entries")?,
            procs: HashMap::try_from(take_map(&mut ebpf, "PROCS")?)?,
            stats: Array::try_from(take_map(&mut ebpf, "STATS")?)?,
            free_slots,
            fds: HashMap::try_from(take_map(&mut ebpf, "FDS")?)?,
            counters: Array::try_from(take_map(&mut ebpf, "COUNTERS")?)?,
            stacks: StackTraceMap::try_from(take_map(&mut ebpf, "STACKS")?)?,
            traced: Array::try_from(take_map(&mut ebpf, "TRACED")?)?,
            windows: HashMap::try_from(take_map(&mut ebpf, "WINDOWS")?)?,
            caller_slots: Some(HashMap::try_from(take_map(&mut ebpf, "CALLER_SLOTS")?)?),
            node_cgroups: HashMap::try_from(take_map(&mut ebpf, "NODE_CGROUP_IDS")?)?,
            events: Some(RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?)?),
            py_layouts: HashMap::try_from(take_map(&mut ebpf, "PY_LAYOUTS")?)?,
            py_stacks: HashMap::try_from(take_map(&mut ebpf, "PY_STACKS")?)?,
            py_slots: Array::try_from(take_map(&mut ebpf, "PY_SLOTS")?)?,
            lazy: HashMap::try_from(take_map(&mut ebpf, "LAZY")?)?,
            python_attached: false,
            ebpf,
        })
    }

    /// Takes Python stacks in process `pid`, which runs the CPython
    /// `layout` describes.
    pub fn trace_python(&mut self, pid: u32, layout: &PyLayout) -> Result<()> {
        self.py_layouts
            .insert(pid, layout, 0)
            .with_context(|| format!("writing the Python layout of pid {pid}"))?;
        // The mark the Python program checks first (after the layout, which
        // it then reads).
        if let Ok(slot) = self.procs.get(&pid, 0) {
            self.py_slots
                .set(slot, pid, 0)
                .with_context(|| format!("marking pid {pid} as a Python process"))?;
        }
        if !self.python_attached {
            let p: &mut BtfTracePoint = program(&mut self.ebpf, PY_PROG)?.try_into()?;
            p.attach()
                .with_context(|| format!("attaching {PY_PROG} to tp_btf/sys_exit"))?;
            self.python_attached = true;
        }
        Ok(())
    }

    /// Whether lazily forked process `st` holds inherited fd `fd` without
    /// an entry of its own (its LAZY bit).
    pub fn holds_lazily(&self, st: &ProcStats, fd: u32) -> bool {
        if st.flags & PROC_LAZY == 0 || fd >= st.lazy_end {
            return false;
        }
        let key = LazyKey {
            tgid: st.tgid,
            chunk: fd / LAZY_CHUNK_FDS,
        };
        let word = (fd % LAZY_CHUNK_FDS / 64) as usize;
        self.lazy
            .get(&key, 0)
            .is_ok_and(|bits| bits[word] & (1 << (fd % 64)) != 0)
    }

    pub fn counter(&self, idx: u32) -> u64 {
        self.counters.get(&idx, 0).unwrap_or(0)
    }

    /// The counters of traced process `pid`; None when it is not traced.
    pub fn stats_of(&self, pid: u32) -> Option<ProcStats> {
        let slot = self.procs.get(&pid, 0).ok()?;
        let st = self.stats.get(&slot, 0).ok()?;
        (st.tgid == pid).then_some(st)
    }

    /// Every traced process with its counters: one batch lookup and a
    /// syscall per process, where a key at a time costs three.
    pub fn traced_stats(&self) -> std::io::Result<Vec<(u32, ProcStats)>> {
        let slots = super::map_batch::traced(&self.procs)?;
        Ok(slots
            .into_iter()
            .filter_map(|(pid, slot)| {
                let st = self.stats.get(&slot, 0).ok()?;
                // A slot freed and taken again since the lookup.
                (st.tgid == pid).then_some((pid, st))
            })
            .collect())
    }

    /// Overwrites the counters of traced process `pid`, with every fd
    /// number marked as one that may have an entry (see
    /// `ProcStats::entries`: user space writes entries of its own, and its
    /// read-modify-write may lose a bit the kernel side set meanwhile).
    pub fn set_stats(&mut self, pid: u32, st: &ProcStats) -> Result<()> {
        let slot = self
            .procs
            .get(&pid, 0)
            .with_context(|| format!("pid {pid} is not traced"))?;
        let mut st = *st;
        st.mark_all_entries();
        self.stats.set(slot, st, 0)?;
        Ok(())
    }

    /// Starts tracing `pid` with `st` as the kernel side does at fork (see
    /// fdtrace-ebpf table.rs `register`). False when it is already traced.
    pub fn register(&mut self, pid: u32, st: &ProcStats) -> Result<bool> {
        refuse_kernel_thread(pid)?;
        if self.stats_of(pid).is_some() {
            return Ok(false);
        }
        let slot = self.free_slots.pop(0).map_err(|_| {
            anyhow!("no room to trace pid {pid}: every process slot is taken, raise --max-procs")
        })?;
        let st = ProcStats {
            registered_ns: super::monotonic_ns(),
            ..*st
        };
        self.stats.set(slot, st, 0)?;
        match self.procs.insert(pid, slot, BPF_NOEXIST) {
            Ok(()) => {}
            Err(e) => {
                let mut free = st;
                free.tgid = 0;
                let _ = self.stats.set(slot, free, 0);
                let _ = self.free_slots.push(slot, 0);
                if self.stats_of(pid).is_some() {
                    return Ok(false); // registered meanwhile by a traced parent's fork
                }
                return Err(e).with_context(|| format!("registering pid {pid} in the kernel map"));
            }
        }
        // A tgid past the array's end is found through PROCS.
        let _ = self.traced.set(pid, (slot + 1) as u16, 0);
        Ok(true)
    }

    /// Stops tracing `pid`, as the kernel side does at exit (fdtrace-ebpf
    /// table.rs `unregister`), for a process whose exit the kernel side
    /// could not see: gone or a zombie when registered, or its pid taken by
    /// another process. Its fd entries go too, so a next owner of the pid
    /// starts from nothing.
    pub fn unregister(&mut self, pid: u32) {
        let _ = self.traced.set(pid, 0, 0);
        let Ok(slot) = self.procs.get(&pid, 0) else {
            return;
        };
        let _ = self.procs.remove(&pid);
        if let Ok(mut st) = self.stats.get(&slot, 0) {
            st.tgid = 0;
            let _ = self.stats.set(slot, st, 0);
        }
        let _ = self.free_slots.push(slot, 0);
        let chunks: Vec<LazyKey> = self
            .lazy
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for key in chunks {
            let _ = self.lazy.remove(&key);
        }
        let mine: Vec<FdKey> = self
            .fds
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for key in mine {
            let _ = self.fds.remove(&key);
        }
    }
}

/// PF_KTHREAD, in the flags of /proc/PID/stat (include/linux/sched.h).
const PF_KTHREAD: u32 = 0x0020_0000;

fn has_kthread_flag(stat_flags: u32) -> bool {
    stat_flags & PF_KTHREAD != 0
}

/// Whether `pid` is a kernel thread (false when it cannot be read).
pub fn is_kernel_thread(pid: u32) -> bool {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .is_ok_and(|s| has_kthread_flag(s.flags))
}

/// A kernel thread has no fd table of its own (it runs on init's or none):
/// there is nothing to trace, and /proc/PID/fd is not its table.
fn refuse_kernel_thread(pid: u32) -> Result<()> {
    let flags = procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| s.flags);
    match flags {
        Ok(f) if has_kthread_flag(f) => Err(Fatal::Usage(format!(
            "pid {pid} is a kernel thread: it has no file descriptors of its own to trace"
        ))
        .into()),
        // Gone, or unreadable: the attach says so.
        _ => Ok(()),
    }
}

/// Loads iter/task_file program `name`; iterators are created from its fd
/// (see seed.rs), not attached here.
fn task_file_iter(ebpf: &mut Ebpf, btf: &Btf, name: &str) -> Result<ProgramFd> {
    let prog: &mut Iter = program(ebpf, name)?.try_into()?;
    prog.load("task_file", btf)
        .with_context(|| format!("loading {name} (iter/task_file)"))?;
    Ok(prog.fd()?.try_clone()?)
}

/// BPF_NOEXIST: insert only if absent.
const BPF_NOEXIST: u64 = 1;

/// Every STATS slot starts free.
fn free_slots(map: aya::maps::Map, n: u32) -> Result<Queue<MapData, u32>> {
    let mut q = Queue::try_from(map)?;
    for slot in 0..n {
        q.push(slot, 0).context("filling the free process slots")?;
    }
    Ok(q)
}

/// Checks the machine, then loads the object with the struct offsets of
/// this kernel and the map sizes asked for.
fn open(limits: &Limits) -> Result<(Ebpf, Btf)> {
    check_privileges()?;
    if !Path::new(BTF_VMLINUX).exists() {
        return Err(Fatal::Environment(format!(
            "kernel BTF not found at {BTF_VMLINUX}: fdtrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        ))
        .into());
    }
    // The kernel side counts per 100 ms; a non-zero rate keeps at least one.
    let per_slot = match limits.stack_rate {
        0 => 0,
        r => (r / 10).max(1),
    };
    let (offsets, exit_has_group_dead) = kernel_layout()?;
    let mut loader = EbpfLoader::new();
    for (global, value) in &offsets {
        loader.override_global(global, value, true);
    }
    let ebpf = loader
        .override_global("STACKS_PER_SLOT", &per_slot, true)
        .override_global("EXIT_HAS_GROUP_DEAD", &exit_has_group_dead, true)
        .override_global("NODE_MODE", &limits.node, true)
        .override_global("SELF_TGID", &std::process::id(), true)
        .override_global("NODE_WATCH", &u32::from(limits.watch_cgroups), true)
        .map_max_entries("FDS", limits.max_fds)
        .map_max_entries("PROCS", limits.max_procs)
        .map_max_entries("STATS", limits.max_procs)
        .map_max_entries("FREE_SLOTS", limits.max_procs)
        .map_max_entries("TRACED", pid_max())
        .map_max_entries("PY_SLOTS", limits.max_procs)
        // Chunks of lazily forked processes, from fork to exec: one each
        // up to 1024 fds (not preallocated).
        .map_max_entries("LAZY", limits.max_procs.saturating_mul(2))
        .load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/fdtrace"
        )))
        .context("loading the eBPF programs")?;
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    Ok((ebpf, btf))
}

/// From this kernel's BTF: the struct offsets the kernel side reads at (see
/// fdtrace-ebpf iter.rs), and 1 when sched_process_exit passes
/// `group_dead` (Linux 6.16+; before, the leader's exit ends the process).
fn kernel_layout() -> Result<(Vec<(&'static str, u32)>, u32)> {
    let data = fs::read(BTF_VMLINUX).with_context(|| format!("reading {BTF_VMLINUX}"))?;
    let btf = super::btf::Btf::parse(&data)?;
    let off = |s, m| btf.member_offset(s, m);
    let offsets = vec![
        ("FILE_F_PATH_OFF", off("file", "f_path")?),
        ("TASK_FILES_OFF", off("task_struct", "files")?),
        ("FILES_FDT_OFF", off("files_struct", "fdt")?),
        ("FDT_CLOEXEC_OFF", off("fdtable", "close_on_exec")?),
        ("FDT_FD_OFF", off("fdtable", "fd")?),
        ("FDT_OPEN_FDS_OFF", off("fdtable", "open_fds")?),
        ("FDT_MAX_FDS_OFF", off("fdtable", "max_fds")?),
        ("TASK_PID_OFF", off("task_struct", "pid")?),
        ("TASK_TGID_OFF", off("task_struct", "tgid")?),
        // Node mode (fdtrace-ebpf node.rs).
        ("TASK_FLAGS_OFF", off("task_struct", "flags")?),
        ("TASK_CGROUPS_OFF", off("task_struct", "cgroups")?),
        ("CSS_SET_DFL_CGRP_OFF", off("css_set", "dfl_cgrp")?),
        ("CGROUP_KN_OFF", off("cgroup", "kn")?),
        ("KERNFS_NODE_ID_OFF", off("kernfs_node", "id")?),
        (
            "CGROUP_PARENT_OFF",
            off("cgroup", "self")? + off("cgroup_subsys_state", "parent")?,
        ),
        ("CSS_CGROUP_OFF", off("cgroup_subsys_state", "cgroup")?),
    ];
    let exit_args = btf
        .tracepoint_args("sched_process_exit")
        .ok_or_else(|| anyhow!("kernel BTF has no sched_process_exit tracepoint"))?;
    Ok((offsets, u32::from(exit_args >= 2)))
}

/// Room for every tgid the kernel hands out now; a larger pid_max set later
/// only sends the new tgids through the slower PROCS lookup.
fn pid_max() -> u32 {
    fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1 << 22)
        .clamp(1, 1 << 22)
}

fn attach_btf(ebpf: &mut Ebpf, btf: &Btf, prog: &str, hook: &str) -> Result<()> {
    let p: &mut BtfTracePoint = program(ebpf, prog)?.try_into()?;
    p.load(hook, btf)
        .with_context(|| format!("loading {prog}"))?;
    p.attach()
        .with_context(|| format!("attaching {prog} to tp_btf/{hook}"))?;
    Ok(())
}

/// An empty program on fdtrace's syscall hook, for `cargo xtask bench`: what
/// the hook costs before fdtrace does any work. Detached when dropped.
pub fn noop_hooks(limits: &Limits) -> Result<Ebpf> {
    let (mut ebpf, btf) = open(limits)?;
    attach_btf(&mut ebpf, &btf, "noop_sys_exit", "sys_exit")?;
    Ok(ebpf)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set, from the `CapEff:` line of
/// /proc/self/status (hex); None when the text has no such line.
fn cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn effective_caps() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    cap_eff(&status).ok_or_else(|| anyhow!("/proc/self/status has no readable CapEff line"))
}

/// The capabilities of `eff` fdtrace cannot work without, by name, as
/// measured: loading and attaching the programs and maps needs CAP_BPF
/// and CAP_PERFMON (BTF tracepoints, stack maps, bpf_d_path and probe
/// reads; CAP_SYS_ADMIN stands for both, kernel/bpf/syscall.c
/// bpf_capable and perfmon_capable), and reading another process's
/// /proc/PID/fd, limits and maps needs CAP_SYS_PTRACE (ptrace_may_access).
fn missing_caps(eff: u64) -> Vec<&'static str> {
    let has = |cap: u32| eff & (1 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !(has(CAP_BPF) || admin) {
        missing.push("CAP_BPF");
    }
    if !(has(CAP_PERFMON) || admin) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    missing
}

/// Exits (Fatal::Privileges, exit code 1) naming every capability from
/// [`missing_caps`] fdtrace lacks.
fn check_privileges() -> Result<()> {
    let missing = missing_caps(effective_caps()?);
    if missing.is_empty() {
        return Ok(());
    }
    Err(Fatal::Privileges(missing.join(", ")).into())
}

/// Whether fdtrace may read the fd tables of other users' processes in
/// /proc: /proc/PID/fd is mode 0500, owned by the process's user, and only
/// CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE) lets anyone else list it or
/// read its links (fs/proc/fd.c). Without it such processes are counted,
/// and their fds named at attach, by the kernel's walk, but fds they open
/// later cannot be named from /proc: the caller says so once.
pub fn can_read_other_users_fds() -> bool {
    const CAP_DAC_OVERRIDE: u32 = 1;
    effective_caps().is_ok_and(|eff| eff & (1 << CAP_DAC_READ_SEARCH | 1 << CAP_DAC_OVERRIDE) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn caps(list: &[u32]) -> u64 {
        let mut v = 0;
        let mut i = 0;
        while i < list.len() {
            v |= 1 << list[i];
            i += 1;
        }
        v
    }

    #[test]
    fn kernel_threads_by_their_stat_flags() {
        // kthreadd and a user process (PF_RANDOMIZE), as
        // /proc/PID/stat shows them here.
        assert!(has_kthread_flag(2_129_984));
        assert!(!has_kthread_flag(4_194_304));
        assert!(!has_kthread_flag(0));
    }

    #[test]
    fn capeff_from_status() {
        let status = "Name:\tfdtrace\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000000c000080000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(
            cap_eff(status),
            Some(caps(&[CAP_SYS_PTRACE, CAP_PERFMON, CAP_BPF]))
        );
        assert_eq!(cap_eff("Name:\tx\n"), None);
        assert_eq!(cap_eff("CapEff:\tnot-hex\n"), None);
        assert_eq!(
            cap_eff("CapEff:\t1ffffffffffffffffff\n"),
            None,
            "wider than 64 bits"
        );
    }

    #[test]
    fn missing_capabilities_by_name() {
        assert_eq!(
            missing_caps(0),
            ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"]
        );
        assert!(missing_caps(caps(&[CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE])).is_empty());
        assert_eq!(
            missing_caps(caps(&[CAP_BPF, CAP_SYS_PTRACE])),
            ["CAP_PERFMON"]
        );
        assert_eq!(
            missing_caps(caps(&[CAP_BPF, CAP_PERFMON])),
            ["CAP_SYS_PTRACE"]
        );
        assert!(
            missing_caps(caps(&[CAP_SYS_ADMIN, CAP_SYS_PTRACE])).is_empty(),
            "CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON"
        );
        assert_eq!(
            missing_caps(caps(&[CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE])),
            ["CAP_BPF", "CAP_PERFMON"],
            "CAP_DAC_READ_SEARCH is not required"
        );
        // Root with every capability but CAP_SYS_RESOURCE (this machine).
        assert!(missing_caps(0x1fffeffffff).is_empty());
    }
}
