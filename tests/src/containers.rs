//! Real containers for the attribution tests: containerd and `ctr` (Debian's
//! packages), an image built here with no registry, and hand-made cgroups.
//!
//! - [`static_binaries`] builds the helpers (`fdloop`, `fdops`) as static
//!   executables (`-C target-feature=+crt-static`) with line tables, in
//!   their own target directory (`target/static`: with other flags for every
//!   crate, they would otherwise rebuild the release build's dependencies);
//! - [`fdtrace_image`] is `cargo xtask image`: fdtrace's own image;
//! - [`oci::write_archive`] puts them in an image with nothing else, written
//!   as an OCI archive;
//! - [`Containerd::start`] starts a containerd of its own from `containerd
//!   config default`, its content and snapshots under a temporary directory,
//!   its state (task bundles, socket) in the default `/run/containerd`, where
//!   attribution looks; the CRI plugin is off (no kubelet here), and with it
//!   CNI;
//! - [`Containerd::run`] starts a container with `ctr run --annotation ...
//!   --cgroup kubepods/<qos>/pod<uid>/<id>`, as the kubelet and containerd's
//!   CRI would;
//! - [`HandMadeCgroup`] moves a host process into a cgroup of the v2
//!   hierarchy (`/sys/fs/cgroup/unified` on a hybrid host).
//!
//! Everything started is stopped and removed on drop, also when a test
//! fails: tasks killed, containers deleted, containerd stopped, the pod
//! cgroups runc leaves behind removed.

use std::fs;
use std::io::{self, BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use xtask::oci;

/// fdtrace's container attribution, compiled in from the fdtrace crate (a
/// binary crate, so it cannot be a dependency).
#[path = "../../fdtrace/src/enrich/container/mod.rs"]
pub mod attribution;

/// Who one process is, read with fdtrace's attribution.
#[derive(Debug)]
pub struct Identity {
    /// Its pid in the host's pid namespace.
    pub pid: u32,
    /// Its pid in its own pid namespace, when that is not the host's.
    pub pid_in_container: Option<u32>,
    pub cgroup: attribution::cgroup::CgroupInfo,
    pub names: std::result::Result<
        Option<std::sync::Arc<attribution::bundle::Names>>,
        std::sync::Arc<attribution::bundle::BundleError>,
    >,
}

impl Identity {
    /// The pod uid: the cgroup's, else the bundle's.
    pub fn pod_uid(&self) -> Option<&str> {
        self.cgroup.pod_uid.as_deref().or_else(|| {
            self.names
                .as_ref()
                .ok()
                .and_then(|n| n.as_deref())
                .and_then(|n| n.pod_uid.as_deref())
        })
    }
}

/// Who process `pid` is, read under the host root `/`.
pub fn identify(pid: u32) -> std::result::Result<Identity, attribution::IdentifyError> {
    let mut a = attribution::Attributor::new("/", "/proc");
    let cgroup = a.cgroup_of(pid)?;
    let (host_pid, pid_in_container) = a.pids_of(pid)?;
    let names = match &cgroup.container_id {
        Some(id) => a.names(id, cgroup.runtime),
        None => Ok(None),
    };
    Ok(Identity {
        pid: host_pid,
        pid_in_container,
        cgroup,
        names,
    })
}

/// The containerd namespace the containers run in: Kubernetes's.
pub const NAMESPACE: &str = "k8s.io";
/// The image the containers run.
pub const IMAGE: &str = "docker.io/library/fdtrace-test:1";
/// containerd's default state directory; attribution reads the task bundles
/// there.
pub const STATE_DIR: &str = "/run/containerd";
/// How long containerd, `ctr` and a container may take to start.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Result of the harness: a failure says what failed and why.
pub type Result<T> = std::result::Result<T, String>;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

/// Fails unless the tests run as root (BPF, cgroups and containerd need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the container tests need root (run them with sudo)".into());
    }
    Ok(())
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a pure v2
/// host, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn v2_root() -> Result<PathBuf> {
    for dir in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let c = std::ffi::CString::new(dir).expect("no NUL");
        // SAFETY: statfs into a zeroed struct of the right type.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type == CGROUP2_SUPER_MAGIC {
            return Ok(dir.into());
        }
    }
    Err("no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified".into())
}

