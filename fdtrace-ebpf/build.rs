use which::which;

/// Building this crate needs bpf-linker on PATH; rebuild when it changes so a
/// freshly installed linker is picked up.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}): run `cargo xtask setup`"),
    }
}
