//! `cargo xtask setup`: provision a new machine for building and running fdtrace.
//!
//! Each step checks first and only acts when something is missing, so a warm
//! machine costs a few `rustup`/`--version` calls.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::proc::{self, capture, is_root};

/// The bpf-linker release that works with aya 0.14 and nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// `bpf-linker --version` must start with this.
const BPF_LINKER_VERSION_PREFIX: &str = "bpf-linker 0.13";
pub const TRACEFS_DIR: &str = "/sys/kernel/tracing";
const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";
/// Debian's package with `prometheus` and `promtool` (2.42 on Debian 12).
const PROMETHEUS_PACKAGE: &str = "prometheus";

/// Where setup installs its tools: `<dir>/bin/bpf-linker` and the LLVM links
/// in `<dir>/bpf-linker-llvm/lib` (bpf-linker's rpath points there).
#[derive(Debug)]
pub struct Tools {
    dir: PathBuf,
}

impl Tools {
    /// `over`, else `$CARGO_HOME`, else `~/.cargo`.
    pub fn locate(over: Option<PathBuf>) -> Result<Self> {
        let dir = match over {
            Some(dir) => dir,
            None => default_cargo_home()?,
        };
        let dir = if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir()
                .context("cannot read the current directory")?
                .join(dir)
        };
        Ok(Self { dir })
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    fn llvm_prefix(&self) -> PathBuf {
        self.dir.join("bpf-linker-llvm")
    }

    fn bpf_linker(&self) -> PathBuf {
        self.bin_dir().join("bpf-linker")
    }

    /// `PATH` with our bin dir first, so aya-build finds this bpf-linker.
    pub fn path_env(&self) -> Result<OsString> {
        let current = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.bin_dir()];
        dirs.extend(std::env::split_paths(&current).filter(|d| *d != self.bin_dir()));
        std::env::join_paths(dirs).context("cannot build PATH (a directory contains ':')")
    }

    fn on_user_path(&self) -> bool {
        let current = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&current).any(|d| d == self.bin_dir())
    }
}

fn default_cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cargo")),
        None => bail!("neither CARGO_HOME nor HOME is set: set CARGO_HOME to cargo's home dir"),
    }
}

fn step(what: &str, msg: impl AsRef<str>) {
    eprintln!("setup: {what}: {}", msg.as_ref());
}

/// Runs every setup step in order.
pub fn setup(tools: &Tools) -> Result<()> {
    check_rustup()?;
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker(tools)?;
    check_btf();
    Ok(())
}

fn check_rustup() -> Result<()> {
    let out = capture(Command::new("rustup").arg("--version")).context(
        "rustup is needed (fdtrace builds its eBPF part with the nightly toolchain): \
         install it from https://rustup.rs and run `cargo xtask setup` again",
    )?;
    step("rustup", first_line(&out));
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    if !has_nightly()? {
        step("nightly toolchain", "missing: installing");
        proc::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("installing the nightly toolchain failed: check the network, then run `cargo xtask setup` again")?;
    }
    let vv = nightly_rustc_vv()?;
    step(
        "nightly toolchain",
        format!("present ({}, LLVM {})", first_line(&vv), llvm_version(&vv)?),
    );
    Ok(())
}

/// Whether `rustup toolchain list` has `nightly` (not a dated nightly).
fn has_nightly() -> Result<bool> {
    let host = host_triple()?;
    let list = capture(Command::new("rustup").args(["toolchain", "list"]))?;
    let wanted = format!("nightly-{host}");
    Ok(list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| name == "nightly" || name == wanted))
}

fn host_triple() -> Result<String> {
    let vv = capture(Command::new("rustc").arg("-vV"))?;
    field(&vv, "host: ").context("`rustc -vV` printed no host line")
}

