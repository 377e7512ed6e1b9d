//! Each traced process's cgroup, container and pod ([`container`]) as the
//! plain [`Attribution`] the analysis groups by: read at its first report
//! and again after an exec; at the other reports only its cgroup is read
//! again, and the rest is rebuilt only when that changed.
use std::{collections::HashSet, path::PathBuf, rc::Rc, sync::Arc};

use super::container::{Attributor, IdentifyError, Identity};
use crate::analysis::Attribution;

/// The attribution of every traced process, with the names of their
/// containers cached.
pub struct Attributions {
    attributor: Attributor,
    /// Problems already reported on stderr: each once, not once per process
    /// and report.
    warned: HashSet<String>,
}

/// What one process's attribution keeps between reports.
#[derive(Default)]
pub struct ProcessAttribution {
    identity: Option<Identity>,
    current: Rc<Attribution>,
}

impl ProcessAttribution {
    /// A new process's, until its first report reads its own: its parent's
    /// (a child starts in its parent's cgroup and container).
    pub fn inherited(parent: &ProcessAttribution) -> Self {
        ProcessAttribution {
            identity: None,
            current: parent.current.clone(),
        }
    }

    pub fn current(&self) -> &Rc<Attribution> {
        &self.current
    }

    /// Read everything again at the next report (after an exec).
    pub fn stale(&mut self) {
        self.identity = None;
    }
}

impl Attributions {
    pub fn new(host_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Attributions {
            attributor: Attributor::new(host_root, proc_root),
            warned: HashSet::new(),
        }
    }

    /// Brings the attribution of `pid` up to date.
    pub fn refresh(&mut self, pid: u32, p: &mut ProcessAttribution) {
        let identity = match self.attributor.refresh(pid, p.identity.as_ref()) {
            Ok(id) => id,
            Err(e) => {
                // A process that just exited has no /proc files: its exit
                // is on its way.
                let proc_dir = self.attributor.proc_root().join(pid.to_string());
                if proc_dir.exists() {
                    self.warn(warning_key(&e), &format!("pid {pid}: {e}"));
                }
                return;
            }
        };
        if let Err(e) = &identity.names
            && let Some(id) = &identity.cgroup.container_id
        {
            self.warn(
                format!("names {id}"),
                &format!("the names of container {id}: {e}"),
            );
        }
        let unchanged = p.identity.as_ref().is_some_and(|old| same(old, &identity));
        if !unchanged {
            p.current = Rc::new(attribution(&identity));
        }
        p.identity = Some(identity);
    }

    /// Drops the cached names of containers none of `live` is in.
    pub fn retain<'a>(&mut self, live: impl IntoIterator<Item = &'a ProcessAttribution>) {
        let ids: HashSet<&str> = live
            .into_iter()
            .filter_map(|p| p.current.container_id.as_deref())
            .collect();
        self.attributor.retain(|id| ids.contains(id));
    }

    fn warn(&mut self, key: String, message: &str) {
        if self.warned.insert(key) {
            eprintln!("fdtrace: {message}");
        }
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

/// The same attribution: same cgroup, same names (found or not).
fn same(a: &Identity, b: &Identity) -> bool {
    let names = match (&a.names, &b.names) {
        (Ok(Some(x)), Ok(Some(y))) => Arc::ptr_eq(x, y),
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => true,
        _ => false,
    };
    names && a.cgroup == b.cgroup && a.pid_in_container == b.pid_in_container
}

/// The plain figures of an identity.
pub fn attribution(id: &Identity) -> Attribution {
    let names = id.names.as_ref().ok().and_then(|n| n.as_deref());
    let name = |f: fn(&super::container::bundle::Names) -> &Option<String>| {
        names.and_then(|n| f(n).clone())
    };
    Attribution {
        cgroup: Some(id.cgroup.path.clone()),
        container_id: id.cgroup.container_id.clone(),
        pod: name(|n| &n.pod),
        namespace: name(|n| &n.namespace),
        container: name(|n| &n.container),
        pod_uid: id.pod_uid().map(str::to_owned),
        qos: id.cgroup.qos.map(|q| q.as_str()),
        pid_in_container: id.pid_in_container,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5f68f626d2ff4d67bbd3a38f89148d2772aa77f0df1417739d24ed7c1f202b81";
    const UID: &str = "1b2c3d4e-5f60-4718-9abc-def012345678";

    /// A host root with a fake /proc entry for pid 1234.
    fn host(cgroup: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let proc_dir = root.path().join("proc/1234");
        std::fs::create_dir_all(&proc_dir).unwrap();
        std::fs::write(proc_dir.join("cgroup"), cgroup).unwrap();
        std::fs::write(proc_dir.join("status"), "Name:\tapp\nNSpid:\t1234\t7\n").unwrap();
        let dir = root.path().join(format!(
            "run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}"
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-name":"web-0","io.kubernetes.cri.sandbox-namespace":"shop","io.kubernetes.cri.container-name":"app"}}"#,
        )
        .unwrap();
        root
    }

    #[test]
    fn a_container_process_and_its_move() {
        let root = host(&format!("0::/kubepods/besteffort/pod{UID}/{ID}\n"));
        let mut a = Attributions::new(root.path(), root.path().join("proc"));
        let mut p = ProcessAttribution::default();
        assert_eq!(*p.current, Attribution::default());
        a.refresh(1234, &mut p);
        let first = p.current.clone();
        assert_eq!(
            *first,
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
        );
        // Unchanged: the same Rc, nothing rebuilt.
        a.refresh(1234, &mut p);
        assert!(Rc::ptr_eq(&first, &p.current));
        // A child starts with its parent's.
        let child = ProcessAttribution::inherited(&p);
        assert!(Rc::ptr_eq(&first, child.current()));

        // Moved to a host cgroup: read again, the status file not (pids
        // stay), the names gone.
        std::fs::write(
            root.path().join("proc/1234/cgroup"),
            "0::/system.slice/x.service\n",
        )
        .unwrap();
        std::fs::remove_file(root.path().join("proc/1234/status")).unwrap();
        a.refresh(1234, &mut p);
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

        // After an exec everything is read again: the status file is gone,
        // so the attribution stays as it was.
        p.stale();
        let before = p.current.clone();
        a.refresh(1234, &mut p);
        assert!(Rc::ptr_eq(&before, &p.current));
        assert!(
            a.warned.iter().any(|w| w.starts_with("read ")),
            "{:?}",
            a.warned
        );
    }

    #[test]
    fn a_bad_cgroup_is_warned_about_once_and_attributes_nothing() {
        let root = host("1:cpu:/\n");
        let mut a = Attributions::new(root.path(), root.path().join("proc"));
        let mut p = ProcessAttribution::default();
        a.refresh(1234, &mut p);
        a.refresh(1234, &mut p);
        assert_eq!(a.warned.len(), 1);
        assert_eq!(*p.current, Attribution::default());
    }
}
