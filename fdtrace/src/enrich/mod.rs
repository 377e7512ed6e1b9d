//! Phase 3: everything that reads /proc or symbols. Process identity and
//! limits, fd labels and socket states, call-site stacks; its output is
//! plain data for the analysis ([`crate::analysis::LabelledFd`], TCP states,
//! symbolized stacks).
pub mod attribution;
pub mod container;
pub mod label;
pub mod process;
pub mod python;
pub mod symbols;

use std::{os::fd::AsFd as _, rc::Rc, time::Duration};

use fdtrace_common::{FD_OPEN, FD_PREEXISTING, FdInfo, FdKey, FdKind};
use foldhash::{HashMap as FastMap, HashSet as FastSet};

use crate::{
    analysis::{Label, LabelledFd, TcpState, is_candidate},
    kernel::{FdTable, Kernel, iterators, map_batch::LiveFd},
    procfd::{self, ProcFd},
};
use label::{Links, NetTables, ProcSockets};
use python::PySites;
use symbols::Symbols;

/// Labels of a process's live fds by (fd, creation time): each fd is read
/// from /proc once, at the first report it survives to.
#[derive(Default)]
struct FdLabels {
    /// With each label, the last labelling that saw the fd, so the labels of
    /// closed fds can be dropped.
    labels: FastMap<(u32, u64), (Label, u64)>,
    /// One copy of each label text: a process holding 19 000 fds on one file
    /// keeps one string, not 19 000.
    texts: FastSet<Rc<str>>,
    /// Labellings made, the stamp of `labels`.
    stamp: u64,
}

impl FdLabels {
    /// Caches the label of the fd `key` names, sharing its text.
    fn remember(&mut self, key: (u32, u64), mut l: Label) {
        match self.texts.get(&l.text) {
            Some(t) => l.text = t.clone(),
            None => {
                self.texts.insert(l.text.clone());
            }
        }
        self.labels.insert(key, (l, self.stamp));
    }
}

/// What enrichment keeps of one process between reports.
pub struct ProcessEnrichment {
    pub comm: String,
    pub ppid: Option<u32>,
    /// Its cgroup, container and pod.
    pub who: attribution::ProcessAttribution,
    labels: FdLabels,
    /// The labelled fds of the last report, with the kernel table version
    /// they were made from and their own version.
    fds: Vec<LabelledFd>,
    from_table: Option<u64>,
    version: u64,
    /// Every fd of `fds` is a candidate with a final label: they hold until
    /// the table changes.
    settled: bool,
    has_tcp: bool,
    tcp_states: Rc<FastMap<u64, TcpState>>,
}

/// The enrichment of one process at one report.
pub struct Enriched<'a> {
    pub fds: &'a [LabelledFd],
    pub version: u64,
    pub tcp_states: &'a FastMap<u64, TcpState>,
}

impl ProcessEnrichment {
    pub fn new(comm: String, ppid: Option<u32>) -> Self {
        ProcessEnrichment {
            comm,
            ppid,
            who: attribution::ProcessAttribution::default(),
            labels: FdLabels::default(),
            fds: Vec::new(),
            from_table: None,
            version: 0,
            settled: false,
            has_tcp: false,
            tcp_states: Rc::default(),
        }
    }

    /// From /proc, for a process found without an event naming it.
    pub fn read(pid: u32) -> Self {
        let info = process::read_info(pid).unwrap_or_default();
        Self::new(info.comm, info.ppid)
    }

    /// Labels the fds found at attach from the walk that found them, so the
    /// first report does not walk the table a second time. Pre-existing fds
    /// have creation time 0 in the kernel map, and are cached under it.
    pub fn seed_labels(&mut self, pid: u32, found: Vec<ProcFd>) {
        let kinds: Vec<(u32, FdKind)> = found.iter().map(|f| (f.fd, f.kind)).collect();
        let links = Links::walked(pid, found);
        let mut tables = NetTables::default();
        let mut sockets = ProcSockets::new(&mut tables);
        for (fd, kind) in kinds {
            if let Some(l) = label::label(&links, fd, kind, 0, &mut sockets)
                && !l.provisional
            {
                self.labels.remember((fd, 0), l);
            }
        }
    }

