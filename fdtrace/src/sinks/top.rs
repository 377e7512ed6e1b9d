//! The live view of many processes (a node, a large process tree).
//!
//! While a report fits the screen, the output is the line output of
//! [`Terminal`]. Once a report holds more processes than the screen has lines,
//! or from the start when the whole node is traced (`--all`, whose reports
//! hold every process of the host however few there are now):
//! on a terminal with a keyboard, a top-like screen redraws in place
//! (processes ranked by risk, a container view, keys to sort, filter and
//! quit; the summary is printed after leaving it); elsewhere (a pipe, a log,
//! or `run`, whose command shares the terminal), the line output goes on
//! limited to the processes that changed or are at risk, and counts the rest
//! and the forks and exits in one line per report instead.
//!
//! The rows, the ranking, the filter, the keys and the drawing are plain
//! functions of the data; only [`Screen`] touches the terminal.
use std::{
    borrow::Cow,
    cell::RefCell,
    cmp::Ordering,
    collections::{BTreeMap, HashMap, VecDeque},
    io::{self, IsTerminal as _, Write},
    rc::Rc,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{self, AtomicBool},
    },
    thread,
    time::Duration,
};

use ratatui::{
    DefaultTerminal, Frame,
    crossterm::{
        event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
        terminal,
    },
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Cell, Paragraph, Row, Table},
};

use super::{
    Sink, Terminal,
    terminal::{clock, eta, python_at},
};
use crate::analysis::{
    GROWING_RATE, Notice, ProcessReport, Report, Start, Status, Summary, display_rate,
};

/// Lines of a screen when the output is not a terminal: a classic
/// terminal's, so that a log shows every process while a report would fit
/// one.
const SCREEN_LINES: u16 = 24;
/// Lines the line output spends on a report besides its processes (the blank
/// line and the header).
const REPORT_FRAME_LINES: u16 = 2;
/// Findings kept for the bottom of the screen.
const RECENT: usize = 3;
/// How long the key reader waits for a key before it looks whether the view
/// was closed.
const KEY_POLL: Duration = Duration::from_millis(100);

/// Where the output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Console {
    /// stdout is a terminal.
    pub tty: bool,
    /// The screen can be taken and keys read: stdin and stdout are fdtrace's
    /// own terminal.
    pub keyboard: bool,
}

impl Console {
    /// `shared`: a traced command shares the terminal (`run`), so fdtrace
    /// neither takes the screen nor reads its keys.
    pub fn detect(shared: bool) -> Console {
        let tty = io::stdout().is_terminal();
        Console {
            tty,
            keyboard: tty && io::stdin().is_terminal() && !shared,
        }
    }
}

/// Text another process controls (its comm, its paths), made safe to draw:
/// a control character would move the cursor or end a line.
fn printable(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(s.chars().flat_map(char::escape_default).collect())
    } else {
        Cow::Borrowed(s)
    }
}

/// One process as the view shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcRow {
    pub status: Status,
    /// Its pod and container (`namespace/pod/container`, or a container id);
    /// None for a process of the host.
    pub owner: Option<String>,
    pub pid: u32,
    pub comm: String,
    pub open_fds: u64,
    pub soft_limit: Option<u64>,
    pub pct_used: Option<f64>,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    /// Its fastest-growing site: `+8.0/s socket tcp 127.0.0.1:8080`.
    pub site: Option<String>,
}

/// `namespace/pod/container` when the pod is known, else the container id's
/// first 12 characters, else nothing (a host process).
fn owner(a: &crate::analysis::Attribution) -> Option<String> {
    let text = match (&a.namespace, &a.pod, &a.container_id) {
        (Some(ns), Some(pod), _) => {
            format!("{ns}/{pod}/{}", a.container.as_deref().unwrap_or(""))
        }
        (_, _, Some(id)) => id.chars().take(12).collect(),
        _ => return None,
    };
    Some(printable(&text).into_owned())
}

/// The row of a process's report.
pub fn row(p: &ProcessReport) -> ProcRow {
    let f = &p.figures;
    // Sites come fastest-growing first (analysis::process); one that does
    // not grow still says what the process holds most. A Python site also
    // says where in the user's code (the text is the process's own).
    let site = p.sites.first().map(|s| {
        let mut what = format!("{} {}", s.kind.name(), printable(&s.resource));
        if let Some(at) = s.python.as_deref().and_then(python_at) {
            what = format!("{what} at {}", printable(&at));
        }
        if s.leak_per_s >= GROWING_RATE {
            format!("{:+.1}/s {what}", display_rate(s.leak_per_s))
        } else {
            format!("{} open {what}", s.open_fds)
        }
    });
    ProcRow {
        status: f.status,
        owner: owner(&f.attribution),
        pid: f.pid,
        comm: printable(&f.comm).into_owned(),
        open_fds: f.open_fds,
        soft_limit: f.soft_limit,
        pct_used: f.pct_used,
        leak_per_s: display_rate(f.leak_per_s),
        seconds_to_emfile: f.seconds_to_emfile,
        site,
    }
}

/// What makes a process (or a container) riskier than another.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Risk {
    status: Status,
    seconds_to_emfile: Option<f64>,
    pct_used: Option<f64>,
    leak_per_s: f64,
}

impl Risk {
    /// Riskiest first: the worst status, then the soonest EMFILE (a process
    /// with no forecast after every one with one), then the largest share of
    /// the soft limit, then the fastest leak.
    fn cmp(&self, o: &Risk) -> Ordering {
        o.status
            .cmp(&self.status)
            .then_with(|| soonest(self.seconds_to_emfile, o.seconds_to_emfile))
            .then_with(|| {
                o.pct_used
                    .unwrap_or(0.0)
                    .total_cmp(&self.pct_used.unwrap_or(0.0))
            })
            .then_with(|| o.leak_per_s.total_cmp(&self.leak_per_s))
    }
}

fn soonest(a: Option<f64>, b: Option<f64>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.total_cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

impl ProcRow {
    fn risk(&self) -> Risk {
        Risk {
            status: self.status,
            seconds_to_emfile: self.seconds_to_emfile,
            pct_used: self.pct_used,
            leak_per_s: self.leak_per_s,
        }
    }
}

/// Riskiest first; the pid breaks ties, so that rows keep their places
/// between redraws.
pub fn by_risk(a: &ProcRow, b: &ProcRow) -> Ordering {
    a.risk().cmp(&b.risk()).then_with(|| a.pid.cmp(&b.pid))
}

/// The column the processes are sorted by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    #[default]
    Risk,
    Fds,
    Used,
    Leak,
    Emfile,
    Pid,
    Comm,
}

