//! The session: attach, then every interval report each traced process (its
//! counts checked against /proc, its call sites and leak rates); between
//! reports, handle fork/exec/exit/EMFILE/rlimit events from the ring buffer.
use std::{collections::BTreeMap, io, os::fd::AsFd as _, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use fdtrace_common::{
    CNT_FDS_MAP_FULL, CNT_PROCS_MAP_FULL, CNT_RINGBUF_FULL, EV_EMFILE, EV_ENFILE, EV_EXEC, EV_EXIT,
    EV_FORK, EV_RLIMIT, Event, FdKind, PROC_SHARED_TABLE, syscalls,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    cli::{Cli, Command},
    error::Fatal,
    label,
    leaks::{self, Finding, ProcLeaks},
    loader::{Kernel, Limits},
    output::{FdErrorRow, Output, ProcessRow, SiteRow, SummaryRow, now},
    procfd,
    scan::LiveFd,
    seed, spawn,
    symbols::Symbols,
    sync,
};

/// Exit code of `--fail-on` when a process reached the status.
const EXIT_STATUS_REACHED: u8 = 3;

/// What user space remembers of a traced process between reports.
struct View {
    comm: String,
    ppid: Option<u32>,
    last_opened: u64,
    last_closed: u64,
    last_at: Instant,
    /// Final figures once it exited (kept for the summary).
    exited: Option<(u64, u64, u64)>,
    /// (open, opened, closed, emfile + enfile) at the last report.
    last: Option<(u64, u64, u64, u64)>,
    kind_fix: sync::KindFix,
    /// The kernel's `inexact` count at the last report.
    seen_inexact: u64,
    leaks: ProcLeaks,
    /// Its open entries in the kernel map, as last read, and its
    /// ProcStats::generation before that read: the map is read again only
    /// for processes whose table changed since.
    fds: Vec<LiveFd>,
    fds_generation: Option<u64>,
    /// Moves on whenever `fds` changes, for ProcLeaks::update.
    fds_version: u64,
    /// No longer traced at the last report, with no exit event yet.
    gone: bool,
}

impl View {
    fn new(pid: u32, cfg: leaks::Config) -> Self {
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
            leaks: ProcLeaks::new(cfg),
            fds: Vec::new(),
            fds_generation: None,
            fds_version: 0,
            gone: false,
        }
    }
}

fn event_comm(ev: &Event) -> String {
    c_str(&ev.comm)
}

fn c_str(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
}

struct Session {
    k: Kernel,
    out: Output,
    views: BTreeMap<u32, View>,
    child: Option<spawn::Spawned>,
    counters_seen: [u64; 3],
    max_fds: u32,
    max_procs: u32,
    cfg: leaks::Config,
    top: usize,
    symbols: Symbols,
    started: Instant,
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    // A wrong pid is the user's to fix before anything else.
    for &pid in &cli.pids {
        if !procfd::exists(pid) {
            return Err(Fatal::NoSuchPid(pid).into());
        }
    }
    let limits = Limits {
        max_fds: cli.max_fds,
        max_procs: cli.max_procs,
        stack_rate: if cli.no_stacks { 0 } else { cli.stack_rate },
    };
    if let Some(Command::NoopHooks) = cli.command {
        noop_hooks(&limits).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if cli.pids.is_empty() && cli.command.is_none() {
        return Err(Fatal::Usage(
            "nothing to trace: give --pid PID, or run -- CMD [ARGS...] (see fdtrace --help)".into(),
        )
        .into());
    }
    let mut k = Kernel::load(&limits)?;
    let ring = k.events.take().context("ring buffer already taken")?;
    // SAFETY: the RingBuf owns its map fd, which stays open and the same for
    // the AsyncFd's whole life.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| e.into_parts().1)
        .context("polling the ring buffer")?;

    let cfg = leaks::Config {
        window: cli.window,
        min_age: cli.min_age,
        thresholds: leaks::Thresholds {
            warn_pct: cli.warn_pct,
            crit_pct: cli.crit_pct,
            warn_within: cli.warn_within,
            crit_within: cli.crit_within,
        },
    };
    let mut s = Session {
        k,
        out: Output::new(cli.json),
        views: BTreeMap::new(),
        child: None,
        counters_seen: [0; 3],
        max_fds: cli.max_fds,
        max_procs: cli.max_procs,
        cfg,
        top: cli.top,
        symbols: Symbols::new(),
        started: Instant::now(),
    };
    for &pid in &cli.pids {
        let found = sync::attach(&mut s.k, pid, cli.follow)
            .with_context(|| format!("attaching to pid {pid}"))?;
        let mut view = View::new(pid, cfg);
        view.leaks.seed_labels(pid, found);
        s.views.insert(pid, view);
    }
    if let Some(Command::Run { no_follow, argv }) = &cli.command {
        let spawned = spawn::start(&mut s.k, argv, !no_follow)?;
        s.views.insert(spawned.pid, View::new(spawned.pid, cfg));
        s.child = Some(spawned);
    }

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
        s.summary()
    }
    .await;
    match result {
        // A closed stdout (`fdtrace ... | head`) ends the session quietly.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        other => other.context("writing the report")?,
    }
    let reached = cli
        .fail_on
        .is_some_and(|on| s.views.values().any(|v| v.leaks.worst >= on));
    Ok(if reached {
        ExitCode::from(EXIT_STATUS_REACHED)
    } else {
        ExitCode::SUCCESS
    })
}

