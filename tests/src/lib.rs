//! Harness of the fdtrace integration tests (`tests/tests/*.rs`).
//!
//! A [`Session`] runs the real `fdtrace` binary with `--json --interval 100ms`
//! against the `fdops` helper (src/bin/fdops.rs), either as
//! `fdtrace run -- fdops` or as `fdtrace --pid <fdops pid>`. Lines of fdtrace's
//! stdout are read by a thread; those starting with `{` are JSON objects, those
//! starting with `@fdops ` are replies of the helper (under `run`, fdops writes
//! to fdtrace's stdout).
//!
//! Checking a step: send a command to fdops, wait for its reply (fdops is then
//! idle and its fd table stable), read `/proc/PID/fd`, and wait for a `process`
//! object for that pid with a `ts` later than the reply. That object must agree
//! with /proc: `open_fds` is the number of entries of /proc/PID/fd, `by_kind`
//! the kinds of those entries, `drift` 0, `comm`, `ppid` and the fd limits
//! those of /proc; and `opened_total`/`closed_total`/`emfile_errors` moved by
//! what the step did. The ground truth is always /proc, read by the test.
//! Only a step through a known blind spot ([`Session::step_drift`]) expects a
//! non-zero drift first, then the same exact report after fdtrace's resync.
//!
//! Everything spawned is killed when the session is dropped, so a failed test
//! leaves nothing running.

pub mod bpf_maps;
pub mod containers;
mod env;
mod fdops;
mod holder;
mod one_shot;
mod procfs;
pub mod prometheus;
mod python;
mod session;
mod snapshot;

pub use env::*;
pub use fdops::*;
pub use holder::*;
pub use one_shot::*;
pub use procfs::*;
pub use python::*;
pub use session::*;
pub use snapshot::*;

#[macro_export]
/// Generates `mod NAME { fn run(); fn pid(); }` calling `NAME(mode)`.
macro_rules! both_modes {
    ($name:ident) => {
        $crate::both_modes!($name, $crate::Mode::RUN, $crate::Mode::PID);
    };
    ($name:ident, $run:expr, $pid:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn run() {
                super::$name($run);
            }

            #[test]
            fn pid() {
                super::$name($pid);
            }
        }
    };
}