impl SortKey {
    const ALL: [SortKey; 7] = [
        SortKey::Risk,
        SortKey::Fds,
        SortKey::Used,
        SortKey::Leak,
        SortKey::Emfile,
        SortKey::Pid,
        SortKey::Comm,
    ];

    fn name(self) -> &'static str {
        match self {
            SortKey::Risk => "risk",
            SortKey::Fds => "fds",
            SortKey::Used => "used",
            SortKey::Leak => "leak/s",
            SortKey::Emfile => "emfile in",
            SortKey::Pid => "pid",
            SortKey::Comm => "comm",
        }
    }

    /// The next key (`by` 1) or the one before (`by` -1), round.
    fn step(self, by: isize) -> SortKey {
        let n = Self::ALL.len() as isize;
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0) as isize;
        Self::ALL[(i + by).rem_euclid(n) as usize]
    }

    /// Most first for figures, soonest first for EMFILE, ascending for pid
    /// and comm; the risk order breaks ties.
    fn cmp(self, a: &ProcRow, b: &ProcRow) -> Ordering {
        let first = match self {
            SortKey::Risk => Ordering::Equal,
            SortKey::Fds => b.open_fds.cmp(&a.open_fds),
            SortKey::Used => b
                .pct_used
                .unwrap_or(0.0)
                .total_cmp(&a.pct_used.unwrap_or(0.0)),
            SortKey::Leak => b.leak_per_s.total_cmp(&a.leak_per_s),
            SortKey::Emfile => soonest(a.seconds_to_emfile, b.seconds_to_emfile),
            SortKey::Pid => a.pid.cmp(&b.pid),
            SortKey::Comm => a.comm.cmp(&b.comm),
        };
        first.then_with(|| by_risk(a, b))
    }
}

/// Whether a row matches the filter typed: a piece of its comm, pid, pod or
/// container, status or top site, in any case.
pub fn matches(r: &ProcRow, filter: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let needle = filter.to_lowercase();
    let pid = r.pid.to_string();
    [
        Some(r.comm.as_str()),
        Some(pid.as_str()),
        r.owner.as_deref(),
        Some(r.status.name()),
        r.site.as_deref(),
    ]
    .into_iter()
    .flatten()
    .any(|field| field.to_lowercase().contains(&needle))
}

/// The rows shown, in order.
pub fn visible<'a>(rows: &'a [ProcRow], c: &Controls) -> Vec<&'a ProcRow> {
    let mut shown: Vec<&ProcRow> = rows.iter().filter(|r| matches(r, &c.filter)).collect();
    shown.sort_by(|a, b| {
        let o = c.sort.cmp(a, b);
        if c.reverse { o.reverse() } else { o }
    });
    shown
}

/// The processes of one container (or of the host) together.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerRow {
    /// None: the host's processes.
    pub owner: Option<String>,
    pub processes: usize,
    pub open_fds: u64,
    /// The worst status of its processes.
    pub status: Status,
    /// The largest share of its soft limit any of its processes uses.
    pub worst_pct_used: Option<f64>,
    /// Summed over its processes.
    pub leak_per_s: f64,
    /// The soonest of its processes.
    pub seconds_to_emfile: Option<f64>,
}

/// One row per container, riskiest first.
pub fn containers<'a>(rows: impl IntoIterator<Item = &'a ProcRow>) -> Vec<ContainerRow> {
    let mut by_owner: BTreeMap<Option<&str>, ContainerRow> = BTreeMap::new();
    for r in rows {
        let c = by_owner
            .entry(r.owner.as_deref())
            .or_insert_with(|| ContainerRow {
                owner: r.owner.clone(),
                processes: 0,
                open_fds: 0,
                status: Status::Ok,
                worst_pct_used: None,
                leak_per_s: 0.0,
                seconds_to_emfile: None,
            });
        c.processes += 1;
        c.open_fds += r.open_fds;
        c.status = c.status.max(r.status);
        c.worst_pct_used = match (c.worst_pct_used, r.pct_used) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        c.leak_per_s += r.leak_per_s;
        if soonest(r.seconds_to_emfile, c.seconds_to_emfile) == Ordering::Less {
            c.seconds_to_emfile = r.seconds_to_emfile;
        }
    }
    let mut out: Vec<ContainerRow> = by_owner.into_values().collect();
    for c in &mut out {
        c.leak_per_s = display_rate(c.leak_per_s);
    }
    out.sort_by(|a, b| {
        let risk = |c: &ContainerRow| Risk {
            status: c.status,
            seconds_to_emfile: c.seconds_to_emfile,
            pct_used: c.worst_pct_used,
            leak_per_s: c.leak_per_s,
        };
        risk(a).cmp(&risk(b)).then_with(|| a.owner.cmp(&b.owner))
    });
    out
}

/// What the keys set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    pub sort: SortKey,
    pub reverse: bool,
    pub filter: String,
    /// The filter is being typed.
    pub editing: bool,
    /// The container view instead of the processes.
    pub containers: bool,
}

/// What a key asks of the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Redraw,
    Quit,
}

/// One key. While the filter is typed, keys are its text (Enter keeps it,
/// Esc drops it); otherwise: `q` quit, `s`/`S` the next/previous sort column,
/// `r` reverse, `/` type a filter, `c` processes or containers, Esc clear the
/// filter. Ctrl-C quits in both.
pub fn on_key(c: &mut Controls, k: KeyEvent) -> Action {
    if k.kind == KeyEventKind::Release {
        return Action::Nothing;
    }
    if k.modifiers.contains(KeyModifiers::CONTROL) {
        return match k.code {
            KeyCode::Char('c') => Action::Quit,
            _ => Action::Nothing,
        };
    }
    if c.editing {
        match k.code {
            KeyCode::Char(ch) => c.filter.push(ch),
            KeyCode::Backspace => {
                c.filter.pop();
            }
            KeyCode::Enter => c.editing = false,
            KeyCode::Esc => {
                c.editing = false;
                c.filter.clear();
            }
            _ => return Action::Nothing,
        }
        return Action::Redraw;
    }
    match k.code {
        KeyCode::Char('q') => return Action::Quit,
        KeyCode::Char('s') | KeyCode::Tab => c.sort = c.sort.step(1),
        KeyCode::Char('S') | KeyCode::BackTab => c.sort = c.sort.step(-1),
        KeyCode::Char('r') => c.reverse = !c.reverse,
        KeyCode::Char('c') => c.containers = !c.containers,
        KeyCode::Char('/') => {
            c.editing = true;
            c.filter.clear();
        }
        KeyCode::Esc if !c.filter.is_empty() => c.filter.clear(),
        _ => return Action::Nothing,
    }
    Action::Redraw
}

