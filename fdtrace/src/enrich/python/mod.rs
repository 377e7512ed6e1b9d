//! Python call sites: which CPython a traced process runs and where its
//! structures are (the layout the kernel side's walker needs), the
//! user-space walk of a thread's Python frames, their symbolization
//! (qualname, file, line) while the process lives, and the user's own frame.
mod code;
mod layout;
mod locate;
mod mem;
mod sites;
mod user;
mod walk;

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use fdtrace_common::python::PyFrame;
use serde_json::json;

pub use code::SymFrame;
pub use locate::Interpreter;
pub use sites::{Found, PySites};
pub use user::UserFrame;

use crate::error::Fatal;

/// A Python process whose frames can be read.
pub struct PyProc {
    pub interp: Interpreter,
    mem: mem::Mem,
    codes: code::Codes,
}

impl PyProc {
    /// Ok(None) when `pid` runs no CPython; Err with the reason, worded for
    /// the notice shown once per process, when it runs one whose frames
    /// cannot be read.
    pub fn attach(pid: u32) -> Result<Option<PyProc>, String> {
        let why = |e: &dyn std::fmt::Display| {
            format!("Python frames are not available for pid {pid}: {e}")
        };
        let mem = match mem::Mem::open(pid) {
            Ok(m) => m,
            // Gone already, or exiting (a short-lived child, a zombie):
            // nothing to say.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) || !crate::procfd::exists(pid) => {
                return Ok(None);
            }
            // Without its memory fdtrace cannot tell what the process runs
            // (its maps are closed too); say so only for one whose command
            // names Python, not for every process it may not read.
            Err(_) if !named_python(pid) => return Ok(None),
            Err(e) => return Err(why(&format!("cannot open /proc/{pid}/mem: {e}"))),
        };
        let interp = match locate::locate(pid, &mem) {
            Ok(Some(i)) => i,
            Ok(None) => return Ok(None),
            Err(e) => return Err(why(&e)),
        };
        Ok(Some(PyProc {
            interp,
            mem,
            codes: code::Codes::default(),
        }))
    }

    /// The same interpreter in a forked child `child`, read through its own
    /// memory; None when the child is already gone.
    pub fn fork(&self, child: u32) -> Option<PyProc> {
        Some(PyProc {
            interp: self.interp.clone(),
            mem: mem::Mem::open(child).ok()?,
            codes: code::Codes::default(),
        })
    }

    /// Thread `tid`'s frames, innermost first, at most `max`.
    pub fn stack(&self, tid: u32, max: usize) -> Result<Vec<PyFrame>, walk::WalkError> {
        let l = &self.interp.layout;
        let ts = walk::thread_state(&self.mem, l, tid)?;
        walk::frames(&self.mem, l, ts, max)
    }

    /// `frames` symbolized, each with the reason when its code object could
    /// not be read.
    pub fn symbolize(&mut self, frames: &[PyFrame]) -> Vec<(SymFrame, Option<code::CodeError>)> {
        frames
            .iter()
            .map(|&f| self.codes.frame(&self.mem, &self.interp.layout, f))
            .collect()
    }

    pub fn user_frame(&self, frames: &[SymFrame]) -> Option<UserFrame> {
        self.interp.libraries.user_frame(frames)
    }

    pub fn user_frames(&self, frames: &[SymFrame]) -> usize {
        self.interp.libraries.user_frames(frames)
    }
}

/// Frames `py-stack` shows at most; deeper than the kernel's capture
/// (PY_MAX_FRAMES), so a test can tell where the kernel's stops.
const PY_STACK_MAX: usize = 256;

/// `fdtrace py-stack`: prints the Python stack of one thread, read from
/// user space.
pub fn py_stack(pid: u32, tid: Option<u32>, as_json: bool) -> Result<ExitCode> {
    let tid = tid.unwrap_or(pid);
    if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
        return Err(Fatal::Usage(format!("no thread {tid} in process {pid}")).into());
    }
    let mut p = match PyProc::attach(pid) {
        Ok(Some(p)) => p,
        Ok(None) => bail!("process {pid} runs no CPython"),
        Err(why) => bail!(why),
    };
    let frames = p
        .stack(tid, PY_STACK_MAX)
        .with_context(|| format!("pid {pid} tid {tid}"))?;
    let syms = p.symbolize(&frames);
    let plain: Vec<SymFrame> = syms.iter().map(|(s, _)| s.clone()).collect();
    let user = p.user_frame(&plain);
    let binary = p.interp.binary.display().to_string();
    if as_json {
        let frames: Vec<_> = frames
            .iter()
            .zip(&syms)
            .map(|(f, (s, err))| {
                let mut o = json!({
                    "code": format!("{:#x}", f.code),
                    "offset": f.offset,
                    "frame": s.to_string(),
                });
                if let Some(e) = err {
                    o["error"] = json!(e.to_string());
                }
                o
            })
            .collect();
        let o = json!({
            "pid": pid,
            "tid": tid,
            "python": p.interp.version.to_string(),
            "binary": binary,
            "frames": frames,
            "user_frame": user.as_ref().map(|u| u.frame.clone()),
            "via": user.as_ref().and_then(|u| u.via.clone()),
        });
        println!("{o}");
    } else {
        println!(
            "pid {pid} tid {tid}: CPython {} ({binary})",
            p.interp.version
        );
        for (i, (s, err)) in syms.iter().enumerate() {
            match err {
                Some(e) => println!("  #{i:<3} {s}: {e}"),
                None => println!("  #{i:<3} {s}"),
            }
        }
        match user {
            Some(u) => println!("user frame: {u}"),
            None => println!("user frame: none (only the standard library's and packages' code)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `pid`'s command line starts with a program named `python*`
/// (/proc/PID/cmdline is readable where its memory is not).
fn named_python(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| argv0_is_python(&c))
}

/// `python3`, `/usr/bin/python3.12`, `python3.13t`: the file name of the
/// first NUL-terminated argument.
fn argv0_is_python(cmdline: &[u8]) -> bool {
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let name = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
    name.starts_with(b"python")
}

#[cfg(test)]
mod named_tests {
    use super::argv0_is_python;

    #[test]
    fn python_by_the_name_of_its_program() {
        assert!(argv0_is_python(b"/usr/bin/python3.12\0-m\0http.server\0"));
        assert!(argv0_is_python(b"python3\0"));
        assert!(!argv0_is_python(b"/usr/bin/process_api\0--python\0"));
        assert!(!argv0_is_python(b"/opt/python/bin/node\0"));
        assert!(!argv0_is_python(b""));
    }
}
