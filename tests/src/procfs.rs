//! /proc, the ground truth every count of fdtrace is checked against.

use std::collections::BTreeMap;
use std::path::Path;

/// `O_CLOEXEC` as shown in the `flags:` line of /proc/PID/fdinfo (octal).
const FDINFO_O_CLOEXEC: u64 = 0o2000000;

/// Kinds of fd fdtrace reports in `by_kind`.
pub const KINDS: [&str; 18] = [
    "unknown",
    "file",
    "socket",
    "pipe",
    "eventfd",
    "epoll",
    "timerfd",
    "signalfd",
    "inotify",
    "fanotify",
    "memfd",
    "userfaultfd",
    "perf_event",
    "bpf",
    "io_uring",
    "pidfd",
    "mount",
    "mqueue",
];

/// Open fds of `pid`: fd number -> link target, from /proc/PID/fd.
pub fn proc_fds(pid: i32) -> Result<BTreeMap<i32, String>, String> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("read {dir}: {e}"))?;
    let mut out = BTreeMap::new();
    for ent in rd {
        let ent = ent.map_err(|e| format!("read {dir}: {e}"))?;
        let name = ent.file_name().to_string_lossy().to_string();
        let fd: i32 = name
            .parse()
            .map_err(|_| format!("odd entry {name} in {dir}"))?;
        let target =
            std::fs::read_link(ent.path()).map_err(|e| format!("readlink {dir}/{name}: {e}"))?;
        out.insert(fd, target.to_string_lossy().to_string());
    }
    Ok(out)
}

/// A free fd number in `pid` well above every open one.
pub fn free_fd(pid: i32) -> i32 {
    proc_fds(pid).unwrap().keys().max().copied().unwrap_or(2) + 10
}

/// Kind of an fd from its /proc/PID/fd link, named as fdtrace names kinds.
pub fn classify(target: &str) -> &'static str {
    if target.starts_with("socket:[") {
        return "socket";
    }
    if target.starts_with("pipe:[") {
        return "pipe";
    }
    if target.starts_with("/memfd:") {
        return "memfd";
    }
    if target.starts_with("pidfd:") {
        return "pidfd";
    }
    if let Some(anon) = target.strip_prefix("anon_inode:") {
        let a = anon.trim_start_matches('[').trim_end_matches(']');
        return match a {
            "eventfd" => "eventfd",
            "eventpoll" => "epoll",
            "timerfd" => "timerfd",
            "signalfd" => "signalfd",
            "inotify" => "inotify",
            "fanotify" => "fanotify",
            "userfaultfd" => "userfaultfd",
            "perf_event" => "perf_event",
            "io_uring" => "io_uring",
            "pidfd" => "pidfd",
            a if a.starts_with("bpf") => "bpf",
            _ => "unknown",
        };
    }
    if target.starts_with('/') {
        return "file";
    }
    "unknown"
}

/// Count of fds per kind (only non-zero kinds).
pub fn kinds_of(fds: &BTreeMap<i32, String>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for t in fds.values() {
        *m.entry(classify(t).to_string()).or_insert(0) += 1;
    }
    m
}

pub fn proc_comm(pid: i32) -> Result<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end_matches('\n').to_string())
        .map_err(|e| format!("read /proc/{pid}/comm: {e}"))
}

pub fn proc_ppid(pid: i32) -> Result<i64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    // comm may hold spaces and parentheses: fields restart after the last ')'.
    let rest = &s[s.rfind(')').ok_or("bad stat")? + 1..];
    rest.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("bad /proc/{pid}/stat: {s}"))
}

/// (soft, hard) RLIMIT_NOFILE of `pid`.
pub fn proc_nofile(pid: i32) -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .map_err(|e| format!("read /proc/{pid}/limits: {e}"))?;
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix("Max open files") {
            let v: Vec<&str> = rest.split_whitespace().collect();
            if v.len() >= 2
                && let (Ok(a), Ok(b)) = (v[0].parse(), v[1].parse())
            {
                return Ok((a, b));
            }
        }
    }
    Err(format!("no 'Max open files' in /proc/{pid}/limits"))
}

/// Whether fd `fd` of `pid` is close-on-exec (from /proc/PID/fdinfo).
pub fn proc_cloexec(pid: i32, fd: i32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fdinfo/{fd}: {e}"));
    let flags = s
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
        .unwrap_or_else(|| panic!("no flags in /proc/{pid}/fdinfo/{fd}: {s}"));
    flags & FDINFO_O_CLOEXEC != 0
}

pub(crate) fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` is a live process that is not a zombie.
pub(crate) fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => match s.rfind(')') {
            Some(i) => !s[i + 1..].trim_start().starts_with('Z'),
            None => false,
        },
        Err(_) => false,
    }
}
