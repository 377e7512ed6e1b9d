//! Who a process is: its cgroup, container, pod, and its pid inside the
//! container, read from the host's own files (no API server, no runtime
//! socket).
//!
//! - the cgroup v2 path, container id, pod uid and QoS class:
//!   `/proc/PID/cgroup` ([`cgroup`]);
//! - the pod, namespace and container names: the runtime's bundle
//!   ([`bundle`]), read once per container and cached;
//! - the pid inside the container: the last `NSpid` of `/proc/PID/status`,
//!   read once per process.
//!
//! The runtimes' files and the host's cgroup hierarchy are read under a
//! host root (`--host-root`, default `/`): in a container they are mounted
//! elsewhere. `/proc` is fdtrace's own: traced node-wide, fdtrace shares the
//! host's pid namespace (hostPID), so its `/proc` is the host's, and a
//! `/proc` mounted from the host would name processes in a pid namespace
//! fdtrace's pids are not in. Cgroup paths read inside a private cgroup
//! namespace are made the host's again ([`cgroupns`]).

pub mod bundle;
pub mod cgroup;
pub mod cgroupns;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bundle::{BundleError, Names};
use cgroup::{CgroupError, CgroupInfo, Runtime};

/// Largest `/proc/PID/cgroup` or `/proc/PID/status` read: a few hundred
/// bytes to a few KiB (one line per hierarchy, each path at most PATH_MAX).
const MAX_PROC_FILE_BYTES: u64 = 64 << 10;

/// How long a container without names (no bundle yet, or a broken one) is
/// not looked up again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why a process could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    /// The process is gone, or its `/proc` files cannot be read.
    #[error(transparent)]
    Read(#[from] BundleError),
    #[error("{path}: {source}")]
    Cgroup { path: PathBuf, source: CgroupError },
    #[error("{path}: {source}")]
    Status { path: PathBuf, source: StatusError },
    /// The path is relative to fdtrace's cgroup namespace, whose place in
    /// the host's hierarchy is not known.
    #[error("{path}: cgroup {cgroup:?} is relative to fdtrace's cgroup namespace: {reason}")]
    Namespace {
        path: PathBuf,
        cgroup: String,
        reason: String,
    },
}

/// Why a `/proc/PID/status` text gave no pids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("no NSpid line")]
    NoNsPid,
    #[error("bad NSpid line: {0:?}")]
    BadNsPid(String),
}

/// The pids of a `/proc/PID/status` text's `NSpid` line, outermost (the
/// namespace of that `/proc`) first.
pub fn parse_nspid(status: &str) -> Result<Vec<u32>, StatusError> {
    // The only text the process controls in this file is its name, on the
    // `Name:` line, where the kernel escapes newlines (`proc_task_name` in
    // <https://github.com/torvalds/linux/blob/v6.18/fs/proc/array.c>): no
    // line can be forged.
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .ok_or(StatusError::NoNsPid)?;
    let pids: Vec<u32> = line
        .split_ascii_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| StatusError::BadNsPid(line.trim().to_owned()))?;
    if pids.is_empty() {
        return Err(StatusError::BadNsPid(line.trim().to_owned()));
    }
    Ok(pids)
}

/// Names cached for one container id.
struct Cached {
    names: Result<Option<Arc<Names>>, Arc<BundleError>>,
    at: Instant,
}

/// Identifies processes, caching each container's names.
pub struct Attributor {
    host_root: PathBuf,
    proc_root: PathBuf,
    /// Where fdtrace's cgroup namespace is rooted in the host's hierarchy
    /// (`/`: the host's own namespace), or why that is not known; found at
    /// the first look.
    ns_root: Option<Result<String, String>>,
    cache: HashMap<String, Cached>,
}