/// Everything the screen shows.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Unix time of the last report.
    pub ts: f64,
    pub rows: Vec<ProcRow>,
    pub forks: u64,
    pub exits: u64,
    /// The latest findings, newest last.
    pub recent: VecDeque<String>,
    pub controls: Controls,
}

impl View {
    fn finding(&mut self, ts: f64, pid: u32, kind: &str, message: &str) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(format!(
            "{} {pid} {kind}: {}",
            clock(ts),
            printable(message)
        ));
    }

    /// A line fdtrace wrote to stderr while the screen was shown.
    fn message(&mut self, line: &str) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(printable(line).into_owned());
    }

    /// What notices change on the screen: counts and findings.
    fn notice(&mut self, n: &Notice) {
        match n {
            Notice::Fork { .. } => self.forks += 1,
            Notice::Exit { .. } => self.exits += 1,
            Notice::Finding { ts, pid, finding } => {
                self.finding(*ts, *pid, finding.kind.name(), &finding.message)
            }
            Notice::Python { ts, pid, message } => self.finding(*ts, *pid, "notice", message),
            Notice::Exec { .. } | Notice::FdError { .. } | Notice::Rlimit { .. } => {}
        }
    }

    fn report(&mut self, r: &Report) {
        self.ts = r.ts;
        self.rows = r.processes.iter().map(row).collect();
        for p in &r.processes {
            for f in &p.findings {
                self.finding(r.ts, p.figures.pid, f.kind.name(), &f.message);
            }
        }
    }
}

fn status_style(s: Status) -> Style {
    match s {
        Status::Ok => Style::default(),
        Status::Warning => Style::default().fg(Color::Yellow),
        Status::Critical => Style::default().fg(Color::Red),
        Status::Exhausted => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
    }
}

fn right(s: String) -> Cell<'static> {
    Cell::from(Line::from(s).right_aligned())
}

fn pct(p: Option<f64>) -> String {
    p.map_or("-".into(), |p| format!("{p:.1}%"))
}

fn owner_text(o: Option<&str>) -> String {
    o.unwrap_or("(host)").to_string()
}

