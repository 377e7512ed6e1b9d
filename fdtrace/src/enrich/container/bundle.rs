//! Pod, namespace and container names from the runtimes' own files: the OCI
//! bundle's `config.json` annotations (containerd, CRI-O, podman), docker's
//! `config.v2.json`, and podman's container list. No API server, no runtime
//! socket.
//!
//! Where each runtime keeps them (under the host root):
//!
//! | runtime | file | names |
//! |---|---|---|
//! | containerd (CRI, `ctr`) | `run/containerd/io.containerd.runtime.v2.task/<ns>/<id>/config.json` (k3s: `run/k3s/containerd/...`) | annotations `io.kubernetes.cri.*` |
//! | CRI-O, podman | `{run,var/lib}/containers/storage/overlay-containers/<id>/userdata/config.json` | annotations `io.kubernetes.pod.*`, `io.kubernetes.container.name` |
//! | podman | `{run,var/lib}/containers/storage/overlay-containers/containers.json` | `names` of the container |
//! | docker | `var/lib/docker/containers/<id>/config.v2.json` | `Name`; labels `io.kubernetes.*` under cri-dockerd |
//!
//! These files are written by root (the runtime), but what they hold comes
//! from whoever created the container: sizes are bounded, values checked.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::cgroup::{Runtime, is_container_id};

/// Largest `config.json` or `config.v2.json` read: a real one is a few KiB
/// to a few tens of KiB (the environment, mounts and seccomp profile).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Largest podman `containers.json` read: about 1 KiB per container.
pub const MAX_CONTAINER_LIST_BYTES: u64 = 32 << 20;

/// Longest name accepted: Kubernetes names are DNS subdomains (253 bytes at
/// most), uids 36.
pub const MAX_NAME_LEN: usize = 253;

/// The containerd state directories whose task bundles are looked at.
const CONTAINERD_TASK_DIRS: [&str; 2] = [
    "run/containerd/io.containerd.runtime.v2.task",
    "run/k3s/containerd/io.containerd.runtime.v2.task",
];

/// The containers/storage roots of CRI-O and podman (rootful).
const STORAGE_DIRS: [&str; 2] = ["run/containers/storage", "var/lib/containers/storage"];

/// Docker's per-container state.
const DOCKER_DIR: &str = "var/lib/docker/containers";

/// Why a runtime file gave no names.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path} is not the JSON expected: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {key} is not a valid name: {reason}")]
    BadValue {
        path: PathBuf,
        key: String,
        reason: &'static str,
    },
}

/// Where the names were found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A containerd task bundle, in this containerd namespace (`k8s.io`
    /// under Kubernetes).
    Containerd { namespace: String },
    /// A containers/storage bundle (CRI-O or podman).
    Storage,
    /// Docker's `config.v2.json`.
    Docker,
}

/// The names of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub source: Source,
    /// The pod's name, namespace and uid (Kubernetes only).
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub pod_uid: Option<String>,
    /// The container's name: Kubernetes's, else the runtime's own (docker,
    /// podman).
    pub container: Option<String>,
    /// The pod's sandbox ("pause") container rather than one of its
    /// containers.
    pub sandbox: bool,
}

/// The keys a runtime writes the pod and container under.
struct Keys {
    pod: &'static str,
    namespace: &'static str,
    pod_uid: &'static str,
    container: &'static str,
    container_type: &'static str,
}

/// containerd's CRI plugin
/// (<https://github.com/containerd/containerd/blob/v1.6.20/pkg/cri/annotations/annotations.go>).
const CRI_CONTAINERD: Keys = Keys {
    pod: "io.kubernetes.cri.sandbox-name",
    namespace: "io.kubernetes.cri.sandbox-namespace",
    pod_uid: "io.kubernetes.cri.sandbox-uid",
    container: "io.kubernetes.cri.container-name",
    container_type: "io.kubernetes.cri.container-type",
};

/// CRI-O (and cri-dockerd's docker labels): the kubelet's label keys
/// (<https://github.com/kubernetes/kubernetes/blob/v1.28.0/pkg/kubelet/types/labels.go>),
/// plus CRI-O's own container type; the sandbox's container name is `POD`.
const CRI_O: Keys = Keys {
    pod: "io.kubernetes.pod.name",
    namespace: "io.kubernetes.pod.namespace",
    pod_uid: "io.kubernetes.pod.uid",
    container: "io.kubernetes.container.name",
    container_type: "io.kubernetes.cri-o.ContainerType",
};