impl Attributor {
    /// Reads the runtimes' files and the host's cgroup hierarchy under
    /// `host_root`, the processes' files under `proc_root` (`/proc`).
    pub fn new(host_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Attributor {
            host_root: host_root.into(),
            proc_root: proc_root.into(),
            ns_root: None,
            cache: HashMap::new(),
        }
    }

    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    fn ns_root(&mut self) -> &Result<String, String> {
        let (host_root, proc_root) = (&self.host_root, &self.proc_root);
        self.ns_root
            .get_or_insert_with(|| find_ns_root(host_root, proc_root))
    }

    /// Process `pid`'s cgroup v2 path in the host's hierarchy, and what it
    /// names.
    pub fn cgroup_of(&mut self, pid: u32) -> Result<CgroupInfo, IdentifyError> {
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let text = read_text(&path)?;
        let raw = cgroup::v2_path(&text).map_err(|source| IdentifyError::Cgroup {
            path: path.clone(),
            source,
        })?;
        let namespace_error = |reason: &str| IdentifyError::Namespace {
            path: path.clone(),
            cgroup: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let host_path = match self.ns_root() {
            Ok(root) if root == "/" && raw.starts_with("/..") => {
                return Err(namespace_error(
                    "fdtrace's namespace is the host's, yet the path climbs out of it",
                ));
            }
            Ok(root) if root == "/" => raw.to_owned(),
            Ok(root) => cgroupns::absolute(root, raw)
                .ok_or_else(|| namespace_error("it climbs above the host's root"))?,
            Err(reason) => return Err(namespace_error(reason)),
        };
        cgroup::parse_path(&host_path).map_err(|source| IdentifyError::Cgroup { path, source })
    }

    /// Process `pid`'s pid in the host's namespace (that of the `/proc`
    /// read) and, when it is in another, its pid there.
    pub fn pids_of(&self, pid: u32) -> Result<(u32, Option<u32>), IdentifyError> {
        let path = self.proc_root.join(pid.to_string()).join("status");
        let pids = parse_nspid(&read_text(&path)?)
            .map_err(|source| IdentifyError::Status { path, source })?;
        Ok((pids[0], (pids.len() > 1).then(|| pids[pids.len() - 1])))
    }

    /// The host's cgroup v2 hierarchy (under the host root), where a
    /// cgroup path's directory is; None when there is none.
    pub fn v2_root(&self) -> Option<PathBuf> {
        cgroupns::v2_mount(&self.host_root)
    }

    /// The names of container `id`: from the cache, else from its bundle.
    /// A container found is not looked up again (its annotations do not
    /// change); one not found, or with a broken bundle, after
    /// [`RETRY_AFTER`].
    pub fn names(
        &mut self,
        id: &str,
        runtime: Option<Runtime>,
    ) -> Result<Option<Arc<Names>>, Arc<BundleError>> {
        let now = Instant::now();
        if let Some(c) = self.cache.get(id)
            && (matches!(c.names, Ok(Some(_))) || now.duration_since(c.at) < RETRY_AFTER)
        {
            return c.names.clone();
        }
        let names = bundle::find(&self.host_root, id, runtime)
            .map(|n| n.map(Arc::new))
            .map_err(Arc::new);
        self.cache.insert(
            id.to_owned(),
            Cached {
                names: names.clone(),
                at: now,
            },
        );
        names
    }

    /// Drops the cached names of containers `keep` says are gone.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.cache.retain(|id, _| keep(id));
    }

    /// How many containers have cached names (or a cached failure).
    #[cfg(test)]
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Looks container `id` up at the next call, as if RETRY_AFTER had
    /// passed.
    #[cfg(test)]
    pub fn forget_miss(&mut self, id: &str) {
        self.cache.remove(id);
    }
}

