//! Finding CPython in a process: the mapped libpython3.X.so (pyenv and most
//! builds with --enable-shared) or the executable itself (Debian's static
//! /usr/bin/python3.X), the addresses of `_PyRuntime`, `Py_Version` and
//! `PyCode_Type` from its dynamic symbol table (present even in stripped
//! builds: extension modules link against them), and the layout to use.
use std::{
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use fdtrace_common::python::PyLayout;
use object::{
    Object as _, ObjectKind, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _, ReadCache,
};
use procfs::process::{MMapPath, MemoryMap, Process};

use super::{
    layout::{self, DEBUG_OFFSETS_LEN, Unsupported, Version},
    mem::Mem,
    user::Libraries,
};

/// A process's CPython, ready for the frame walker.
#[derive(Debug, Clone)]
pub struct Interpreter {
    /// The file holding `_PyRuntime`, as the process's maps name it.
    pub binary: PathBuf,
    pub version: Version,
    /// Offsets, with `runtime` and `code_type` set to this process's
    /// addresses.
    pub layout: PyLayout,
    /// Which source files are the standard library's or installed packages'.
    pub libraries: Libraries,
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("{0}")]
    Unsupported(#[from] Unsupported),
    #[error("cannot read {what}: {err}")]
    Io { what: String, err: io::Error },
    #[error("{0} defines _PyRuntime but not {1}: not a CPython this code knows")]
    Symbol(PathBuf, &'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LocateError {
    let what = what.into();
    move |err| LocateError::Io { what, err }
}

/// The addresses (file-relative) of the symbols looked up.
#[derive(Debug, Default)]
struct Symbols {
    runtime: Option<u64>,
    version: Option<u64>,
    code_type: Option<u64>,
    /// Only Py_DEBUG builds define it (Objects/object.c, under Py_REF_DEBUG).
    debug_build: bool,
    /// ET_DYN (shared object or PIE): its addresses move with the load base.
    relocatable: bool,
    /// Lowest p_vaddr of its PT_LOAD segments, page aligned.
    first_vaddr: u64,
}

fn read_symbols(file: File, path: &Path) -> Result<Symbols, LocateError> {
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|e| LocateError::Io {
        what: path.display().to_string(),
        err: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    })?;
    // Most traced processes are not Python: one read of the dynamic string
    // table tells, where walking the symbols reads each name apart (some
    // 4700 syscalls for bash). A file without section headers is walked.
    if let Some(dynstr) = elf.section_by_name(".dynstr")
        && let Ok(names) = dynstr.data()
        && memchr::memmem::find(names, b"\0_PyRuntime\0").is_none()
    {
        return Ok(Symbols::default());
    }
    let mut s = Symbols {
        relocatable: elf.kind() == ObjectKind::Dynamic,
        first_vaddr: elf.segments().map(|seg| seg.address()).min().unwrap_or(0) & !0xfff,
        ..Symbols::default()
    };
    for sym in elf.dynamic_symbols() {
        if sym.is_undefined() {
            continue;
        }
        match sym.name_bytes() {
            Ok(b"_PyRuntime") => s.runtime = Some(sym.address()),
            Ok(b"Py_Version") => s.version = Some(sym.address()),
            Ok(b"PyCode_Type") => s.code_type = Some(sym.address()),
            Ok(b"_Py_NegativeRefcount") => s.debug_build = true,
            _ => {}
        }
    }
    Ok(s)
}

/// "3.10" from "libpython3.10.so.1.0", "python3.10" or "libpython3.6m.so";
/// None for a name without a version.
pub fn version_in_name(name: &str) -> Option<String> {
    let rest = &name[name.find("python")? + "python".len()..];
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let v = v.trim_end_matches('.');
    (v.contains('.') && !v.starts_with('.')).then(|| v.to_string())
}

fn is_libpython(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("libpython") && n.contains(".so"))
}

/// Opens the file a mapping shows, the very one mapped (map_files), or by
/// its path inside the process's root if that is refused, checked against
/// the mapping's inode (a package upgrade may have replaced it).
fn open_mapped(pid: u32, m: &MemoryMap, path: &Path) -> Result<File, LocateError> {
    let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", m.address.0, m.address.1);
    if let Ok(f) = File::open(&mf) {
        return Ok(f);
    }
    let rooted =
        Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path));
    let f = File::open(&rooted).map_err(io_err(rooted.display().to_string()))?;
    let meta = f.metadata().map_err(io_err(rooted.display().to_string()))?;
    if meta.ino() != m.inode {
        return Err(LocateError::Io {
            what: path.display().to_string(),
            err: io::Error::other(
                "the file on disk is not the one mapped (replaced since the process started)",
            ),
        });
    }
    Ok(f)
}

