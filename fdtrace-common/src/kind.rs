//! The kind of an fd from its link text: what readlink(/proc/PID/fd/N)
//! shows, which is what the kernel's `d_path` writes (the dentry's
//! `d_dname` for sockets, pipes and anonymous inodes: "socket:[123]",
//! "anon_inode:[eventfd]"). One rule for the kernel's walk of a table at
//! attach and for user space naming fds from /proc, so an fd has the same
//! kind whichever side named it.
//!
//! The text ends at its length or at its first NUL, whichever comes first:
//! the kernel passes its whole fixed-size buffer (a constant length the
//! verifier checks every index against), user space the text it read. No
//! table of names: a table of slices would put pointers in .rodata, which
//! BPF cannot relocate; the chains of literal tests below compile to
//! compares.
use crate::FdKind;

#[inline(always)]
fn at(t: &[u8], i: usize) -> u8 {
    if i < t.len() { t[i] } else { 0 }
}

/// `lit` at `off`.
#[inline(always)]
fn has(t: &[u8], off: usize, lit: &[u8]) -> bool {
    let mut j = 0;
    while j < lit.len() {
        if at(t, off + j) != lit[j] {
            return false;
        }
        j += 1;
    }
    true
}

/// `lit` at `off`, then the end of the text, with one ']' before it when
/// `bracket`.
#[inline(always)]
fn is(t: &[u8], off: usize, lit: &[u8], bracket: bool) -> bool {
    if !has(t, off, lit) {
        return false;
    }
    let end = off + lit.len();
    if bracket {
        at(t, end) == b']' && at(t, end + 1) == 0
    } else {
        at(t, end) == 0
    }
}

/// The kind of the fd whose link text is `t`.
#[inline(always)]
pub fn classify(t: &[u8]) -> FdKind {
    match at(t, 0) {
        0 => FdKind::Unknown,
        b'/' => {
            if has(t, 0, b"/memfd:") {
                FdKind::Memfd
            } else if has(t, 0, b"/dev/mqueue") && matches!(at(t, 11), b'/' | 0) {
                FdKind::Mqueue
            } else {
                FdKind::File
            }
        }
        // The kernel's "NAME:[INODE]" texts.
        _ if has(t, 0, b"socket:[") || has(t, 0, b"net:[") => FdKind::Socket,
        _ if has(t, 0, b"pipe:[") => FdKind::Pipe,
        // pidfds on pidfs (Linux 6.9+).
        _ if has(t, 0, b"pidfd:[") => FdKind::Pidfd,
        _ if has(t, 0, b"anon_inode:") => anon(t),
        // Any other "NAME:..." is a kind fdtrace does not know; a text with
        // neither '/' nor ':' is a path that d_path could not root.
        _ if has_colon(t) => FdKind::Unknown,
        _ => FdKind::File,
    }
}

/// How far into a text a kind name's ':' is looked for. The kernel's
/// "NAME:[INODE]" texts name a filesystem or an anonymous inode class
/// (fs/d_path.c dynamic_dname callers), a few bytes long; bounded so that
/// the kernel's verifier walks a short loop, not one per byte of PATH_MAX.
pub const KIND_NAME_MAX: usize = 64;

#[inline(always)]
fn has_colon(t: &[u8]) -> bool {
    let mut i = 0;
    while i < t.len() && i < KIND_NAME_MAX {
        match t[i] {
            b':' => return true,
            0 => return false,
            _ => {}
        }
        i += 1;
    }
    false
}