/// Finds and reads the names of container `id` under `host_root`. The
/// runtime the cgroup named, if any, is looked at first. `Ok(None)`: no
/// runtime has a bundle for it (yet, or any more).
pub fn find(
    host_root: &Path,
    id: &str,
    runtime: Option<Runtime>,
) -> Result<Option<Names>, BundleError> {
    // The id goes into paths: only a real one (64 hex digits, no `/`).
    if !is_container_id(id) {
        return Ok(None);
    }
    let order: &[Runtime] = match runtime {
        Some(Runtime::Containerd) | None => &[Runtime::Containerd, Runtime::CriO, Runtime::Docker],
        Some(Runtime::CriO | Runtime::Podman) => {
            &[Runtime::CriO, Runtime::Containerd, Runtime::Docker]
        }
        Some(Runtime::Docker) => &[Runtime::Docker, Runtime::Containerd, Runtime::CriO],
    };
    for runtime in order {
        let found = match runtime {
            Runtime::Containerd => find_containerd(host_root, id)?,
            Runtime::CriO | Runtime::Podman => find_storage(host_root, id)?,
            Runtime::Docker => find_docker(host_root, id)?,
        };
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn find_containerd(host_root: &Path, id: &str) -> Result<Option<Names>, BundleError> {
    for dir in CONTAINERD_TASK_DIRS {
        let dir = host_root.join(dir);
        let Ok(namespaces) = fs::read_dir(&dir) else {
            continue;
        };
        for ns in namespaces.flatten() {
            let config = ns.path().join(id).join("config.json");
            if !config.exists() {
                continue;
            }
            let Some(namespace) = ns.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let spec: OciSpec = read_json(&config, MAX_CONFIG_BYTES)?;
            let mut names = from_labels(&spec.annotations, &CRI_CONTAINERD, &config)?;
            names.source = Source::Containerd { namespace };
            return Ok(Some(names));
        }
    }
    Ok(None)
}

fn find_storage(host_root: &Path, id: &str) -> Result<Option<Names>, BundleError> {
    for dir in STORAGE_DIRS {
        let containers = host_root.join(dir).join("overlay-containers");
        let config = containers.join(id).join("userdata").join("config.json");
        if !config.exists() {
            continue;
        }
        let spec: OciSpec = read_json(&config, MAX_CONFIG_BYTES)?;
        let mut names = from_labels(&spec.annotations, &CRI_O, &config)?;
        names.source = Source::Storage;
        if names.container.is_none() {
            // podman outside Kubernetes: the name it lists the container by.
            let list = containers.join("containers.json");
            if list.exists() {
                let list: Vec<StorageContainer> = read_json(&list, MAX_CONTAINER_LIST_BYTES)?;
                if let Some(c) = list.into_iter().find(|c| c.id == id) {
                    names.container = c
                        .names
                        .into_iter()
                        .next()
                        .map(|n| checked(n, "names", &containers))
                        .transpose()?;
                }
            }
        }
        return Ok(Some(names));
    }
    Ok(None)
}

fn find_docker(host_root: &Path, id: &str) -> Result<Option<Names>, BundleError> {
    let config = host_root.join(DOCKER_DIR).join(id).join("config.v2.json");
    if !config.exists() {
        return Ok(None);
    }
    let state: DockerConfig = read_json(&config, MAX_CONFIG_BYTES)?;
    let mut names = from_labels(&state.config.labels, &CRI_O, &config)?;
    names.source = Source::Docker;
    if names.container.is_none() {
        // Docker writes its name with a leading `/`.
        let name = state.name.trim_start_matches('/');
        if !name.is_empty() {
            names.container = Some(checked(name.to_owned(), "Name", &config)?);
        }
    }
    Ok(Some(names))
}

/// The part of an OCI runtime spec read here.
#[derive(Deserialize)]
struct OciSpec {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// One entry of containers/storage's `containers.json`.
#[derive(Deserialize)]
struct StorageContainer {
    id: String,
    #[serde(default)]
    names: Vec<String>,
}

/// The part of docker's `config.v2.json` read here.
#[derive(Deserialize)]
struct DockerConfig {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Config", default)]
    config: DockerContainerConfig,
}

#[derive(Deserialize, Default)]
struct DockerContainerConfig {
    #[serde(rename = "Labels", default)]
    labels: BTreeMap<String, String>,
}

/// The names in a runtime's annotations or labels.
fn from_labels(
    labels: &BTreeMap<String, String>,
    keys: &Keys,
    path: &Path,
) -> Result<Names, BundleError> {
    let get = |key: &'static str| {
        labels
            .get(key)
            .map(|v| checked(v.clone(), key, path))
            .transpose()
    };
    let container_type = labels.get(keys.container_type).map(String::as_str);
    Ok(Names {
        source: Source::Storage,
        pod: get(keys.pod)?,
        namespace: get(keys.namespace)?,
        pod_uid: get(keys.pod_uid)?,
        container: get(keys.container)?,
        sandbox: container_type == Some("sandbox"),
    })
}

/// `value` if it can be shown as a name: not empty, at most
/// [`MAX_NAME_LEN`] bytes, no control characters (it ends up on a terminal
/// and in metric labels).
fn checked(value: String, key: &str, path: &Path) -> Result<String, BundleError> {
    let reason = if value.is_empty() {
        "empty"
    } else if value.len() > MAX_NAME_LEN {
        "longer than 253 bytes"
    } else if value.chars().any(char::is_control) {
        "holds a control character"
    } else {
        return Ok(value);
    };
    Err(BundleError::BadValue {
        path: path.to_owned(),
        key: key.to_owned(),
        reason,
    })
}

/// Parses the JSON file at `path`, refusing one over `max` bytes.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path, max: u64) -> Result<T, BundleError> {
    let bytes = read_bounded(path, max)?;
    // serde_json stops at 128 levels of nesting: a hostile file is an error,
    // not a stack overflow.
    serde_json::from_slice(&bytes).map_err(|source| BundleError::Json {
        path: path.to_owned(),
        source,
    })
}

/// The contents of the regular file at `path`, at most `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, BundleError> {
    let io_err = |source| BundleError::Io {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO put in a file's place must not block.
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err)?;
    if !file.metadata().map_err(io_err)?.is_file() {
        return Err(BundleError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).map_err(io_err)?;
    if bytes.len() as u64 > max {
        return Err(BundleError::TooLarge {
            path: path.to_owned(),
            max,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5f68f626d2ff4d67bbd3a38f89148d2772aa77f0df1417739d24ed7c1f202b81";
    const UID: &str = "1b2c3d4e-5f60-4718-9abc-def012345678";

    /// A host root in a fresh temporary directory.
    struct Root(tempfile::TempDir);

    impl Root {
        fn new() -> Self {
            Root(tempfile::tempdir().expect("tempdir"))
        }

        fn write(&self, rel: &str, text: &str) -> PathBuf {
            let path = self.0.path().join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, text).expect("write");
            path
        }

        fn find(&self, runtime: Option<Runtime>) -> Result<Option<Names>, BundleError> {
            find(self.0.path(), ID, runtime)
        }
    }

    fn containerd_config(ns: &str) -> String {
        format!("run/containerd/io.containerd.runtime.v2.task/{ns}/{ID}/config.json")
    }

    #[test]
    fn containerd_cri_annotations() {
        let root = Root::new();
        root.write(
            &containerd_config("k8s.io"),
            &format!(
                r#"{{"ociVersion":"1.1.0","process":{{"args":["/app"]}},"annotations":{{
                "io.kubernetes.cri.sandbox-name":"web-0","io.kubernetes.cri.sandbox-namespace":"shop",
                "io.kubernetes.cri.sandbox-uid":"{UID}","io.kubernetes.cri.container-name":"app",
                "io.kubernetes.cri.container-type":"container","io.kubernetes.cri.image-name":"x"}}}}"#
            ),
        );
        let names = root.find(None).unwrap().unwrap();
        assert_eq!(
            names,
            Names {
                source: Source::Containerd {
                    namespace: "k8s.io".into()
                },
                pod: Some("web-0".into()),
                namespace: Some("shop".into()),
                pod_uid: Some(UID.into()),
                container: Some("app".into()),
                sandbox: false,
            }
        );
    }

    #[test]
    fn containerd_sandbox_and_plain_ctr() {
        let root = Root::new();
        root.write(
            &containerd_config("k8s.io"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-name":"web-0","io.kubernetes.cri.container-type":"sandbox"}}"#,
        );
        let names = root.find(Some(Runtime::Containerd)).unwrap().unwrap();
        assert!(names.sandbox);
        assert_eq!(names.pod.as_deref(), Some("web-0"));
        assert_eq!(names.container, None);

        // `ctr run` without annotations: found, with no names.
        let root = Root::new();
        root.write(&containerd_config("default"), r#"{"ociVersion":"1.1.0"}"#);
        let names = root.find(None).unwrap().unwrap();
        assert_eq!(
            names.source,
            Source::Containerd {
                namespace: "default".into()
            }
        );
        assert_eq!((names.pod, names.container), (None, None));
    }

    #[test]
    fn k3s_state_dir() {
        let root = Root::new();
        root.write(
            &format!("run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}/config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-name":"app"}}"#,
        );
        assert_eq!(
            root.find(None).unwrap().unwrap().container.as_deref(),
            Some("app")
        );
    }

    #[test]
    fn crio_annotations() {
        for storage in STORAGE_DIRS {
            let root = Root::new();
            root.write(
                &format!("{storage}/overlay-containers/{ID}/userdata/config.json"),
                &format!(
                    r#"{{"annotations":{{"io.kubernetes.pod.name":"web-0","io.kubernetes.pod.namespace":"shop",
                    "io.kubernetes.pod.uid":"{UID}","io.kubernetes.container.name":"app",
                    "io.kubernetes.cri-o.ContainerType":"container"}}}}"#
                ),
            );
            let names = root.find(Some(Runtime::CriO)).unwrap().unwrap();
            assert_eq!(
                names,
                Names {
                    source: Source::Storage,
                    pod: Some("web-0".into()),
                    namespace: Some("shop".into()),
                    pod_uid: Some(UID.into()),
                    container: Some("app".into()),
                    sandbox: false,
                },
                "{storage}"
            );
        }
    }

    #[test]
    fn podman_name_from_its_container_list() {
        let root = Root::new();
        let storage = "var/lib/containers/storage/overlay-containers";
        root.write(
            &format!("{storage}/{ID}/userdata/config.json"),
            r#"{"annotations":{"io.container.manager":"libpod"}}"#,
        );
        root.write(
            &format!("{storage}/containers.json"),
            &format!(
                r#"[{{"id":"{}","names":["other"]}},{{"id":"{ID}","names":["redis-1"],"image":"x","layer":"y"}}]"#,
                "c".repeat(64)
            ),
        );
        let names = root.find(Some(Runtime::Podman)).unwrap().unwrap();
        assert_eq!(names.container.as_deref(), Some("redis-1"));
        assert_eq!(names.pod, None);
    }

    #[test]
    fn docker_name_and_cri_dockerd_labels() {
        let root = Root::new();
        let path = format!("{DOCKER_DIR}/{ID}/config.v2.json");
        root.write(
            &path,
            r#"{"ID":"x","Name":"/web","Config":{"Image":"nginx","Labels":{}}}"#,
        );
        let names = root.find(Some(Runtime::Docker)).unwrap().unwrap();
        assert_eq!(names.source, Source::Docker);
        assert_eq!(names.container.as_deref(), Some("web"));

        root.write(
            &path,
            r#"{"Name":"/k8s_app_web-0_shop_x_0","Config":{"Labels":{"io.kubernetes.pod.name":"web-0",
            "io.kubernetes.pod.namespace":"shop","io.kubernetes.container.name":"app"}}}"#,
        );
        let names = root.find(None).unwrap().unwrap();
        assert_eq!(names.pod.as_deref(), Some("web-0"));
        assert_eq!(names.container.as_deref(), Some("app"));
    }

    #[test]
    fn nothing_found() {
        let root = Root::new();
        assert!(root.find(None).unwrap().is_none());
        // Not an id: never joined into a path.
        root.write(
            "run/containerd/io.containerd.runtime.v2.task/k8s.io/x/config.json",
            "{}",
        );
        assert!(find(root.0.path(), "x", None).unwrap().is_none());
        assert!(find(root.0.path(), "../../../etc", None).unwrap().is_none());
    }

    #[test]
    fn hostile_files_are_errors() {
        let root = Root::new();
        let rel = containerd_config("k8s.io");
        let path = root.write(&rel, "not json");
        assert!(matches!(root.find(None), Err(BundleError::Json { .. })));

        root.write(
            &rel,
            &format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        );
        assert!(matches!(root.find(None), Err(BundleError::Json { .. })));

        root.write(
            &rel,
            r#"{"annotations":{"io.kubernetes.cri.sandbox-name":7}}"#,
        );
        assert!(matches!(root.find(None), Err(BundleError::Json { .. })));

        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_CONFIG_BYTES as usize));
        root.write(&rel, &big);
        let err = root.find(None).unwrap_err();
        assert!(matches!(err, BundleError::TooLarge { .. }), "{err}");

        for (value, reason) in [
            ("", "empty"),
            ("a\nb", "holds a control character"),
            ("\u{1b}[2J", "holds a control character"),
        ] {
            let text =
                serde_json::json!({"annotations": {"io.kubernetes.cri.sandbox-name": value}});
            root.write(&rel, &text.to_string());
            match root.find(None) {
                Err(BundleError::BadValue { key, reason: r, .. }) => {
                    assert_eq!(key, "io.kubernetes.cri.sandbox-name");
                    assert_eq!(r, reason);
                }
                other => panic!("{value:?}: {other:?}"),
            }
        }
        let long = serde_json::json!({"annotations": {"io.kubernetes.cri.container-name": "a".repeat(254)}});
        root.write(&rel, &long.to_string());
        assert!(matches!(root.find(None), Err(BundleError::BadValue { .. })));

        // A directory or a FIFO in the file's place: an error, at once.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(matches!(root.find(None), Err(BundleError::NotAFile { .. })));
        fs::remove_dir(&path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(root.find(None), Err(BundleError::NotAFile { .. })));
    }
}
