//! Which CPython a process runs, and where its structures keep what the
//! frame walker needs: `_Py_DebugOffsets` on 3.13 (CPython publishes its own
//! offsets at `_PyRuntime+0`), measured tables for 3.11 and 3.12.
use std::fmt;

use fdtrace_common::{NO_FIELD, python::PyLayout};

/// `Py_Version`: `PY_VERSION_HEX`, e.g. 0x030c01f0 for 3.12.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version(pub u32);

impl Version {
    pub fn major(self) -> u32 {
        self.0 >> 24
    }
    pub fn minor(self) -> u32 {
        (self.0 >> 16) & 0xff
    }
    fn micro(self) -> u32 {
        (self.0 >> 8) & 0xff
    }
}

impl fmt::Display for Version {
    /// "3.12.1", "3.13.0rc2"; the release level as `sys.version` spells it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.micro())?;
        let serial = self.0 & 0xf;
        match (self.0 >> 4) & 0xf {
            0xa => write!(f, "a{serial}"),
            0xb => write!(f, "b{serial}"),
            0xc => write!(f, "rc{serial}"),
            _ => Ok(()),
        }
    }
}

/// Why a process's Python frames cannot be read; the text follows
/// "Python frames are not available for pid N: ".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unsupported {
    #[error("CPython {0} is not supported (3.11-3.13 are)")]
    Version(String),
    #[error(
        "CPython {0} is a free-threaded build, which is not supported (3.11-3.13 with the GIL are)"
    )]
    FreeThreaded(Version),
    #[error("CPython {0} is a debug build (Py_DEBUG), whose layout differs: not supported")]
    Debug(Version),
    #[error("CPython {version}: the _Py_DebugOffsets at _PyRuntime are not valid ({why})")]
    DebugOffsets { version: Version, why: String },
}

/// The 3.11 and 3.12 layouts, measured with offsetof() against each
/// version's internal headers (Include/internal/pycore_frame.h,
/// pycore_interp.h, pycore_runtime.h, Include/cpython/code.h); Debian's
/// 3.11.2 and pyenv's 3.11.7 agree. `runtime` and `code_type` are left 0.
fn table(v: Version) -> Option<PyLayout> {
    let base = PyLayout {
        runtime: 0,
        code_type: 0,
        version: v.0,
        runtime_interpreters_head: 40,
        interp_next: 0,
        interp_threads_head: 0,
        tstate_next: 8,
        tstate_native_thread_id: 0,
        tstate_frame: 56, // ->cframe
        tstate_datastack_chunk: 0,
        _pad: 0,
        cframe_current_frame: 0,
        frame_code: 0,
        frame_previous: 0,
        frame_instr: 56, // prev_instr
        frame_owner: 0,
        owner_cstack: NO_FIELD,
        code_adaptive: 0,
        code_filename: 112,
        code_qualname: 128,
        code_linetable: 136,
        code_firstlineno: 0,
        str_ascii_data: 0,
        str_compact_data: 0,
    };
    match (v.major(), v.minor()) {
        (3, 11) => Some(PyLayout {
            interp_threads_head: 16,
            tstate_native_thread_id: 160,
            tstate_datastack_chunk: 296,
            cframe_current_frame: 8,
            frame_code: 32,
            frame_previous: 48,
            frame_owner: 69,
            code_adaptive: 184,
            code_firstlineno: 72,
            // 3.11 still has the wstr fields of the legacy str API.
            str_ascii_data: 48,
            str_compact_data: 72,
            ..base
        }),
        (3, 12) => Some(PyLayout {
            interp_threads_head: 72,
            tstate_native_thread_id: 144,
            tstate_datastack_chunk: 232,
            cframe_current_frame: 0,
            frame_code: 0,
            frame_previous: 8,
            frame_owner: 70,
            owner_cstack: 3,
            code_adaptive: 192,
            code_firstlineno: 68,
            str_ascii_data: 40,
            str_compact_data: 56,
            ..base
        }),
        _ => None,
    }
}

/// Bytes of the 3.13 `_Py_DebugOffsets` read: the cookie and the 72 u64
/// that follow it, up to the end of its `gc` part
/// (Include/internal/pycore_runtime.h, v3.13.0).
pub const DEBUG_OFFSETS_LEN: usize = 73 * 8;

