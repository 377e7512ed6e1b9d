//! Each traced process's cgroup, container and pod ([`container`]) as the
//! plain [`Attribution`] the analysis groups by. Keyed by the cgroup id the
//! kernel side keeps for each traced process (ProcStats::cgroup, moved with
//! the process at every `cgroup_attach_task`): a process's cgroup is read
//! from /proc only when that id changes to one not resolved yet, and each
//! cgroup id's path, container and names are resolved once for all its
//! processes. A process's pid in its container is read once, at its first
//! report (a process's pid namespace is fixed when it is created).
use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    rc::Rc,
    sync::Arc,
};

use super::container::{
    Attributor, IdentifyError,
    bundle::{BundleError, Names},
    cgroup::CgroupInfo,
};
use crate::analysis::Attribution;

/// One cgroup, resolved: its host path and what it names, and its
/// container's names.
#[derive(Debug)]
pub struct Cgroup {
    pub info: CgroupInfo,
    pub names: Result<Option<Arc<Names>>, Arc<BundleError>>,
}

impl Cgroup {
    /// A container whose names are not known yet (no bundle, or a broken
    /// one): looked up again, at most every RETRY_AFTER.
    pub fn unnamed(&self) -> bool {
        self.info.container_id.is_some() && !matches!(self.names, Ok(Some(_)))
    }
}

/// The attribution of every traced process, with the resolution of each
/// cgroup and the names of each container cached.
pub struct Attributions {
    attributor: Attributor,
    /// Cgroup id -> its resolution, shared by the processes in it.
    cgroups: HashMap<u64, Rc<Cgroup>>,
    /// The host's cgroup v2 hierarchy, where a path's directory inode
    /// (the cgroup id) is read; found at the first look.
    v2_root: Option<Option<PathBuf>>,
    /// Problems already reported on stderr: each once, not once per process
    /// and report.
    warned: HashSet<String>,
}

/// What one process's attribution keeps between reports.
#[derive(Default)]
pub struct ProcessAttribution {
    /// The kernel's cgroup id the attribution is of; Some(0) when the
    /// kernel has not seen the process move since user space registered
    /// it (its cgroup read from /proc stays right until it moves, which
    /// sets the id). None until its first report.
    key: Option<u64>,
    /// Its host pid and pid in its container, read at its first report.
    pids: Option<(u32, Option<u32>)>,
    cgroup: Option<Rc<Cgroup>>,
    current: Rc<Attribution>,
}

impl ProcessAttribution {
    /// A new process's, until its first report reads its own: its parent's
    /// (a child starts in its parent's cgroup and container).
    pub fn inherited(parent: &ProcessAttribution) -> Self {
        ProcessAttribution {
            current: parent.current.clone(),
            ..ProcessAttribution::default()
        }
    }

    pub fn current(&self) -> &Rc<Attribution> {
        &self.current
    }
}

impl Attributions {
    pub fn new(host_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Attributions {
            attributor: Attributor::new(host_root, proc_root),
            cgroups: HashMap::new(),
            v2_root: None,
            warned: HashSet::new(),
        }
    }

    /// Brings the attribution of `pid`, whose cgroup id the kernel side
    /// says is `cgroup_id` (0: unknown to it), up to date.
    pub fn refresh(&mut self, pid: u32, cgroup_id: u64, p: &mut ProcessAttribution) {
        if p.key == Some(cgroup_id) {
            if let Some(cg) = p.cgroup.clone()
                && cg.unnamed()
            {
                self.rename(cgroup_id, &cg, p);
            }
            return;
        }
        let pids = match p.pids {
            Some(pids) => pids,
            None => match self.attributor.pids_of(pid) {
                Ok(pids) => pids,
                Err(e) => return self.failed(pid, &e),
            },
        };
        let cg = match self.cgroups.get(&cgroup_id) {
            Some(cg) if cgroup_id != 0 => cg.clone(),
            _ => match self.resolve(pid) {
                Ok(cg) => cg,
                Err(e) => return self.failed(pid, &e),
            },
        };
        self.names_warning(&cg);
        let was = p
            .cgroup
            .as_ref()
            .map(|c| (c.info.clone(), names_ptr(&c.names)));
        let same = was.is_some_and(|(info, names)| {
            info == cg.info && names == names_ptr(&cg.names) && p.pids == Some(pids)
        });
        if !same {
            p.current = Rc::new(attribution(&cg, pids.1));
        }
        p.key = Some(cgroup_id);
        p.pids = Some(pids);
        p.cgroup = Some(cg);
    }

