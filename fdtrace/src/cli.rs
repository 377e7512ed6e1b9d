//! Command line.
use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{CommandFactory as _, Parser, Subcommand, error::ErrorKind};

use crate::analysis::Status;

const EXAMPLES: &str = "\
Examples:
  sudo fdtrace --pid 1234                      live view of one process, Ctrl-C for the summary
  sudo fdtrace --pid 1234 --window 2m --min-age 30s
                                               leak rates over 2 minutes, fds older than 30s only
  sudo fdtrace run --fail-on critical -- ./soak-test
                                               CI: exit 3 if the program heads for EMFILE
  sudo fdtrace run -- python agent.py          trace a program (and its children) from its first syscall
  sudo fdtrace --pid 1234 --duration 2m --json > report.ndjson
                                               one-off diagnosis as NDJSON

Counts are the kernel's; every interval fdtrace compares them with /proc/PID/fd
and reports any difference as drift (then resyncs).";

/// Trace file-descriptor leaks from the kernel: how many fds each process
/// holds, of which kind, against its own RLIMIT_NOFILE; which call sites open
/// fds that are never closed, how fast, and when the process will hit EMFILE.
#[derive(Debug, Parser)]
#[command(name = "fdtrace", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Process to trace (repeat for several)
    #[arg(short, long = "pid", value_name = "PID", global = true)]
    pub pids: Vec<u32>,

    /// Also trace children forked by the traced processes (always on for `run`
    /// unless --no-follow)
    #[arg(long, global = true)]
    pub follow: bool,

    /// Time between reports (at least 10ms)
    #[arg(short, long, value_name = "DUR", default_value = "1s", value_parser = parse_interval, global = true)]
    pub interval: Duration,

    /// Stop after this long, at least one interval (default: until Ctrl-C or
    /// no traced process is left)
    #[arg(short, long, value_name = "DUR", value_parser = humantime::parse_duration, global = true)]
    pub duration: Option<Duration>,

    /// Print NDJSON on stdout, one object per line (schema in the README)
    #[arg(long, global = true)]
    pub json: bool,

    /// Serve the figures of the last report as OpenMetrics on
    /// http://ADDR/metrics, and /healthz (127.0.0.1:9464, [::1]:9464, or a
    /// pod IP: keep it off public interfaces)
    #[arg(long, value_name = "ADDR", global = true)]
    pub metrics: Option<SocketAddr>,

    /// Per-process series for at most this many processes at most risk
    /// (with --metrics)
    #[arg(long, value_name = "K", default_value_t = 20, global = true)]
    pub metrics_top_processes: usize,

    /// Per-process series for every process whose status is not ok, up to
    /// this many in all, worst first (with --metrics; at least
    /// --metrics-top-processes)
    #[arg(long, value_name = "N", default_value_t = 200, global = true)]
    pub metrics_max_processes: usize,

    /// No terminal view and no NDJSON (for --metrics as a daemon); warnings,
    /// errors and lost events still go to stderr
    #[arg(long, global = true, conflicts_with = "json")]
    pub quiet: bool,

    /// Sliding window of the leak rates (least squares over the reports in it;
    /// at least 3 intervals)
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub window: Duration,

    /// Only fds at least this old count as leak candidates
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = humantime::parse_duration, global = true)]
    pub min_age: Duration,

    /// Call sites reported per process and interval (fastest-growing first)
    #[arg(long, value_name = "N", default_value_t = 10, global = true)]
    pub top: usize,

    /// Exit with code 3 if a traced process reached this status or a worse one
    /// (for CI)
    #[arg(long, value_name = "STATUS", value_enum, global = true)]
    pub fail_on: Option<Status>,

    /// Status warning at this % of the soft fd limit (above 0, at most 100)
    #[arg(long, value_name = "PCT", default_value_t = 80.0, value_parser = parse_pct,
          allow_negative_numbers = true, global = true)]
    pub warn_pct: f64,

    /// Status critical at this % of the soft fd limit (at least --warn-pct, at
    /// most 100)
    #[arg(long, value_name = "PCT", default_value_t = 90.0, value_parser = parse_pct,
          allow_negative_numbers = true, global = true)]
    pub crit_pct: f64,

    /// Status warning when EMFILE is forecast within this time
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = humantime::parse_duration, global = true)]
    pub warn_within: Duration,

    /// Status critical when EMFILE is forecast within this time (at most
    /// --warn-within)
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = humantime::parse_duration, global = true)]
    pub crit_within: Duration,

    /// Do not record call-site stacks (cheaper per fd; sites then differ by
    /// kind and resource only)
    #[arg(long, global = true)]
    pub no_stacks: bool,

    /// Most call-site stacks taken per process per second; fds created faster
    /// than this are tracked without a stack (the stack walk is most of the
    /// cost of a traced fd creation)
    #[arg(long, value_name = "N", default_value_t = 1000, global = true)]
    pub stack_rate: u32,

    /// Most fds tracked at once, all processes together (kernel map size, at
    /// most 134217728; default 1048576, 2097152 in node mode)
    #[arg(long = "max-fds", value_name = "N", global = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_FDS)))]
    pub max_fds_arg: Option<u32>,

    /// Most processes traced at once (kernel map size, at most 65535; default
    /// 8192, 32768 in node mode)
    #[arg(long = "max-procs", value_name = "N", global = true,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub max_procs_arg: Option<u32>,

    /// Node mode: trace every process of the host (kernel threads and
    /// fdtrace itself left out), those running now and every new one from
    /// its fork
    #[arg(long, global = true)]
    pub all: bool,

    /// Node mode restricted to the processes of this cgroup v2 and every
    /// cgroup below it, now and later (PATH as in the `0::` line of
    /// /proc/PID/cgroup, or a directory under the cgroup v2 mount; repeat
    /// for several)
    #[arg(long = "cgroup", value_name = "PATH", global = true)]
    pub cgroups: Vec<String>,

    /// Node mode restricted to the processes of this container (its full id
    /// or a unique prefix; repeat for several)
    #[arg(long = "container", value_name = "ID", global = true)]
    pub containers: Vec<String>,

    /// Node mode restricted to the processes of this Kubernetes pod, named
    /// by its runtime's bundle annotations (repeat for several)
    #[arg(long = "pod", value_name = "NAMESPACE/NAME", global = true)]
    pub pods: Vec<String>,

    /// Where the host's /run, /var/lib and /sys/fs/cgroup are found, when
    /// fdtrace runs in a container with them mounted elsewhere: each
    /// container's pod and names are read there (/proc is fdtrace's own,
    /// the host's when it shares the host's pid namespace)
    #[arg(long, value_name = "DIR", default_value = "/", global = true)]
    pub host_root: PathBuf,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start CMD and trace it from its first syscall
    Run {
        /// Do not trace CMD's children
        #[arg(long)]
        no_follow: bool,
        /// The command and its arguments (put them after --)
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        argv: Vec<OsString>,
    },
    /// Attach an empty program to fdtrace's syscall hook until Ctrl-C: the
    /// kernel's floor for it, measured by `cargo xtask bench`
    #[command(hide = true)]
    NoopHooks,
    /// Print the Python stack of a thread of the --pid process, read from
    /// its memory (no BPF): for tests, and to check a process's frames
    #[command(hide = true)]
    PyStack {
        /// The thread (default: the main thread)
        #[arg(long, value_name = "TID")]
        tid: Option<u32>,
    },
}

