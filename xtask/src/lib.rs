//! What `cargo xtask` shares with the container tests about fdtrace's image
//! and manifests (the tests build their images and run fdtrace exactly as
//! the shipped files say):
//!
//! - [`oci`]: writes an OCI image archive with no base image and no registry;
//! - [`kubernetes`]: the manifests of `deploy/kubernetes`, the PrometheusRule
//!   generated from `deploy/prometheus/fdtrace-rules.yaml`, and their checks.

pub mod kubernetes;
pub mod oci;
