//! Command line.
use std::{ffi::OsString, time::Duration};

use clap::{Parser, Subcommand};

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

    /// Time between reports
    #[arg(short, long, value_name = "DUR", default_value = "1s", value_parser = parse_interval, global = true)]
    pub interval: Duration,

    /// Stop after this long (default: until Ctrl-C or no traced process is left)
    #[arg(short, long, value_name = "DUR", value_parser = humantime::parse_duration, global = true)]
    pub duration: Option<Duration>,

    /// Print NDJSON on stdout, one object per line (schema in the README)
    #[arg(long, global = true)]
    pub json: bool,

    /// Sliding window of the leak rates (least squares over the reports in it)
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

    /// Status warning at this % of the soft fd limit
    #[arg(long, value_name = "PCT", default_value_t = 80.0, global = true)]
    pub warn_pct: f64,

    /// Status critical at this % of the soft fd limit
    #[arg(long, value_name = "PCT", default_value_t = 90.0, global = true)]
    pub crit_pct: f64,

    /// Status warning when EMFILE is forecast within this time
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = humantime::parse_duration, global = true)]
    pub warn_within: Duration,

    /// Status critical when EMFILE is forecast within this time
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

    /// Most fds tracked at once, all processes together (kernel map size)
    #[arg(long, value_name = "N", default_value_t = 1 << 20, global = true)]
    pub max_fds: u32,

    /// Most processes traced at once (kernel map size, at most 65535)
    #[arg(long, value_name = "N", default_value_t = 8192, global = true,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub max_procs: u32,

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
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(10) {
        return Err("the interval must be at least 10ms".into());
    }
    Ok(d)
}