/// The screen, drawn from the view alone.
pub fn draw(f: &mut Frame, v: &View) {
    let [head, bar, body, recent, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(RECENT as u16),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let c = &v.controls;
    let shown = visible(&v.rows, c);

    let mut by_status = [0usize; 4];
    for r in &v.rows {
        by_status[r.status as usize] += 1;
    }
    let at_risk: Vec<String> = [Status::Exhausted, Status::Critical, Status::Warning]
        .into_iter()
        .filter(|s| by_status[*s as usize] > 0)
        .map(|s| format!("{} {}", by_status[s as usize], s.name()))
        .collect();
    let risk_text = if at_risk.is_empty() {
        "all ok".to_string()
    } else {
        at_risk.join(", ")
    };
    f.render_widget(
        Paragraph::new(format!(
            "fdtrace {}  {} processes: {risk_text}  forks {}  exits {}",
            clock(v.ts),
            v.rows.len(),
            v.forks,
            v.exits
        ))
        .style(Style::default().add_modifier(Modifier::BOLD)),
        head,
    );

    let view_name = if c.containers {
        "containers"
    } else {
        "processes"
    };
    let order = if c.reverse {
        "reversed"
    } else {
        "riskiest first"
    };
    let filter = if c.editing {
        format!("  filter: {}_", c.filter)
    } else if !c.filter.is_empty() {
        format!(
            "  filter: {} ({} of {})",
            c.filter,
            shown.len(),
            v.rows.len()
        )
    } else {
        String::new()
    };
    let sorted = if c.containers {
        String::new()
    } else {
        format!("  sort: {} ({order})", c.sort.name())
    };
    f.render_widget(Paragraph::new(format!("{view_name}{sorted}{filter}")), bar);

    let header_style = Style::default().add_modifier(Modifier::REVERSED);
    if c.containers {
        let rows = containers(shown.iter().copied());
        let table = Table::new(
            rows.iter().map(|r| {
                Row::new([
                    Cell::from(r.status.name()),
                    Cell::from(owner_text(r.owner.as_deref())),
                    right(r.processes.to_string()),
                    right(r.open_fds.to_string()),
                    right(pct(r.worst_pct_used)),
                    right(format!("{:+.1}", r.leak_per_s)),
                    right(eta(r.seconds_to_emfile)),
                ])
                .style(status_style(r.status))
            }),
            [
                Constraint::Length(9),
                Constraint::Fill(1),
                Constraint::Length(6),
                Constraint::Length(8),
                Constraint::Length(10),
                Constraint::Length(8),
                Constraint::Length(9),
            ],
        )
        .header(
            Row::new([
                Cell::from("STATUS"),
                Cell::from("POD/CONTAINER"),
                right("PROCS".into()),
                right("FDS".into()),
                right("WORST USED".into()),
                right("LEAK/s".into()),
                right("EMFILE IN".into()),
            ])
            .style(header_style),
        );
        f.render_widget(table, body);
    } else {
        // The pod/container column only where a process has one.
        let owners = v.rows.iter().any(|r| r.owner.is_some());
        let table = Table::new(
            shown.iter().map(|r| {
                let limit = r.soft_limit.map_or("-".into(), |l| l.to_string());
                let mut cells = vec![Cell::from(r.status.name())];
                if owners {
                    cells.push(Cell::from(owner_text(r.owner.as_deref())));
                }
                cells.extend([
                    right(r.pid.to_string()),
                    Cell::from(r.comm.clone()),
                    right(format!("{}/{limit}", r.open_fds)),
                    right(pct(r.pct_used)),
                    right(format!("{:+.1}", r.leak_per_s)),
                    right(eta(r.seconds_to_emfile)),
                    Cell::from(r.site.clone().unwrap_or_default()),
                ]);
                Row::new(cells).style(status_style(r.status))
            }),
            {
                let mut w = vec![Constraint::Length(9)];
                if owners {
                    w.push(Constraint::Length(24));
                }
                w.extend([
                    Constraint::Length(7),
                    Constraint::Length(15),
                    Constraint::Length(13),
                    Constraint::Length(6),
                    Constraint::Length(7),
                    Constraint::Length(9),
                    Constraint::Fill(1),
                ]);
                w
            },
        )
        .header({
            let mut h = vec![Cell::from("STATUS")];
            if owners {
                h.push(Cell::from("POD/CONTAINER"));
            }
            h.extend([
                right("PID".into()),
                Cell::from("COMM"),
                right("FDS/LIMIT".into()),
                right("USED".into()),
                right("LEAK/s".into()),
                right("EMFILE IN".into()),
                Cell::from("TOP SITE"),
            ]);
            Row::new(h).style(header_style)
        });
        f.render_widget(table, body);
    }

    f.render_widget(
        Paragraph::new(
            v.recent
                .iter()
                .map(|l| Line::from(l.as_str()))
                .collect::<Vec<_>>(),
        ),
        recent,
    );
    let help = if c.editing {
        "type to filter  Enter keep  Esc drop  Ctrl-C quit"
    } else {
        "q quit  s/S sort  r reverse  / filter  c containers/processes  Esc clear filter"
    };
    f.render_widget(
        Paragraph::new(help).style(Style::default().add_modifier(Modifier::DIM)),
        keys,
    );
}

/// The screen while it is shown: the alternate screen in raw mode, drawn
/// from the sink's reports and from a thread that reads the keys.
struct Screen {
    live: Arc<Mutex<Live>>,
    stop: Arc<AtomicBool>,
    keys: Option<thread::JoinHandle<()>>,
    stderr: Option<Stderr>,
}

/// Most stderr lines kept for after the screen: fdtrace's warnings are
/// each said once, so a session says far fewer.
const STDERR_KEPT: usize = 1000;

/// fdtrace's stderr while the screen is shown: a line written to the
/// terminal meanwhile would scroll the screen, so fd 2 is a pipe, whose
/// lines go to the bottom of the screen and, once it is left, to the real
/// stderr.
struct Stderr {
    /// The real stderr, put back on leaving.
    saved: std::os::fd::OwnedFd,
    reader: thread::JoinHandle<Vec<String>>,
}

impl Stderr {
    fn capture(live: &Arc<Mutex<Live>>) -> io::Result<Stderr> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        let (rx, tx) = io::pipe()?;
        // SAFETY: dup of fd 2, which is open; the new fd is owned here.
        let saved = unsafe { libc::dup(libc::STDERR_FILENO) };
        if saved < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: saved is a fresh fd of this process.
        let saved = unsafe { std::os::fd::OwnedFd::from_raw_fd(saved) };
        let live = Arc::clone(live);
        let reader = thread::Builder::new()
            .name("fdtrace-stderr".into())
            .spawn(move || {
                let mut kept = Vec::new();
                for line in io::BufRead::lines(io::BufReader::new(rx)) {
                    let Ok(line) = line else { break };
                    live.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .view
                        .message(&line);
                    if kept.len() < STDERR_KEPT {
                        kept.push(line);
                    }
                }
                kept
            })?;
        // SAFETY: both fds are open; fd 2 becomes the pipe (tx is closed
        // when dropped, the pipe stays open through fd 2).
        if unsafe { libc::dup2(tx.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Stderr { saved, reader })
    }

    /// The real stderr back, then what was written meanwhile.
    fn restore(self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: both fds are open. fd 2 was the pipe's last writer: the
        // reader sees its end.
        unsafe { libc::dup2(self.saved.as_raw_fd(), libc::STDERR_FILENO) };
        if let Ok(lines) = self.reader.join() {
            for l in lines {
                eprintln!("{l}");
            }
        }
    }
}

struct Live {
    term: DefaultTerminal,
    view: View,
}

impl Live {
    fn draw(&mut self) -> io::Result<()> {
        let Live { term, view } = self;
        term.draw(|f| draw(f, view)).map(|_| ())
    }
}

impl Screen {
    fn enter(view: View) -> io::Result<Screen> {
        // Raw mode, the alternate screen, and a panic hook that restores the
        // terminal.
        let term = ratatui::try_init()?;
        let live = Arc::new(Mutex::new(Live { term, view }));
        let stop = Arc::new(AtomicBool::new(false));
        let keys = {
            let (live, stop) = (Arc::clone(&live), Arc::clone(&stop));
            thread::Builder::new()
                .name("fdtrace-keys".into())
                .spawn(move || read_keys(&live, &stop))
        };
        let mut screen = Screen {
            live,
            stop,
            keys: None,
            stderr: None,
        };
        match keys {
            Ok(k) => screen.keys = Some(k),
            Err(e) => {
                let _ = ratatui::try_restore();
                return Err(e);
            }
        }
        match Stderr::capture(&screen.live) {
            Ok(c) => screen.stderr = Some(c),
            Err(e) => {
                screen.leave()?;
                return Err(e);
            }
        }
        screen.update(|_| {})?;
        Ok(screen)
    }

    fn update(&self, change: impl FnOnce(&mut View)) -> io::Result<()> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut live.view);
        live.draw()
    }

    /// A change drawn with the next report or key: a node forks many times
    /// a second, and each draw ranks every process.
    fn note(&self, change: impl FnOnce(&mut View)) {
        change(
            &mut self
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .view,
        );
    }

    /// Back to the normal screen, once.
    fn leave(&mut self) -> io::Result<()> {
        let Some(keys) = self.keys.take() else {
            return Ok(());
        };
        self.stop.store(true, atomic::Ordering::Relaxed);
        // The reader wakes within KEY_POLL; a panic in it has been reported
        // by the panic hook already.
        let _ = keys.join();
        let restored = ratatui::try_restore();
        if let Some(c) = self.stderr.take() {
            c.restore();
        }
        restored
    }
}

impl Drop for Screen {
    /// An error that ends the session before its summary leaves the
    /// terminal usable too.
    fn drop(&mut self) {
        let _ = self.leave();
    }
}

/// Reads keys until the screen is closed or a quit key. Quitting raises
/// SIGINT: raw mode turned off the terminal's own Ctrl-C, and the session
/// ends on SIGINT the same way, with its summary.
fn read_keys(live: &Mutex<Live>, stop: &AtomicBool) {
    while !stop.load(atomic::Ordering::Relaxed) {
        // No keyboard to read after all: the view stays until SIGINT,
        // SIGTERM or --duration.
        match event::poll(KEY_POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let Ok(ev) = event::read() else {
            return;
        };
        let mut live = live.lock().unwrap_or_else(PoisonError::into_inner);
        let action = match ev {
            Event::Key(k) => on_key(&mut live.view.controls, k),
            Event::Resize(..) => Action::Redraw,
            _ => Action::Nothing,
        };
        match action {
            Action::Quit => {
                // SAFETY: kill with this process's own pid and a signal the
                // session handles.
                unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
                return;
            }
            // A failed draw shows at the next report's draw, which returns
            // the error.
            Action::Redraw => drop(live.draw()),
            Action::Nothing => {}
        }
    }
}

/// What the last report said of a process, to tell whether it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Said {
    open_fds: u64,
    soft_limit: Option<u64>,
    status: Status,
}

