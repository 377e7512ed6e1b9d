//! The syscall's saved user registers, and reads of user memory.
use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_user};
use fdtrace_common::decode::SyscallArgs;

/// The saved user registers of the syscall at sys_exit (x86_64).
pub struct Regs(pub *const pt_regs);

impl Regs {
    // SAFETY (all): tp_btf gives a BTF-typed pt_regs pointer the verifier
    // lets us load from directly.
    #[inline(always)]
    pub fn nr(&self) -> u64 {
        unsafe { (*self.0).orig_rax }
    }
    /// The user address the syscall returns to.
    #[inline(always)]
    pub fn ip(&self) -> u64 {
        unsafe { (*self.0).rip }
    }
    #[inline(always)]
    pub fn sp(&self) -> u64 {
        unsafe { (*self.0).rsp }
    }
    #[inline(always)]
    pub fn bp(&self) -> u64 {
        unsafe { (*self.0).rbp }
    }
}

impl SyscallArgs for Regs {
    /// The x86_64 syscall convention (arch/x86/entry/entry_64.S): with a
    /// constant `i` once inlined, one load of one register.
    #[inline(always)]
    fn arg(&self, i: usize) -> u64 {
        // SAFETY: as above.
        unsafe {
            match i {
                0 => (*self.0).rdi,
                1 => (*self.0).rsi,
                2 => (*self.0).rdx,
                3 => (*self.0).r10,
                4 => (*self.0).r8,
                5 => (*self.0).r9,
                _ => 0,
            }
        }
    }
}

#[inline(always)]
pub fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the address.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}
