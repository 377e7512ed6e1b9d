//! How a traced process and a session end: the `run` command's status as
//! fdtrace's exit code, --duration stopping the command, SIGHUP, a `--pid`
//! gone or a zombie at attach, and text a traced process chooses (its comm,
//! its file names) kept off the operator's terminal raw.
//!
//! Needs root and a built fdtrace.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use fdtrace_tests::{fdtrace_bin, require_root, run_fdtrace};
use serde_json::Value;

fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one object: {l:?}: {e}")))
        .collect()
}

fn of_type<'a>(recs: &'a [Value], ty: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["type"] == ty).collect()
}

fn summary(recs: &[Value]) -> &Value {
    let last = recs.last().expect("some output");
    assert_eq!(last["type"], "summary", "the summary comes last");
    last
}

#[test]
fn run_exits_with_the_code_of_its_command() {
    let f = run_fdtrace(
        &["--json", "run", "--", "sh", "-c", "exit 7"],
        Duration::from_secs(20),
    );
    assert_eq!(f.status.code(), Some(7), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    let exits = of_type(&recs, "exit");
    assert_eq!(exits.len(), 1, "{}", f.stdout);
    assert_eq!(exits[0]["exit_code"], 7, "{}", exits[0]);
    assert_eq!(summary(&recs)["ended"], "all_exited");
    assert_eq!(summary(&recs)["processes"][0]["exit_code"], 7);
}

#[test]
fn run_killed_by_a_signal_exits_128_plus_it() {
    let f = run_fdtrace(
        &["--json", "run", "--", "sh", "-c", "kill -9 $$"],
        Duration::from_secs(20),
    );
    assert_eq!(f.status.code(), Some(137), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    assert_eq!(of_type(&recs, "exit")[0]["signal"], 9);
}

#[test]
fn duration_stops_the_command_and_exits_0() {
    let started = Instant::now();
    let f = run_fdtrace(
        &["--json", "--duration", "2s", "run", "--", "sleep", "60"],
        Duration::from_secs(20),
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    let exits = of_type(&recs, "exit");
    assert_eq!(exits.len(), 1, "the command was stopped: {}", f.stdout);
    assert_eq!(exits[0]["signal"], libc::SIGTERM, "{}", exits[0]);
    assert_eq!(summary(&recs)["ended"], "duration");
}

#[test]
fn fail_on_wins_over_the_command_code() {
    // 3 fds of a limit of 8 are far above --warn-pct 10.
    let f = run_fdtrace(
        &[
            "--json",
            "--fail-on",
            "warning",
            "--warn-pct",
            "10",
            "run",
            "--",
            "sh",
            "-c",
            "ulimit -n 8; sleep 2.5; exit 7",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(f.status.code(), Some(3), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    // sleep, a followed child, exits too, without a code of its own.
    assert!(
        of_type(&recs, "exit").iter().any(|e| e["exit_code"] == 7),
        "{}",
        f.stdout
    );
}

#[test]
fn sighup_prints_the_summary_and_exits_0() {
    require_root();
    let mut sleeper = Command::new("sleep").arg("60").spawn().expect("sleep");
    let mut fdtrace = Command::new(fdtrace_bin())
        .args(["--json", "--pid", &sleeper.id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fdtrace");
    // Attached, its signal handlers in place, once its first report is
    // out (not after a fixed sleep: loading the programs takes longer on
    // a loaded host).
    let mut stdout = BufReader::new(fdtrace.stdout.take().unwrap());
    let mut out = String::new();
    while !out.contains(r#""type":"process""#) {
        let n = stdout.read_line(&mut out).expect("fdtrace's output");
        assert!(n > 0, "fdtrace ended before its first report: {out}");
    }
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(fdtrace.id() as i32, libc::SIGHUP) };
    stdout.read_to_string(&mut out).unwrap();
    let st = fdtrace.wait().expect("wait");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(st.code(), Some(0), "{st}");
    let recs = records(&out);
    assert_eq!(summary(&recs)["ended"], "sighup");
    assert_eq!(summary(&recs)["processes"][0]["state"], "running");
}

#[test]
fn a_pid_gone_at_attach_gets_an_exit_and_fdtrace_ends() {
    let mut short = Command::new("sleep").arg("0.1").spawn().expect("sleep");
    let pid = short.id().to_string();
    // Reaped at once: the pid is gone, not a zombie, by the time fdtrace
    // has loaded its programs.
    let reaper = thread::spawn(move || short.wait());
    let f = run_fdtrace(&["--json", "--pid", &pid], Duration::from_secs(20));
    let _ = reaper.join();
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    let exits = of_type(&recs, "exit");
    assert_eq!(exits.len(), 1, "{}", f.stdout);
    assert_eq!(exits[0]["pid"].to_string(), pid);
    assert!(
        of_type(&recs, "process").is_empty(),
        "no report of a process that is not there: {}",
        f.stdout
    );
}

#[test]
fn a_zombie_gets_an_exit_saying_so() {
    let mut child = Command::new("true").spawn().expect("true");
    let pid = child.id();
    // Not reaped: a zombie until wait.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            break;
        }
        assert!(Instant::now() < until, "pid {pid} never became a zombie");
        thread::sleep(Duration::from_millis(10));
    }
    let f = run_fdtrace(
        &["--json", "--pid", &pid.to_string()],
        Duration::from_secs(20),
    );
    let _ = child.wait();
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    let exits = of_type(&recs, "exit");
    assert_eq!(exits.len(), 1, "{}", f.stdout);
    assert_eq!(exits[0]["zombie"], true, "{}", exits[0]);
    assert_eq!(exits[0]["open_fds"], 0);
}

/// Renames itself with an escape sequence and a newline (prctl
/// PR_SET_NAME), then keeps opening a file whose name holds a screen
/// clear, a newline and a bell, and one whose name is not UTF-8.
const HOSTILE: &str = r#"
import ctypes, os, time
ctypes.CDLL(None).prctl(15, b"\x1b[31mEVIL\x1b[0m\n", 0, 0, 0)
evil = b"/tmp/fdtrace-x\x1b[2J\nline2\x07.txt"
bad = b"/tmp/fdtrace-bad\xff.txt"
held = []
for _ in range(60):
    held.append(os.open(evil, os.O_CREAT | os.O_RDONLY, 0o600))
    held.append(os.open(bad, os.O_CREAT | os.O_RDONLY, 0o600))
    time.sleep(0.05)
os.unlink(evil)
os.unlink(bad)
"#;

#[test]
fn hostile_names_are_escaped_on_the_terminal() {
    let f = run_fdtrace(
        &["--duration", "4s", "run", "--", "python3", "-c", HOSTILE],
        Duration::from_secs(30),
    );
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let out = &f.stdout;
    assert!(!out.contains('\x1b'), "an ESC reached the terminal: {out}");
    assert!(!out.contains('\x07'), "a BEL reached the terminal: {out}");
    assert!(
        !out.lines()
            .any(|l| l.starts_with("line") || l.starts_with("\\x1b[0m")),
        "a name broke a line: {out}"
    );
    assert!(
        out.contains("\\x1b[31mEVIL\\x1b[0m\\n"),
        "the comm, escaped: {out}"
    );
    assert!(out.contains("\\nline"), "the file name, escaped: {out}");
    assert!(
        out.contains("bad\\xff"),
        "the byte that is not UTF-8: {out}"
    );
}

#[test]
fn hostile_names_stay_one_object_per_line_and_lossless() {
    let f = run_fdtrace(
        &[
            "--json",
            "--duration",
            "4s",
            "run",
            "--",
            "python3",
            "-c",
            HOSTILE,
        ],
        Duration::from_secs(30),
    );
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    let comms: Vec<&str> = of_type(&recs, "process")
        .iter()
        .filter_map(|p| p["comm"].as_str())
        .collect();
    assert!(
        comms.contains(&"\x1b[31mEVIL\x1b[0m\n"),
        "the comm as chosen: {comms:?}"
    );
    let resources: Vec<&str> = of_type(&recs, "site")
        .iter()
        .filter_map(|s| s["resource"].as_str())
        .collect();
    assert!(
        resources.iter().any(|r| r.contains("bad\\xff.txt")),
        "the byte that is not UTF-8 as \\xff: {resources:?}"
    );
    assert!(
        resources
            .iter()
            .any(|r| r.contains("\x1b[") && r.contains('\n')),
        "the file name as chosen: {resources:?}"
    );
}

const STORM: &str = "for i in $(seq 300); do /bin/true; done";

#[test]
fn a_fork_storm_does_not_flood_the_terminal() {
    let f = run_fdtrace(&["run", "--", "sh", "-c", STORM], Duration::from_secs(60));
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let lines = f.stdout.lines().count();
    assert!(lines < 80, "{lines} lines for 300 children:\n{}", f.stdout);
    // A child alive at a report (the first comes as the storm starts) is
    // a process of its own in the summary; the others are one line.
    let summary = f.stdout.split("Summary (").nth(1).unwrap_or_default();
    let grouped: u32 = summary
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once("x true ")?;
            rest.contains("exited before a report")
                .then(|| n.parse().ok())?
        })
        .unwrap_or(0);
    let own = summary
        .lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            w.next().is_some_and(|pid| pid.parse::<u32>().is_ok()) && w.next() == Some("true")
        })
        .count() as u32;
    assert!(
        grouped + own == 300 && own <= 3,
        "the children summarised per command ({grouped} grouped, {own} on their own): {}",
        f.stdout
    );
}

#[test]
fn a_fork_storm_keeps_its_life_cycle_but_not_repeated_findings_in_ndjson() {
    let f = run_fdtrace(
        &["--json", "run", "--", "sh", "-c", STORM],
        Duration::from_secs(60),
    );
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    assert_eq!(of_type(&recs, "fork").len(), 301, "300 true and seq");
    assert_eq!(of_type(&recs, "exit").len(), 302, "and sh");
    let findings = of_type(&recs, "finding");
    let mut messages: Vec<&str> = findings
        .iter()
        .filter_map(|f| f["message"].as_str())
        .collect();
    let all = messages.len();
    messages.sort_unstable();
    messages.dedup();
    assert_eq!(all, messages.len(), "a finding repeated: {findings:?}");
}

/// Past the last 1000 exited processes, the summary totals the older ones
/// by command: every process is still counted once, and the totals are
/// those of the exit objects, so an always-on fdtrace can let them go.
#[test]
fn the_summary_folds_the_oldest_exited_processes_by_command() {
    let f = run_fdtrace(
        &[
            "--json",
            "run",
            "--",
            "sh",
            "-c",
            "for i in $(seq 1200); do /bin/true; done",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(f.status.code(), Some(0), "stderr: {}", f.stderr);
    let recs = records(&f.stdout);
    let exits = of_type(&recs, "exit");
    assert_eq!(exits.len(), 1202, "1200 true, seq and sh");
    let summary = of_type(&recs, "summary");
    let [summary] = summary[..] else {
        panic!("one summary: {summary:?}")
    };
    let listed = summary["processes"].as_array().expect("processes");
    let folded = summary["folded"].as_array().expect("folded");
    assert_eq!(listed.len(), 1000, "the last 1000 exits are listed");
    let sum = |v: &[&Value], field: &str| -> u64 {
        v.iter()
            .filter(|r| r["comm"] == "true")
            .map(|r| {
                r[field]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{field} of {r}"))
            })
            .sum()
    };
    let listed: Vec<&Value> = listed.iter().collect();
    let folded: Vec<&Value> = folded.iter().collect();
    assert_eq!(
        listed.iter().filter(|p| p["comm"] == "true").count() as u64 + sum(&folded, "processes"),
        1200,
        "every true once: {folded:?}"
    );
    for field in ["opened_total", "closed_total"] {
        assert_eq!(
            sum(&listed, field) + sum(&folded, field),
            sum(&exits, field),
            "{field}: the summary's totals are the exits'"
        );
    }
}
