//! `cargo xtask image [--load]`: fdtrace's container image, built here with
//! no base image and no registry.
//!
//! The release fdtrace, which is static (glibc linked in with `-C
//! target-feature=+crt-static`, see [`crate::tasks::RELEASE_BUILD`]: the
//! image has no libc to link against), checked to be static, to embed its
//! eBPF object and to run, is the one file of an OCI image
//! `fdtrace:<version>` (entrypoint `/fdtrace`), written as an OCI archive
//! `target/image/fdtrace-<version>.oci.tar` by [`xtask::oci`].
//! The file is root's, mode 0755: the image runs under any uid, though the
//! DaemonSet runs it as root (see deploy/kubernetes/daemonset.yaml).
//! `--load` imports the archive into the containerd (namespace `k8s.io`,
//! the kubelet's) and the podman found on this machine.

use std::fs;
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use xtask::oci;

use crate::proc::{self, capture};
use crate::setup::{self, Tools};
use crate::tasks::{Workspace, build_fdtrace};

/// The reference the image is imported as: what `image: fdtrace:<version>`
/// in a pod spec resolves to.
const REPOSITORY: &str = "docker.io/library/fdtrace";
/// containerd's namespace for the kubelet's images.
const CONTAINERD_NAMESPACE: &str = "k8s.io";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also import the image into containerd (`ctr -n k8s.io images
    /// import`) and podman (`podman load`), those that are installed.
    #[arg(long)]
    load: bool,
}

