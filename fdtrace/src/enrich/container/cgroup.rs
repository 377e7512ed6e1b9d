//! The container id, pod uid and QoS class a process's cgroup v2 path names.
//!
//! The path is the `0::` line of `/proc/PID/cgroup`: on a pure v2 host it is
//! the path under `/sys/fs/cgroup`, on a hybrid host (v1 controllers, v2 at
//! `/sys/fs/cgroup/unified`) the path under the unified hierarchy, where runc
//! also places every container (measured with containerd 1.6 and runc 1.1).
//! The shapes the kubelet and the runtimes make:
//!
//! | who | path |
//! |---|---|
//! | kubelet, cgroupfs driver | `/kubepods[/burstable\|/besteffort]/pod<uid>/<id>` (CRI-O: `.../crio-<id>`) |
//! | kubelet, systemd driver | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, - as _>.slice/<cri-containerd\|crio\|docker>-<id>.scope` |
//! | containerd without `SystemdCgroup` on a systemd host | `/system.slice/containerd.service/kubepods-besteffort-pod<uid_>.slice:cri-containerd:<id>` |
//! | docker | `/docker/<id>`, `/system.slice/docker-<id>.scope` |
//! | podman | `/libpod_parent/libpod-<id>`, `/machine.slice/libpod-<id>.scope` |
//!
//! Guaranteed pods have no QoS level in the path. A container whose cgroup
//! is delegated to it (a private cgroup namespace, systemd inside) can make
//! sub-cgroups with any names below its own: the container is therefore the
//! component right below the pod, or without a pod the outermost component
//! that names one, never a name found deeper down.

use std::fmt;

/// Longest cgroup path accepted. The kernel bounds each name by NAME_MAX
/// (255) but not the depth; real paths are a few hundred bytes.
pub const MAX_PATH_LEN: usize = 4096;

/// Length of a container id: 32 random bytes in hex, for containerd, CRI-O,
/// docker and podman alike.
pub const ID_LEN: usize = 64;

/// Marker the kernel appends to the path of a removed v2 cgroup in
/// `/proc/PID/cgroup`, or writes alone when the cgroup is already gone
/// (`proc_cgroup_show` in
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/cgroup/cgroup.c>).
const DELETED: &str = " (deleted)";

/// Why a `/proc/PID/cgroup` text or a cgroup path was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 line (\"0::\") in /proc/PID/cgroup")]
    NoV2Line,
    #[error("the cgroup v2 path is not absolute: {0:?}")]
    NotAbsolute(String),
    #[error("the cgroup v2 path is {0} bytes, more than {MAX_PATH_LEN}")]
    TooLong(usize),
    #[error("the process's cgroup v2 was removed")]
    Removed,
}

/// The QoS class of a Kubernetes pod, from the kubelet's cgroup names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// The name Kubernetes gives the class (`status.qosClass`).
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
}

impl fmt::Display for Qos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The runtime a cgroup name points at, where the name says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
}

/// A cgroup v2 path and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The path, as in `/proc/PID/cgroup` (without a ` (deleted)` mark).
    pub path: String,
    /// The kernel marked the cgroup as removed.
    pub deleted: bool,
    /// The container's full id (64 lowercase hex digits).
    pub container_id: Option<String>,
    /// The runtime, when the cgroup's name tells it (a bare id does not).
    pub runtime: Option<Runtime>,
    /// The pod's uid, with the dashes the systemd driver turns into `_`.
    pub pod_uid: Option<String>,
    /// The pod's QoS class: set whenever `pod_uid` is.
    pub qos: Option<Qos>,
}