/// Where fdtrace's cgroup namespace is rooted in the host's hierarchy
/// under `host_root`: `/` when it is the host's (or when pid 1's cannot be
/// compared with it, as outside a container without hostPID: then a path
/// that climbs out of it is an error at its turn).
fn find_ns_root(host_root: &Path, proc_root: &Path) -> Result<String, String> {
    if !cgroupns::private(proc_root).unwrap_or(false) {
        return Ok("/".to_owned());
    }
    // The runtime mounts the container's cgroup v2 at the namespace's root.
    let own = cgroupns::v2_mount(Path::new("/"))
        .ok_or("fdtrace's container has no cgroup v2 mount at /sys/fs/cgroup")?;
    let ino = fs::metadata(&own)
        .map_err(|e| format!("{}: {e}", own.display()))?
        .ino();
    let host = cgroupns::v2_mount(host_root).ok_or_else(|| {
        format!(
            "no cgroup v2 hierarchy at {}/sys/fs/cgroup (mount the host's there)",
            host_root.display()
        )
    })?;
    cgroupns::find_by_inode(&host, ino).ok_or_else(|| {
        format!(
            "no cgroup under {} has the inode {ino} of fdtrace's own ({})",
            host.display(),
            own.display()
        )
    })
}

/// A `/proc` file's text, bounded.
fn read_text(path: &Path) -> Result<String, BundleError> {
    let bytes = bundle::read_bounded(path, MAX_PROC_FILE_BYTES)?;
    // Cgroup names may hold any byte but `/` and NUL: keep going on ones
    // that are not UTF-8 (shown with U+FFFD), rather than fail.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cgroup::Qos;

    #[test]
    fn nspid() {
        let host = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\nNgid:\t0\nPid:\t42\nPPid:\t1\nNSpid:\t42\nNSpgid:\t42\n";
        assert_eq!(parse_nspid(host), Ok(vec![42]));
        let nested = "Name:\tapp\nNSpid:\t16982\t310\t1\nNSpgid:\t16982\t310\t1\n";
        assert_eq!(parse_nspid(nested), Ok(vec![16982, 310, 1]));
        assert_eq!(parse_nspid("Name:\tx\n"), Err(StatusError::NoNsPid));
        assert_eq!(
            parse_nspid("NSpid:\t\n"),
            Err(StatusError::BadNsPid(String::new()))
        );
        assert_eq!(
            parse_nspid("NSpid:\t12\tx\n"),
            Err(StatusError::BadNsPid("12\tx".into()))
        );
        assert_eq!(
            parse_nspid("NSpid:\t99999999999\n"),
            Err(StatusError::BadNsPid("99999999999".into()))
        );
    }

    /// A host root with a fake /proc entry and a containerd bundle.
    fn host(cgroup: &str, status: &str, config: Option<&str>) -> (tempfile::TempDir, Attributor) {
        let root = tempfile::tempdir().expect("tempdir");
        let proc_dir = root.path().join("proc/1234");
        std::fs::create_dir_all(&proc_dir).unwrap();
        std::fs::write(proc_dir.join("cgroup"), cgroup).unwrap();
        std::fs::write(proc_dir.join("status"), status).unwrap();
        if let Some(config) = config {
            let dir = root.path().join(format!(
                "run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}"
            ));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), config).unwrap();
        }
        let a = Attributor::new(root.path(), root.path().join("proc"));
        (root, a)
    }

    const ID: &str = "5f68f626d2ff4d67bbd3a38f89148d2772aa77f0df1417739d24ed7c1f202b81";
    const UID: &str = "1b2c3d4e-5f60-4718-9abc-def012345678";

    /// Who a process is, as attribution reads it.
    #[derive(Debug)]
    struct Id {
        pid: u32,
        pid_in_container: Option<u32>,
        cgroup: CgroupInfo,
        names: Result<Option<Arc<Names>>, Arc<BundleError>>,
    }

    fn identify(a: &mut Attributor, pid: u32) -> Result<Id, IdentifyError> {
        let cgroup = a.cgroup_of(pid)?;
        let (pid, pid_in_container) = a.pids_of(pid)?;
        let names = match &cgroup.container_id {
            Some(id) => a.names(id, cgroup.runtime),
            None => Ok(None),
        };
        Ok(Id {
            pid,
            pid_in_container,
            cgroup,
            names,
        })
    }

    #[test]
    fn identify_a_containerised_process() {
        let (_root, mut a) = host(
            &format!("1:cpu:/x\n0::/kubepods/besteffort/pod{UID}/{ID}\n"),
            "Name:\tapp\nNSpid:\t1234\t1\n",
            Some(
                r#"{"annotations":{"io.kubernetes.cri.sandbox-name":"web-0","io.kubernetes.cri.container-name":"app"}}"#,
            ),
        );
        let id = identify(&mut a, 1234).unwrap();
        assert_eq!(id.pid, 1234);
        assert_eq!(id.pid_in_container, Some(1));
        assert_eq!(id.cgroup.container_id.as_deref(), Some(ID));
        assert_eq!(id.cgroup.qos, Some(Qos::BestEffort));
        assert_eq!(id.cgroup.pod_uid.as_deref(), Some(UID));
        let names = id.names.unwrap().unwrap();
        assert_eq!(names.pod.as_deref(), Some("web-0"));
        assert_eq!(names.container.as_deref(), Some("app"));
        assert_eq!(a.cached(), 1);
        a.retain(|_| false);
        assert_eq!(a.cached(), 0);
    }

    #[test]
    fn identify_a_host_process() {
        let (_root, mut a) = host("0::/system.slice/nginx.service\n", "NSpid:\t1234\n", None);
        let id = identify(&mut a, 1234).unwrap();
        assert_eq!(id.cgroup.path, "/system.slice/nginx.service");
        assert_eq!((id.pid, id.pid_in_container), (1234, None));
        assert!(matches!(id.names, Ok(None)));
        assert_eq!(id.cgroup.pod_uid, None);
        assert_eq!(a.cached(), 0);
    }

    #[test]
    fn identify_failures_are_precise() {
        let (_root, mut a) = host("1:cpu:/\n", "NSpid:\t1234\n", None);
        let e = identify(&mut a, 1234).unwrap_err().to_string();
        assert!(
            e.ends_with("proc/1234/cgroup: no cgroup v2 line (\"0::\") in /proc/PID/cgroup"),
            "{e}"
        );
        let e = identify(&mut a, 99).unwrap_err().to_string();
        assert!(
            e.contains("cannot read") && e.contains("proc/99/cgroup"),
            "{e}"
        );

        let (_root, mut a) = host("0::/\n", "Name:\tx\n", None);
        let e = identify(&mut a, 1234).unwrap_err().to_string();
        assert!(e.ends_with("proc/1234/status: no NSpid line"), "{e}");

        // A broken bundle: the process is still identified by its cgroup.
        let (_root, mut a) = host(
            &format!("0::/docker/{ID}\n"),
            "NSpid:\t1234\t7\n",
            Some("{"),
        );
        let id = identify(&mut a, 1234).unwrap();
        assert_eq!(id.cgroup.container_id.as_deref(), Some(ID));
        assert!(matches!(
            id.names.as_ref().map_err(|e| &**e),
            Err(BundleError::Json { .. })
        ));
    }

    #[test]
    fn names_not_found_are_retried_later_and_found_ones_kept() {
        let (root, mut a) = host("0::/\n", "NSpid:\t1\n", None);
        assert!(matches!(a.names(ID, None), Ok(None)));
        let dir = root.path().join(format!(
            "run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}"
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-name":"app"}}"#,
        )
        .unwrap();
        // Within RETRY_AFTER the miss is cached.
        assert!(matches!(a.names(ID, None), Ok(None)));
        a.cache.get_mut(ID).unwrap().at -= RETRY_AFTER;
        let names = a.names(ID, None).unwrap().unwrap();
        assert_eq!(names.container.as_deref(), Some("app"));
        // Found: kept even when the bundle goes away (until `retain`).
        std::fs::remove_dir_all(&dir).unwrap();
        a.cache.get_mut(ID).unwrap().at -= RETRY_AFTER;
        assert!(Arc::ptr_eq(&names, &a.names(ID, None).unwrap().unwrap()));
    }
}