/// 64 random hex digits: a container id as the runtimes make them.
pub fn random_id() -> String {
    hex(&random_bytes::<32>())
}

/// A random pod uid (a version 4 UUID, as the API server makes them).
pub fn random_pod_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: getrandom writes at most N bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), N, 0) };
    assert_eq!(n, N as isize, "getrandom: {}", io::Error::last_os_error());
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Builds the test helpers as static executables and returns their
/// directory.
pub fn static_binaries() -> Result<PathBuf> {
    let target_dir = workspace().join("target/static");
    let triple = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "build",
            "--release",
            "-p",
            "fdtrace-tests",
            "--bin",
            "fdloop",
            "--bin",
            "fdops",
        ])
        .args(["--target", triple])
        .env("CARGO_TARGET_DIR", &target_dir)
        // With --target, RUSTFLAGS reach only the target's crates, not build
        // scripts or proc macros.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // File and line of each frame: what fdtrace names a call site by.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cargo build of the static helpers: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build of the static helpers failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target_dir.join(triple).join("release"))
}

/// Writes the test image (the static `fdloop` and `fdops` in `/bin`) to
/// `out`.
pub fn write_image(bin_dir: &Path, out: &Path) -> Result<()> {
    let files: Vec<oci::File> = ["fdloop", "fdops"]
        .iter()
        .map(|name| oci::File {
            path: Path::new("bin").join(name),
            source: bin_dir.join(name),
            mode: 0o755,
        })
        .collect();
    let image = oci::Image {
        name: IMAGE,
        files: &files,
        // A command, not an entrypoint: `ctr run` and `podman run`
        // arguments then both replace it.
        entrypoint: &[],
        cmd: &["/bin/fdloop"],
    };
    oci::write_archive(&image, out).map_err(|e| format!("writing {}: {e}", out.display()))
}

/// fdtrace's own image, as `cargo xtask image` builds it (the static
/// release fdtrace, alone, entrypoint `/fdtrace`): the archive and the
/// image's name. In the workspace's own target directory: after `cargo
/// xtask test`'s release build, which is that static binary, it only checks
/// the binary and writes the archive. (`cargo test` holds no lock on the
/// target directory while its tests run.)
pub fn fdtrace_image() -> Result<(PathBuf, String)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args(["run", "--package", "xtask", "--", "image"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cargo xtask image: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo xtask image failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let version = env!("CARGO_PKG_VERSION");
    let archive = target_dir()
        .join("image")
        .join(format!("fdtrace-{version}.oci.tar"));
    if !archive.is_file() {
        return Err(format!(
            "cargo xtask image succeeded but wrote no {}",
            archive.display()
        ));
    }
    Ok((archive, format!("docker.io/library/fdtrace:{version}")))
}

/// The workspace's target directory (`CARGO_TARGET_DIR` if set, as cargo
/// and xtask take it).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace().join(d),
        None => workspace().join("target"),
    }
}

/// A container to start.
pub struct RunSpec<'a> {
    pub id: &'a str,
    /// `ctr run --cgroup`: relative, as the kubelet passes it to the CRI.
    pub cgroup: String,
    pub annotations: &'a [(&'a str, &'a str)],
    pub args: &'a [&'a str],
}

impl RunSpec<'_> {
    /// The kubelet's cgroupfs-driver path of a container: QoS level
    /// (`besteffort`, `burstable`, or none for a guaranteed pod), pod, id.
    pub fn kubelet_cgroup(qos: Option<&str>, pod_uid: &str, id: &str) -> String {
        match qos {
            Some(q) => format!("kubepods/{q}/pod{pod_uid}/{id}"),
            None => format!("kubepods/pod{pod_uid}/{id}"),
        }
    }
}

/// A container started.
#[derive(Debug, Clone)]
pub struct Started {
    pub id: String,
    /// Its init process in the host's pid namespace.
    pub host_pid: u32,
    /// The first line it wrote.
    pub first_line: String,
}

