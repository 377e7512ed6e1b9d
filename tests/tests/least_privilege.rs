//! What fdtrace needs from the machine: no tracefs, and the capabilities
//! CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE (run here as uid 65534 with only
//! those, through setpriv); each missing one is named; a kernel thread is
//! refused.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use serde_json::Value;

/// A copy of fdtrace that uid 65534 may run (the build tree may be closed
/// to it), removed when dropped.
struct Copy(PathBuf);

impl Copy {
    fn new(name: &str) -> Copy {
        let path = std::env::temp_dir().join(format!("fdtrace-{name}-{}", std::process::id()));
        fs::copy(fdtrace_tests::fdtrace_bin(), &path).expect("copy fdtrace");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod fdtrace");
        Copy(path)
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Runs `fdtrace args` as uid 65534 holding exactly `caps` (setpriv's
/// "+bpf,+perfmon" form; "" for none), in a mount namespace of its own
/// where tracefs is not mounted.
fn run_as_nobody(bin: &Copy, caps: &str, args: &[&str]) -> Output {
    let set = if caps.is_empty() {
        "-all".to_string()
    } else {
        format!("-all,{caps}")
    };
    let script = r#"umount /sys/kernel/tracing 2>/dev/null
if [ -e /sys/kernel/tracing/events ]; then echo "tracefs still mounted" >&2; exit 99; fi
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps="$1" --ambient-caps="$1" --bounding-set="$1" "$2" "${@:3}""#;
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            script,
            "fdtrace",
        ])
        .arg(&set)
        .arg(&bin.0)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare (util-linux) and setpriv")
}

#[test]
fn traces_another_users_process_with_three_capabilities_and_no_tracefs() {
    fdtrace_tests::require_root();
    let bin = Copy::new("caps");
    let holder = fdtrace_tests::Holder::start(env!("CARGO_BIN_EXE_fdloop"), 40);
    let pid = holder.pid();
    let out = run_as_nobody(
        &bin,
        "+bpf,+perfmon,+sys_ptrace",
        &[
            "--json",
            "--interval",
            "300ms",
            "--duration",
            "2s",
            "--pid",
            &pid.to_string(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fdtrace failed ({}): {stderr}",
        out.status
    );
    let proc_count = fdtrace_tests::proc_fds(pid as i32)
        .expect("read /proc")
        .len() as u64;
    let compared: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "process" && !v["drift"].is_null())
        .collect();
    assert!(
        !compared.is_empty(),
        "no report compared with /proc; stderr: {stderr}"
    );
    for v in &compared {
        assert_eq!(v["drift"].as_i64(), Some(0), "{v}");
        assert_eq!(
            v["open_fds"].as_u64(),
            Some(proc_count),
            "/proc/{pid}/fd: {v}"
        );
        assert_eq!(
            v["by_kind"]["file"].as_u64().map(|f| f >= 40),
            Some(true),
            "{v}"
        );
    }
    // Root's process, traced by uid 65534 without CAP_DAC_READ_SEARCH: the
    // fds it opens from now on cannot be named; said once, naming the
    // capability and the process.
    let warned = stderr
        .lines()
        .filter(|l| l.contains("without CAP_DAC_READ_SEARCH"))
        .collect::<Vec<_>>();
    assert_eq!(warned.len(), 1, "one warning: {stderr}");
    assert!(
        warned[0].contains(&format!("{pid} (fdloop)")),
        "names the process: {stderr}"
    );
    let out = run_as_nobody(
        &bin,
        "+bpf,+perfmon,+sys_ptrace,+dac_read_search",
        &["--json", "--duration", "1s", "--pid", &pid.to_string()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert!(
        !stderr.contains("CAP_DAC_READ_SEARCH"),
        "nothing to warn about with it: {stderr}"
    );
}

#[test]
fn each_missing_capability_is_named() {
    fdtrace_tests::require_root();
    let bin = Copy::new("missing");
    let holder = fdtrace_tests::Holder::start(env!("CARGO_BIN_EXE_fdloop"), 1);
    let pid = holder.pid();
    let pid = pid.to_string();
    for (caps, missing, present) in [
        ("", "CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE", ""),
        ("+bpf,+perfmon", "CAP_SYS_PTRACE", "CAP_BPF"),
        ("+bpf,+sys_ptrace", "CAP_PERFMON", "CAP_BPF"),
        ("+perfmon,+sys_ptrace,+sys_admin", "", "CAP_"),
    ] {
        let out = run_as_nobody(&bin, caps, &["--duration", "1s", "--pid", &pid]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if missing.is_empty() {
            // CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON.
            assert!(
                out.status.success(),
                "caps {caps}: {}: {stderr}",
                out.status
            );
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "caps {caps:?}: {stderr}");
        assert!(
            stderr.contains(&format!("missing capabilities: {missing};")),
            "caps {caps:?}: expected {missing} named: {stderr}"
        );
        if !present.is_empty() {
            assert!(
                !stderr.contains(present),
                "caps {caps:?}: {present} is held: {stderr}"
            );
        }
    }
}

/// PF_KTHREAD in /proc/PID/stat's flags (the 9th field; comm, the 2nd, is
/// in parentheses and may hold spaces).
fn is_kernel_thread(pid: &str) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    rest.split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u32>().ok())
        .is_some_and(|f| f & 0x0020_0000 != 0)
}

#[test]
fn a_kernel_thread_is_refused() {
    fdtrace_tests::require_root();
    let kthread = fs::read_dir("/proc")
        .expect("list /proc")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .find(|n| is_kernel_thread(n))
        .expect("a kernel thread in /proc (kthreadd is pid 2 outside a pid namespace)");
    let out = Command::new(fdtrace_tests::fdtrace_bin())
        .args(["--duration", "1s", "--pid", &kthread])
        .stdin(Stdio::null())
        .output()
        .expect("run fdtrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "pid {kthread}: {stderr}");
    assert!(
        stderr.contains(&format!("pid {kthread} is a kernel thread")),
        "pid {kthread}: {stderr}"
    );
}