/// Largest `--max-fds` the kernel accepts. A hash map's bucket array is
/// `max_entries` rounded up to a power of two, times 16 bytes (`struct
/// bucket`), and htab_map_alloc refuses it with E2BIG when that overflows a
/// u32 (`n_buckets > U32_MAX / sizeof(struct bucket)`): 2^27 buckets is the
/// last power of two that passes, whatever the key and value sizes and
/// BPF_F_NO_PREALLOC.
/// <https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/hashtab.c>
/// The bucket array is allocated when fdtrace starts (2 GiB at this size);
/// the elements are not (BPF_F_NO_PREALLOC).
pub const MAX_FDS: u32 = 1 << 27;

/// Fewest intervals a `--window` spans: a least-squares rate over fewer
/// reports is 0 (one report) or flips with every report (two).
const MIN_WINDOW_INTERVALS: u32 = 3;

/// `--max-fds` and `--max-procs` defaults: one process or a few, and a
/// node (see [`Cli::node`]). Their kernel memory is allocated at start:
/// the fd map's buckets (16 bytes each, 32 MiB for 2097152; the entries
/// themselves follow the fds held) and one counters slot per process
/// (248 bytes, 8 MiB for 32768).
const MAX_FDS_DEFAULT: u32 = 1 << 20;
const MAX_FDS_NODE: u32 = 1 << 21;
const MAX_PROCS_DEFAULT: u32 = 8192;
const MAX_PROCS_NODE: u32 = 32768;

