//! Cgroup paths read from inside a private cgroup namespace.
//!
//! The kernel writes the `0::` path of `/proc/PID/cgroup` relative to the
//! root of the reader's cgroup namespace, climbing out of it with `/..`
//! components (`cgroup_path_ns_locked` in
//! <https://github.com/torvalds/linux/blob/v6.18/kernel/cgroup/cgroup.c>,
//! `kernfs_path_from_node_locked` in fs/kernfs/dir.c). A container runtime
//! gives each container such a namespace on a pure cgroup v2 host (the
//! kubelet's default), so fdtrace in its DaemonSet reads
//! `/../../besteffort/pod<uid>/<id>` for a neighbour pod's process: the
//! QoS level may be cut off and the path names nothing stable. Such a path
//! is made absolute again from where the namespace's root is in the host's
//! hierarchy, found once by its inode (a cgroup's id) in the host's cgroup
//! v2 mount under `--host-root`.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Deepest directory looked at below the hierarchy's root: kubelet paths
/// are 4 to 5 levels deep, systemd's a few more.
const MAX_DEPTH: u32 = 16;
/// Most directories looked at in the search, so that a host with a huge
/// hierarchy cannot make it endless.
const MAX_DIRS: usize = 1 << 16;

/// Where the cgroup v2 hierarchy is mounted under `root`: `sys/fs/cgroup`
/// on a pure v2 host, `sys/fs/cgroup/unified` on a hybrid one (only a v2
/// mount has `cgroup.controllers` at its root).
pub fn v2_mount(root: &Path) -> Option<PathBuf> {
    ["sys/fs/cgroup", "sys/fs/cgroup/unified"]
        .into_iter()
        .map(|d| root.join(d))
        .find(|d| d.join("cgroup.controllers").is_file())
}

/// Whether fdtrace's cgroup namespace is not the host's (that of pid 1 of
/// the `/proc` read, which is the host's under hostPID).
pub fn private(proc_root: &Path) -> std::io::Result<bool> {
    let own = fs::read_link(proc_root.join("self/ns/cgroup"))?;
    let host = fs::read_link(proc_root.join("1/ns/cgroup"))?;
    Ok(own != host)
}

/// The path, in the host's hierarchy at `host_v2`, of the cgroup whose
/// directory has inode `ino`: the root of fdtrace's namespace, whose inode
/// is that of fdtrace's own cgroup v2 mount (mounted by the runtime at the
/// namespace's root).
pub fn find_by_inode(host_v2: &Path, ino: u64) -> Option<String> {
    let mut seen = 0usize;
    let mut stack = vec![(host_v2.to_owned(), 0u32)];
    while let Some((dir, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_DIRS {
            return None;
        }
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == ino) {
            let rel = dir.strip_prefix(host_v2).ok()?;
            return Some(format!("/{}", rel.to_str()?));
        }
        if depth == MAX_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    None
}

/// `rel` (a `0::` path read inside the namespace rooted at `ns_root`) as a
/// path of the host's hierarchy; None when it climbs above the host's root,
/// which the kernel never writes.
pub fn absolute(ns_root: &str, rel: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in ns_root.split('/').chain(rel.split('/')) {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b2c3d4e-5f60-4718-9abc-def012345678";

    #[test]
    fn relative_paths_become_the_hosts() {
        let me = "/kubepods/burstable/podaaaa/ffff";
        // A neighbour in the same QoS level: the level is not in the
        // relative path at all.
        assert_eq!(
            absolute(me, &format!("/../../pod{UID}/0123")).as_deref(),
            Some(format!("/kubepods/burstable/pod{UID}/0123").as_str())
        );
        assert_eq!(
            absolute(me, "/../../../../system.slice/nginx.service").as_deref(),
            Some("/system.slice/nginx.service")
        );
        // fdtrace itself, and the host's root.
        assert_eq!(absolute(me, "/").as_deref(), Some(me));
        assert_eq!(absolute(me, "/../../../..").as_deref(), Some("/"));
        assert_eq!(absolute("/", "/init.scope").as_deref(), Some("/init.scope"));
        // Above the root: not a path the kernel writes.
        assert_eq!(absolute(me, "/../../../../.."), None);
        assert_eq!(absolute("/", "/.."), None);
    }

    #[test]
    fn the_namespace_root_is_found_by_its_inode() {
        let host = tempfile::tempdir().unwrap();
        let ns = host.path().join("kubepods/burstable/podaaaa/ffff");
        fs::create_dir_all(&ns).unwrap();
        fs::create_dir_all(host.path().join("system.slice/x.service")).unwrap();
        let ino = fs::metadata(&ns).unwrap().ino();
        assert_eq!(
            find_by_inode(host.path(), ino).as_deref(),
            Some("/kubepods/burstable/podaaaa/ffff")
        );
        let root_ino = fs::metadata(host.path()).unwrap().ino();
        assert_eq!(find_by_inode(host.path(), root_ino).as_deref(), Some("/"));
        let other = tempfile::tempdir().unwrap();
        let missing = fs::metadata(other.path()).unwrap().ino();
        assert_eq!(find_by_inode(host.path(), missing), None);
    }

    #[test]
    fn a_v2_mount_is_told_by_its_controllers_file() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(v2_mount(root.path()), None);
        let unified = root.path().join("sys/fs/cgroup/unified");
        fs::create_dir_all(&unified).unwrap();
        fs::write(unified.join("cgroup.controllers"), "").unwrap();
        assert_eq!(v2_mount(root.path()), Some(unified));
        fs::write(root.path().join("sys/fs/cgroup/cgroup.controllers"), "").unwrap();
        assert_eq!(
            v2_mount(root.path()),
            Some(root.path().join("sys/fs/cgroup"))
        );
    }
}
