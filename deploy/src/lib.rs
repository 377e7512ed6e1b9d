//! What fdtrace ships for containers, shared by `cargo xtask` (which builds
//! the image and checks the manifests) and the container tests (which build
//! their own images the same way and run fdtrace as the manifests say):
//!
//! - [`oci`]: writes an OCI image archive with no base image and no registry;
//! - [`kubernetes`]: the manifests of `deploy/kubernetes`, the PrometheusRule
//!   generated from `deploy/prometheus/fdtrace-rules.yaml`, and their checks.

pub mod kubernetes;
pub mod oci;
