#![no_std]

// This file exists to enable the library target, so fdtrace can list this
// crate as a build-dependency (see fdtrace/build.rs).
