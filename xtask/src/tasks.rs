//! `cargo xtask build | run | test`.
//!
//! xtask's own messages go to stderr so that `cargo xtask run -- --json`
//! leaves fdtrace's stdout clean.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};

use anyhow::{Context, Result, bail};

use crate::manifests;
use crate::proc::{self, Tally, capture, exit_code, is_root};
use crate::setup::{self, Tools};

/// Built by aya-build for the BPF target, never for the host.
const EBPF_CRATE: &str = "fdtrace-ebpf";
/// The shipped Prometheus alert rules, and the dir of their promtool unit
/// tests, relative to the workspace root.
const RULE_FILE: &str = "deploy/prometheus/fdtrace-rules.yaml";
const RULE_TESTS_DIR: &str = "deploy/prometheus/tests";

/// The workspace as cargo sees it.
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        // xtask/ sits directly in the workspace root.
        let start = Path::new(env!("CARGO_MANIFEST_DIR"));
        let start = start.parent().unwrap_or(start);
        let json = capture(
            Command::new("cargo")
                .args(["metadata", "--no-deps", "--format-version", "1"])
                .current_dir(start),
        )?;
        let meta: serde_json::Value =
            serde_json::from_str(&json).context("cannot parse `cargo metadata` output")?;
        let path = |key: &str| -> Result<PathBuf> {
            meta.get(key)
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
                .with_context(|| format!("`cargo metadata` has no {key}"))
        };
        Ok(Self {
            root: path("workspace_root")?,
            target_dir: path("target_directory")?,
        })
    }

    /// `cargo <args>` in the workspace root, with setup's bin dir on PATH.
    pub fn cargo(&self, tools: &Tools, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new("cargo");
        cmd.args(args)
            .current_dir(&self.root)
            .env("PATH", tools.path_env()?);
        Ok(cmd)
    }

    /// `cargo <args>` with the nightly toolchain that builds the eBPF crate.
    fn nightly_cargo(&self, tools: &Tools, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo"])
            .args(args)
            .current_dir(&self.root)
            .env("PATH", tools.path_env()?);
        Ok(cmd)
    }

    fn fdtrace_bin(&self, release: bool) -> PathBuf {
        let profile = if release { "release" } else { "debug" };
        self.target_dir.join(profile).join("fdtrace")
    }
}

/// `cargo xtask build`: setup, then build fdtrace.
pub fn build(tools: &Tools, release: bool) -> Result<()> {
    setup::setup(tools)?;
    let ws = Workspace::locate()?;
    let bin = build_fdtrace(&ws, tools, release)?;
    eprintln!("xtask: built {}", bin.display());
    Ok(())
}

/// The release build: fdtrace linked statically, glibc included
/// (`crt-static`), the one binary that the tests run and the image ships
/// (`cargo xtask image`: its image has no libc). `cargo rustc` gives the
/// flag to fdtrace's own crate only: rustc decides at the final link how
/// std's libc is linked (its `#[link(cfg(target_feature = "crt-static"))]`
/// attributes), so the dependencies, build scripts and eBPF object of a
/// plain `cargo build --release` are reused as they are, not built twice.
/// (RUSTFLAGS would also reach the proc macros, which cannot link
/// statically; `--target` would build every dependency again.) A plain
/// `cargo build --release -p fdtrace` after it relinks fdtrace dynamically.
pub const RELEASE_BUILD: [&str; 9] = [
    "rustc",
    "--release",
    "--package",
    "fdtrace",
    "--bin",
    "fdtrace",
    "--",
    "-C",
    "target-feature=+crt-static",
];

pub fn build_fdtrace(ws: &Workspace, tools: &Tools, release: bool) -> Result<PathBuf> {
    let args: &[&str] = if release {
        &RELEASE_BUILD
    } else {
        &["build", "--package", "fdtrace"]
    };
    proc::run(&mut ws.cargo(tools, args)?)?;
    let bin = ws.fdtrace_bin(release);
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// `cargo xtask run -- ARGS`: setup, release build, then fdtrace ARGS as root.
pub fn run(tools: &Tools, args: &[String]) -> Result<ExitCode> {
    setup::setup(tools)?;
    let ws = Workspace::locate()?;
    let bin = build_fdtrace(&ws, tools, true)?;
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        sudo_command(&bin)?
    };
    cmd.args(args);
    // Ctrl-C goes to the whole foreground group: let fdtrace handle it and
    // report its own exit code instead of dying before it.
    shield_sigint();
    let status = proc::status(&mut cmd)?;
    Ok(ExitCode::from(exit_code(status)))
}

fn sudo_command(bin: &Path) -> Result<Command> {
    if !proc::exists("sudo") {
        bail!(
            "fdtrace needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH) and sudo \
             is not installed: run `cargo xtask run` as root, or run {} as root",
            bin.display()
        );
    }
    eprintln!("xtask: fdtrace needs root: running it through sudo");
    let mut cmd = Command::new("sudo");
    cmd.arg("--").arg(bin);
    Ok(cmd)
}

extern "C" fn on_sigint(_sig: libc::c_int) {}

/// Survive SIGINT (a handler, not SIG_IGN, so children get the default back at exec).
fn shield_sigint() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: installs an async-signal-safe handler that does nothing.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

