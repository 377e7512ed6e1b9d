#!/usr/bin/env python3
"""Derives fdtrace.json, the Localhost seccomp profile of this overlay, from
the default profile of CRI-O and podman (containers/common's seccomp.json,
/usr/share/containers/seccomp.json from Debian's podman):

    python3 derive-profile.py /usr/share/containers/seccomp.json > fdtrace.json

That profile allows bpf(2) and perf_event_open(2) only to a process holding
CAP_SYS_ADMIN, which fdtrace does not get; CAP_BPF and CAP_PERFMON are the
kernel's own checks of those calls. The derived profile is the default one
resolved for fdtrace's container (the capabilities of daemonset.yaml, x86-64),
so it has no conditional rule (`includes`/`excludes`): containerd reads a
Localhost profile as a plain OCI profile and would ignore the conditions,
CRI-O evaluates them; both then apply the same rules. The only change: bpf
and perf_event_open move from the EPERM rule to an allow rule.
"""

import json
import sys

# daemonset.yaml's capabilities, with the CAP_ prefix the profile uses.
CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
# The image is built for x86-64 (cargo xtask image).
ARCHES = {"amd64", "x86_64"}
ALLOWED = ["bpf", "perf_event_open"]


def applies(rule):
    inc, exc = rule.get("includes", {}), rule.get("excludes", {})
    if not set(inc.get("caps", [])) <= CAPS:
        return False
    if inc.get("arches") and not ARCHES & set(inc["arches"]):
        return False
    if set(exc.get("caps", [])) & CAPS:
        return False
    if ARCHES & set(exc.get("arches", [])):
        return False
    if "minKernel" in inc or "minKernel" in exc:
        sys.exit(f"a minKernel condition, not resolved here: {rule}")
    return True


def main():
    default = json.load(open(sys.argv[1]))
    rules = []
    for rule in default["syscalls"]:
        if not applies(rule):
            continue
        rule = {k: v for k, v in rule.items() if k not in ("includes", "excludes")}
        if rule["action"] != "SCMP_ACT_ALLOW":
            rule["names"] = [n for n in rule["names"] if n not in ALLOWED]
            if not rule["names"]:
                continue
        rules.append(rule)
    rules.append(
        {
            "names": ALLOWED,
            "action": "SCMP_ACT_ALLOW",
            "args": [],
            "comment": "fdtrace: its BPF maps and programs (CAP_BPF), attaching them (CAP_PERFMON)",
        }
    )
    for r in rules:
        if r["action"] != "SCMP_ACT_ALLOW" and set(ALLOWED) & set(r["names"]):
            sys.exit(f"still refused: {r}")
    profile = {k: v for k, v in default.items() if k != "syscalls"}
    profile["syscalls"] = rules
    json.dump(profile, sys.stdout, indent=2)
    sys.stdout.write("\n")


main()