fn nightly_rustc_vv() -> Result<String> {
    capture(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("the nightly toolchain does not run: try `rustup toolchain install nightly --profile minimal --force`")
}

fn ensure_rust_src() -> Result<()> {
    let list = capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if list.lines().any(|l| l.trim() == "rust-src") {
        step("rust-src (nightly)", "present");
        return Ok(());
    }
    step("rust-src (nightly)", "missing: installing");
    proc::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context(
        "adding rust-src to nightly failed: check the network, then run `cargo xtask setup` again",
    )
}

/// The nightly toolchain's own libLLVM, which bpf-linker must be built against.
struct NightlyLlvm {
    /// LLVM major version: picks bpf-linker's `llvm-NN` feature.
    major: u32,
    /// Full path of `<sysroot>/lib/libLLVM.so.*`.
    lib: PathBuf,
    /// Its file name, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
    so: String,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let major = llvm_major(&nightly_rustc_vv()?)?;
    let sysroot =
        capture(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let so = find_libllvm(&sysroot_lib)?;
    Ok(NightlyLlvm {
        major,
        lib: sysroot_lib.join(&so),
        so,
    })
}

fn ensure_bpf_linker(tools: &Tools) -> Result<()> {
    let path = tools.bpf_linker();
    let llvm = nightly_llvm()?;
    match bpf_linker_version(&path) {
        Some(v) if v.starts_with(BPF_LINKER_VERSION_PREFIX) => {
            if links_to(tools, &llvm) {
                step(
                    "bpf-linker",
                    format!("{v} at {} works, built against {}", path.display(), llvm.so),
                );
                note_path(tools);
                return Ok(());
            }
            step(
                "bpf-linker",
                format!(
                    "{v} at {} was not built against nightly's {}: rebuilding",
                    path.display(),
                    llvm.so
                ),
            );
        }
        Some(v) => step(
            "bpf-linker",
            format!("{} is {v}: installing {BPF_LINKER_VERSION}", path.display()),
        ),
        None if path.exists() => step(
            "bpf-linker",
            format!(
                "{} does not run (stale libLLVM link?): reinstalling",
                path.display()
            ),
        ),
        None => step(
            "bpf-linker",
            format!(
                "not in {}: installing {BPF_LINKER_VERSION}",
                tools.bin_dir().display()
            ),
        ),
    }
    install_bpf_linker(tools, &llvm)?;
    match bpf_linker_version(&path) {
        Some(v) if v.starts_with(BPF_LINKER_VERSION_PREFIX) => {
            step("bpf-linker", format!("installed {v} at {}", path.display()));
            note_path(tools);
            Ok(())
        }
        _ => bail!(
            "bpf-linker was installed at {} but `bpf-linker --version` does not work: \
             check the links in {}/lib, then run `cargo xtask setup` again",
            path.display(),
            tools.llvm_prefix().display()
        ),
    }
}

/// Whether our `libLLVM.so` link (what bpf-linker was linked with) points at
/// the current nightly's libLLVM; false after a nightly update changed it.
fn links_to(tools: &Tools, llvm: &NightlyLlvm) -> bool {
    let link = tools.llvm_prefix().join("lib").join("libLLVM.so");
    fs::read_link(link).is_ok_and(|target| target == llvm.lib)
}

/// First line of `bpf-linker --version`, or None if it does not run.
fn bpf_linker_version(path: &Path) -> Option<String> {
    let out = Command::new(path).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(first_line(&String::from_utf8_lossy(&out.stdout)).to_owned())
}

fn note_path(tools: &Tools) {
    if !tools.on_user_path() {
        step(
            "PATH",
            format!(
                "{} is not on PATH: xtask adds it for its own builds; add it to PATH to build with plain cargo",
                tools.bin_dir().display()
            ),
        );
    }
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM
/// (see shared/design/toolchain-and-kernel.md).
fn install_bpf_linker(tools: &Tools, llvm: &NightlyLlvm) -> Result<()> {
    let prefix = tools.llvm_prefix();
    link_libllvm(&llvm.lib, &prefix.join("lib"), &llvm.so)?;
    step(
        "bpf-linker",
        format!(
            "building against {} (LLVM {}) via {}/lib",
            llvm.so,
            llvm.major,
            prefix.display()
        ),
    );
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{}", llvm.major),
        ])
        .arg("--root")
        .arg(&tools.dir)
        .arg("--force")
        .env("LLVM_PREFIX", &prefix)
        // Keep this workspace's .cargo/config.toml out of the install.
        .current_dir(&tools.dir);
    proc::run(&mut cmd).with_context(|| {
        format!(
            "building bpf-linker {BPF_LINKER_VERSION} with feature llvm-{} failed (see the output \
             above): it needs network access to crates.io and a C toolchain (cc); fix that and \
             run `cargo xtask setup` again",
            llvm.major
        )
    })
}

/// The file name of `libLLVM.so.*` in the nightly sysroot's lib dir.
fn find_libllvm(sysroot_lib: &Path) -> Result<String> {
    let entries = fs::read_dir(sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", sysroot_lib.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") {
            names.push(name);
        }
    }
    names.sort();
    names.pop().with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain looks incomplete; \
             try `rustup toolchain install nightly --profile minimal --force`",
            sysroot_lib.display()
        )
    })
}

