//! The ring buffer, drained into typed events.
use aya::maps::{MapData, RingBuf};
use fdtrace_common::{
    EV_ADOPT, EV_CGROUP, EV_EMFILE, EV_ENFILE, EV_EXEC, EV_EXIT, EV_FORK, EV_LEAVE, EV_RLIMIT,
    Event, syscalls,
};

use crate::analysis::{Errno, Totals};

/// One event of the kernel side.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelEvent {
    /// `pid` was forked by traced `ppid`; the event ran in the parent, so
    /// its comm is the child's too.
    Fork { pid: u32, ppid: u32, comm: String },
    /// `pid` exec'd `comm`, holding `inherited` fds numbered 3 and up
    /// without close-on-exec.
    Exec {
        pid: u32,
        comm: String,
        ts_ns: u64,
        inherited: u32,
    },
    /// `pid` exited with these final totals.
    Exit {
        pid: u32,
        comm: String,
        totals: Totals,
    },
    /// An fd-creating call of thread `tid` failed with `errno`.
    FdError {
        pid: u32,
        tid: u32,
        errno: Errno,
        syscall: &'static str,
        /// The path asked for (open family), as the kernel copied it.
        path: Option<String>,
        /// The failing call's user stack id, or NO_SITE.
        stack_id: u64,
    },
    /// setrlimit/prlimit changed RLIMIT_NOFILE of `pid`.
    Rlimit { pid: u32 },
    /// Node mode began tracing `pid` on its own (fork of an untraced
    /// parent, exec, move into a selected cgroup): its table is to be seeded.
    Adopt { pid: u32 },
    /// Node mode stopped tracing `pid`, moved out of the selected cgroups,
    /// with these last totals.
    Leave { pid: u32, totals: Totals },
    /// `pid` is in cgroup `id`, which node mode had not told of before.
    Cgroup { pid: u32, id: u64 },
}

/// The events in the ring buffer now.
pub fn drain(ring: &mut RingBuf<MapData>) -> Vec<KernelEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() < size_of::<Event>() {
            continue;
        }
        // SAFETY: the kernel wrote a whole Event; read_unaligned copes with
        // the ring's 8-byte alignment.
        let ev = unsafe { item.as_ptr().cast::<Event>().read_unaligned() };
        drop(item);
        out.extend(decode(&ev));
    }
    out
}

/// The typed event of a raw one; None for a kind this build does not know.
pub fn decode(ev: &Event) -> Option<KernelEvent> {
    let comm = || c_str(&ev.comm);
    Some(match ev.kind {
        EV_FORK => KernelEvent::Fork {
            pid: ev.tgid,
            ppid: ev.aux,
            comm: comm(),
        },
        EV_EXEC => KernelEvent::Exec {
            pid: ev.tgid,
            comm: comm(),
            ts_ns: ev.ts_ns,
            inherited: ev.inherited,
        },
        EV_EXIT => KernelEvent::Exit {
            pid: ev.tgid,
            comm: comm(),
            totals: Totals {
                open_fds: ev.live,
                opened: ev.opened,
                closed: ev.closed,
            },
        },
        EV_EMFILE | EV_ENFILE => {
            let path = c_str(&ev.path);
            KernelEvent::FdError {
                pid: ev.tgid,
                tid: ev.aux,
                errno: if ev.kind == EV_EMFILE {
                    Errno::Emfile
                } else {
                    Errno::Enfile
                },
                syscall: syscalls::name(u64::from(ev.syscall)).unwrap_or("unknown"),
                path: (!path.is_empty()).then_some(path),
                stack_id: ev.site,
            }
        }
        EV_RLIMIT => KernelEvent::Rlimit { pid: ev.tgid },
        EV_ADOPT => KernelEvent::Adopt { pid: ev.tgid },
        // The event's comm is the mover's (it ran in the task that wrote
        // cgroup.procs), not the process's.
        EV_LEAVE => KernelEvent::Leave {
            pid: ev.tgid,
            totals: Totals {
                open_fds: ev.live,
                opened: ev.opened,
                closed: ev.closed,
            },
        },
        EV_CGROUP => KernelEvent::Cgroup {
            pid: ev.tgid,
            id: ev.site,
        },
        _ => return None,
    })
}

/// A NUL-padded kernel string.
/// A NUL-terminated name the traced process chose (comm, a path): kept
/// lossless, every byte that is not UTF-8 as `\xNN`.
fn c_str(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    crate::escape::lossless(&bytes[..len])
}

#[cfg(test)]
mod tests {
    use fdtrace_common::{EVENT_PATH_LEN, NO_SITE};

    use super::*;

    fn event(kind: u32) -> Event {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"python");
        Event {
            ts_ns: 42,
            kind,
            tgid: 100,
            aux: 7,
            syscall: 257,
            live: 5,
            opened: 9,
            closed: 4,
            site: NO_SITE,
            inherited: 2,
            _pad: 0,
            comm,
            path: [0; EVENT_PATH_LEN],
        }
    }

    #[test]
    fn fork_exec_exit() {
        assert_eq!(
            decode(&event(EV_FORK)),
            Some(KernelEvent::Fork {
                pid: 100,
                ppid: 7,
                comm: "python".into()
            })
        );
        assert_eq!(
            decode(&event(EV_EXEC)),
            Some(KernelEvent::Exec {
                pid: 100,
                comm: "python".into(),
                ts_ns: 42,
                inherited: 2
            })
        );
        assert_eq!(
            decode(&event(EV_EXIT)),
            Some(KernelEvent::Exit {
                pid: 100,
                comm: "python".into(),
                totals: Totals {
                    open_fds: 5,
                    opened: 9,
                    closed: 4
                }
            })
        );
    }

    #[test]
    fn fd_errors_with_and_without_a_path() {
        let mut ev = event(EV_EMFILE);
        ev.path[..6].copy_from_slice(b"/tmp/x");
        let Some(KernelEvent::FdError {
            errno,
            syscall,
            path,
            tid,
            ..
        }) = decode(&ev)
        else {
            panic!("not an fd error");
        };
        assert_eq!(
            (errno, syscall, path.as_deref(), tid),
            (Errno::Emfile, "openat", Some("/tmp/x"), 7)
        );
        let Some(KernelEvent::FdError { errno, path, .. }) = decode(&event(EV_ENFILE)) else {
            panic!("not an fd error");
        };
        assert_eq!((errno, path), (Errno::Enfile, None));
    }

    #[test]
    fn unknown_kinds_are_skipped() {
        assert_eq!(
            decode(&event(EV_RLIMIT)),
            Some(KernelEvent::Rlimit { pid: 100 })
        );
        assert_eq!(
            decode(&event(EV_ADOPT)),
            Some(KernelEvent::Adopt { pid: 100 })
        );
        assert_eq!(decode(&event(999)), None);
    }

    #[test]
    fn a_comm_without_nul_is_whole() {
        let mut ev = event(EV_EXEC);
        ev.comm = *b"0123456789abcdef";
        let Some(KernelEvent::Exec { comm, .. }) = decode(&ev) else {
            panic!("not an exec");
        };
        assert_eq!(comm, "0123456789abcdef");
    }
}
