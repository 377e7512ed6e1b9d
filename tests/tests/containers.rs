//! Who a process is, on real containers: containerd runs the test image
//! with the annotations containerd's CRI sets and kubelet-style cgroup
//! paths, and fdtrace's attribution must name each container, pod,
//! namespace and QoS class, and the pid inside the container, from the
//! host's files alone; a host process in a hand-made cgroup must be named by
//! that cgroup only.
//!
//! The same for podman's own containers, named from podman's state.
//!
//! fdtrace's own output too: each `process` record's attribution and its
//! count against /proc, the `container` record that adds up its processes
//! (the exited ones included in its totals), and a process moved to another
//! cgroup while traced.
//!
//! Needs root, containerd and ctr (`apt-get install containerd`), podman
//! and runc (`apt-get install podman runc`), and a cgroup v2 hierarchy
//! (pure or hybrid). Never skips: a missing part fails.

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use fdtrace_tests::containers::attribution::bundle::Source;
use fdtrace_tests::containers::attribution::cgroup::{Qos, Runtime};
use fdtrace_tests::containers::{
    Containerd, HandMadeCgroup, Identity, Podman, RunSpec, Started, proc_v2_path, random_id,
    random_pod_uid, require_root, static_binaries, write_image,
};
use fdtrace_tests::{Holder, proc_fds, proc_nofile, run_fdtrace};
use serde_json::{Value, json};

const CRI: &str = "io.kubernetes.cri";

/// Every NDJSON object fdtrace wrote.
fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// `fdtrace --pid P... --json` for `secs` seconds: its records.
fn fdtrace_json(pids: &[u32], secs: u32) -> Vec<Value> {
    let mut args: Vec<String> = pids
        .iter()
        .flat_map(|p| ["--pid".into(), p.to_string()])
        .collect();
    args.extend(
        [
            "--json",
            "--interval",
            "500ms",
            "--window",
            "2s",
            "--duration",
        ]
        .map(String::from),
    );
    args.push(format!("{secs}s"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let done = run_fdtrace(&args, std::time::Duration::from_secs(u64::from(secs) + 30));
    assert!(
        done.status.success(),
        "fdtrace {args:?}: {}\nstderr: {}",
        done.status,
        done.stderr
    );
    records(&done.stdout)
}

/// The last `process` record of `pid`.
fn last_process(records: &[Value], pid: u32) -> &Value {
    records
        .iter()
        .rev()
        .find(|r| r["type"] == "process" && r["pid"] == pid)
        .unwrap_or_else(|| panic!("no process record of {pid}"))
}

/// The last `container` record whose `key` is `value`.
fn last_container<'a>(records: &'a [Value], key: &str, value: &str) -> &'a Value {
    records
        .iter()
        .rev()
        .find(|r| r["type"] == "container" && r[key] == value)
        .unwrap_or_else(|| panic!("no container record with {key} {value}"))
}

/// The process record's attribution fields.
fn attribution(r: &Value) -> Value {
    let keys = [
        "cgroup",
        "container_id",
        "pod",
        "namespace",
        "container",
        "pod_uid",
        "qos",
        "pid_in_container",
    ];
    keys.iter().map(|k| (k.to_string(), r[k].clone())).collect()
}

/// The process's count is /proc's, and its container's record adds up that
/// one process: its count, its ratio to its own soft limit, its names.
fn check_counts(records: &[Value], pid: u32, group_key: &str, group: &str) {
    let p = last_process(records, pid);
    let on_proc = proc_fds(pid as i32).unwrap().len() as u64;
    assert_eq!(p["open_fds"], on_proc, "{pid}: {p}");
    assert_eq!(p["drift"], 0, "{p}");
    let c = last_container(records, group_key, group);
    assert_eq!(
        c["ts"], p["ts"],
        "the container record is of the same report"
    );
    assert_eq!(c["processes"], 1, "{c}");
    assert_eq!(c["open_fds"], on_proc, "{c}");
    let (soft, _) = proc_nofile(pid as i32).unwrap();
    let ratio = c["fd_usage_ratio"].as_f64().expect("a ratio");
    assert!((ratio - on_proc as f64 / soft as f64).abs() < 1e-4, "{c}");
    for k in [
        "cgroup",
        "container_id",
        "pod",
        "namespace",
        "container",
        "pod_uid",
        "qos",
    ] {
        assert_eq!(c[k], p[k], "{k}: {c} vs {p}");
    }
    assert_eq!(c["status"], p["status"]);
    assert_eq!(c["opened_total"], p["opened_total"]);
}

