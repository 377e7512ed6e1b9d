//! Loads and attaches the eBPF programs, after checking what they need from
//! the machine: privileges, kernel BTF, a mounted tracefs.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, Queue, RingBuf, StackTraceMap},
    programs::{BtfTracePoint, Iter, ProgramFd, TracePoint},
};
use fdtrace_common::{
    FdInfo, FdKey, NO_FIELD, ProcStats, StackWindow,
    python::{PyLayout, PyStack},
};

use crate::error::Fatal;

const TRACEFS: &str = "/sys/kernel/tracing";
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
    pub windows: HashMap<MapData, u32, StackWindow>,
    pub events: Option<RingBuf<MapData>>,
    /// Python processes: tgid -> where their CPython keeps its frames.
    pub py_layouts: HashMap<MapData, u32, PyLayout>,
    /// Python stacks by id (FdInfo::py_site, py_use).
    pub py_stacks: HashMap<MapData, u64, PyStack>,
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
}

impl Kernel {
    pub fn load(limits: &Limits) -> Result<Self> {
        let (mut ebpf, btf) = open(limits)?;
        attach_btf(&mut ebpf, &btf, "fdtrace_sys_exit", "sys_exit")?;
        // Loaded now, so that a verifier refusal shows at start; attached
        // once a traced process runs a supported CPython: every syscall of
        // every process pays for an attached program.
        let py: &mut BtfTracePoint = program(&mut ebpf, PY_PROG)?.try_into()?;
        py.load("sys_exit", &btf)
            .with_context(|| format!("loading {PY_PROG}"))?;
        for (prog, event) in [
            ("fdtrace_fork", "sched_process_fork"),
            ("fdtrace_exit", "sched_process_exit"),
        ] {
            let p: &mut TracePoint = program(&mut ebpf, prog)?.try_into()?;
            p.load().with_context(|| format!("loading {prog}"))?;
            p.attach("sched", event)
                .with_context(|| format!("attaching {prog} to sched/{event}"))?;
        }
        Ok(Kernel {
            seed: task_file_iter(&mut ebpf, &btf, "fdtrace_seed")?,
            names: task_file_iter(&mut ebpf, &btf, "fdtrace_names")?,
            entries: task_file_iter(&mut ebpf, &btf, "fdtrace_entries")?,
            procs: HashMap::try_from(take_map(&mut ebpf, "PROCS")?)?,
            stats: Array::try_from(take_map(&mut ebpf, "STATS")?)?,
            free_slots: free_slots(take_map(&mut ebpf, "FREE_SLOTS")?, limits.max_procs)?,
            fds: HashMap::try_from(take_map(&mut ebpf, "FDS")?)?,
            counters: Array::try_from(take_map(&mut ebpf, "COUNTERS")?)?,
            stacks: StackTraceMap::try_from(take_map(&mut ebpf, "STACKS")?)?,
            traced: Array::try_from(take_map(&mut ebpf, "TRACED")?)?,
            windows: HashMap::try_from(take_map(&mut ebpf, "WINDOWS")?)?,
            events: Some(RingBuf::try_from(take_map(&mut ebpf, "EVENTS")?)?),
            py_layouts: HashMap::try_from(take_map(&mut ebpf, "PY_LAYOUTS")?)?,
            py_stacks: HashMap::try_from(take_map(&mut ebpf, "PY_STACKS")?)?,
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
        if !self.python_attached {
            let p: &mut BtfTracePoint = program(&mut self.ebpf, PY_PROG)?.try_into()?;
            p.attach()
                .with_context(|| format!("attaching {PY_PROG} to tp_btf/sys_exit"))?;
            self.python_attached = true;
        }
        Ok(())
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

    /// Overwrites the counters of traced process `pid`.
    pub fn set_stats(&mut self, pid: u32, st: &ProcStats) -> Result<()> {
        let slot = self
            .procs
            .get(&pid, 0)
            .with_context(|| format!("pid {pid} is not traced"))?;
        self.stats.set(slot, st, 0)?;
        Ok(())
    }

    /// Starts tracing `pid` with `st` as the kernel side does at fork (see
    /// fdtrace-ebpf table.rs `register`). False when it is already traced.
    pub fn register(&mut self, pid: u32, st: &ProcStats) -> Result<bool> {
        if self.stats_of(pid).is_some() {
            return Ok(false);
        }
        let slot = self.free_slots.pop(0).map_err(|_| {
            anyhow!("no room to trace pid {pid}: every process slot is taken, raise --max-procs")
        })?;
        self.stats.set(slot, st, 0)?;
        match self.procs.insert(pid, slot, BPF_NOEXIST) {
            Ok(()) => {}
            Err(e) => {
                let mut free = *st;
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

/// Checks the machine, then loads the object with the tracepoint offsets of
/// this kernel and the map sizes asked for.
fn open(limits: &Limits) -> Result<(Ebpf, Btf)> {
    check_privileges()?;
    if !Path::new(BTF_VMLINUX).exists() {
        return Err(Fatal::Environment(format!(
            "kernel BTF not found at {BTF_VMLINUX}: fdtrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        ))
        .into());
    }
    let tracefs = ensure_tracefs()?;
    let fork_off = field_offset(&tracefs, "sched_process_fork", "child_pid")?
        .ok_or_else(|| anyhow!("sched_process_fork has no child_pid field on this kernel"))?;
    let exit_off = field_offset(&tracefs, "sched_process_exit", "group_dead")?.unwrap_or(NO_FIELD);
    // The kernel side counts per 100 ms; a non-zero rate keeps at least one.
    let per_slot = match limits.stack_rate {
        0 => 0,
        r => (r / 10).max(1),
    };
    let offsets = kernel_offsets()?;
    let mut loader = EbpfLoader::new();
    for (global, value) in &offsets {
        loader.override_global(global, value, true);
    }
    let ebpf = loader
        .override_global("STACKS_PER_SLOT", &per_slot, true)
        .override_global("FORK_CHILD_PID_OFF", &fork_off, true)
        .override_global("EXIT_GROUP_DEAD_OFF", &exit_off, true)
        .map_max_entries("FDS", limits.max_fds)
        .map_max_entries("PROCS", limits.max_procs)
        .map_max_entries("STATS", limits.max_procs)
        .map_max_entries("FREE_SLOTS", limits.max_procs)
        .map_max_entries("TRACED", pid_max())
        .load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/fdtrace"
        )))
        .context("loading the eBPF programs")?;
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    Ok((ebpf, btf))
}

/// Kernel struct offsets the fd-table iterators read at (see fdtrace-ebpf
/// seed.rs), from this kernel's BTF.
fn kernel_offsets() -> Result<[(&'static str, u32); 6]> {
    let data = fs::read(BTF_VMLINUX).with_context(|| format!("reading {BTF_VMLINUX}"))?;
    let btf = super::btf::Btf::parse(&data)?;
    let off = |s, m| btf.member_offset(s, m);
    Ok([
        ("FILE_F_PATH_OFF", off("file", "f_path")?),
        ("TASK_FILES_OFF", off("task_struct", "files")?),
        ("FILES_FDT_OFF", off("files_struct", "fdt")?),
        ("FDT_CLOEXEC_OFF", off("fdtable", "close_on_exec")?),
        ("TASK_PID_OFF", off("task_struct", "pid")?),
        ("TASK_TGID_OFF", off("task_struct", "tgid")?),
    ])
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

/// Capabilities fdtrace uses: loading BPF and reading perf/tracing data, and
/// reading other users' /proc/PID/fd.
fn check_privileges() -> Result<()> {
    const CAP_SYS_PTRACE: u32 = 19;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
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
    if missing.is_empty() {
        return Ok(());
    }
    Err(Fatal::Privileges(missing.join(", ")).into())
}

/// The sched tracepoints need tracefs; it is not mounted at boot everywhere.
fn ensure_tracefs() -> Result<PathBuf> {
    let dir = PathBuf::from(TRACEFS);
    if dir.join("events").is_dir() {
        return Ok(dir);
    }
    // SAFETY: plain mount(2) with static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 || !dir.join("events").is_dir() {
        let err = std::io::Error::last_os_error();
        return Err(Fatal::Environment(format!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({err}): run `mount -t tracefs nodev {TRACEFS}` and try again"
        ))
        .into());
    }
    Ok(dir)
}

/// Offset of `field` in a tracepoint record, from its format file:
/// `\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;`
fn field_offset(tracefs: &Path, event: &str, field: &str) -> Result<Option<u32>> {
    let path = tracefs.join("events/sched").join(event).join("format");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for line in text.lines() {
        let mut parts = line.trim().split(';').map(str::trim);
        let Some(decl) = parts.next().and_then(|d| d.strip_prefix("field:")) else {
            continue;
        };
        if decl.rsplit(' ').next() != Some(field) {
            continue;
        }
        let Some(off) = parts.find_map(|p| p.strip_prefix("offset:")) else {
            bail!("{}: no offset for {field}", path.display());
        };
        return Ok(Some(off.parse().with_context(|| {
            format!("{}: offset of {field}", path.display())
        })?));
    }
    Ok(None)
}
