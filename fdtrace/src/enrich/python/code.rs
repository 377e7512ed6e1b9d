//! Code objects: their name, file and the line of an instruction, read from
//! the process while it lives and cached per code object.
use std::{collections::HashMap, fmt, rc::Rc};

use fdtrace_common::python::{PyFrame, PyLayout};

use super::mem::{Mem, u32_at, u64_at};

/// `PyObject.ob_type`, `PyVarObject.ob_size` / `PyASCIIObject.length`,
/// `PyASCIIObject.state` and `PyBytesObject.ob_sval`: the same on 3.11-3.13
/// (Include/object.h, Include/cpython/unicodeobject.h, bytesobject.h).
const OB_TYPE: u32 = 8;
const OB_SIZE: u32 = 16;
const STR_STATE: u32 = 32;
const BYTES_DATA: u32 = 32;

/// Longest text read from a str (characters) and longest location table
/// (bytes): far above real names, paths and functions, low enough that a
/// corrupt length is not a huge read.
const MAX_STR: u64 = 4096;
const MAX_LINETABLE: u64 = 1 << 20;

/// One frame of a Python stack, symbolized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SymFrame {
    Code {
        qualname: String,
        /// `co_filename`, as the code object records it.
        file: String,
        /// None where the location table says the instruction has no line.
        line: Option<u32>,
    },
    /// The address was not a code object this process could show.
    Unreadable(u64),
}

impl fmt::Display for SymFrame {
    /// "qualname (file:line)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SymFrame::Code {
                qualname,
                file,
                line: Some(l),
            } => write!(f, "{qualname} ({file}:{l})"),
            SymFrame::Code {
                qualname,
                file,
                line: None,
            } => write!(f, "{qualname} ({file})"),
            SymFrame::Unreadable(a) => write!(f, "<unreadable code object {a:#x}>"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error("cannot read {what} at {addr:#x}: {err}")]
    Read {
        what: &'static str,
        addr: u64,
        err: String,
    },
    #[error("{0:#x} is not a code object (its type is {1:#x}, PyCode_Type is {2:#x})")]
    NotCode(u64, u64, u64),
    #[error("{what} at {addr:#x}: {why}")]
    Bad {
        what: &'static str,
        addr: u64,
        why: String,
    },
    #[error("the location table is malformed at byte {0}")]
    Linetable(usize),
}

/// What is kept of a code object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeInfo {
    pub qualname: String,
    pub file: String,
    pub firstlineno: i32,
    pub linetable: Vec<u8>,
}

/// The fields of a code object's header that tell it from another one at
/// the same address (after the first was freed).
type Fingerprint = [u64; 5];

/// Code objects of one process, by address.
#[derive(Default)]
pub struct Codes {
    seen: HashMap<u64, (Fingerprint, Rc<CodeInfo>)>,
}

impl Codes {
    /// `frame` symbolized: the code object is read on first sight; later its
    /// header is read again (one read) to check the address still holds the
    /// same code object, and if the process is gone, what was read while it
    /// lived is kept.
    pub fn frame(
        &mut self,
        mem: &Mem,
        l: &PyLayout,
        frame: PyFrame,
    ) -> (SymFrame, Option<CodeError>) {
        match self.info(mem, l, frame.code) {
            Ok(c) => match line_at(&c.linetable, c.firstlineno, frame.offset) {
                Ok(line) => (
                    SymFrame::Code {
                        qualname: c.qualname.clone(),
                        file: c.file.clone(),
                        line,
                    },
                    None,
                ),
                Err(e) => (SymFrame::Unreadable(frame.code), Some(e)),
            },
            Err(e) => (SymFrame::Unreadable(frame.code), Some(e)),
        }
    }

    fn info(&mut self, mem: &Mem, l: &PyLayout, code: u64) -> Result<Rc<CodeInfo>, CodeError> {
        let header = match mem.bytes(code, l.code_adaptive as usize) {
            Ok(h) => h,
            Err(err) => {
                // /proc/PID/mem reads nothing once the process has exited
                // (an unmapped address is EIO instead).
                if let Some((_, c)) = self.seen.get(&code)
                    && err.kind() == std::io::ErrorKind::UnexpectedEof
                {
                    return Ok(c.clone());
                }
                return Err(CodeError::Read {
                    what: "code object",
                    addr: code,
                    err: err.to_string(),
                });
            }
        };
        let ob_type = u64_at(&header, OB_TYPE);
        if ob_type != l.code_type {
            return Err(CodeError::NotCode(code, ob_type, l.code_type));
        }
        let fp = [
            ob_type,
            u64_at(&header, l.code_qualname),
            u64_at(&header, l.code_filename),
            u64_at(&header, l.code_linetable),
            u64::from(u32_at(&header, l.code_firstlineno)),
        ];
        if let Some((seen_fp, c)) = self.seen.get(&code)
            && *seen_fp == fp
        {
            return Ok(c.clone());
        }
        let info = Rc::new(CodeInfo {
            qualname: read_str(mem, l, fp[1], "co_qualname")?,
            file: read_str(mem, l, fp[2], "co_filename")?,
            linetable: read_bytes(mem, fp[3], "co_linetable")?,
            firstlineno: fp[4] as u32 as i32,
        });
        self.seen.insert(code, (fp, info.clone()));
        Ok(info)
    }
}