fn identify(pid: u32) -> Identity {
    fdtrace_tests::containers::identify(pid).unwrap_or_else(|e| panic!("identify {pid}: {e}"))
}

/// `fdloop hold N` in a container: it is its namespace's pid 1.
fn check_hold_line(started: &Started, n: u32) {
    assert_eq!(started.first_line, format!("fdloop hold pid=1 opened={n}"));
}

/// The annotations of container `id`'s bundle, read with no help from the
/// code under test.
fn bundle_annotations(containerd: &Containerd, id: &str) -> Value {
    let path = containerd.bundle_config(id);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec: Value = serde_json::from_str(&text).expect("config.json is JSON");
    spec["annotations"].clone()
}

#[test]
fn containerd_containers_are_attributed() {
    require_root().unwrap();
    let t0 = Instant::now();
    let bins = static_binaries().unwrap();
    let t_build = t0.elapsed();

    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    write_image(&bins, &archive).unwrap();
    let t1 = Instant::now();
    let mut containerd = Containerd::start().unwrap();
    let t_start = t1.elapsed();
    let t2 = Instant::now();
    containerd.import(&archive).unwrap();
    let t_import = t2.elapsed();

    // A best-effort pod's container, annotated as containerd's CRI does.
    let (app_id, app_uid) = (random_id(), random_pod_uid());
    let annotations = [
        (format!("{CRI}.sandbox-name"), "web-0"),
        (format!("{CRI}.sandbox-namespace"), "shop"),
        (format!("{CRI}.sandbox-uid"), app_uid.as_str()),
        (format!("{CRI}.container-name"), "app"),
        (format!("{CRI}.container-type"), "container"),
    ];
    let annotations: Vec<(&str, &str)> =
        annotations.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let t3 = Instant::now();
    let app = containerd
        .run(&RunSpec {
            id: &app_id,
            cgroup: RunSpec::kubelet_cgroup(Some("besteffort"), &app_uid, &app_id),
            annotations: &annotations,
            args: &["/bin/fdloop", "hold", "5"],
        })
        .unwrap();
    let t_run = t3.elapsed();
    eprintln!(
        "setup: static build {t_build:.1?}, containerd start {t_start:.1?}, image import {t_import:.1?}, first container {t_run:.1?}, total {:.1?}",
        t0.elapsed()
    );
    check_hold_line(&app, 5);

    // A guaranteed pod's sandbox container.
    let (pause_id, pause_uid) = (random_id(), random_pod_uid());
    let pause = containerd
        .run(&RunSpec {
            id: &pause_id,
            cgroup: RunSpec::kubelet_cgroup(None, &pause_uid, &pause_id),
            annotations: &[
                ("io.kubernetes.cri.sandbox-name", "db-0"),
                ("io.kubernetes.cri.sandbox-namespace", "store"),
                ("io.kubernetes.cri.container-type", "sandbox"),
            ],
            args: &["/bin/fdloop", "hold", "1"],
        })
        .unwrap();
    check_hold_line(&pause, 1);

    // A plain `ctr run` container: no pod, no annotations, ctr's own cgroup.
    let plain_id = random_id();
    let plain = containerd
        .run(&RunSpec {
            id: &plain_id,
            cgroup: format!("fdtrace-test/{plain_id}"),
            annotations: &[],
            args: &["/bin/fdloop", "hold", "2"],
        })
        .unwrap();
    check_hold_line(&plain, 2);

    // The host's own view first: the kubelet-style cgroup, and the
    // annotations in the bundle.
    assert_eq!(
        proc_v2_path(app.host_pid).unwrap(),
        format!("/kubepods/besteffort/pod{app_uid}/{app_id}")
    );
    assert_eq!(
        proc_v2_path(pause.host_pid).unwrap(),
        format!("/kubepods/pod{pause_uid}/{pause_id}")
    );
    assert_eq!(
        proc_v2_path(plain.host_pid).unwrap(),
        format!("/fdtrace-test/{plain_id}")
    );
    let a = bundle_annotations(&containerd, &app_id);
    for (k, v) in &annotations {
        assert_eq!(a[k], *v, "{k} in {app_id}'s config.json");
    }

    // Then what attribution makes of it.
    let id = identify(app.host_pid);
    assert_eq!(id.pid, app.host_pid);
    assert_eq!(id.pid_in_container, Some(1));
    assert_eq!(
        id.cgroup.path,
        format!("/kubepods/besteffort/pod{app_uid}/{app_id}")
    );
    assert_eq!(id.cgroup.container_id.as_deref(), Some(app_id.as_str()));
    assert_eq!(id.cgroup.pod_uid.as_deref(), Some(app_uid.as_str()));
    assert_eq!(id.cgroup.qos, Some(Qos::BestEffort));
    let names = id
        .names
        .as_ref()
        .expect("bundle read")
        .as_ref()
        .expect("bundle found");
    assert_eq!(
        names.source,
        Source::Containerd {
            namespace: "k8s.io".into()
        }
    );
    assert_eq!(names.pod.as_deref(), Some("web-0"));
    assert_eq!(names.namespace.as_deref(), Some("shop"));
    assert_eq!(names.container.as_deref(), Some("app"));
    assert_eq!(names.pod_uid.as_deref(), Some(app_uid.as_str()));
    assert!(!names.sandbox);

    let id = identify(pause.host_pid);
    assert_eq!(id.pid_in_container, Some(1));
    assert_eq!(id.cgroup.container_id.as_deref(), Some(pause_id.as_str()));
    assert_eq!(id.pod_uid(), Some(pause_uid.as_str()));
    assert_eq!(id.cgroup.qos, Some(Qos::Guaranteed));
    let names = id.names.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(
        (names.pod.as_deref(), names.namespace.as_deref()),
        (Some("db-0"), Some("store"))
    );
    assert_eq!(names.container, None);
    assert!(names.sandbox);

    let id = identify(plain.host_pid);
    assert_eq!(id.pid_in_container, Some(1));
    assert_eq!(id.cgroup.container_id.as_deref(), Some(plain_id.as_str()));
    assert_eq!((id.cgroup.pod_uid.as_deref(), id.cgroup.qos), (None, None));
    let names = id.names.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(
        names.source,
        Source::Containerd {
            namespace: "k8s.io".into()
        }
    );
    assert_eq!((&names.pod, &names.container), (&None, &None));

    // fdtrace's own output: each process's attribution, its count against
    // /proc, and its container's record.
    let out = fdtrace_json(&[app.host_pid, pause.host_pid, plain.host_pid], 3);
    assert_eq!(
        attribution(last_process(&out, app.host_pid)),
        json!({
            "cgroup": format!("/kubepods/besteffort/pod{app_uid}/{app_id}"),
            "container_id": app_id,
            "pod": "web-0",
            "namespace": "shop",
            "container": "app",
            "pod_uid": app_uid,
            "qos": "BestEffort",
            "pid_in_container": 1,
        })
    );
    assert_eq!(
        attribution(last_process(&out, pause.host_pid)),
        json!({
            "cgroup": format!("/kubepods/pod{pause_uid}/{pause_id}"),
            "container_id": pause_id,
            "pod": "db-0",
            "namespace": "store",
            "container": null,
            "pod_uid": pause_uid,
            "qos": "Guaranteed",
            "pid_in_container": 1,
        })
    );
    assert_eq!(
        attribution(last_process(&out, plain.host_pid)),
        json!({
            "cgroup": format!("/fdtrace-test/{plain_id}"),
            "container_id": plain_id,
            "pod": null,
            "namespace": null,
            "container": null,
            "pod_uid": null,
            "qos": null,
            "pid_in_container": 1,
        })
    );
    for (pid, id) in [
        (app.host_pid, &app_id),
        (pause.host_pid, &pause_id),
        (plain.host_pid, &plain_id),
    ] {
        check_counts(&out, pid, "container_id", id);
    }

    let t4 = Instant::now();
    drop(containerd);
    eprintln!("teardown {:.1?}", t4.elapsed());
    // Nothing is left: no task bundle, no pod cgroup.
    for id in [&app_id, &pause_id, &plain_id] {
        let bundle =
            std::path::Path::new("/run/containerd/io.containerd.runtime.v2.task/k8s.io").join(id);
        assert!(!bundle.exists(), "{} left behind", bundle.display());
    }
    let v2 = fdtrace_tests::containers::v2_root().unwrap();
    for uid in [&app_uid, &pause_uid] {
        assert!(!v2.join(format!("kubepods/besteffort/pod{uid}")).exists());
        assert!(!v2.join(format!("kubepods/pod{uid}")).exists());
    }
}