/// Word indexes (u64 after the 8-byte cookie counts as word 1) of the 3.13
/// `_Py_DebugOffsets` fields used.
mod word {
    pub const VERSION: usize = 1;
    pub const FREE_THREADED: usize = 2;
    pub const RUNTIME_INTERPRETERS_HEAD: usize = 5;
    pub const INTERP_NEXT: usize = 8;
    pub const INTERP_THREADS_HEAD: usize = 9;
    pub const TSTATE_NEXT: usize = 21;
    pub const TSTATE_CURRENT_FRAME: usize = 23;
    pub const TSTATE_NATIVE_THREAD_ID: usize = 25;
    pub const TSTATE_DATASTACK_CHUNK: usize = 26;
    pub const FRAME_PREVIOUS: usize = 29;
    pub const FRAME_EXECUTABLE: usize = 30;
    pub const FRAME_INSTR_PTR: usize = 31;
    pub const FRAME_OWNER: usize = 33;
    pub const CODE_FILENAME: usize = 35;
    pub const CODE_QUALNAME: usize = 37;
    pub const CODE_LINETABLE: usize = 38;
    pub const CODE_FIRSTLINENO: usize = 39;
    pub const CODE_ADAPTIVE: usize = 43;
    pub const PYOBJECT_OB_TYPE: usize = 45;
    pub const UNICODE_ASCIIOBJECT_SIZE: usize = 70;
}

/// The 3.13 layout from the process's own `_Py_DebugOffsets`.
fn from_debug_offsets(v: Version, raw: &[u8]) -> Result<PyLayout, Unsupported> {
    let bad = |why: String| Unsupported::DebugOffsets { version: v, why };
    if raw.len() < DEBUG_OFFSETS_LEN {
        return Err(bad(format!(
            "{} bytes, expected {DEBUG_OFFSETS_LEN}",
            raw.len()
        )));
    }
    if &raw[..8] != b"xdebugpy" {
        return Err(bad(format!(
            "cookie {:?}, expected \"xdebugpy\"",
            String::from_utf8_lossy(&raw[..8])
        )));
    }
    let w = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if w(word::VERSION) != u64::from(v.0) {
        return Err(bad(format!(
            "version {:#x}, Py_Version {:#x}",
            w(word::VERSION),
            v.0
        )));
    }
    if w(word::FREE_THREADED) != 0 {
        return Err(Unsupported::FreeThreaded(v));
    }
    // The walker reads one frame in PY_FRAME_READ bytes and assumes
    // ob_type right after ob_refcnt; anything else is not a layout this
    // code knows, whatever the offsets say.
    let field = |i: usize, limit: u64| -> Result<u32, Unsupported> {
        let off = w(i);
        if off >= limit {
            return Err(bad(format!("field {i} is {off}, beyond {limit}")));
        }
        Ok(off as u32)
    };
    let frame = u64::from(fdtrace_common::python::PY_FRAME_READ);
    if w(word::PYOBJECT_OB_TYPE) != 8 {
        return Err(bad(format!(
            "ob_type at {}, expected 8",
            w(word::PYOBJECT_OB_TYPE)
        )));
    }
    // Big enough for any real structure, small enough to keep a corrupt
    // value from turning into a wild read.
    const STRUCT: u64 = 1 << 16;
    Ok(PyLayout {
        runtime: 0,
        code_type: 0,
        version: v.0,
        runtime_interpreters_head: field(word::RUNTIME_INTERPRETERS_HEAD, STRUCT)?,
        interp_next: field(word::INTERP_NEXT, STRUCT)?,
        interp_threads_head: field(word::INTERP_THREADS_HEAD, STRUCT)?,
        tstate_next: field(word::TSTATE_NEXT, STRUCT)?,
        tstate_native_thread_id: field(word::TSTATE_NATIVE_THREAD_ID, STRUCT)?,
        tstate_frame: field(word::TSTATE_CURRENT_FRAME, STRUCT)?,
        tstate_datastack_chunk: field(word::TSTATE_DATASTACK_CHUNK, STRUCT)?,
        _pad: 0,
        cframe_current_frame: NO_FIELD,
        frame_code: field(word::FRAME_EXECUTABLE, frame - 7)?,
        frame_previous: field(word::FRAME_PREVIOUS, frame - 7)?,
        frame_instr: field(word::FRAME_INSTR_PTR, frame - 7)?,
        frame_owner: field(word::FRAME_OWNER, frame)?,
        // FRAME_OWNED_BY_CSTACK (Include/internal/pycore_frame.h); the debug
        // offsets do not carry enum values.
        owner_cstack: 3,
        code_adaptive: field(word::CODE_ADAPTIVE, STRUCT)?,
        code_filename: field(word::CODE_FILENAME, STRUCT)?,
        code_qualname: field(word::CODE_QUALNAME, STRUCT)?,
        code_linetable: field(word::CODE_LINETABLE, STRUCT)?,
        code_firstlineno: field(word::CODE_FIRSTLINENO, STRUCT)?,
        str_ascii_data: field(word::UNICODE_ASCIIOBJECT_SIZE, STRUCT)?,
        // sizeof(PyCompactUnicodeObject): not among the debug offsets; the
        // same 56 as 3.12 (Include/cpython/unicodeobject.h).
        str_compact_data: 56,
    })
}

