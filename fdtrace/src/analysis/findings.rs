//! Findings: what a person should act on, each with its text and fix.
use fdtrace_common::FdKind;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A site grows at LEAK_FINDING_RATE or more over the window.
    Leak,
    /// Live sockets of a resource are in CLOSE_WAIT.
    CloseWait,
    /// A call failed with EMFILE or ENFILE.
    Emfile,
    /// A process exec'd holding fds it did not open.
    Inherited,
}

impl FindingKind {
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::Leak => "leak",
            FindingKind::CloseWait => "close_wait",
            FindingKind::Emfile => "emfile",
            FindingKind::Inherited => "inherited",
        }
    }
}

/// Why an fd-creating call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Errno {
    /// The process's RLIMIT_NOFILE.
    #[serde(rename = "EMFILE")]
    Emfile,
    /// The system's fs.file-max.
    #[serde(rename = "ENFILE")]
    Enfile,
}

impl Errno {
    pub fn name(self) -> &'static str {
        match self {
            Errno::Emfile => "EMFILE",
            Errno::Enfile => "ENFILE",
        }
    }
}

/// Something a person should act on; reported once, when first seen, and
/// in the summary with its figures of then.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub kind: FindingKind,
    pub message: String,
    pub recommendation: &'static str,
    pub site: Option<String>,
    pub count: Option<u64>,
    /// The fds concerned, "3 (pipe)", for inherited fds.
    pub fds: Option<Vec<String>>,
    /// Unix time of the report or event that first showed it.
    pub first_seen_ts: f64,
}

impl Finding {
    /// A finding about nothing: no fd, no count.
    pub fn is_empty(&self) -> bool {
        self.count == Some(0) || self.fds.as_ref().is_some_and(Vec::is_empty)
    }
}

/// The figures of a site a finding is about.
#[derive(Clone, Copy, Debug)]
pub struct SiteFigures<'a> {
    pub id: &'a str,
    pub kind: FdKind,
    pub resource: &'a str,
    pub leak_per_s: f64,
    pub open: u64,
    pub oldest_age_s: f64,
}

pub fn leak(s: SiteFigures<'_>, ts: f64) -> Finding {
    let what = match s.kind {
        FdKind::Socket => format!("connections ({})", s.resource),
        FdKind::Pipe => "pipes".to_string(),
        FdKind::File => format!("files {}", s.resource),
        k => format!("{} fds", k.name()),
    };
    let recommendation = match s.kind {
        FdKind::Socket => {
            "Close each connection when done (a context manager or try/finally), or share one long-lived pooled client instead of creating one per request."
        }
        FdKind::Pipe => {
            "Close the pipes of every child you start (read them with communicate(), or close stdout/stderr) and wait() for it."
        }
        FdKind::File if s.resource.contains("sqlite") || s.resource.ends_with(".db") => {
            "Close each database connection (a context manager or a pool), or reuse one connection."
        }
        FdKind::File => {
            "Close each file when done (a context manager or try/finally); if a handler or client opens it, create that object once and reuse it."
        }
        _ => "Close these fds when done, or create the object that owns them once and reuse it.",
    };
    Finding {
        kind: FindingKind::Leak,
        message: format!(
            "{what} are opened and not closed: {:+.1} fds/s, {} open, oldest {:.0}s",
            super::display_rate(s.leak_per_s),
            s.open,
            s.oldest_age_s
        ),
        recommendation,
        site: Some(s.id.to_string()),
        count: Some(s.open),
        fds: None,
        first_seen_ts: ts,
    }
}

/// `n` sockets of the site's resource are in CLOSE_WAIT.
pub fn close_wait(site_id: &str, resource: &str, n: u64, ts: f64) -> Finding {
    Finding {
        kind: FindingKind::CloseWait,
        message: format!(
            "{n} sockets to {resource} are in CLOSE_WAIT: the peer closed them and this process never did"
        ),
        recommendation: "Close the connection once the response is read, including on error paths; CLOSE_WAIT sockets only go away when the process closes them.",
        site: Some(site_id.to_string()),
        count: Some(n),
        fds: None,
        first_seen_ts: ts,
    }
}

/// `syscall` (of `resource`, when it names one) failed with `errno` at the
/// innermost frame `at`.
pub fn fd_error(
    syscall: &str,
    resource: Option<&str>,
    errno: Errno,
    at: Option<&str>,
    ts: f64,
) -> Finding {
    let at = at.unwrap_or("an unknown call site");
    let what = resource.map_or(String::new(), |r| format!(" of {r}"));
    Finding {
        kind: FindingKind::Emfile,
        message: format!("{syscall}{what} failed with {} at {at}", errno.name()),
        recommendation: match errno {
            Errno::Emfile => {
                "The process is out of fds: fix the fastest-growing site first; raising RLIMIT_NOFILE only delays the failure."
            }
            Errno::Enfile => {
                "The whole system is out of open files (fs.file-max): find the process holding most of them."
            }
        },
        site: None,
        count: None,
        fds: None,
        first_seen_ts: ts,
    }
}

