//! fdtrace: a kernel-level file-descriptor leak tracer.
//!
//! The data of one report flows one way: `kernel` (maps, iterators, ring
//! buffer) -> `reconcile` (drift against /proc, resync) -> `enrich` (/proc
//! and symbols) -> `analysis` (pure) -> `sinks` (terminal, NDJSON), driven
//! by the event loop in `session`.
mod analysis;
mod cli;
mod enrich;
mod error;
mod kernel;
mod procfd;
mod python;
mod reconcile;
mod session;
mod sinks;
mod spawn;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse_checked();
    if let Some(cli::Command::PyStack { tid }) = cli.command {
        let [pid] = cli.pids[..] else {
            eprintln!("fdtrace: py-stack needs one --pid");
            return ExitCode::from(2);
        };
        return python::py_stack(pid, tid, cli.json).unwrap_or_else(|e| {
            eprintln!("fdtrace: {e:#}");
            error::exit_code(&e)
        });
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fdtrace: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(session::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fdtrace: {e:#}");
            error::exit_code(&e)
        }
    }
}
