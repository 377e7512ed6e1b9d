//! Errors that end fdtrace, each with the exit code and the next step for the
//! user.
use std::process::ExitCode;

#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error(
        "missing capabilities: {0}; run fdtrace as root (sudo), or grant it these capabilities"
    )]
    Privileges(String),
    #[error("{0}")]
    Environment(String),
    #[error("no process with pid {0}: check it with `ps -p {0}`")]
    NoSuchPid(u32),
    #[error("{0}")]
    Usage(String),
}

/// 2 for what the user asked (bad usage, no such pid), 1 for everything else.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    match err.downcast_ref::<Fatal>() {
        Some(Fatal::NoSuchPid(_) | Fatal::Usage(_)) => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}
