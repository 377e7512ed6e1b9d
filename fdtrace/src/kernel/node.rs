//! Node mode, user side (`--all`, `--cgroup`, `--container`, `--pod`): what
//! the selection is, and the start: every selected process of the host
//! registered, then one walk of every task's table seeds them all. From
//! then on the kernel side registers the selection's new processes itself
//! (see fdtrace-ebpf node.rs); those it adopts without a table copy are
//! seeded one by one ([`super::super::reconcile::attach`]).
//!
//! `--container` and `--pod` name containers that may start later: the
//! kernel side tells of every cgroup a process enters for the first time
//! (EV_CGROUP), and [`Watch`] says whether a filter names the container
//! it is; its cgroup is then selected ([`select`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use fdtrace_common::{NODE_ALL, NODE_CGROUPS, PROC_FOLLOW, PROC_NODE, ProcStats};

use super::{Kernel, iterators, loader};
use crate::{
    enrich::{
        attribution::Cgroup,
        container::{Attributor, bundle, cgroup},
    },
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

/// The `--container` and `--pod` filters, for the containers that start
/// after fdtrace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    /// Each `--container` prefix, with the container it names once one
    /// was found (at start, or the first to start since): a prefix names
    /// one container.
    containers: Vec<(String, Option<String>)>,
    /// Each `--pod` as (namespace, name).
    pods: Vec<(String, String)>,
    /// Prefixes already said to start the id of a second container.
    warned: BTreeSet<String>,
}

impl Watch {
    /// Whether anything is watched.
    pub fn active(&self) -> bool {
        !self.containers.is_empty() || !self.pods.is_empty()
    }

    /// Whether a `--pod` is watched: it names containers by their
    /// bundle's names, which may be read later than their cgroup.
    pub fn by_pod(&self) -> bool {
        !self.pods.is_empty()
    }

    /// The cgroup to select for cgroup `cg`, when a filter names its
    /// container: the container's own cgroup (the one its id names; a
    /// container may make cgroups below it).
    pub fn wants(&mut self, cg: &Cgroup) -> Option<String> {
        let id = cg.info.container_id.as_deref()?;
        let mut named = false;
        for (prefix, bound) in &mut self.containers {
            match bound {
                Some(b) if b == id => named = true,
                Some(b)
                    if id.starts_with(prefix.as_str()) && self.warned.insert(prefix.clone()) =>
                {
                    eprintln!(
                        "fdtrace: --container {prefix} names container {b}; \
                         container {id}, which started since, is not selected"
                    );
                }
                None if id.starts_with(prefix.as_str()) => {
                    *bound = Some(id.to_owned());
                    named = true;
                }
                Some(_) | None => {}
            }
        }
        if !named {
            let names = cg.names.as_ref().ok().and_then(|n| n.as_deref());
            named = names.is_some_and(|n| {
                self.pods.iter().any(|(ns, name)| {
                    n.namespace.as_deref() == Some(ns) && n.pod.as_deref() == Some(name)
                })
            });
        }
        named.then(|| container_cgroup(&cg.info.path, id).to_owned())
    }
}

/// The part of cgroup `path` down to the component that names container
/// `id`: the container's own cgroup.
fn container_cgroup<'a>(path: &'a str, id: &str) -> &'a str {
    match path.find(id) {
        Some(at) => {
            let end = path[at..].find('/').map_or(path.len(), |e| at + e);
            &path[..end]
        }
        None => path,
    }
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
/// Whether cgroup `path` (as `/proc/PID/cgroup` shows it) is still there.
pub fn cgroup_exists(host_root: &Path, path: &str) -> bool {
    v2_root(host_root).is_ok_and(|root| root.join(path.trim_start_matches('/')).is_dir())
}

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