/// The cgroup v2 path of a `/proc/PID/cgroup` text: its `0::` line.
pub fn v2_path(proc_cgroup: &str) -> Result<&str, CgroupError> {
    // Each line is `hierarchy-id:controllers:path`; the path may itself hold
    // colons (the `...slice:cri-containerd:<id>` shape) but no newline: the
    // kernel refuses cgroup names with one (`cgroup_mkdir` in
    // <https://github.com/torvalds/linux/blob/v6.18/kernel/cgroup/cgroup.c>,
    // `cgroup1_rename` in cgroup-v1.c).
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or(CgroupError::NoV2Line)
}

/// Parses a cgroup v2 path (as in the `0::` line of `/proc/PID/cgroup`).
pub fn parse_path(path: &str) -> Result<CgroupInfo, CgroupError> {
    if path.len() > MAX_PATH_LEN {
        return Err(CgroupError::TooLong(path.len()));
    }
    let (path, deleted) = match path.strip_suffix(DELETED) {
        Some(p) => (p, true),
        None => (path, false),
    };
    if deleted && path.is_empty() {
        return Err(CgroupError::Removed);
    }
    if !path.starts_with('/') {
        return Err(CgroupError::NotAbsolute(path.to_owned()));
    }
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut info = CgroupInfo {
        path: path.to_owned(),
        deleted,
        container_id: None,
        runtime: None,
        pod_uid: None,
        qos: None,
    };
    // The outermost pod component: a container cannot make its own parents.
    if let Some(at) = components.iter().position(|c| pod_of(c).is_some()) {
        let pod = pod_of(components[at]).expect("matched above");
        info.pod_uid = Some(pod.uid);
        info.qos = Some(match pod.qos {
            Some(q) => q,
            // cgroupfs driver: the level is the parent's name.
            None => match at.checked_sub(1).map(|i| components[i]) {
                Some("burstable") => Qos::Burstable,
                Some("besteffort") => Qos::BestEffort,
                _ => Qos::Guaranteed,
            },
        });
        let container = pod
            .container
            .or_else(|| components.get(at + 1).and_then(|c| container_of(c)));
        if let Some(c) = container {
            info.container_id = Some(c.id);
            info.runtime = c.runtime;
        }
    } else if let Some((at, c)) = components
        .iter()
        .enumerate()
        .find_map(|(i, c)| Some((i, container_of(c)?)))
    {
        info.container_id = Some(c.id);
        // A bare id says no runtime; docker's and podman's parents do.
        info.runtime = c
            .runtime
            .or(match at.checked_sub(1).map(|i| components[i]) {
                Some("docker") => Some(Runtime::Docker),
                Some("libpod_parent") => Some(Runtime::Podman),
                _ => None,
            });
    }
    Ok(info)
}

/// A container id found in one cgroup name.
#[derive(Debug, PartialEq, Eq)]
struct ContainerName {
    id: String,
    runtime: Option<Runtime>,
}

/// A pod found in one cgroup name.
#[derive(Debug, PartialEq, Eq)]
struct PodName {
    uid: String,
    /// From a systemd slice name, which spells out its parents.
    qos: Option<Qos>,
    /// The `...slice:cri-containerd:<id>` shape names the container too.
    container: Option<ContainerName>,
}

/// Whether `s` is a container id: 64 hex digits (lowercase, as every runtime
/// writes them).
pub fn is_container_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The container one cgroup name stands for, if any.
fn container_of(name: &str) -> Option<ContainerName> {
    if is_container_id(name) {
        return Some(ContainerName {
            id: name.to_owned(),
            runtime: None,
        });
    }
    let stem = name.strip_suffix(".scope").unwrap_or(name);
    let (prefix, id) = stem.rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    // `crio-conmon-<id>` and `libpod-conmon-<id>` hold the runtime's monitor
    // process, not the container: they do not match here.
    let runtime = match prefix {
        "cri-containerd" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "docker" => Runtime::Docker,
        "libpod" => Runtime::Podman,
        _ => return None,
    };
    Some(ContainerName {
        id: id.to_owned(),
        runtime: Some(runtime),
    })
}

