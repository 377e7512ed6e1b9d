//! Resource labels: what an fd points at, named so that the fds of one leak
//! group together (paths differing only by digits or random suffixes are one
//! label; a socket is its protocol and peer).
use std::{
    collections::HashMap, net::SocketAddr, os::fd::BorrowedFd, os::unix::fs::MetadataExt as _,
    rc::Rc,
};

use fdtrace_common::FdKind;

use foldhash::{HashMap as FastMap, HashMapExt as _};
use procfs::{
    net::TcpState as ProcTcpState,
    process::{FDTarget, Process},
};

use crate::{
    analysis::{Label, TcpState},
    kernel::iterators,
    procfd::{ProcDir, ProcFd},
};

/// A socket as the kernel's socket tables show it.
#[derive(Clone, Debug)]
pub struct SockInfo {
    pub label: String,
    /// TCP sockets only.
    pub state: Option<TcpState>,
    /// Not yet connected or bound: its label may still change.
    pub provisional: bool,
}

/// Above this many fds to label at once, their link texts come from one
/// kernel walk of the table (the seed iterator) instead of a readlink each.
const WALK_OVER: usize = 64;

/// Where the link texts of a process's fds come from.
pub enum Links {
    /// readlink of /proc/PID/fd/N, per fd.
    Each(ProcDir),
    /// All of them, from one walk of the table.
    Walked {
        pid: u32,
        targets: HashMap<u32, FDTarget>,
    },
}

impl Links {
    /// For labelling `wanted` fds of `pid`; None when the process is gone.
    pub fn open(seed_prog: BorrowedFd<'_>, pid: u32, wanted: usize) -> Option<Links> {
        if wanted > WALK_OVER
            && let Ok(fds) = iterators::list(seed_prog, pid)
        {
            return Some(Links::walked(pid, fds));
        }
        ProcDir::open(pid).ok().map(Links::Each)
    }

    /// The links of `fds`, found by one walk of `pid`'s table.
    pub fn walked(pid: u32, fds: Vec<ProcFd>) -> Links {
        let targets = fds
            .into_iter()
            .filter_map(|f| Some((f.fd, f.target?)))
            .collect();
        Links::Walked { pid, targets }
    }

    fn pid(&self) -> u32 {
        match self {
            Links::Each(dir) => dir.pid(),
            Links::Walked { pid, .. } => *pid,
        }
    }

    fn target(&self, fd: u32) -> Option<FDTarget> {
        match self {
            Links::Each(dir) => dir.target(fd),
            Links::Walked { targets, .. } => targets.get(&fd).cloned(),
        }
    }
}

/// A socket table of a network namespace, the sockets by inode.
type ByInode = HashMap<u64, SockInfo>;

/// The socket tables labels come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Table {
    /// /proc/PID/net/tcp and tcp6.
    Tcp = 0,
    /// udp and udp6.
    Udp = 1,
    /// unix.
    Unix = 2,
}

impl Table {
    /// The tables that may list a socket made by socket(2) with `detail`
    /// (FdInfo::detail): only its own, so that labelling a unix or netlink
    /// socket does not walk the TCP hash; every one when the call is not
    /// known (accept, a pre-existing fd).
    fn for_socket(detail: u32) -> &'static [Table] {
        match protocol(detail) {
            "tcp" => &[Table::Tcp],
            "udp" => &[Table::Udp],
            "unix" => &[Table::Unix],
            "socket" => &[Table::Tcp, Table::Udp, Table::Unix],
            // raw, netlink, packet: in none of them.
            _ => &[],
        }
    }

    fn read(self, pid: u32) -> ByInode {
        let mut by_inode = HashMap::new();
        let Ok(proc) = Process::new(pid as i32) else {
            return by_inode;
        };
        match self {
            Table::Tcp => read_tcp(&proc, &mut by_inode),
            Table::Udp => read_udp(&proc, &mut by_inode),
            Table::Unix => read_unix(&proc, &mut by_inode),
        }
        by_inode
    }
}