/// The one container id of `ids` starting with `prefix`, None when none
/// does (it may start later); the usage error (exit 2) names every match
/// of an ambiguous prefix.
fn match_container<'a>(prefix: &str, ids: &'a BTreeSet<String>) -> Result<Option<&'a str>, Fatal> {
    let want = prefix.to_ascii_lowercase();
    if want.is_empty() {
        return Err(Fatal::Usage(
            "--container needs an id or a prefix of one".into(),
        ));
    }
    let found: Vec<&String> = ids.iter().filter(|id| id.starts_with(&want)).collect();
    match found[..] {
        [one] => Ok(Some(one)),
        [] => Ok(None),
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

/// The selection the filters name, or None when node mode is off, and
/// what to watch for. `--container` and `--pod` are resolved to the
/// cgroups of the containers running now; one that names none yet is
/// said once on stderr, and selects its container when it starts.
pub fn selection(f: &Filters<'_>) -> Result<Option<(Selection, Watch)>> {
    if f.all {
        return Ok(Some((Selection::All, Watch::default())));
    }
    if f.cgroups.is_empty() && f.containers.is_empty() && f.pods.is_empty() {
        return Ok(None);
    }
    let mut watch = Watch::default();
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
            match id {
                Some(id) => {
                    paths.insert(container_cgroup(&containers[id], id).to_owned());
                }
                None => eprintln!(
                    "fdtrace: --container {prefix}: no running container has an id starting so \
                     yet; it is traced when it starts"
                ),
            }
            watch
                .containers
                .push((prefix.to_ascii_lowercase(), id.map(str::to_owned)));
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
                        paths.insert(container_cgroup(path, id).to_owned());
                        found = true;
                    }
                }
                if !found {
                    eprintln!(
                        "fdtrace: --pod {pod}: no running container's bundle names this pod yet; \
                         its containers are traced when they start"
                    );
                }
                watch.pods.push((ns.to_owned(), name.to_owned()));
            }
        }
    }
    Ok(Some((
        Selection::Cgroups(paths.into_iter().collect()),
        watch,
    )))
}

