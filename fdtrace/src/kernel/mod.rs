//! Phase 1: the kernel side as user space sees it. The loader and its maps,
//! the raw bpf(2) calls aya does not wrap (`map_batch`, `iterators`), the
//! ring buffer decoded into typed events (`events`), each process's live fd
//! entries as last read (`FdTable`) and the loss counters.
mod btf;
pub mod events;
pub mod iterators;
mod loader;
pub mod map_batch;
pub mod node;

use std::{io, os::fd::AsFd as _};

use fdtrace_common::{CNT_FDS_MAP_FULL, CNT_PROCS_MAP_FULL, CNT_RINGBUF_FULL};

pub use loader::{Kernel, Limits, can_read_other_users_fds, noop_hooks};
use map_batch::LiveFd;

use crate::analysis::Loss;

/// A process's open entries in the kernel map, as last read.
#[derive(Default)]
pub struct FdTable {
    pub fds: Vec<LiveFd>,
    /// Its ProcStats::generation before that read: the map is read again
    /// only for processes whose table changed since. None: read next time.
    pub generation: Option<u64>,
    /// Moves on whenever `fds` changes.
    pub version: u64,
}

impl FdTable {
    /// Reads the kernel map's entries of `pid` again if its table changed
    /// (`generation`, read before this walk, moved) since they were last
    /// read, by a walk of its own fd table: a report costs what the changed
    /// processes hold, not what every traced process does.
    pub fn refresh(&mut self, k: &Kernel, pid: u32, generation: u64) -> io::Result<()> {
        if self.generation == Some(generation) {
            return Ok(());
        }
        let fds = iterators::entries(k.entries.as_fd(), pid)?;
        // An fd opened and closed between two reports leaves the same list:
        // what was made of it still holds.
        if fds != self.fds {
            self.fds = fds;
            self.version += 1;
        }
        // A change during the walk moves the generation on, and the next
        // report reads again.
        self.generation = Some(generation);
        Ok(())
    }

    /// The entries changed in place.
    pub fn changed(&mut self) {
        self.version += 1;
    }
}

/// The kernel's loss counters, as reported so far.
#[derive(Default)]
pub struct LossCounters {
    seen: [u64; 3],
}

impl LossCounters {
    /// What was lost since the last call.
    pub fn read(&mut self, k: &Kernel, max_fds: u32, max_procs: u32) -> Vec<Loss> {
        let totals = [CNT_RINGBUF_FULL, CNT_FDS_MAP_FULL, CNT_PROCS_MAP_FULL].map(|i| k.counter(i));
        losses(&mut self.seen, totals, max_fds, max_procs)
    }
}

/// The losses between `seen` and `totals` (ring buffer, fds map, procs
/// map), moving `seen` on.
fn losses(seen: &mut [u64; 3], totals: [u64; 3], max_fds: u32, max_procs: u32) -> Vec<Loss> {
    let mut out = Vec::new();
    for (slot, total) in totals.into_iter().enumerate() {
        let count = total.saturating_sub(seen[slot]);
        seen[slot] = total;
        if count == 0 {
            continue;
        }
        out.push(match slot {
            0 => Loss::RingBuffer { count },
            1 => Loss::FdsMapFull {
                count,
                max_entries: max_fds,
            },
            _ => Loss::ProcsMapFull {
                count,
                max_entries: max_procs,
            },
        });
    }
    out
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns, so user-made entries
/// compare with kernel-made ones.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_deltas_since_the_last_read() {
        let mut seen = [0; 3];
        assert_eq!(losses(&mut seen, [0, 0, 0], 10, 20), []);
        assert_eq!(
            losses(&mut seen, [5, 0, 2], 10, 20),
            [
                Loss::RingBuffer { count: 5 },
                Loss::ProcsMapFull {
                    count: 2,
                    max_entries: 20
                }
            ]
        );
        assert_eq!(
            losses(&mut seen, [5, 3, 2], 10, 20),
            [Loss::FdsMapFull {
                count: 3,
                max_entries: 10
            }]
        );
    }
}