fn read_err(what: &'static str, addr: u64) -> impl FnOnce(std::io::Error) -> CodeError {
    move |e| CodeError::Read {
        what,
        addr,
        err: e.to_string(),
    }
}

/// A `str` object's text. Code objects' strings are compact (their
/// characters follow the header); the legacy, non-compact form is refused.
/// Control characters are escaped: the text is the traced process's, and
/// ends up on a terminal.
fn read_str(mem: &Mem, l: &PyLayout, addr: u64, what: &'static str) -> Result<String, CodeError> {
    let h = mem
        .bytes(addr, (STR_STATE + 4) as usize)
        .map_err(read_err(what, addr))?;
    let bad = |why: String| CodeError::Bad { what, addr, why };
    let len = u64_at(&h, OB_SIZE);
    if len > MAX_STR {
        return Err(bad(format!("{len} characters, more than {MAX_STR}")));
    }
    let state = u32_at(&h, STR_STATE);
    // interned:2, kind:3, compact:1, ascii:1 (Include/cpython/unicodeobject.h)
    let (kind, compact, ascii) = (
        (state >> 2) & 7,
        state & (1 << 5) != 0,
        state & (1 << 6) != 0,
    );
    if !compact {
        return Err(bad("not a compact str".into()));
    }
    let data = addr
        + u64::from(if ascii {
            l.str_ascii_data
        } else {
            l.str_compact_data
        });
    if ascii && kind != 1 || !matches!(kind, 1 | 2 | 4) {
        return Err(bad(format!("str kind {kind}")));
    }
    let raw = mem
        .bytes(data, (len * u64::from(kind)) as usize)
        .map_err(read_err(what, data))?;
    if ascii && !raw.is_ascii() {
        return Err(bad("an ASCII str with non-ASCII bytes".into()));
    }
    let chars: Box<dyn Iterator<Item = u32>> = match kind {
        1 => Box::new(raw.iter().map(|&b| u32::from(b))),
        2 => Box::new(
            raw.chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
        ),
        _ => Box::new(
            raw.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
    };
    let mut s = String::with_capacity(raw.len());
    for c in chars {
        // A str may hold lone surrogates; they have no char.
        match char::from_u32(c) {
            Some(c) if c.is_control() => s.extend(c.escape_default()),
            Some(c) => s.push(c),
            None => s.push(char::REPLACEMENT_CHARACTER),
        }
    }
    Ok(s)
}

fn read_bytes(mem: &Mem, addr: u64, what: &'static str) -> Result<Vec<u8>, CodeError> {
    let len = mem
        .u64(addr + u64::from(OB_SIZE))
        .map_err(read_err(what, addr))?;
    if len > MAX_LINETABLE {
        return Err(CodeError::Bad {
            what,
            addr,
            why: format!("{len} bytes, more than {MAX_LINETABLE}"),
        });
    }
    mem.bytes(addr + u64::from(BYTES_DATA), len as usize)
        .map_err(read_err(what, addr))
}

/// The line of the instruction at byte `offset` of a code object, from its
/// 3.11+ location table (`co_linetable`, format in CPython's
/// Objects/locations.md; the walk is Objects/codeobject.c's
/// `_PyCode_CheckLineNumber`): entries of one start byte (bit 7 set, a
/// 4-bit code, the length in code units minus one) and the code's data.
/// None for an instruction the table gives no line; a negative offset (a
/// frame that has not started) is at the first line, as
/// `PyCode_Addr2Line` has it.
pub fn line_at(table: &[u8], firstlineno: i32, offset: i64) -> Result<Option<u32>, CodeError> {
    if offset < 0 {
        return Ok(u32::try_from(firstlineno).ok());
    }
    let mut line = i64::from(firstlineno);
    let mut end = 0i64;
    let mut i = 0usize;
    let byte = |i: usize| table.get(i).copied().ok_or(CodeError::Linetable(i));
    // A varint: 6-bit chunks, least significant first, bit 6 = more follow.
    let varint = |i: &mut usize| -> Result<u64, CodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(6) {
            let b = byte(*i)?;
            if b & 0x80 != 0 {
                return Err(CodeError::Linetable(*i));
            }
            *i += 1;
            v |= u64::from(b & 63) << shift;
            if b & 64 == 0 {
                return Ok(v);
            }
        }
        Err(CodeError::Linetable(*i))
    };
    let svarint = |i: &mut usize| -> Result<i64, CodeError> {
        let u = varint(i)?;
        let m = (u >> 1) as i64;
        Ok(if u & 1 != 0 { -m } else { m })
    };
    while i < table.len() {
        let first = byte(i)?;
        if first & 0x80 == 0 {
            return Err(CodeError::Linetable(i));
        }
        i += 1;
        let code = (first >> 3) & 15;
        let delta = match code {
            15 => 0, // no location
            14 => {
                // long form: line delta, end line delta, column, end column
                let d = svarint(&mut i)?;
                for _ in 0..3 {
                    varint(&mut i)?;
                }
                d
            }
            13 => svarint(&mut i)?, // no column
            10..=12 => {
                // one line, columns in two bytes
                i += 2;
                i64::from(code) - 10
            }
            _ => {
                // short form: same line, column in one byte
                i += 1;
                0
            }
        };
        if i > table.len() {
            return Err(CodeError::Linetable(table.len()));
        }
        line += delta;
        end += (i64::from(first & 7) + 1) * 2;
        if offset < end {
            return Ok(if code == 15 {
                None
            } else {
                u32::try_from(line).ok()
            });
        }
    }
    Err(CodeError::Linetable(table.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// co_lines(): (start, end, line) byte ranges.
    type Ranges = Vec<(i64, i64, Option<u32>)>;

    /// (firstlineno, code length, linetable, co_lines()) from the output of
    /// testdata/linetable.py.
    fn sample(text: &str) -> (i32, i64, Vec<u8>, Ranges) {
        let lines: Vec<&str> = text.lines().collect();
        let head: Vec<&str> = lines[0].rsplit(' ').take(2).collect();
        let hex = lines[1].trim();
        let table = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let ranges = lines[2]
            .trim_start_matches("[(")
            .trim_end_matches(")]")
            .split("), (")
            .map(|t| {
                let f: Vec<&str> = t.split(", ").collect();
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[2].parse().ok(),
                )
            })
            .collect();
        (
            head[1].parse().unwrap(),
            head[0].parse().unwrap(),
            table,
            ranges,
        )
    }

    fn check(text: &str) {
        let (first, len, table, ranges) = sample(text);
        assert_eq!(ranges.last().unwrap().1, len);
        for (start, end, line) in ranges {
            for off in (start..end).step_by(2) {
                assert_eq!(line_at(&table, first, off), Ok(line), "offset {off}");
            }
        }
        assert_eq!(line_at(&table, first, -2), Ok(Some(first as u32)));
        assert_eq!(
            line_at(&table, first, len),
            Err(CodeError::Linetable(table.len()))
        );
    }

    #[test]
    fn linetable_of_311() {
        check(include_str!("testdata/linetable_3.11.7.txt"));
    }

    #[test]
    fn linetable_of_313() {
        check(include_str!("testdata/linetable_3.13.0.txt"));
    }

    #[test]
    fn malformed_linetables_are_errors() {
        // A continuation byte where an entry should start.
        assert_eq!(line_at(&[0x01], 1, 0), Err(CodeError::Linetable(0)));
        // A long-form entry cut short.
        assert_eq!(line_at(&[0xf0, 0x41], 1, 0), Err(CodeError::Linetable(2)));
        // A short form without its column byte.
        assert_eq!(line_at(&[0x80], 1, 0), Err(CodeError::Linetable(1)));
        // A varint that never ends.
        let endless = [&[0xe8u8][..], &[0x7f; 12]].concat();
        assert!(line_at(&endless, 1, 0).is_err());
    }

    #[test]
    fn frame_text() {
        let f = SymFrame::Code {
            qualname: "A.f".into(),
            file: "/x.py".into(),
            line: Some(3),
        };
        assert_eq!(f.to_string(), "A.f (/x.py:3)");
        assert_eq!(
            SymFrame::Unreadable(0x10).to_string(),
            "<unreadable code object 0x10>"
        );
    }
}