/// The capabilities containerd gives a container by default
/// (containerd's `oci.WithDefaultSpec`): `ctr run --cap-drop ALL` is
/// refused, so "drop ALL" drops these by name.
pub const CONTAINERD_DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The `ctr run` options that run a container as the DaemonSet runs fdtrace
/// (read from deploy/kubernetes by [`xtask::kubernetes::Fdtrace`],
/// so the test and the manifest cannot drift apart): its capabilities,
/// seccomp profile (`localhost`: the file of a Localhost one), read-only
/// root, no_new_privs, the host's pid namespace (`pid_ns`, e.g.
/// `/proc/self/ns/pid`: ctr cannot join `/proc/1/ns/pid` here) and its
/// read-only host mounts. A setting ctr cannot reproduce is an error.
pub fn daemonset_ctr_options(
    ds: &xtask::kubernetes::Fdtrace,
    pid_ns: &Path,
    localhost: Option<&Path>,
) -> Result<Vec<String>> {
    let mut opts = Vec::new();
    if ds.privileged {
        return Err("the DaemonSet runs fdtrace privileged".into());
    }
    // The image names no user: ctr runs it as root, and has no option for
    // another uid.
    if ds.run_as_user != Some(0) {
        return Err(format!(
            "runAsUser {:?}: ctr runs the image as 0",
            ds.run_as_user
        ));
    }
    if ds.allow_privilege_escalation {
        opts.push("--allow-new-privs".to_owned());
    }
    if ds.read_only_root_filesystem {
        opts.push("--read-only".to_owned());
    }
    if ds.cap_drop != ["ALL"] {
        return Err(format!("drops {:?}: only [ALL] is reproduced", ds.cap_drop));
    }
    let add: Vec<String> = ds.cap_add.iter().map(|c| format!("CAP_{c}")).collect();
    for cap in CONTAINERD_DEFAULT_CAPS {
        if !add.iter().any(|a| a == cap) {
            opts.extend(["--cap-drop".to_owned(), cap.to_owned()]);
        }
    }
    for cap in add {
        opts.extend(["--cap-add".to_owned(), cap]);
    }
    match (ds.seccomp.as_str(), localhost) {
        // containerd's default profile is the one its CRI applies for
        // RuntimeDefault.
        ("RuntimeDefault", None) => opts.push("--seccomp".to_owned()),
        ("Localhost", Some(profile)) => {
            opts.push("--seccomp".to_owned());
            opts.push("--seccomp-profile".to_owned());
            opts.push(profile.display().to_string());
        }
        (kind, file) => return Err(format!("seccomp {kind} with profile file {file:?}")),
    }
    if ds.host_pid {
        opts.push("--with-ns".to_owned());
        opts.push(format!("pid:{}", pid_ns.display()));
    }
    if ds.host_network {
        opts.push("--net-host".to_owned());
    }
    for m in &ds.mounts {
        let ro = if m.read_only { ":ro" } else { "" };
        opts.push("--mount".to_owned());
        opts.push(format!(
            "type=bind,src={},dst={},options=rbind{ro}",
            m.host_path, m.mount_path
        ));
    }
    Ok(opts)
}

/// A running container's task.
struct Task {
    id: String,
    /// `ctr run`, attached to the task's stdio.
    ctr: Child,
    /// Its stdin, kept open: its end ends `fdloop hold`.
    stdin: Option<ChildStdin>,
    /// Its stdout's lines after the first.
    lines: Option<mpsc::Receiver<String>>,
}

/// One containerd at a time: it takes the default socket and state
/// directory, and the tests of one binary run on parallel threads.
static ONE_CONTAINERD: Mutex<()> = Mutex::new(());

/// A containerd of the test's own.
pub struct Containerd {
    dir: tempfile::TempDir,
    daemon: Child,
    /// Containers created, removed on drop.
    containers: Vec<String>,
    tasks: Vec<Task>,
    /// The containers' cgroups, whose parents are removed on drop.
    cgroups: Vec<String>,
    /// Images imported, removed on drop.
    images: Vec<String>,
    /// This test's turn, given back (last field, last dropped) once the
    /// daemon is stopped.
    _turn: MutexGuard<'static, ()>,
}

