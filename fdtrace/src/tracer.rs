//! The session: attach, then every interval report each traced process and
//! check it against /proc; between reports, handle fork/exec/exit/EMFILE
//! events from the ring buffer.
use std::{
    collections::BTreeMap,
    io,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use fdtrace_common::{
    CNT_FDS_MAP_FULL, CNT_PROCS_MAP_FULL, CNT_RINGBUF_FULL, EV_EMFILE, EV_ENFILE, EV_EXEC, EV_EXIT,
    EV_FORK, Event, syscalls,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::{Cli, Command},
    error::Fatal,
    loader::{Kernel, Limits},
    output::{Output, ProcessRow, SummaryRow, now},
    procfd, spawn, sync,
};

/// What user space remembers of a traced process between reports.
struct View {
    comm: String,
    ppid: Option<u32>,
    last_opened: u64,
    last_closed: u64,
    last_at: Instant,
    /// Final figures once it exited (kept for the summary).
    exited: Option<(u64, u64, u64)>,
    last: Option<(u64, u64, u64, u64)>,
    kind_fix: sync::KindFix,
    /// The kernel's `inexact` count at the last report.
    seen_inexact: u64,
}

impl View {
    fn new(pid: u32) -> Self {
        let info = procfd::info(pid).unwrap_or_default();
        View {
            comm: info.comm,
            ppid: info.ppid,
            last_opened: 0,
            last_closed: 0,
            last_at: Instant::now(),
            exited: None,
            last: None,
            kind_fix: sync::KindFix::default(),
            seen_inexact: 0,
        }
    }
}

fn event_comm(ev: &Event) -> String {
    let len = ev
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ev.comm.len());
    String::from_utf8_lossy(&ev.comm[..len]).into_owned()
}

struct Session {
    k: Kernel,
    out: Output,
    views: BTreeMap<u32, View>,
    child: Option<spawn::Spawned>,
    counters_seen: [u64; 3],
    max_fds: u32,
    max_procs: u32,
}

pub async fn run(cli: Cli) -> Result<()> {
    // A wrong pid is the user's to fix before anything else.
    for &pid in &cli.pids {
        if !procfd::exists(pid) {
            return Err(Fatal::NoSuchPid(pid).into());
        }
    }
    if let Some(Command::NoopHooks) = cli.command {
        return noop_hooks(&cli).await;
    }
    if cli.pids.is_empty() && cli.command.is_none() {
        return Err(Fatal::Usage(
            "nothing to trace: give --pid PID, or run -- CMD [ARGS...] (see fdtrace --help)".into(),
        )
        .into());
    }
    let limits = Limits {
        max_fds: cli.max_fds,
        max_procs: cli.max_procs,
    };
    let mut k = Kernel::load(&limits)?;
    let ring = k.events.take().context("ring buffer already taken")?;
    // SAFETY: the RingBuf owns its map fd, which stays open and the same for
    // the AsyncFd's whole life.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| e.into_parts().1)
        .context("polling the ring buffer")?;

    let mut s = Session {
        k,
        out: Output::new(cli.json),
        views: BTreeMap::new(),
        child: None,
        counters_seen: [0; 3],
        max_fds: cli.max_fds,
        max_procs: cli.max_procs,
    };
    for &pid in &cli.pids {
        sync::attach(&mut s.k, pid, cli.follow)
            .with_context(|| format!("attaching to pid {pid}"))?;
        s.views.insert(pid, View::new(pid));
    }
    if let Some(Command::Run { no_follow, argv }) = &cli.command {
        let spawned = spawn::start(&mut s.k, argv, !no_follow)?;
        s.views.insert(spawned.pid, View::new(spawned.pid));
        s.child = Some(spawned);
    }

    let started = Instant::now();
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let deadline = async {
        match cli.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(cli.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let result: io::Result<()> = async {
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    s.drain(ring.get_mut())?;
                    s.report()?;
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    s.drain(guard.get_inner_mut())?;
                    guard.clear_ready();
                    s.out.flush()?;
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut deadline => break,
            }
            if s.views.values().all(|v| v.exited.is_some()) {
                break;
            }
        }
        s.drain(ring.get_mut())?;
        s.summary(started.elapsed())
    }
    .await;
    match result {
        // A closed stdout (`fdtrace ... | head`) ends the session quietly.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the report"),
    }
}

