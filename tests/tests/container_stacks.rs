//! Call-site stacks of processes in containers, symbolized by an fdtrace
//! that holds exactly the DaemonSet's privileges (its capabilities, read
//! from deploy/kubernetes, as root with nothing else, no_new_privs): no
//! CAP_SYS_ADMIN, so no /proc/PID/map_files.
//!
//! Two containerd containers run `/bin/fdloop`, a path that exists only in
//! their root filesystems, and leak from it. In one it is the static fdloop
//! with line tables, in the other the same program with its debug
//! information stripped: one path, two files. Each site's stack must name
//! fdloop's own functions from its own container's file (file and line in
//! the first, none in the second), and each process's count must be
//! /proc's.
//!
//! Needs root, containerd and ctr (`apt-get install containerd`), binutils'
//! `strip`, util-linux's `setpriv` and a cgroup v2 hierarchy. Never skips: a
//! missing part fails.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use fdtrace_tests::containers::{
    Containerd, IMAGE, RunSpec, Started, random_id, random_pod_uid, require_root, static_binaries,
    write_image,
};
use fdtrace_tests::{fdtrace_bin, proc_fds};
use serde_json::Value;
use xtask::kubernetes::{DAEMONSET, Fdtrace, deploy_dir};
use xtask::oci;

/// The image whose `/bin/fdloop` has no debug information.
const STRIPPED_IMAGE: &str = "docker.io/library/fdtrace-test-stripped:1";
/// fds each leaker opens a second while leaking.
const LEAK_PER_S: u32 = 20;
/// How long they leak.
const LEAK_FOR: Duration = Duration::from_secs(2);

/// Writes an image holding `fdloop` as `/bin/fdloop`.
fn image_with_fdloop(name: &str, fdloop: &Path, out: &Path) {
    let files = [oci::File {
        path: "bin/fdloop".into(),
        source: fdloop.to_owned(),
        mode: 0o755,
    }];
    let image = oci::Image {
        name,
        files: &files,
        entrypoint: &[],
        cmd: &["/bin/fdloop"],
    };
    oci::write_archive(&image, out).unwrap();
}

/// A paused `fdloop node leak` in a container of `image`, in a pod.
fn leaker(containerd: &mut Containerd, image: &str, name: &str) -> Started {
    let (id, uid) = (random_id(), random_pod_uid());
    let started = containerd
        .run_image(
            &RunSpec {
                id: &id,
                cgroup: RunSpec::kubelet_cgroup(Some("besteffort"), &uid, &id),
                annotations: &[],
                args: &["/bin/fdloop", "node", "leak", name, &LEAK_PER_S.to_string()],
            },
            image,
        )
        .unwrap();
    assert_eq!(
        started.first_line,
        format!("fdloop node pid=1 name={name} active=0 opened=0 closed=0")
    );
    started
}

/// Toggles a leaker and returns the line it answers.
fn toggle(containerd: &mut Containerd, c: &Started) -> String {
    containerd.send(&c.id, b"x").unwrap();
    containerd.next_line(&c.id, Duration::from_secs(5)).unwrap()
}

/// setpriv's capability list (`-all,+bpf,...`) of the DaemonSet's `add`.
fn setpriv_caps(ds: &Fdtrace) -> String {
    std::iter::once("-all".to_owned())
        .chain(ds.cap_add.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",")
}

/// The last `site` record of `pid` holding fds on /dev/null.
fn leak_site(records: &[Value], pid: u32) -> &Value {
    records
        .iter()
        .rev()
        .find(|r| {
            r["type"] == "site"
                && r["pid"] == pid
                && r["resource"] == "/dev/null"
                && r["open_fds"].as_u64().is_some_and(|n| n > 0)
        })
        .unwrap_or_else(|| panic!("no site of {pid} on /dev/null"))
}

fn frames(site: &Value) -> Vec<&str> {
    site["stack"]
        .as_array()
        .unwrap_or_else(|| panic!("a stack: {site}"))
        .iter()
        .map(|f| f.as_str().expect("a frame"))
        .collect()
}

