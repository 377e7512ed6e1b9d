//! Who a process is and its fd limits, from /proc/PID/stat and limits.
use std::{
    io::Read as _,
    time::{Duration, Instant},
};

use procfs::process::Process;

/// Name, parent and fd limits of a process, read at once.
#[derive(Clone, Debug, Default)]
pub struct ProcInfo {
    pub comm: String,
    pub ppid: Option<u32>,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
}

/// What tells a process from a later one that got the same pid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Clock ticks after boot at which it started (/proc/PID/stat field 22).
    pub start_time: u64,
    /// State Z: it has exited, its parent has not reaped it.
    pub zombie: bool,
}

/// The fields of /proc/PID/stat fdtrace uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Lossless: the process chose these bytes.
    pub comm: String,
    pub ppid: u32,
    pub identity: Identity,
}

/// /proc/PID/stat: `pid (comm) state ppid ... starttime ...`. The comm may
/// hold spaces and parentheses, so it ends at the LAST `)`.
/// https://github.com/torvalds/linux/blob/v6.18/fs/proc/array.c (do_task_stat)
pub fn parse_stat(text: &[u8]) -> Option<Stat> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    let comm = text.get(open + 1..close)?;
    let rest = std::str::from_utf8(text.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    // Field 3 (state) is the first after the comm; field N is at N - 3.
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let start_time = fields.nth(22 - 5)?.parse().ok()?;
    Some(Stat {
        comm: crate::escape::lossless(comm),
        ppid,
        identity: Identity {
            start_time,
            zombie: state == "Z",
        },
    })
}

/// The stat of `pid`; None when it is gone.
pub fn stat(pid: u32) -> Option<Stat> {
    let mut buf = [0u8; STAT_BUF];
    parse_stat(read_small(&format!("/proc/{pid}/stat"), &mut buf)?)
}

/// Room for /proc/PID/stat: 52 fields of at most 20 digits and a comm of
/// at most 64 bytes.
const STAT_BUF: usize = 2048;

/// The whole of a small /proc file in `buf`, in an open, a read or two
/// and a close (std::fs::read adds a statx and an lseek for its size
/// hint: a report reads this for every process). None when it cannot be
/// read or does not fit.
fn read_small<'a>(path: &str, buf: &'a mut [u8]) -> Option<&'a [u8]> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = 0;
    loop {
        match f.read(&mut buf[len..]) {
            Ok(0) => return Some(&buf[..len]),
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
        if len == buf.len() {
            return None;
        }
    }
}

/// RLIMIT_NOFILE of `pid` (soft, hard; None: unlimited), by prlimit(2):
/// one syscall where /proc/PID/limits is an open, reads and a parse of 17
/// lines. prlimit needs CAP_SYS_RESOURCE for other users' processes; the
/// file, readable by all, answers then.
/// https://github.com/torvalds/linux/blob/v6.18/kernel/sys.c (check_prlimit_permission)
fn nofile_limits(pid: u32) -> Limits {
    let limit = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let pid_t = libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX);
    // SAFETY: reads the limit only (no new one) into `old`.
    if unsafe { libc::prlimit(pid_t, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } == 0 {
        return (limit(old.rlim_cur), limit(old.rlim_max));
    }
    use procfs::process::LimitValue;
    let limit = |v: LimitValue| match v {
        LimitValue::Value(n) => Some(n),
        LimitValue::Unlimited => None,
    };
    match Process::new(pid as i32).and_then(|p| p.limits()) {
        Ok(l) => (
            limit(l.max_open_files.soft_limit),
            limit(l.max_open_files.hard_limit),
        ),
        Err(_) => (None, None),
    }
}

/// How long a report trusts the stat and limits it read of a process: a
/// rename (`prctl(PR_SET_NAME)`) shows within this. An exec's new name
/// comes with its event, and so does a new RLIMIT_NOFILE (setrlimit,
/// prlimit: `EV_RLIMIT`); this bounds how long a limit stays stale if that
/// event was lost.
pub const STAT_EVERY: Duration = Duration::from_secs(10);

/// RLIMIT_NOFILE, soft and hard (None: unlimited).
pub type Limits = (Option<u64>, Option<u64>);

/// A process's stat and fd limits as a report last read them. Most
/// processes of a node are idle, and reading /proc/PID/stat (a path walk
/// and `do_task_stat`, about 5 us here) and the limits (a prlimit call)
/// for each of them at every report were the largest cost of a report.
/// Who the process is does not rest on it: a later process under the same
/// pid is a later kernel entry (`ProcStats::registered_ns`).
#[derive(Default)]
pub struct KeptStat(Option<Kept>);

struct Kept {
    stat: Stat,
    limits: Limits,
    at: Instant,
}

impl KeptStat {
    /// The stat and limits of `pid`, read again when [`stat_due`] says so,
    /// and whether they were read now (only a fresh read can give a new
    /// name or identity); None when that read finds the process gone.
    pub fn get(&mut self, pid: u32, now: Instant) -> Option<(&Stat, Limits, bool)> {
        let fresh = stat_due(self.0.as_ref().map(|k| k.at), now);
        if fresh {
            self.0 = stat(pid).map(|stat| Kept {
                stat,
                limits: nofile_limits(pid),
                at: now,
            });
        }
        self.0.as_ref().map(|k| (&k.stat, k.limits, fresh))
    }

