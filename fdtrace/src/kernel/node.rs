//! Node mode, user side (`--all`, `--cgroup`, `--container`, `--pod`): what
//! the selection is, and the start: every selected process of the host
//! registered, then one walk of every task's table seeds them all. From
//! then on the kernel side registers the selection's new processes itself
//! (see fdtrace-ebpf node.rs); those it adopts without a table copy are
//! seeded one by one ([`super::super::reconcile::attach`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use fdtrace_common::{NODE_ALL, NODE_CGROUPS, PROC_FOLLOW, ProcStats};

use super::{Kernel, iterators, loader};
use crate::{
    enrich::container::{Attributor, bundle, cgroup},
    error::Fatal,
    procfd::{self, ProcFd},
};

/// Largest `/proc/PID/cgroup` read (one line per hierarchy).
const MAX_PROC_CGROUP: u64 = 64 << 10;

/// What node mode traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every process.
    All,
    /// The processes of these cgroup v2 paths (as in `/proc/PID/cgroup`)
    /// and below.
    Cgroups(Vec<String>),
}

impl Selection {
    /// `NODE_*` for the kernel side.
    pub fn mode(&self) -> u32 {
        match self {
            Selection::All => NODE_ALL,
            Selection::Cgroups(_) => NODE_CGROUPS,
        }
    }
}

/// The filters of the command line, as given.
pub struct Filters<'a> {
    pub all: bool,
    pub cgroups: &'a [String],
    pub containers: &'a [String],
    pub pods: &'a [String],
    /// Where the host's /sys/fs/cgroup and runtime state are (--host-root).
    pub host_root: &'a Path,
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on a pure v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one (v1 controllers beside it).
/// Under `host_root`, as a DaemonSet mounts the host's cgroup fs: the
/// container's own /sys/fs/cgroup shows only its own cgroup.
pub fn v2_root(host_root: &Path) -> Result<PathBuf> {
    for dir in ["sys/fs/cgroup", "sys/fs/cgroup/unified"] {
        // cgroup.procs at the root exists only on the v2 hierarchy's root
        // (v1 roots have it too, but not cgroup.subtree_control).
        let dir = host_root.join(dir);
        if dir.join("cgroup.subtree_control").exists() {
            return Ok(dir);
        }
    }
    Err(Fatal::Environment(
        "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: --cgroup, \
         --container and --pod need one"
            .into(),
    )
    .into())
}

/// The cgroup v2 path of `arg`: a path as in `/proc/PID/cgroup` (`/a/b`),
/// or a directory under the v2 mount `root` (`/sys/fs/cgroup/a/b`).
fn cgroup_path(arg: &str, root: &Path) -> String {
    let p = Path::new(arg);
    let rel = match p.strip_prefix(root) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => arg.trim_start_matches('/').to_owned(),
    };
    let rel = rel.trim_end_matches('/');
    format!("/{rel}")
}