fn said(p: &ProcessReport) -> Said {
    Said {
        open_fds: p.figures.open_fds,
        soft_limit: p.figures.soft_limit,
        status: p.figures.status,
    }
}

/// Whether a process gets a line when not every process does: it is at
/// risk, has something new to say, or changed its count, limit or status
/// since the report before (`last`).
fn worth_a_line(last: Option<&Said>, p: &ProcessReport) -> bool {
    p.figures.status != Status::Ok
        || !p.findings.is_empty()
        || p.resync.is_some()
        || last != Some(&said(p))
}

/// One writer for the line output and the lines this sink adds between its
/// reports.
struct Shared<W>(Rc<RefCell<W>>);

impl<W> Clone for Shared<W> {
    fn clone(&self) -> Self {
        Shared(Rc::clone(&self.0))
    }
}

impl<W: Write> Write for Shared<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

enum Mode {
    /// Every process, as the line output prints it.
    Lines,
    /// The processes that changed or are at risk.
    Changed,
    Screen(Screen),
}

/// The sink of the terminal output: see the module's documentation.
pub struct Top<W: Write> {
    lines: Terminal<Shared<W>>,
    out: Shared<W>,
    console: Console,
    mode: Mode,
    /// What the screen shows, and in the other modes the counts the next
    /// screen starts from.
    view: View,
    /// Changed mode: each process as the last report said it.
    last: HashMap<u32, Said>,
    /// Changed mode: forks and exits since the last report.
    forks: u64,
    exits: u64,
    /// Leave the whole line output at the start ([`Top::whole_node`]).
    whole_node: bool,
}

impl<W: Write> Top<W> {
    pub fn new(w: W, console: Console) -> Self {
        let out = Shared(Rc::new(RefCell::new(w)));
        Top {
            lines: Terminal::new(out.clone()),
            out,
            console,
            mode: Mode::Lines,
            view: View::default(),
            last: HashMap::new(),
            forks: 0,
            exits: 0,
            whole_node: false,
        }
    }

    /// The whole node is traced: the screen (or, without a keyboard, the
    /// changed-or-at-risk lines) from the start, before the first report,
    /// rather than once a report outgrows the screen: a node's process
    /// count is not known in advance, and a view that changed shape the
    /// moment a few processes started would be the worse for it.
    pub fn whole_node(mut self) -> Self {
        self.whole_node = true;
        self
    }

    /// Processes a report of the line output has room for.
    fn room(&self) -> usize {
        let lines = if self.console.tty {
            terminal::size().map_or(SCREEN_LINES, |(_, rows)| rows)
        } else {
            SCREEN_LINES
        };
        usize::from(lines.saturating_sub(REPORT_FRAME_LINES))
    }

    fn changed(&mut self, r: &Report) -> io::Result<()> {
        let shown: Vec<ProcessReport> = r
            .processes
            .iter()
            .filter(|p| worth_a_line(self.last.get(&p.figures.pid), p))
            .cloned()
            .collect();
        self.last = r
            .processes
            .iter()
            .map(|p| (p.figures.pid, said(p)))
            .collect();
        // The notices before this report are in the line output's buffer.
        self.lines.flush()?;
        writeln!(
            self.out,
            "\n{} {} processes traced, {} changed or at risk; {} forks, {} exits since the last report",
            clock(r.ts),
            r.processes.len(),
            shown.len(),
            std::mem::take(&mut self.forks),
            std::mem::take(&mut self.exits)
        )?;
        self.lines.report(&Report {
            ts: r.ts,
            losses: r.losses.clone(),
            counts: r.counts,
            processes: shown,
            containers: r.containers.clone(),
        })
    }
}

impl<W: Write> Sink for Top<W> {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        self.lines.start(s)?;
        if !self.whole_node {
            return Ok(());
        }
        self.mode = Mode::Changed;
        if self.console.keyboard {
            self.lines.flush()?;
            match Screen::enter(std::mem::take(&mut self.view)) {
                Ok(screen) => self.mode = Mode::Screen(screen),
                Err(e) => eprintln!("fdtrace: cannot take the terminal ({e}); line output"),
            }
        }
        Ok(())
    }

    fn notice(&mut self, n: &Notice) -> io::Result<()> {
        match &self.mode {
            Mode::Screen(screen) => {
                screen.note(|v| v.notice(n));
                Ok(())
            }
            Mode::Changed => {
                // Short-lived processes at node scale would be most of the
                // output: they are counted instead.
                match n {
                    Notice::Fork { .. } => self.forks += 1,
                    Notice::Exit { .. } => self.exits += 1,
                    Notice::Exec { .. } => {}
                    _ => return self.lines.notice(n),
                }
                Ok(())
            }
            Mode::Lines => {
                self.view.notice(n);
                self.lines.notice(n)
            }
        }
    }

    fn report(&mut self, r: &Report) -> io::Result<()> {
        if let Mode::Screen(screen) = &self.mode {
            return screen.update(|v| v.report(r));
        }
        if matches!(self.mode, Mode::Lines) && r.processes.len() > self.room() {
            self.mode = Mode::Changed;
            if self.console.keyboard {
                self.lines.flush()?;
                let mut view = std::mem::take(&mut self.view);
                view.report(r);
                match Screen::enter(view) {
                    Ok(screen) => {
                        self.mode = Mode::Screen(screen);
                        return Ok(());
                    }
                    Err(e) => eprintln!("fdtrace: cannot take the terminal ({e}); line output"),
                }
            }
        }
        match self.mode {
            Mode::Lines => {
                self.view.report(r);
                self.lines.report(r)
            }
            _ => self.changed(r),
        }
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        if let Mode::Screen(screen) = &mut self.mode {
            screen.leave()?;
        }
        self.lines.summary(s)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lines.flush()
    }
}

#[cfg(test)]
mod tests {
    use fdtrace_common::FdKind;
    use ratatui::{backend::TestBackend, buffer::Buffer};