impl Cli {
    /// Whether node mode is on: `--all`, or a cgroup, container or pod
    /// filter (which implies the node machinery restricted to it).
    pub fn node(&self) -> bool {
        self.all || !self.cgroups.is_empty() || !self.containers.is_empty() || !self.pods.is_empty()
    }

    pub fn max_fds(&self) -> u32 {
        self.max_fds_arg.unwrap_or(if self.node() {
            MAX_FDS_NODE
        } else {
            MAX_FDS_DEFAULT
        })
    }

    pub fn max_procs(&self) -> u32 {
        self.max_procs_arg.unwrap_or(if self.node() {
            MAX_PROCS_NODE
        } else {
            MAX_PROCS_DEFAULT
        })
    }

    /// The command line, checked: a bad option ends fdtrace here with exit
    /// code 2 and clap's usage message, which says the valid range.
    pub fn parse_checked() -> Cli {
        Cli::try_parse_checked(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    fn try_parse_checked<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args)?;
        cli.check()
            .map_err(|msg| Cli::command().error(ErrorKind::ValueValidation, msg))?;
        Ok(cli)
    }

    /// The rules between options (each option's own range is checked by its
    /// parser).
    fn check(&self) -> Result<(), String> {
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        // Saturating: humantime takes intervals of billions of years.
        let min_window = self.interval.saturating_mul(MIN_WINDOW_INTERVALS);
        if self.window < min_window {
            return Err(format!(
                "--window {} is shorter than {MIN_WINDOW_INTERVALS} intervals of {}: the leak \
                 rates need {MIN_WINDOW_INTERVALS} reports in the window; give --window {} or \
                 longer (or a shorter --interval)",
                fmt(self.window),
                fmt(self.interval),
                fmt(min_window)
            ));
        }
        if let Some(d) = self.duration
            && d < self.interval
        {
            return Err(format!(
                "--duration {} is shorter than one interval ({}): fdtrace would stop before its \
                 first report; give --duration {} or longer",
                fmt(d),
                fmt(self.interval),
                fmt(self.interval)
            ));
        }
        if self.crit_pct < self.warn_pct {
            return Err(format!(
                "--crit-pct {} is below --warn-pct {}: give --crit-pct between {} and 100",
                self.crit_pct, self.warn_pct, self.warn_pct
            ));
        }
        for pod in &self.pods {
            if !pod
                .split_once('/')
                .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            {
                return Err(format!(
                    "--pod {pod:?}: give the pod as NAMESPACE/NAME, e.g. --pod default/web-0"
                ));
            }
        }
        if self.crit_within > self.warn_within {
            return Err(format!(
                "--crit-within {} is longer than --warn-within {}: give --crit-within {} or \
                 shorter",
                fmt(self.crit_within),
                fmt(self.warn_within),
                fmt(self.warn_within)
            ));
        }
        if self.metrics_top_processes > self.metrics_max_processes {
            return Err(format!(
                "--metrics-top-processes {} is above --metrics-max-processes {}: give \
                 --metrics-max-processes {} or more",
                self.metrics_top_processes, self.metrics_max_processes, self.metrics_top_processes
            ));
        }
        Ok(())
    }
}

