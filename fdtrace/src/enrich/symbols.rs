//! Call-site stacks: user stack ids recorded by the kernel side, symbolized
//! with blazesym while the process is alive, then cached. The mapped files
//! are read as the process sees them (see [`MappedFiles`]), so a
//! container's binaries symbolize from its own root filesystem.
use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    ops::Range,
    os::{
        fd::AsRawFd as _,
        unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Component, Path, PathBuf},
    rc::Rc,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use blazesym::{
    Pid,
    symbolize::{
        Input, Symbolized, Symbolizer,
        source::{Elf, Process as ProcSource, Source},
    },
};
use fdtrace_common::{NO_SITE, SITE_CALLER_SHIFT, SITE_NOT_SAMPLED, StackWindow, site_stack_id};
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, Register, RegisterRule,
    UnwindContext, UnwindSection as _, UnwindTableRow, X86_64,
};
use object::{
    Architecture, Endianness, Object as _, ObjectSection as _, ObjectSegment as _, ReadCache,
    read::elf::ElfFile64,
};
use procfs::process::{MMPermissions, MMapPath, MemoryMap, MemoryMaps, Process};

use crate::{analysis::Stack, kernel::Kernel};

/// Frames kept per stack, innermost first.
const MAX_FRAMES: usize = 16;

pub struct Symbols {
    symbolizer: Symbolizer,
    /// pid -> kernel stack id -> canonical site stack (hash of the
    /// repaired, validated frames): stack ids whose frames differ only in
    /// garbage past a frame without a frame pointer are one site.
    canon: HashMap<u32, HashMap<u64, u64>>,
    /// pid -> canonical stack -> symbolized frames.
    frames: HashMap<u32, HashMap<u64, Stack>>,
    cfi: CfiCache,
    files: MappedFiles,
    not_sampled: Stack,
    /// The stacks of a process without any.
    none: HashMap<u64, Stack>,
    /// The kernel's CALLER_SLOTS, told where a caller's return address is
    /// for each syscall address a window was unwound from (taken from
    /// [`Kernel::caller_slots`] when the session starts).
    caller_slots: Option<BpfHashMap<MapData, u64, u32>>,
    /// Syscall addresses told so far (or tried), each with the last
    /// process whose stack was unwound there.
    taught: HashMap<u64, u32>,
    /// A process was forgotten since `taught` was last swept for the
    /// addresses of exited teachers.
    forgot_since_sweep: bool,
    slots_failed: bool,
}

impl Symbols {
    pub fn new(caller_slots: Option<BpfHashMap<MapData, u64, u32>>) -> Self {
        Symbols {
            caller_slots,
            taught: Default::default(),
            forgot_since_sweep: false,
            slots_failed: false,
            symbolizer: Symbolizer::new(),
            canon: HashMap::new(),
            frames: HashMap::new(),
            cfi: CfiCache::default(),
            files: MappedFiles::default(),
            not_sampled: Rc::new(vec!["[not sampled: over --stack-rate]".to_string()]),
            none: HashMap::new(),
        }
    }

    /// The canonical stack of kernel stack `id` in process `pid` (NO_SITE
    /// when none was recorded). Symbolized on first sight, while the process
    /// is alive.
    pub fn site(&mut self, k: &Kernel, pid: u32, id: u64) -> u64 {
        if id == NO_SITE {
            return id;
        }
        if id == SITE_NOT_SAMPLED {
            self.frames
                .entry(pid)
                .or_default()
                .entry(id)
                .or_insert_with(|| self.not_sampled.clone());
            return id;
        }
        if let Some(&c) = self.canon.get(&pid).and_then(|c| c.get(&id)) {
            return c;
        }
        let (ips, slot) = self.frames_of(k, pid, id);
        if let (Some(slot), Some(&ip)) = (slot, ips.first()) {
            self.teach(pid, ip, slot);
        }
        let canon = if ips.is_empty() {
            NO_SITE
        } else {
            let mut h = DefaultHasher::new();
            ips.hash(&mut h);
            h.finish() & !(1 << 63) // never NO_SITE
        };
        let known = self
            .frames
            .get(&pid)
            .is_some_and(|f| f.contains_key(&canon));
        if canon != NO_SITE && !known {
            let maps = Process::new(pid as i32).and_then(|p| p.maps()).ok();
            let text = self.symbolize(pid, &ips, maps.as_ref());
            self.frames
                .entry(pid)
                .or_default()
                .insert(canon, Rc::new(text));
        }
        self.canon.entry(pid).or_default().insert(id, canon);
        canon
    }

    /// Makes `key` (a Python site of `pid`) show the frames of canonical
    /// stack `native`, unless it shows some already.
    pub fn alias(&mut self, pid: u32, key: u64, native: u64) {
        let frames = self.frames.entry(pid).or_default();
        if !frames.contains_key(&key)
            && let Some(s) = frames.get(&native).cloned()
        {
            frames.insert(key, s);
        }
    }

    /// "function (file:line)" where debug info exists, "function" from the
    /// symbol table, "module+0xoffset" otherwise; innermost first.
    pub fn frames(&self, pid: u32, canon: u64) -> Stack {
        self.stacks(pid).get(&canon).cloned().unwrap_or_default()
    }

