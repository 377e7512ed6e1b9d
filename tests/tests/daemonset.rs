//! fdtrace's image run by containerd exactly as the DaemonSet runs it: the
//! capabilities, seccomp profile, read-only root, host pid namespace, host
//! mounts and arguments of deploy/kubernetes/base/daemonset.yaml (read from
//! it by `daemonset_ctr_options`, so the test and the manifest cannot
//! drift apart), next to a leaking workload in a container of a pod
//! (annotated as containerd's CRI annotates one, in a kubelet-style cgroup).
//!
//! fdtrace's `/metrics`, scraped from inside its container's own network
//! namespace, must show the workload under its pod, namespace and container,
//! with the open fds /proc/PID/fd has and its leak's call site named by
//! function, file and line. The same container without CAP_SYS_PTRACE must
//! exit 1 naming the capability.
//!
//! Needs root, containerd and ctr (`apt-get install containerd`), the
//! toolchain `cargo xtask image` uses, and a cgroup v2 hierarchy. Never
//! skips: a missing part fails.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use fdtrace_tests::containers::{
    Containerd, RunSpec, daemonset_ctr_options, fdtrace_image, http_get_in_netns, random_id,
    random_pod_uid, require_root, static_binaries, write_image,
};
use xtask::kubernetes::{DAEMONSET, Fdtrace, deploy_dir};

const CRI: &str = "io.kubernetes.cri";
/// The image's entrypoint (`cargo xtask image`): `ctr run` arguments replace
/// the image's whole command line, entrypoint included.
const ENTRYPOINT: &str = "/fdtrace";
/// fds the workload opens a second while leaking.
const LEAK_PER_S: u32 = 20;
/// How long it leaks.
const LEAK_FOR: Duration = Duration::from_secs(5);
/// How long fdtrace may take to serve /healthz: it walks every process of
/// the node before its first report.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);
/// How long /metrics may take to show what /proc shows.
const AGREE_WITHIN: Duration = Duration::from_secs(20);