/// A percentage of the fd limit: above 0 (at 0 every process would be at the
/// threshold), at most 100 (beyond it the status could never be reached).
fn parse_pct(s: &str) -> Result<f64, String> {
    const RANGE: &str = "give a percentage above 0 and at most 100";
    let p: f64 = s.parse().map_err(|_| format!("not a number: {RANGE}"))?;
    // Written so that NaN fails too.
    if !(p > 0.0 && p <= 100.0) {
        return Err(format!("out of range: {RANGE}"));
    }
    Ok(p)
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(10) {
        return Err("the interval must be at least 10ms".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fdtrace --pid 1 ARGS...` parsed and checked; the error's message.
    fn parse(args: &[&str]) -> Result<Cli, String> {
        let argv = ["fdtrace", "--pid", "1"].iter().chain(args);
        Cli::try_parse_checked(argv).map_err(|e| {
            assert_eq!(e.exit_code(), 2, "{e}");
            e.to_string()
        })
    }

    fn rejected(args: &[&str], says: &str) {
        match parse(args) {
            Ok(cli) => panic!("{args:?} accepted: {cli:?}"),
            Err(msg) => assert!(msg.contains(says), "{args:?}: {msg:?} lacks {says:?}"),
        }
    }

    fn accepted(args: &[&str]) -> Cli {
        parse(args).unwrap_or_else(|e| panic!("{args:?} rejected: {e}"))
    }

    #[test]
    fn defaults_pass() {
        let cli = accepted(&[]);
        assert_eq!(
            (cli.window, cli.interval, cli.warn_pct, cli.crit_pct),
            (Duration::from_secs(60), Duration::from_secs(1), 80.0, 90.0)
        );
    }

    #[test]
    fn window_needs_three_intervals() {
        accepted(&["--window", "3s", "--interval", "1s"]);
        accepted(&["--window", "300ms", "--interval", "100ms"]);
        let says = "give --window 3s or longer";
        rejected(&["--window", "2999ms", "--interval", "1s"], says);
        rejected(&["--window", "1s", "--interval", "1s"], says);
        rejected(&["--window", "0s"], says);
        // 3 intervals overflow a Duration: no panic.
        rejected(
            &["--interval", "200000000000y"],
            "is shorter than 3 intervals",
        );
        // The default window (60s) against a long interval.
        rejected(
            &["--interval", "30s"],
            "--window 1m is shorter than 3 intervals of 30s",
        );
    }

    #[test]
    fn duration_needs_one_interval() {
        accepted(&["--duration", "1s"]);
        accepted(&["--duration", "100ms", "--interval", "100ms"]);
        let says = "give --duration 1s or longer";
        rejected(&["--duration", "0s"], says);
        rejected(&["--duration", "999ms"], says);
    }

    #[test]
    fn pct_in_0_to_100() {
        for ok in ["0.5", "50", "80", "100"] {
            assert_eq!(
                accepted(&["--warn-pct", ok, "--crit-pct", "100"]).warn_pct,
                ok.parse::<f64>().unwrap()
            );
        }
        for opt in ["--warn-pct", "--crit-pct"] {
            for bad in ["0", "-5", "100.01", "150", "NaN", "inf"] {
                rejected(
                    &[opt, bad],
                    "out of range: give a percentage above 0 and at most 100",
                );
            }
            rejected(
                &[opt, "lots"],
                "not a number: give a percentage above 0 and at most 100",
            );
        }
    }

    #[test]
    fn crit_pct_at_least_warn_pct() {
        accepted(&["--warn-pct", "70", "--crit-pct", "70"]);
        accepted(&["--warn-pct", "90"]);
        rejected(
            &["--warn-pct", "80", "--crit-pct", "79.5"],
            "--crit-pct 79.5 is below --warn-pct 80: give --crit-pct between 80 and 100",
        );
        // The default --crit-pct (90) under a higher --warn-pct.
        rejected(
            &["--warn-pct", "95.5"],
            "--crit-pct 90 is below --warn-pct 95.5",
        );
    }

    #[test]
    fn crit_within_at_most_warn_within() {
        accepted(&["--crit-within", "1h"]);
        accepted(&["--warn-within", "10m", "--crit-within", "10m"]);
        rejected(
            &["--crit-within", "2h"],
            "--crit-within 2h is longer than --warn-within 1h: give --crit-within 1h or shorter",
        );
        rejected(
            &["--warn-within", "1m"],
            "--crit-within 5m is longer than --warn-within 1m",
        );
    }

    #[test]
    fn interval_at_least_10ms() {
        accepted(&["--interval", "10ms", "--window", "30ms"]);
        for bad in ["0s", "9ms"] {
            rejected(&["--interval", bad], "the interval must be at least 10ms");
        }
    }

    #[test]
    fn max_fds_within_kernel_map() {
        assert_eq!(accepted(&["--max-fds", "1"]).max_fds(), 1);
        assert_eq!(accepted(&["--max-fds", "134217728"]).max_fds(), MAX_FDS);
        for bad in ["0", "134217729", "4294967295"] {
            rejected(&["--max-fds", bad], "is not in 1..=134217728");
        }
    }

    #[test]
    fn node_mode_defaults_fit_a_node() {
        let one = accepted(&[]);
        assert!(!one.node());
        assert_eq!((one.max_fds(), one.max_procs()), (1 << 20, 8192));
        for flag in [
            &["--all"][..],
            &["--cgroup", "/kubepods"],
            &["--container", "abc"],
            &["--pod", "default/web-0"],
        ] {
            let node = accepted(flag);
            assert!(node.node(), "{flag:?}");
            assert_eq!((node.max_fds(), node.max_procs()), (1 << 21, 32768));
        }
        let given = accepted(&["--all", "--max-fds", "100", "--max-procs", "10"]);
        assert_eq!((given.max_fds(), given.max_procs()), (100, 10));
    }

    #[test]
    fn pod_is_namespace_slash_name() {
        for bad in ["web", "/web", "default/", "a/b/c", ""] {
            rejected(&["--pod", bad], "NAMESPACE/NAME");
        }
        assert_eq!(
            accepted(&["--pod", "kube-system/dns"]).pods,
            ["kube-system/dns"]
        );
    }

    #[test]
    fn max_procs_within_kernel_map() {
        assert_eq!(accepted(&["--max-procs", "1"]).max_procs(), 1);
        assert_eq!(accepted(&["--max-procs", "65535"]).max_procs(), 65535);
        for bad in ["0", "65536"] {
            rejected(&["--max-procs", bad], "is not in 1..=65535");
        }
    }

    #[test]
    fn metrics_address_and_bounds() {
        let cli = accepted(&["--metrics", "[::1]:9464", "--quiet"]);
        assert_eq!(cli.metrics, Some("[::1]:9464".parse().unwrap()));
        assert!(cli.quiet);
        let cli = accepted(&[]);
        assert_eq!(
            (cli.metrics_top_processes, cli.metrics_max_processes),
            (20, 200)
        );
        rejected(&["--metrics", "localhost:9464"], "invalid socket address");
        rejected(&["--metrics", "9464"], "invalid socket address");
        rejected(
            &["--metrics-top-processes", "300"],
            "--metrics-top-processes 300 is above --metrics-max-processes 200",
        );
        rejected(&["--quiet", "--json"], "cannot be used with");
    }

    /// Global options after `run` are checked as well.
    #[test]
    fn options_after_run_checked() {
        rejected(
            &["run", "--window", "1s", "--", "true"],
            "--window 1s is shorter",
        );
    }
}