    /// The cgroup `pid` is in now, read from /proc, resolved, and cached
    /// under its id (the inode of its directory).
    fn resolve(&mut self, pid: u32) -> Result<Rc<Cgroup>, IdentifyError> {
        let info = self.attributor.cgroup_of(pid)?;
        let names = match &info.container_id {
            Some(id) => self.attributor.names(id, info.runtime),
            None => Ok(None),
        };
        let cg = Rc::new(Cgroup { info, names });
        if let Some(id) = self.inode_of(&cg.info.path) {
            self.cgroups.insert(id, cg.clone());
        }
        Ok(cg)
    }

    /// The cgroup id of `pid`'s cgroup, resolved (from the cache when the
    /// id is known): for node mode's filters, which select containers
    /// that start after fdtrace.
    pub fn cgroup(&mut self, pid: u32, cgroup_id: u64) -> Option<Rc<Cgroup>> {
        if let Some(cg) = self.cgroups.get(&cgroup_id).cloned() {
            if !cg.unnamed() {
                return Some(cg);
            }
            let mut p = ProcessAttribution {
                key: Some(cgroup_id),
                cgroup: Some(cg.clone()),
                ..ProcessAttribution::default()
            };
            self.rename(cgroup_id, &cg, &mut p);
            return p.cgroup;
        }
        match self.resolve(pid) {
            Ok(cg) => Some(cg),
            Err(e) => {
                self.failed(pid, &e);
                None
            }
        }
    }

    /// Looks the names of `cg`'s container up again (the attributor
    /// retries a miss only every RETRY_AFTER); found, they replace the
    /// cached cgroup's and `p`'s attribution.
    fn rename(&mut self, cgroup_id: u64, cg: &Rc<Cgroup>, p: &mut ProcessAttribution) {
        let Some(id) = &cg.info.container_id else {
            return;
        };
        let names = self.attributor.names(id, cg.info.runtime);
        if names_ptr(&names) == names_ptr(&cg.names) {
            return;
        }
        let fresh = Rc::new(Cgroup {
            info: cg.info.clone(),
            names,
        });
        self.names_warning(&fresh);
        if cgroup_id != 0 {
            self.cgroups.insert(cgroup_id, fresh.clone());
        }
        if let Some((_, in_container)) = p.pids {
            p.current = Rc::new(attribution(&fresh, in_container));
        }
        p.cgroup = Some(fresh);
    }

    /// The inode of cgroup `path`'s directory: its id.
    fn inode_of(&mut self, path: &str) -> Option<u64> {
        let attributor = &self.attributor;
        let root = self.v2_root.get_or_insert_with(|| attributor.v2_root());
        let dir = root.as_ref()?.join(path.trim_start_matches('/'));
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }

    fn failed(&mut self, pid: u32, e: &IdentifyError) {
        // A process that just exited has no /proc files: its exit is on
        // its way.
        let proc_dir = self.attributor.proc_root().join(pid.to_string());
        if proc_dir.exists() {
            self.warn(warning_key(e), &format!("pid {pid}: {e}"));
        }
    }

    fn names_warning(&mut self, cg: &Cgroup) {
        if let Err(e) = &cg.names
            && let Some(id) = &cg.info.container_id
        {
            self.warn(
                format!("names {id}"),
                &format!("the names of container {id}: {e}"),
            );
        }
    }

