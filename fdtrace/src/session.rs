//! The session: attach, then the event loop (report tick, ring buffer
//! readable, signals, deadline). Each report runs the phases one way:
//! kernel -> reconcile -> enrich -> analysis -> sinks; each event from the
//! ring buffer goes kernel -> enrich -> analysis -> sinks.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    process::ExitCode,
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use fdtrace_common::{EVENTS_DRAIN_MS, EVENTS_IDLE_DRAIN_MS, ProcStats};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    analysis::{
        self, Config, Containers, Ending, FindingKind, Notice, ProcessAnalysis, ProcessSample,
        ProcessSummary, Report, Request, SessionCounts, SessionEnd, Start, Status, Summary,
        Thresholds, Totals, short_lived::Ended,
    },
    cli::{Cli, Command},
    enrich::{
        self, ProcessEnrichment,
        attribution::{Attributions, Cgroup, ProcessAttribution},
        label::{self, NetTables},
        process::{self, Identity, KeptStat},
        python::{Found, PySites},
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
    /// Tells it from a later process with the same pid; None until read.
    identity: Option<Identity>,
    /// When its kernel entry was made (`ProcStats::registered_ns`), from
    /// its first report: a later entry under its pid is a later process.
    registered_ns: Option<u64>,
    /// Its /proc/PID/stat, read again only when due.
    stat: KeptStat,
    /// Found in the kernel map by a report before its fork event was
    /// drained: that event, when it comes, is its own.
    fork_pending: bool,
}

impl Traced {
    fn new(enrich: ProcessEnrichment, cfg: Config) -> Self {
        Traced {
            table: FdTable::default(),
            reconcile: ReconcileState::default(),
            enrich,
            analysis: ProcessAnalysis::new(cfg),
            gone: false,
            identity: None,
            registered_ns: None,
            stat: KeptStat::default(),
            fork_pending: false,
        }
    }
}

/// What a fork event for a pid already known does with the process known
/// under it.
#[derive(Debug, PartialEq, Eq)]
enum ForkOfKnown {
    /// It is the forked child itself, found by a report first: kept.
    Keep,
    /// The pid was reused after a report found the old process gone and
    /// before its exit was reported (its exit event lost): that one ends
    /// first.
    EndFirst,
    /// Replaced by the new process.
    Replace,
}

fn fork_of_known(fork_pending: bool, gone: bool) -> ForkOfKnown {
    if fork_pending {
        ForkOfKnown::Keep
    } else if gone {
        ForkOfKnown::EndFirst
    } else {
        ForkOfKnown::Replace
    }
}

/// Whether the kernel entry of a traced pid, made at `registered_ns`, is a
/// later one than the entry `known` (None at first sight, then kept): the
/// kernel side frees a process's entry at its exit and a later process
/// under the pid gets a new one, so a later entry is a later process even
/// when the exit event between them was lost.
fn later_entry(known: &mut Option<u64>, registered_ns: u64) -> bool {
    *known.get_or_insert(registered_ns) != registered_ns
}

struct Session {
    k: Kernel,
    sinks: Sinks,
    /// The processes traced now; one leaves at its exit, for `ended`.
    procs: BTreeMap<u32, Traced>,
    /// What the closing summary says of the processes that exited.
    ended: Ended,
    /// Processes that exited since the last report: the kernel frees a
    /// process's entry after it sends the exit event, so a report right
    /// after may still find it in the map, and must not take it for a
    /// new process.
    just_exited: HashSet<u32>,
    losses: LossCounters,
    /// What was lost and resynced since tracing began.
    counts: SessionCounts,
    max_fds: u32,
    max_procs: u32,
    cfg: Config,
    symbols: Symbols,
    attributions: Attributions,
    containers: Containers,
    python: PySites,
    started: Instant,
    /// The `run` command's reaper, kept for the session.
    child: Option<spawn::Spawned>,
    /// Node mode is on.
    node: bool,
    /// `--container` / `--pod`: the containers that start later.
    watch: kernel::node::Watch,
    /// Cgroups of containers whose bundle gave no names when the kernel
    /// first saw a process enter them (not written yet, or unreadable),
    /// with that process: a `--pod` may name them once it reads. Looked at
    /// again every report (the attributor rereads a bundle at most every
    /// RETRY_AFTER), until named or the cgroup is removed. The kernel tells
    /// of a cgroup once, so the resolved cgroup is held here: it stays in
    /// the attributor's cache, and is named from there, after that process
    /// is gone and others of the container run on.
    unnamed_cgroups: HashMap<u64, (u32, Rc<Cgroup>)>,
    host_root: std::path::PathBuf,
    /// Whether fdtrace lacks CAP_DAC_READ_SEARCH and has yet to say which
    /// processes it cannot name fds of.
    warn_unreadable: bool,
    /// Event findings given to the sinks, by kind and message: the same one
    /// of another process not in a report yet (a fork storm's children) is
    /// kept for the summary but not given again.
    shown_findings: HashSet<(FindingKind, String)>,
}