    /// Every symbolized stack of `pid`, by canonical id.
    pub fn stacks(&self, pid: u32) -> &HashMap<u64, Stack> {
        self.frames.get(&pid).unwrap_or(&self.none)
    }

    /// Tells the kernel that at syscall address `ip` the caller's return
    /// address is `slot` bytes above the stack pointer: from then on, the
    /// sites of fds made there carry their caller (see SITE_CALLER_SHIFT).
    /// The map is full once the processes seen have taught it
    /// CALLER_SLOTS' 4096 addresses (each process's libraries load at
    /// addresses of their own): then the addresses only exited processes
    /// taught are let go, so that an always-on fdtrace keeps telling the
    /// callers of new processes apart. A live process at such an address
    /// gets a stack without its caller until it teaches the address again.
    fn teach(&mut self, pid: u32, ip: u64, slot: u32) {
        let Some(map) = self.caller_slots.as_mut() else {
            return;
        };
        if self.taught.insert(ip, pid).is_some() {
            return;
        }
        let mut told = map.insert(ip, slot, 0);
        // A sweep finds something only if a teacher exited since the last.
        if told.is_err() && std::mem::take(&mut self.forgot_since_sweep) {
            for gone in
                taught_by_the_gone(&self.taught, |p| self.canon.contains_key(&p) || p == pid)
            {
                self.taught.remove(&gone);
                let _ = map.remove(&gone);
            }
            told = map.insert(ip, slot, 0);
        }
        // Without the slot (every address taught by a live process),
        // callers of this address that the kernel's walk cannot tell apart
        // share the first one's frames; said once.
        if let Err(e) = told
            && !std::mem::replace(&mut self.slots_failed, true)
        {
            eprintln!(
                "fdtrace: recording where callers are kept at {ip:#x} failed ({e}): \
                 callers of one libc wrapper may show the first one's frames"
            );
        }
    }

    /// Drops what is known of a process that is gone (its summary, made
    /// at its exit, holds the frames it needs).
    pub fn forget(&mut self, pid: u32) {
        self.forgot_since_sweep = true;
        self.canon.remove(&pid);
        self.frames.remove(&pid);
    }

    /// The frames of kernel stack `id`, repaired where a function without
    /// frame pointers (libc's syscall wrappers, usually) hid its callers,
    /// and cut at the first frame that is not a return address (a walk that
    /// went astray through code without frame pointers); with where frame 0's
    /// caller's return address was (see [`repair`]).
    fn frames_of(&mut self, k: &Kernel, pid: u32, id: u64) -> (Vec<u64>, Option<u32>) {
        let Ok(trace) = k.stacks.get(&site_stack_id(id), 0) else {
            return (Vec::new(), None);
        };
        let mut ips: Vec<u64> = trace
            .frames()
            .iter()
            .map(|f| f.ip)
            .filter(|&ip| ip != 0)
            .take(MAX_FRAMES)
            .collect();
        let (Ok(maps), Ok(mem)) = (
            Process::new(pid as i32).and_then(|p| p.maps()),
            File::open(format!("/proc/{pid}/mem")),
        ) else {
            return (ips, None);
        };
        let mut slot = None;
        if let Ok(window) = k.windows.get(&id, 0)
            && !ips.is_empty()
        {
            let mut rules = |pc: u64| self.cfi.rules(&mut self.files, pid, &maps, pc);
            slot = repair(&mem, &window, &mut ips, &mut rules);
        }
        if let Some(bad) = (1..ips.len()).find(|&i| !is_return_address(&mem, &maps, ips[i])) {
            ips.truncate(bad);
        }
        // A site that carries its caller already came from a taught address.
        let slot = slot.filter(|_| id >> SITE_CALLER_SHIFT == 0);
        (ips, slot)
    }