    /// Drops the cached cgroups and container names none of `live` is in.
    pub fn retain<'a>(&mut self, live: impl IntoIterator<Item = &'a ProcessAttribution>) {
        let live: Vec<&ProcessAttribution> = live.into_iter().collect();
        let ids: HashSet<&str> = live
            .iter()
            .filter_map(|p| p.current.container_id.as_deref())
            .collect();
        self.attributor.retain(|id| ids.contains(id));
        // A cgroup no process holds (the cache's own Rc is the only one).
        self.cgroups.retain(|_, cg| Rc::strong_count(cg) > 1);
    }

    fn warn(&mut self, key: String, message: &str) {
        if self.warned.insert(key) {
            eprintln!("fdtrace: {message}");
        }
    }
}

/// The names of a lookup, to compare two: the same Arc, or both without.
fn names_ptr(n: &Result<Option<Arc<Names>>, Arc<BundleError>>) -> Option<*const Names> {
    match n {
        Ok(Some(n)) => Some(Arc::as_ptr(n)),
        _ => None,
    }
}

/// A process whose cgroup cannot be parsed says so once for the kind of
/// problem (a host without cgroup v2 would say it for every process).
fn warning_key(e: &IdentifyError) -> String {
    match e {
        IdentifyError::Cgroup { source, .. } => format!("cgroup {source}"),
        IdentifyError::Status { source, .. } => format!("status {source}"),
        IdentifyError::Read(e) => format!("read {e}"),
        IdentifyError::Namespace { reason, .. } => format!("namespace {reason}"),
    }
}

