//! The session: attach, then the event loop (report tick, ring buffer
//! readable, signals, deadline). Each report runs the phases one way:
//! kernel -> reconcile -> enrich -> analysis -> sinks; each event from the
//! ring buffer goes kernel -> enrich -> analysis -> sinks.
use std::{collections::BTreeMap, io, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    analysis::{
        self, Config, Containers, Notice, ProcessAnalysis, ProcessSample, Report, Request, Start,
        Summary, Thresholds, Totals,
    },
    cli::{Cli, Command},
    enrich::{
        self, ProcessEnrichment,
        attribution::{Attributions, ProcessAttribution},
        label, process,
        symbols::Symbols,
    },
    error::Fatal,
    kernel::{
        self, FdTable, Kernel, Limits, LossCounters,
        events::{self, KernelEvent},
    },
    procfd,
    reconcile::{self, ReconcileState},
    sinks::{self, Console, Ndjson, Sinks, Top},
    spawn,
};

/// Exit code of `--fail-on` when a process reached the status.
const EXIT_STATUS_REACHED: u8 = 3;

/// What each phase keeps of one traced process between reports.
struct Traced {
    table: FdTable,
    reconcile: ReconcileState,
    enrich: ProcessEnrichment,
    analysis: ProcessAnalysis,
    /// No longer traced at the last report, with no exit event yet.
    gone: bool,
}

impl Traced {
    fn new(enrich: ProcessEnrichment, cfg: Config) -> Self {
        Traced {
            table: FdTable::default(),
            reconcile: ReconcileState::default(),
            enrich,
            analysis: ProcessAnalysis::new(cfg),
            gone: false,
        }
    }
}

struct Session {
    k: Kernel,
    sinks: Sinks,
    procs: BTreeMap<u32, Traced>,
    losses: LossCounters,
    max_fds: u32,
    max_procs: u32,
    cfg: Config,
    symbols: Symbols,
    attributions: Attributions,
    containers: Containers,
    started: Instant,
    /// The `run` command's reaper, kept for the session.
    child: Option<spawn::Spawned>,
    /// Node mode is on.
    node: bool,
}

