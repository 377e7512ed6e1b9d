//! Build and provisioning tasks for fdtrace: `cargo xtask <command>`.

mod bench;
mod image;
mod manifests;
mod proc;
mod setup;
mod soak;
mod tasks;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::setup::Tools;

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Build, run and test fdtrace"
)]
struct Cli {
    /// Where bpf-linker and its LLVM links are installed (default: $CARGO_HOME,
    /// else ~/.cargo). Only for testing the install path in a scratch dir.
    #[arg(long, global = true, hide = true, value_name = "DIR")]
    tools_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building fdtrace needs (idempotent): the nightly
    /// toolchain with rust-src and bpf-linker.
    Setup,
    /// Run setup, then build fdtrace (release unless --debug).
    Build(BuildArgs),
    /// Run setup, build fdtrace (release), run it (through sudo if not root).
    Run(RunArgs),
    /// Run setup, fmt and clippy checks, a release build, then the tests (as root).
    Test,
    /// Run setup, build fdtrace and fdloop (release), then measure what
    /// fdtrace costs against bpftrace and empty programs (as root).
    Bench(bench::Args),
    /// Run setup, build fdtrace and fdops (release), then trace a paced
    /// open/close churn and a slow leaker for minutes: fdtrace's own fds and
    /// memory must stay flat and its figures match /proc (as root).
    Soak(soak::Args),
    /// Run setup, build a static fdtrace and write its OCI image (no base
    /// image, no registry) to target/image/fdtrace-VERSION.oci.tar.
    Image(image::Args),
    /// Generate deploy/kubernetes/prometheusrule.yaml from the alert rules;
    /// with --check, validate the manifests offline instead.
    Manifests(manifests::Args),
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// Build with the release profile (the default).
    #[arg(long, conflicts_with = "debug")]
    release: bool,
    /// Build with the dev profile instead.
    #[arg(long)]
    debug: bool,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Arguments for fdtrace, after `--`, e.g. `cargo xtask run -- --pid 1234`.
    #[arg(last = true, value_name = "FDTRACE_ARGS")]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let tools = Tools::locate(cli.tools_dir)?;
    match cli.command {
        Command::Setup => {
            setup::setup(&tools)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Build(args) => {
            tasks::build(&tools, !args.debug)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => tasks::run(&tools, &args.args),
        Command::Test => tasks::test(&tools),
        Command::Bench(args) => bench::bench(&tools, &args),
        Command::Soak(args) => soak::soak(&tools, &args),
        Command::Image(args) => image::image(&tools, &args),
        Command::Manifests(args) => manifests::manifests(&args),
    }
}
