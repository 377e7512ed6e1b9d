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
/// by then); holds them.
const LEAKER: &str = r#"
import os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
held = []
print("ready", flush=True)
while True:
    if len(held) + int(sys.argv[2]) < int(sys.argv[1]) - 20:
        held.extend(os.open("/dev/null", os.O_RDONLY) for _ in range(int(sys.argv[2])))
    time.sleep(1)
"#;

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
    let leaker = Proc::python(LEAKER, &[&limit, &STEP.to_string()]);
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
