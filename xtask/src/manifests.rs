//! `cargo xtask manifests [--check]`: the Kubernetes manifests of
//! deploy/kubernetes.
//!
//! Without `--check`, writes deploy/kubernetes/prometheusrule.yaml from
//! deploy/prometheus/fdtrace-rules.yaml. With it, changes nothing and fails
//! unless, offline (no cluster exists here):
//! - the PrometheusRule is the one generated, and the files agree with each
//!   other ([`xtask::kubernetes::check`]: kustomizations, Service
//!   and ServiceMonitor, the DaemonSet's capabilities, image and mounts);
//! - `kubectl kustomize` builds the base and the seccomp overlay, and every
//!   object of a built kind validates with PyPI's `kubernetes-validate
//!   --strict` (unknown fields and wrong types are errors) against each
//!   Kubernetes version of [`KUBERNETES_VERSIONS`];
//! - `promtool check rules` accepts the built PrometheusRule's groups.

use std::fs;
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use serde_yaml_ng::Value;
use xtask::kubernetes::{self, PROMETHEUS_RULE, SECCOMP_OVERLAY};

use crate::proc::{self, capture};
use crate::setup;
use crate::tasks::Workspace;

/// The Kubernetes versions the manifests are validated against: the
/// README names the same.
pub const KUBERNETES_VERSIONS: [&str; 9] = [
    "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];
/// The validator, from PyPI, installed in a venv under target/.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Change nothing: fail if the generated file differs from the one
    /// committed, or if a manifest does not validate.
    #[arg(long)]
    check: bool,
}