/// The CPython of process `pid`: `Ok(None)` when it runs none, an error
/// (with the reason) when it runs one whose frames cannot be read.
pub fn locate(pid: u32, mem: &Mem) -> Result<Option<Interpreter>, LocateError> {
    let proc = Process::new(pid as i32).map_err(|e| LocateError::Io {
        what: format!("/proc/{pid}"),
        err: io::Error::other(e.to_string()),
    })?;
    let maps = proc.maps().map_err(|e| LocateError::Io {
        what: format!("/proc/{pid}/maps"),
        err: io::Error::other(e.to_string()),
    })?;
    let exe = proc.exe().ok();
    // Each mapped file once, at its lowest mapping (file offset 0 for
    // anything the loader mapped); libpython before the executable, since a
    // pyenv python3.X only links against it.
    let mut files: Vec<(&MemoryMap, &Path)> = Vec::new();
    for m in maps.iter() {
        if let MMapPath::Path(p) = &m.pathname
            && (is_libpython(p) || exe.as_deref() == Some(p.as_path()))
            && m.offset == 0
            && !files.iter().any(|(_, q)| *q == p.as_path())
        {
            files.push((m, p.as_path()));
        }
    }
    files.sort_by_key(|(_, p)| !is_libpython(p));
    let mut named_version = None;
    for (m, path) in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if named_version.is_none() {
            named_version = version_in_name(name);
        }
        // Any executable is looked at (Python can be linked into one of
        // another name), but only a python-named file that cannot be read
        // is worth a notice: most traced processes are not Python.
        let syms = match open_mapped(pid, m, path).and_then(|f| read_symbols(f, path)) {
            Ok(s) => s,
            Err(e) if is_libpython(path) || version_in_name(name).is_some() => return Err(e),
            Err(_) => continue,
        };
        let Some(runtime) = syms.runtime else {
            continue;
        };
        let base = if syms.relocatable {
            m.address.0 - syms.first_vaddr
        } else {
            0
        };
        let Some(version_at) = syms.version else {
            // Py_Version is new in 3.11.
            let v = version_in_name(name).unwrap_or_else(|| "before 3.11".into());
            return Err(Unsupported::Version(v).into());
        };
        let code_type = syms
            .code_type
            .ok_or_else(|| LocateError::Symbol(path.into(), "PyCode_Type"))?;
        let raw = mem
            .u64(base + version_at)
            .map_err(io_err(format!("Py_Version in process {pid}")))?;
        let version = Version(u32::try_from(raw).map_err(|_| LocateError::Io {
            what: format!("Py_Version in process {pid}"),
            err: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{raw:#x} is not a version"),
            ),
        })?);
        let layout = layout::choose(version, syms.debug_build, || {
            mem.bytes(base + runtime, DEBUG_OFFSETS_LEN)
        })
        .map_err(io_err(format!("_PyRuntime in process {pid}")))??;
        return Ok(Some(Interpreter {
            binary: path.to_path_buf(),
            version,
            layout: PyLayout {
                runtime: base + runtime,
                code_type: base + code_type,
                ..layout
            },
            libraries: Libraries::new(path, version),
        }));
    }
    // A python binary without _PyRuntime: Python 2 or 3.6 and older.
    match named_version {
        Some(v) => Err(Unsupported::Version(v).into()),
        None => Ok(None),
    }
}

/// Whether process `pid` has not mapped the libpython3.X.so its executable
/// needs yet: right after exec, before the dynamic loader has run. Until
/// then its executable looks like a Python without `_PyRuntime`.
pub fn libpython_pending(pid: u32) -> bool {
    if !links_libpython(pid) {
        return false;
    }
    let Ok(maps) = Process::new(pid as i32).and_then(|p| p.maps()) else {
        return false;
    };
    !maps.iter().any(|m| match &m.pathname {
        MMapPath::Path(p) => is_libpython(p),
        _ => false,
    })
}

/// Whether process `pid`'s executable names a libpython3.X.so among the
/// libraries it needs (DT_NEEDED).
fn links_libpython(pid: u32) -> bool {
    let Ok(file) = File::open(format!("/proc/{pid}/exe")) else {
        return false;
    };
    // Read as needed: the headers and the dynamic section, not the file.
    let cache = ReadCache::new(file);
    let Ok(elf) = object::read::elf::ElfFile64::<object::Endianness, _>::parse(&cache) else {
        return false;
    };
    let Ok(table) = elf.elf_section_table().dynamic_table(elf.endian(), &cache) else {
        return false;
    };
    table.iter().any(|d| {
        d.tag == object::elf::DT_NEEDED
            && table
                .string(d)
                .is_ok_and(|name| name.starts_with(b"libpython"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_names() {
        assert_eq!(
            version_in_name("libpython3.10.so.1.0").as_deref(),
            Some("3.10")
        );
        assert_eq!(
            version_in_name("libpython3.6m.so.1.0").as_deref(),
            Some("3.6")
        );
        assert_eq!(version_in_name("python2.7").as_deref(), Some("2.7"));
        assert_eq!(version_in_name("python3").as_deref(), None);
        assert_eq!(version_in_name("bash").as_deref(), None);
    }
}