fn request(cli: &Cli) -> Request {
    let command = match &cli.command {
        Some(Command::Run { argv, .. }) => Some(
            argv.iter()
                .map(|a| crate::escape::lossless(a.as_encoded_bytes()))
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
    let (node, watch) = match node {
        Some((sel, watch)) => (Some(sel), watch),
        None => (None, kernel::node::Watch::default()),
    };
    let limits = Limits {
        max_fds: cli.max_fds(),
        max_procs: cli.max_procs(),
        stack_rate: if cli.no_stacks { 0 } else { cli.stack_rate },
        node: node.as_ref().map_or(fdtrace_common::NODE_OFF, |n| n.mode()),
        watch_cgroups: watch.active(),
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
    // Bound before anything is traced: an address in use ends fdtrace here.
    let metrics = match cli.metrics {
        Some(addr) => {
            let bounds = sinks::MetricsBounds {
                top: cli.metrics_top_processes,
                max: cli.metrics_max_processes,
            };
            let m = sinks::Metrics::serve(addr, cli.interval, bounds)
                .map_err(|e| Fatal::Environment(e.to_string()))?;
            Some(Box::new(m) as Box<dyn sinks::Sink>)
        }
        None => None,
    };
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
    let sink: Option<Box<dyn sinks::Sink>> = if cli.quiet {
        Some(Box::new(sinks::Warnings::new(io::stderr())))
    } else if cli.json {
        Some(Box::new(Ndjson::new(io::stdout())))
    } else {
        let shares_terminal = matches!(cli.command, Some(Command::Run { .. }));
        let top = Top::new(io::stdout(), Console::detect(shares_terminal));
        Some(Box::new(if cli.all { top.whole_node() } else { top }))
    };
    let caller_slots = k.caller_slots.take();
    let mut s = Session {
        k,
        sinks: Sinks(sink.into_iter().chain(metrics).collect()),
        procs: BTreeMap::new(),
        ended: Ended::default(),
        just_exited: HashSet::new(),
        losses: LossCounters::default(),
        counts: SessionCounts::default(),
        max_fds: limits.max_fds,
        max_procs: limits.max_procs,
        cfg,
        symbols: Symbols::new(caller_slots),
        attributions: Attributions::new(&cli.host_root, "/proc"),
        containers: Containers::default(),
        python: PySites::default(),
        started: Instant::now(),
        child: None,
        node: node.is_some(),
        watch,
        unnamed_cgroups: HashMap::new(),
        host_root: cli.host_root.clone(),
        warn_unreadable: !kernel::can_read_other_users_fds(),
        shown_findings: HashSet::new(),
    };
    // Processes that ended before they could be traced, reported as soon
    // as the report has started.
    let mut ended_at_attach = Vec::new();
    for &pid in &cli.pids {
        let before = process::stat(pid);
        let found = reconcile::attach(&mut s.k, pid, cli.follow);
        // Checked after registration: from then on the kernel side sees its
        // exit; before, only /proc can tell it is gone, a zombie, or
        // another process under the same pid.
        let after = process::stat(pid).map(|s| s.identity);
        let mut traced = Traced::new(ProcessEnrichment::read(pid), cfg);
        if traced.enrich.comm.is_empty()
            && let Some(b) = &before
        {
            // Gone already: its name is known from before.
            traced.enrich.comm.clone_from(&b.comm);
        }
        match attach_outcome(before.map(|s| s.identity), after) {
            Some(ending) => {
                s.k.unregister(pid);
                ended_at_attach.push((pid, ending));
            }
            None => {
                let found = found.with_context(|| format!("attaching to pid {pid}"))?;
                traced.enrich.seed_labels(pid, found);
                traced.identity = after;
            }
        }
        s.procs.insert(pid, traced);
        let py = s.python.look_at(pid, Instant::now());
        s.found_python(pid, py)
            .context("writing the Python notice")?;
    }
    // Said once the sinks have started: the whole-node view's screen shows
    // stderr lines from then on, and one written before would be drawn over.
    let mut hidden = Vec::new();
    if let Some(sel) = &node {
        let started = kernel::node::start(&mut s.k, sel, &cli.host_root)?;
        hidden = started.hidden;
        for (pid, found) in started.traced {
            if s.procs.contains_key(&pid) {
                continue; // also given with --pid
            }
            let mut enrich = ProcessEnrichment::read(pid);
            enrich.seed_labels(pid, found);
            s.procs.insert(pid, Traced::new(enrich, cfg));
            let py = s.python.attach(pid);
            s.found_python(pid, py)
                .context("writing the Python notice")?;
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
    // A dropped ssh session must not lose the report (stdout is often a
    // file: nohup, tee): SIGHUP ends it as SIGINT does.
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let deadline = async {
        match cli.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(cli.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The kernel side wakes this loop only when the ring fills up (see
    // EVENTS_DRAIN_MS): between reports, events are read that often while
    // they come, less often when none came (a wake-up of the loop costs
    // too: most of fdtrace's CPU on an idle host if it were every 20 ms).
    // Not at once: the first report (the tick's first, immediate) comes
    // first.
    let mut next_drain = Instant::now() + drain_delay(1);
    // A Python process just exec'd, whose loader has not mapped libpython
    // yet, is looked at again this often.
    let retry = async |at: Option<Instant>| match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    };

    let mut ended = SessionEnd::AllExited;
    let result: io::Result<()> = async {
        s.sinks.start(&Start {
            ts: sinks::now(),
            request: req,
        })?;
        for (pid, n) in hidden {
            reconcile::say_hidden(pid, n);
        }
        for (pid, ending) in ended_at_attach {
            s.exited(pid, None, ending)?;
        }
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
                _ = tokio::time::sleep_until(next_drain.into()) => {
                    let n = s.events(ring.get_mut())?;
                    if n > 0 {
                        s.sinks.flush()?;
                    }
                    next_drain = Instant::now() + drain_delay(n);
                }
                _ = retry(s.python.next_retry(Instant::now())) => {
                    for (pid, found) in s.python.retry(Instant::now()) {
                        s.found_python(pid, found)?;
                    }
                    s.sinks.flush()?;
                }
                _ = sigint.recv() => { ended = SessionEnd::Sigint; break }
                _ = sigterm.recv() => { ended = SessionEnd::Sigterm; break }
                _ = sighup.recv() => { ended = SessionEnd::Sighup; break }
                _ = &mut deadline => { ended = SessionEnd::Duration; break }
            }
            // Node mode goes on while its selection is empty.
            if node.is_none() && s.procs.is_empty() {
                break;
            }
        }
        s.end_child(ring.get_mut(), ended).await?;
        s.events(ring.get_mut())?;
        s.summary(ended)
    }
    .await;
    match result {
        // A closed stdout (`fdtrace ... | head`) ends the session quietly.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        other => other.context("writing the report")?,
    }
    let reached = cli
        .fail_on
        .is_some_and(|on| s.ended.worst().max(s.worst_running()) >= on);
    let child = s.child.as_ref().map(|c| ChildEnd {
        ending: c.ended(),
        stopped: c.stopped(),
    });
    Ok(ExitCode::from(exit_status(reached, child)))
}

/// The `run` command at the end of the session.
#[derive(Clone, Copy, Debug)]
struct ChildEnd {
    /// How it ended; None when it still runs.
    ending: Option<Ending>,
    /// fdtrace stopped it (--duration).
    stopped: bool,
}

/// fdtrace's exit status: 3 when --fail-on fired; else that of the `run`
/// command as a shell gives it (128 + N for signal N), unless fdtrace
/// itself stopped it; else 0.
fn exit_status(reached: bool, child: Option<ChildEnd>) -> u8 {
    if reached {
        return EXIT_STATUS_REACHED;
    }
    match child {
        Some(ChildEnd {
            ending: Some(e),
            stopped: false,
        }) => e
            .shell_status()
            .map_or(0, |c| u8::try_from(c & 0xff).unwrap_or(0)),
        _ => 0,
    }
}

/// The warning, once, that fdtrace cannot name the fds the processes of
/// other users open (`others`: pid and comm); None when there are none.
fn unreadable_warning(others: &[(u32, String)]) -> Option<String> {
    if others.is_empty() {
        return None;
    }
    let list: Vec<String> = others
        .iter()
        .map(|(pid, comm)| format!("{pid} ({})", crate::escape::terminal(comm)))
        .collect();
    Some(format!(
        "without CAP_DAC_READ_SEARCH fdtrace cannot read /proc/PID/fd of other users' processes: \
         fds they open from now on are counted but not named (kind unknown): {}; grant \
         CAP_DAC_READ_SEARCH or run as root",
        list.join(", ")
    ))
}

/// Whether a process given with --pid ended before it could be traced,
/// from its identity before and after the kernel registered it; None when
/// it is traced.
fn attach_outcome(before: Option<Identity>, after: Option<Identity>) -> Option<Ending> {
    match (before, after) {
        (_, None) => Some(Ending::Exited),
        (Some(b), Some(a)) if b.start_time != a.start_time => Some(Ending::Exited),
        (_, Some(a)) if a.zombie => Some(Ending::Zombie),
        _ => None,
    }
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

/// How long until the next drain of the ring, after one that found `n`
/// events.
fn drain_delay(n: usize) -> Duration {
    Duration::from_millis(if n > 0 {
        EVENTS_DRAIN_MS
    } else {
        EVENTS_IDLE_DRAIN_MS
    })
}

impl Session {
    /// Handles the events in the ring; returns how many there were.
    fn events(&mut self, ring: &mut RingBuf<MapData>) -> io::Result<usize> {
        let evs = events::drain(ring);
        let n = evs.len();
        for ev in evs {
            self.event(ev)?;
        }
        Ok(n)
    }

    fn event(&mut self, ev: KernelEvent) -> io::Result<()> {
        let ts = sinks::now();
        match ev {
            KernelEvent::Fork { pid, ppid, comm } => {
                let known = self
                    .procs
                    .get(&pid)
                    .map(|p| fork_of_known(p.fork_pending, p.gone));
                if known == Some(ForkOfKnown::EndFirst) {
                    self.exited(pid, None, Ending::Exited)?;
                }
                let who = self
                    .procs
                    .get(&ppid)
                    .map(|parent| ProcessAttribution::inherited(&parent.enrich.who));
                if known == Some(ForkOfKnown::Keep) {
                    let p = self.procs.get_mut(&pid).expect("known");
                    p.fork_pending = false;
                    p.enrich.ppid = Some(ppid);
                    if p.enrich.comm.is_empty() {
                        p.enrich.comm = comm;
                    }
                    if let Some(who) = who {
                        p.enrich.who = who;
                    }
                } else {
                    let mut enrich = ProcessEnrichment::new(comm, Some(ppid));
                    if let Some(who) = who {
                        enrich.who = who;
                    }
                    self.procs.insert(pid, Traced::new(enrich, self.cfg));
                }
                self.python.fork(ppid, pid);
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
                    p.stat.forget();
                }
                self.sinks.notice(&Notice::Exec {
                    ts,
                    pid,
                    comm: comm.clone(),
                })?;
                if inherited > 0 {
                    self.inherited(ts, pid, ts_ns, &comm)?;
                }
                let py = self.python.look_at(pid, Instant::now());
                self.found_python(pid, py)
            }
            KernelEvent::Exit { pid, comm, totals } => {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.enrich.comm = comm;
                }
                // The `run` command: its reaper has its status as soon as
                // the kernel has finished its exit, moments after this event.
                let ending = match &mut self.child {
                    Some(c) if c.pid == pid => {
                        c.ending(Duration::from_secs(1)).unwrap_or(Ending::Exited)
                    }
                    _ => Ending::Exited,
                };
                self.exited(pid, Some(totals), ending)
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
                if let Some(p) = self.procs.get(&pid) {
                    self.containers.fd_error(pid, p.enrich.who.current(), errno);
                }
                let key = analysis::fd_error_key(canon, syscall);
                self.finding(ts, pid, key, finding)
            }
            KernelEvent::Adopt { pid } => self.adopt(pid),
            KernelEvent::Leave { pid, totals } => {
                self.exited(pid, Some(totals), Ending::LeftSelection)
            }
            KernelEvent::Cgroup { pid, id } => self.new_cgroup(pid, id),
            KernelEvent::Rlimit { pid } => {
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.stat.forget();
                }
                let info = process::read_info(pid).unwrap_or_default();
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
        if self.procs.contains_key(&pid) {
            return Ok(());
        }
        // Registered by user space while it exited (runc's short-lived
        // stage-1 process, listed in cgroup.procs): the kernel side never
        // sees it leave, so its entry goes here, not at an exit event.
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            self.k.unregister(pid);
            return Ok(());
        }
        let mut enrich = ProcessEnrichment::read(pid);
        match reconcile::attach(&mut self.k, pid, true) {
            Ok(found) => enrich.seed_labels(pid, found),
            // Gone already: its exit event follows.
            Err(e) => eprintln!("fdtrace: seeding pid {pid}: {e:#}"),
        }
        self.procs.insert(pid, Traced::new(enrich, self.cfg));
        let py = self.python.look_at(pid, Instant::now());
        self.found_python(pid, py)
    }

    /// `pid` entered cgroup `id`, new to node mode: when a `--container`
    /// or `--pod` names the container it is, that container's cgroup is
    /// selected and its processes traced.
    fn new_cgroup(&mut self, pid: u32, id: u64) -> io::Result<()> {
        if !self.watch.active() {
            return Ok(());
        }
        let Some(cg) = self.attributions.cgroup(pid, id) else {
            self.unnamed_cgroups.remove(&id);
            return Ok(());
        };
        let wanted = self.watch.wants(&cg);
        if wanted.is_none() && cg.unnamed() && self.watch.by_pod() {
            self.unnamed_cgroups.insert(id, (pid, cg));
        } else {
            self.unnamed_cgroups.remove(&id);
        }
        let Some(path) = wanted else {
            return Ok(());
        };
        let registered = match kernel::node::select(&mut self.k, &self.host_root, &path) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("fdtrace: selecting cgroup {path}: {e:#}");
                return Ok(());
            }
        };
        for pid in registered {
            self.adopt(pid)?;
        }
        Ok(())
    }

    /// What looking at `pid` for a Python found: its layout goes to the
    /// kernel (whose Python program is attached then, at the first), or
    /// the reason its frames cannot be read to the sinks, once.
    fn found_python(&mut self, pid: u32, found: Found) -> io::Result<()> {
        match found {
            Found::Python(layout) => {
                if let Err(e) = self.k.trace_python(pid, &layout) {
                    let message = format!("Python frames are not available for pid {pid}: {e:#}");
                    return self.sinks.notice(&Notice::Python {
                        ts: sinks::now(),
                        pid,
                        message,
                    });
                }
                Ok(())
            }
            Found::Notice(message) => self.sinks.notice(&Notice::Python {
                ts: sinks::now(),
                pid,
                message,
            }),
            Found::Nothing => Ok(()),
        }
    }

    /// An event finding, once per key and process.
    fn finding(&mut self, ts: f64, pid: u32, key: String, f: analysis::Finding) -> io::Result<()> {
        let Some(p) = self.procs.get_mut(&pid) else {
            return Ok(());
        };
        let Some(finding) = p.analysis.event_finding(key, f) else {
            return Ok(());
        };
        let new = self
            .shown_findings
            .insert((finding.kind, finding.message.clone()));
        if new || p.analysis.reported() {
            self.sinks.notice(&Notice::Finding { ts, pid, finding })
        } else {
            Ok(())
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
    /// Its summary is made now, and the rest of what was kept of it let go.
    fn exited(&mut self, pid: u32, totals: Option<Totals>, ending: Ending) -> io::Result<()> {
        let Some(mut p) = self.procs.remove(&pid) else {
            return Ok(());
        };
        let totals = totals.or(p.analysis.last_totals()).unwrap_or_default();
        p.analysis.exit(totals, ending);
        self.containers.exited(pid, p.enrich.who.current(), totals);
        self.ended.push(p.analysis.summary(
            pid,
            &p.enrich.comm,
            self.symbols.stacks(pid),
            self.python.sites(pid),
        ));
        self.just_exited.insert(pid);
        self.symbols.forget(pid);
        self.python.exit(pid);
        let comm = p.enrich.comm;
        self.sinks.notice(&Notice::Exit {
            ts: sinks::now(),
            pid,
            comm,
            totals,
            ending,
        })
    }

    /// The `run` command at the end of the session: asked to stop when
    /// --duration ran out (SIGTERM, then SIGKILL once it had its grace);
    /// after a signal to fdtrace, given a moment, since on a terminal the
    /// signal (Ctrl-C) reached it too. Events are drained meanwhile, so its
    /// exit object comes out with its status.
    async fn end_child(
        &mut self,
        ring: &mut RingBuf<MapData>,
        ended: SessionEnd,
    ) -> io::Result<()> {
        let wait = match ended {
            SessionEnd::Duration => spawn::TERM_GRACE + Duration::from_secs(1),
            _ => Duration::from_secs(1),
        };
        let until = Instant::now() + wait;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Ok(());
            };
            if child.ending(Duration::ZERO).is_some() || Instant::now() >= until {
                break;
            }
            if ended == SessionEnd::Duration {
                child.stop();
            }
            self.events(ring)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.events(ring)?;
        Ok(())
    }

    fn report(&mut self) -> io::Result<()> {
        let mut report = Report {
            ts: sinks::now(),
            losses: self.losses.read(&self.k, self.max_fds, self.max_procs),
            counts: SessionCounts::default(),
            processes: Vec::new(),
            containers: Vec::new(),
        };
        let t = self.started.elapsed().as_secs_f64();
        let unnamed: Vec<(u64, u32, String)> = self
            .unnamed_cgroups
            .iter()
            .map(|(&id, (pid, cg))| (id, *pid, cg.info.path.clone()))
            .collect();
        for (id, pid, path) in unnamed {
            if kernel::node::cgroup_exists(&self.host_root, &path) {
                self.new_cgroup(pid, id)?;
            } else {
                self.unnamed_cgroups.remove(&id);
            }
        }
        // The kernel map says who is traced: a fork or exit event lost to a
        // full ring buffer still shows up here.
        let traced: HashMap<u32, ProcStats> = self.k.traced_stats()?.into_iter().collect();
        for (&pid, st) in &traced {
            if !self.procs.contains_key(&pid) && !self.just_exited.contains(&pid) {
                // An adoption whose event was lost is seeded here.
                if st.flags & fdtrace_common::PROC_ADOPTED != 0 {
                    self.adopt(pid)?;
                    continue;
                }
                // Its fork event is still on its way (or was lost).
                let enrich = ProcessEnrichment::read(pid);
                let mut traced = Traced::new(enrich, self.cfg);
                traced.fork_pending = true;
                self.procs.insert(pid, traced);
            }
        }
        self.just_exited.clear();
        let live: Vec<u32> = self.procs.keys().copied().collect();
        let now_ns = kernel::monotonic_ns();
        let mut net = NetTables::default();
        for pid in live {
            // Kernel, checked against /proc.
            let p = self.procs.get_mut(&pid).expect("traced");
            let known = traced.get(&pid).copied();
            let Some(snap) = reconcile::check(&mut self.k, pid, known, &mut p.reconcile, self.node)
            else {
                // The kernel side sends the exit event before it lets the
                // process go, so the event (with the final figures) is in
                // the ring buffer, drained before the next report; only if
                // it was lost is the exit reported from here.
                let p = self.procs.get_mut(&pid).expect("traced");
                if std::mem::replace(&mut p.gone, true) {
                    self.exited(pid, None, Ending::Exited)?;
                }
                continue;
            };
            let p = self.procs.get_mut(&pid).expect("traced");
            // A process known under this pid that is not the one there now
            // has ended unseen: its successor is not its continuation. A
            // later kernel entry is a later process (its exit event was
            // lost); the same entry with another start time is one the
            // kernel side never saw leave.
            if later_entry(&mut p.registered_ns, snap.stats.registered_ns) {
                self.exited(pid, None, Ending::Exited)?;
                continue;
            }
            // Name, parent and identity move only with a fresh read of the
            // stat.
            let stat = p.stat.get(pid, Instant::now());
            let (soft_limit, hard_limit) = stat.map_or((None, None), |(_, limits, _)| limits);
            if let Some((st, _, true)) = stat {
                match p.identity {
                    Some(was) if was.start_time != st.identity.start_time => {
                        self.k.unregister(pid);
                        self.exited(pid, None, Ending::Exited)?;
                        continue;
                    }
                    None => p.identity = Some(st.identity),
                    Some(_) => {}
                }
                p.enrich.comm.clone_from(&st.comm);
                p.enrich.ppid = p.enrich.ppid.or(Some(st.ppid));
            }
            p.gone = false;
            if let Err(e) = p.table.refresh(&self.k, pid, snap.stats.changes()) {
                // The next report tries again.
                eprintln!("fdtrace: reading the fd entries of pid {pid} failed: {e}");
            }
            // Reconcile.
            let rec = reconcile::reconcile(&mut self.k, pid, &mut p.reconcile, &mut p.table, &snap);
            // Enrich.
            let (comm, ppid) = (p.enrich.comm.clone(), p.enrich.ppid);
            self.attributions
                .refresh(pid, snap.stats.cgroup, &mut p.enrich.who);
            let attribution = p.enrich.who.current().clone();
            let enriched = p.enrich.enrich(
                &self.k,
                &mut self.symbols,
                &mut self.python,
                &mut net,
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
                soft_limit,
                hard_limit,
                counts: rec.counts,
                drift: rec.drift,
                resync: rec.resync,
                fds: enriched.fds,
                fds_version: enriched.version,
                tcp_states: enriched.tcp_states,
                stacks: self.symbols.stacks(pid),
                attribution,
                python: self.python.sites(pid),
            };
            report.processes.push(p.analysis.update(&sample));
        }
        report.containers = self.containers.report(report.ts, &report.processes);
        self.counts.add(&report.losses, &report.processes);
        report.counts = self.counts;
        self.attributions
            .retain(self.procs.values().map(|p| &p.enrich.who));
        if self.warn_unreadable {
            let others: Vec<(u32, String)> = report
                .processes
                .iter()
                .filter(|p| !procfd::readable_by_owner(p.figures.pid))
                .map(|p| (p.figures.pid, p.figures.comm.clone()))
                .collect();
            if let Some(w) = unreadable_warning(&others) {
                eprintln!("fdtrace: {w}");
                self.warn_unreadable = false;
            }
        }
        // Sinks.
        self.sinks.report(&report)
    }

    fn summary(&mut self, ended: SessionEnd) -> io::Result<()> {
        let mut processes: Vec<ProcessSummary> = self.ended.kept().cloned().collect();
        processes.extend(self.procs.iter().map(|(&pid, p)| {
            p.analysis.summary(
                pid,
                &p.enrich.comm,
                self.symbols.stacks(pid),
                self.python.sites(pid),
            )
        }));
        // Stable: a reused pid's processes stay in the order they ran.
        processes.sort_by_key(|p| p.pid);
        self.sinks.summary(&Summary {
            ts: sinks::now(),
            duration_s: self.started.elapsed().as_secs_f64(),
            ended,
            processes,
            folded: self.ended.folded(),
        })
    }

    /// The worst status a running process reached.
    fn worst_running(&self) -> Status {
        self.procs
            .values()
            .map(|p| p.analysis.worst())
            .max()
            .unwrap_or(Status::Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(start_time: u64, zombie: bool) -> Option<Identity> {
        Some(Identity { start_time, zombie })
    }

    #[test]
    fn a_pid_gone_or_taken_or_a_zombie_at_attach_has_ended() {
        assert_eq!(attach_outcome(id(5, false), id(5, false)), None);
        assert_eq!(attach_outcome(id(5, false), None), Some(Ending::Exited));
        assert_eq!(
            attach_outcome(id(5, false), id(9, false)),
            Some(Ending::Exited),
            "another process under the same pid"
        );
        assert_eq!(
            attach_outcome(id(5, true), id(5, true)),
            Some(Ending::Zombie)
        );
        assert_eq!(
            attach_outcome(id(5, false), id(5, true)),
            Some(Ending::Zombie)
        );
    }

    #[test]
    fn a_late_fork_event_keeps_the_child_a_report_found_first() {
        // The report found the child in the kernel map, then gone from
        // /proc, before its fork event was drained: one process, one exit.
        assert_eq!(fork_of_known(true, true), ForkOfKnown::Keep);
        assert_eq!(fork_of_known(true, false), ForkOfKnown::Keep);
        assert_eq!(
            fork_of_known(false, true),
            ForkOfKnown::EndFirst,
            "a reused pid whose exit event was lost"
        );
        assert_eq!(fork_of_known(false, false), ForkOfKnown::Replace);
    }

    #[test]
    fn the_ring_is_drained_often_while_events_come_and_seldom_when_none_do() {
        assert_eq!(drain_delay(1), Duration::from_millis(EVENTS_DRAIN_MS));
        assert_eq!(drain_delay(4096), Duration::from_millis(EVENTS_DRAIN_MS));
        assert_eq!(drain_delay(0), Duration::from_millis(EVENTS_IDLE_DRAIN_MS));
    }

    #[test]
    fn a_later_kernel_entry_under_a_pid_is_a_later_process() {
        let mut known = None;
        assert!(!later_entry(&mut known, 100), "first sight");
        assert_eq!(known, Some(100));
        assert!(!later_entry(&mut known, 100));
        assert!(later_entry(&mut known, 250), "its exit event was lost");
    }

    fn child(ending: Option<Ending>, stopped: bool) -> Option<ChildEnd> {
        Some(ChildEnd { ending, stopped })
    }

    #[test]
    fn run_exits_with_the_status_of_its_command() {
        assert_eq!(exit_status(false, child(Some(Ending::Code(7)), false)), 7);
        assert_eq!(exit_status(false, child(Some(Ending::Code(0)), false)), 0);
        assert_eq!(
            exit_status(false, child(Some(Ending::Signal(9)), false)),
            137
        );
        assert_eq!(
            exit_status(false, child(Some(Ending::Signal(2)), false)),
            130,
            "Ctrl-C on a terminal"
        );
    }

    #[test]
    fn fail_on_wins_over_the_command_status() {
        assert_eq!(exit_status(true, child(Some(Ending::Code(7)), false)), 3);
        assert_eq!(exit_status(true, None), 3);
    }

    #[test]
    fn the_unreadable_warning_names_the_capability_and_the_processes() {
        assert_eq!(unreadable_warning(&[]), None);
        let w = unreadable_warning(&[(1, "systemd".into()), (77, "e\x1bvil".into())])
            .expect("a warning");
        assert!(w.contains("CAP_DAC_READ_SEARCH"), "{w}");
        assert!(w.contains("1 (systemd), 77 (e\\x1bvil)"), "{w}");
    }

    #[test]
    fn a_command_fdtrace_stopped_gives_0() {
        assert_eq!(exit_status(false, child(Some(Ending::Signal(15)), true)), 0);
        assert_eq!(exit_status(false, child(None, true)), 0);
        assert_eq!(exit_status(false, child(None, false)), 0, "still running");
        assert_eq!(exit_status(false, None), 0, "--pid");
    }
}