/// The TCP sockets of the network namespace of `proc` (/proc/PID/net/tcp
/// and tcp6), labelled, into `by_inode`.
fn read_tcp(proc: &Process, by_inode: &mut ByInode) {
    for e in proc.tcp().into_iter().chain(proc.tcp6()).flatten() {
        let listen = e.state == ProcTcpState::Listen;
        let label = if listen {
            format!("tcp listen {}", e.local_address)
        } else {
            format!("tcp {}", e.remote_address)
        };
        let provisional = !listen && e.remote_address.port() == 0;
        by_inode.insert(
            e.inode,
            SockInfo {
                label,
                state: Some(match e.state {
                    ProcTcpState::CloseWait => TcpState::CloseWait,
                    ProcTcpState::Listen => TcpState::Listen,
                    _ => TcpState::Other,
                }),
                provisional,
            },
        );
    }
}

fn read_udp(proc: &Process, by_inode: &mut ByInode) {
    for e in proc.udp().into_iter().chain(proc.udp6()).flatten() {
        let connected = e.remote_address.port() != 0;
        let label = if connected {
            format!("udp {}", e.remote_address)
        } else {
            format!("udp {}", unspecified_port(e.local_address))
        };
        by_inode.insert(
            e.inode,
            SockInfo {
                label,
                state: None,
                provisional: !connected,
            },
        );
    }
}

fn read_unix(proc: &Process, by_inode: &mut ByInode) {
    for e in proc.unix().into_iter().flatten() {
        let label = match &e.path {
            Some(p) => format!(
                "unix {}",
                normalize_path(&crate::escape::lossless(p.as_os_str().as_encoded_bytes()))
            ),
            None => "unix".to_string(),
        };
        by_inode.insert(
            e.inode,
            SockInfo {
                label,
                state: None,
                provisional: false,
            },
        );
    }
}

/// The states of the sockets of a TCP table, by inode, for the analysis.
fn tcp_states(tcp: &ByInode) -> FastMap<u64, TcpState> {
    let mut out = FastMap::with_capacity(tcp.len());
    for (&inode, s) in tcp {
        if let Some(state) = s.state {
            out.insert(inode, state);
        }
    }
    out
}

/// A network namespace, by the device and inode of its nsfs file.
type Netns = (u64, u64);

/// The namespace `pid` is in now; None when it is gone (or /proc hides it).
fn netns_of(pid: u32) -> Option<Netns> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    Some((m.dev(), m.ino()))
}

/// The socket tables of each network namespace, each read at most once
/// for all the processes in it: every process of a node may hold sockets,
/// and the kernel walks the whole of its namespace's TCP hash for each read
/// of /proc/PID/net/tcp (most of fdtrace's CPU on a node when read per
/// process). Made afresh for each report, so states are of that report.
/// https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp_ipv4.c (established_get_first)
#[derive(Default)]
pub struct NetTables {
    tables: HashMap<(Netns, Table), Rc<ByInode>>,
    states: HashMap<Netns, Rc<FastMap<u64, TcpState>>>,
}

impl NetTables {
    /// The TCP states of the sockets of `pid`'s namespace, by inode.
    pub fn tcp_states(&mut self, pid: u32) -> Rc<FastMap<u64, TcpState>> {
        let Some(ns) = netns_of(pid) else {
            return Rc::new(tcp_states(&Table::Tcp.read(pid)));
        };
        if let Some(s) = self.states.get(&ns) {
            return s.clone();
        }
        let s = Rc::new(tcp_states(&self.table(pid, Table::Tcp)));
        self.states.insert(ns, s.clone());
        s
    }

    /// Table `t` of `pid`'s namespace.
    fn table(&mut self, pid: u32, t: Table) -> Rc<ByInode> {
        match netns_of(pid) {
            Some(ns) => self
                .tables
                .entry((ns, t))
                .or_insert_with(|| Rc::new(t.read(pid)))
                .clone(),
            None => Rc::new(t.read(pid)),
        }
    }
}

/// The socket tables of one process, each read on first need.
pub struct ProcSockets<'a> {
    tables: &'a mut NetTables,
    read: [Option<Rc<ByInode>>; 3],
}

impl<'a> ProcSockets<'a> {
    pub fn new(tables: &'a mut NetTables) -> Self {
        ProcSockets {
            tables,
            read: [None, None, None],
        }
    }