async fn noop_hooks(limits: &Limits) -> Result<()> {
    let _ebpf = crate::loader::noop_hooks(limits)?;
    eprintln!("fdtrace: an empty program attached to tp_btf/sys_exit; Ctrl-C detaches");
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
                // A pid reused after a report found the old process gone
                // and before its exit was reported (its exit event lost):
                // that one ends first.
                if self
                    .views
                    .get(&ev.tgid)
                    .is_some_and(|v| v.gone && v.exited.is_none())
                {
                    self.exited(ev.tgid, None)?;
                }
                let mut view = View::new(ev.tgid, self.cfg);
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
                self.out.exec(ts, ev.tgid, &comm)?;
                if ev.inherited > 0 {
                    self.inherited(ts, ev, &comm)?;
                }
                Ok(())
            }
            EV_EXIT => {
                if let Some(v) = self.views.get_mut(&ev.tgid) {
                    v.comm = event_comm(ev);
                }
                self.exited(ev.tgid, Some((ev.live, ev.opened, ev.closed)))
            }
            EV_EMFILE | EV_ENFILE => self.fd_error(ts, ev),
            EV_RLIMIT => {
                let info = procfd::info(ev.tgid).unwrap_or_default();
                self.out
                    .rlimit(ts, ev.tgid, info.soft_limit, info.hard_limit)
            }
            _ => Ok(()),
        }
    }

    /// A call failed with EMFILE/ENFILE: reported with its call site, and a
    /// finding once per site.
    fn fd_error(&mut self, ts: f64, ev: &Event) -> io::Result<()> {
        let errno = if ev.kind == EV_EMFILE {
            "EMFILE"
        } else {
            "ENFILE"
        };
        let syscall = syscalls::name(u64::from(ev.syscall)).unwrap_or("unknown");
        let path = c_str(&ev.path);
        let resource = (!path.is_empty()).then(|| label::normalize_path(&path));
        let canon = self.symbols.site(&self.k, ev.tgid, ev.site);
        let stack = self.symbols.frames(ev.tgid, canon);
        self.out.fd_error(
            ts,
            &FdErrorRow {
                pid: ev.tgid,
                tid: ev.aux,
                syscall,
                errno,
                resource: resource.as_deref(),
                stack: &stack,
            },
        )?;
        let Some(v) = self.views.get_mut(&ev.tgid) else {
            return Ok(());
        };
        let at = stack
            .first()
            .map_or("an unknown call site".to_string(), |f| f.clone());
        let what = resource.map_or(String::new(), |r| format!(" of {r}"));
        let finding = Finding {
            kind: "emfile",
            message: format!("{syscall}{what} failed with {errno} at {at}"),
            recommendation: if errno == "EMFILE" {
                "The process is out of fds: fix the fastest-growing site first; raising RLIMIT_NOFILE only delays the failure.".into()
            } else {
                "The whole system is out of open files (fs.file-max): find the process holding most of them.".into()
            },
            site: None,
            count: None,
            fds: None,
        };
        let key = format!("emfile {canon} {syscall}");
        match v.leaks.event_finding(key, finding) {
            Some(f) => self.out.finding(ts, ev.tgid, &f),
            None => Ok(()),
        }
    }

    /// A process exec'd holding fds >= 3 without close-on-exec: those the
    /// kernel map had from before the exec, named from /proc.
    fn inherited(&mut self, ts: f64, ev: &Event, comm: &str) -> io::Result<()> {
        let pid = ev.tgid;
        let mut sockets = None;
        // A walk of its own table, not of the whole map: execs are frequent
        // (every command a traced shell runs).
        let table = match seed::entries(self.k.entries.as_fd(), pid) {
            Ok(t) => t,
            Err(e) => {
                if procfd::exists(pid) {
                    eprintln!("fdtrace: reading the fd entries of pid {pid} failed: {e}");
                }
                Vec::new()
            }
        };
        let mut held: Vec<LiveFd> = table
            .into_iter()
            .filter(|f| f.fd > 2 && f.info.created_ns < ev.ts_ns)
            .collect();
        held.sort_unstable_by_key(|f| f.fd);
        let links = label::Links::open(self.k.names.as_fd(), pid, held.len());
        let fds: Vec<String> = held
            .into_iter()
            .map(|LiveFd { fd, info }| {
                let kind = FdKind::from_u8(info.kind);
                let what = links
                    .as_ref()
                    .and_then(|d| label::label(d, fd, kind, info.detail, &mut sockets))
                    .map_or(kind.name().to_string(), |l| l.text.to_string());
                format!("{fd} ({what})")
            })
            .collect();
        let Some(v) = self.views.get_mut(&pid) else {
            return Ok(());
        };
        let finding = Finding {
            kind: "inherited",
            message: format!(
                "{comm} started holding {} fds it did not open (inherited without close-on-exec): {}",
                fds.len(),
                fds.join(", ")
            ),
            recommendation: "Open fds with O_CLOEXEC / SOCK_CLOEXEC (or set FD_CLOEXEC), or start children with close_fds=True, so a child never inherits them.".into(),
            site: None,
            count: Some(fds.len() as u64),
            fds: Some(fds),
        };
        match v.leaks.event_finding(format!("inherited {comm}"), finding) {
            Some(f) => self.out.finding(ts, pid, &f),
            None => Ok(()),
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
        v.fds = Vec::new();
        v.leaks.forget_fds();
        let comm = v.comm.clone();
        self.symbols.forget(pid);
        self.out.exit(now(), pid, &comm, open, opened, closed)
    }

    /// Reads the kernel map's entries of `pid` again if its table changed
    /// (`generation`, read before this walk, moved) since they were last
    /// read, by a walk of its own fd table (seed::entries): a report costs
    /// what the changed processes hold, not what every traced process does.
    fn refresh_fds(&mut self, pid: u32, generation: u64) {
        let v = self.views.get_mut(&pid).expect("live view");
        if v.fds_generation == Some(generation) {
            return;
        }
        match seed::entries(self.k.entries.as_fd(), pid) {
            Ok(fds) => {
                // An fd opened and closed between two reports leaves the
                // same list: the grouping of it still holds.
                if fds != v.fds {
                    v.fds = fds;
                    v.fds_version += 1;
                }
                // A change during the walk moves the generation on, and the
                // next report reads again.
                v.fds_generation = Some(generation);
            }
            // The next report tries again.
            Err(e) => eprintln!("fdtrace: reading the fd entries of pid {pid} failed: {e}"),
        }
    }

    fn report(&mut self) -> io::Result<()> {
        let ts = now();
        let t = self.started.elapsed().as_secs_f64();
        self.report_counters(ts)?;
        // The kernel map says who is traced: a fork or exit event lost to a
        // full ring buffer still shows up here.
        let traced: Vec<u32> = self.k.procs.keys().filter_map(|k| k.ok()).collect();
        for &pid in &traced {
            self.views
                .entry(pid)
                .or_insert_with(|| View::new(pid, self.cfg));
        }
        let live: Vec<u32> = self
            .views
            .iter()
            .filter(|(_, v)| v.exited.is_none())
            .map(|(p, _)| *p)
            .collect();
        let now_ns = sync::monotonic_ns();
        for pid in live {
            let Some(snap) = sync::check(&self.k, pid) else {
                // The kernel side sends the exit event before it lets the
                // process go, so the event (with the final figures) is in
                // the ring buffer, drained before the next report; only if
                // it was lost is the exit reported from here.
                let v = self.views.get_mut(&pid).expect("live view");
                if std::mem::replace(&mut v.gone, true) {
                    self.exited(pid, None)?;
                }
                continue;
            };
            self.refresh_fds(pid, snap.stats.generation);
            let info = procfd::info(pid);
            let v = self.views.get_mut(&pid).expect("live view");
            v.gone = false;
            let st = snap.stats;
            if sync::resolve_kinds(&mut self.k, pid, &st, &mut v.kind_fix, &mut v.fds) {
                v.fds_version += 1;
            }
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
            v.last = Some((st.live(), st.opened, st.closed, st.emfile + st.enfile));
            if let Some(i) = &info {
                v.comm.clone_from(&i.comm);
                v.ppid = v.ppid.or(i.ppid);
            }
            let soft_limit = info.as_ref().and_then(|i| i.soft_limit);
            let (k, symbols) = (&self.k, &mut self.symbols);
            let findings = v.leaks.update(
                pid,
                &mut |id| symbols.site(k, pid, id),
                &|n| label::Links::open(k.names.as_fd(), pid, n),
                &v.fds,
                v.fds_version,
                now_ns,
                t,
                st.live(),
                soft_limit,
                st.emfile + st.enfile > 0,
            );
            let row = ProcessRow {
                pid,
                ppid: v.ppid,
                comm: &v.comm,
                open_fds: st.live(),
                soft_limit,
                hard_limit: info.as_ref().and_then(|i| i.hard_limit),
                by_kind: &by_kind,
                opened: st.opened,
                closed: st.closed,
                opened_per_s,
                closed_per_s,
                emfile: st.emfile,
                enfile: st.enfile,
                drift: snap.drift,
                status: v.leaks.status,
                leak_per_s: v.leaks.leak_per_s,
                seconds_to_emfile: v.leaks.seconds_to_emfile,
                stacks_not_sampled: st.not_sampled,
                shares_fd_table: st.flags & PROC_SHARED_TABLE != 0,
            };
            self.out.process(ts, &row)?;
            for site in v.leaks.top_sites(self.top) {
                let stack = self.symbols.frames(pid, site.key.stack);
                self.out.site(
                    ts,
                    &SiteRow {
                        pid,
                        id: &site.id,
                        kind: FdKind::from_u8(site.key.kind).name(),
                        resource: &site.key.resource,
                        stack: &stack,
                        open_fds: site.open,
                        leak_per_s: site.leak_per_s,
                        oldest_age_s: site.oldest_age_s,
                    },
                )?;
            }
            for f in &findings {
                self.out.finding(ts, pid, f)?;
            }
            // The kernel side flags what it could not follow exactly (a user
            // read that failed, a loop cap): resync even when the count agrees.
            let inexact = st.inexact > v.seen_inexact;
            v.seen_inexact = st.inexact;
            let drift = snap.drift.filter(|&d| d != 0);
            if drift.is_some() || inexact {
                let resynced = sync::resync(&mut self.k, pid);
                let v = self.views.get_mut(&pid).expect("live view");
                // Read the entries again next time, whatever part of the
                // resync was done.
                v.fds_generation = None;
                match resynced {
                    Ok(()) => {
                        // The resync recounted every kind from the entries.
                        v.kind_fix = sync::KindFix::default();
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

    fn summary(&mut self) -> io::Result<()> {
        let mut rows = Vec::new();
        for (&pid, v) in &self.views {
            let (open, opened, closed, emfile) = match (v.exited, v.last) {
                (Some((o, op, cl)), last) => (o, op, cl, last.map_or(0, |l| l.3)),
                (None, Some(l)) => l,
                (None, None) => (0, 0, 0, 0),
            };
            let sites = v
                .leaks
                .top_sites(3)
                .into_iter()
                .filter(|s| s.leak_per_s >= 0.05)
                .map(|s| {
                    (
                        FdKind::from_u8(s.key.kind).name().to_string(),
                        s.key.resource.to_string(),
                        self.symbols.frames(pid, s.key.stack).to_vec(),
                        s.open,
                        s.leak_per_s,
                        s.oldest_age_s,
                    )
                })
                .collect();
            rows.push(SummaryRow {
                pid,
                comm: v.comm.clone(),
                open_fds: open,
                opened,
                closed,
                emfile,
                exited: v.exited.is_some(),
                status: if v.exited.is_some() {
                    v.leaks.worst
                } else {
                    v.leaks.status
                },
                leak_per_s: v.leaks.leak_per_s,
                seconds_to_emfile: v.leaks.seconds_to_emfile,
                sites,
                findings: v.leaks.findings.clone(),
            });
        }
        self.out
            .summary(self.started.elapsed().as_secs_f64(), &rows)
    }
}