/// `lib/libLLVM.so` (for -lLLVM) and `lib/<so>` (for the rpath) -> `target`.
fn link_libllvm(target: &Path, lib_dir: &Path, so: &str) -> Result<()> {
    fs::create_dir_all(lib_dir).with_context(|| format!("cannot create {}", lib_dir.display()))?;
    for name in ["libLLVM.so", so] {
        symlink_force(target, &lib_dir.join(name))?;
    }
    Ok(())
}

fn symlink_force(target: &Path, link: &Path) -> Result<()> {
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).with_context(|| format!("cannot replace {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

fn check_btf() {
    if Path::new(BTF_VMLINUX).exists() {
        step("kernel BTF", format!("{BTF_VMLINUX} present"));
    } else {
        step(
            "kernel BTF",
            format!(
                "WARNING: {BTF_VMLINUX} is missing: fdtrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
            ),
        );
    }
}

/// Whether tracefs is mounted where aya's tracepoint attach looks.
pub fn tracefs_mounted() -> bool {
    Path::new(TRACEFS_DIR).join("events").is_dir()
}

/// Only the bench needs it: bpftrace, its peer, attaches classic
/// tracepoints. fdtrace itself uses BTF tracepoints and iterators, which need
/// no tracefs.
pub fn ensure_tracefs() -> Result<()> {
    if tracefs_mounted() {
        step("tracefs", format!("mounted at {TRACEFS_DIR}"));
        return Ok(());
    }
    step(
        "tracefs",
        format!("not mounted: mounting at {TRACEFS_DIR} for bpftrace"),
    );
    proc::run(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS_DIR]))
        .context("cannot mount tracefs: the kernel needs CONFIG_TRACING (tracefs)")?;
    if !tracefs_mounted() {
        bail!("tracefs mounted but {TRACEFS_DIR}/events is missing: check `mount | grep tracefs`");
    }
    Ok(())
}

