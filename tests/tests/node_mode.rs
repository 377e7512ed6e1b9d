//! Node mode: `fdtrace --all` traces every process of the host exactly, and
//! `--cgroup` / `--container` select theirs. Needs root, cgroup v2 (as on
//! this hybrid host, at /sys/fs/cgroup/unified) and a built fdtrace.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use fdtrace_tests::Holder;
use fdtrace_tests::containers::{HandMadeCgroup, random_id};

const FDLOOP: &str = env!("CARGO_BIN_EXE_fdloop");
use serde_json::Value;

fn proc_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

fn is_kernel_thread(pid: u64) -> bool {
    // The flags are the 9th field after the `(comm)`, which may hold spaces.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.split(' ').nth(6)?.parse::<u32>().ok()
        })
        .is_some_and(|f| f & 0x0020_0000 != 0)
}

/// Starts fdtrace with `args` (NDJSON, reports every 500 ms).
fn fdtrace(args: &[&str]) -> Child {
    Command::new(fdtrace_tests::fdtrace_bin())
        .args(["--json", "--interval", "500ms", "--no-stacks"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fdtrace")
}

/// Waits for fdtrace to end; its NDJSON objects.
fn objects(ft: Child) -> Vec<Value> {
    let out = ft.wait_with_output().expect("fdtrace output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fdtrace failed: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// fdtrace's output as a reader thread reads it (so that fdtrace never
/// blocks on a full pipe), with the lines received so far.
struct Started {
    lines: Vec<String>,
    rest: mpsc::Receiver<String>,
}

/// Reads fdtrace's output until its `start` object. fdtrace writes it once
/// its programs are attached and every selected process is registered and
/// seeded: a process forked from then on is traced from its fork. Loading
/// the programs (the verifier) takes a second or more on a loaded machine,
/// and a process that starts and ends before the attach is never seen.
fn wait_started(ft: &mut Child) -> Started {
    let out = BufReader::new(ft.stdout.take().expect("fdtrace stdout"));
    let (tx, rest) = mpsc::channel();
    thread::spawn(move || {
        for line in out.lines() {
            if tx.send(line.expect("read fdtrace output")).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rest
            .recv()
            .unwrap_or_else(|_| panic!("fdtrace ended before its start object: {lines:?}"));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        lines.push(line);
        if v["type"] == "start" {
            return Started { lines, rest };
        }
    }
}

/// Waits for fdtrace to end; its NDJSON objects, those read before too.
fn objects_after(ft: Child, started: Started) -> Vec<Value> {
    let Started { mut lines, rest } = started;
    // Until the reader thread reaches the end of fdtrace's output.
    lines.extend(rest);
    let out = ft.wait_with_output().expect("fdtrace output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fdtrace failed: {stderr}");
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `process` objects of each report, by report time, by pid.
fn reports(objs: &[Value]) -> BTreeMap<u64, BTreeMap<u64, Value>> {
    let mut out: BTreeMap<u64, BTreeMap<u64, Value>> = BTreeMap::new();
    for o in objs.iter().filter(|o| o["type"] == "process") {
        let ts = (o["ts"].as_f64().expect("ts") * 1000.0) as u64;
        out.entry(ts)
            .or_default()
            .insert(o["pid"].as_u64().expect("pid"), o.clone());
    }
    out
}

/// The last report's object of `pid`.
fn last_of(reps: &BTreeMap<u64, BTreeMap<u64, Value>>, pid: u32) -> Value {
    reps.values()
        .rev()
        .find_map(|r| r.get(&u64::from(pid)).cloned())
        .unwrap_or_else(|| panic!("pid {pid} in no report"))
}

/// Drift is 0 or null in each report and never non-zero two reports
/// running, for every traced process.
fn drift_never_twice(reps: &BTreeMap<u64, BTreeMap<u64, Value>>) {
    let mut last_bad: BTreeMap<u64, bool> = BTreeMap::new();
    for r in reps.values() {
        for (&pid, o) in r {
            // pid 1 of this sandbox: the kernel's task_file walk finds
            // none of its fds (a known bug, not node mode's), so every
            // report resyncs it.
            if pid == 1 {
                continue;
            }
            let bad = o["drift"].as_i64().is_some_and(|d| d != 0);
            if bad && last_bad.get(&pid) == Some(&true) {
                panic!("pid {pid} drifted two reports running: {o}");
            }
            last_bad.insert(pid, bad);
        }
    }
}

#[test]
fn all_traces_every_process_exactly() {
    fdtrace_tests::require_root();
    let before = Holder::start(FDLOOP, 20);
    let moved = Holder::start(FDLOOP, 7);
    let cg = HandMadeCgroup::new(&format!("/fdtrace-node-{}", &random_id()[..12]))
        .expect("hand-made cgroup");
    let host_before = host_pids();
    let mut ft = fdtrace(&["--all", "--duration", "5s"]);
    let me = ft.id();
    let started = wait_started(&mut ft);
    let after = Holder::start(FDLOOP, 30);
    cg.add(moved.pid()).expect("move into the hand-made cgroup");
    let short = Command::new("/bin/true").status().expect("run /bin/true");
    assert!(short.success());
    thread::sleep(Duration::from_millis(1500));
    let expected: Vec<(u32, usize)> = [&before, &moved, &after]
        .iter()
        .map(|h| (h.pid(), proc_count(h.pid())))
        .collect();
    let objs = objects_after(ft, started);
    // After fdtrace's end: a process alive before it started and after it
    // ended was alive at its last report.
    let host_after = host_pids();
    let reps = reports(&objs);
    assert!(reps.len() >= 5, "{} reports", reps.len());
    for (pid, want) in expected {
        let o = last_of(&reps, pid);
        assert_eq!(o["open_fds"].as_u64(), Some(want as u64), "pid {pid}: {o}");
        assert_eq!(o["drift"].as_i64(), Some(0), "pid {pid}: {o}");
    }
    // The short-lived process: forked by a traced parent, exited.
    assert!(
        objs.iter()
            .any(|o| o["type"] == "exit" && o["comm"] == "true"),
        "no exit of /bin/true"
    );
    drift_never_twice(&reps);
    let mut pids = BTreeSet::new();
    for o in &objs {
        if let Some(pid) = o["pid"].as_u64() {
            pids.insert(pid);
        }
    }
    assert!(!pids.contains(&u64::from(me)), "fdtrace traced itself");
    assert!(!pids.contains(&2), "kthreadd reported");
    for &pid in &pids {
        assert!(!is_kernel_thread(pid), "kernel thread {pid} reported");
    }
    // Every live non-kernel process of the host is in the last report.
    let last = reps.values().next_back().expect("a report");
    let missing: Vec<String> = host_before
        .intersection(&host_after)
        .filter(|&&(pid, _)| pid != me && !last.contains_key(&u64::from(pid)))
        .map(|&(pid, start)| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let seen = objs.iter().filter(|o| o["pid"] == pid).count();
            format!("{pid} ({}) started {start}, {seen} objects", comm.trim())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "processes alive all along but not in the last report: {missing:?}"
    );
}

/// The host's processes now, kernel threads left out, each as (pid, start
/// time): pids wrap within seconds on a busy host, and a pid seen before
/// and after may be two processes.
fn host_pids() -> BTreeSet<(u32, u64)> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| !is_kernel_thread(u64::from(pid)))
        .filter_map(|pid| Some((pid, start_time(pid)?)))
        .collect()
}

/// Field 22 of /proc/PID/stat (after the parenthesised comm, which may
/// hold spaces): clock ticks since boot; None once the process is gone.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[test]
fn cgroup_selects_its_processes_now_and_later() {
    fdtrace_tests::require_root();
    let cg = HandMadeCgroup::new(&format!("/fdtrace-node-{}", &random_id()[..12]))
        .expect("hand-made cgroup");
    let inside = Holder::start(FDLOOP, 11);
    cg.add(inside.pid()).expect("move in");
    let outside = Holder::start(FDLOOP, 13);
    let ft = fdtrace(&["--cgroup", &cg.path, "--duration", "4s"]);
    thread::sleep(Duration::from_millis(1500));
    let later = Holder::start(FDLOOP, 17);
    cg.add(later.pid()).expect("move in later");
    thread::sleep(Duration::from_millis(1500));
    let want = [
        (inside.pid(), proc_count(inside.pid())),
        (later.pid(), proc_count(later.pid())),
    ];
    let objs = objects(ft);
    let reps = reports(&objs);
    let reported: BTreeSet<u64> = reps.values().flat_map(|r| r.keys().copied()).collect();
    assert_eq!(
        reported,
        BTreeSet::from([u64::from(inside.pid()), u64::from(later.pid())]),
        "exactly the cgroup's processes (outside: {})",
        outside.pid()
    );
    for (pid, n) in want {
        let o = last_of(&reps, pid);
        assert_eq!(o["open_fds"].as_u64(), Some(n as u64), "pid {pid}: {o}");
        assert_eq!(o["drift"].as_i64(), Some(0), "pid {pid}: {o}");
    }
    drift_never_twice(&reps);
}

#[test]
fn ambiguous_container_prefix_exits_2() {
    fdtrace_tests::require_root();
    // Two docker-shaped cgroups whose ids share a prefix, a process in each.
    let common = "feedfacefeedface";
    let ids: Vec<String> = (0..2)
        .map(|i| format!("{common}{i}{}", &random_id()[..47]))
        .collect();
    let mut holders = Vec::new();
    let mut cgs = Vec::new();
    for id in &ids {
        assert_eq!(id.len(), 64);
        let cg = HandMadeCgroup::new(&format!("/docker/{id}")).expect("cgroup");
        let h = Holder::start(FDLOOP, 1);
        cg.add(h.pid()).expect("move in");
        holders.push(h);
        cgs.push(cg);
    }
    let out = Command::new(fdtrace_tests::fdtrace_bin())
        .args(["--container", common, "--duration", "1s"])
        .output()
        .expect("run fdtrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ambiguous") && ids.iter().all(|id| stderr.contains(id.as_str())),
        "{stderr}"
    );
    // A unique prefix selects its container's process.
    let ft = fdtrace(&["--container", &ids[1][..20], "--duration", "2s"]);
    let objs = objects(ft);
    let reported: BTreeSet<u64> = reports(&objs)
        .values()
        .flat_map(|r| r.keys().copied())
        .collect();
    assert_eq!(reported, BTreeSet::from([u64::from(holders[1].pid())]));
}

/// fdtrace running, its stdout read as it comes.
struct Live {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: thread::JoinHandle<()>,
    seen: Vec<Value>,
}

impl Live {
    /// fdtrace with `args`, once it has attached (its `start` object is
    /// written then): loading takes seconds on a busy machine.
    fn start(args: &[&str]) -> Live {
        let mut child = fdtrace(args);
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut live = Live {
            child,
            lines,
            reader,
            seen: Vec::new(),
        };
        live.wait_for(|o| o["type"] == "start");
        live
    }

    /// Reads objects until one `ok` accepts.
    fn wait_for(&mut self, ok: impl Fn(&Value) -> bool) {
        loop {
            let l = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .expect("fdtrace wrote nothing for a minute");
            let o: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let done = ok(&o);
            self.seen.push(o);
            if done {
                return;
            }
        }
    }

    /// Waits for fdtrace to end: every object, and its stderr.
    fn finish(mut self) -> (Vec<Value>, String) {
        let status = self.child.wait().expect("fdtrace ran");
        self.reader.join().expect("reader");
        let mut stderr = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().expect("stderr"), &mut stderr)
            .expect("fdtrace's stderr");
        assert!(status.success(), "fdtrace failed: {stderr}");
        for l in self.lines.try_iter() {
            self.seen
                .push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")));
        }
        (self.seen, stderr)
    }
}

/// The ts of each `process` object of `pid`.
fn report_times(objs: &[Value], pid: u32) -> Vec<f64> {
    objs.iter()
        .filter(|o| o["type"] == "process" && o["pid"] == pid)
        .map(|o| o["ts"].as_f64().expect("ts"))
        .collect()
}

#[test]
fn a_process_moved_out_of_the_selection_is_no_longer_traced() {
    fdtrace_tests::require_root();
    let tag = &random_id()[..12];
    let cg = HandMadeCgroup::new(&format!("/fdtrace-sel-{tag}")).expect("selected cgroup");
    let elsewhere = HandMadeCgroup::new(&format!("/fdtrace-other-{tag}")).expect("other cgroup");
    let leaver = Holder::start(FDLOOP, 11);
    cg.add(leaver.pid()).expect("move in");
    let comer = Holder::start(FDLOOP, 13);
    elsewhere.add(comer.pid()).expect("move elsewhere");
    let mut ft = Live::start(&["--cgroup", &cg.path, "--duration", "6s"]);
    // Reported in the selection first.
    let leaver_pid = leaver.pid();
    ft.wait_for(|o| o["type"] == "process" && o["pid"] == leaver_pid);
    // Out of the selection, and another process into it.
    elsewhere.add(leaver.pid()).expect("move out");
    let left_at = sinks_now();
    cg.add(comer.pid()).expect("move in");
    thread::sleep(Duration::from_millis(1500));
    // Back in: traced again, from a fresh seed.
    cg.add(leaver.pid()).expect("move back in");
    let back_at = sinks_now();
    thread::sleep(Duration::from_millis(1500));
    let want = [
        (leaver.pid(), proc_count(leaver.pid())),
        (comer.pid(), proc_count(comer.pid())),
    ];
    let (objs, _) = ft.finish();
    let reps = reports(&objs);
    let left: Vec<&Value> = objs
        .iter()
        .filter(|o| o["type"] == "exit" && o["pid"] == leaver.pid())
        .collect();
    assert_eq!(left.len(), 1, "one exit object for the move out: {left:?}");
    assert_eq!(left[0]["left_selection"], true, "{}", left[0]);
    assert_eq!(left[0]["open_fds"], want[0].1 as u64, "{}", left[0]);
    let left_ts = left[0]["ts"].as_f64().unwrap();
    assert!(
        left_ts >= left_at - 0.1,
        "left at {left_ts}, moved at {left_at}"
    );
    // Not reported between its move out and its move back in.
    let times = report_times(&objs, leaver.pid());
    assert!(
        times.iter().any(|&t| t < left_ts),
        "reported before: {times:?}"
    );
    assert!(
        !times.iter().any(|&t| t > left_ts && t < back_at),
        "reported while out of the selection (left {left_ts}, back {back_at}): {times:?}"
    );
    assert!(
        times.iter().any(|&t| t > back_at),
        "traced again: {times:?}"
    );
    assert!(
        report_times(&objs, comer.pid())
            .iter()
            .all(|&t| t > left_at - 0.1),
        "the comer was reported before it came in"
    );
    for (pid, n) in want {
        let o = last_of(&reps, pid);
        assert_eq!(o["open_fds"].as_u64(), Some(n as u64), "pid {pid}: {o}");
        assert_eq!(o["drift"].as_i64(), Some(0), "pid {pid}: {o}");
    }
    drift_never_twice(&reps);
}

/// Unix time now, as fdtrace's `ts`.
fn sinks_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

#[test]
fn a_container_started_after_fdtrace_is_selected() {
    fdtrace_tests::require_root();
    // docker-shaped cgroups made after fdtrace started: the one the prefix
    // names and another.
    let id = format!("fade{}", &random_id()[..60]);
    let other = format!("beef{}", &random_id()[..60]);
    let ft = Live::start(&["--container", &id[..16], "--duration", "5s"]);
    let cg = HandMadeCgroup::new(&format!("/docker/{id}")).expect("cgroup");
    let cg_other = HandMadeCgroup::new(&format!("/docker/{other}")).expect("cgroup");
    let inside = Holder::start(FDLOOP, 9);
    cg.add(inside.pid()).expect("move in");
    let outside = Holder::start(FDLOOP, 4);
    cg_other.add(outside.pid()).expect("move in");
    thread::sleep(Duration::from_millis(1000));
    // Started in the container once it is selected: the kernel's.
    let later = Holder::start(FDLOOP, 6);
    cg.add(later.pid()).expect("move in");
    thread::sleep(Duration::from_millis(1500));
    let want = [
        (inside.pid(), proc_count(inside.pid())),
        (later.pid(), proc_count(later.pid())),
    ];
    let (objs, stderr) = ft.finish();
    assert!(
        stderr.contains(&format!("--container {}", &id[..16])) && stderr.contains("yet"),
        "said that nothing matches yet: {stderr}"
    );
    let reps = reports(&objs);
    let reported: BTreeSet<u64> = reps.values().flat_map(|r| r.keys().copied()).collect();
    assert_eq!(
        reported,
        BTreeSet::from([u64::from(inside.pid()), u64::from(later.pid())]),
        "the container's processes only (outside: {})",
        outside.pid()
    );
    for (pid, n) in want {
        let o = last_of(&reps, pid);
        assert_eq!(o["open_fds"].as_u64(), Some(n as u64), "pid {pid}: {o}");
        assert_eq!(o["drift"].as_i64(), Some(0), "pid {pid}: {o}");
        assert_eq!(o["container_id"], id.as_str(), "{o}");
    }
    drift_never_twice(&reps);
}

/// A containerd task bundle made by the test (the CRI's annotations in its
/// config.json), removed when dropped.
struct Bundle(std::path::PathBuf);

impl Bundle {
    fn write(id: &str, pod: &str, namespace: &str, uid: &str) -> Bundle {
        let dir =
            std::path::Path::new("/run/containerd/io.containerd.runtime.v2.task/k8s.io").join(id);
        std::fs::create_dir_all(&dir).expect("bundle dir");
        let config = serde_json::json!({ "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-name": pod,
            "io.kubernetes.cri.sandbox-namespace": namespace,
            "io.kubernetes.cri.sandbox-uid": uid,
            "io.kubernetes.cri.container-name": "app",
        }});
        // Written whole, then renamed: fdtrace never reads half of it.
        let tmp = dir.join("config.json.tmp");
        std::fs::write(&tmp, config.to_string()).expect("config.json");
        std::fs::rename(&tmp, dir.join("config.json")).expect("config.json");
        Bundle(dir)
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `--pod` names a container by its bundle's annotations, which the
/// runtime may write after the container's first process is in its cgroup
/// (or fdtrace may fail to read at first): such a container is looked at
/// again until its names read, then selected.
#[test]
fn a_pod_whose_bundle_reads_late_is_selected() {
    fdtrace_tests::require_root();
    let (uid, id) = (fdtrace_tests::containers::random_pod_uid(), random_id());
    let pod = format!("late-{}", &id[..8]);
    let ft = Live::start(&["--pod", &format!("shop/{pod}"), "--duration", "10s"]);
    let cg = HandMadeCgroup::new(&format!("/kubepods/besteffort/pod{uid}/{id}")).expect("cgroup");
    let inside = Holder::start(FDLOOP, 7);
    cg.add(inside.pid()).expect("move in");
    // Seen by the kernel, with no bundle to name it yet.
    thread::sleep(Duration::from_millis(1500));
    let first_bundle = sinks_now();
    let _bundle = Bundle::write(&id, &pod, "shop", &uid);
    thread::sleep(Duration::from_millis(7500));
    let objs = only_the_pod_process(ft, &inside, &pod);
    let first = report_times(&objs, inside.pid())[0];
    assert!(
        first > first_bundle,
        "not traced before its bundle named it ({first} vs {first_bundle})"
    );
}

/// The kernel tells of a cgroup once, when its first process enters it.
/// That process may be gone by the time the bundle reads (runc's init that
/// exec'd on, a short first command); the container's other processes are
/// selected all the same. The cgroup was once forgotten with its first
/// process, and nothing of the pod was traced.
#[test]
fn a_late_pod_is_selected_after_its_first_process_exited() {
    fdtrace_tests::require_root();
    let (uid, id) = (fdtrace_tests::containers::random_pod_uid(), random_id());
    let pod = format!("gone-{}", &id[..8]);
    let ft = Live::start(&["--pod", &format!("shop/{pod}"), "--duration", "10s"]);
    let cg = HandMadeCgroup::new(&format!("/kubepods/besteffort/pod{uid}/{id}")).expect("cgroup");
    let first = Holder::start(FDLOOP, 3);
    cg.add(first.pid()).expect("move the first in");
    // Seen by the kernel, with no bundle to name it yet.
    thread::sleep(Duration::from_millis(1000));
    let inside = Holder::start(FDLOOP, 7);
    cg.add(inside.pid()).expect("move the second in");
    drop(first);
    // A report or more with the first process gone.
    thread::sleep(Duration::from_millis(1000));
    let _bundle = Bundle::write(&id, &pod, "shop", &uid);
    thread::sleep(Duration::from_millis(7000));
    only_the_pod_process(ft, &inside, &pod);
}

/// Ends `ft` (a `--pod shop/POD` run) and checks it reported `inside` only,
/// exact, under its pod and namespace; its objects.
fn only_the_pod_process(ft: Live, inside: &Holder, pod: &str) -> Vec<Value> {
    let n = proc_count(inside.pid()) as u64;
    let (objs, stderr) = ft.finish();
    let reps = reports(&objs);
    let reported: BTreeSet<u64> = reps.values().flat_map(|r| r.keys().copied()).collect();
    assert_eq!(
        reported,
        BTreeSet::from([u64::from(inside.pid())]),
        "the pod's running process only: {stderr}"
    );
    let o = last_of(&reps, inside.pid());
    assert_eq!(o["open_fds"].as_u64(), Some(n), "{o}");
    assert_eq!(o["drift"].as_i64(), Some(0), "{o}");
    assert_eq!(
        (&o["pod"], &o["namespace"]),
        (&Value::from(pod), &Value::from("shop")),
        "{o}"
    );
    objs
}

/// A parent holding 1000 close-on-exec fds forks a child every 2 ms
/// (each sleeps holding its copy of the table) until told to stop; it
/// prints each child's pid. The table is long enough, and the forks
/// frequent enough, that some fork comes while the seed walk is writing
/// the parent's fds: before the walk and the fork agreed on the parent's
/// counts (ProcStats::seed_seq), such a child was short of the fds seeded
/// meanwhile in 3 runs of 4. `stop` stops the forks, and dropping it ends
/// the children and the parent.
const FORKER: &str = r#"
import os, select, signal, sys
fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(1000)]
kids = []
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.002)[0]:
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    kids.append(pid)
    print(pid, flush=True)
sys.stdin.readline()
print("stopped", flush=True)
sys.stdin.read()
for pid in kids:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"#;

#[test]
fn children_forked_while_the_node_starts_count_exactly() {
    fdtrace_tests::require_root();
    let mut forker = Command::new(fdtrace_tests::debian_python())
        .args(["-c", FORKER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the forking parent");
    let mut stdin = forker.stdin.take().expect("stdin");
    let mut out = BufReader::new(forker.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line)
        .expect("the forker says it is ready");
    assert_eq!(line.trim(), "ready", "forker: {line:?}");
    // Forks go on through fdtrace's start: its registration of every
    // process and its seed walk of every table.
    let mut ft = fdtrace(&["--all", "--duration", "3s"]);
    let started = wait_started(&mut ft);
    thread::sleep(Duration::from_millis(100));
    writeln!(stdin, "stop").expect("stop the forks");
    let mut kids = Vec::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("the forker's children") > 0,
            "the forker ended"
        );
        match line.trim() {
            "stopped" => break,
            pid => kids.push(pid.parse::<u32>().expect("a child's pid")),
        }
    }
    let objs = objects_after(ft, started);
    let reps = reports(&objs);
    let mut checked = 0;
    for pid in std::iter::once(forker.id()).chain(kids.iter().copied()) {
        // Sleeping since its fork: its count then is its count now.
        let want = proc_count(pid) as u64;
        let Some(o) = reps
            .values()
            .find_map(|r| r.get(&u64::from(pid)).filter(|o| !o["drift"].is_null()))
        else {
            // Forked after the last report that compared.
            continue;
        };
        assert_eq!(o["open_fds"].as_u64(), Some(want), "pid {pid}: {o}");
        assert_eq!(o["drift"].as_i64(), Some(0), "pid {pid}: {o}");
        checked += 1;
    }
    drop(stdin);
    forker.wait().expect("the forker ends");
    assert!(
        checked > kids.len() / 2,
        "{checked} of {} compared",
        kids.len() + 1
    );
}

/// A leak on a file the process already had open at attach is found
/// without stacks: the bench's leakers hold /dev/null from before the
/// attach, and a leaked fd whose stack could not be taken has none, like
/// the pre-existing one (here every fd: --no-stacks). The new fds are a
/// site of their own, not old fds.
#[test]
fn a_leak_on_a_file_held_since_before_the_attach_is_found() {
    fdtrace_tests::require_root();
    let mut leaker = Command::new(FDLOOP)
        .args(["node", "leak", "fdn-held-leak", "20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fdloop node leak");
    let pid = leaker.id();
    let mut replies = BufReader::new(leaker.stdout.take().expect("fdloop stdout")).lines();
    let mut reply = || {
        let line = replies.next().expect("a reply").expect("read a reply");
        assert!(line.starts_with("fdloop node "), "{line}");
    };
    reply();
    let mut ft = fdtrace(&["--pid", &pid.to_string(), "--duration", "6s"]);
    let started = wait_started(&mut ft);
    let mut stdin = leaker.stdin.take().expect("fdloop stdin");
    stdin.write_all(b"x").expect("switch the leaker on");
    reply();
    let objs = objects_after(ft, started);
    let held = objs
        .iter()
        .filter(|o| o["type"] == "site" && o["pid"] == pid && o["resource"] == "/dev/null")
        .count();
    assert!(held > 0, "no /dev/null site of pid {pid}");
    let leaks: Vec<&Value> = objs
        .iter()
        .filter(|o| o["type"] == "finding" && o["finding"] == "leak" && o["pid"] == pid)
        .collect();
    drop(stdin);
    leaker.wait().expect("the leaker ends");
    assert_eq!(leaks.len(), 1, "leak findings of pid {pid}: {leaks:?}");
    let last = last_of(&reports(&objs), pid);
    assert!(
        last["leak_per_s"].as_f64().is_some_and(|r| r > 10.0),
        "{last}"
    );
}