#[test]
fn container_stacks_symbolize_from_each_containers_own_files_with_the_daemonsets_caps() {
    require_root().unwrap();
    let ds = Fdtrace::load(&deploy_dir().join(DAEMONSET)).unwrap();
    assert!(
        !ds.cap_add.iter().any(|c| c == "SYS_ADMIN"),
        "{:?}",
        ds.cap_add
    );
    let bins = static_binaries().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("fdloop");
    let out = Command::new("strip")
        .arg("--strip-debug")
        .arg(bins.join("fdloop"))
        .arg("-o")
        .arg(&stripped)
        .output()
        .expect("run strip (apt-get install binutils)");
    assert!(out.status.success(), "strip: {out:?}");
    let (full_archive, stripped_archive) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
    write_image(&bins, &full_archive).unwrap();
    image_with_fdloop(STRIPPED_IMAGE, &stripped, &stripped_archive);
    let mut containerd = Containerd::start().unwrap();
    containerd.import(&full_archive).unwrap();
    containerd
        .import_image(&stripped_archive, STRIPPED_IMAGE)
        .unwrap();
    assert!(
        !Path::new("/bin/fdloop").exists(),
        "/bin/fdloop exists on the host: the test needs a path only the containers have"
    );
    let full = leaker(&mut containerd, IMAGE, "lines");
    let bare = leaker(&mut containerd, STRIPPED_IMAGE, "bare");

    // fdtrace as root holding only the DaemonSet's capabilities (bounding
    // set, so root's exec cannot regain the others), with no_new_privs as
    // allowPrivilegeEscalation: false sets it.
    let caps = setpriv_caps(&ds);
    let mut fdtrace = Command::new("setpriv")
        .args([
            "--no-new-privs",
            &format!("--inh-caps={caps}"),
            &format!("--bounding-set={caps}"),
        ])
        .arg(fdtrace_bin())
        .args(["--json", "--interval", "500ms", "--duration", "6s"])
        .args(["--pid", &full.host_pid.to_string()])
        .args(["--pid", &bare.host_pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run setpriv (util-linux)");
    let (tx, rx) = mpsc::channel();
    let stdout = fdtrace.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    // Attached once the first report is out: then leak.
    loop {
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(e) => {
                let _ = fdtrace.kill();
                let out = fdtrace.wait_with_output().unwrap();
                panic!(
                    "no report from fdtrace ({e}):\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            }
        };
        let report = line.contains(r#""type":"process""#);
        lines.push(line);
        if report {
            break;
        }
    }
    for c in [&full, &bare] {
        assert!(toggle(&mut containerd, c).contains("active=1"));
    }
    thread::sleep(LEAK_FOR);
    for c in [&full, &bare] {
        assert!(toggle(&mut containerd, c).contains("active=0"));
    }
    let want: Vec<usize> = [&full, &bare]
        .iter()
        .map(|c| proc_fds(c.host_pid as i32).unwrap().len())
        .collect();
    lines.extend(rx.iter());
    let out = fdtrace.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fdtrace: {}\n{stderr}", out.status);
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();

    for (c, want) in [&full, &bare].into_iter().zip(want) {
        let last = records
            .iter()
            .rev()
            .find(|r| r["type"] == "process" && r["pid"] == c.host_pid)
            .unwrap_or_else(|| panic!("no process record of {}", c.host_pid));
        assert_eq!(last["open_fds"], want as u64, "{last}");
    }
    // fdloop's own code, from the file in each container: with its line
    // in the first, by its name alone (the symbol table) in the second, the
    // same functions in both.
    let full_frames = frames(leak_site(&records, full.host_pid));
    assert!(
        full_frames.iter().any(|f| f.contains("(fdloop.rs:")),
        "the line-table fdloop's site names no line of fdloop.rs: {full_frames:?}\n\
         fdtrace said:\n{stderr}"
    );
    let bare_frames = frames(leak_site(&records, bare.host_pid));
    assert!(
        !bare_frames.iter().any(|f| f.contains(".rs:")),
        "the stripped fdloop's site has lines, which only the other container's file has: \
         {bare_frames:?}"
    );
    // The function's own name: DWARF names it `main`, the symbol table
    // `fdloop::main`.
    let name = |f: &&str| {
        let name = f.split(" (").next().unwrap_or(f);
        name.rsplit("::").next().unwrap_or(name).to_owned()
    };
    assert_eq!(
        full_frames.iter().map(name).collect::<Vec<_>>(),
        bare_frames.iter().map(name).collect::<Vec<_>>(),
        "the two fdloops are one program: their sites name the same functions"
    );
    assert!(
        !bare_frames.iter().any(|f| f.contains("+0x")),
        "a frame of the stripped fdloop was not symbolized: {bare_frames:?}"
    );
}