/// The plain figures of a process in cgroup `cg`.
fn attribution(cg: &Cgroup, pid_in_container: Option<u32>) -> Attribution {
    let names = cg.names.as_ref().ok().and_then(|n| n.as_deref());
    let name = |f: fn(&Names) -> &Option<String>| names.and_then(|n| f(n).clone());
    Attribution {
        cgroup: Some(cg.info.path.clone()),
        container_id: cg.info.container_id.clone(),
        pod: name(|n| &n.pod),
        namespace: name(|n| &n.namespace),
        container: name(|n| &n.container),
        pod_uid: cg
            .info
            .pod_uid
            .clone()
            .or_else(|| names.and_then(|n| n.pod_uid.clone())),
        qos: cg.info.qos.map(|q| q.as_str()),
        pid_in_container,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5f68f626d2ff4d67bbd3a38f89148d2772aa77f0df1417739d24ed7c1f202b81";
    const UID: &str = "1b2c3d4e-5f60-4718-9abc-def012345678";

    /// A host root with a fake /proc entry for `pid`, a containerd bundle,
    /// and a cgroup v2 hierarchy holding the pod's container's directory.
    fn host(root: &std::path::Path, pid: u32, cgroup: Option<&str>) {
        let proc_dir = root.join(format!("proc/{pid}"));
        std::fs::create_dir_all(&proc_dir).unwrap();
        if let Some(cgroup) = cgroup {
            std::fs::write(proc_dir.join("cgroup"), cgroup).unwrap();
        }
        std::fs::write(proc_dir.join("status"), "Name:\tapp\nNSpid:\t1234\t7\n").unwrap();
        let dir = root.join(format!(
            "run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}"
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-name":"web-0","io.kubernetes.cri.sandbox-namespace":"shop","io.kubernetes.cri.container-name":"app"}}"#,
        )
        .unwrap();
        let v2 = root.join("sys/fs/cgroup");
        std::fs::create_dir_all(v2.join(format!("kubepods/besteffort/pod{UID}/{ID}"))).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "").unwrap();
    }

    fn in_pod() -> Attribution {
        Attribution {
            cgroup: Some(format!("/kubepods/besteffort/pod{UID}/{ID}")),
            container_id: Some(ID.into()),
            pod: Some("web-0".into()),
            namespace: Some("shop".into()),
            container: Some("app".into()),
            pod_uid: Some(UID.into()),
            qos: Some("BestEffort"),
            pid_in_container: Some(7),
        }
    }

    #[test]
    fn a_container_process_and_its_move() {
        let root = tempfile::tempdir().expect("tempdir");
        host(
            root.path(),
            1234,
            Some(&format!("0::/kubepods/besteffort/pod{UID}/{ID}\n")),
        );
        let mut a = Attributions::new(root.path(), root.path().join("proc"));
        let mut p = ProcessAttribution::default();
        assert_eq!(*p.current, Attribution::default());
        // Registered by user space: the kernel has no id for it yet.
        a.refresh(1234, 0, &mut p);
        let first = p.current.clone();
        assert_eq!(*first, in_pod());
        // The same id: nothing is read again (the files may go).
        std::fs::remove_file(root.path().join("proc/1234/cgroup")).unwrap();
        a.refresh(1234, 0, &mut p);
        assert!(Rc::ptr_eq(&first, &p.current));
        assert!(a.warned.is_empty(), "{:?}", a.warned);
        // A child starts with its parent's.
        let child = ProcessAttribution::inherited(&p);
        assert!(Rc::ptr_eq(&first, child.current()));

        // Moved to a host cgroup (the kernel's id changes): its cgroup is
        // read again, its pids not (the status file is gone), the names
        // gone.
        std::fs::write(
            root.path().join("proc/1234/cgroup"),
            "0::/system.slice/x.service\n",
        )
        .unwrap();
        std::fs::remove_file(root.path().join("proc/1234/status")).unwrap();
        a.refresh(1234, 4242, &mut p);
        assert_eq!(
            *p.current,
            Attribution {
                cgroup: Some("/system.slice/x.service".into()),
                pid_in_container: Some(7),
                ..Attribution::default()
            }
        );
        a.retain([&p]);
        assert_eq!(a.attributor.cached(), 0);
    }

    #[test]
    fn a_cgroup_id_is_resolved_once_for_all_its_processes() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = format!("/kubepods/besteffort/pod{UID}/{ID}");
        host(root.path(), 1234, Some(&format!("0::{path}\n")));
        // The second process's /proc has no cgroup file: it cannot be read
        // from there.
        host(root.path(), 1235, None);
        let id = std::fs::metadata(root.path().join("sys/fs/cgroup").join(&path[1..]))
            .unwrap()
            .ino();
        let mut a = Attributions::new(root.path(), root.path().join("proc"));
        let (mut p1, mut p2) = (ProcessAttribution::default(), ProcessAttribution::default());
        a.refresh(1234, id, &mut p1);
        assert_eq!(*p1.current, in_pod());
        a.refresh(1235, id, &mut p2);
        assert_eq!(*p2.current, in_pod());
        assert!(a.warned.is_empty(), "{:?}", a.warned);
        assert!(Rc::ptr_eq(
            p1.cgroup.as_ref().unwrap(),
            p2.cgroup.as_ref().unwrap()
        ));
        // Kept while a process is in it, dropped after.
        a.retain([&p2]);
        assert_eq!(a.cgroups.len(), 1);
        drop((p1, p2));
        a.retain([]);
        assert!(a.cgroups.is_empty());
    }

    #[test]
    fn names_found_later_replace_the_missing_ones() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = format!("/kubepods/besteffort/pod{UID}/{ID}");
        host(root.path(), 1234, Some(&format!("0::{path}\n")));
        let bundle = root.path().join(format!(
            "run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}"
        ));
        std::fs::remove_dir_all(&bundle).unwrap();
        let mut a = Attributions::new(root.path(), root.path().join("proc"));
        let mut p = ProcessAttribution::default();
        a.refresh(1234, 0, &mut p);
        assert_eq!(p.current.pod, None);
        assert_eq!(p.current.container_id.as_deref(), Some(ID));
        host(root.path(), 1234, Some(&format!("0::{path}\n")));
        a.attributor.forget_miss(ID);
        a.refresh(1234, 0, &mut p);
        assert_eq!(*p.current, in_pod());
    }

    #[test]
    fn a_bad_cgroup_is_warned_about_once_and_attributes_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        host(root.path(), 1234, Some("1:cpu:/\n"));
        let mut a = Attributions::new(root.path(), root.path().join("proc"));
        let mut p = ProcessAttribution::default();
        a.refresh(1234, 0, &mut p);
        a.refresh(1234, 0, &mut p);
        assert_eq!(a.warned.len(), 1);
        assert_eq!(*p.current, Attribution::default());
    }
}