/// Whether cgroup `path` is `sel` or below it.
fn under(path: &str, sel: &str) -> bool {
    if sel == "/" {
        return true;
    }
    path.strip_prefix(sel)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The one container id of `ids` starting with `prefix`; the usage error
/// (exit 2) names none or every match.
fn match_container<'a>(prefix: &str, ids: &'a BTreeSet<String>) -> Result<&'a str, Fatal> {
    let want = prefix.to_ascii_lowercase();
    if want.is_empty() {
        return Err(Fatal::Usage(
            "--container needs an id or a prefix of one".into(),
        ));
    }
    let found: Vec<&String> = ids.iter().filter(|id| id.starts_with(&want)).collect();
    match found[..] {
        [one] => Ok(one),
        [] => Err(Fatal::Usage(format!(
            "--container {prefix}: no running container has an id starting so"
        ))),
        _ => Err(Fatal::Usage(format!(
            "--container {prefix} is ambiguous: it starts the ids of {}; give more of the id",
            found
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The host's processes (tgids), with their cgroup v2 path when readable.
fn host_processes() -> Vec<(u32, Option<String>)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .map(|pid| {
            let path =
                bundle::read_bounded(Path::new(&format!("/proc/{pid}/cgroup")), MAX_PROC_CGROUP)
                    .ok()
                    .and_then(|b| {
                        let text = String::from_utf8_lossy(&b).into_owned();
                        cgroup::v2_path(&text).ok().map(str::to_owned)
                    });
            (pid, path)
        })
        .collect()
}

/// The selection the filters name, or None when node mode is off.
/// `--container` and `--pod` are resolved to their cgroups now.
pub fn selection(f: &Filters<'_>) -> Result<Option<Selection>> {
    if f.all {
        return Ok(Some(Selection::All));
    }
    if f.cgroups.is_empty() && f.containers.is_empty() && f.pods.is_empty() {
        return Ok(None);
    }
    let root = v2_root(f.host_root)?;
    let mut paths = BTreeSet::new();
    for arg in f.cgroups {
        let path = cgroup_path(arg, &root);
        if !root.join(path.trim_start_matches('/')).is_dir() {
            return Err(Fatal::Usage(format!(
                "--cgroup {arg}: no such cgroup ({} is not a directory)",
                root.join(path.trim_start_matches('/')).display()
            ))
            .into());
        }
        paths.insert(path);
    }
    if !f.containers.is_empty() || !f.pods.is_empty() {
        // Container id -> its cgroup, for every process in a container.
        let mut containers: BTreeMap<String, String> = BTreeMap::new();
        for (_, path) in host_processes() {
            if let Some(info) = path.and_then(|p| cgroup::parse_path(&p).ok())
                && let Some(id) = info.container_id
            {
                containers.insert(id, info.path);
            }
        }
        let ids: BTreeSet<String> = containers.keys().cloned().collect();
        for prefix in f.containers {
            let id = match_container(prefix, &ids)?;
            paths.insert(containers[id].clone());
        }
        if !f.pods.is_empty() {
            let mut attr = Attributor::new(f.host_root, "/proc");
            for pod in f.pods {
                let (ns, name) = pod.split_once('/').expect("checked by the command line");
                let mut found = false;
                for (id, path) in &containers {
                    let names = attr.names(id, None).ok().flatten();
                    if names.is_some_and(|n| {
                        n.namespace.as_deref() == Some(ns) && n.pod.as_deref() == Some(name)
                    }) {
                        paths.insert(path.clone());
                        found = true;
                    }
                }
                if !found {
                    return Err(Fatal::Usage(format!(
                        "--pod {pod}: no running container's bundle names this pod"
                    ))
                    .into());
                }
            }
        }
    }
    Ok(Some(Selection::Cgroups(paths.into_iter().collect())))
}

/// Starts node mode: gives the kernel side the selected cgroups, registers
/// every selected process running now (not kernel threads, not fdtrace),
/// then seeds them all with one walk of every task's table. Returns the
/// traced processes with the fds the walk found (none for a process that
/// holds none).
pub fn start(
    k: &mut Kernel,
    sel: &Selection,
    host_root: &Path,
) -> Result<BTreeMap<u32, Vec<ProcFd>>> {
    if let Selection::Cgroups(paths) = sel {
        let root = v2_root(host_root)?;
        for path in paths {
            let dir = root.join(path.trim_start_matches('/'));
            // The cgroup id the kernel reads (kernfs_node.id) is the
            // directory's inode number.
            let id = fs::metadata(&dir)
                .with_context(|| format!("reading cgroup {}", dir.display()))?
                .ino();
            k.node_cgroups
                .insert(id, 1, 0)
                .with_context(|| format!("selecting cgroup {path}"))?;
        }
    }
    let me = std::process::id();
    let mut registered = Vec::new();
    for (pid, path) in host_processes() {
        if pid == me || loader::is_kernel_thread(pid) {
            continue;
        }
        let chosen = match sel {
            Selection::All => true,
            Selection::Cgroups(sel) => path.is_some_and(|p| sel.iter().any(|s| under(&p, s))),
        };
        if !chosen {
            continue;
        }
        match k.register(pid, &ProcStats::new(pid, PROC_FOLLOW)) {
            Ok(_) => registered.push(pid),
            Err(e) => {
                // Full: the kernel's map-full counter reports the rest.
                eprintln!("fdtrace: {e:#}");
                break;
            }
        }
    }
    let mut found =
        iterators::list_all(k.seed.as_fd()).context("walking the fd tables of every process")?;
    let mut out = BTreeMap::new();
    for pid in registered {
        // Gone before its registration: the exit hook never saw it traced.
        if !procfd::exists(pid) {
            k.unregister(pid);
            continue;
        }
        let mut fds = found.remove(&pid).unwrap_or_default();
        // A full map is counted and reported by the kernel's counters; the
        // process stays traced, its drift says by how much it is off.
        if let Err(e) = crate::reconcile::seed_missed(k, pid, &mut fds) {
            eprintln!("fdtrace: {e:#}");
        }
        out.insert(pid, fds);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_from_either_form() {
        let root = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(cgroup_path("/kubepods/pod1", root), "/kubepods/pod1");
        assert_eq!(
            cgroup_path("/sys/fs/cgroup/unified/kubepods/pod1/", root),
            "/kubepods/pod1"
        );
        assert_eq!(cgroup_path("kubepods", root), "/kubepods");
        assert_eq!(cgroup_path("/sys/fs/cgroup/unified", root), "/");
        assert_eq!(cgroup_path("/", root), "/");
    }

    #[test]
    fn below_a_cgroup_is_by_whole_names() {
        assert!(under("/kubepods/pod1", "/kubepods"));
        assert!(under("/kubepods", "/kubepods"));
        assert!(!under("/kubepods2/x", "/kubepods"));
        assert!(!under("/kube", "/kubepods"));
        assert!(under("/anything", "/"));
    }

    #[test]
    fn container_prefixes() {
        let ids: BTreeSet<String> = ["abc123", "abd456", "ff00"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(match_container("abc", &ids).unwrap(), "abc123");
        assert_eq!(match_container("FF", &ids).unwrap(), "ff00");
        let err = match_container("ab", &ids).unwrap_err().to_string();
        assert!(
            err.contains("ambiguous") && err.contains("abc123") && err.contains("abd456"),
            "{err}"
        );
        assert!(matches!(match_container("zz", &ids), Err(Fatal::Usage(_))));
        assert!(matches!(match_container("", &ids), Err(Fatal::Usage(_))));
    }
}
