//! fdtrace's kernel maps, read from outside with bpftool (Debian's
//! package): the test's own view of what the kernel side holds.
use std::process::{Command, Stdio};

use serde_json::Value;

/// The id of the BPF map named `name` among those process `pid` holds
/// (its fds' fdinfo gives their ids; bpftool their names); None when it
/// holds none of that name yet.
pub fn map_of(pid: u32, name: &str) -> Result<Option<u32>, String> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("read /proc/{pid}/fd: {e}"))?;
    for e in rd.flatten() {
        if std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() != "anon_inode:bpf-map") {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy());
        let Some(id) = std::fs::read_to_string(&info).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        }) else {
            continue;
        };
        let out = bpftool(&["map", "show", "id", &id.to_string(), "--json"])?;
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        if v["name"] == name {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Whether BPF map `map` (keyed by a u32 pid) has an entry for `pid`.
pub fn map_has_pid(map: u32, pid: u32) -> bool {
    let mut args: Vec<String> = ["map", "lookup", "id", &map.to_string(), "key"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(pid.to_le_bytes().iter().map(|b| b.to_string()));
    Command::new("bpftool")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The fd numbers that BPF map `map`, keyed by `{ tgid: u32, fd: u32 }`
/// (fdtrace's FDS), has entries for under `tgid`, open or closed, sorted.
pub fn fd_entries(map: u32, tgid: u32) -> Result<Vec<u32>, String> {
    let out = bpftool(&["map", "dump", "id", &map.to_string(), "--json"])?;
    let v: Value =
        serde_json::from_slice(&out).map_err(|e| format!("bpftool map dump: not JSON: {e}"))?;
    let rows = v
        .as_array()
        .ok_or_else(|| format!("bpftool map dump: not a list: {v}"))?;
    let mut fds = Vec::new();
    for row in rows {
        let key = key_bytes(&row["key"]).ok_or_else(|| format!("bpftool map dump: key {row}"))?;
        let word = |i: usize| u32::from_le_bytes([key[i], key[i + 1], key[i + 2], key[i + 3]]);
        if key.len() == 8 && word(0) == tgid {
            fds.push(word(4));
        }
    }
    fds.sort_unstable();
    Ok(fds)
}

/// A key as bpftool prints it without BTF: a list of "0x.." bytes.
fn key_bytes(key: &Value) -> Option<Vec<u8>> {
    key.as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.strip_prefix("0x")?, 16).ok())
        .collect()
}

fn bpftool(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .map_err(|e| format!("run bpftool (apt-get install bpftool): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}