/// One sample of an OpenMetrics/Prometheus text exposition.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of an exposition (comments skipped); a line that does not
/// parse is an error naming it.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_sample(line).ok_or_else(|| format!("not a sample: {line:?}"))?);
    }
    Ok(out)
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, mut rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (key, r) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.to_owned(), value);
            rest = &r[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Entries of /proc/PID/fd: the ground truth.
fn proc_fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// The annotations containerd's CRI puts on a pod's container.
fn cri_annotations(
    pod: &str,
    namespace: &str,
    uid: &str,
    container: &str,
) -> Vec<(String, String)> {
    [
        ("sandbox-name", pod),
        ("sandbox-namespace", namespace),
        ("sandbox-uid", uid),
        ("container-name", container),
        ("container-type", "container"),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{CRI}.{k}"), v.to_owned()))
    .collect()
}

fn pairs(a: &[(String, String)]) -> Vec<(&str, &str)> {
    a.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The DaemonSet's container arguments, after the image's entrypoint.
fn command_line(ds: &Fdtrace) -> Vec<&str> {
    std::iter::once(ENTRYPOINT)
        .chain(ds.args.iter().map(String::as_str))
        .collect()
}

/// Starts fdtrace's container as the DaemonSet would, in a pod of its own.
fn start_fdtrace(containerd: &mut Containerd, ds: &Fdtrace, image: &str) -> String {
    let options = daemonset_ctr_options(ds, Path::new("/proc/self/ns/pid"), None).unwrap();
    let (id, uid) = (random_id(), random_pod_uid());
    let annotations = cri_annotations("fdtrace-x7k2p", "fdtrace", &uid, "fdtrace");
    containerd
        .run_logged(
            &RunSpec {
                id: &id,
                // requests below limits: a burstable pod.
                cgroup: RunSpec::kubelet_cgroup(Some("burstable"), &uid, &id),
                annotations: &pairs(&annotations),
                args: &command_line(ds),
            },
            image,
            &options,
        )
        .unwrap();
    id
}

#[test]
fn daemonset_fdtrace_names_a_pods_leak_and_needs_its_capabilities() {
    require_root().unwrap();
    let ds = Fdtrace::load(&deploy_dir().join(DAEMONSET)).unwrap();
    let port = *ds
        .ports
        .get("metrics")
        .expect("the DaemonSet names its metrics port `metrics`");

    let t0 = Instant::now();
    let bins = static_binaries().unwrap();
    let (fdtrace_archive, fdtrace) = fdtrace_image().unwrap();
    let t_build = t0.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    write_image(&bins, &archive).unwrap();
    let t1 = Instant::now();
    let mut containerd = Containerd::start().unwrap();
    containerd.import(&archive).unwrap();
    containerd.import_image(&fdtrace_archive, &fdtrace).unwrap();
    let t_setup = t1.elapsed();

    // Without CAP_SYS_PTRACE fdtrace cannot read other processes' fd
    // tables: it must refuse to start, and say why.
    let mut no_ptrace = ds.clone();
    no_ptrace.cap_add.retain(|c| c != "SYS_PTRACE");
    assert_eq!(no_ptrace.cap_add.len() + 1, ds.cap_add.len());
    let refused = start_fdtrace(&mut containerd, &no_ptrace, &fdtrace);
    let status = containerd
        .wait_exit(&refused, Duration::from_secs(30))
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "fdtrace without CAP_SYS_PTRACE still runs after 30 s:\n{}",
                containerd.output(&refused)
            )
        });
    let said = containerd.output(&refused);
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("missing capabilities: CAP_SYS_PTRACE;"),
        "fdtrace without CAP_SYS_PTRACE said:\n{said}"
    );

    // The workload: a best-effort pod's container that leaks /dev/null fds
    // once told to (`fdloop node leak` starts paused).
    let (app_id, app_uid) = (random_id(), random_pod_uid());
    let app_annotations = cri_annotations("cart-0", "shop", &app_uid, "leaker");
    let app = containerd
        .run(&RunSpec {
            id: &app_id,
            cgroup: RunSpec::kubelet_cgroup(Some("besteffort"), &app_uid, &app_id),
            annotations: &pairs(&app_annotations),
            args: &[
                "/bin/fdloop",
                "node",
                "leak",
                "leaker",
                &LEAK_PER_S.to_string(),
            ],
        })
        .unwrap();
    assert_eq!(
        app.first_line,
        "fdloop node pid=1 name=leaker active=0 opened=0 closed=0"
    );

    // fdtrace as the DaemonSet runs it, up once /healthz answers.
    let tracer = start_fdtrace(&mut containerd, &ds, &fdtrace);
    let tracer_pid = containerd.wait_running(&tracer).unwrap();
    let t2 = Instant::now();
    loop {
        if let Ok((200, _)) = http_get_in_netns(tracer_pid, port, "/healthz") {
            break;
        }
        if let Some(status) = containerd.wait_exit(&tracer, Duration::ZERO).unwrap() {
            panic!("fdtrace exited ({status}):\n{}", containerd.output(&tracer));
        }
        assert!(
            t2.elapsed() < HEALTHY_WITHIN,
            "fdtrace's /healthz did not answer 200 within {HEALTHY_WITHIN:?}:\n{}",
            containerd.output(&tracer)
        );
        thread::sleep(Duration::from_millis(250));
    }
    let t_healthy = t2.elapsed();

    // Leak for a while, then pause: the fd table is then stable.
    let line = Duration::from_secs(5);
    containerd.send(&app.id, b"x").unwrap();
    let on = containerd.next_line(&app.id, line).unwrap();
    assert!(on.contains("active=1"), "{on}");
    thread::sleep(LEAK_FOR);
    containerd.send(&app.id, b"x").unwrap();
    let off = containerd.next_line(&app.id, line).unwrap();
    let opened: u64 = off
        .split_whitespace()
        .find_map(|f| f.strip_prefix("opened="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no opened= in {off:?}"));
    assert!(off.contains("active=0") && opened > 0, "{off}");
    let want = proc_fd_count(app.host_pid);

    let pid = app.host_pid.to_string();
    let of_app = |s: &Sample, name: &str| {
        s.name == name
            && s.labels.get("pid") == Some(&pid)
            && s.labels.get("namespace").map(String::as_str) == Some("shop")
            && s.labels.get("pod").map(String::as_str) == Some("cart-0")
            && s.labels.get("container").map(String::as_str) == Some("leaker")
    };
    let t3 = Instant::now();
    loop {
        let (status, body) = http_get_in_netns(tracer_pid, port, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        let samples = parse_exposition(&body).unwrap();
        let process = samples
            .iter()
            .find(|s| of_app(s, "fdtrace_process_open_fds"));
        // The leak's site: named by function, file and line in fdloop's
        // source (its static binary has line tables), holding every fd the
        // leak opened.
        let site = samples.iter().find(|s| {
            of_app(s, "fdtrace_site_open_fds")
                && s.labels.get("resource").map(String::as_str) == Some("/dev/null")
                && s.labels
                    .get("function")
                    .is_some_and(|f| f.contains("fdloop.rs:"))
        });
        if let (Some(p), Some(s)) = (process, site)
            && p.value == want as f64
            && s.value == opened as f64
        {
            assert_eq!(p.labels.get("comm").map(String::as_str), Some("leaker"));
            assert_eq!(
                p.labels.get("container_id").map(String::as_str),
                Some(app.id.as_str())
            );
            break;
        }
        let last = body
            .lines()
            .filter(|l| l.contains(&format!("pid=\"{pid}\"")))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            t3.elapsed() < AGREE_WITHIN,
            "/metrics did not show pid {pid} (cart-0/leaker in shop) with {want} open fds \
             (/proc) and a site /dev/null at fdloop.rs holding {opened} within \
             {AGREE_WITHIN:?}; its series of that pid:\n{last}\nfdtrace said:\n{}",
            containerd.output(&tracer)
        );
        thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "daemonset: images built in {t_build:?}, containerd started and both imported in \
         {t_setup:?}, fdtrace healthy in {t_healthy:?}, /metrics agreed with /proc in {:?}",
        t3.elapsed()
    );
}

#[test]
fn exposition_lines_parse_with_escapes_and_timestamps() {
    let text = "# HELP x y\n\
                a_total 3\n\
                b{pid=\"1\",function=\"f (a\\\"b.rs:3)\"} 2.5 1700000000\n\
                c{} 0\n";
    let s = parse_exposition(text).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].name, "a_total");
    assert_eq!(s[0].value, 3.0);
    assert_eq!(s[1].labels["function"], "f (a\"b.rs:3)");
    assert_eq!(s[1].labels["pid"], "1");
    assert_eq!(s[1].value, 2.5);
    assert!(s[2].labels.is_empty());
    assert!(parse_exposition("d{pid=\"1} 2\n").is_err());
    assert!(parse_exposition("e\n").is_err());
}