    use super::*;
    use crate::analysis::{
        Finding, FindingKind, ProcessFigures, ProcessSummary, SiteReport, Totals,
        short_lived::FoldedGroup,
    };

    fn proc(
        pid: u32,
        comm: &str,
        status: Status,
        open: u64,
        leak: f64,
        secs: Option<f64>,
    ) -> ProcessReport {
        ProcessReport::of(ProcessFigures {
            ppid: Some(1),
            comm: comm.into(),
            preexisting: open,
            opened: 0,
            leak_per_s: leak,
            seconds_to_emfile: secs,
            ..ProcessFigures::example(pid, open, status)
        })
    }

    fn site(resource: &str, open: u64, leak: f64) -> SiteReport {
        SiteReport {
            id: "s".into(),
            kind: FdKind::Socket,
            resource: resource.into(),
            stack: Default::default(),
            open_fds: open,
            leak_per_s: leak,
            oldest_age_s: 3.0,
            python: None,
        }
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn screen_text(b: &Buffer) -> Vec<String> {
        (0..b.area.height)
            .map(|y| {
                (0..b.area.width)
                    .map(|x| b[(x, y)].symbol())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect()
    }

    fn drawn(v: &View, w: u16, h: u16) -> Vec<String> {
        let mut t = ratatui::Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, v)).unwrap();
        screen_text(t.backend().buffer())
    }

    #[test]
    fn row_shows_the_fastest_site_and_escapes_foreign_text() {
        let mut p = proc(7, "evil\x1b[2J", Status::Critical, 174, 8.04, Some(106.0));
        p.sites = vec![site("tcp 127.0.0.1:42535", 160, 8.0)];
        let r = row(&p);
        assert_eq!(r.comm, "evil\\u{1b}[2J");
        assert_eq!(r.site.as_deref(), Some("+8.0/s socket tcp 127.0.0.1:42535"));
        assert_eq!(r.leak_per_s, 8.0);
        p.sites = vec![site("unix /run/a\n.sock", 3, 0.0)];
        assert_eq!(
            row(&p).site.as_deref(),
            Some("3 open socket unix /run/a\\n.sock")
        );
        p.sites.clear();
        assert_eq!(row(&p).site, None);
    }

    #[test]
    fn a_python_row_names_the_user_frame_and_the_library_call() {
        let mut p = proc(7, "python3", Status::Critical, 174, 8.0, Some(106.0));
        let mut s = site("tcp 127.0.0.1:8080", 160, 8.0);
        s.python = Some(std::rc::Rc::new(crate::analysis::PythonFrames {
            stack: vec!["AsyncClient.get (/v/httpx/_client.py:1)".into()],
            user_frame: Some("fetch_data_wrong (/srv/agent\x1b.py:12)".into()),
            via: Some("httpx AsyncClient.get".into()),
        }));
        p.sites = vec![s];
        assert_eq!(
            row(&p).site.as_deref(),
            Some(
                "+8.0/s socket tcp 127.0.0.1:8080 at fetch_data_wrong (/srv/agent\\u{1b}.py:12) \
                 via httpx AsyncClient.get"
            )
        );
    }

    #[test]
    fn risk_ranks_status_then_emfile_then_usage_then_leak() {
        let rows: Vec<ProcRow> = [
            proc(1, "ok-big", Status::Ok, 700, 0.0, None),
            proc(2, "warn-late", Status::Warning, 10, 0.2, Some(3000.0)),
            proc(3, "warn-soon", Status::Warning, 10, 0.3, Some(1000.0)),
            proc(4, "exhausted", Status::Exhausted, 1024, 0.0, None),
            proc(5, "warn-full", Status::Warning, 850, 0.0, None),
            proc(6, "warn-fuller", Status::Warning, 900, 0.0, None),
            proc(7, "ok-leaky", Status::Ok, 700, 0.1, None),
            proc(8, "ok-tie", Status::Ok, 700, 0.0, None),
        ]
        .iter()
        .map(row)
        .collect();
        let order: Vec<&str> = visible(&rows, &Controls::default())
            .iter()
            .map(|r| r.comm.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "exhausted",
                "warn-soon",
                "warn-late",
                "warn-fuller",
                "warn-full",
                "ok-leaky",
                "ok-big",
                "ok-tie"
            ]
        );
    }

    #[test]
    fn sort_keys_cycle_and_reverse() {
        let rows: Vec<ProcRow> = [
            proc(30, "b", Status::Ok, 5, 0.0, None),
            proc(10, "c", Status::Ok, 50, 0.0, None),
            proc(20, "a", Status::Warning, 9, 1.0, Some(900.0)),
        ]
        .iter()
        .map(row)
        .collect();
        let pids = |c: &Controls| visible(&rows, c).iter().map(|r| r.pid).collect::<Vec<_>>();
        let mut c = Controls::default();
        assert_eq!(pids(&c), [20, 10, 30]);
        assert_eq!(on_key(&mut c, key(KeyCode::Char('s'))), Action::Redraw);
        assert_eq!(c.sort, SortKey::Fds);
        assert_eq!(pids(&c), [10, 20, 30]);
        assert_eq!(on_key(&mut c, key(KeyCode::Char('r'))), Action::Redraw);
        assert_eq!(pids(&c), [30, 20, 10]);
        c.reverse = false;
        for _ in 0..4 {
            on_key(&mut c, key(KeyCode::Char('s')));
        }
        assert_eq!(c.sort, SortKey::Pid);
        assert_eq!(pids(&c), [10, 20, 30]);
        on_key(&mut c, key(KeyCode::Char('s')));
        assert_eq!(c.sort, SortKey::Comm);
        assert_eq!(pids(&c), [20, 30, 10]);
        on_key(&mut c, key(KeyCode::Char('s')));
        assert_eq!(c.sort, SortKey::Risk, "round");
        on_key(&mut c, key(KeyCode::Char('S')));
        assert_eq!(c.sort, SortKey::Comm, "back round");
    }