    /// Labels the kernel's live fds of `pid` (`table`) and reads the TCP
    /// states of its sockets. Labelled fds that hold are not looked at
    /// again until the table changes; only fds at least `min_age` old at
    /// `now_ns` are labelled. `net`: the socket tables read so far in this
    /// report.
    #[allow(clippy::too_many_arguments)]
    pub fn enrich(
        &mut self,
        k: &Kernel,
        symbols: &mut Symbols,
        python: &mut PySites,
        net: &mut NetTables,
        pid: u32,
        table: &FdTable,
        now_ns: u64,
        min_age: Duration,
    ) -> Enriched<'_> {
        // Sockets change state without a syscall of the process's: their
        // states are read at every report, once per network namespace.
        if !(self.settled && self.from_table == Some(table.version)) {
            let min_age_ns = min_age.as_nanos() as u64;
            let young = |f: &LiveFd| {
                let preexisting = f.info.flags & FD_PREEXISTING != 0;
                !is_candidate(preexisting, f.info.created_ns, now_ns, min_age_ns)
            };
            let mut sockets = ProcSockets::new(net);
            self.label(k, symbols, python, pid, &table.fds, &young, &mut sockets);
            self.from_table = Some(table.version);
            self.version += 1;
        }
        self.tcp_states = if self.has_tcp {
            net.tcp_states(pid)
        } else {
            Rc::default()
        };
        Enriched {
            fds: &self.fds,
            version: self.version,
            tcp_states: &self.tcp_states,
        }
    }

    /// Labels every fd of `table` that is not `young` (not yet a leak
    /// candidate), from the cache or /proc.
    #[allow(clippy::too_many_arguments)]
    fn label(
        &mut self,
        k: &Kernel,
        symbols: &mut Symbols,
        python: &mut PySites,
        pid: u32,
        table: &[LiveFd],
        young: &dyn Fn(&LiveFd) -> bool,
        sockets: &mut ProcSockets<'_>,
    ) {
        let labels = &mut self.labels;
        labels.stamp += 1;
        let stamp = labels.stamp;
        let mut unlabelled = 0;
        for f in table {
            match labels.labels.get_mut(&(f.fd, f.info.created_ns)) {
                Some(e) => e.1 = stamp,
                None => unlabelled += 1,
            }
        }
        // Labels of fds closed since the last labelling.
        labels.labels.retain(|_, e| e.1 == stamp);
        // The old list goes first, so that the texts only it held are let go.
        self.fds = Vec::new();
        labels.texts.retain(|t| Rc::strong_count(t) > 1);
        let links = if unlabelled > 0 {
            Links::open(k.names.as_fd(), pid, unlabelled)
        } else {
            None
        };
        let mut out = Vec::with_capacity(table.len());
        let (mut settled, mut has_tcp) = (true, false);
        for f in table {
            let preexisting = f.info.flags & FD_PREEXISTING != 0;
            let kind = FdKind::from_u8(f.info.kind);
            let key = (f.fd, f.info.created_ns);
            let label = if young(f) {
                None
            } else if let Some((l, _)) = labels.labels.get(&key) {
                Some(l.clone())
            } else {
                // Read after the table was: kept only if the fd number
                // still holds the same fd.
                let found = links
                    .as_ref()
                    .and_then(|d| label::label(d, f.fd, kind, f.info.detail, sockets))
                    .filter(|_| {
                        same_fd(
                            f,
                            k.fds
                                .get(
                                    &FdKey {
                                        tgid: pid,
                                        fd: f.fd,
                                    },
                                    0,
                                )
                                .ok(),
                        )
                    });
                match found {
                    // Cached with its text shared.
                    Some(l) if !l.provisional => {
                        labels.remember(key, l);
                        labels.labels.get(&key).map(|(l, _)| l.clone())
                    }
                    other => other,
                }
            };
            match &label {
                None => settled = false,
                Some(l) => {
                    settled &= !l.provisional;
                    has_tcp |= l.socket_inode.is_some();
                }
            }
            // A Python process's fd is keyed by its Python stack, and
            // shows the native stack of the first fd seen with it.
            let native = symbols.site(k, pid, f.info.site);
            let stack = match python.site_key(pid, f.info.py_site, f.info.py_use, &mut |id| {
                k.py_stacks.get(&id, 0).ok()
            }) {
                Some(key) => {
                    symbols.alias(pid, key, native);
                    key
                }
                None => native,
            };
            out.push(LabelledFd {
                fd: f.fd,
                created_ns: f.info.created_ns,
                preexisting,
                kind,
                stack,
                label,
            });
        }
        self.fds = out;
        self.settled = settled;
        self.has_tcp = has_tcp;
    }
}

