//! Call-site stacks: user stack ids recorded by the kernel side, symbolized
//! with blazesym while the process is alive (it reads /proc/PID/maps and the
//! mapped files), then cached.
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    rc::Rc,
};

use std::{fs::File, os::unix::fs::FileExt as _};

use blazesym::{
    Pid,
    symbolize::{Input, Symbolized, Symbolizer, source::Process as ProcSource, source::Source},
};
use fdtrace_common::{NO_SITE, SITE_NOT_SAMPLED, StackWindow};
use procfs::process::{MMPermissions, MMapPath, MemoryMaps, Process};

use crate::{analysis::Stack, kernel::Kernel};

/// Frames kept per stack, innermost first.
const MAX_FRAMES: usize = 16;

pub struct Symbols {
    symbolizer: Symbolizer,
    /// (pid, kernel stack id) -> canonical site stack (hash of the repaired,
    /// validated frames): stack ids whose frames differ only in garbage past
    /// a frame without a frame pointer are one site.
    canon: HashMap<(u32, u64), u64>,
    /// pid -> canonical stack -> symbolized frames.
    frames: HashMap<u32, HashMap<u64, Stack>>,
    not_sampled: Stack,
    /// The stacks of a process without any.
    none: HashMap<u64, Stack>,
}

impl Symbols {
    pub fn new() -> Self {
        Symbols {
            symbolizer: Symbolizer::new(),
            canon: HashMap::new(),
            frames: HashMap::new(),
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
        if let Some(&c) = self.canon.get(&(pid, id)) {
            return c;
        }
        let ips = self.frames_of(k, pid, id);
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
        self.canon.insert((pid, id), canon);
        canon
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

    /// Drops the stack ids of a process that is gone (its symbolized frames
    /// stay, for the summary).
    pub fn forget(&mut self, pid: u32) {
        self.canon.retain(|k, _| k.0 != pid);
    }

    /// The frames of kernel stack `id`, repaired where libc hid a caller,
    /// and cut at the first frame that is not a return address (a walk that
    /// went astray through code without frame pointers).
    fn frames_of(&self, k: &Kernel, pid: u32, id: u64) -> Vec<u64> {
        let Ok(trace) = k.stacks.get(&(id as u32), 0) else {
            return Vec::new();
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
            return ips;
        };
        if let Ok(window) = k.windows.get(&(id as u32), 0)
            && !ips.is_empty()
        {
            repair(&mem, &window, &mut ips, &maps);
        }
        if let Some(bad) = (1..ips.len()).find(|&i| !is_return_address(&mem, &maps, ips[i])) {
            ips.truncate(bad);
        }
        ips
    }

    fn symbolize(&self, pid: u32, ips: &[u64], maps: Option<&MemoryMaps>) -> Vec<String> {
        let src = Source::Process(ProcSource::new(Pid::from(pid)));
        let syms = self
            .symbolizer
            .symbolize(&src, Input::AbsAddr(ips))
            .unwrap_or_default();

        ips.iter()
            .enumerate()
            .map(|(i, &ip)| match syms.get(i) {
                Some(Symbolized::Sym(sym)) => match &sym.code_info {
                    Some(ci) => match ci.line {
                        Some(line) => {
                            format!("{} ({}:{line})", sym.name, ci.file.to_string_lossy())
                        }
                        None => format!("{} ({})", sym.name, ci.file.to_string_lossy()),
                    },
                    None => sym.name.to_string(),
                },
                _ => module_offset(maps, ip),
            })
            .collect()
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

/// Repairs what the kernel's frame-pointer walk got wrong at the top of a
/// stack, from the words saved at the user stack pointer. Libc's syscall
/// wrappers are built without frame pointers:
///
/// - a thin wrapper leaves the frame-pointer register at its caller's frame,
///   so the walk goes from the wrapper straight to the caller's caller; the
///   caller's return address is the highest return address below the frame
///   pointer;
/// - a wrapper that reuses the register (open64 does) first saves it on its
///   own frame: the saved value points at the caller's frame record, and the
///   walk is rebuilt from there, as far as the window reaches.
fn repair(mem: &File, w: &StackWindow, ips: &mut Vec<u64>, maps: &MemoryMaps) {
    let n = w.words.len();
    let ret = |a: u64| is_return_address(mem, maps, a);
    let slot = |addr: u64| {
        addr.checked_sub(w.sp)
            .filter(|off| off % 8 == 0)
            .map(|off| (off / 8) as usize)
            .filter(|&i| i < n)
    };
    // The highest return address in words[from..to].
    let caller_in =
        |from: usize, to: usize| w.words[from..to].iter().rev().copied().find(|&a| ret(a));
    if let Some(fp) = slot(w.bp) {
        if let Some(caller) = caller_in(0, fp)
            && !ips.contains(&caller)
        {
            ips.insert(1, caller);
        }
        return;
    }
    // A saved frame pointer: a word pointing at a frame record (saved frame
    // pointer, then return address) further up the window, with the hidden
    // return address between the two.
    let found = (0..n).find_map(|j| {
        let r = slot(w.words[j]).filter(|&r| r > j + 1 && r + 1 < n)?;
        if !ret(w.words[r + 1]) {
            return None;
        }
        Some((caller_in(j + 1, r)?, r))
    });
    let Some((caller, mut fp)) = found else {
        return;
    };
    // The kernel's frames past frame 0 came from a reused register: rebuild.
    let mut rebuilt = vec![ips[0], caller];
    loop {
        let next = w.words[fp + 1];
        if !ret(next) || rebuilt.len() >= MAX_FRAMES {
            break;
        }
        rebuilt.push(next);
        match slot(w.words[fp]).filter(|&up| up > fp && up + 1 < n) {
            Some(up) => fp = up,
            None => break,
        }
    }
    *ips = rebuilt;
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