async fn noop_hooks(cli: &Cli) -> Result<()> {
    let _ebpf = crate::loader::noop_hooks(&Limits {
        max_fds: cli.max_fds,
        max_procs: cli.max_procs,
    })?;
    eprintln!("fdtrace: empty programs attached to tp_btf/sys_enter and sys_exit; Ctrl-C detaches");
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    Ok(())
}

impl Session {
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> io::Result<()> {
        while let Some(item) = ring.next() {
            if item.len() < size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole Event; read_unaligned copes
            // with the ring's 8-byte alignment.
            let ev = unsafe { item.as_ptr().cast::<Event>().read_unaligned() };
            drop(item);
            self.event(&ev)?;
        }
        Ok(())
    }

    fn event(&mut self, ev: &Event) -> io::Result<()> {
        let ts = now();
        match ev.kind {
            EV_FORK => {
                let mut view = View::new(ev.tgid);
                view.ppid = Some(ev.aux);
                // The event ran in the parent: its comm is the child's too.
                view.comm = event_comm(ev);
                self.views.insert(ev.tgid, view);
                self.out.fork(ts, ev.tgid, ev.aux)
            }
            EV_EXEC => {
                let comm = event_comm(ev);
                if let Some(v) = self.views.get_mut(&ev.tgid) {
                    v.comm.clone_from(&comm);
                }
                self.out.exec(ts, ev.tgid, &comm)
            }
            EV_EXIT => {
                if let Some(v) = self.views.get_mut(&ev.tgid) {
                    v.comm = event_comm(ev);
                }
                self.exited(ev.tgid, Some((ev.live, ev.opened, ev.closed)))
            }
            EV_EMFILE | EV_ENFILE => {
                let errno = if ev.kind == EV_EMFILE {
                    "EMFILE"
                } else {
                    "ENFILE"
                };
                let name = syscalls::name(u64::from(ev.syscall)).unwrap_or("unknown");
                self.out.fd_error(ts, ev.tgid, ev.aux, name, errno)
            }
            _ => Ok(()),
        }
    }

    /// `figures`: (open, opened, closed) at exit, from the exit event; None
    /// when the event was lost and only the last report is known.
    fn exited(&mut self, pid: u32, figures: Option<(u64, u64, u64)>) -> io::Result<()> {
        let Some(v) = self.views.get_mut(&pid) else {
            return Ok(());
        };
        if v.exited.is_some() {
            return Ok(());
        }
        let (open, opened, closed) = figures
            .or(v.last.map(|(o, op, cl, _)| (o, op, cl)))
            .unwrap_or((0, 0, 0));
        v.exited = Some((open, opened, closed));
        let comm = v.comm.clone();
        if let Some(c) = self.child.as_mut().filter(|c| c.pid == pid) {
            // Reap it; it is gone already, so this does not block.
            let _ = c.child.wait();
        }
        self.out.exit(now(), pid, &comm, open, opened, closed)
    }