/// Whether the kernel's entry `now` for the fd number of `f` is still `f`.
/// A label read from /proc after the table was read is of a later fd when
/// the process closed `f` and took its number again in between (at its
/// start, the dynamic loader's fds are closed and their numbers reused at
/// once); that label, and so that resource under `f`'s call site, is
/// dropped and read again at the next report. Left open: dup2 onto
/// the number, between the kernel swapping the file and the syscall exit
/// that rewrites the entry.
fn same_fd(f: &LiveFd, now: Option<FdInfo>) -> bool {
    now.is_some_and(|now| now.flags & FD_OPEN != 0 && now.created_ns == f.info.created_ns)
}

/// The fds numbered 3 and up that `pid` held from before its exec at
/// `exec_ns` (those the kernel map had then), as "7 (pipe)", named from
/// /proc (or the names walk when there are many).
pub fn inherited_fds(k: &Kernel, pid: u32, exec_ns: u64) -> Vec<String> {
    // A walk of its own table, not of the whole map: execs are frequent
    // (every command a traced shell runs).
    let table = match iterators::entries(k.entries.as_fd(), pid) {
        Ok(t) => t,
        Err(e) => {
            if procfd::exists(pid) {
                eprintln!("fdtrace: reading the fd entries of pid {pid} failed: {e}");
            }
            return Vec::new();
        }
    };
    let mut held: Vec<LiveFd> = table
        .into_iter()
        .filter(|f| f.fd > 2 && f.info.created_ns < exec_ns)
        .collect();
    held.sort_unstable_by_key(|f| f.fd);
    let mut tables = NetTables::default();
    let mut sockets = ProcSockets::new(&mut tables);
    let links = Links::open(k.names.as_fd(), pid, held.len());
    held.iter()
        .map(|&LiveFd { fd, info }| {
            let kind = FdKind::from_u8(info.kind);
            let what = links
                .as_ref()
                .and_then(|d| label::label(d, fd, kind, info.detail, &mut sockets))
                .map_or(kind.name().to_string(), |l| l.text.to_string());
            format!("{fd} ({what})")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_read_after_the_number_was_taken_again_is_dropped() {
        let info = |created_ns, flags| FdInfo {
            created_ns,
            site: 7,
            py_site: 0,
            py_use: 0,
            syscall: 257,
            kind: 0,
            flags,
            detail: 0,
        };
        let f = LiveFd {
            fd: 3,
            info: info(10, FD_OPEN),
        };
        assert!(same_fd(&f, Some(info(10, FD_OPEN))));
        assert!(!same_fd(&f, Some(info(10, 0))), "closed since");
        assert!(!same_fd(&f, Some(info(20, FD_OPEN))), "another fd now");
        assert!(!same_fd(&f, None), "the process is gone");
    }

    fn label(text: &str) -> Label {
        Label {
            text: text.into(),
            socket_inode: None,
            provisional: false,
        }
    }

    #[test]
    fn cached_labels_share_one_text() {
        let mut cache = FdLabels::default();
        for fd in 3..1000 {
            cache.remember((fd, 0), label("/var/log/app.log"));
        }
        cache.remember((1000, 0), label("/etc/hosts"));
        assert_eq!(cache.texts.len(), 2);
        let a = &cache.labels[&(3, 0)].0.text;
        let b = &cache.labels[&(999, 0)].0.text;
        assert!(Rc::ptr_eq(a, b));
        // The set's copy and 997 labels.
        assert_eq!(Rc::strong_count(a), 998);
    }

    #[test]
    fn one_fd_number_reused_is_two_labels() {
        let mut cache = FdLabels::default();
        cache.remember((3, 10), label("/a"));
        cache.remember((3, 20), label("/b"));
        assert_eq!(&*cache.labels[&(3, 10)].0.text, "/a");
        assert_eq!(&*cache.labels[&(3, 20)].0.text, "/b");
    }
}