    /// The socket `inode` of `pid`, made by socket(2) with `detail`, as
    /// the tables that may list it show it.
    fn find(&mut self, pid: u32, inode: u64, detail: u32) -> Option<SockInfo> {
        for &t in Table::for_socket(detail) {
            let table = self.read[t as usize].get_or_insert_with(|| self.tables.table(pid, t));
            if let Some(s) = table.get(&inode) {
                return Some(s.clone());
            }
        }
        None
    }
}

/// An unbound UDP socket shows port 0; keep the address family only.
fn unspecified_port(a: SocketAddr) -> String {
    if a.port() == 0 {
        if a.is_ipv4() { "ipv4" } else { "ipv6" }.to_string()
    } else {
        a.to_string()
    }
}

/// The protocol of a socket from its socket(2) arguments (FdInfo::detail),
/// for sockets no socket table lists yet (unbound, unconnected).
fn protocol(detail: u32) -> &'static str {
    const AF_UNIX: u32 = 1;
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const AF_NETLINK: u32 = 16;
    const AF_PACKET: u32 = 17;
    let (family, ty) = (detail >> 16, detail & 0xf);
    match (family, ty) {
        (AF_INET | AF_INET6, 1) => "tcp",
        (AF_INET | AF_INET6, 2) => "udp",
        (AF_INET | AF_INET6, 3) => "raw",
        (AF_UNIX, _) => "unix",
        (AF_NETLINK, _) => "netlink",
        (AF_PACKET, _) => "packet",
        _ => "socket",
    }
}

/// Labels `fd` of the process `links` is of; `sockets` is read on first
/// need. `detail` is the fd's FdInfo::detail.
pub fn label(
    links: &Links,
    fd: u32,
    kind: FdKind,
    detail: u32,
    sockets: &mut ProcSockets<'_>,
) -> Option<Label> {
    let pid = links.pid();
    let target = links.target(fd)?;
    let plain = |text: String| Label {
        text: text.into(),
        socket_inode: None,
        provisional: false,
    };
    Some(match target {
        FDTarget::Path(p) => plain(normalize_path(&p.to_string_lossy())),
        FDTarget::Socket(inode) => match sockets.find(pid, inode, detail) {
            Some(s) => Label {
                text: s.label.as_str().into(),
                // Only TCP sockets have a state the analysis looks at.
                socket_inode: s.state.is_some().then_some(inode),
                provisional: s.provisional,
            },
            None => Label {
                text: match protocol(detail) {
                    "tcp" => "tcp unconnected".into(),
                    "udp" => "udp unbound".into(),
                    p => p.into(),
                },
                socket_inode: (protocol(detail) == "tcp").then_some(inode),
                provisional: true,
            },
        },
        FDTarget::Net(_) => plain("socket".into()),
        FDTarget::Pipe(_) => plain("pipe".into()),
        FDTarget::MemFD(name) => plain(format!("memfd:{}", normalize_path(&name))),
        _ => plain(kind.name().into()),
    })
}