/// "anon_inode:NAME" or "anon_inode:[NAME]" (the names the callers of
/// fs/anon_inodes.c give).
#[inline(always)]
fn anon(t: &[u8]) -> FdKind {
    let bracket = at(t, 11) == b'[';
    let i = if bracket { 12 } else { 11 };
    let is = |lit: &[u8]| is(t, i, lit, bracket);
    if is(b"eventfd") {
        FdKind::Eventfd
    } else if is(b"eventpoll") {
        FdKind::Epoll
    } else if is(b"timerfd") {
        FdKind::Timerfd
    } else if is(b"signalfd") {
        FdKind::Signalfd
    } else if is(b"inotify") {
        FdKind::Inotify
    } else if is(b"fanotify") {
        FdKind::Fanotify
    } else if is(b"userfaultfd") {
        FdKind::Userfaultfd
    } else if is(b"perf_event") {
        FdKind::PerfEvent
    } else if is(b"io_uring") {
        FdKind::IoUring
    } else if is(b"pidfd") {
        FdKind::Pidfd
    } else if is(b"fscontext") {
        FdKind::Mount
    } else if has(t, i, b"bpf") {
        // bpf-map, bpf-prog, bpf_link, bpf_iter, bpf-token, ...
        FdKind::Bpf
    } else if has(t, i, b"memfd") {
        FdKind::Memfd
    } else {
        FdKind::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(text: &str) -> FdKind {
        classify(text.as_bytes())
    }

    #[test]
    fn files() {
        assert_eq!(k("/dev/null"), FdKind::File);
        assert_eq!(k("/tmp/x (deleted)"), FdKind::File);
        assert_eq!(k("/tmp/with:colon"), FdKind::File);
        assert_eq!(k("/"), FdKind::File);
        assert_eq!(k("relative-no-colon"), FdKind::File);
    }

    #[test]
    fn sockets() {
        assert_eq!(k("socket:[4242]"), FdKind::Socket);
        assert_eq!(k("net:[4026531840]"), FdKind::Socket);
        assert_eq!(
            k("socket:"),
            FdKind::Unknown,
            "no inode: not the kernel's text"
        );
    }

    #[test]
    fn pipes() {
        assert_eq!(k("pipe:[77]"), FdKind::Pipe);
        assert_eq!(k("pipe"), FdKind::File);
    }

    #[test]
    fn memfd() {
        assert_eq!(k("/memfd:buf (deleted)"), FdKind::Memfd);
        assert_eq!(k("/memfd:"), FdKind::Memfd);
        assert_eq!(k("anon_inode:[memfd]"), FdKind::Memfd);
        assert_eq!(k("/memfdx"), FdKind::File);
    }

    #[test]
    fn mqueue() {
        assert_eq!(k("/dev/mqueue/q1"), FdKind::Mqueue);
        assert_eq!(k("/dev/mqueue"), FdKind::Mqueue);
        assert_eq!(k("/dev/mqueuex"), FdKind::File);
    }

    #[test]
    fn pidfd_both_spellings() {
        assert_eq!(k("pidfd:[123]"), FdKind::Pidfd);
        assert_eq!(k("anon_inode:[pidfd]"), FdKind::Pidfd);
    }

    #[test]
    fn anon_inodes() {
        for (name, kind) in [
            ("eventfd", FdKind::Eventfd),
            ("eventpoll", FdKind::Epoll),
            ("timerfd", FdKind::Timerfd),
            ("signalfd", FdKind::Signalfd),
            ("inotify", FdKind::Inotify),
            ("fanotify", FdKind::Fanotify),
            ("userfaultfd", FdKind::Userfaultfd),
            ("perf_event", FdKind::PerfEvent),
            ("io_uring", FdKind::IoUring),
            ("fscontext", FdKind::Mount),
            ("bpf-map", FdKind::Bpf),
            ("bpf-prog", FdKind::Bpf),
            ("bpf_link", FdKind::Bpf),
        ] {
            assert_eq!(k(&format!("anon_inode:[{name}]")), kind, "[{name}]");
            assert_eq!(k(&format!("anon_inode:{name}")), kind, "{name}");
        }
    }

    #[test]
    fn every_kind_but_unknown_has_a_text() {
        let texts = [
            "/etc/passwd",
            "socket:[1]",
            "pipe:[1]",
            "anon_inode:[eventfd]",
            "anon_inode:[eventpoll]",
            "anon_inode:[timerfd]",
            "anon_inode:[signalfd]",
            "anon_inode:inotify",
            "anon_inode:[fanotify]",
            "/memfd:x",
            "anon_inode:[userfaultfd]",
            "anon_inode:[perf_event]",
            "anon_inode:bpf-map",
            "anon_inode:[io_uring]",
            "pidfd:[9]",
            "anon_inode:[fscontext]",
            "/dev/mqueue/q",
        ];
        let mut seen = [false; crate::FD_KINDS];
        for t in texts {
            seen[k(t) as usize] = true;
        }
        for kind in FdKind::ALL.iter().skip(1) {
            assert!(seen[*kind as usize], "no text gives {}", kind.name());
        }
    }

    #[test]
    fn unknown_kinds() {
        assert_eq!(k(""), FdKind::Unknown);
        assert_eq!(k("anon_inode:[kvm-vm]"), FdKind::Unknown);
        assert_eq!(k("anon_inode:"), FdKind::Unknown);
        assert_eq!(k("landlock:[3]"), FdKind::Unknown);
        assert_eq!(k("dmabuf:"), FdKind::Unknown);
    }

    #[test]
    fn hostile_near_misses() {
        // A name that starts like a known one is not that one.
        assert_eq!(k("anon_inode:[eventfdx]"), FdKind::Unknown);
        assert_eq!(k("anon_inode:[eventfd"), FdKind::Unknown);
        assert_eq!(k("anon_inode:eventfd]"), FdKind::Unknown);
        assert_eq!(k("anon_inode:[eventfd]]"), FdKind::Unknown);
        assert_eq!(k("anon_inode:[[eventfd]]"), FdKind::Unknown);
        assert_eq!(k("anon_inode:[timerfd]\n"), FdKind::Unknown);
        assert_eq!(k("Socket:[1]"), FdKind::Unknown);
        assert_eq!(k(" socket:[1]"), FdKind::Unknown);
        assert_eq!(k("anon_inode"), FdKind::File);
    }

    #[test]
    fn text_ends_at_nul_or_length() {
        // The kernel's buffer: the text, its NUL, then stale bytes.
        let mut buf = [b'x'; 64];
        buf[..21].copy_from_slice(b"anon_inode:[eventfd]\0");
        assert_eq!(classify(&buf), FdKind::Eventfd);
        buf[..4].copy_from_slice(b"abc\0");
        assert_eq!(
            classify(&buf),
            FdKind::File,
            "':' after the NUL is not read"
        );
        assert_eq!(classify(b"\0socket:[1]"), FdKind::Unknown);
        assert_eq!(classify(b"anon_inode:[eventfd"), FdKind::Unknown);
        assert_eq!(classify(b"anon_inode:[io_uring]"), FdKind::IoUring);
    }

    #[test]
    fn bytes_that_are_not_utf8() {
        assert_eq!(classify(b"/tmp/\xff\xfe"), FdKind::File);
        assert_eq!(classify(b"\xff:\xfe"), FdKind::Unknown);
        assert_eq!(classify(b"anon_inode:[\xffeventfd]"), FdKind::Unknown);
        assert_eq!(classify(&[0xff; 4096]), FdKind::File);
    }

    #[test]
    fn longest_texts() {
        let mut long = [b'a'; 4096];
        long[0] = b'/';
        assert_eq!(classify(&long), FdKind::File);
        let mut colon = [b'a'; 4096];
        colon[KIND_NAME_MAX - 1] = b':';
        assert_eq!(classify(&colon), FdKind::Unknown);
        colon[KIND_NAME_MAX - 1] = b'a';
        colon[KIND_NAME_MAX] = b':';
        assert_eq!(
            classify(&colon),
            FdKind::File,
            "a ':' past any kind name's length is part of a path"
        );
    }
}