fn request(cli: &Cli) -> Request {
    let command = match &cli.command {
        Some(Command::Run { argv, .. }) => Some(
            argv.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        ),
        _ => None,
    };
    let run_follows = matches!(&cli.command, Some(Command::Run { no_follow, .. }) if !no_follow);
    Request {
        pids: cli.pids.clone(),
        command,
        follow: cli.follow || run_follows,
        interval: cli.interval,
        duration: cli.duration,
        window: cli.window,
        min_age: cli.min_age,
        top: cli.top,
        fail_on: cli.fail_on,
        stacks: !cli.no_stacks,
        thresholds: Thresholds {
            warn_pct: cli.warn_pct,
            crit_pct: cli.crit_pct,
            warn_within: cli.warn_within,
            crit_within: cli.crit_within,
        },
    }
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    // A wrong pid is the user's to fix before anything else.
    for &pid in &cli.pids {
        if !procfd::exists(pid) {
            return Err(Fatal::NoSuchPid(pid).into());
        }
    }
    // The runtimes' files and the host's cgroups are read under
    // --host-root; /proc is fdtrace's own (the host's, under hostPID).
    if !cli.host_root.is_dir() {
        return Err(Fatal::Usage(format!(
            "--host-root {}: not a directory",
            cli.host_root.display()
        ))
        .into());
    }
    // Node mode: what --all / --cgroup / --container / --pod select (an
    // ambiguous or unknown one is a usage error, before anything loads).
    let node = kernel::node::selection(&kernel::node::Filters {
        all: cli.all,
        cgroups: &cli.cgroups,
        containers: &cli.containers,
        pods: &cli.pods,
        host_root: &cli.host_root,
    })?;
    let limits = Limits {
        max_fds: cli.max_fds(),
        max_procs: cli.max_procs(),
        stack_rate: if cli.no_stacks { 0 } else { cli.stack_rate },
        node: node.as_ref().map_or(fdtrace_common::NODE_OFF, |n| n.mode()),
    };
    if let Some(Command::NoopHooks) = cli.command {
        noop_hooks(&limits).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if cli.pids.is_empty() && cli.command.is_none() && node.is_none() {
        return Err(Fatal::Usage(
            "nothing to trace: give --pid PID, --all, --cgroup PATH, or run -- CMD [ARGS...] \
             (see fdtrace --help)"
                .into(),
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

    let req = request(&cli);
    let cfg = Config {
        window: cli.window,
        min_age: cli.min_age,
        thresholds: req.thresholds,
        top: cli.top,
    };
    let sink: Box<dyn sinks::Sink> = if cli.json {
        Box::new(Ndjson::new(io::stdout()))
    } else {
        let shares_terminal = matches!(cli.command, Some(Command::Run { .. }));
        Box::new(Top::new(io::stdout(), Console::detect(shares_terminal)))
    };
    let mut s = Session {
        k,
        sinks: Sinks(vec![sink]),
        procs: BTreeMap::new(),
        losses: LossCounters::default(),
        max_fds: limits.max_fds,
        max_procs: limits.max_procs,
        cfg,
        symbols: Symbols::new(),
        attributions: Attributions::new(&cli.host_root, "/proc"),
        containers: Containers::default(),
        started: Instant::now(),
        child: None,
        node: node.is_some(),
    };
    for &pid in &cli.pids {
        let found = reconcile::attach(&mut s.k, pid, cli.follow)
            .with_context(|| format!("attaching to pid {pid}"))?;
        let mut enrich = ProcessEnrichment::read(pid);
        enrich.seed_labels(pid, found);
        s.procs.insert(pid, Traced::new(enrich, cfg));
    }
    if let Some(sel) = &node {
        for (pid, found) in kernel::node::start(&mut s.k, sel, &cli.host_root)? {
            if s.procs.contains_key(&pid) {
                continue; // also given with --pid
            }
            let mut enrich = ProcessEnrichment::read(pid);
            enrich.seed_labels(pid, found);
            s.procs.insert(pid, Traced::new(enrich, cfg));
        }
    }
    if let Some(Command::Run { no_follow, argv }) = &cli.command {
        let spawned = spawn::start(&mut s.k, argv, !no_follow)?;
        let enrich = ProcessEnrichment::read(spawned.pid);
        s.procs.insert(spawned.pid, Traced::new(enrich, cfg));
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
        s.sinks.start(&Start {
            ts: sinks::now(),
            request: req,
        })?;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    s.events(ring.get_mut())?;
                    s.report()?;
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    s.events(guard.get_inner_mut())?;
                    guard.clear_ready();
                    s.sinks.flush()?;
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut deadline => break,
            }
            // Node mode goes on while its selection is empty.
            if node.is_none() && s.procs.values().all(|p| p.analysis.exited()) {
                break;
            }
        }
        s.events(ring.get_mut())?;
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
        .is_some_and(|on| s.procs.values().any(|p| p.analysis.worst() >= on));
    Ok(if reached {
        ExitCode::from(EXIT_STATUS_REACHED)
    } else {
        ExitCode::SUCCESS
    })
}

async fn noop_hooks(limits: &Limits) -> Result<()> {
    let _ebpf = kernel::noop_hooks(limits)?;
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
    fn events(&mut self, ring: &mut RingBuf<MapData>) -> io::Result<()> {
        for ev in events::drain(ring) {
            self.event(ev)?;
        }
        Ok(())
    }

    fn event(&mut self, ev: KernelEvent) -> io::Result<()> {
        let ts = sinks::now();
        match ev {
            KernelEvent::Fork { pid, ppid, comm } => {
                // A pid reused after a report found the old process gone
                // and before its exit was reported (its exit event lost):
                // that one ends first.
                if self
                    .procs
                    .get(&pid)
                    .is_some_and(|p| p.gone && !p.analysis.exited())
                {
                    self.exited(pid, None)?;
                }
                let mut enrich = ProcessEnrichment::new(comm, Some(ppid));
                if let Some(parent) = self.procs.get(&ppid) {
                    enrich.who = ProcessAttribution::inherited(&parent.enrich.who);
                }
                self.procs.insert(pid, Traced::new(enrich, self.cfg));
                self.sinks.notice(&Notice::Fork { ts, pid, ppid })
            }
            KernelEvent::Exec {
                pid,
                comm,
                ts_ns,
                inherited,
            } => {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.enrich.comm.clone_from(&comm);
                    // A runtime moves a container's first process into its
                    // cgroup between fork and exec.
                    p.enrich.who.stale();
                }
                self.sinks.notice(&Notice::Exec {
                    ts,
                    pid,
                    comm: comm.clone(),
                })?;
                if inherited > 0 {
                    self.inherited(ts, pid, ts_ns, &comm)?;
                }
                Ok(())
            }
            KernelEvent::Exit { pid, comm, totals } => {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.enrich.comm = comm;
                }
                self.exited(pid, Some(totals))
            }
            KernelEvent::FdError {
                pid,
                tid,
                errno,
                syscall,
                path,
                stack_id,
            } => {
                let resource = path.map(|p| label::normalize_path(&p));
                let canon = self.symbols.site(&self.k, pid, stack_id);
                let stack = self.symbols.frames(pid, canon);
                let finding = analysis::fd_error(
                    syscall,
                    resource.as_deref(),
                    errno,
                    stack.first().map(String::as_str),
                    ts,
                );
                self.sinks.notice(&Notice::FdError {
                    ts,
                    pid,
                    tid,
                    syscall,
                    errno,
                    resource,
                    stack,
                })?;
                let key = analysis::fd_error_key(canon, syscall);
                self.finding(ts, pid, key, finding)
            }
            KernelEvent::Adopt { pid } => self.adopt(pid),
            KernelEvent::Rlimit { pid } => {
                let info = process::info(pid).unwrap_or_default();
                self.sinks.notice(&Notice::Rlimit {
                    ts,
                    pid,
                    soft_limit: info.soft_limit,
                    hard_limit: info.hard_limit,
                })
            }
        }
    }

    /// Node mode began tracing `pid` on its own: its table is seeded now.
    fn adopt(&mut self, pid: u32) -> io::Result<()> {
        if self.procs.get(&pid).is_some_and(|p| !p.analysis.exited()) {
            return Ok(());
        }
        let mut enrich = ProcessEnrichment::read(pid);
        match reconcile::attach(&mut self.k, pid, true) {
            Ok(found) => enrich.seed_labels(pid, found),
            // Gone already: its exit event follows.
            Err(e) => eprintln!("fdtrace: seeding pid {pid}: {e:#}"),
        }
        self.procs.insert(pid, Traced::new(enrich, self.cfg));
        Ok(())
    }

    /// An event finding, once per key and process.
    fn finding(&mut self, ts: f64, pid: u32, key: String, f: analysis::Finding) -> io::Result<()> {
        let Some(p) = self.procs.get_mut(&pid) else {
            return Ok(());
        };
        match p.analysis.event_finding(key, f) {
            Some(finding) => self.sinks.notice(&Notice::Finding { ts, pid, finding }),
            None => Ok(()),
        }
    }

    /// A process exec'd holding fds >= 3 without close-on-exec.
    fn inherited(&mut self, ts: f64, pid: u32, exec_ns: u64, comm: &str) -> io::Result<()> {
        let fds = enrich::inherited_fds(&self.k, pid, exec_ns);
        match analysis::inherited(comm, fds, ts) {
            Some(f) => self.finding(ts, pid, format!("inherited {comm}"), f),
            None => Ok(()),
        }
    }

    /// `totals` at exit, from the exit event; None when the event was lost
    /// and only the last report is known.
    fn exited(&mut self, pid: u32, totals: Option<Totals>) -> io::Result<()> {
        let Some(p) = self.procs.get_mut(&pid) else {
            return Ok(());
        };
        let totals = totals.or(p.analysis.last_totals()).unwrap_or_default();
        if !p.analysis.exit(totals) {
            return Ok(());
        }
        p.table.clear();
        p.enrich.forget_fds();
        self.containers.exited(pid, p.enrich.who.current(), totals);
        let comm = p.enrich.comm.clone();
        self.symbols.forget(pid);
        self.sinks.notice(&Notice::Exit {
            ts: sinks::now(),
            pid,
            comm,
            totals,
        })
    }

    fn report(&mut self) -> io::Result<()> {
        let mut report = Report {
            ts: sinks::now(),
            losses: self.losses.read(&self.k, self.max_fds, self.max_procs),
            processes: Vec::new(),
            containers: Vec::new(),
        };
        let t = self.started.elapsed().as_secs_f64();
        // The kernel map says who is traced: a fork or exit event lost to a
        // full ring buffer still shows up here.
        let traced: Vec<u32> = self.k.procs.keys().filter_map(|k| k.ok()).collect();
        for pid in traced {
            if !self.procs.contains_key(&pid) {
                // An adoption whose event was lost is seeded here.
                let adopted = self
                    .k
                    .stats_of(pid)
                    .is_some_and(|st| st.flags & fdtrace_common::PROC_ADOPTED != 0);
                if adopted {
                    self.adopt(pid)?;
                    continue;
                }
                let enrich = ProcessEnrichment::read(pid);
                self.procs.insert(pid, Traced::new(enrich, self.cfg));
            }
        }
        let live: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| !p.analysis.exited())
            .map(|(pid, _)| *pid)
            .collect();
        let now_ns = kernel::monotonic_ns();
        for pid in live {
            // Kernel, checked against /proc.
            let p = self.procs.get_mut(&pid).expect("traced");
            let Some(snap) = reconcile::check(&self.k, pid, &mut p.reconcile, self.node) else {
                // The kernel side sends the exit event before it lets the
                // process go, so the event (with the final figures) is in
                // the ring buffer, drained before the next report; only if
                // it was lost is the exit reported from here.
                let p = self.procs.get_mut(&pid).expect("traced");
                if std::mem::replace(&mut p.gone, true) {
                    self.exited(pid, None)?;
                }
                continue;
            };
            let p = self.procs.get_mut(&pid).expect("traced");
            p.gone = false;
            if let Err(e) = p.table.refresh(&self.k, pid, snap.stats.generation) {
                // The next report tries again.
                eprintln!("fdtrace: reading the fd entries of pid {pid} failed: {e}");
            }
            // Reconcile.
            let rec = reconcile::reconcile(&mut self.k, pid, &mut p.reconcile, &mut p.table, &snap);
            // Enrich.
            let info = process::info(pid);
            if let Some(i) = &info {
                p.enrich.comm.clone_from(&i.comm);
                p.enrich.ppid = p.enrich.ppid.or(i.ppid);
            }
            let (comm, ppid) = (p.enrich.comm.clone(), p.enrich.ppid);
            self.attributions.refresh(pid, &mut p.enrich.who);
            let attribution = p.enrich.who.current().clone();
            let enriched = p.enrich.enrich(
                &self.k,
                &mut self.symbols,
                pid,
                &p.table,
                now_ns,
                self.cfg.min_age,
            );
            // Analysis.
            let sample = ProcessSample {
                pid,
                ppid,
                comm: &comm,
                ts: report.ts,
                t,
                now_ns,
                soft_limit: info.as_ref().and_then(|i| i.soft_limit),
                hard_limit: info.as_ref().and_then(|i| i.hard_limit),
                counts: rec.counts,
                drift: rec.drift,
                resync: rec.resync,
                fds: enriched.fds,
                fds_version: enriched.version,
                tcp_states: enriched.tcp_states,
                stacks: self.symbols.stacks(pid),
                attribution,
            };
            report.processes.push(p.analysis.update(&sample));
        }
        report.containers = self.containers.report(report.ts, &report.processes);
        self.attributions.retain(
            self.procs
                .values()
                .filter(|p| !p.analysis.exited())
                .map(|p| &p.enrich.who),
        );
        // Sinks.
        self.sinks.report(&report)
    }

    fn summary(&mut self) -> io::Result<()> {
        let processes = self
            .procs
            .iter()
            .map(|(&pid, p)| {
                p.analysis
                    .summary(pid, &p.enrich.comm, self.symbols.stacks(pid))
            })
            .collect();
        self.sinks.summary(&Summary {
            ts: sinks::now(),
            duration_s: self.started.elapsed().as_secs_f64(),
            processes,
        })
    }
}