/// The pod one cgroup name stands for, if any: `pod<uid>` (cgroupfs driver),
/// `...-[<qos>-]pod<uid_>.slice` (systemd driver), or that slice followed by
/// `:<runtime>:<id>` (containerd's own cgroup on a systemd host).
fn pod_of(name: &str) -> Option<PodName> {
    if let Some(uid) = name.strip_prefix("pod") {
        return Some(PodName {
            uid: pod_uid(uid)?,
            qos: None,
            container: None,
        });
    }
    let (slice, container) = match name.split_once(':') {
        Some((slice, rest)) => {
            let (runtime, id) = rest.split_once(':')?;
            let container = container_of(&format!("{runtime}-{id}"))?;
            (slice, Some(container))
        }
        None => (name, None),
    };
    let stem = slice.strip_suffix(".slice")?;
    // A systemd slice's name is its parents' names joined by `-`
    // (kubepods-burstable-pod<uid>): the pod is the last part, its QoS level
    // the one before; a guaranteed pod hangs right under kubepods.
    let (parents, last) = stem.rsplit_once('-')?;
    let uid = pod_uid(last.strip_prefix("pod")?)?;
    let qos = match parents.rsplit('-').next() {
        Some("burstable") => Qos::Burstable,
        Some("besteffort") => Qos::BestEffort,
        Some("kubepods") => Qos::Guaranteed,
        _ => return None,
    };
    Some(PodName {
        uid,
        qos: Some(qos),
        container,
    })
}