/// The layout of a process running CPython `v`; `debug_offsets` reads the
/// first [`DEBUG_OFFSETS_LEN`] bytes of its `_PyRuntime` (asked for on 3.13
/// only). `debug_build`: the binary exports Py_DEBUG's symbols.
pub fn choose(
    v: Version,
    debug_build: bool,
    debug_offsets: impl FnOnce() -> std::io::Result<Vec<u8>>,
) -> Result<Result<PyLayout, Unsupported>, std::io::Error> {
    let supported = || Unsupported::Version(v.to_string());
    Ok(match (v.major(), v.minor()) {
        (3, 11 | 12) if debug_build => Err(Unsupported::Debug(v)),
        (3, 11 | 12) => table(v).ok_or_else(supported),
        // 3.14 reorders _Py_DebugOffsets and tags frame pointers: a layout
        // of its own, not supported yet.
        (3, 13) => from_debug_offsets(v, &debug_offsets()?),
        _ => Err(supported()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> std::io::Result<Vec<u8>> {
        panic!("debug offsets read for a version without them")
    }

    #[test]
    fn version_text() {
        assert_eq!(Version(0x030c01f0).to_string(), "3.12.1");
        assert_eq!(Version(0x030d00c2).to_string(), "3.13.0rc2");
        assert_eq!(Version(0x030b07f0).to_string(), "3.11.7");
    }

    #[test]
    fn tables_for_311_and_312() {
        let l = choose(Version(0x030b02f0), false, never).unwrap().unwrap();
        assert_eq!(
            (l.frame_code, l.frame_previous, l.frame_owner),
            (32, 48, 69)
        );
        assert_eq!(l.owner_cstack, NO_FIELD);
        // offsetof(PyThreadState, datastack_chunk) in each version's headers.
        assert_eq!(l.tstate_datastack_chunk, 296);
        let l = choose(Version(0x030c01f0), false, never).unwrap().unwrap();
        assert_eq!(l.tstate_datastack_chunk, 232);
        assert_eq!(
            (l.interp_threads_head, l.tstate_native_thread_id),
            (72, 144)
        );
        assert_eq!((l.code_adaptive, l.owner_cstack), (192, 3));
    }

    #[test]
    fn other_versions_say_why() {
        let e = choose(Version(0x030a0df0), false, never)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CPython 3.10.13 is not supported (3.11-3.13 are)"
        );
        let e = choose(Version(0x030e00f0), false, never)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CPython 3.14.0 is not supported (3.11-3.13 are)"
        );
        let e = choose(Version(0x030c01f0), true, never)
            .unwrap()
            .unwrap_err();
        assert_eq!(e, Unsupported::Debug(Version(0x030c01f0)));
    }

    /// The first DEBUG_OFFSETS_LEN bytes of `_PyRuntime` in pyenv's
    /// libpython3.13.so.1.0 (3.13.0), from its .data section.
    const DEBUG_OFFSETS_3130: &str = include_str!("testdata/debug_offsets_3.13.0.hex");

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn debug_offsets_of_3130_match_the_headers() {
        let raw = unhex(DEBUG_OFFSETS_3130);
        let v = Version(0x030d00f0);
        let l = choose(v, false, || Ok(raw.clone())).unwrap().unwrap();
        // offsetof() against 3.13.0's internal headers.
        assert_eq!(l.runtime_interpreters_head, 632);
        assert_eq!((l.interp_next, l.interp_threads_head), (7264, 7344));
        assert_eq!(
            (l.tstate_next, l.tstate_native_thread_id, l.tstate_frame),
            (8, 160, 72)
        );
        assert_eq!(l.tstate_datastack_chunk, 232);
        assert_eq!(l.cframe_current_frame, NO_FIELD);
        assert_eq!(
            (l.frame_code, l.frame_previous, l.frame_instr, l.frame_owner),
            (0, 8, 56, 70)
        );
        assert_eq!(
            (l.code_filename, l.code_qualname, l.code_linetable),
            (112, 128, 136)
        );
        assert_eq!((l.code_firstlineno, l.code_adaptive), (68, 200));
        assert_eq!((l.str_ascii_data, l.str_compact_data), (40, 56));

        // A cookie, a version or a free-threaded flag that does not fit.
        let mut bad = raw.clone();
        bad[0] = b'y';
        assert!(matches!(
            choose(v, false, || Ok(bad)).unwrap(),
            Err(Unsupported::DebugOffsets { .. })
        ));
        let e = choose(Version(0x030d01f0), false, || Ok(raw.clone()))
            .unwrap()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("version 0x30d00f0, Py_Version 0x30d01f0"),
            "{e}"
        );
        let mut ft = raw.clone();
        ft[16] = 1;
        assert_eq!(
            choose(v, false, || Ok(ft)).unwrap(),
            Err(Unsupported::FreeThreaded(v))
        );
        let mut wild = raw;
        wild[30 * 8 + 7] = 0x80; // frame executable offset far out
        assert!(matches!(
            choose(v, false, || Ok(wild)).unwrap(),
            Err(Unsupported::DebugOffsets { .. })
        ));
    }
}
