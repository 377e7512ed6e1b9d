//! Attach time, kernel memory per tracked fd, and what fdtrace costs while
//! it watches a million fds: fdtrace attached with `--pid` to processes that
//! hold many fds, and to one that holds few.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::child::Proc;
use super::{ATTACH_TIMEOUT, Bins, STOP_GRACE};
use crate::proc::capture;

/// The name fdtrace's live-fd hash map has in the kernel.
const FDS_MAP: &str = "FDS";

/// fdtrace attached to `procs` `fdloop hold N` processes at once.
pub struct Attach {
    /// fds each holder opened (plus its stdin, stdout and stderr).
    pub held: u64,
    pub procs: usize,
    /// Entries in the holders' /proc/PID/fd right before fdtrace started.
    pub proc_fds: u64,
    /// open_fds of fdtrace's first `process` line for each holder, summed.
    pub reported: Option<u64>,
    /// From starting fdtrace to its first `process` line for every holder.
    pub time: Duration,
    /// The FDS map as bpftool shows it, or why not.
    pub map: Result<MapInfo, String>,
    /// fdtrace's CPU while it reports on the idle holders, if measured.
    pub watch: Option<Watch>,
}

/// fdtrace's cost once attached: the holders change nothing, fdtrace reports
/// every second.
pub struct Watch {
    pub wall: Duration,
    /// User + system time of fdtrace over `wall` (/proc/PID/stat).
    pub cpu: Duration,
    /// Reports made over `wall` (`process` lines of the first holder).
    pub reports: usize,
    /// fdtrace's resident memory at the end (VmRSS).
    pub rss_kib: u64,
}

/// How long fdtrace is watched reporting on idle holders.
const WATCH: Duration = Duration::from_secs(10);

/// One line of `bpftool map show --json`.
pub struct MapInfo {
    pub id: u64,
    pub bytes_memlock: u64,
    pub max_entries: u64,
}

/// The figures for a holder of 19000 fds (the hard RLIMIT_NOFILE here is
/// 20000), for one of 16, for five holders of 19000 traced by one fdtrace
/// (about 100k fds, which one process cannot hold here), and for 53 of them
/// (about a million), which fdtrace is then watched reporting on.
pub fn attach_figures(bins: &Bins) -> Result<Vec<Attach>> {
    let mut out = Vec::new();
    for (n, procs, watch) in [
        (19_000, 1, false),
        (16, 1, false),
        (19_000, 5, false),
        (19_000, 53, true),
    ] {
        super::check_interrupted()?;
        eprintln!("bench: attach to {procs} process(es) holding {n} fds each");
        out.push(
            attach_once(bins, n, procs, watch)
                .with_context(|| format!("attaching to {procs} x {n} held fds"))?,
        );
    }
    Ok(out)
}

