//! The interpreters of the Python tests, their venvs (tests/python/venv.sh:
//! httpx and py-spy from PyPI), py-spy as an oracle of a thread's frames,
//! and the `# @name` markers of the test programs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The Python test programs.
pub const PYDIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python");

/// `$PYENV_ROOT`, else `pyenv root`, else ~/.pyenv.
pub fn pyenv_root() -> PathBuf {
    if let Some(r) = std::env::var_os("PYENV_ROOT") {
        return PathBuf::from(r);
    }
    if let Ok(out) = Command::new("pyenv").arg("root").output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".pyenv")
}

/// pyenv's CPython `version`, or what to install.
pub fn find_pyenv_python(version: &str) -> Result<PathBuf, String> {
    let p = pyenv_root()
        .join("versions")
        .join(version)
        .join("bin/python3");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} missing: the Python tests need CPython {version} from pyenv \
             (`pyenv install {version}`)",
            p.display()
        ))
    }
}

/// pyenv's CPython `version`; fails the test, naming what to install,
/// when it is missing.
pub fn pyenv_python(version: &str) -> PathBuf {
    find_pyenv_python(version).unwrap_or_else(|e| panic!("{e}"))
}

/// Debian's /usr/bin/python3 (static, non-PIE), or what to install.
pub fn find_debian_python() -> Result<PathBuf, String> {
    let p = PathBuf::from("/usr/bin/python3");
    if p.is_file() {
        Ok(p)
    } else {
        Err("/usr/bin/python3 missing: `apt-get install python3 python3-venv`".into())
    }
}

pub fn debian_python() -> PathBuf {
    find_debian_python().unwrap_or_else(|e| panic!("{e}"))
}

/// The bin directory of the venv of `python` made by venv.sh (with httpx
/// and py-spy in it), made the first time.
pub fn find_venv_of(python: &Path) -> Result<PathBuf, String> {
    let out = Command::new(Path::new(PYDIR).join("venv.sh"))
        .arg(python)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run tests/python/venv.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tests/python/venv.sh {} failed: {}",
            python.display(),
            out.status
        ));
    }
    let py = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok(py.parent().expect("venv bin").to_path_buf())
}

pub fn venv_of(python: &Path) -> PathBuf {
    find_venv_of(python).unwrap_or_else(|e| panic!("{e}"))
}

/// py-spy's frames of every thread of `pid`, by native thread id,
/// innermost first, in fdtrace's "qualname (file:line)" form (py-spy names
/// frames by qualname on 3.11+), without its shim entries. `venv` is a bin
/// directory holding py-spy.
pub fn py_spy(venv: &Path, pid: u32) -> Result<HashMap<u64, Vec<String>>, String> {
    let out = Command::new(venv.join("py-spy"))
        .args(["dump", "--json", "--pid", &pid.to_string()])
        .output()
        .map_err(|e| format!("run py-spy: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "py-spy dump --pid {pid}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("py-spy's JSON: {e}"))?;
    let threads = v.as_array().ok_or("py-spy: not a list of threads")?;
    let mut out = HashMap::new();
    for t in threads {
        let frames = t["frames"]
            .as_array()
            .ok_or("py-spy: no frames")?
            .iter()
            .filter(|f| f["is_shim_entry"] != Value::Bool(true))
            .map(|f| {
                format!(
                    "{} ({}:{})",
                    f["name"].as_str().unwrap_or("?"),
                    f["filename"].as_str().unwrap_or("?"),
                    f["line"]
                )
            })
            .collect();
        let tid = t["os_thread_id"]
            .as_u64()
            .ok_or("py-spy: no os_thread_id")?;
        out.insert(tid, frames);
    }
    Ok(out)
}

/// The `# @name` markers of a program: name -> line number. A name is the
/// word right after `@` (letters, digits, `_`).
pub fn markers(source: &str) -> HashMap<String, u32> {
    source
        .lines()
        .zip(1..)
        .filter_map(|(l, n)| {
            let m = l.split("# @").nth(1)?;
            let name: String = m
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some((name, n))
        })
        .collect()
}

/// The markers of the program `name` in tests/python/.
pub fn program_markers(name: &str) -> HashMap<String, u32> {
    let p = Path::new(PYDIR).join(name);
    let source =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    markers(&source)
}
