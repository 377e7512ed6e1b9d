//! The kind of an fd from its link text (what readlink(/proc/PID/fd/N)
//! shows), for the fds the seed iterator finds at attach. The same rules as
//! user space's `procfd::kind_of` over procfs's parse of that text, so a
//! seeded fd has the kind a report would give it.
use fdtrace_common::{FdKind, SEED_PATH_MAX};

type Text = [u8; SEED_PATH_MAX];

#[inline(always)]
fn at(t: &Text, i: usize) -> u8 {
    if i < SEED_PATH_MAX { t[i] } else { 0 }
}

#[inline(always)]
fn has(t: &Text, off: usize, lit: &[u8]) -> bool {
    let mut j = 0;
    while j < lit.len() {
        if at(t, off + j) != lit[j] {
            return false;
        }
        j += 1;
    }
    true
}

/// `lit` at `off`, then the end of the text, with an optional ']' before it.
#[inline(always)]
fn is(t: &Text, off: usize, lit: &[u8]) -> bool {
    if !has(t, off, lit) {
        return false;
    }
    let end = off + lit.len();
    at(t, end) == 0 || (at(t, end) == b']' && at(t, end + 1) == 0)
}

/// `t` holds `len` bytes of link text, NUL included (bpf_d_path's count).
pub fn classify(t: &Text, len: usize) -> FdKind {
    if len == 0 {
        return FdKind::Unknown;
    }
    if at(t, 0) == b'/' {
        return if has(t, 0, b"/memfd:") {
            FdKind::Memfd
        } else if has(t, 0, b"/dev/mqueue") && matches!(at(t, 11), b'/' | 0) {
            FdKind::Mqueue
        } else {
            FdKind::File
        };
    }
    // The kernel writes these as "socket:[N]" and so on: the prefix is
    // enough (procfs also parses the number).
    if has(t, 0, b"socket:") || has(t, 0, b"net:") {
        return FdKind::Socket;
    }
    if has(t, 0, b"pipe:") {
        return FdKind::Pipe;
    }
    if has(t, 0, b"pidfd:[") {
        return FdKind::Pidfd;
    }
    if has(t, 0, b"anon_inode:") {
        return anon(t);
    }
    // procfs reads a text without '/' and ':' as a path, one with ':' as a
    // kind it may not know.
    let mut i = 0;
    while i < len && i < SEED_PATH_MAX {
        if at(t, i) == b':' {
            return FdKind::Unknown;
        }
        i += 1;
    }
    FdKind::File
}

/// "anon_inode:NAME" or "anon_inode:[NAME]". A chain of literal tests, not
/// a table: a table of slices would hold pointers in .rodata, which BPF
/// cannot relocate.
#[inline(always)]
fn anon(t: &Text) -> FdKind {
    let i = if at(t, 11) == b'[' { 12 } else { 11 };
    if is(t, i, b"eventfd") {
        FdKind::Eventfd
    } else if is(t, i, b"eventpoll") {
        FdKind::Epoll
    } else if is(t, i, b"timerfd") {
        FdKind::Timerfd
    } else if is(t, i, b"signalfd") {
        FdKind::Signalfd
    } else if is(t, i, b"inotify") {
        FdKind::Inotify
    } else if is(t, i, b"fanotify") {
        FdKind::Fanotify
    } else if is(t, i, b"userfaultfd") {
        FdKind::Userfaultfd
    } else if is(t, i, b"perf_event") {
        FdKind::PerfEvent
    } else if is(t, i, b"io_uring") {
        FdKind::IoUring
    } else if is(t, i, b"pidfd") {
        FdKind::Pidfd
    } else if is(t, i, b"fscontext") {
        FdKind::Mount
    } else if has(t, i, b"bpf") {
        FdKind::Bpf
    } else if has(t, i, b"memfd") {
        FdKind::Memfd
    } else {
        FdKind::Unknown
    }
}
