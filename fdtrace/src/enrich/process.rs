//! Who a process is and its fd limits, from /proc/PID/stat and limits.
use procfs::process::Process;

/// Identity and limits of a process, read once per report.
#[derive(Clone, Debug, Default)]
pub struct ProcInfo {
    pub comm: String,
    pub ppid: Option<u32>,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
}

/// None when the process is gone.
pub fn info(pid: u32) -> Option<ProcInfo> {
    use procfs::process::LimitValue;
    let proc = Process::new(pid as i32).ok()?;
    let stat = proc.stat().ok()?;
    let limit = |v: LimitValue| match v {
        LimitValue::Value(n) => Some(n),
        LimitValue::Unlimited => None,
    };
    let (soft_limit, hard_limit) = match proc.limits() {
        Ok(l) => (
            limit(l.max_open_files.soft_limit),
            limit(l.max_open_files.hard_limit),
        ),
        Err(_) => (None, None),
    };
    Some(ProcInfo {
        comm: stat.comm,
        ppid: u32::try_from(stat.ppid).ok(),
        soft_limit,
        hard_limit,
    })
}