    /// Names each frame. An address in a mapped file is symbolized from
    /// that very file, opened by [`MappedFiles`]; one in no file (the vDSO,
    /// JIT code with a perf map) by blazesym's process source, which then
    /// reads no file by its path in fdtrace's own root. A file that cannot
    /// be opened as the one mapped gives "module+offset", never the names of
    /// another file.
    fn symbolize(&mut self, pid: u32, ips: &[u64], maps: Option<&MemoryMaps>) -> Vec<String> {
        // A return address is symbolized by its call instruction: the call
        // that ends a function (to a noreturn callee) returns into the next.
        let at: Vec<u64> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| if i == 0 { ip } else { ip - 1 })
            .collect();
        let mut named: Vec<Option<String>> = vec![None; at.len()];
        // Per mapped file: its path for blazesym, and (frame, file offset).
        let mut in_files: Vec<(PathBuf, Vec<(usize, u64)>)> = Vec::new();
        let mut anonymous: Vec<usize> = Vec::new();
        for (i, &addr) in at.iter().enumerate() {
            let m = maps.and_then(|m| {
                m.iter()
                    .find(|m| (m.address.0..m.address.1).contains(&addr))
            });
            match m {
                Some(m) if matches!(m.pathname, MMapPath::Path(_)) && m.inode != 0 => {
                    let Some(path) = self.files.open(pid, m).map(|f| f.fd_path()) else {
                        continue;
                    };
                    let off = addr - m.address.0 + m.offset;
                    match in_files.iter_mut().find(|(p, _)| *p == path) {
                        Some((_, frames)) => frames.push((i, off)),
                        None => in_files.push((path, vec![(i, off)])),
                    }
                }
                Some(m) if matches!(m.pathname, MMapPath::Path(_)) => {}
                _ => anonymous.push(i),
            }
        }
        for (path, frames) in &in_files {
            let offsets: Vec<u64> = frames.iter().map(|&(_, off)| off).collect();
            let src = Source::Elf(Elf::new(path));
            let syms = self
                .symbolizer
                .symbolize(&src, Input::FileOffset(&offsets))
                .unwrap_or_default();
            for (&(i, _), sym) in frames.iter().zip(&syms) {
                named[i] = frame_name(sym);
            }
        }
        if !anonymous.is_empty() {
            let mut proc_src = ProcSource::new(Pid::from(pid));
            proc_src.map_files = false;
            let addrs: Vec<u64> = anonymous.iter().map(|&i| at[i]).collect();
            let syms = self
                .symbolizer
                .symbolize(&Source::Process(proc_src), Input::AbsAddr(&addrs))
                .unwrap_or_default();
            for (&i, sym) in anonymous.iter().zip(&syms) {
                named[i] = frame_name(sym);
            }
        }
        named
            .into_iter()
            .zip(ips)
            .map(|(name, &ip)| name.unwrap_or_else(|| module_offset(maps, ip)))
            .collect()
    }
}

/// The taught addresses whose teacher is no longer `alive`.
fn taught_by_the_gone(taught: &HashMap<u64, u32>, alive: impl Fn(u32) -> bool) -> Vec<u64> {
    taught
        .iter()
        .filter(|&(_, &pid)| !alive(pid))
        .map(|(&ip, _)| ip)
        .collect()
}

/// "function (file:line)" of a symbol whose extent is known and holds the
/// address: a static function of a stripped library is otherwise named after
/// the exported symbol before it.
fn frame_name(sym: &Symbolized<'_>) -> Option<String> {
    match sym {
        Symbolized::Sym(sym) if sym.size.is_some_and(|n| sym.offset < n) => {
            Some(match &sym.code_info {
                Some(ci) => match ci.line {
                    Some(line) => format!("{} ({}:{line})", sym.name, ci.file.to_string_lossy()),
                    None => format!("{} ({})", sym.name, ci.file.to_string_lossy()),
                },
                None => sym.name.to_string(),
            })
        }
        _ => None,
    }
}

/// "libfoo.so+0x1234" for an address no symbol covers.
fn module_offset(maps: Option<&MemoryMaps>, ip: u64) -> String {
    let found = maps.and_then(|m| {
        m.iter()
            .find(|m| (m.address.0..m.address.1).contains(&ip))
            .map(|m| {
                let name = match &m.pathname {
                    MMapPath::Path(p) => p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    other => format!("{other:?}"),
                };
                format!("{name}+{:#x}", ip - m.address.0 + m.offset)
            })
    });
    found.unwrap_or_else(|| format!("{ip:#x}"))
}

/// How to find a frame's caller at one instruction, from the call-frame
/// information (`.eh_frame`) that the x86-64 ABI requires of every function,
/// in the process's addresses.
#[derive(Debug)]
struct Rules {
    /// The function holding the instruction (its FDE's range).
    func: Range<u64>,
    /// The canonical frame address (the stack pointer before the call that
    /// made this frame): register (RSP or RBP) plus offset.
    cfa: (Register, i64),
    /// Where the return address is saved, from the CFA.
    ra: i64,
    /// Where the caller's RBP is.
    bp: SavedBp,
}

#[derive(Debug, Clone, Copy)]
enum SavedBp {
    /// Not changed by this function: the caller's RBP is the register.
    Same,
    /// Saved at this offset from the CFA.
    At(i64),
    /// Anything else (in a register, computed): not followed.
    Lost,
}