    #[test]
    fn filter_is_typed_then_kept_or_dropped() {
        let rows: Vec<ProcRow> = [
            proc(101, "nginx", Status::Ok, 5, 0.0, None),
            proc(202, "Postgres", Status::Ok, 5, 0.0, None),
        ]
        .iter()
        .map(row)
        .collect();
        let mut c = Controls::default();
        on_key(&mut c, key(KeyCode::Char('/')));
        assert!(c.editing);
        // While typing, q and c are text, not commands.
        for ch in "posq".chars() {
            assert_eq!(on_key(&mut c, key(KeyCode::Char(ch))), Action::Redraw);
        }
        on_key(&mut c, key(KeyCode::Backspace));
        assert_eq!(c.filter, "pos");
        on_key(&mut c, key(KeyCode::Enter));
        assert!(!c.editing);
        let shown: Vec<u32> = visible(&rows, &c).iter().map(|r| r.pid).collect();
        assert_eq!(shown, [202], "case-insensitive");
        c.filter = "101".into();
        assert_eq!(visible(&rows, &c).len(), 1, "by pid");
        assert_eq!(on_key(&mut c, key(KeyCode::Esc)), Action::Redraw);
        assert_eq!(c.filter, "");
        assert_eq!(on_key(&mut c, key(KeyCode::Esc)), Action::Nothing);
        on_key(&mut c, key(KeyCode::Char('/')));
        on_key(&mut c, key(KeyCode::Char('x')));
        on_key(&mut c, key(KeyCode::Esc));
        assert_eq!((c.editing, c.filter.as_str()), (false, ""));
    }