/// `cargo xtask test`: setup, fmt, clippy, release build, the alert rules'
/// promtool tests, the manifests' offline check, cargo test.
pub fn test(tools: &Tools) -> Result<ExitCode> {
    if !is_root() {
        eprintln!(
            "xtask: the tests load eBPF programs and run containers: they need root; \
             run `cargo xtask test` as root"
        );
        return Ok(ExitCode::FAILURE);
    }
    setup::setup(tools)?;
    ensure_lint_components()?;
    setup::ensure_prometheus()?;
    setup::ensure_test_packages()?;
    let ws = Workspace::locate()?;
    let bin = ws.fdtrace_bin(true);
    // The eBPF crate only builds for bpfel-unknown-none with nightly (through
    // fdtrace's build.rs), never for the host: keep it out of host clippy/test.
    let steps: [&[&str]; 4] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &RELEASE_BUILD,
        // Every test binary runs, so the closing count covers them all.
        &[
            "test",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--no-fail-fast",
        ],
    ];
    let mut commands = Vec::new();
    for (i, args) in steps.into_iter().enumerate() {
        commands.push(ws.cargo(tools, args)?);
        if i == 1 {
            // The eBPF crate is linted for its own target, with its toolchain.
            commands.push(ws.nightly_cargo(
                tools,
                &[
                    "clippy",
                    "--package",
                    EBPF_CRATE,
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?);
        }
    }
    let last = commands.len() - 1;
    for (i, mut cmd) in commands.into_iter().enumerate() {
        cmd.env("FDTRACE_BIN", &bin);
        if i < last {
            let status = proc::status(&mut cmd)?;
            if !status.success() {
                return Ok(fail(&cmd, status));
            }
            continue;
        }
        // Before cargo test, which takes minutes: a broken rule fails fast.
        let (rules, failed) = rule_tests(&ws)?;
        if !failed.is_empty() {
            println!("tests: {} passed, {} failed", rules.passed, rules.failed);
            let names: Vec<_> = failed.iter().map(|f| f.display().to_string()).collect();
            eprintln!(
                "xtask: `promtool test rules` failed for {} (see its output above)",
                names.join(", ")
            );
            return Ok(ExitCode::FAILURE);
        }
        // The manifests, offline: one test of the tally. Also before cargo
        // test, and failing fast for the same reason.
        if let Err(e) = manifests::check(&ws) {
            println!("tests: {} passed, 1 failed", rules.passed);
            eprintln!("xtask: `cargo xtask manifests --check` failed: {e:#}");
            return Ok(ExitCode::FAILURE);
        }
        let (status, mut tally) = proc::status_tally(&mut cmd)?;
        let cargo_ran = tally.passed + tally.failed;
        tally.passed += rules.passed + 1;
        tally.failed += rules.failed;
        // One closing line for all test binaries and the rule tests: cargo's
        // own last lines are the doc-test runs, which have nothing to run.
        let skipped = match tally.ignored {
            0 => String::new(),
            n => format!(", {n} skipped"),
        };
        println!(
            "tests: {} passed, {} failed{skipped}",
            tally.passed, tally.failed
        );
        if !status.success() {
            return Ok(fail(&cmd, status));
        }
        if cargo_ran == 0 {
            eprintln!("xtask: cargo test ran no test");
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `promtool check rules` on the rule file (an error if it fails), then
/// `promtool test rules` on each unit test file: each file is one test of the
/// tally, and failed files are named.
fn rule_tests(ws: &Workspace) -> Result<(Tally, Vec<PathBuf>)> {
    proc::run(
        Command::new("promtool")
            .args(["check", "rules", RULE_FILE])
            .current_dir(&ws.root),
    )?;
    let mut tally = Tally::default();
    let mut failed = Vec::new();
    for file in rule_test_files(&ws.root.join(RULE_TESTS_DIR))? {
        let mut cmd = Command::new("promtool");
        cmd.args(["test", "rules"]).arg(&file).current_dir(&ws.root);
        if proc::status(&mut cmd)?.success() {
            tally.passed += 1;
        } else {
            tally.failed += 1;
            failed.push(file);
        }
    }
    Ok((tally, failed))
}

/// The `*.yaml` files of `dir`, sorted; an error when there is none, so that a
/// moved directory cannot pass as "no test failed".
fn rule_test_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no *.yaml promtool test in {}", dir.display());
    }
    Ok(files)
}

fn fail(cmd: &Command, status: ExitStatus) -> ExitCode {
    let code = exit_code(status).max(1);
    eprintln!("xtask: `{}` failed (exit code {code})", proc::describe(cmd));
    ExitCode::from(code)
}

/// rustfmt and clippy for the toolchain that runs xtask (usually stable) and
/// for nightly, which lints the eBPF crate.
fn ensure_lint_components() -> Result<()> {
    for toolchain in [None, Some("nightly")] {
        ensure_components(toolchain)?;
    }
    Ok(())
}

/// rustfmt and clippy for `toolchain` (None: the one running xtask).
fn ensure_components(toolchain: Option<&str>) -> Result<()> {
    let with_toolchain = |cmd: &mut Command| {
        if let Some(t) = toolchain {
            cmd.args(["--toolchain", t]);
        }
    };
    let mut list_cmd = Command::new("rustup");
    list_cmd.args(["component", "list", "--installed"]);
    with_toolchain(&mut list_cmd);
    let list = capture(&mut list_cmd)?;
    let missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|c| {
            !list
                .lines()
                .any(|l| l.trim().starts_with(&format!("{c}-")) || l.trim() == *c)
        })
        .collect();
    let which = toolchain.unwrap_or("default toolchain");
    if missing.is_empty() {
        eprintln!("test: rustfmt, clippy ({which}): present");
        return Ok(());
    }
    eprintln!(
        "test: {} ({which}): missing: installing",
        missing.join(", ")
    );
    let mut add = Command::new("rustup");
    add.args(["component", "add"]).args(&missing);
    with_toolchain(&mut add);
    proc::run(&mut add)
        .context("adding rustfmt/clippy failed: check the network and run `cargo xtask test` again")
}