/// Debian's `prometheus` package, unless `prometheus` and `promtool` both run:
/// the tests check the alert rules with promtool and run a real Prometheus.
pub fn ensure_prometheus() -> Result<()> {
    const PROGS: [&str; 2] = ["prometheus", "promtool"];
    if PROGS.iter().all(proc::exists) {
        let version = capture(Command::new("prometheus").arg("--version"))?;
        step("prometheus", format!("present ({})", first_line(&version)));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "prometheus and promtool are needed by the tests and missing, and installing them \
             needs root: run `apt-get install --no-install-recommends {PROMETHEUS_PACKAGE}` as root"
        );
    }
    step("prometheus", "missing: installing Debian's package");
    if apt_install(PROMETHEUS_PACKAGE).is_err() {
        // A fresh machine may have no package lists yet.
        step(
            "prometheus",
            "install failed: updating the package lists and trying again",
        );
        proc::run(Command::new("apt-get").arg("update"))
            .context("apt-get update failed: check the network")?;
        apt_install(PROMETHEUS_PACKAGE)?;
    }
    if let Some(prog) = PROGS.iter().find(|p| !proc::exists(p)) {
        bail!("the {PROMETHEUS_PACKAGE} package was installed but `{prog} --version` does not run");
    }
    // The tests start their own Prometheus on a free port; the package's
    // service (started by systemd, where there is one) does not disturb them.
    step(
        "prometheus",
        "installed; where systemd runs, the package also enabled prometheus.service \
         (`systemctl disable --now prometheus` to stop it)",
    );
    Ok(())
}

/// The container runtimes the container tests run real containers with,
/// tmux for the live view's terminal test, strace for the test that counts
/// fdtrace's reads of /proc, binutils' strip and util-linux's setpriv for the
/// container-stack and privilege tests, bpftool for the Python sites test
/// (it reads fdtrace's interpreter map): (program, Debian package).
const TEST_PACKAGES: [(&str, &str); 9] = [
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("podman", "podman"),
    ("runc", "runc"),
    ("tmux", "tmux"),
    ("strace", "strace"),
    ("strip", "binutils"),
    ("setpriv", "util-linux"),
    ("bpftool", "bpftool"),
];

/// Installs the Debian packages of TEST_PACKAGES whose program is missing.
pub fn ensure_test_packages() -> Result<()> {
    let mut missing: Vec<&str> = TEST_PACKAGES
        .iter()
        .filter(|(prog, _)| !proc::exists(prog))
        .map(|&(_, package)| package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        let programs: Vec<&str> = TEST_PACKAGES.iter().map(|&(prog, _)| prog).collect();
        step("test packages", format!("{} present", programs.join(", ")));
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "the tests need {list}: run `apt-get install --no-install-recommends {list}` as root"
        );
    }
    step("test packages", format!("missing: installing {list}"));
    for package in &missing {
        if apt_install(package).is_err() {
            // A fresh machine may have no package lists yet.
            proc::run(Command::new("apt-get").arg("update"))
                .context("apt-get update failed: check the network")?;
            apt_install(package)?;
        }
    }
    if let Some((prog, package)) = TEST_PACKAGES.iter().find(|(p, _)| !proc::exists(p)) {
        bail!("the {package} package was installed but `{prog}` is still not on PATH");
    }
    Ok(())
}

/// `apt-get install -y --no-install-recommends PACKAGE` (the recommends of
/// prometheus are node-exporter and its collectors, which the tests do not use).
fn apt_install(package: &str) -> Result<()> {
    proc::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("cannot install {package} with apt-get"))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// The value after `prefix` on the first line that starts with it.
fn field(text: &str, prefix: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|v| v.trim().to_owned())
}

/// "22.1.4" from `rustc -vV`'s "LLVM version: 22.1.4".
fn llvm_version(vv: &str) -> Result<String> {
    field(vv, "LLVM version: ").context("`rustc +nightly -vV` printed no LLVM version")
}

/// 22 from "LLVM version: 22.1.4": picks bpf-linker's `llvm-22` feature.
fn llvm_major(vv: &str) -> Result<u32> {
    let version = llvm_version(vv)?;
    let major = version.split('.').next().unwrap_or("");
    major
        .parse()
        .with_context(|| format!("cannot read the LLVM major version from {version:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                      host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";

    #[test]
    fn parses_llvm_major() -> Result<()> {
        assert_eq!(llvm_major(VV)?, 22);
        assert!(llvm_major("rustc 1.0\n").is_err());
        Ok(())
    }

    #[test]
    fn parses_host() {
        assert_eq!(
            field(VV, "host: ").as_deref(),
            Some("x86_64-unknown-linux-gnu")
        );
    }
}
