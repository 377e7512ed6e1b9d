//! End to end: `fdtrace --metrics` scraped every second by a real Prometheus
//! with the shipped alert rules, over a leaker and a healthy churner, each in
//! a cgroup of its own (the rules are per container).
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use fdtrace_tests::containers::HandMadeCgroup;
use fdtrace_tests::prometheus::{self, FDTRACE_JOB, FIRST_SAMPLE_TIMEOUT, Prometheus, Target};
use fdtrace_tests::{fdtrace_bin, now_ts, proc_fds, require_root};

/// The leaker's soft fd limit and step: 4 fds at once, then a second's pause.
const SOFT_LIMIT: u64 = 400;
const STEP: usize = 4;

/// Opens STEP fds a second, stopping short of the limit (the test is over
/// by then); holds them. Its name and the file it opens are text the
/// exposition must not trust: quotes, a brace, a newline, a backslash and
/// a byte that is not UTF-8 ([`HOSTILE_COMM`], [`HOSTILE_FILE`]).
const LEAKER: &str = r#"
import os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
with open("/proc/self/comm", "wb") as f:
    f.write(b'lk"} 1\n\\\xff')
path = os.path.join(os.fsencode(sys.argv[3]), b'f"} x\n\\\xff')
held = []
print("ready", flush=True)
while True:
    if len(held) + int(sys.argv[2]) < int(sys.argv[1]) - 20:
        held.extend(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600) for _ in range(int(sys.argv[2])))
    time.sleep(1)
"#;

/// The leaker's comm and file name as fdtrace has them: lossless text, a
/// backslash doubled and the byte that is not UTF-8 as `\xff`.
const HOSTILE_COMM: &str = "lk\"} 1\n\\\\\\xff";
const HOSTILE_FILE: &str = "f\"} x\n\\\\\\xff";

/// Opens and closes files all the time, never holding more than a few.
const CHURNER: &str = r#"
import os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
print("ready", flush=True)
while True:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(20)]
    for fd in fds:
        os.close(fd)
    time.sleep(0.05)
"#;

/// A child killed and reaped on drop.
struct Proc(Child);

impl Proc {
    fn python(script: &str, args: &[&str]) -> Proc {
        let mut c = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().expect("piped"))
            .read_line(&mut line)
            .expect("reading the child's ready line");
        assert_eq!(line.trim(), "ready");
        Proc(c)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects; our own unreaped child.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, sig) }, 0);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free loopback port");
    l.local_addr().expect("its address")
}