    /// An exec or a new fd limit: the next report reads both again.
    pub fn forget(&mut self) {
        self.0 = None;
    }
}

/// Whether a report reads the stat of a process again, given when it last
/// did: at first sight and every [`STAT_EVERY`] (an exec or a new limit
/// makes the report forget it). Not when its table changed: on a node most
/// busy processes change theirs between any two reports, and their names
/// change no more often than an idle one's.
pub fn stat_due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|at| now.saturating_duration_since(at) >= STAT_EVERY)
}

/// Identity and limits of `pid`, read now; None when it is gone.
pub fn read_info(pid: u32) -> Option<ProcInfo> {
    let stat = stat(pid)?;
    let (soft_limit, hard_limit) = nofile_limits(pid);
    Some(ProcInfo {
        comm: stat.comm,
        ppid: Some(stat.ppid),
        soft_limit,
        hard_limit,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SLEEP: &[u8] = b"4242 (sleep) S 1 4242 4242 0 -1 4194304 95 0 0 0 0 0 0 0 20 0 1 0 8812345 2301952 240 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn stat_is_read_at_first_sight_and_every_ten_seconds() {
        let t0 = Instant::now();
        assert!(stat_due(None, t0));
        let last = Some(t0);
        assert!(!stat_due(last, t0 + Duration::from_secs(1)));
        assert!(!stat_due(last, t0 + STAT_EVERY - Duration::from_millis(1)));
        assert!(stat_due(last, t0 + STAT_EVERY));
        assert!(!stat_due(last, t0), "a clock read before the last read");
    }

    #[test]
    fn a_kept_stat_is_read_again_when_due_or_forgotten() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let pid = child.id();
        let t0 = Instant::now();
        let mut kept = KeptStat::default();
        let (first, limits, fresh) = kept.get(pid, t0).expect("a running child");
        let first = first.clone();
        assert!(fresh, "first sight reads it");
        assert_eq!(limits, nofile_limits(std::process::id()), "inherited");
        assert_eq!(first.ppid, std::process::id());
        child.kill().expect("kill");
        child.wait().expect("reaped");
        // Not due: what was read is kept, though the pid is gone now.
        assert_eq!(
            kept.get(pid, t0 + Duration::from_secs(1)),
            Some((&first, limits, false))
        );
        // Due: read again, and gone.
        assert_eq!(kept.get(pid, t0 + STAT_EVERY), None);
        let mut again = KeptStat::default();
        again.get(std::process::id(), t0).expect("fdtrace's own");
        again.forget();
        let (_, _, fresh) = again.get(std::process::id(), t0).expect("fdtrace's own");
        assert!(fresh, "an exec or a new limit forgets it");
    }

    #[test]
    fn stat_fields_by_position() {
        let s = parse_stat(SLEEP).expect("parses");
        assert_eq!(s.comm, "sleep");
        assert_eq!(s.ppid, 1);
        assert_eq!(s.identity.start_time, 8_812_345);
        assert!(!s.identity.zombie);
    }

    #[test]
    fn a_comm_with_parentheses_and_spaces_ends_at_the_last_paren() {
        let text = b"7 (a) Z 9 (b) Z 3 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0";
        let s = parse_stat(text).expect("parses");
        assert_eq!(s.comm, "a) Z 9 (b");
        assert_eq!(s.ppid, 3);
        assert!(s.identity.zombie);
        assert_eq!(s.identity.start_time, 555);
    }

    #[test]
    fn a_hostile_comm_is_kept_lossless() {
        let text = b"7 (\x1b[31mEVIL\xff\n) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        let s = parse_stat(text).expect("parses");
        assert_eq!(s.comm, "\x1b[31mEVIL\\xff\n");
    }

    #[test]
    fn limits_of_this_process_match_getrlimit() {
        let mut own = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: writes `own`.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
        let (soft, hard) = nofile_limits(std::process::id());
        assert_eq!(
            soft,
            Some(own.rlim_cur).filter(|&v| v != libc::RLIM_INFINITY)
        );
        assert_eq!(
            hard,
            Some(own.rlim_max).filter(|&v| v != libc::RLIM_INFINITY)
        );
    }

    #[test]
    fn stat_of_this_process_reads_whole() {
        let s = stat(std::process::id()).expect("own stat");
        assert!(s.identity.start_time > 0);
        assert!(!s.identity.zombie);
        let mut small = [0u8; 8];
        assert_eq!(
            read_small("/proc/self/stat", &mut small),
            None,
            "does not fit"
        );
    }

    #[test]
    fn truncated_stat_is_refused() {
        assert_eq!(parse_stat(b"7 (x) S 1 7 7"), None);
        assert_eq!(parse_stat(b"7 x S 1"), None);
        assert_eq!(parse_stat(b""), None);
    }

    proptest! {
        #[test]
        fn any_stat_text_parses_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_stat(&bytes);
        }

        #[test]
        fn any_comm_bytes_survive(comm in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut text = b"12 (".to_vec();
            text.extend_from_slice(&comm);
            text.extend_from_slice(b") R 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0");
            let s = parse_stat(&text).expect("parses");
            prop_assert_eq!(s.comm, crate::escape::lossless(&comm));
            prop_assert_eq!(s.identity.start_time, 99);
        }
    }
}