/// `comm` started holding `fds` ("7 (pipe)") it did not open; None when
/// there are none (they were closed before they could be read).
pub fn inherited(comm: &str, fds: Vec<String>, ts: f64) -> Option<Finding> {
    if fds.is_empty() {
        return None;
    }
    Some(Finding {
        kind: FindingKind::Inherited,
        message: format!(
            "{comm} started holding {} fds it did not open (inherited without close-on-exec): {}",
            fds.len(),
            fds.join(", ")
        ),
        recommendation: "Open fds with O_CLOEXEC / SOCK_CLOEXEC (or set FD_CLOEXEC), or start children with close_fds=True, so a child never inherits them.",
        site: None,
        count: Some(fds.len() as u64),
        fds: Some(fds),
        first_seen_ts: ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(kind: FdKind, resource: &str) -> SiteFigures<'_> {
        SiteFigures {
            id: "0123456789ab",
            kind,
            resource,
            leak_per_s: 2.04,
            open: 47,
            oldest_age_s: 27.4,
        }
    }

    #[test]
    fn leak_of_sockets_names_the_peer() {
        let f = leak(site(FdKind::Socket, "tcp 127.0.0.1:8080"), 5.0);
        assert_eq!(f.kind, FindingKind::Leak);
        assert_eq!(
            f.message,
            "connections (tcp 127.0.0.1:8080) are opened and not closed: +2.0 fds/s, 47 open, oldest 27s"
        );
        assert!(f.recommendation.contains("pooled client"));
        assert_eq!(f.site.as_deref(), Some("0123456789ab"));
        assert_eq!(f.count, Some(47));
        assert_eq!(f.first_seen_ts, 5.0);
    }

    #[test]
    fn leak_of_files_pipes_and_databases() {
        let f = leak(site(FdKind::File, "/var/log/app.log"), 0.0);
        assert!(f.message.starts_with("files /var/log/app.log are opened"));
        assert!(f.recommendation.contains("Close each file"));
        let p = leak(site(FdKind::Pipe, "pipe"), 0.0);
        assert!(p.message.starts_with("pipes are opened"));
        assert!(p.recommendation.contains("communicate()"));
        let d = leak(site(FdKind::File, "/data/agent.db"), 0.0);
        assert!(d.recommendation.contains("database connection"));
        let e = leak(site(FdKind::Eventfd, "eventfd"), 0.0);
        assert!(e.message.starts_with("eventfd fds are opened"));
    }

    #[test]
    fn close_wait_counts_the_sockets() {
        let f = close_wait("0123456789ab", "tcp 127.0.0.1:8080", 40, 0.0);
        assert_eq!(f.kind.name(), "close_wait");
        assert_eq!(
            f.message,
            "40 sockets to tcp 127.0.0.1:8080 are in CLOSE_WAIT: the peer closed them and this process never did"
        );
        assert_eq!(f.count, Some(40));
    }

    #[test]
    fn fd_error_names_the_call_and_the_limit() {
        let f = fd_error(
            "openat",
            Some("/var/log/app.log"),
            Errno::Emfile,
            Some("log_open (log.c:12)"),
            0.0,
        );
        assert_eq!(f.kind, FindingKind::Emfile);
        assert_eq!(
            f.message,
            "openat of /var/log/app.log failed with EMFILE at log_open (log.c:12)"
        );
        assert!(f.recommendation.contains("RLIMIT_NOFILE"));
        let g = fd_error("socket", None, Errno::Enfile, None, 0.0);
        assert_eq!(
            g.message,
            "socket failed with ENFILE at an unknown call site"
        );
        assert!(g.recommendation.contains("fs.file-max"));
    }

    #[test]
    fn inherited_lists_the_fds() {
        let f =
            inherited("sh", vec!["3 (pipe)".into(), "7 (/tmp/x)".into()], 0.0).expect("a finding");
        assert_eq!(
            f.message,
            "sh started holding 2 fds it did not open (inherited without close-on-exec): 3 (pipe), 7 (/tmp/x)"
        );
        assert_eq!(f.count, Some(2));
        assert_eq!(f.fds.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn no_inherited_finding_without_fds() {
        assert_eq!(inherited("sh", Vec::new(), 0.0), None);
    }

    #[test]
    fn empty_findings_are_recognised() {
        let mut f = close_wait("x", "tcp 1.2.3.4:5", 0, 0.0);
        assert!(f.is_empty());
        f.count = Some(1);
        assert!(!f.is_empty());
        let e = fd_error("open", None, Errno::Emfile, None, 0.0);
        assert!(!e.is_empty());
    }

    #[test]
    fn kinds_serialize_as_their_names() {
        for k in [
            FindingKind::Leak,
            FindingKind::CloseWait,
            FindingKind::Emfile,
            FindingKind::Inherited,
        ] {
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::Value::from(k.name())
            );
        }
    }
}