/// `cargo xtask manifests`.
pub fn manifests(args: &Args) -> Result<ExitCode> {
    let ws = Workspace::locate()?;
    if args.check {
        setup::ensure_prometheus()?;
        check(&ws)?;
        return Ok(ExitCode::SUCCESS);
    }
    let deploy = ws.root.join("deploy");
    let rule = kubernetes::generate(&deploy)?;
    let path = deploy.join(PROMETHEUS_RULE);
    fs::write(&path, rule).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("xtask: {} written", path.display());
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask manifests --check` (promtool must be installed): fails on
/// the first problem found.
pub fn check(ws: &Workspace) -> Result<()> {
    let deploy = ws.root.join("deploy");
    let problems = kubernetes::check(&deploy, env!("CARGO_PKG_VERSION"));
    for p in &problems {
        eprintln!("xtask: {p}");
    }
    if !problems.is_empty() {
        bail!("{} problem(s) in {}", problems.len(), deploy.display());
    }
    eprintln!("xtask: deploy/: generated file up to date, manifests consistent");
    let venv = validator(ws)?;
    let out = ws.target_dir.join("manifests");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, dir, seccomp, bundles) in [
        (
            "base",
            deploy.join("kubernetes"),
            "RuntimeDefault",
            "/run/containerd/io.containerd.runtime.v2.task",
        ),
        (
            "localhost-seccomp",
            deploy.join(SECCOMP_OVERLAY),
            "Localhost",
            "/run/containers/storage/overlay-containers",
        ),
    ] {
        let built = kustomize(&dir)?;
        let file = out.join(format!("{name}.yaml"));
        fs::write(&file, &built).with_context(|| format!("cannot write {}", file.display()))?;
        validate(&venv, &file, &built)?;
        check_built_daemonset(
            &built,
            &out.join(format!("{name}-daemonset.yaml")),
            seccomp,
            bundles,
        )?;
        promtool_check(&built, &out.join(format!("{name}-rules.yaml")))?;
        eprintln!(
            "xtask: {name}: built, valid for Kubernetes {} to {}, rules checked",
            KUBERNETES_VERSIONS[0],
            KUBERNETES_VERSIONS[KUBERNETES_VERSIONS.len() - 1]
        );
    }
    Ok(())
}

/// `kubectl kustomize DIR` (kustomize is built into kubectl and needs no
/// cluster).
fn kustomize(dir: &Path) -> Result<String> {
    if !proc::exists("kubectl") {
        // The rust machine image ships kubectl (package kubectl 1:528.0.0-0,
        // from outside Debian's registry, whose kubernetes-client 1.20 has a
        // kustomize too old for these files): nothing here can install it.
        bail!(
            "kubectl is not installed: the manifest check builds the kustomizations with \
             `kubectl kustomize` (no cluster needed); install kubectl 1.27 or later"
        );
    }
    capture(Command::new("kubectl").arg("kustomize").arg(dir))
}

/// The venv with kubernetes-validate, made once.
fn validator(ws: &Workspace) -> Result<std::path::PathBuf> {
    let venv = ws.target_dir.join("k8s-validate");
    let bin = venv.join("bin/kubernetes-validate");
    if bin.is_file() {
        return Ok(bin);
    }
    proc::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("cannot make a Python venv (apt-get install python3-venv)")?;
    proc::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]))
        .with_context(|| format!("cannot install {KUBERNETES_VALIDATE} from PyPI"))?;
    Ok(bin)
}

/// Validates every object of `file` against each version. The validator
/// warns, and fails only with `--strict` errors, on custom resources it has
/// no schema for (the ServiceMonitor and PrometheusRule): those are checked
/// by [`kubernetes::check`] and promtool instead.
fn validate(validator: &Path, file: &Path, built: &str) -> Result<()> {
    // Every object of a built-in kind must be said to pass: none skipped.
    let builtin = documents(built)?
        .iter()
        .filter(|d| {
            d.get("apiVersion")
                .and_then(Value::as_str)
                .is_some_and(|v| !v.starts_with("monitoring.coreos.com/"))
        })
        .count();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(validator)
            .args(["--strict", "-k", version])
            .arg(file)
            .output()
            .with_context(|| format!("cannot run {}", validator.display()))?;
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        let passed = text.matches(" passed for resource ").count();
        if !out.status.success() || text.contains("ERROR") || passed != builtin {
            bail!(
                "{} does not validate for Kubernetes {version} ({passed} of {builtin} objects passed):\n{text}",
                file.display()
            );
        }
    }
    Ok(())
}

/// The built DaemonSet runs under `seccomp` and mounts the cgroup
/// hierarchy and the runtime's `bundles` directory, read-only under
/// --host-root, and nothing else: what the overlay's patch must do.
fn check_built_daemonset(built: &str, file: &Path, seccomp: &str, bundles: &str) -> Result<()> {
    let docs = documents(built)?;
    let ds = docs
        .iter()
        .find(|d| d.get("kind").and_then(Value::as_str) == Some("DaemonSet"))
        .context("no DaemonSet built")?;
    fs::write(file, serde_yaml_ng::to_string(ds)?)
        .with_context(|| format!("cannot write {}", file.display()))?;
    let ds = kubernetes::Fdtrace::load(file)?;
    let mut hosts: Vec<&str> = ds.mounts.iter().map(|m| m.host_path.as_str()).collect();
    hosts.sort_unstable();
    let mut want = vec!["/sys/fs/cgroup", bundles];
    want.sort_unstable();
    if ds.seccomp != seccomp || hosts != want {
        bail!(
            "{}: seccomp {} and mounts {hosts:?}, not {seccomp} and {want:?}",
            file.display(),
            ds.seccomp
        );
    }
    for m in &ds.mounts {
        if !m.read_only || m.mount_path != format!("{}{}", kubernetes::HOST_ROOT, m.host_path) {
            bail!(
                "{}: {m:?} is not read-only under --host-root",
                file.display()
            );
        }
    }
    Ok(())
}

/// The documents of a multi-document YAML text.
fn documents(text: &str) -> Result<Vec<Value>> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Ok(<Value as serde::Deserialize>::deserialize(doc)?))
        .collect()
}

/// `promtool check rules` on the groups of the PrometheusRule in `built`.
fn promtool_check(built: &str, rules: &Path) -> Result<()> {
    let spec = rule_spec(built)?;
    fs::write(rules, serde_yaml_ng::to_string(&spec)?)
        .with_context(|| format!("cannot write {}", rules.display()))?;
    proc::run(Command::new("promtool").args(["check", "rules"]).arg(rules))
        .context("promtool check rules failed (promtool: apt-get install prometheus)")
}

/// The `spec` of the one PrometheusRule of a multi-document manifest.
fn rule_spec(built: &str) -> Result<Value> {
    let mut specs = Vec::new();
    for v in documents(built)? {
        if v.get("kind").and_then(Value::as_str) == Some("PrometheusRule") {
            specs.push(
                v.get("spec")
                    .cloned()
                    .context("a PrometheusRule with no spec")?,
            );
        }
    }
    match <[Value; 1]>::try_from(specs) {
        Ok([spec]) => Ok(spec),
        Err(specs) => bail!("{} PrometheusRule objects built, one expected", specs.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_spec_of_a_built_manifest() {
        let built = "kind: Namespace\nmetadata: {name: x}\n---\nkind: PrometheusRule\nspec:\n  groups: []\n";
        assert_eq!(rule_spec(built).unwrap()["groups"], Value::Sequence(vec![]));
        assert!(rule_spec("kind: Namespace\n").is_err());
        let two = format!("{built}---\nkind: PrometheusRule\nspec: {{}}\n");
        assert!(rule_spec(&two).is_err());
    }
}