fn attach_once(bins: &Bins, n: u64, procs: usize, watch: bool) -> Result<Attach> {
    let mut holders = Vec::new();
    for _ in 0..procs {
        let mut holder = Proc::spawn(
            "fdloop hold",
            Command::new(&bins.fdloop)
                .args(["hold", &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        let ready = holder
            .stdout()?
            .wait_for(ATTACH_TIMEOUT, |l| l.starts_with("fdloop hold"));
        ready.map_err(|e| holder.fail(format!("never held its fds: {e:#}")))?;
        holders.push(holder);
    }
    let pids: Vec<u32> = holders.iter().map(Proc::pid).collect();
    let mut proc_fds = 0;
    for &pid in &pids {
        proc_fds += count_fds(pid)?;
    }

    let mut cmd = Command::new(&bins.fdtrace);
    cmd.args(["--json", "--interval", "1s"]);
    for pid in &pids {
        cmd.args(["--pid", &pid.to_string()]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut ft = Proc::spawn("fdtrace --pid", &mut cmd)?;
    // The first `process` line of each holder, in whatever order they come.
    let mut reported = Some(0);
    let mut waiting = pids.clone();
    while !waiting.is_empty() {
        let first = ft.stdout()?.wait_for(ATTACH_TIMEOUT, |l| {
            waiting.iter().any(|&p| is_process_line(l, p))
        });
        let first =
            first.map_err(|e| ft.fail(format!("no `process` line for {waiting:?}: {e:#}")))?;
        waiting.retain(|&p| !is_process_line(&first, p));
        reported = reported.zip(open_fds(&first)).map(|(a, b)| a + b);
    }
    let time = started.elapsed();
    let map = fds_map(ft.pid()).map_err(|e| format!("{e:#}"));
    let watch = if watch {
        Some(watch_reports(&mut ft, pids[0]).map_err(|e| ft.fail(format!("{e:#}")))?)
    } else {
        None
    };
    ft.stop(STOP_GRACE)?;
    Ok(Attach {
        held: n,
        procs,
        proc_fds,
        reported,
        time,
        map,
        watch,
    })
}

/// fdtrace's CPU over WATCH while it reports on holders that change nothing.
fn watch_reports(ft: &mut Proc, first_holder: u32) -> Result<Watch> {
    ft.stdout()?.arrived();
    let before = cpu_time(ft.pid())?;
    let started = Instant::now();
    std::thread::sleep(WATCH);
    let cpu = cpu_time(ft.pid())?.saturating_sub(before);
    let wall = started.elapsed();
    let rss_kib = rss_kib(ft.pid())?;
    let reports = ft
        .stdout()?
        .arrived()
        .iter()
        .filter(|l| is_process_line(l, first_holder))
        .count();
    Ok(Watch {
        wall,
        cpu,
        reports,
        rss_kib,
    })
}

/// User + system time of process `pid` (all its threads) so far.
pub(super) fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which may hold spaces: utime and stime
    // are fields 14 and 15, so 12 and 13 after the state field (3).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no field {} in {path}", i + 3))
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    let t = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(t as f64 / hz as f64))
}

/// VmRSS of process `pid`, in KiB.
pub(super) fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

fn is_process_line(line: &str, pid: u32) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return false;
    };
    v.get("type").and_then(|t| t.as_str()) == Some("process")
        && v.get("pid").and_then(|p| p.as_u64()) == Some(u64::from(pid))
}

fn open_fds(line: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("open_fds")?.as_u64()
}

/// Entries in /proc/PID/fd.
pub(super) fn count_fds(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        entry.with_context(|| format!("reading {dir}"))?;
        n += 1;
    }
    Ok(n)
}

/// The ids of the BPF maps process `pid` holds fds to (from fdinfo).
fn map_ids(pid: u32) -> Result<Vec<u64>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry.with_context(|| format!("reading {dir}"))?;
        // An fd may close meanwhile: skip what cannot be read.
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let id = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u64>().ok());
        ids.extend(id);
    }
    Ok(ids)
}

/// fdtrace's own FDS map (others may run: pick it by the map ids it holds).
fn fds_map(fdtrace_pid: u32) -> Result<MapInfo> {
    let ids = map_ids(fdtrace_pid)?;
    let json = capture(Command::new("bpftool").args(["map", "show", "--json"]))?;
    let maps: serde_json::Value =
        serde_json::from_str(&json).context("cannot parse `bpftool map show --json`")?;
    let Some(maps) = maps.as_array() else {
        bail!("`bpftool map show --json` did not print an array");
    };
    let field = |m: &serde_json::Value, key: &str| m.get(key).and_then(|v| v.as_u64());
    let map = maps
        .iter()
        .find(|m| {
            m.get("name").and_then(|v| v.as_str()) == Some(FDS_MAP)
                && field(m, "id").is_some_and(|id| ids.contains(&id))
        })
        .with_context(|| format!("no map named {FDS_MAP} among fdtrace's maps {ids:?}"))?;
    Ok(MapInfo {
        id: field(map, "id").unwrap_or(0),
        bytes_memlock: field(map, "bytes_memlock")
            .with_context(|| format!("bpftool shows no bytes_memlock for {FDS_MAP}"))?,
        max_entries: field(map, "max_entries").unwrap_or(0),
    })
}