/// Repairs what the kernel's frame-pointer walk got wrong at the top of a
/// stack, from the words saved at the user stack pointer. Libc's syscall
/// wrappers are built without frame pointers: a thin one leaves RBP at its
/// caller's caller's frame, so the walk skips its caller; one that reuses
/// RBP (open64 keeps the path in it) sends the walk into garbage.
///
/// So the frames are unwound from the syscall by their call-frame
/// information, as far as the window reaches, and every frame found so must
/// be proven: its return address follows a call into the function of the
/// frame above (see [`calls_into`]). The first frame that is not proven ends
/// the stack: a wrong frame is worse than none. Where the unwinding reaches
/// the frame whose frame pointer is the RBP the kernel's walk started from,
/// the kernel's frames from there on are that frame's callers, and are kept;
/// otherwise they are dropped: they came from a reused register, or would
/// follow a gap. Without call-frame information for frame 0 (code of no
/// file) the kernel's frames stay as they are.
///
/// Returns where, in bytes above the stack pointer, frame 0's function
/// keeps its return address, when that frame was found and proven so from
/// a CFA on RSP: the same at every syscall from that address.
fn repair(
    mem: &File,
    w: &StackWindow,
    ips: &mut Vec<u64>,
    rules: &mut dyn FnMut(u64) -> Option<Rules>,
) -> Option<u32> {
    let word = |addr: u64| {
        let off = addr.checked_sub(w.sp).filter(|off| off % 8 == 0)?;
        w.words.get(usize::try_from(off / 8).ok()?).copied()
    };
    let mut read = |addr: u64, buf: &mut [u8]| mem.read_exact_at(buf, addr).is_ok();
    // Frame 0 is at the instruction after the syscall; a caller's frame at
    // its call instruction, the byte before its return address.
    let Some(mut r) = rules(ips[0]) else {
        // Nothing known of frame 0 (no file, no tables): the kernel's walk
        // stands as it is.
        return None;
    };
    let mut slot = None;
    let mut out = vec![ips[0]];
    let (mut ip, mut sp, mut bp) = (ips[0], w.sp, Some(w.bp));
    let mut kernel_tail = false;
    while out.len() < MAX_FRAMES {
        if r.cfa == (X86_64::RBP, 16) && r.ra == -8 && bp == Some(w.bp) {
            // This frame's record is at the RBP the kernel's walk started
            // from: its return address is the kernel's frame 1.
            kernel_tail = true;
            break;
        }
        let base = match r.cfa.0 {
            X86_64::RSP => Some(sp),
            X86_64::RBP => bp,
            _ => None,
        };
        let Some(cfa) = base.and_then(|b| b.checked_add_signed(r.cfa.1)) else {
            break;
        };
        let Some(ret) = cfa.checked_add_signed(r.ra).and_then(word) else {
            break;
        };
        let mut before = [0u8; 7];
        // A frame twice in a row is a stale copy of a return address, never
        // a caller the unwinding can prove.
        if ret == ip
            || ret < 7
            || !read(ret - 7, &mut before)
            || !calls_into(&before, ret, &r.func, &mut read)
        {
            break;
        }
        bp = match r.bp {
            SavedBp::Same => bp,
            SavedBp::At(off) => cfa.checked_add_signed(off).and_then(word),
            SavedBp::Lost => None,
        };
        if out.len() == 1 {
            slot = return_slot(r.cfa, r.ra);
        }
        out.push(ret);
        (ip, sp) = (ret, cfa);
        match rules(ret - 1) {
            Some(next) => r = next,
            None => break,
        }
    }
    if kernel_tail && ips.get(1) != Some(&ip) {
        out.extend(ips.iter().skip(1).take(MAX_FRAMES - out.len()));
    }
    *ips = out;
    slot
}

/// Where, in bytes above the stack pointer at the syscall, frame 0's
/// function keeps its return address: known only from a CFA on RSP (one on
/// RBP moves with the frame pointer, which differs from call to call).
fn return_slot(cfa: (Register, i64), ra: i64) -> Option<u32> {
    if cfa.0 != X86_64::RSP {
        return None;
    }
    u32::try_from(cfa.1.checked_add(ra)?).ok()
}

/// An address right after an x86-64 call: `e8 rel32`, `ff 15 disp32`,
/// `ff /2` with a register (2 bytes) or a disp8 memory operand (3 bytes).
fn is_return_address(mem: &File, maps: &MemoryMaps, addr: u64) -> bool {
    let executable = maps.iter().any(|m| {
        (m.address.0..m.address.1).contains(&(addr.wrapping_sub(1)))
            && m.perms.contains(MMPermissions::EXECUTE)
    });
    if !executable || addr < 7 {
        return false;
    }
    let mut b = [0u8; 7];
    if mem.read_exact_at(&mut b, addr - 7).is_err() {
        return false;
    }
    let modrm_call = |m: u8| m & 0x38 == 0x10;
    b[2] == 0xe8
        || (b[1] == 0xff && b[2] == 0x15)
        || (b[5] == 0xff && modrm_call(b[6]) && b[6] >= 0xc0)
        || (b[4] == 0xff && modrm_call(b[5]) && (0x40..0x80).contains(&b[5]))
}

/// Whether the call instruction that ends at `ret` (`before` holds the 7
/// bytes before it) calls into `callee`: a direct `e8 rel32`, to the function
/// or to a PLT stub (`jmp *slot(%rip)`, after an optional `endbr64` and
/// `bnd` prefix) whose slot holds an address in it; or `ff 15 disp32`, a
/// call through a slot (the GOT, with -fno-plt) likewise. `read` reads the
/// process's memory (the stub, the slot), as the call found them. A call
/// through a register cannot be proven.
fn calls_into(
    before: &[u8; 7],
    ret: u64,
    callee: &Range<u64>,
    read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
) -> bool {
    let disp = i64::from(i32::from_le_bytes([
        before[3], before[4], before[5], before[6],
    ]));
    let slot = |addr: u64, read: &mut dyn FnMut(u64, &mut [u8]) -> bool| {
        let mut b = [0u8; 8];
        read(addr, &mut b).then(|| u64::from_le_bytes(b))
    };
    if before[1] == 0xff && before[2] == 0x15 {
        return ret
            .checked_add_signed(disp)
            .and_then(|a| slot(a, read))
            .is_some_and(|t| callee.contains(&t));
    }
    if before[2] != 0xe8 {
        return false;
    }
    let Some(target) = ret.checked_add_signed(disp) else {
        return false;
    };
    if callee.contains(&target) {
        return true;
    }
    let mut stub = [0u8; 11];
    if !read(target, &mut stub) {
        return false;
    }
    let mut at = 0;
    if stub.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        at = 4;
    }
    if stub[at] == 0xf2 {
        at += 1;
    }
    if stub[at..at + 2] != [0xff, 0x25] {
        return false;
    }
    let jmp_disp = i64::from(i32::from_le_bytes([
        stub[at + 2],
        stub[at + 3],
        stub[at + 4],
        stub[at + 5],
    ]));
    // RIP-relative: from the end of the jmp.
    target
        .checked_add(at as u64 + 6)
        .and_then(|end| end.checked_add_signed(jmp_disp))
        .and_then(|a| slot(a, read))
        .is_some_and(|t| callee.contains(&t))
}