    #[test]
    fn quit_keys() {
        let mut c = Controls::default();
        assert_eq!(on_key(&mut c, key(KeyCode::Char('q'))), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(on_key(&mut c, ctrl_c), Action::Quit);
        assert!(!c.containers, "Ctrl-C is not the container key");
        c.editing = true;
        assert_eq!(on_key(&mut c, ctrl_c), Action::Quit, "also while typing");
        let mut released = key(KeyCode::Char('q'));
        released.kind = KeyEventKind::Release;
        assert_eq!(on_key(&mut Controls::default(), released), Action::Nothing);
    }

    #[test]
    fn containers_add_up_their_processes() {
        let mut rows: Vec<ProcRow> = [
            proc(1, "a", Status::Ok, 100, 0.5, None),
            proc(2, "b", Status::Warning, 900, 0.25, Some(500.0)),
            proc(3, "c", Status::Ok, 10, 0.0, None),
            proc(4, "d", Status::Ok, 20, 1.0, Some(2000.0)),
        ]
        .iter()
        .map(row)
        .collect();
        rows[0].owner = Some("default/web/app".into());
        rows[1].owner = Some("default/web/app".into());
        rows[3].owner = Some("kube-system/dns/coredns".into());
        let c = containers(&rows);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].owner.as_deref(), Some("default/web/app"));
        assert_eq!(c[0].processes, 2);
        assert_eq!(c[0].open_fds, 1000);
        assert_eq!(c[0].status, Status::Warning);
        assert_eq!(c[0].worst_pct_used, Some(900.0 * 100.0 / 1024.0));
        assert_eq!(c[0].leak_per_s, 0.8);
        assert_eq!(c[0].seconds_to_emfile, Some(500.0));
        assert_eq!(c[1].owner.as_deref(), Some("kube-system/dns/coredns"));
        assert_eq!(c[1].seconds_to_emfile, Some(2000.0));
        assert_eq!((c[2].owner.as_deref(), c[2].processes), (None, 1));
    }

    fn node_view() -> View {
        let mut leaker = proc(24210, "python3", Status::Critical, 174, 8.0, Some(106.0));
        leaker.sites = vec![site("tcp 127.0.0.1:42535", 160, 8.0)];
        let mut v = View::default();
        v.report(&Report {
            ts: 1_767_225_600.0 + 3723.0,
            losses: Vec::new(),
            counts: Default::default(),
            processes: vec![
                proc(1, "init", Status::Ok, 12, 0.0, None),
                leaker,
                proc(300, "nginx", Status::Warning, 850, 0.0, None),
            ],
            containers: Vec::new(),
        });
        v.forks = 4;
        v.exits = 3;
        v.finding(1_767_225_600.0 + 3720.0, 24210, "leak", "connections leak");
        v
    }

    #[test]
    fn screen_shows_the_ranked_processes() {
        let screen = drawn(&node_view(), 110, 12);
        assert_eq!(
            screen[0],
            "fdtrace 01:02:03  3 processes: 1 critical, 1 warning  forks 4  exits 3"
        );
        assert_eq!(screen[1], "processes  sort: risk (riskiest first)");
        let header = &screen[2];
        for col in [
            "STATUS",
            "PID",
            "COMM",
            "FDS/LIMIT",
            "USED",
            "LEAK/s",
            "EMFILE IN",
            "TOP SITE",
        ] {
            assert!(header.contains(col), "{col} in {header:?}");
        }
        assert!(
            !header.contains("POD/CONTAINER"),
            "no column while no process has a container: {header:?}"
        );
        assert!(screen[3].starts_with("critical"), "{:?}", screen[3]);
        for cell in ["24210", "python3", "174/1024", "17.0%", "+8.0", "1m46s"] {
            assert!(screen[3].contains(cell), "{cell} in {:?}", screen[3]);
        }
        assert!(
            screen[3].ends_with("+8.0/s socket tcp 127.0.0.1:42535"),
            "{:?}",
            screen[3]
        );
        assert!(screen[4].starts_with("warning") && screen[4].contains("nginx"));
        assert!(screen[5].starts_with("ok") && screen[5].contains("init"));
        assert!(screen[5].contains("12/1024"), "{:?}", screen[5]);
        assert!(
            screen
                .iter()
                .any(|l| l == "01:02:00 24210 leak: connections leak"),
            "{screen:#?}"
        );
        assert!(screen[11].starts_with("q quit"), "{:?}", screen[11]);
    }

    #[test]
    fn screen_shows_the_filter_and_the_container_view() {
        let mut v = node_view();
        v.rows[2].owner = Some("shop/web-0/nginx".into());
        v.controls.filter = "NGI".into();
        let screen = drawn(&v, 120, 12);
        assert_eq!(
            screen[1],
            "processes  sort: risk (riskiest first)  filter: NGI (1 of 3)"
        );
        assert!(screen[2].contains("POD/CONTAINER"), "{:?}", screen[2]);
        assert!(screen[3].contains("shop/web-0/nginx") && screen[3].contains("nginx"));
        assert_eq!(screen[4], "", "one row: {screen:#?}");

        v.controls.filter.clear();
        v.controls.editing = true;
        v.controls.filter.push_str("py");
        assert!(drawn(&v, 120, 12)[1].ends_with("filter: py_"));

        v.controls = Controls {
            containers: true,
            ..Controls::default()
        };
        let screen = drawn(&v, 120, 12);
        assert_eq!(screen[1], "containers");
        for col in ["POD/CONTAINER", "PROCS", "FDS", "WORST USED", "EMFILE IN"] {
            assert!(screen[2].contains(col), "{col} in {:?}", screen[2]);
        }
        // The host's two processes, one critical, rank above the warning pod.
        assert!(screen[3].starts_with("critical") && screen[3].contains("(host)"));
        assert!(screen[3].contains("186"), "12 + 174 fds: {:?}", screen[3]);
        assert!(screen[4].starts_with("warning") && screen[4].contains("shop/web-0/nginx"));
    }

    fn shared_text(t: &Top<Vec<u8>>) -> String {
        String::from_utf8(t.out.0.borrow().clone()).unwrap()
    }

    const LOG: Console = Console {
        tty: false,
        keyboard: false,
    };

    fn node_report(ts: f64, n: u32, leaker_open: u64) -> Report {
        let mut processes: Vec<ProcessReport> = (1..=n)
            .map(|pid| proc(pid, "idle", Status::Ok, 20, 0.0, None))
            .collect();
        processes[0].figures.open_fds = leaker_open;
        processes[0].figures.comm = "leaker".into();
        Report {
            ts,
            losses: Vec::new(),
            counts: Default::default(),
            processes,
            containers: Vec::new(),
        }
    }

    #[test]
    fn few_processes_keep_the_whole_line_output() {
        let mut t = Top::new(Vec::new(), LOG);
        t.report(&node_report(1.0, 3, 20)).unwrap();
        t.report(&node_report(2.0, 3, 20)).unwrap();
        let text = shared_text(&t);
        assert_eq!(text.matches(" idle ").count(), 4, "{text}");
        assert_eq!(text.matches(" leaker ").count(), 2, "{text}");
        assert!(!text.contains("changed or at risk"));
    }

    #[test]
    fn a_whole_node_prints_what_changed_from_the_first_report() {
        let mut t = Top::new(Vec::new(), LOG).whole_node();
        let request = crate::analysis::Request {
            pids: Vec::new(),
            command: None,
            follow: false,
            interval: Duration::from_secs(1),
            duration: None,
            window: Duration::from_secs(10),
            min_age: Duration::ZERO,
            top: 5,
            fail_on: None,
            stacks: false,
            thresholds: crate::analysis::Thresholds {
                warn_pct: 80.0,
                crit_pct: 90.0,
                warn_within: Duration::from_secs(3600),
                crit_within: Duration::from_secs(300),
            },
        };
        t.start(&Start { ts: 0.5, request }).unwrap();
        // Three processes fit a screen: a node's still get the short form.
        t.report(&node_report(1.0, 3, 20)).unwrap();
        t.report(&node_report(2.0, 3, 21)).unwrap();
        let text = shared_text(&t);
        assert!(
            text.contains("3 processes traced, 3 changed or at risk"),
            "{text}"
        );
        assert!(
            text.contains("3 processes traced, 1 changed or at risk"),
            "only the leaker changed: {text}"
        );
    }

    #[test]
    fn many_processes_print_only_what_changed_or_is_at_risk() {
        let mut t = Top::new(Vec::new(), LOG);
        let n = u32::from(SCREEN_LINES);
        t.report(&node_report(1.0, n, 20)).unwrap();
        let first = shared_text(&t);
        assert!(
            first.contains(&format!("{n} processes traced, {n} changed or at risk")),
            "every process is new at the first report: {first}"
        );
        for ev in [
            Notice::Fork {
                ts: 1.5,
                pid: 900,
                ppid: 1,
            },
            Notice::Exec {
                ts: 1.5,
                pid: 900,
                comm: "sh".into(),
            },
            Notice::Exit {
                ts: 1.6,
                pid: 900,
                comm: "sh".into(),
                totals: Totals::default(),
                ending: Default::default(),
            },
        ] {
            t.notice(&ev).unwrap();
        }
        let mut second = node_report(2.0, n, 21);
        second.processes[5].figures.status = Status::Warning;
        second.processes[9].findings.push(Finding {
            kind: FindingKind::Leak,
            message: "files opened and not closed".into(),
            recommendation: "close them",
            site: None,
            count: Some(3),
            fds: None,
            first_seen_ts: 2.0,
        });
        t.report(&second).unwrap();
        let text = shared_text(&t);
        let later = &text[first.len()..];
        assert!(
            later.contains(&format!(
                "{n} processes traced, 3 changed or at risk; 1 forks, 1 exits since the last report"
            )),
            "{later}"
        );
        assert!(
            !later.contains("exec sh") && !later.contains("exited"),
            "{later}"
        );
        let rows: Vec<&str> = later
            .lines()
            .filter(|l| {
                l.starts_with("00:00:02")
                    && !l.contains("FINDING")
                    && !l.contains("processes traced")
            })
            .collect();
        assert_eq!(rows.len(), 3, "{later}");
        assert!(rows[0].contains("leaker") && rows[0].contains("21/1024"));
        assert!(rows[1].contains(" 6 ") && rows[1].contains("warning"));
        assert!(rows[2].contains(" 10 "));
        assert!(later.contains("FINDING leak: files opened and not closed"));

        // Nothing changed, the finding is not new: the warning alone, and
        // the counts line.
        second.processes[9].findings.clear();
        t.report(&second).unwrap();
        let third = &shared_text(&t)[text.len()..];
        assert!(
            third.contains("1 changed or at risk; 0 forks, 0 exits"),
            "{third}"
        );

        t.summary(&Summary {
            ts: 4.0,
            duration_s: 3.0,
            processes: vec![ProcessSummary {
                pid: 1,
                comm: "leaker".into(),
                totals: Totals::default(),
                emfile: 0,
                enfile: 0,
                exited: false,
                status: Status::Ok,
                leak_per_s: 0.0,
                seconds_to_emfile: None,
                sites: Vec::new(),
                findings: Vec::new(),
                reported: true,
                ending: None,
            }],
            folded: vec![FoldedGroup {
                comm: Some("true".into()),
                processes: 2000,
                opened: 4000,
                closed: 4000,
                emfile: 3,
                enfile: 0,
                status: Status::Exhausted,
                findings: 0,
            }],
            ended: Default::default(),
        })
        .unwrap();
        let text = shared_text(&t);
        assert!(text.contains("Summary (3.0s traced, ended by"));
        let folded = text
            .lines()
            .find(|l| l.contains("2000x true"))
            .unwrap_or_else(|| panic!("no line for the folded processes: {text}"));
        assert!(
            folded.contains("4000")
                && folded.contains("exhausted")
                && folded.contains("exited earlier, totalled"),
            "{folded}"
        );
    }
}