/// `GET http://addr/path`: status and body.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut resp = agent
        .get(&format!("http://{addr}{path}"))
        .call()
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// fdtrace, stopped with SIGINT on drop if the test did not stop it.
struct Fdtrace {
    child: Child,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Fdtrace {
    fn start(args: &[String]) -> Fdtrace {
        let dir = tempfile::tempdir().expect("temp dir");
        let stderr = dir.path().join("stderr");
        let child = Command::new(fdtrace_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("fdtrace starts");
        Fdtrace {
            child,
            stderr,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stop(&mut self) -> (ExitStatus, String) {
        // SAFETY: as above.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("fdtrace exits");
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        (status, out)
    }
}

impl Drop for Fdtrace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// The one sample of `expr`'s vector, if any.
fn one(prom: &Prometheus, expr: &str) -> Result<Option<f64>, String> {
    let v = prom.query(expr)?;
    match v.as_slice() {
        [] => Ok(None),
        [s] => Ok(Some(s.value)),
        more => Err(format!("{expr}: {} samples: {more:?}", more.len())),
    }
}

#[test]
fn prometheus_fires_the_forecast_for_the_leaker_only() {
    require_root();
    let t0 = Instant::now();
    let limit = SOFT_LIMIT.to_string();
    let files = tempfile::tempdir().expect("temp dir");
    let leaker = Proc::python(
        LEAKER,
        &[
            &limit,
            &STEP.to_string(),
            files.path().to_str().expect("a UTF-8 temp dir"),
        ],
    );
    let churner = Proc::python(CHURNER, &[&limit]);
    let me = std::process::id();
    let leak_cg = HandMadeCgroup::new(&format!("/fdtrace-metrics-{me}/leaker")).unwrap();
    let churn_cg = HandMadeCgroup::new(&format!("/fdtrace-metrics-{me}/churner")).unwrap();
    leak_cg.add(leaker.pid()).unwrap();
    churn_cg.add(churner.pid()).unwrap();

    let addr = free_addr();
    let mut fdtrace = Fdtrace::start(&[
        "--pid".into(),
        leaker.pid().to_string(),
        "--pid".into(),
        churner.pid().to_string(),
        "--metrics".into(),
        addr.to_string(),
        "--quiet".into(),
    ]);
    // /healthz answers once it serves; 200 while reports run.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match get(addr, "/healthz") {
            Ok((200, _)) => break,
            other if Instant::now() > deadline => panic!(
                "fdtrace's /healthz: {other:?}; its stderr:\n{}",
                fdtrace.stderr()
            ),
            _ => thread::sleep(Duration::from_millis(100)),
        }
    }
    let prom = Prometheus::start(FDTRACE_JOB, Target::Addr(addr));

    // What fdtrace serves parses as strict OpenMetrics, and names both.
    let (status, text) = get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    prometheus::check_openmetrics(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    let lp = leaker.pid().to_string();
    let leaker_fds = format!(r#"fdtrace_process_open_fds{{pid="{lp}"}}"#);
    prom.wait_for("the leaker's first sample", FIRST_SAMPLE_TIMEOUT, |p| {
        one(p, &leaker_fds)
    });

    // Exact: stopped, the leaker's count is the same in /proc and at each
    // report; the sample must come from a report made after the stop.
    leaker.signal(libc::SIGSTOP);
    let stopped = now_ts();
    let after_stop = format!(
        "{leaker_fds} and on() (fdtrace_last_report_timestamp_seconds > {})",
        stopped + 1.0
    );
    let reported = prom.wait_for("a report after the stop", Duration::from_secs(10), |p| {
        one(p, &after_stop)
    });
    let in_proc = proc_fds(leaker.pid() as i32).unwrap().len() as f64;
    assert_eq!(
        reported, in_proc,
        "the leaker's fdtrace_process_open_fds against /proc/{lp}/fd"
    );
    leaker.signal(libc::SIGCONT);

    // Its hostile name and file name arrive intact as label values, the
    // file as the resource of its leaking site.
    let series = prom.query(&leaker_fds).unwrap();
    assert_eq!(
        series
            .first()
            .and_then(|s| s.labels.get("comm"))
            .map(String::as_str),
        Some(HOSTILE_COMM),
        "{series:?}"
    );
    let site = format!(r#"fdtrace_site_open_fds{{pid="{lp}"}}"#);
    let sites = prom.wait_for("the leaker's site", Duration::from_secs(20), |p| {
        let v = p.query(&site)?;
        Ok((!v.is_empty()).then_some(v))
    });
    assert!(
        sites.iter().any(|s| s
            .labels
            .get("resource")
            .is_some_and(|r| r.ends_with(HOSTILE_FILE))
            && s.labels.get("kind").map(String::as_str) == Some("file")),
        "{sites:?}"
    );

    // The critical forecast fires for the leaker's container, never for the
    // churner's.
    let firing = prom.wait_for(
        "FdExhaustionForecast critical firing for the leaker",
        Duration::from_secs(100),
        |p| {
            let alerts = p.alerts()?;
            let forecast = |a: &&prometheus::Alert| {
                a.labels.get("alertname").map(String::as_str) == Some("FdExhaustionForecast")
            };
            // Firing, never; pending is allowed while the churner's rate
            // rests on a few reports (see the check at the end).
            if let Some(a) = alerts
                .iter()
                .filter(forecast)
                .find(|a| a.labels.get("cgroup") == Some(&churn_cg.path) && a.state == "firing")
            {
                panic!("the forecast fired for the churner: {a:?}");
            }
            Ok(alerts
                .iter()
                .filter(forecast)
                .find(|a| {
                    a.labels.get("cgroup") == Some(&leak_cg.path)
                        && a.labels.get("severity").map(String::as_str) == Some("critical")
                        && a.state == "firing"
                })
                .cloned())
        },
    );
    assert!(firing.value < 300.0, "{firing:?}");
    // A minute of reports in: no forecast for the churner at all.
    let alerts = prom.alerts().unwrap();
    assert!(
        !alerts
            .iter()
            .any(|a| a.labels.get("cgroup") == Some(&churn_cg.path)
                && a.labels.get("alertname").map(String::as_str) == Some("FdExhaustionForecast")),
        "{alerts:?}"
    );
    // The churner is scraped too, with a status of ok.
    let cp = churner.pid().to_string();
    let churner_ok = format!(r#"fdtrace_process_status{{pid="{cp}",status="ok"}}"#);
    assert_eq!(one(&prom, &churner_ok).unwrap(), Some(1.0));

    // The leaker exits: its process and container series go.
    let leaker_pid = leaker.pid();
    drop(leaker);
    let leak_container = format!(r#"fdtrace_container_open_fds{{cgroup="{}"}}"#, leak_cg.path);
    prom.wait_for("the leaker's series to go", Duration::from_secs(15), |p| {
        let gone = p.query(&leaker_fds)?.is_empty() && p.query(&leak_container)?.is_empty();
        Ok(gone.then_some(()))
    });
    assert!(
        !get(addr, "/metrics")
            .unwrap()
            .1
            .contains(&format!("pid=\"{leaker_pid}\""))
    );

    // No scrape failed, and the last exposition is strict OpenMetrics too.
    for t in prom.targets().unwrap() {
        assert_eq!(
            (t.health.as_str(), t.last_error.as_str()),
            ("up", ""),
            "{t:?}"
        );
    }
    let failed = one(&prom, r#"sum(up{job="fdtrace"} == 0) or vector(0)"#).unwrap();
    assert_eq!(failed, Some(0.0));
    let (_, text) = get(addr, "/metrics").unwrap();
    prometheus::check_openmetrics(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

    // --quiet: nothing on stdout.
    let (status, stdout) = fdtrace.stop();
    assert!(status.success(), "{status}; stderr:\n{}", fdtrace.stderr());
    assert_eq!(stdout, "", "--quiet printed");
    drop(churner);
    eprintln!("metrics end to end: {:?}", t0.elapsed());
}

/// `--metrics` on an address in use: exit 1 naming it, before tracing.
#[test]
fn metrics_address_in_use_exits_1_naming_it() {
    require_root();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Command::new(fdtrace_bin())
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--metrics",
            &addr.to_string(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--metrics {addr}")) && stderr.contains("in use"),
        "{stderr}"
    );
}

/// Polls `GET addr/metrics` until `found` holds on its body.
fn wait_for_metrics(fdtrace: &Fdtrace, addr: SocketAddr, what: &str, found: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = get(addr, "/metrics");
        if let Ok((200, body)) = &last
            && found(body)
        {
            prometheus::check_openmetrics(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not in {addr}/metrics: {last:?}; fdtrace's stderr:\n{}",
                fdtrace.stderr()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Opens fds under a soft limit of 16 until one call fails with EMFILE,
/// then sleeps.
const EMFILE_ONCE: &str = r#"
import os, resource, time
resource.setrlimit(resource.RLIMIT_NOFILE, (16, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
while True:
    time.sleep(1)
"#;

/// A free port on `ip`, with nothing on it on 127.0.0.1 either.
fn free_port_on(ip: std::net::IpAddr) -> u16 {
    loop {
        let port = TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
}

/// `--metrics` with `run` (on `[::1]`) and with `--all` (on 127.0.0.2):
/// each serves its processes, on exactly the address given and not on
/// 127.0.0.1 at the same port.
#[test]
fn metrics_under_run_and_all_on_exactly_the_address_given() {
    require_root();
    let v6 = std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
    let addr = SocketAddr::new(v6, free_port_on(v6));
    let mut fdtrace = Fdtrace::start(&[
        "--quiet".into(),
        "--metrics".into(),
        addr.to_string(),
        "run".into(),
        "--".into(),
        "python3".into(),
        "-c".into(),
        EMFILE_ONCE.into(),
    ]);
    wait_for_metrics(&fdtrace, addr, "run's python3 and its one EMFILE", |t| {
        t.lines()
            .any(|l| l.starts_with("fdtrace_process_open_fds{") && l.contains(r#"comm="python3""#))
            && t.lines().any(|l| {
                l.starts_with("fdtrace_container_emfile_errors_total{") && l.ends_with("} 1")
            })
    });
    // --quiet: the failed call is on stderr all the same.
    let stderr = fdtrace.stderr();
    assert_eq!(stderr.matches("failed with EMFILE").count(), 1, "{stderr}");
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()));
    assert!(get(v4, "/metrics").is_err(), "also served on {v4}");
    // The command shares fdtrace's stdout: it ends first, with SIGTERM,
    // and fdtrace with it, with its status (128 + 15).
    let (_, body) = get(addr, "/metrics").unwrap();
    let pid: i32 = body
        .lines()
        .find(|l| l.starts_with("fdtrace_process_open_fds{") && l.contains(r#"comm="python3""#))
        .and_then(|l| l.split('"').nth(1)?.parse().ok())
        .expect("the command's pid label");
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = fdtrace.child.wait().expect("fdtrace exits");
    assert_eq!(status.code(), Some(143), "stderr:\n{}", fdtrace.stderr());
    let mut stdout = String::new();
    fdtrace
        .child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .unwrap();
    assert_eq!(stdout, "", "--quiet printed");

    let other = std::net::IpAddr::from(Ipv4Addr::new(127, 0, 0, 2));
    let addr = SocketAddr::new(other, free_port_on(other));
    let mut fdtrace = Fdtrace::start(&[
        "--all".into(),
        "--quiet".into(),
        "--metrics".into(),
        addr.to_string(),
    ]);
    // Our own cgroup is one of the groups (--all traces this test too).
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let cgroup = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned();
    wait_for_metrics(&fdtrace, addr, "--all's processes", |t| {
        let traced = t
            .lines()
            .find_map(|l| l.strip_prefix("fdtrace_traced_processes "))
            .and_then(|v| v.parse::<u64>().ok());
        traced.is_some_and(|n| n > 5)
            && t.lines().any(|l| {
                l.starts_with("fdtrace_container_processes{")
                    && l.contains(&format!(r#"cgroup="{cgroup}""#))
            })
    });
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()));
    assert!(get(v4, "/metrics").is_err(), "also served on {v4}");
    let (status, stdout) = fdtrace.stop();
    assert!(status.success(), "{status}; stderr:\n{}", fdtrace.stderr());
    assert_eq!(stdout, "");
}