/// Call-frame information of the ELF files mapped by traced processes,
/// read once per file.
#[derive(Default)]
struct CfiCache {
    /// The file's tables, None when it has none.
    files: HashMap<FileId, Option<Cfi>>,
    /// Bytes of tables held.
    bytes: usize,
}

/// A mapped file: (device (major, minor), inode), as /proc/PID/maps shows
/// it.
type FileId = ((i32, i32), u64);

/// Most files kept open at once; past this the cache starts over (blazesym
/// keeps the files it parsed open on its own).
const MAX_MAPPED_FILES: usize = 512;

/// The files mapped by traced processes, each opened once as the very file
/// mapped and kept by its (device, inode), never by its path: two
/// containers' `/usr/lib/libc.so.6` are different files, and so are a
/// binary and the one that replaced it at its path.
///
/// Each is opened `O_PATH` (no read, so a FIFO or device put at the path
/// cannot block or act) through the first of [`candidates`] whose file
/// has the mapping's device and inode, then read through `/proc/self/fd/N`,
/// which reopens that file and no other. (Kernel 6.18 shows an overlayfs
/// file in maps with the device and inode its path stats to, measured.
/// Older kernels, before maps used `file_user_inode`, show the underlying
/// file's device instead: there a container's files would show as
/// module+offset, never with another file's names; not measured here.)
#[derive(Default)]
struct MappedFiles {
    open: HashMap<FileId, Rc<MappedFile>>,
}

/// A mapped file, opened `O_PATH` and checked.
struct MappedFile(File);

impl MappedFile {
    /// The path that reopens it, whatever happens to its path in the
    /// process's root.
    fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }

    /// The file opened for reading.
    fn reopen(&self) -> Option<File> {
        File::open(self.fd_path()).ok()
    }
}

impl MappedFiles {
    /// The file mapped at `m` in process `pid`, if it can be opened as that
    /// very file. A failure is not kept: the process may have been
    /// between two states, and another process maps the same file.
    fn open(&mut self, pid: u32, m: &MemoryMap) -> Option<Rc<MappedFile>> {
        let MMapPath::Path(path) = &m.pathname else {
            return None;
        };
        let id = (m.dev, m.inode);
        if let Some(f) = self.open.get(&id) {
            return Some(f.clone());
        }
        let file = candidates(Path::new(PROC), pid, m.address, path)
            .into_iter()
            .find_map(|c| open_as(&c, id))?;
        if self.open.len() >= MAX_MAPPED_FILES {
            self.open.clear();
        }
        let file = Rc::new(MappedFile(file));
        self.open.insert(id, file.clone());
        Some(file)
    }
}

/// fdtrace's own /proc: the host's pid namespace under the DaemonSet
/// (`hostPID`), where `--host-root` mounts nothing of /proc.
const PROC: &str = "/proc";

/// Where the file mapped at `range` from `path` (as /proc/PID/maps names
/// it) in process `pid` can be opened, best first:
/// - `/proc/PID/map_files/START-END`, the very file (deleted, or in another
///   mount namespace). Opening it needs CAP_SYS_ADMIN (or
///   CAP_CHECKPOINT_RESTORE), which the DaemonSet does not grant
///   (`map_files_get_link` in
///   https://github.com/torvalds/linux/blob/v6.18/fs/proc/base.c);
/// - the path under `/proc/PID/root`: in the process's own mount namespace,
///   a container's file and not the one fdtrace's root has at that path.
///   Only an absolute path with no `..` (the kernel's d_path never makes
///   one; a `..` at the process's root would climb out of it into the
///   host's tree); its symlinks, if a process swapped a directory for one,
///   may lead anywhere, which the device and inode check catches.
fn candidates(proc: &Path, pid: u32, range: (u64, u64), path: &Path) -> Vec<PathBuf> {
    let (start, end) = range;
    let mut out = vec![proc.join(format!("{pid}/map_files/{start:x}-{end:x}"))];
    let mut parts = path.components();
    if parts.next() == Some(Component::RootDir)
        && parts.clone().next().is_some()
        && parts.clone().all(|c| matches!(c, Component::Normal(_)))
    {
        out.push(proc.join(format!("{pid}/root")).join(parts.as_path()));
    }
    out
}