    fn report(&mut self) -> io::Result<()> {
        let ts = now();
        self.report_counters(ts)?;
        // The kernel map says who is traced: a fork or exit event lost to a
        // full ring buffer still shows up here.
        let traced: Vec<u32> = self.k.procs.keys().filter_map(|k| k.ok()).collect();
        for &pid in &traced {
            self.views.entry(pid).or_insert_with(|| View::new(pid));
        }
        let live: Vec<u32> = self
            .views
            .iter()
            .filter(|(_, v)| v.exited.is_none())
            .map(|(p, _)| *p)
            .collect();
        for pid in live {
            let Some(snap) = sync::check(&self.k, pid) else {
                self.exited(pid, None)?;
                continue;
            };
            let info = procfd::info(pid);
            let v = self.views.get_mut(&pid).expect("live view");
            let st = snap.stats;
            sync::resolve_kinds(&mut self.k, pid, &st, &mut v.kind_fix);
            let by_kind = v.kind_fix.apply(&st.by_kind);
            let dt = v.last_at.elapsed().as_secs_f64().max(1e-3);
            let (opened_per_s, closed_per_s) = if v.last.is_some() {
                (
                    st.opened.saturating_sub(v.last_opened) as f64 / dt,
                    st.closed.saturating_sub(v.last_closed) as f64 / dt,
                )
            } else {
                (0.0, 0.0)
            };
            v.last_opened = st.opened;
            v.last_closed = st.closed;
            v.last_at = Instant::now();
            v.last = Some((st.live, st.opened, st.closed, st.emfile));
            if let Some(i) = &info {
                v.comm.clone_from(&i.comm);
                v.ppid = v.ppid.or(i.ppid);
            }
            let row = ProcessRow {
                pid,
                ppid: v.ppid,
                comm: &v.comm,
                open_fds: st.live,
                soft_limit: info.as_ref().and_then(|i| i.soft_limit),
                hard_limit: info.as_ref().and_then(|i| i.hard_limit),
                by_kind: &by_kind,
                opened: st.opened,
                closed: st.closed,
                opened_per_s,
                closed_per_s,
                emfile: st.emfile,
                enfile: st.enfile,
                drift: snap.drift,
            };
            self.out.process(ts, &row)?;
            // The kernel side flags what it could not follow exactly (a user
            // read that failed, a loop cap): resync even when the count agrees.
            let inexact = st.inexact > v.seen_inexact;
            v.seen_inexact = st.inexact;
            let drift = snap.drift.filter(|&d| d != 0);
            if drift.is_some() || inexact {
                match sync::resync(&mut self.k, pid, sync::Origin::Drift) {
                    Ok(()) => {
                        // The resync recounted every kind from the entries.
                        if let Some(v) = self.views.get_mut(&pid) {
                            v.kind_fix = sync::KindFix::default();
                        }
                        self.out.resynced(ts, pid, drift)?
                    }
                    Err(e) => eprintln!("fdtrace: resync of pid {pid} failed: {e:#}"),
                }
            }
        }
        self.out.flush()
    }

    /// Reports kernel-side losses since the last report.
    fn report_counters(&mut self, ts: f64) -> io::Result<()> {
        for (slot, idx) in [CNT_RINGBUF_FULL, CNT_FDS_MAP_FULL, CNT_PROCS_MAP_FULL]
            .into_iter()
            .enumerate()
        {
            let total = self.k.counter(idx);
            let delta = total - self.counters_seen[slot];
            self.counters_seen[slot] = total;
            if delta == 0 {
                continue;
            }
            match idx {
                CNT_RINGBUF_FULL => self.out.lost(ts, delta)?,
                CNT_FDS_MAP_FULL => {
                    self.out
                        .map_full(ts, "fds", delta, self.max_fds, "--max-fds")?
                }
                _ => self
                    .out
                    .map_full(ts, "procs", delta, self.max_procs, "--max-procs")?,
            }
        }
        Ok(())
    }

    fn summary(&mut self, elapsed: Duration) -> io::Result<()> {
        let rows: Vec<SummaryRow> = self
            .views
            .iter()
            .map(|(&pid, v)| {
                let (open, opened, closed, emfile) = match (v.exited, v.last) {
                    (Some((o, op, cl)), last) => (o, op, cl, last.map_or(0, |l| l.3)),
                    (None, Some(l)) => l,
                    (None, None) => (0, 0, 0, 0),
                };
                SummaryRow {
                    pid,
                    comm: v.comm.clone(),
                    open_fds: open,
                    opened,
                    closed,
                    emfile,
                    exited: v.exited.is_some(),
                }
            })
            .collect();
        self.out.summary(elapsed.as_secs_f64(), &rows)
    }
}