/// `cargo xtask image`.
pub fn image(tools: &Tools, args: &Args) -> Result<ExitCode> {
    setup::setup(tools)?;
    let ws = Workspace::locate()?;
    let bin = build_fdtrace(&ws, tools, true)?;
    let version = check_binary(&bin)?;
    let dir = ws.target_dir.join("image");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let archive = dir.join(format!("fdtrace-{version}.oci.tar"));
    let name = format!("{REPOSITORY}:{version}");
    let files = [oci::File {
        path: "fdtrace".into(),
        source: bin,
        mode: 0o755,
    }];
    let image = oci::Image {
        name: &name,
        files: &files,
        // An entrypoint: the pod's `args` (or `ctr run` arguments) are
        // fdtrace's arguments.
        entrypoint: &["/fdtrace"],
        cmd: &[],
    };
    oci::write_archive(&image, &archive)
        .with_context(|| format!("cannot write {}", archive.display()))?;
    eprintln!("xtask: image {name} written to {}", archive.display());
    if args.load {
        load(&archive, &name)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks that the binary is static, embeds its eBPF object and runs
/// (`--version`, `--help`); returns its version.
fn check_binary(bin: &Path) -> Result<String> {
    let bytes = fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    let elf = Elf::read(&bytes).with_context(|| format!("{}", bin.display()))?;
    if elf.interpreter {
        bail!(
            "{} asks for a dynamic loader (PT_INTERP): it would not run in an image with no libc",
            bin.display()
        );
    }
    let objects = embedded_bpf_objects(&bytes);
    if objects == 0 {
        bail!(
            "{} embeds no eBPF object (no ELF of machine EM_BPF inside it)",
            bin.display()
        );
    }
    let version = parse_version(&capture(Command::new(bin).arg("--version"))?)?;
    let help = capture(Command::new(bin).arg("--help"))?;
    if !help.contains("Usage:") {
        bail!("`{} --help` printed no usage:\n{help}", bin.display());
    }
    eprintln!(
        "xtask: {}: static, {objects} eBPF object(s) embedded, fdtrace {version}, --help ok",
        bin.display()
    );
    Ok(version)
}

/// The version of `fdtrace --version` output (`fdtrace 0.1.0`), which
/// must be a valid tag (letters, digits, `_`, `.` and `-`).
fn parse_version(out: &str) -> Result<String> {
    let version = out
        .trim()
        .strip_prefix("fdtrace ")
        .with_context(|| format!("`fdtrace --version` printed {out:?}"))?;
    let tag_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if version.is_empty() || version.len() > 128 || !version.chars().all(tag_char) {
        bail!("`fdtrace --version` gave {version:?}, which is not an image tag");
    }
    Ok(version.to_owned())
}

/// What an ELF file's headers say about linking.
#[derive(Debug, PartialEq, Eq)]
struct Elf {
    /// It has a PT_INTERP program header: the kernel starts the dynamic
    /// loader it names, which a `FROM scratch` image does not have.
    interpreter: bool,
}

/// `PT_INTERP` (include/uapi/linux/elf.h).
const PT_INTERP: u32 = 3;
/// `EM_BPF` (include/uapi/linux/elf-em.h).
const EM_BPF: u16 = 247;

impl Elf {
    /// Reads the program headers of a little-endian 64-bit ELF file.
    fn read(bytes: &[u8]) -> Result<Self> {
        if !is_elf64_le(bytes) {
            bail!("not a little-endian 64-bit ELF file");
        }
        let u16_at = |off: usize| {
            bytes
                .get(off..off + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let (Some(phentsize), Some(phnum), Some(phoff)) = (
            u16_at(0x36),
            u16_at(0x38),
            bytes
                .get(0x20..0x28)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        ) else {
            bail!("truncated ELF header");
        };
        let mut interpreter = false;
        for i in 0..usize::from(phnum) {
            let off = usize::try_from(phoff)
                .ok()
                .and_then(|o| o.checked_add(i * usize::from(phentsize)))
                .context("program header offset overflows")?;
            let p_type = off
                .checked_add(4)
                .and_then(|end| bytes.get(off..end))
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .context("program header past the end of the file")?;
            interpreter |= p_type == PT_INTERP;
        }
        Ok(Elf { interpreter })
    }
}

fn is_elf64_le(bytes: &[u8]) -> bool {
    // e_ident: magic, EI_CLASS = ELFCLASS64 (2), EI_DATA = ELFDATA2LSB (1).
    bytes.len() >= 64 && bytes[..4] == *b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1
}

/// How many ELF objects for the BPF machine are embedded in `bytes` (past
/// its own header): aya loads fdtrace's programs from such an object, put in
/// the binary by `include_bytes_aligned!`.
fn embedded_bpf_objects(bytes: &[u8]) -> usize {
    (1..bytes.len())
        .filter(|&i| {
            let rest = &bytes[i..];
            is_elf64_le(rest) && u16::from_le_bytes([rest[18], rest[19]]) == EM_BPF
        })
        .count()
}

/// Imports the archive into the containerd that answers on its default
/// socket and the podman that is installed.
fn load(archive: &Path, name: &str) -> Result<()> {
    let path = archive.to_str().context("the archive path is not UTF-8")?;
    let mut loaded = Vec::new();
    if !proc::exists("ctr") {
        eprintln!("xtask: ctr is not installed: not loaded into containerd");
    } else if capture(Command::new("ctr").arg("version")).is_err() {
        eprintln!("xtask: containerd does not answer `ctr version`: not loaded into containerd");
    } else {
        proc::run(Command::new("ctr").args(["-n", CONTAINERD_NAMESPACE, "images", "import", path]))
            .context("importing into containerd failed: is containerd running?")?;
        let images =
            capture(Command::new("ctr").args(["-n", CONTAINERD_NAMESPACE, "images", "ls", "-q"]))?;
        if !images.lines().any(|l| l == name) {
            bail!(
                "{name} is not in containerd's {CONTAINERD_NAMESPACE} namespace after the import"
            );
        }
        loaded.push("containerd");
    }
    if !proc::exists("podman") {
        eprintln!("xtask: podman is not installed: not loaded into podman");
    } else {
        proc::run(Command::new("podman").args(["load", "-i", path]))?;
        capture(Command::new("podman").args(["image", "exists", name]))
            .with_context(|| format!("{name} is not in podman's images after the load"))?;
        loaded.push("podman");
    }
    if loaded.is_empty() {
        bail!("--load: no containerd answering and no podman installed");
    }
    eprintln!("xtask: {name} loaded into {}", loaded.join(" and "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with `phnum` program headers of the given
    /// types right after it, for `machine`.
    fn elf(machine: u16, types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn interpreter_found_in_program_headers() {
        // PT_LOAD, PT_DYNAMIC: static-pie; with PT_INTERP: dynamic.
        assert_eq!(
            Elf::read(&elf(62, &[1, 2])).unwrap(),
            Elf { interpreter: false }
        );
        assert_eq!(
            Elf::read(&elf(62, &[6, 3, 1])).unwrap(),
            Elf { interpreter: true }
        );
    }

    #[test]
    fn bad_elf_is_an_error_not_a_panic() {
        assert!(Elf::read(b"#!/bin/sh\n").is_err());
        let mut truncated = elf(62, &[1, 3]);
        truncated.truncate(64 + 56 + 2);
        assert!(Elf::read(&truncated).is_err());
        let mut far = elf(62, &[1]);
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Elf::read(&far).is_err());
    }

    #[test]
    fn embedded_bpf_objects_counted() {
        let mut bin = elf(62, &[1]);
        assert_eq!(embedded_bpf_objects(&bin), 0, "the binary's own header");
        bin.extend(elf(EM_BPF, &[]));
        bin.extend(b"padding");
        bin.extend(elf(62, &[]));
        assert_eq!(embedded_bpf_objects(&bin), 1, "an x86-64 object is not BPF");
        bin.extend(elf(EM_BPF, &[]));
        assert_eq!(embedded_bpf_objects(&bin), 2);
        // A header cut short at the end of the file is not counted.
        bin.extend(&elf(EM_BPF, &[])[..20]);
        assert_eq!(embedded_bpf_objects(&bin), 2);
    }

    #[test]
    fn version_is_a_tag() {
        assert_eq!(parse_version("fdtrace 0.1.0\n").unwrap(), "0.1.0");
        assert_eq!(parse_version("fdtrace 1.2.3-rc.1").unwrap(), "1.2.3-rc.1");
        for bad in ["0.1.0", "fdtrace ", "fdtrace 1.0 beta", "fdtrace 1/2"] {
            assert!(parse_version(bad).is_err(), "{bad:?}");
        }
    }
}
