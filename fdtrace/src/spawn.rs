//! `fdtrace run -- CMD`: starts CMD so that it is traced from its first
//! syscall. The child stops between fork and exec until fdtrace has
//! registered its pid and seeded its table; the handshake pipes are
//! close-on-exec, so exec itself removes them, through the same path as any
//! other close-on-exec fd.
use std::{
    ffi::OsString,
    fs::File,
    io::{self, Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    process::Command,
    sync::mpsc,
    thread::JoinHandle,
};

use anyhow::{Context as _, Result};

use crate::{error::Fatal, kernel::Kernel, reconcile};

pub struct Spawned {
    pub pid: u32,
    /// The thread that forked the command and reaps it.
    _reaper: JoinHandle<()>,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn start(k: &mut Kernel, argv: &[OsString], follow: bool) -> Result<Spawned> {
    let (ready_r, ready_w) = pipe().context("creating the start pipe")?;
    let (go_r, go_w) = pipe().context("creating the start pipe")?;
    let (rr, rw, gr, gw) = (
        ready_r.as_raw_fd(),
        ready_w.as_raw_fd(),
        go_r.as_raw_fd(),
        go_w.as_raw_fd(),
    );

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // SAFETY: only async-signal-safe calls (close, getpid, write, read).
    unsafe {
        cmd.pre_exec(move || {
            libc::close(rr);
            libc::close(gw);
            let pid = libc::getpid().to_ne_bytes();
            if libc::write(rw, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return Err(io::Error::last_os_error());
            }
            let mut go = 0u8;
            if libc::read(gr, (&raw mut go).cast(), 1) != 1 {
                return Err(io::Error::other(
                    "fdtrace stopped before the command started",
                ));
            }
            Ok(())
        });
    }
    // Command::spawn returns only once the child has exec'd (or failed to), so
    // it runs on its own thread. That thread owns the child's ends of the
    // pipes until then, so a child that dies early gives us EOF, not a hang.
    // It then stays, reaping the child when it exits: the kernel sends
    // PR_SET_PDEATHSIG when the thread that forked a child exits, so a thread
    // that ended early would kill such a command at once.
    let (tx, rx) = mpsc::channel::<io::Result<()>>();
    let spawner = std::thread::spawn(move || {
        let child = cmd.spawn();
        drop((ready_w, go_r));
        match child {
            Ok(mut child) => {
                let _ = tx.send(Ok(()));
                let _ = child.wait();
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });

    let name = argv[0].to_string_lossy().into_owned();

    let mut pid = [0u8; 4];
    if File::from(ready_r).read_exact(&mut pid).is_err() {
        return Err(spawn_failed(&name, rx.recv()));
    }
    let pid = u32::from_ne_bytes(pid);
    reconcile::attach(k, pid, follow)?;
    let mut go = File::from(go_w);
    if go.write_all(&[1]).is_err() {
        return Err(spawn_failed(&name, rx.recv()));
    }
    drop(go);
    match rx.recv() {
        Ok(Ok(())) => Ok(Spawned {
            pid,
            _reaper: spawner,
        }),
        other => Err(spawn_failed(&name, other)),
    }
}

fn spawn_failed(name: &str, r: Result<io::Result<()>, mpsc::RecvError>) -> anyhow::Error {
    match r {
        Ok(Err(e)) => Fatal::Usage(format!("cannot run {name}: {e}")).into(),
        Ok(Ok(())) => anyhow::anyhow!("{name} started without waiting for fdtrace"),
        Err(_) => anyhow::anyhow!("the thread starting {name} ended early"),
    }
}