impl Containerd {
    /// Starts containerd; fails if one is already running on the default
    /// socket (another test, or the host's own).
    pub fn start() -> Result<Self> {
        // A test that failed while holding it poisoned it: the turn is
        // still good.
        let turn = ONE_CONTAINERD.lock().unwrap_or_else(|e| e.into_inner());
        let socket = Path::new(STATE_DIR).join("containerd.sock");
        if UnixStream::connect(&socket).is_ok() {
            return Err(format!(
                "a containerd is already running on {}: stop it first",
                socket.display()
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("fdtrace-containerd-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let default = run_tool(Command::new("containerd").args(["config", "default"]))
            .map_err(|e| format!("{e} (apt-get install containerd)"))?;
        let config = configure(&default, &dir.path().join("root"))?;
        let config_path = dir.path().join("config.toml");
        fs::write(&config_path, config).map_err(|e| format!("{}: {e}", config_path.display()))?;
        let log = fs::File::create(dir.path().join("containerd.log"))
            .map_err(|e| format!("containerd.log: {e}"))?;
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start containerd (apt-get install containerd): {e}"))?;
        let mut c = Containerd {
            dir,
            daemon,
            containers: Vec::new(),
            tasks: Vec::new(),
            cgroups: Vec::new(),
            images: Vec::new(),
            _turn: turn,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if c.ctr(&["version"]).is_ok() {
                return Ok(c);
            }
            if let Ok(Some(status)) = c.daemon.try_wait() {
                return Err(format!("containerd exited ({status}):\n{}", c.log()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "containerd did not answer within {START_TIMEOUT:?}:\n{}",
                    c.log()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr -n k8s.io ARGS` and returns its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        run_tool(Command::new("ctr").args(["-n", NAMESPACE]).args(args))
    }

    /// Imports the test image's archive and checks it is listed.
    pub fn import(&mut self, archive: &Path) -> Result<()> {
        self.import_image(archive, IMAGE)
    }

    /// Imports an image archive and checks `name` is listed.
    pub fn import_image(&mut self, archive: &Path, name: &str) -> Result<()> {
        let path = archive.to_str().ok_or("archive path is not UTF-8")?;
        self.ctr(&["images", "import", path])?;
        let images = self.ctr(&["images", "ls", "-q"])?;
        if !images.lines().any(|l| l == name) {
            return Err(format!("{name} not listed after the import: {images:?}"));
        }
        self.images.push(name.to_owned());
        Ok(())
    }

    /// Starts a container of the test image and waits for its first line.
    pub fn run(&mut self, spec: &RunSpec) -> Result<Started> {
        self.run_image(spec, IMAGE)
    }

    /// Starts a container of `image` (imported) and waits for its first
    /// line.
    pub fn run_image(&mut self, spec: &RunSpec, image: &str) -> Result<Started> {
        let log = self.log_path(spec.id);
        let stderr = fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut ctr = self.spawn(spec, image, &[], Stdio::piped(), stderr.into())?;
        let stdin = ctr.stdin.take();
        let (first_line, lines) = first_line(&mut ctr, START_TIMEOUT).map_err(|e| {
            let said = fs::read_to_string(&log).unwrap_or_default();
            format!("container {}: {e}; ctr said:\n{said}", spec.id)
        })?;
        self.tasks.push(Task {
            id: spec.id.to_owned(),
            ctr,
            stdin,
            lines: Some(lines),
        });
        Ok(Started {
            id: spec.id.to_owned(),
            host_pid: self.host_pid(spec.id)?,
            first_line,
        })
    }

    /// Starts a container of `image` with more `ctr run` options, its
    /// stdout and stderr (with ctr's own) to [`Containerd::output`], and
    /// returns at once: [`Containerd::wait_running`] and
    /// [`Containerd::wait_exit`] follow it.
    pub fn run_logged(&mut self, spec: &RunSpec, image: &str, options: &[String]) -> Result<()> {
        let log = fs::File::create(self.log_path(spec.id)).map_err(|e| e.to_string())?;
        let out = log.try_clone().map_err(|e| e.to_string())?;
        let ctr = self.spawn(spec, image, options, out.into(), log.into())?;
        self.tasks.push(Task {
            id: spec.id.to_owned(),
            ctr,
            stdin: None,
            lines: None,
        });
        Ok(())
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("ctr-{id}.log"))
    }

    /// What container `id` (and ctr) wrote so far, of one started by
    /// [`Containerd::run_logged`].
    pub fn output(&self, id: &str) -> String {
        fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    fn spawn(
        &mut self,
        spec: &RunSpec,
        image: &str,
        options: &[String],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<Child> {
        let mut cmd = Command::new("ctr");
        cmd.args(["-n", NAMESPACE, "run", "--cgroup", &spec.cgroup]);
        for (k, v) in spec.annotations {
            cmd.arg("--annotation").arg(format!("{k}={v}"));
        }
        cmd.args(options).args([image, spec.id]).args(spec.args);
        // Recorded before it exists: a failed start is cleaned up too.
        self.containers.push(spec.id.to_owned());
        self.cgroups.push(spec.cgroup.clone());
        cmd.stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("ctr run: {e}"))
    }

    /// Writes `bytes` to the stdin of container `id`'s process.
    pub fn send(&mut self, id: &str, bytes: &[u8]) -> Result<()> {
        let task = self
            .tasks
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| format!("no task {id} started"))?;
        let stdin = task.stdin.as_mut().ok_or("its stdin is not kept")?;
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing to {id}: {e}"))
    }

    /// The next line container `id` writes on its stdout, within `timeout`.
    pub fn next_line(&mut self, id: &str, timeout: Duration) -> Result<String> {
        let task = self
            .tasks
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| format!("no task {id} started"))?;
        let lines = task.lines.as_ref().ok_or("its stdout is not read")?;
        lines
            .recv_timeout(timeout)
            .map_err(|e| format!("no line from {id} within {timeout:?} ({e})"))
    }

    /// The host pid of container `id`'s process once its task runs, within
    /// [`START_TIMEOUT`]; an error with its output if it ended first.
    pub fn wait_running(&mut self, id: &str) -> Result<u32> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(pid) = self.host_pid(id)
                && pid != 0
            {
                return Ok(pid);
            }
            if let Some(status) = self.exited(id)? {
                return Err(format!(
                    "container {id} ended ({status}) before running:\n{}",
                    self.output(id)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "container {id} not running within {START_TIMEOUT:?}:\n{}",
                    self.output(id)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// How `ctr run` of container `id` ended (it exits with its task's
    /// status), if it has within `timeout`.
    pub fn wait_exit(&mut self, id: &str, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited(id)? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn exited(&mut self, id: &str) -> Result<Option<ExitStatus>> {
        let task = self
            .tasks
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| format!("no task {id} started"))?;
        task.ctr
            .try_wait()
            .map_err(|e| format!("ctr run {id}: {e}"))
    }

    /// The host pid of a task's init, from `ctr task ls`.
    pub fn host_pid(&self, id: &str) -> Result<u32> {
        let list = self.ctr(&["task", "ls"])?;
        list.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id)).then(|| f.next()?.parse().ok())?
            })
            .ok_or_else(|| format!("task {id} not in `ctr task ls`:\n{list}"))
    }

    /// The bundle's `config.json` of container `id`.
    pub fn bundle_config(&self, id: &str) -> PathBuf {
        Path::new(STATE_DIR)
            .join("io.containerd.runtime.v2.task")
            .join(NAMESPACE)
            .join(id)
            .join("config.json")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in &self.containers {
            // Errors are expected for what never started; nothing else can
            // be done about the others than to go on.
            let _ = self.ctr(&["task", "kill", "-s", "KILL", id]);
            let _ = self.ctr(&["task", "delete", "--force", id]);
            let _ = self.ctr(&["container", "delete", id]);
        }
        for task in &mut self.tasks {
            drop(task.stdin.take());
            let _ = task.ctr.kill();
            let _ = task.ctr.wait();
        }
        for image in &self.images {
            let _ = self.ctr(&["images", "rm", image]);
        }
        stop(&mut self.daemon);
        for cgroup in &self.cgroups {
            remove_cgroup_parents(cgroup);
        }
    }
}

/// SIGTERM, then SIGKILL after 5 s.
fn stop(child: &mut Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// containerd's default configuration with its content and snapshots under
/// `root` and the CRI plugin off.
fn configure(default: &str, root: &Path) -> Result<String> {
    let mut root_set = false;
    let mut cri_off = false;
    let lines: Vec<String> = default
        .lines()
        .map(|l| {
            if l.starts_with("root = ") {
                root_set = true;
                format!("root = {:?}", root.display().to_string())
            } else if l.starts_with("disabled_plugins = ") {
                cri_off = true;
                r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !root_set || !cri_off {
        return Err(format!(
            "`containerd config default` has no top-level `root =` or `disabled_plugins =` line:\n{default}"
        ));
    }
    Ok(lines.join("\n") + "\n")
}

/// Removes the parents of a container's cgroup (`kubepods/<qos>/pod<uid>`
/// of `kubepods/<qos>/pod<uid>/<id>`) in every hierarchy: runc removes only
/// the container's own. Those still in use (another pod's) stay.
fn remove_cgroup_parents(cgroup: &str) {
    let Some((parents, _id)) = cgroup.trim_matches('/').rsplit_once('/') else {
        return;
    };
    let parents = Path::new(parents);
    let depth = parents.components().count();
    let mut found = Vec::new();
    // v1 hierarchies place it under the runtime's own cgroup (here, memory
    // under the sandbox's): look below each hierarchy's root too.
    find_dirs(Path::new("/sys/fs/cgroup"), parents, 8, &mut found);
    for dir in found {
        for d in dir.ancestors().take(depth) {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Directories below `dir` (down to `depth` levels) whose path ends with
/// `tail`.
fn find_dirs(dir: &Path, tail: &Path, depth: u32, found: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if !t.is_dir() {
            continue;
        }
        let path = e.path();
        if path.ends_with(tail) {
            found.push(path);
        } else if depth > 0 {
            find_dirs(&path, tail, depth - 1, found);
        }
    }
}

/// Runs a tool and returns its stdout, or an error with its stderr.
fn run_tool(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{cmd:?}: output not UTF-8: {e}"))
}

/// A cgroup made by hand in the v2 hierarchy, with processes moved in; on
/// drop its processes go back to the root cgroup and the directories made
/// are removed.
pub struct HandMadeCgroup {
    root: PathBuf,
    /// The path, as `/proc/PID/cgroup` shows it.
    pub path: String,
    /// Directories made, deepest last.
    made: Vec<PathBuf>,
}

impl HandMadeCgroup {
    /// Makes cgroup `path` (absolute, as in `/proc/PID/cgroup`).
    pub fn new(path: &str) -> Result<Self> {
        let root = v2_root()?;
        let mut made = Vec::new();
        let mut dir = root.clone();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(c);
            match fs::create_dir(&dir) {
                Ok(()) => made.push(dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("mkdir {}: {e}", dir.display())),
            }
        }
        Ok(HandMadeCgroup {
            root,
            path: path.to_owned(),
            made,
        })
    }

    /// Moves process `pid` in.
    pub fn add(&self, pid: u32) -> Result<()> {
        let procs = self
            .root
            .join(self.path.trim_start_matches('/'))
            .join("cgroup.procs");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|e| format!("{}: {e}", procs.display()))?;
        f.write_all(pid.to_string().as_bytes())
            .map_err(|e| format!("moving {pid} to {}: {e}", procs.display()))
    }
}

impl Drop for HandMadeCgroup {
    fn drop(&mut self) {
        let procs = self
            .root
            .join(self.path.trim_start_matches('/'))
            .join("cgroup.procs");
        if let Ok(text) = fs::read_to_string(&procs) {
            for pid in text.lines() {
                let _ = fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        for dir in self.made.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The v2 path of a process, from the `0::` line of its /proc/PID/cgroup
/// (read here with no help from the code under test).
pub fn proc_v2_path(pid: u32) -> Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| format!("/proc/{pid}/cgroup has no 0:: line:\n{text}"))
}

/// podman (Debian's, with runc: crun refuses hybrid cgroups) with a
/// `containers.conf` of the test's own (`CONTAINERS_CONF`): runc, the
/// cgroupfs manager (no systemd here), file events, and fd limits root may
/// set here. Its storage is the default one
/// (`/var/lib/containers/storage`), where attribution looks.
pub struct Podman {
    dir: tempfile::TempDir,
    /// Containers created (by name), removed on drop.
    names: Vec<String>,
    runs: Vec<Task>,
}

/// The `containers.conf` the tests run podman with.
const CONTAINERS_CONF: &str = r#"[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
"#;

impl Podman {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fdtrace-podman-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let conf = dir.path().join("containers.conf");
        fs::write(&conf, CONTAINERS_CONF).map_err(|e| format!("{}: {e}", conf.display()))?;
        let podman = Podman {
            dir,
            names: Vec::new(),
            runs: Vec::new(),
        };
        podman
            .podman(&["--version"])
            .map_err(|e| format!("{e} (apt-get install podman runc)"))?;
        Ok(podman)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"));
        cmd
    }

    /// Runs `podman ARGS` and returns its stdout.
    pub fn podman(&self, args: &[&str]) -> Result<String> {
        run_tool(self.command().args(args))
    }

    /// Loads an image archive and checks it is listed.
    pub fn load(&self, archive: &Path) -> Result<()> {
        let path = archive.to_str().ok_or("archive path is not UTF-8")?;
        self.podman(&["load", "-i", path])?;
        self.podman(&["image", "exists", IMAGE])
            .map(drop)
            .map_err(|e| format!("{IMAGE} not there after the load: {e}"))
    }

    /// Starts container `name` of the test image and waits for its first
    /// line; returns its id and host pid.
    pub fn run(
        &mut self,
        name: &str,
        annotations: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Started> {
        let mut cmd = self.command();
        cmd.args(["run", "-i", "--name", name]);
        for (k, v) in annotations {
            cmd.arg("--annotation").arg(format!("{k}={v}"));
        }
        cmd.arg(IMAGE).args(args);
        let log = self.dir.path().join(format!("run-{name}.log"));
        let stderr = fs::File::create(&log).map_err(|e| e.to_string())?;
        self.names.push(name.to_owned());
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("podman run: {e}"))?;
        let stdin = child.stdin.take();
        let (first_line, lines) = first_line(&mut child, START_TIMEOUT).map_err(|e| {
            format!(
                "container {name}: {e}; podman said:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        self.runs.push(Task {
            id: name.to_owned(),
            ctr: child,
            stdin,
            lines: Some(lines),
        });
        let inspect = self.podman(&["inspect", "-f", "{{.Id}} {{.State.Pid}}", name])?;
        let (id, pid) = inspect
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("podman inspect: {inspect:?}"))?;
        Ok(Started {
            id: id.to_owned(),
            host_pid: pid
                .parse()
                .map_err(|e| format!("podman inspect pid {pid:?}: {e}"))?,
            first_line,
        })
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self.podman(&["rm", "-f", "-t", "0", name]);
        }
        for run in &mut self.runs {
            drop(run.stdin.take());
            let _ = run.ctr.kill();
            let _ = run.ctr.wait();
        }
        let _ = self.podman(&["rmi", "-f", IMAGE]);
    }
}

/// `GET http://127.0.0.1:PORT/PATH` from inside the network namespace of
/// process `pid` (a container's: ctr gives each one of its own, with only
/// loopback): the status and the body. The request is made by a thread that
/// joins that namespace (setns affects the calling thread only) and ends.
pub fn http_get_in_netns(pid: u32, port: u16, path: &str) -> Result<(u16, String)> {
    let ns = format!("/proc/{pid}/ns/net");
    let url = format!("http://127.0.0.1:{port}{path}");
    thread::spawn(move || -> Result<(u16, String)> {
        let file = fs::File::open(&ns).map_err(|e| format!("{ns}: {e}"))?;
        // SAFETY: setns on an fd of a network namespace, for this thread.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {ns}: {}", io::Error::last_os_error()));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut resp = agent
            .get(&url)
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("GET {url}: body: {e}"))?;
        Ok((status, body))
    })
    .join()
    .map_err(|_| "the scraping thread panicked".to_owned())?
}

/// The lines a child writes on its stdout (piped), read by a thread until
/// its end: the pipe stays drained, so the child never blocks on it nor
/// fails to write.
fn stdout_lines(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let stdout = child.stdout.take().ok_or("stdout not piped")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// The first line a child writes on its stdout (piped), within `timeout`,
/// and the following ones; the child is killed if it writes none.
fn first_line(child: &mut Child, timeout: Duration) -> Result<(String, mpsc::Receiver<String>)> {
    let lines = stdout_lines(child)?;
    match lines.recv_timeout(timeout) {
        Ok(line) => Ok((line, lines)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("no line on stdout ({e})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xtask::kubernetes::{DAEMONSET, Fdtrace, deploy_dir};

    fn shipped() -> Fdtrace {
        Fdtrace::load(&deploy_dir().join(DAEMONSET)).unwrap()
    }

    /// The option following `name` each time it appears.
    fn values<'a>(opts: &'a [String], name: &str) -> Vec<&'a str> {
        opts.windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn ctr_options_of_the_shipped_daemonset() {
        let opts = daemonset_ctr_options(&shipped(), Path::new("/proc/7/ns/pid"), None).unwrap();
        assert_eq!(
            values(&opts, "--cap-add"),
            [
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_SYS_PTRACE",
                "CAP_DAC_READ_SEARCH"
            ]
        );
        // Every default capability dropped: with the four added, the
        // container's set is exactly those four.
        assert_eq!(values(&opts, "--cap-drop"), CONTAINERD_DEFAULT_CAPS);
        assert_eq!(values(&opts, "--with-ns"), ["pid:/proc/7/ns/pid"]);
        assert_eq!(
            values(&opts, "--mount"),
            [
                "type=bind,src=/sys/fs/cgroup,dst=/host/sys/fs/cgroup,options=rbind:ro",
                "type=bind,src=/run/containerd/io.containerd.runtime.v2.task,\
                 dst=/host/run/containerd/io.containerd.runtime.v2.task,options=rbind:ro",
            ]
        );
        for flag in ["--read-only", "--seccomp"] {
            assert!(opts.iter().any(|o| o == flag), "{flag} not in {opts:?}");
        }
        for flag in [
            "--allow-new-privs",
            "--net-host",
            "--privileged",
            "--seccomp-profile",
        ] {
            assert!(!opts.iter().any(|o| o == flag), "{flag} in {opts:?}");
        }
    }

    #[test]
    fn settings_ctr_cannot_reproduce_are_errors() {
        let ns = Path::new("/proc/self/ns/pid");
        let mut ds = shipped();
        ds.run_as_user = Some(1000);
        assert!(daemonset_ctr_options(&ds, ns, None).is_err());
        let mut ds = shipped();
        ds.cap_drop = vec!["NET_RAW".into()];
        assert!(daemonset_ctr_options(&ds, ns, None).is_err());
        let mut ds = shipped();
        ds.seccomp = "Localhost".into();
        assert!(
            daemonset_ctr_options(&ds, ns, None).is_err(),
            "no profile file"
        );
        let opts = daemonset_ctr_options(&ds, ns, Some(Path::new("/p.json"))).unwrap();
        assert_eq!(values(&opts, "--seccomp-profile"), ["/p.json"]);
        let mut ds = shipped();
        ds.privileged = true;
        assert!(daemonset_ctr_options(&ds, ns, None).is_err());
        let mut ds = shipped();
        ds.read_only_root_filesystem = false;
        ds.allow_privilege_escalation = true;
        let opts = daemonset_ctr_options(&ds, ns, None).unwrap();
        assert!(!opts.iter().any(|o| o == "--read-only"));
        assert!(opts.iter().any(|o| o == "--allow-new-privs"));
    }
}