/// A pod uid from a cgroup name: a UUID (`8-4-4-4-12` hex digits, the API
/// server's), or 32 hex digits (the kubelet's hash for a static pod); the
/// systemd driver writes its dashes as `_`.
fn pod_uid(s: &str) -> Option<String> {
    let uid: String = s.chars().map(|c| if c == '_' { '-' } else { c }).collect();
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = uid.split('-').collect();
    let ok = match parts.as_slice() {
        [a, b, c, d, e] => hex(a, 8) && hex(b, 4) && hex(c, 4) && hex(d, 4) && hex(e, 12),
        [a] => hex(a, 32),
        _ => false,
    };
    ok.then(|| uid.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5f68f626d2ff4d67bbd3a38f89148d2772aa77f0df1417739d24ed7c1f202b81";
    const UID: &str = "1b2c3d4e-5f60-4718-9abc-def012345678";
    const UID_: &str = "1b2c3d4e_5f60_4718_9abc_def012345678";

    fn parse(path: &str) -> CgroupInfo {
        parse_path(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn check(
        path: &str,
        id: Option<&str>,
        runtime: Option<Runtime>,
        uid: Option<&str>,
        qos: Option<Qos>,
    ) {
        let info = parse(path);
        assert_eq!(info.path, path);
        assert!(!info.deleted);
        assert_eq!(info.container_id.as_deref(), id, "{path}");
        assert_eq!(info.runtime, runtime, "{path}");
        assert_eq!(info.pod_uid.as_deref(), uid, "{path}");
        assert_eq!(info.qos, qos, "{path}");
    }

    #[test]
    fn v2_line_of_pure_v2_and_hybrid_hosts() {
        let pure = format!("0::/kubepods/besteffort/pod{UID}/{ID}\n");
        assert_eq!(
            v2_path(&pure),
            Ok(format!("/kubepods/besteffort/pod{UID}/{ID}").as_str())
        );
        // Hybrid: v1 lines first (named hierarchies and controllers), v2 last.
        let hybrid = format!(
            "9:name=systemd:/kubepods/x\n4:memory:/process_api/abc/kubepods/x\n1:cpu:/kubepods/x\n0::/kubepods/besteffort/pod{UID}/{ID}\n"
        );
        assert_eq!(
            v2_path(&hybrid).unwrap(),
            format!("/kubepods/besteffort/pod{UID}/{ID}")
        );
        // Colons in the path are part of it.
        let colons = format!(
            "0::/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}\n"
        );
        assert!(
            v2_path(&colons)
                .unwrap()
                .ends_with(&format!(":cri-containerd:{ID}"))
        );
        assert_eq!(v2_path("0::/\n"), Ok("/"));
    }

    #[test]
    fn no_v2_line() {
        assert_eq!(
            v2_path("4:memory:/a\n1:cpu:/a\n"),
            Err(CgroupError::NoV2Line)
        );
        assert_eq!(v2_path(""), Err(CgroupError::NoV2Line));
        // "10::" is a v1 named hierarchy without controllers, not v2.
        assert_eq!(v2_path("10::/a\n"), Err(CgroupError::NoV2Line));
    }

    #[test]
    fn kubelet_cgroupfs_driver() {
        use Qos::*;
        check(
            &format!("/kubepods/besteffort/pod{UID}/{ID}"),
            Some(ID),
            None,
            Some(UID),
            Some(BestEffort),
        );
        check(
            &format!("/kubepods/burstable/pod{UID}/{ID}"),
            Some(ID),
            None,
            Some(UID),
            Some(Burstable),
        );
        check(
            &format!("/kubepods/pod{UID}/{ID}"),
            Some(ID),
            None,
            Some(UID),
            Some(Guaranteed),
        );
        check(
            &format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
            Some(ID),
            Some(Runtime::CriO),
            Some(UID),
            Some(Burstable),
        );
        // The pod's own cgroup (no container yet, or the pod-level processes).
        check(
            &format!("/kubepods/besteffort/pod{UID}"),
            None,
            None,
            Some(UID),
            Some(BestEffort),
        );
    }

    #[test]
    fn kubelet_systemd_driver() {
        use Qos::*;
        check(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            Some(ID),
            Some(Runtime::Containerd),
            Some(UID),
            Some(Burstable),
        );
        check(
            &format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
            ),
            Some(ID),
            Some(Runtime::CriO),
            Some(UID),
            Some(BestEffort),
        );
        check(
            &format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"),
            Some(ID),
            Some(Runtime::Docker),
            Some(UID),
            Some(Guaranteed),
        );
        // CRI-O's monitor: in the pod, not in the container.
        check(
            &format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope"),
            None,
            None,
            Some(UID),
            Some(Guaranteed),
        );
    }

    #[test]
    fn containerd_service_on_a_systemd_host() {
        check(
            &format!(
                "/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{ID}"
            ),
            Some(ID),
            Some(Runtime::Containerd),
            Some(UID),
            Some(Qos::BestEffort),
        );
        check(
            &format!(
                "/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{ID}"
            ),
            Some(ID),
            Some(Runtime::Containerd),
            Some(UID),
            Some(Qos::Guaranteed),
        );
    }

    #[test]
    fn kind_node_in_docker() {
        // A kind node is itself a docker container; the pod's container is
        // the one below the pod, not the node's.
        let node = "a".repeat(64);
        check(
            &format!(
                "/system.slice/docker-{node}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            Some(ID),
            Some(Runtime::Containerd),
            Some(UID),
            Some(Qos::BestEffort),
        );
    }

    #[test]
    fn docker_and_podman() {
        check(
            &format!("/docker/{ID}"),
            Some(ID),
            Some(Runtime::Docker),
            None,
            None,
        );
        check(
            &format!("/libpod_parent/{ID}"),
            Some(ID),
            Some(Runtime::Podman),
            None,
            None,
        );
        check(
            &format!("/system.slice/docker-{ID}.scope"),
            Some(ID),
            Some(Runtime::Docker),
            None,
            None,
        );
        check(
            &format!("/libpod_parent/libpod-{ID}"),
            Some(ID),
            Some(Runtime::Podman),
            None,
            None,
        );
        check(
            &format!("/machine.slice/libpod-{ID}.scope"),
            Some(ID),
            Some(Runtime::Podman),
            None,
            None,
        );
        // podman's conmon is not the container.
        check(
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            None,
            None,
            None,
            None,
        );
    }

    #[test]
    fn sub_cgroups_made_inside_a_container_do_not_rename_it() {
        let fake = "b".repeat(64);
        let fake_uid = "99999999-9999-4999-8999-999999999999";
        check(
            &format!("/kubepods/besteffort/pod{UID}/{ID}/pod{fake_uid}/{fake}/init.scope"),
            Some(ID),
            None,
            Some(UID),
            Some(Qos::BestEffort),
        );
        check(
            &format!("/system.slice/docker-{ID}.scope/docker-{fake}.scope"),
            Some(ID),
            Some(Runtime::Docker),
            None,
            None,
        );
    }

    #[test]
    fn processes_outside_containers() {
        check("/system.slice/nginx.service", None, None, None, None);
        check("/", None, None, None, None);
        check(
            "/user.slice/user-1000.slice/session-2.scope",
            None,
            None,
            None,
            None,
        );
        // The kubelet's own QoS cgroups hold no pod.
        check("/kubepods/besteffort", None, None, None, None);
        check(
            "/kubepods.slice/kubepods-burstable.slice",
            None,
            None,
            None,
            None,
        );
    }

    #[test]
    fn names_that_only_look_like_ids() {
        // Uppercase, one digit short, one too many, not hex.
        for bad in [
            ID.to_uppercase(),
            ID[1..].to_owned(),
            format!("{ID}0"),
            format!("{}g", &ID[1..]),
        ] {
            check(&format!("/docker/{bad}"), None, None, None, None);
            check(
                &format!("/kubepods/pod{UID}/{bad}"),
                None,
                None,
                Some(UID),
                Some(Qos::Guaranteed),
            );
        }
        // A pod uid that is not a UUID nor a static pod's hash.
        check(
            &format!("/kubepods/podnot-a-uid/{ID}"),
            Some(ID),
            None,
            None,
            None,
        );
        check(
            &format!("/kubepods/pod{}/{ID}", &UID[1..]),
            Some(ID),
            None,
            None,
            None,
        );
        // An unknown runtime prefix.
        check(&format!("/x/lxc-{ID}.scope"), None, None, None, None);
    }

    #[test]
    fn static_pod_uid_is_a_hash() {
        let uid = "0123456789abcdef0123456789abcdef";
        check(
            &format!("/kubepods/burstable/pod{uid}/{ID}"),
            Some(ID),
            None,
            Some(uid),
            Some(Qos::Burstable),
        );
    }

    #[test]
    fn deleted_cgroup() {
        let info = parse(&format!("/kubepods/pod{UID}/{ID} (deleted)"));
        assert!(info.deleted);
        assert_eq!(info.path, format!("/kubepods/pod{UID}/{ID}"));
        assert_eq!(info.container_id.as_deref(), Some(ID));
        assert_eq!(parse_path(" (deleted)"), Err(CgroupError::Removed));
    }

    #[test]
    fn bad_paths() {
        assert_eq!(parse_path(""), Err(CgroupError::NotAbsolute(String::new())));
        // In a private cgroup namespace a process outside it shows as
        // `/../..` ... : still absolute, parsed by its names.
        assert_eq!(
            parse(&format!("/../../docker/{ID}"))
                .container_id
                .as_deref(),
            Some(ID)
        );
        let long = format!("/{}", "a/".repeat(MAX_PATH_LEN));
        assert_eq!(parse_path(&long), Err(CgroupError::TooLong(long.len())));
        // Odd but valid names never panic.
        for odd in [
            "/:",
            "/::",
            "/a:b:c",
            "/-",
            "/pod",
            "/.slice",
            "/-pod.slice",
            "/kubepods-pod.slice:x",
            "/é-ü.scope",
        ] {
            parse(odd);
        }
    }
}