/// Opens `path` `O_PATH` and returns it if it is a regular file with
/// device and inode `id`.
fn open_as(path: &Path, id: FileId) -> Option<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    (meta.is_file() && file_id(meta.dev(), meta.ino()) == id).then_some(file)
}

/// A file's id from `st_dev` and `st_ino`, in the form of /proc/PID/maps.
fn file_id(dev: u64, ino: u64) -> FileId {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    ((major as i32, minor as i32), ino)
}

/// Most bytes of tables kept at once (a C library's `.eh_frame` is some
/// hundreds of KiB, a browser's tens of MiB); past this the cache starts
/// over. A file is another process's data: it bounds what fdtrace keeps.
const MAX_CFI_CACHE: usize = 256 << 20;

/// Largest `.eh_frame` or `.eh_frame_hdr` read.
const MAX_CFI_SECTION: u64 = 64 << 20;

impl CfiCache {
    /// The unwind rules at address `pc` of process `pid`.
    fn rules(
        &mut self,
        files: &mut MappedFiles,
        pid: u32,
        maps: &MemoryMaps,
        pc: u64,
    ) -> Option<Rules> {
        let m = maps.iter().find(|m| {
            (m.address.0..m.address.1).contains(&pc) && m.perms.contains(MMPermissions::EXECUTE)
        })?;
        if m.inode == 0 {
            return None;
        }
        let id = (m.dev, m.inode);
        if !self.files.contains_key(&id) {
            let cfi = files.open(pid, m).and_then(|f| Cfi::load(f.reopen()?));
            let size = cfi.as_ref().map_or(0, |c| c.hdr.len() + c.frame.len());
            if self.bytes + size > MAX_CFI_CACHE {
                self.files.clear();
                self.bytes = 0;
            }
            self.bytes += size;
            self.files.insert(id, cfi);
        }
        let cfi = self.files.get(&id)?.as_ref()?;
        let file_pc = cfi.file_addr(pc - m.address.0 + m.offset)?;
        let (func, row) = cfi.row(file_pc)?;
        // From the file's addresses to the process's (one segment).
        let shift = |a: u64| a.checked_add(pc)?.checked_sub(file_pc);
        let func = shift(func.start)?..shift(func.end)?;
        let cfa = match row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } => (*register, *offset),
            CfaRule::Expression(_) => return None,
        };
        let ra = match row.register(X86_64::RA) {
            Some(RegisterRule::Offset(off)) => off,
            _ => return None,
        };
        let bp = match row.register(X86_64::RBP) {
            None | Some(RegisterRule::Undefined | RegisterRule::SameValue) => SavedBp::Same,
            Some(RegisterRule::Offset(off)) => SavedBp::At(off),
            Some(_) => SavedBp::Lost,
        };
        Some(Rules { func, cfa, ra, bp })
    }
}

/// One ELF file's `.eh_frame_hdr` (the sorted table of its FDEs) and
/// `.eh_frame`, at their addresses in the file, and its loadable segments.
struct Cfi {
    hdr: Vec<u8>,
    hdr_addr: u64,
    frame: Vec<u8>,
    frame_addr: u64,
    text_addr: u64,
    /// (file offset, size in the file, address) of each PT_LOAD segment.
    segments: Vec<(u64, u64, u64)>,
}

