//! Offsets of kernel struct members, and the arity of tracepoints, from the
//! kernel's own BTF.
//!
//! The fd-table iterators read a few kernel structures; Rust BPF programs have no
//! CO-RE relocations, so user space looks the offsets up and sets them as
//! globals before load. aya parses BTF but keeps its type table private, and
//! the BTF crates on crates.io are LGPL; what is needed here is one pass over
//! the type section.
//! https://docs.kernel.org/bpf/btf.html (type encoding)
use std::collections::HashMap;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {0} has no member {1}")]
    NoMember(String, String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC_PROTO: u32 = 13;

struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

enum Ty {
    Composite {
        name: u32,
        members: Vec<Member>,
    },
    /// A pointer or typedef to type `ty`.
    Ref {
        ty: u32,
    },
    FuncProto {
        params: usize,
    },
    Other,
}

/// The struct, union, typedef, pointer and function prototype types of a
/// BTF blob.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id - 1.
    types: Vec<Ty>,
    by_name: HashMap<Vec<u8>, u32>,
    typedefs: HashMap<Vec<u8>, u32>,
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let u32_at = |off: usize| -> Result<u32, BtfError> {
            data.get(off..off + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let (start, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        let mut types = Vec::new();
        let mut by_name = HashMap::new();
        let mut typedefs = HashMap::new();
        let mut off = start;
        while off < end {
            let (name, info) = (u32_at(off)?, u32_at(off + 4)?);
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let kind_flag = info >> 31 != 0;
            off += 12;
            let extra = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = off + 12 * i;
                        let raw = u32_at(m + 8)?;
                        members.push(Member {
                            name: u32_at(m)?,
                            ty: u32_at(m + 4)?,
                            // With kind_flag, the top byte is a bitfield size.
                            bit_offset: if kind_flag { raw & 0xff_ffff } else { raw },
                        });
                    }
                    if kind == KIND_STRUCT && name != 0 {
                        by_name.insert(c_str(&strings, name).to_vec(), types.len() as u32 + 1);
                    }
                    types.push(Ty::Composite { name, members });
                    12 * vlen
                }
                // int, var, decl_tag: one u32; array: three.
                1 | 14 | 17 => 4,
                3 => 12,
                // enum and func_proto: 8 bytes per item; datasec, enum64: 12.
                6 | 13 => 8 * vlen,
                15 | 19 => 12 * vlen,
                // ptr, fwd, typedef, volatile, const, restrict, func, float,
                // type_tag: nothing more.
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            match kind {
                KIND_STRUCT | KIND_UNION => {}
                KIND_PTR | KIND_TYPEDEF => {
                    if kind == KIND_TYPEDEF && name != 0 {
                        typedefs.insert(c_str(&strings, name).to_vec(), types.len() as u32 + 1);
                    }
                    types.push(Ty::Ref {
                        ty: u32_at(off - 4)?,
                    });
                }
                KIND_FUNC_PROTO => types.push(Ty::FuncProto { params: vlen }),
                _ => types.push(Ty::Other),
            }
            off += extra;
        }
        Ok(Btf {
            strings,
            types,
            by_name,
            typedefs,
        })
    }

    /// The arguments a BTF tracepoint program gets on `event`: those of its
    /// `btf_trace_<event>` prototype but the first (the tracepoint's own
    /// `void *__data`). None when the kernel has no such tracepoint.
    /// https://github.com/torvalds/linux/blob/v6.18/include/trace/bpf_probe.h (btf_trace_##call)
    pub fn tracepoint_args(&self, event: &str) -> Option<usize> {
        let mut id = *self.typedefs.get(format!("btf_trace_{event}").as_bytes())?;
        // typedef -> pointer -> function prototype.
        for _ in 0..4 {
            match self.types.get(id.checked_sub(1)? as usize)? {
                Ty::Ref { ty } => id = *ty,
                Ty::FuncProto { params } => return params.checked_sub(1),
                _ => return None,
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// struct and union members (`file.f_path` sits in one).
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .by_name
            .get(name.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        self.find(id, member.as_bytes(), 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.into(), member.into()))
    }

    fn find(&self, id: u32, member: &[u8], base_bits: u32) -> Option<u32> {
        let Some(Ty::Composite { members, .. }) = self.types.get(id.checked_sub(1)? as usize)
        else {
            return None;
        };
        for m in members {
            let at = base_bits + m.bit_offset;
            if m.name == 0 {
                if let Some(found) = self.find(self.skip_to_composite(m.ty)?, member, at) {
                    return Some(found);
                }
            } else if c_str(&self.strings, m.name) == member {
                return Some(at);
            }
        }
        None
    }

    /// Anonymous members are struct or union types directly.
    fn skip_to_composite(&self, id: u32) -> Option<u32> {
        match self.types.get(id.checked_sub(1)? as usize)? {
            Ty::Composite { name: 0, .. } => Some(id),
            _ => None,
        }
    }
}

fn c_str(strings: &[u8], off: u32) -> &[u8] {
    let s = strings.get(off as usize..).unwrap_or_default();
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// struct bpf_iter__task_file is BPF ABI (meta, task, fd, file; the
    /// pointers inside anonymous unions), so its offsets are known.
    #[test]
    fn vmlinux_offsets() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            panic!("/sys/kernel/btf/vmlinux is missing: fdtrace needs kernel BTF");
        };
        let btf = Btf::parse(&data).expect("parse vmlinux BTF");
        let off = |m| btf.member_offset("bpf_iter__task_file", m).unwrap();
        assert_eq!(
            [off("meta"), off("task"), off("fd"), off("file")],
            [0, 8, 16, 24]
        );
        assert_eq!(btf.member_offset("list_head", "prev").unwrap(), 8);
        assert!(matches!(
            btf.member_offset("file", "no_such_member"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct", "x"),
            Err(BtfError::NoStruct(_))
        ));
        // sched_process_fork(parent, child) since it has had BTF;
        // sys_exit(regs, ret).
        assert_eq!(btf.tracepoint_args("sched_process_fork"), Some(2));
        assert_eq!(btf.tracepoint_args("sys_exit"), Some(2));
        let exit = btf.tracepoint_args("sched_process_exit");
        assert!(matches!(exit, Some(1 | 2)), "{exit:?}");
        assert_eq!(btf.tracepoint_args("no_such_event"), None);
    }
}