#[test]
fn host_processes_are_named_by_their_cgroup() {
    require_root().unwrap();
    let holder = Holder::start(env!("CARGO_BIN_EXE_fdloop"), 3);
    let pid = holder.pid();

    // A systemd-style service cgroup: named by its cgroup, nothing else.
    let unit = HandMadeCgroup::new(&format!("/system.slice/fdtrace-test-{pid}.service")).unwrap();
    unit.add(pid).unwrap();
    assert_eq!(proc_v2_path(pid).unwrap(), unit.path);
    let id = identify(pid);
    assert_eq!(id.pid, pid);
    assert_eq!(id.pid_in_container, None);
    assert_eq!(id.cgroup.path, unit.path);
    assert_eq!(id.cgroup.container_id, None);
    assert_eq!((id.cgroup.pod_uid.as_deref(), id.cgroup.qos), (None, None));
    assert!(matches!(id.names, Ok(None)));

    // A burstable pod's own cgroup (a process the kubelet put there before
    // any container): the pod and its QoS, no container.
    let uid = random_pod_uid();
    let pod = HandMadeCgroup::new(&format!("/kubepods/burstable/pod{uid}")).unwrap();
    pod.add(pid).unwrap();
    assert_eq!(proc_v2_path(pid).unwrap(), pod.path);
    let id = identify(pid);
    assert_eq!(id.cgroup.path, pod.path);
    assert_eq!(id.cgroup.pod_uid.as_deref(), Some(uid.as_str()));
    assert_eq!(id.cgroup.qos, Some(Qos::Burstable));
    assert_eq!(id.cgroup.container_id, None);
    assert!(matches!(id.names, Ok(None)));

    // fdtrace's own output: named by its cgroup, counted against /proc, and
    // followed when it is moved while traced.
    let out = fdtrace_json(&[pid], 2);
    assert_eq!(
        attribution(last_process(&out, pid)),
        json!({
            "cgroup": pod.path, "container_id": null, "pod": null, "namespace": null,
            "container": null, "pod_uid": uid, "qos": "Burstable", "pid_in_container": null,
        })
    );
    check_counts(&out, pid, "cgroup", &pod.path);
    let bin = fdtrace_tests::fdtrace_bin();
    let mut tracer = Command::new(&bin)
        .args(["--pid", &pid.to_string(), "--json", "--interval", "200ms"])
        .args(["--window", "1s", "--duration", "3s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("fdtrace");
    let mut lines = BufReader::new(tracer.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    // Moved once fdtrace has reported it in the pod's cgroup twice.
    let mut reports = 0;
    for line in lines.by_ref() {
        let r: Value = serde_json::from_str(&line.expect("fdtrace's output")).unwrap();
        reports += usize::from(r["type"] == "process");
        out.push(r);
        if reports == 2 {
            break;
        }
    }
    unit.add(pid).unwrap();
    for line in lines {
        out.push(serde_json::from_str(&line.expect("fdtrace's output")).unwrap());
    }
    let status = tracer.wait().expect("fdtrace ran");
    assert!(status.success(), "fdtrace: {status}");
    let cgroups: Vec<&Value> = out
        .iter()
        .filter(|r| r["type"] == "process")
        .map(|r| &r["cgroup"])
        .collect();
    // In the pod's cgroup first, then in the unit's, and no report back.
    let moved = cgroups
        .iter()
        .position(|c| **c == unit.path)
        .unwrap_or_else(|| panic!("never seen in {}: {cgroups:?}", unit.path));
    assert!(moved > 0, "{cgroups:?}");
    assert!(
        cgroups[..moved].iter().all(|c| **c == pod.path),
        "{cgroups:?}"
    );
    assert!(
        cgroups[moved..].iter().all(|c| **c == unit.path),
        "{cgroups:?}"
    );
    let p = last_process(&out, pid);
    assert_eq!((&p["pod_uid"], &p["qos"]), (&Value::Null, &Value::Null));
    check_counts(&out, pid, "cgroup", &unit.path);
}

#[test]
fn podman_containers_are_named_from_podman_state() {
    require_root().unwrap();
    let bins = static_binaries().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    write_image(&bins, &archive).unwrap();
    let mut podman = Podman::new().unwrap();
    podman.load(&archive).unwrap();

    // Plain podman: its own name for the container, no pod.
    let name = format!("fdtrace-test-{}", &random_id()[..12]);
    let plain = podman
        .run(&name, &[], &["/bin/fdloop", "hold", "4"])
        .unwrap();
    check_hold_line(&plain, 4);
    assert_eq!(
        proc_v2_path(plain.host_pid).unwrap(),
        format!("/libpod_parent/libpod-{}", plain.id)
    );
    let id = identify(plain.host_pid);
    assert_eq!(id.pid_in_container, Some(1));
    assert_eq!(id.cgroup.container_id.as_deref(), Some(plain.id.as_str()));
    assert_eq!(id.cgroup.runtime, Some(Runtime::Podman));
    assert_eq!((id.cgroup.pod_uid.as_deref(), id.cgroup.qos), (None, None));
    let names = id
        .names
        .as_ref()
        .expect("bundle read")
        .as_ref()
        .expect("bundle found");
    assert_eq!(names.source, Source::Storage);
    assert_eq!(names.container.as_deref(), Some(name.as_str()));
    assert_eq!((&names.pod, &names.namespace), (&None, &None));

    // With the annotations CRI-O sets: the Kubernetes names win.
    let name = format!("fdtrace-test-{}", &random_id()[..12]);
    let uid = random_pod_uid();
    let crio = podman
        .run(
            &name,
            &[
                ("io.kubernetes.pod.name", "api-7"),
                ("io.kubernetes.pod.namespace", "prod"),
                ("io.kubernetes.pod.uid", &uid),
                ("io.kubernetes.container.name", "server"),
            ],
            &["/bin/fdloop", "hold", "1"],
        )
        .unwrap();
    let id = identify(crio.host_pid);
    let names = id.names.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(names.pod.as_deref(), Some("api-7"));
    assert_eq!(names.namespace.as_deref(), Some("prod"));
    assert_eq!(names.container.as_deref(), Some("server"));
    assert_eq!(id.pod_uid(), Some(uid.as_str()));
}

#[test]
fn a_cgroups_totals_include_its_exited_processes() {
    require_root().unwrap();
    // A shell in a hand-made cgroup runs short-lived children on request.
    let mut sh = Command::new("sh")
        .args([
            "-c",
            "read x; for i in 1 2 3 4 5 6 7 8; do cat /etc/hostname >/dev/null; done; read y",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sh");
    let pid = sh.id();
    let unit = HandMadeCgroup::new(&format!("/system.slice/fdtrace-test-{pid}.service")).unwrap();
    unit.add(pid).unwrap();
    let bin = fdtrace_tests::fdtrace_bin();
    let mut tracer = Command::new(&bin)
        .args(["--pid", &pid.to_string(), "--follow", "--json"])
        .args(["--interval", "300ms", "--window", "1s", "--duration", "3s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("fdtrace");
    let mut lines = BufReader::new(tracer.stdout.take().unwrap()).lines();
    let mut out: Vec<Value> = Vec::new();
    for line in lines.by_ref() {
        out.push(serde_json::from_str(&line.expect("fdtrace's output")).unwrap());
        if out.last().unwrap()["type"] == "process" {
            break;
        }
    }
    // The children run, and the shell waits for the next line.
    let mut stdin = sh.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"go\n").unwrap();
    for line in lines {
        out.push(serde_json::from_str(&line.expect("fdtrace's output")).unwrap());
    }
    assert!(tracer.wait().expect("fdtrace ran").success());
    // The shell waits for its last line, its fds as fdtrace last saw them.
    let on_proc = proc_fds(pid as i32).unwrap().len() as u64;
    drop(stdin);
    let _ = sh.wait();

    let c = last_container(&out, "cgroup", &unit.path);
    let ts = c["ts"].as_f64().unwrap();
    let exits: Vec<&Value> = out
        .iter()
        .filter(|r| r["type"] == "exit" && r["ts"].as_f64().unwrap() <= ts)
        .collect();
    assert_eq!(exits.len(), 8, "every child exited before the last report");
    let shell = last_process(&out, pid);
    assert_eq!(shell["ts"], c["ts"]);
    assert_eq!(shell["cgroup"], unit.path.as_str());
    assert_eq!(c["processes"], 1, "{c}");
    let total = |key: &str| {
        shell[key].as_u64().unwrap() + exits.iter().map(|e| e[key].as_u64().unwrap()).sum::<u64>()
    };
    assert!(
        exits
            .iter()
            .all(|e| e["opened_total"].as_u64().unwrap() > 0)
    );
    assert_eq!(c["opened_total"], total("opened_total"), "{c}");
    assert_eq!(c["closed_total"], total("closed_total"), "{c}");
    assert_eq!(c["open_fds"], shell["open_fds"]);
    assert_eq!(shell["open_fds"], on_proc);
}

/// Attribution follows the kernel's cgroup id: a process's cgroup is read
/// from /proc at its first report and after each move, not every report.
/// fdtrace runs under strace, which lists every file it opens.
#[test]
fn a_processes_cgroup_is_read_again_only_when_it_moves() {
    require_root().unwrap();
    let holder = Holder::start(env!("CARGO_BIN_EXE_fdloop"), 3);
    let pid = holder.pid();
    let first = HandMadeCgroup::new(&format!("/fdtrace-test-{pid}-a")).unwrap();
    let second = HandMadeCgroup::new(&format!("/fdtrace-test-{pid}-b")).unwrap();
    first.add(pid).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let mut tracer = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat", "-o"])
        .arg(&log)
        .arg(fdtrace_tests::fdtrace_bin())
        .args(["--pid", &pid.to_string(), "--json", "--interval", "200ms"])
        .args(["--no-stacks", "--duration", "5s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("strace fdtrace");
    let mut out = Vec::new();
    let mut lines = BufReader::new(tracer.stdout.take().unwrap()).lines();
    // Moved after five reports in the first cgroup.
    let mut reports = 0;
    for line in lines.by_ref() {
        let r: Value = serde_json::from_str(&line.expect("fdtrace's output")).unwrap();
        reports += usize::from(r["type"] == "process");
        out.push(r);
        if reports == 5 {
            break;
        }
    }
    second.add(pid).unwrap();
    for line in lines {
        out.push(serde_json::from_str(&line.expect("fdtrace's output")).unwrap());
    }
    assert!(tracer.wait().expect("strace ran").success());
    let cgroups: Vec<&Value> = out
        .iter()
        .filter(|r| r["type"] == "process")
        .map(|r| &r["cgroup"])
        .collect();
    assert!(cgroups.len() >= 10, "{} reports", cgroups.len());
    assert_eq!(cgroups[0], first.path.as_str());
    assert_eq!(
        *cgroups.last().unwrap(),
        second.path.as_str(),
        "{cgroups:?}"
    );
    let p = last_process(&out, pid);
    assert_eq!(p["open_fds"], proc_fds(pid as i32).unwrap().len() as u64);
    let opens = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("\"/proc/{pid}/cgroup\"")))
        .count();
    assert_eq!(
        opens,
        2,
        "/proc/{pid}/cgroup read at the first report and after the move only, in {} reports",
        cgroups.len()
    );
}

/// `--pod` and `--container` name containers that start after fdtrace:
/// containerd starts them (runc moves each init into its new cgroup before
/// the exec), and fdtrace traces them from there, each attributed, each
/// count /proc's; a container no filter names is left alone.
#[test]
fn containers_started_after_fdtrace_are_selected() {
    require_root().unwrap();
    let bins = static_binaries().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    write_image(&bins, &archive).unwrap();
    let mut containerd = Containerd::start().unwrap();
    containerd.import(&archive).unwrap();

    let (pod_id, pod_uid) = (random_id(), random_pod_uid());
    let named_id = random_id();
    let (other_id, other_uid) = (random_id(), random_pod_uid());
    let bin = fdtrace_tests::fdtrace_bin();
    let mut tracer = Command::new(&bin)
        .args(["--pod", "shop/late-0", "--container", &named_id[..12]])
        .args(["--json", "--interval", "500ms", "--no-stacks", "--duration"])
        .arg("15s")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fdtrace");
    // The containers start once fdtrace has attached (its start record).
    let mut lines = BufReader::new(tracer.stdout.take().unwrap()).lines();
    let mut out: Vec<Value> = Vec::new();
    for line in lines.by_ref() {
        out.push(serde_json::from_str(&line.expect("fdtrace's output")).unwrap());
        if out.last().unwrap()["type"] == "start" {
            break;
        }
    }
    let rest = std::thread::spawn(move || {
        lines
            .map(|l| serde_json::from_str::<Value>(&l.expect("fdtrace's output")).unwrap())
            .collect::<Vec<Value>>()
    });
    let cri = |pod: &'static str, uid: &str| {
        vec![
            (format!("{CRI}.sandbox-name"), pod.to_owned()),
            (format!("{CRI}.sandbox-namespace"), "shop".to_owned()),
            (format!("{CRI}.sandbox-uid"), uid.to_owned()),
            (format!("{CRI}.container-name"), "app".to_owned()),
            (format!("{CRI}.container-type"), "container".to_owned()),
        ]
    };
    let run = |c: &mut Containerd, id: &str, uid: &str, ann: &[(String, String)], n: &str| {
        let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        c.run(&RunSpec {
            id,
            cgroup: RunSpec::kubelet_cgroup(Some("burstable"), uid, id),
            annotations: &ann,
            args: &["/bin/fdloop", "hold", n],
        })
        .unwrap()
    };
    let in_pod = run(
        &mut containerd,
        &pod_id,
        &pod_uid,
        &cri("late-0", &pod_uid),
        "6",
    );
    let named = containerd
        .run(&RunSpec {
            id: &named_id,
            cgroup: format!("fdtrace-test/{named_id}"),
            annotations: &[],
            args: &["/bin/fdloop", "hold", "8"],
        })
        .unwrap();
    let other = run(
        &mut containerd,
        &other_id,
        &other_uid,
        &cri("other-0", &other_uid),
        "2",
    );
    let want = [
        (
            in_pod.host_pid,
            proc_fds(in_pod.host_pid as i32).unwrap().len(),
        ),
        (
            named.host_pid,
            proc_fds(named.host_pid as i32).unwrap().len(),
        ),
    ];
    let done = tracer.wait_with_output().expect("fdtrace ran");
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "fdtrace: {stderr}");
    out.extend(rest.join().expect("fdtrace's output"));
    assert!(
        stderr.contains("--pod shop/late-0") && stderr.contains("yet"),
        "said that the pod is not there yet: {stderr}"
    );
    let reported: std::collections::BTreeSet<u64> = out
        .iter()
        .filter(|r| r["type"] == "process")
        .filter_map(|r| r["pid"].as_u64())
        .collect();
    let wanted = [u64::from(in_pod.host_pid), u64::from(named.host_pid)];
    assert!(
        wanted.iter().all(|p| reported.contains(p))
            && !reported.contains(&u64::from(other.host_pid)),
        "the pod's and the named container's processes, not the other's ({}): {reported:?}",
        other.host_pid
    );
    // runc's own short-lived process enters the container's cgroup before
    // the init does and may live through a report: it is the selection's
    // too, and reported as ended. Nothing else is.
    let selected = [
        format!("/kubepods/burstable/pod{pod_uid}/{pod_id}"),
        format!("/fdtrace-test/{named_id}"),
    ];
    for pid in reported.iter().filter(|p| !wanted.contains(p)) {
        let p = last_process(&out, *pid as u32);
        assert!(
            p["cgroup"]
                .as_str()
                .is_some_and(|c| selected.iter().any(|s| s == c)),
            "pid {pid} is of no selected container: {p}"
        );
        assert!(
            out.iter().any(|r| r["type"] == "exit" && r["pid"] == *pid),
            "pid {pid} of a selected container is neither its init nor ended: {p}"
        );
    }
    for (pid, n) in want {
        let p = last_process(&out, pid);
        assert_eq!(p["open_fds"], n as u64, "{p}");
        assert_eq!(p["drift"], 0, "{p}");
        assert_eq!(p["comm"], "fdloop", "{p}");
    }
    let p = last_process(&out, in_pod.host_pid);
    assert_eq!(
        attribution(p),
        json!({
            "cgroup": format!("/kubepods/burstable/pod{pod_uid}/{pod_id}"),
            "container_id": pod_id,
            "pod": "late-0",
            "namespace": "shop",
            "container": "app",
            "pod_uid": pod_uid,
            "qos": "Burstable",
            "pid_in_container": 1,
        })
    );
    assert_eq!(
        last_process(&out, named.host_pid)["container_id"],
        named_id.as_str()
    );
    drop(containerd);
}