/// Groups paths that differ only by numbers or random parts:
/// `/tmp/tmpk2j3h4x9/log-2024-11-27.txt` -> `/tmp/*/log-N-N-N.txt`.
pub fn normalize_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if token.is_empty() {
            return;
        }
        let digits = token.chars().filter(char::is_ascii_digit).count();
        let letters = token.chars().filter(char::is_ascii_alphabetic).count();
        if token.len() >= 6 && digits >= 2 && letters >= 2 {
            out.push('*'); // a random suffix such as mkstemp's
        } else {
            let mut in_digits = false;
            for c in token.chars() {
                if c.is_ascii_digit() {
                    if !in_digits {
                        out.push('N');
                    }
                    in_digits = true;
                } else {
                    out.push(c);
                    in_digits = false;
                }
            }
        }
        token.clear();
    };
    for c in path.chars() {
        if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{Table, normalize_path, protocol, unspecified_port};

    #[test]
    fn a_socket_is_looked_up_in_its_own_table_only() {
        let detail = |family: u32, ty: u32| (family << 16) | ty;
        assert_eq!(Table::for_socket(detail(1, 1)), [Table::Unix]);
        assert_eq!(Table::for_socket(detail(2, 1)), [Table::Tcp]);
        assert_eq!(Table::for_socket(detail(10, 2)), [Table::Udp]);
        assert_eq!(Table::for_socket(detail(16, 3)), [], "netlink is in none");
        assert_eq!(
            Table::for_socket(0),
            [Table::Tcp, Table::Udp, Table::Unix],
            "accept, or a pre-existing fd: any"
        );
    }

    #[test]
    fn numbers_and_random_parts_group() {
        assert_eq!(
            normalize_path("/tmp/tmpk2j3h4x9/log-2024-11-27.txt"),
            "/tmp/*/log-N-N-N.txt"
        );
        assert_eq!(normalize_path("/proc/1234/fd"), "/proc/N/fd");
        assert_eq!(normalize_path("/data/agent.db"), "/data/agent.db");
        assert_eq!(normalize_path("/var/log/app.log.1"), "/var/log/app.log.N");
    }

    #[test]
    fn normalisation_is_idempotent() {
        for p in [
            "/tmp/tmpk2j3h4x9/log-2024-11-27.txt",
            "/proc/1234/fd",
            "/var/lib/app/shard-0042/part-7.bin",
            "memfd:wayland-shm",
            "",
            "/",
        ] {
            let once = normalize_path(p);
            assert_eq!(normalize_path(&once), once, "{p}");
        }
    }

    #[test]
    fn short_or_plain_tokens_stay() {
        assert_eq!(normalize_path("/etc/hosts"), "/etc/hosts");
        assert_eq!(normalize_path("/dev/pts/3"), "/dev/pts/N");
        // Too short to be a random suffix: digits become N.
        assert_eq!(normalize_path("/tmp/a1b2"), "/tmp/aNbN");
        assert_eq!(normalize_path("/tmp/x86_64"), "/tmp/xN_N");
    }

    #[test]
    fn non_ascii_paths_keep_their_letters() {
        assert_eq!(
            normalize_path("/données/été-2024.log"),
            "/données/été-N.log"
        );
    }

    #[test]
    fn socket_protocols_from_socket_args() {
        // (AF_INET << 16) | SOCK_STREAM, and so on.
        assert_eq!(protocol(2 << 16 | 1), "tcp");
        assert_eq!(protocol(10 << 16 | 2), "udp");
        assert_eq!(protocol(2 << 16 | 3), "raw");
        assert_eq!(protocol(1 << 16 | 1), "unix");
        assert_eq!(protocol(16 << 16 | 3), "netlink");
        assert_eq!(protocol(17 << 16 | 3), "packet");
        assert_eq!(protocol(0), "socket");
    }

    #[test]
    fn unbound_udp_keeps_only_the_family() {
        assert_eq!(unspecified_port("0.0.0.0:0".parse().unwrap()), "ipv4");
        assert_eq!(unspecified_port("[::]:0".parse().unwrap()), "ipv6");
        assert_eq!(
            unspecified_port("127.0.0.1:53".parse().unwrap()),
            "127.0.0.1:53"
        );
    }

    proptest! {
        /// Paths are chosen by the traced process: normalising any of them
        /// (as fdtrace has them: lossless text of any bytes) does not
        /// panic, and a normalised path stays as it is.
        #[test]
        fn normalising_any_path_is_idempotent(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let path = crate::escape::lossless(&bytes);
            let once = normalize_path(&path);
            prop_assert_eq!(normalize_path(&once), once.clone());
            prop_assert!(!once.chars().any(|c| c.is_ascii_digit()) || once.contains('\\'),
                "digits left in {:?}", once);
        }

        #[test]
        fn normalising_unicode_text_is_idempotent(path in "\\PC{0,60}") {
            let once = normalize_path(&path);
            prop_assert_eq!(normalize_path(&once), once);
        }

        /// Socket addresses from the socket tables: any one gives a label.
        #[test]
        fn any_socket_address_has_a_label(ip in any::<std::net::IpAddr>(), port in any::<u16>()) {
            let text = unspecified_port(std::net::SocketAddr::new(ip, port));
            prop_assert_eq!(port == 0, !text.contains(':') || text == "ipv6");
        }
    }
}