impl Cfi {
    /// Reads the tables of a mapped file (see [`MappedFiles`]).
    fn load(file: File) -> Option<Cfi> {
        let cache = ReadCache::new(file);
        let elf = ElfFile64::<Endianness, _>::parse(&cache).ok()?;
        if elf.architecture() != Architecture::X86_64 || !elf.is_little_endian() {
            return None;
        }
        let section = |name: &str| {
            let s = elf.section_by_name(name)?;
            if s.size() > MAX_CFI_SECTION {
                return None;
            }
            Some((s.address(), s.data().ok()?.to_vec()))
        };
        let (hdr_addr, hdr) = section(".eh_frame_hdr")?;
        let (frame_addr, frame) = section(".eh_frame")?;
        let text_addr = elf.section_by_name(".text").map_or(0, |s| s.address());
        let segments = elf
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (off, size, s.address())
            })
            .collect();
        Some(Cfi {
            hdr,
            hdr_addr,
            frame,
            frame_addr,
            text_addr,
            segments,
        })
    }

    /// The address in the file of file offset `off`.
    fn file_addr(&self, off: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(o, size, _)| (o..o.saturating_add(size)).contains(&off))
            .map(|&(o, _, addr)| addr + (off - o))
    }

    /// The extent of the function at file address `pc`, and its unwind row
    /// there.
    fn row(&self, pc: u64) -> Option<(Range<u64>, UnwindTableRow<usize>)> {
        let bases = BaseAddresses::default()
            .set_eh_frame_hdr(self.hdr_addr)
            .set_eh_frame(self.frame_addr)
            .set_text(self.text_addr);
        let hdr = EhFrameHdr::new(&self.hdr, LittleEndian)
            .parse(&bases, 8)
            .ok()?;
        let frame = EhFrame::new(&self.frame, LittleEndian);
        let fde = hdr
            .table()?
            .fde_for_address(&frame, &bases, pc, EhFrame::cie_from_offset)
            .ok()?;
        let mut ctx = UnwindContext::new();
        let row = fde
            .unwind_info_for_address(&frame, &bases, &mut ctx, pc)
            .ok()?
            .clone();
        let end = fde.initial_address().checked_add(fde.len())?;
        Some((fde.initial_address()..end, row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process's memory: (address, bytes) regions.
    struct Mem(Vec<(u64, Vec<u8>)>);

    impl Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            self.0.iter().any(|(at, bytes)| {
                let Some(off) = addr.checked_sub(*at).map(|o| o as usize) else {
                    return false;
                };
                match bytes.get(off..off + buf.len()) {
                    Some(src) => {
                        buf.copy_from_slice(src);
                        true
                    }
                    None => false,
                }
            })
        }
    }

    /// The 7 bytes before `ret`: `code` right-aligned after filler.
    fn before(code: &[u8]) -> [u8; 7] {
        let mut b = [0x90u8; 7];
        b[7 - code.len()..].copy_from_slice(code);
        b
    }

    fn rel32(from: u64, to: u64) -> [u8; 4] {
        ((to as i64 - from as i64) as i32).to_le_bytes()
    }

    fn proven(code: &[u8], ret: u64, callee: Range<u64>, mem: &Mem) -> bool {
        calls_into(&before(code), ret, &callee, &mut |a, b| mem.read(a, b))
    }

    const RET: u64 = 0x5555_0000_1234;
    const OPEN: Range<u64> = 0x7f00_0000_8000..0x7f00_0000_8128;

    #[test]
    fn only_addresses_taught_by_exited_processes_are_let_go() {
        let taught: HashMap<u64, u32> = [(0x10, 1), (0x20, 2), (0x30, 1), (0x40, 3)].into();
        let mut gone = taught_by_the_gone(&taught, |pid| pid == 2);
        gone.sort();
        assert_eq!(gone, [0x10, 0x30, 0x40]);
        assert!(taught_by_the_gone(&taught, |_| true).is_empty());
    }

    #[test]
    fn candidates_are_map_files_then_the_process_root() {
        let proc = Path::new("/proc");
        let c = candidates(
            proc,
            42,
            (0x7f00_0000_0000, 0x7f00_0002_1000),
            Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"),
        );
        assert_eq!(
            c,
            [
                PathBuf::from("/proc/42/map_files/7f0000000000-7f0000021000"),
                PathBuf::from("/proc/42/root/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ]
        );
        // A deleted file keeps its suffix: its path opens nothing, or a
        // file the id check rejects.
        let c = candidates(proc, 7, (0x1000, 0x2000), Path::new("/app/srv (deleted)"));
        assert_eq!(c[1], PathBuf::from("/proc/7/root/app/srv (deleted)"));
    }

    #[test]
    fn no_root_candidate_for_a_path_that_could_leave_the_root() {
        let proc = Path::new("/proc");
        for bad in ["/bin/../../etc/shadow", "relative/lib.so", "/", ""] {
            let c = candidates(proc, 9, (0x1000, 0x2000), Path::new(bad));
            assert_eq!(c, [PathBuf::from("/proc/9/map_files/1000-2000")], "{bad:?}");
        }
    }

    #[test]
    fn file_id_as_maps_shows_it() {
        // 253:1 (fd:01 in maps), and a minor past 255 (its high bits sit
        // above the major in st_dev).
        assert_eq!(file_id(libc::makedev(253, 1), 99), ((253, 1), 99));
        assert_eq!(file_id(libc::makedev(0, 300), 5), ((0, 300), 5));
    }

    /// This test binary's own executable mapping.
    fn own_mapping() -> MemoryMap {
        Process::myself()
            .unwrap()
            .maps()
            .unwrap()
            .into_iter()
            .find(|m| {
                m.perms.contains(MMPermissions::EXECUTE)
                    && matches!(&m.pathname, MMapPath::Path(p)
                        if *p == std::env::current_exe().unwrap())
            })
            .expect("the test binary is mapped executable")
    }

    #[test]
    fn a_mapped_file_opens_as_itself_and_reads() {
        let m = own_mapping();
        let mut files = MappedFiles::default();
        let f = files
            .open(std::process::id(), &m)
            .expect("own binary opens");
        let mut head = [0u8; 4];
        f.reopen().unwrap().read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"\x7fELF");
        // Kept by its id: the second lookup is the same open file.
        let again = files.open(std::process::id(), &m).unwrap();
        assert!(Rc::ptr_eq(&f, &again));
    }

    #[test]
    fn a_path_holding_another_file_is_not_the_mapped_file() {
        // The mapping's path now holds another file (a container's file of
        // the same name, or a binary replaced since it was mapped): its
        // device and inode differ from the mapping's, and nothing opens.
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("libc.so.6");
        std::fs::write(&other, b"\x7fELF other").unwrap();
        let mut m = own_mapping();
        m.pathname = MMapPath::Path(other.clone());
        // Not this process's mapping: map_files has no such range either.
        m.address = (0x1000, 0x2000);
        let mut files = MappedFiles::default();
        assert!(files.open(std::process::id(), &m).is_none());
        // The same path with that file's own id opens it.
        let meta = std::fs::metadata(&other).unwrap();
        m.dev = file_id(meta.dev(), meta.ino()).0;
        m.inode = meta.ino();
        assert!(files.open(std::process::id(), &m).is_some());
        // A directory is never a mapped file, whatever its id.
        let meta = std::fs::metadata(dir.path()).unwrap();
        m.pathname = MMapPath::Path(dir.path().to_owned());
        (m.dev, m.inode) = file_id(meta.dev(), meta.ino());
        assert!(files.open(std::process::id(), &m).is_none());
    }

    #[test]
    fn the_return_slot_is_known_from_a_cfa_on_rsp_only() {
        // open64 at its syscall: 0x68 bytes of frame, the return address
        // just below the CFA.
        assert_eq!(return_slot((X86_64::RSP, 0x70), -8), Some(0x68));
        assert_eq!(return_slot((X86_64::RSP, 8), -8), Some(0), "a leaf");
        assert_eq!(return_slot((X86_64::RBP, 16), -8), None);
        assert_eq!(
            return_slot((X86_64::RSP, 0), -8),
            None,
            "below the stack pointer"
        );
    }

    #[test]
    fn direct_call_into_the_function_above() {
        let mem = Mem(vec![]);
        // rel32 reaches +-2 GiB: a function of the same module, above.
        let callee = 0x5555_0000_4000..0x5555_0000_4100;
        let call = [&[0xe8][..], &rel32(RET, callee.start)].concat();
        assert!(proven(&call, RET, callee, &mem));
        // Below the return address, into the function's middle.
        let callee = 0x5555_0000_0100..0x5555_0000_0200;
        let call = [&[0xe8][..], &rel32(RET, 0x5555_0000_0140)].concat();
        assert!(proven(&call, RET, callee.clone(), &mem));
        // Just past the function's end: another function.
        let call = [&[0xe8][..], &rel32(RET, callee.end)].concat();
        assert!(!proven(&call, RET, callee, &mem));
    }

    #[test]
    fn direct_call_elsewhere_is_not_proven() {
        let target = 0x5555_0000_3000;
        // The target's code is no PLT stub (push %rbp; mov %rsp,%rbp).
        let mem = Mem(vec![(
            target,
            vec![
                0x55, 0x48, 0x89, 0xe5, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
            ],
        )]);
        let call = [&[0xe8][..], &rel32(RET, target)].concat();
        assert!(!proven(&call, RET, OPEN, &mem));
        // Nor is a target that cannot be read.
        let mem = Mem(vec![]);
        assert!(!proven(&call, RET, OPEN, &mem));
    }

    /// A call to a PLT stub at `stub` whose code is `prefix` + `ff 25
    /// disp32` to a GOT slot holding `got`.
    fn through_plt(prefix: &[u8], got: u64) -> (Vec<u8>, Mem) {
        let stub = 0x5555_0000_2040;
        let slot = 0x5555_0000_5018;
        let end = stub + prefix.len() as u64 + 6;
        let mut code = [prefix, &[0xff, 0x25], &rel32(end, slot)].concat();
        code.resize(16, 0xcc);
        let mem = Mem(vec![(stub, code), (slot, got.to_le_bytes().to_vec())]);
        ([&[0xe8][..], &rel32(RET, stub)].concat(), mem)
    }

    #[test]
    fn call_through_the_plt_follows_the_got() {
        for prefix in [
            &[][..],
            &[0xf2],                         // bnd jmp
            &[0xf3, 0x0f, 0x1e, 0xfa],       // endbr64; jmp
            &[0xf3, 0x0f, 0x1e, 0xfa, 0xf2], // endbr64; bnd jmp (.plt.sec)
        ] {
            let (call, mem) = through_plt(prefix, OPEN.start);
            assert!(proven(&call, RET, OPEN, &mem), "prefix {prefix:x?}");
            // The slot resolved to another function (or not yet resolved:
            // back into the PLT).
            let (call, mem) = through_plt(prefix, OPEN.end + 0x40);
            assert!(!proven(&call, RET, OPEN, &mem), "prefix {prefix:x?}");
        }
    }

    #[test]
    fn call_through_a_got_slot() {
        let slot = 0x5555_0000_6000;
        let call = [&[0xff, 0x15][..], &rel32(RET, slot)].concat();
        let mem = Mem(vec![(slot, OPEN.start.to_le_bytes().to_vec())]);
        assert!(proven(&call, RET, OPEN, &mem));
        let mem = Mem(vec![(slot, 0x7f00_0001_0000u64.to_le_bytes().to_vec())]);
        assert!(!proven(&call, RET, OPEN, &mem));
        let mem = Mem(vec![]);
        assert!(!proven(&call, RET, OPEN, &mem));
    }

    #[test]
    fn call_through_a_register_or_a_frame_slot_is_not_proven() {
        let mem = Mem(vec![]);
        // call *%rax; call *%r11; call *0x8(%rbp); not a call at all.
        for code in [
            &[0xff, 0xd0][..],
            &[0x41, 0xff, 0xd3],
            &[0xff, 0x55, 0x08],
            &[0x48, 0x89, 0xc7],
        ] {
            assert!(!proven(code, RET, OPEN, &mem), "{code:x?}");
        }
    }
}