/// Starts node mode: gives the kernel side the selected cgroups, registers
/// every selected process running now (not kernel threads, not fdtrace),
/// then seeds them all with one walk of every task's table.
pub fn start(k: &mut Kernel, sel: &Selection, host_root: &Path) -> Result<Started> {
    if let Selection::Cgroups(paths) = sel {
        let root = v2_root(host_root)?;
        for path in paths {
            select_id(k, &root, path)?;
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
        match k.register(pid, &ProcStats::new(pid, PROC_FOLLOW | PROC_NODE)) {
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
    let (mut out, mut hidden) = (BTreeMap::new(), Vec::new());
    for pid in registered {
        // Gone before its registration: the exit hook never saw it traced.
        if !procfd::exists(pid) {
            k.unregister(pid);
            continue;
        }
        let mut fds = found.remove(&pid).unwrap_or_default();
        // A full map is counted and reported by the kernel's counters; the
        // process stays traced, its drift says by how much it is off.
        match crate::reconcile::seed_missed(k, pid, &mut fds) {
            Ok(Some(n)) => hidden.push((pid, n)),
            Ok(None) => {}
            Err(e) => eprintln!("fdtrace: {e:#}"),
        }
        out.insert(pid, fds);
    }
    Ok(Started {
        traced: out,
        hidden,
    })
}

/// What node mode's start found.
pub struct Started {
    /// The traced processes with the fds the walk found (none for a
    /// process that holds none).
    pub traced: BTreeMap<u32, Vec<ProcFd>>,
    /// Those the walk cannot see, with their /proc counts: said
    /// (`reconcile::say_hidden`) once the view has started.
    pub hidden: Vec<(u32, usize)>,
}

/// Puts cgroup `path`'s id in the kernel side's selection.
fn select_id(k: &mut Kernel, root: &Path, path: &str) -> Result<PathBuf> {
    let dir = root.join(path.trim_start_matches('/'));
    // The cgroup id the kernel reads (kernfs_node.id) is the directory's
    // inode number.
    let id = fs::metadata(&dir)
        .with_context(|| format!("reading cgroup {}", dir.display()))?
        .ino();
    k.node_cgroups
        .insert(id, 1, 0)
        .with_context(|| format!("selecting cgroup {path}"))?;
    Ok(dir)
}

/// Most cgroups below a selected one whose processes are listed.
const MAX_SELECTED_DIRS: usize = 4096;

/// Selects cgroup `path` (a container that started after fdtrace), then
/// registers the processes in it and below, not traced yet: those that
/// entered before the kernel side knew the cgroup was selected. Those that
/// enter after are the kernel side's. Returns the pids registered, to be
/// seeded.
pub fn select(k: &mut Kernel, host_root: &Path, path: &str) -> Result<Vec<u32>> {
    let root = v2_root(host_root)?;
    let dir = select_id(k, &root, path)?;
    let me = std::process::id();
    let mut registered = Vec::new();
    let mut stack = vec![dir];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        seen += 1;
        if seen > MAX_SELECTED_DIRS {
            eprintln!(
                "fdtrace: cgroup {path} has more than {MAX_SELECTED_DIRS} cgroups below it: \
                 the processes of the others are traced from their next fork or move"
            );
            break;
        }
        // Gone meanwhile (the container stopped): nothing to trace.
        let Ok(procs) = bundle::read_bounded(&dir.join("cgroup.procs"), MAX_CGROUP_PROCS) else {
            continue;
        };
        for pid in String::from_utf8_lossy(&procs)
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
        {
            if pid == me || loader::is_kernel_thread(pid) {
                continue;
            }
            // Ok(false): traced already (adopted by the kernel side).
            if k.register(pid, &ProcStats::new(pid, PROC_FOLLOW | PROC_NODE))? {
                registered.push(pid);
            }
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            stack.extend(
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(registered)
}

/// Largest `cgroup.procs` read: a pid a line, a busy container's few
/// thousand.
const MAX_CGROUP_PROCS: u64 = 1 << 20;

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
        assert_eq!(match_container("abc", &ids).unwrap(), Some("abc123"));
        assert_eq!(match_container("FF", &ids).unwrap(), Some("ff00"));
        let err = match_container("ab", &ids).unwrap_err().to_string();
        assert!(
            err.contains("ambiguous") && err.contains("abc123") && err.contains("abd456"),
            "{err}"
        );
        assert_eq!(
            match_container("zz", &ids).unwrap(),
            None,
            "may start later"
        );
        assert!(matches!(match_container("", &ids), Err(Fatal::Usage(_))));
    }

    #[test]
    fn a_container_is_its_own_cgroup_not_one_below() {
        let id = "5f68f626d2ff4d67bbd3a38f89148d2772aa77f0df1417739d24ed7c1f202b81";
        assert_eq!(
            container_cgroup(&format!("/kubepods/pod1/{id}/init.scope"), id),
            format!("/kubepods/pod1/{id}")
        );
        assert_eq!(
            container_cgroup(&format!("/system.slice/docker-{id}.scope"), id),
            format!("/system.slice/docker-{id}.scope")
        );
        assert_eq!(container_cgroup("/x", id), "/x");
    }

    fn cg(path: &str, id: Option<&str>, pod: Option<(&str, &str)>) -> Cgroup {
        let mut info = cgroup::parse_path(path).unwrap();
        info.container_id = id.map(str::to_owned);
        let names = pod.map(|(ns, name)| {
            std::sync::Arc::new(bundle::Names {
                source: bundle::Source::Storage,
                namespace: Some(ns.into()),
                pod: Some(name.into()),
                pod_uid: None,
                container: None,
                sandbox: false,
            })
        });
        Cgroup {
            info,
            names: Ok(names),
        }
    }

    #[test]
    fn the_watch_binds_a_prefix_to_one_container_and_names_pods() {
        let a = format!("abc{}", "1".repeat(61));
        let b = format!("abc{}", "2".repeat(61));
        let c = format!("ccc{}", "3".repeat(61));
        let mut w = Watch {
            containers: vec![("abc".into(), None)],
            pods: vec![("shop".into(), "web-0".into())],
            warned: BTreeSet::new(),
        };
        assert!(w.active());
        let path_a = format!("/docker/{a}");
        assert_eq!(w.wants(&cg(&path_a, Some(&a), None)), Some(path_a.clone()));
        // Again (another process, or told again): still that one.
        assert_eq!(w.wants(&cg(&path_a, Some(&a), None)), Some(path_a));
        // A second container the prefix starts: not selected.
        assert_eq!(w.wants(&cg(&format!("/docker/{b}"), Some(&b), None)), None);
        assert!(w.warned.contains("abc"));
        // A pod's container, by its bundle's names.
        let path_c = format!("/kubepods/pod1/{c}");
        assert_eq!(
            w.wants(&cg(&path_c, Some(&c), Some(("shop", "web-0")))),
            Some(path_c.clone())
        );
        assert_eq!(
            w.wants(&cg(&path_c, Some(&c), Some(("shop", "web-1")))),
            None
        );
        // No container: nothing to select.
        assert_eq!(w.wants(&cg("/system.slice/x.service", None, None)), None);
        assert!(!Watch::default().active());
    }
}
