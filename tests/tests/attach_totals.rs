//! Totals after attaching to a process that opens and closes fds flat out:
//! the fds open at attach (`preexisting_fds`, counted by the kernel's walk
//! of the table) plus those opened since, minus those closed since, are the
//! live count, in every report that compared with /proc.
use std::{
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Kills and reaps the child when dropped, so a failed assertion leaves no
/// process behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Counters of one process object, as fdtrace printed them.
fn totals(v: &Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("process object without a count {k}: {v}"))
    };
    (
        n("open_fds"),
        n("preexisting_fds"),
        n("opened_total"),
        n("closed_total"),
    )
}

/// Each round attaches to a fresh churning process (the numbers its loop
/// uses first are the ones a walk can find while their creating syscall is
/// still on its way to the kernel's hook) and reads two seconds of reports.
#[test]
fn preexisting_plus_opened_minus_closed_is_live() {
    fdtrace_tests::require_root();
    for round in 1..=5 {
        let busy = Command::new(env!("CARGO_BIN_EXE_fdloop"))
            .args(["open", "100000000000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start fdloop");
        let busy = Killed(busy);
        let pid = busy.0.id();
        let mut ft = Command::new(fdtrace_tests::fdtrace_bin())
            .args(["--json", "--interval", "200ms", "--duration", "2s"])
            .args(["--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fdtrace");
        let (tx, rx) = mpsc::channel();
        fdtrace_tests::read_lines(ft.stdout.take().expect("piped stdout"), move |l, _| {
            l.is_some_and(|l| tx.send(l).is_ok())
        });
        let ft = Killed(ft);
        let mut stop_scheduled = false;
        let until = Instant::now() + Duration::from_secs(15);
        let (mut compared, mut most_opened) = (0, 0);
        // The reports so far, for a failure to show what led to it.
        let mut seen = Vec::new();
        while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("round {round}: not JSON ({e}): {line}"));
            // Flat out, the loop changes its table during every /proc read,
            // so no report can compare (drift null). Stopped half a second
            // after the first report (the churny attach is done by then),
            // its later reports compare, and its totals must add up.
            if v["type"] == "process" && !std::mem::replace(&mut stop_scheduled, true) {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    // SAFETY: a plain signal to the child this test started.
                    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
                });
            }
            // Counters read while the table changed are torn; fdtrace then
            // reports drift null.
            if v["type"] == "process" {
                seen.push(format!(
                    "drift {} open {} opened {} closed {}",
                    v["drift"], v["open_fds"], v["opened_total"], v["closed_total"]
                ));
            }
            if v["type"] != "process" || v["drift"].is_null() {
                continue;
            }
            compared += 1;
            let (live, pre, opened, closed) = totals(&v);
            assert!(
                pre >= 3,
                "round {round}: fdloop had stdin, stdout and stderr open at attach: {v}"
            );
            assert_eq!(
                live as i128,
                pre as i128 + opened as i128 - closed as i128,
                "round {round}: open_fds != preexisting_fds + opened_total - closed_total: {v}\n\
                 reports so far:\n{}",
                seen.join("\n")
            );
            most_opened = most_opened.max(opened);
        }
        drop(ft);
        assert!(
            compared >= 3,
            "round {round}: only {compared} reports compared with /proc in 2 s of 200 ms reports"
        );
        assert!(
            most_opened > 1000,
            "round {round}: fdloop opens fds flat out, fdtrace counted {most_opened} in 2 s"
        );
    }
}
