//! Reads of another process's memory, through /proc/PID/mem (the same
//! ptrace access check as process_vm_readv; one pread per read).
use std::{fs::File, io, os::unix::fs::FileExt as _};

pub struct Mem {
    file: File,
}

impl Mem {
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(Mem {
            file: File::open(format!("/proc/{pid}/mem"))?,
        })
    }

    /// Fills `buf` from `addr`; a short read (an unmapped page) is an error.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        if addr == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "NULL pointer"));
        }
        self.file.read_exact_at(buf, addr)
    }

    pub fn u64(&self, addr: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn bytes(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }
}

/// The little-endian u64 at `off` of `b` (a structure read in one go).
pub fn u64_at(b: &[u8], off: u32) -> u64 {
    let o = off as usize;
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

pub fn u32_at(b: &[u8], off: u32) -> u32 {
    let o = off as usize;
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
