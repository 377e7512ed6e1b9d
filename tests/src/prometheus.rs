//! A real Prometheus, and a strict OpenMetrics parser, for the end-to-end
//! tests of fdtrace's metrics.
//!
//! [`Prometheus::start`] runs Debian's `prometheus` (which `cargo xtask test`
//! installs) with a generated config: one scrape job over one loopback target
//! every second, rule evaluation every second, the shipped rule file
//! ([`RULE_FILE`]) loaded, storage in a temp dir, and its web API on a free
//! loopback port. Its HTTP API is read with [`Prometheus::query`] (instant
//! queries), [`Prometheus::alerts`] and [`Prometheus::targets`] (scrape
//! health and errors). Dropping it stops the process and removes its storage.
//!
//! [`check_openmetrics`] parses an exposition with PyPI's `prometheus_client`
//! OpenMetrics parser (Debian's `promtool check metrics` only reads the older
//! text format), from a venv the harness creates once under `target/`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The shipped alert rules, relative to the workspace root.
pub const RULE_FILE: &str = "deploy/prometheus/fdtrace-rules.yaml";
/// The job name the rules expect for fdtrace's targets (FdtraceDown reads
/// `up{job="fdtrace"}`): pass it to [`Prometheus::start`] for fdtrace.
pub const FDTRACE_JOB: &str = "fdtrace";
/// How long Prometheus may take to answer `/-/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long until the first scrape's samples can be queried: Prometheus
/// applies its scrape targets about 5 s after start (its discovery manager
/// batches updates every 5 s), then scrapes every second.
pub const FIRST_SAMPLE_TIMEOUT: Duration = Duration::from_secs(20);
/// The scrape and rule evaluation interval of the generated config.
pub const INTERVAL: &str = "1s";
/// How long a stopped Prometheus may take to exit on SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// One HTTP request to the API.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries to start Prometheus: the free port is found by binding port 0 and
/// closing it, so another process may take it before Prometheus binds it.
const START_TRIES: usize = 3;

/// `prometheus_client`, pinned: its parser decides what "strict" means here.
pub const PROMETHEUS_CLIENT: &str = "prometheus_client==0.26.0";

/// What the scrape job scrapes.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// Prometheus's own `/metrics`.
    Itself,
    /// An exporter on this address (loopback).
    Addr(SocketAddr),
}

/// One sample of an instant query's vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One alert of `/api/v1/alerts`.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `pending` or `firing`.
    pub state: String,
    pub value: f64,
}

/// One active target of `/api/v1/targets`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScrapeTarget {
    pub labels: BTreeMap<String, String>,
    pub scrape_url: String,
    /// `up`, `down` or `unknown` (not scraped yet).
    pub health: String,
    /// The last scrape's error, empty when it succeeded.
    pub last_error: String,
}

/// A running `prometheus`, stopped when dropped.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    agent: ureq::Agent,
    log: PathBuf,
    /// Config, storage and log; removed when dropped, after Drop has
    /// stopped the process.
    _dir: tempfile::TempDir,
}

/// `<workspace>/`.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

/// prometheus.yml for one job scraping `target` every [`INTERVAL`], with
/// `rule_file` loaded and evaluated every [`INTERVAL`]. Strings are written
/// JSON-quoted, which YAML reads as the same strings.
pub fn config_yaml(job: &str, target: &str, rule_file: &Path) -> String {
    let q = |s: &str| Value::from(s).to_string();
    format!(
        "global:\n  scrape_interval: {INTERVAL}\n  scrape_timeout: {INTERVAL}\n  \
         evaluation_interval: {INTERVAL}\nrule_files:\n  - {rules}\nscrape_configs:\n  \
         - job_name: {job}\n    static_configs:\n      - targets: [{target}]\n",
        rules = q(&rule_file.to_string_lossy()),
        job = q(job),
        target = q(target),
    )
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind a loopback port");
    listener
        .local_addr()
        .expect("a bound socket has an address")
        .port()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into()
}

impl Prometheus {
    /// Starts Prometheus with a scrape job `job` over `target` and the shipped
    /// rule file, and waits until it is ready. Panics, with its log, when it
    /// cannot start.
    pub fn start(job: &str, target: Target) -> Self {
        let mut last_log = String::new();
        for _ in 0..START_TRIES {
            match Self::try_start(job, target) {
                Ok(prom) => return prom,
                // Lost the race for the port: try another.
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!("{log}"),
            }
        }
        panic!("prometheus found no free loopback port in {START_TRIES} tries: {last_log}");
    }

    fn try_start(job: &str, target: Target) -> Result<Self, String> {
        let bin = which_prometheus()?;
        let dir = tempfile::Builder::new()
            .prefix("fdtrace-prometheus-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir for prometheus: {e}"))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let target = match target {
            Target::Itself => addr,
            Target::Addr(a) => a,
        };
        let rule_file = workspace().join(RULE_FILE);
        let config = dir.path().join("prometheus.yml");
        fs::write(&config, config_yaml(job, &target.to_string(), &rule_file))
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let log = dir.path().join("prometheus.log");
        let out =
            File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log.display()))?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut prom = Self {
            child,
            addr,
            agent: agent(),
            log,
            _dir: dir,
        };
        prom.wait_ready()?;
        Ok(prom)
    }

    /// Waits for `/-/ready`; Err(what went wrong, with the log) if Prometheus
    /// exits or is not ready in time.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("{}/-/ready", self.url());
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "prometheus exited ({status}) before it was ready; its log:\n{}",
                    self.log()
                ));
            }
            if let Ok(resp) = self.agent.get(&url).call()
                && resp.status() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "prometheus was not ready at {url} after {READY_TIMEOUT:?}; its log:\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where its web API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The rule file it loaded, as named in its config (and in the
    /// `rule_group` label of its rule metrics: `<file>;<group>`).
    pub fn rule_file(&self) -> PathBuf {
        workspace().join(RULE_FILE)
    }

    /// The last 4000 bytes of its log (stdout and stderr).
    pub fn log(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// GET `path` with `params`: the body, or an error naming the request.
    pub fn get(&self, path: &str, params: &[(&str, &str)]) -> Result<String, String> {
        let url = format!("{}{path}", self.url());
        let mut req = self.agent.get(&url);
        for (k, v) in params {
            req = req.query(*k, *v);
        }
        let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
        if status != 200 {
            return Err(format!("GET {url} {params:?}: HTTP {status}: {body}"));
        }
        Ok(body)
    }

    /// GET an API endpoint: its `data`, or the API's error.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let body = self.get(path, params)?;
        api_data(&body).map_err(|e| format!("{path} {params:?}: {e}"))
    }

    /// An instant query's vector at the current time.
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)])?;
        parse_vector(&data).map_err(|e| format!("query {expr:?}: {e}"))
    }

    /// The alerts that are pending or firing.
    pub fn alerts(&self) -> Result<Vec<Alert>, String> {
        let data = self.api("/api/v1/alerts", &[])?;
        parse_alerts(&data)
    }

    /// The active scrape targets with their health and last error.
    pub fn targets(&self) -> Result<Vec<ScrapeTarget>, String> {
        let data = self.api("/api/v1/targets", &[("state", "active")])?;
        parse_targets(&data)
    }

    /// Calls `check` every 200 ms until it returns Some, and returns that.
    /// Panics after `timeout` with `what`, the last error and the log.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Result<Option<T>, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check(self) {
                Ok(Some(v)) => return v,
                Ok(None) => "not yet".to_owned(),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                panic!(
                    "prometheus at {}: {what} did not happen within {timeout:?} (last: {last}); \
                     its log:\n{}",
                    self.addr,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SIGTERM first: it then closes its storage cleanly and exits in
        // well under a second.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory effects; the pid is our own child,
            // not yet reaped, so it cannot name another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `prometheus` on PATH, or an error saying how to get it.
fn which_prometheus() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "prometheus is not installed (not on PATH): run `cargo xtask test`, which installs \
             Debian's prometheus package, or `apt-get install --no-install-recommends prometheus`"
                .to_owned()
        })
}

/// The `data` of an API answer `{"status":"success","data":...}`, or its
/// `error`.
pub fn api_data(body: &str) -> Result<Value, String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("not JSON ({e}): {body:.200}"))?;
    match v.get("status").and_then(Value::as_str) {
        Some("success") => v
            .get("data")
            .cloned()
            .ok_or_else(|| format!("success without data: {body:.200}")),
        _ => Err(format!(
            "API error {}: {}",
            v.get("errorType").and_then(Value::as_str).unwrap_or("?"),
            v.get("error").and_then(Value::as_str).unwrap_or(body)
        )),
    }
}

/// A JSON object of strings (labels, annotations).
fn string_map(v: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let obj = v
        .and_then(Value::as_object)
        .ok_or_else(|| format!("expected an object of strings, got {v:?}"))?;
    obj.iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|s| (k.clone(), s.to_owned()))
                .ok_or_else(|| format!("label {k} is not a string: {v}"))
        })
        .collect()
}

/// A sample value as the API writes it: a string, "NaN", "+Inf", "-Inf" included.
fn parse_value(v: Option<&Value>) -> Result<f64, String> {
    let s = v
        .and_then(Value::as_str)
        .ok_or_else(|| format!("expected a string value, got {v:?}"))?;
    s.parse::<f64>()
        .map_err(|e| format!("value {s:?} is not a number: {e}"))
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value, String> {
    v.get(key).ok_or_else(|| format!("no {key:?} in {v}"))
}

fn str_field(v: &Value, key: &str) -> Result<String, String> {
    field(v, key)?
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{key:?} is not a string in {v}"))
}

fn array<'a>(v: &'a Value, key: &str) -> Result<&'a Vec<Value>, String> {
    field(v, key)?
        .as_array()
        .ok_or_else(|| format!("{key:?} is not an array in {v}"))
}

/// The samples of a `/api/v1/query` data of type vector.
pub fn parse_vector(data: &Value) -> Result<Vec<Sample>, String> {
    let kind = str_field(data, "resultType")?;
    if kind != "vector" {
        return Err(format!("result type {kind}, not vector"));
    }
    array(data, "result")?
        .iter()
        .map(|s| {
            let point = field(s, "value")?
                .as_array()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("value is not [ts, \"v\"] in {s}"))?;
            Ok(Sample {
                labels: string_map(s.get("metric"))?,
                value: parse_value(point.get(1))?,
            })
        })
        .collect()
}

/// The alerts of a `/api/v1/alerts` data.
pub fn parse_alerts(data: &Value) -> Result<Vec<Alert>, String> {
    array(data, "alerts")?
        .iter()
        .map(|a| {
            Ok(Alert {
                labels: string_map(a.get("labels"))?,
                annotations: string_map(a.get("annotations"))?,
                state: str_field(a, "state")?,
                value: parse_value(a.get("value"))?,
            })
        })
        .collect()
}

/// The active targets of a `/api/v1/targets` data.
pub fn parse_targets(data: &Value) -> Result<Vec<ScrapeTarget>, String> {
    array(data, "activeTargets")?
        .iter()
        .map(|t| {
            Ok(ScrapeTarget {
                labels: string_map(t.get("labels"))?,
                scrape_url: str_field(t, "scrapeUrl")?,
                health: str_field(t, "health")?,
                last_error: str_field(t, "lastError")?,
            })
        })
        .collect()
}

// ---- strict OpenMetrics parse ----------------------------------------------

/// The venv with [`PROMETHEUS_CLIENT`]: `<workspace>/target/openmetrics-venv`.
fn venv_dir() -> PathBuf {
    workspace().join("target").join("openmetrics-venv")
}

/// Written into the venv once its install has finished.
const VENV_DONE: &str = ".fdtrace-installed";

/// The venv's python, creating the venv first if needed (once per process;
/// an interrupted or outdated one is made again).
fn venv_python() -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON.get_or_init(make_venv).clone()
}

fn make_venv() -> Result<PathBuf, String> {
    let dir = venv_dir();
    let python = |d: &Path| d.join("bin").join("python");
    if fs::read_to_string(dir.join(VENV_DONE)).is_ok_and(|s| s.trim() == PROMETHEUS_CLIENT) {
        return Ok(python(&dir));
    }
    // Built beside it and renamed into place, so a concurrent test binary
    // or an interrupted run never sees a half-made venv. A venv run through
    // its bin/python finds its packages relative to that path, so the move
    // does not break it.
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    run_quiet(Command::new("python3").args(["-m", "venv"]).arg(&tmp)).map_err(|e| {
        format!(
            "cannot create a venv for prometheus_client: {e} (python3 with its venv module is \
             needed; on Debian: apt-get install python3-venv)"
        )
    })?;
    run_quiet(
        Command::new(python(&tmp))
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .arg(PROMETHEUS_CLIENT),
    )
    .map_err(|e| format!("cannot install {PROMETHEUS_CLIENT} from PyPI: {e}"))?;
    fs::write(tmp.join(VENV_DONE), PROMETHEUS_CLIENT)
        .map_err(|e| format!("cannot write into {}: {e}", tmp.display()))?;
    let _ = fs::remove_dir_all(&dir);
    if let Err(e) = fs::rename(&tmp, &dir) {
        let _ = fs::remove_dir_all(&tmp);
        // Another process may have put its own in place meanwhile.
        if !dir.join(VENV_DONE).is_file() {
            return Err(format!("cannot move the venv to {}: {e}", dir.display()));
        }
    }
    Ok(python(&dir))
}

/// Runs `cmd`; Err(its stderr) unless it exits 0.
fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{:?} failed ({}): {}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Parses `exposition` with prometheus_client's strict OpenMetrics parser
/// (tests/openmetrics_check.py): Ok("N families, M samples"), or Err(the
/// parser's message).
pub fn check_openmetrics(exposition: &str) -> Result<String, String> {
    let python = venv_python()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("openmetrics_check.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", python.display()))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let text = exposition.to_owned();
    // Written from a thread: a large exposition would fill the pipe while
    // the script's output is not read yet.
    let writer = thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", script.display()))?;
    let written = writer.join().expect("the writer thread does not panic");
    if out.status.success() {
        // It read all of stdin before it parsed, so a write error is ours.
        written.map_err(|e| format!("writing the exposition to {}: {e}", script.display()))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{} ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The number of alerting rules in a rule file: its `- alert:` lines.
pub fn count_alert_rules(rule_file: &str) -> usize {
    rule_file
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_quotes_every_string() {
        let yaml = config_yaml("fd\"trace", "127.0.0.1:9464", Path::new("/r/rules.yaml"));
        assert!(yaml.contains("  - \"/r/rules.yaml\"\n"), "{yaml}");
        assert!(yaml.contains("- job_name: \"fd\\\"trace\"\n"), "{yaml}");
        assert!(yaml.contains("- targets: [\"127.0.0.1:9464\"]\n"), "{yaml}");
        assert!(
            yaml.contains(
                "  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            ),
            "{yaml}"
        );
    }

    #[test]
    fn parses_api_answers() {
        let data = api_data(
            r#"{"status":"success","data":{"resultType":"vector","result":[
                {"metric":{"__name__":"up","job":"j"},"value":[1.5,"1"]},
                {"metric":{},"value":[1.5,"+Inf"]}]}}"#,
        )
        .expect("a success answer");
        let v = parse_vector(&data).expect("a vector");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].labels["job"], "j");
        assert_eq!(v[0].value, 1.0);
        assert_eq!(v[1].value, f64::INFINITY);
        let err = api_data(r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#)
            .expect_err("an error answer");
        assert!(
            err.contains("bad_data") && err.contains("parse error"),
            "{err}"
        );
        assert!(api_data("<html>").is_err());
        let scalar =
            api_data(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#)
                .expect("a success answer");
        assert!(parse_vector(&scalar).is_err());
    }

    #[test]
    fn rules_name_the_fdtrace_job() {
        let file = fs::read_to_string(workspace().join(RULE_FILE)).expect("the rule file");
        let up = format!("up{{job=\"{FDTRACE_JOB}\"}}");
        assert!(file.contains(&up), "{RULE_FILE} has no {up}");
    }

    #[test]
    fn counts_alert_rules() {
        let rules = "groups:\n  - name: a\n    rules:\n      - alert: A\n        expr: up\n      \
                     - record: r\n        expr: up\n      - alert: B\n        expr: up\n";
        assert_eq!(count_alert_rules(rules), 2);
    }

    /// The harness against a real exporter: Prometheus scraping itself with
    /// the shipped rules loaded.
    #[test]
    fn prometheus_scrapes_itself_with_the_shipped_rules() {
        let prom = Prometheus::start("prometheus", Target::Itself);
        let me = prom.addr().to_string();
        // The first sample takes ~5 s (see FIRST_SAMPLE_TIMEOUT).
        let up = prom.wait_for("up == 1", FIRST_SAMPLE_TIMEOUT, |p| {
            Ok(p.query("up")?.into_iter().find(|s| s.value == 1.0))
        });
        assert_eq!(up.labels.get("instance"), Some(&me), "{up:?}");
        assert_eq!(up.labels.get("job").map(String::as_str), Some("prometheus"));

        // A value it exported: the ready checks the harness made are
        // counted by its own HTTP metrics.
        let ready = prom
            .query(r#"prometheus_http_requests_total{handler="/-/ready", code="200"}"#)
            .expect("query");
        assert_eq!(ready.len(), 1, "{ready:?}");
        assert!(ready[0].value >= 1.0, "{ready:?}");

        // Every alerting rule of the shipped file is loaded.
        let file = fs::read_to_string(prom.rule_file()).expect("the rule file");
        let want = count_alert_rules(&file);
        assert!(want >= 7, "the rule file has {want} alerts");
        let loaded = prom
            .query("sum(prometheus_rule_group_rules)")
            .expect("query");
        assert_eq!(loaded.len(), 1, "{loaded:?}");
        assert_eq!(
            loaded[0].value,
            want as f64,
            "rules loaded from {}",
            prom.rule_file().display()
        );

        // The target page: scraped with no error.
        let targets = prom.targets().expect("targets");
        assert_eq!(targets.len(), 1, "{targets:?}");
        assert_eq!(targets[0].scrape_url, format!("http://{me}/metrics"));
        assert_eq!(targets[0].health, "up", "{targets:?}");
        assert_eq!(targets[0].last_error, "", "{targets:?}");

        // The rules are evaluated: no job "fdtrace" here, so "no fdtrace is
        // up" is pending (it fires after 5m).
        let absent = prom.wait_for(
            "FdtraceDown{reason=absent} pending",
            FIRST_SAMPLE_TIMEOUT,
            |p| {
                Ok(p.alerts()?.into_iter().find(|a| {
                    a.labels.get("alertname").map(String::as_str) == Some("FdtraceDown")
                        && a.labels.get("reason").map(String::as_str) == Some("absent")
                }))
            },
        );
        assert_eq!(absent.state, "pending", "{absent:?}");
        assert_eq!(
            absent.labels.get("severity").map(String::as_str),
            Some("critical")
        );
        assert_eq!(
            absent.annotations.get("summary").map(String::as_str),
            Some("No fdtrace is up")
        );

        let pid = prom.pid();
        drop(prom);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "prometheus (pid {pid}) still runs after the harness was dropped"
        );
    }

    /// PyPI's prometheus_client serving its default registry (and one gauge
    /// at 42) on a free loopback port, from the venv; killed when dropped.
    struct PythonExporter {
        child: Child,
        addr: SocketAddr,
    }

    impl PythonExporter {
        fn start() -> Self {
            use std::io::{BufRead as _, BufReader};
            let python = venv_python().expect("the prometheus_client venv");
            let mut child = Command::new(python)
                .arg("-c")
                .arg(
                    "import time\n\
                     from prometheus_client import Gauge, start_http_server\n\
                     Gauge('harness_answer', 'A value the test reads back').set(42)\n\
                     server, _ = start_http_server(0, addr='127.0.0.1')\n\
                     print(server.server_port, flush=True)\n\
                     time.sleep(600)\n",
                )
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start the python exporter");
            let mut line = String::new();
            let stdout = child.stdout.take().expect("stdout is piped");
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read the exporter's port");
            let port: u16 = match line.trim().parse() {
                Ok(p) => p,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the python exporter printed {line:?}, not its port: {e}");
                }
            };
            Self {
                child,
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            }
        }
    }

    impl Drop for PythonExporter {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// An OpenMetrics exporter: its exposition passes the strict parser,
    /// which rejects it without its closing `# EOF` or with a broken label;
    /// and Prometheus scrapes it with no error and reads its value back.
    #[test]
    fn openmetrics_exporter_is_parsed_strictly_and_scraped() {
        let exporter = PythonExporter::start();
        let url = format!("http://{}/metrics", exporter.addr);
        let mut resp = agent()
            .get(&url)
            .header("Accept", "application/openmetrics-text; version=1.0.0")
            .call()
            .expect("GET /metrics");
        let kind = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(
            kind.starts_with("application/openmetrics-text"),
            "content type {kind:?}"
        );
        let text = resp.body_mut().read_to_string().expect("the body");
        assert!(text.contains("\nharness_answer 42.0\n"), "{text}");
        let ok = check_openmetrics(&text).expect("the exposition parses");
        assert!(ok.ends_with(" samples"), "{ok}");

        let no_eof = text
            .trim_end()
            .strip_suffix("# EOF")
            .expect("it ends with # EOF");
        let err = check_openmetrics(no_eof).expect_err("no # EOF");
        assert!(err.contains("EOF"), "{err}");
        let broken = text.replace("harness_answer 42.0", "harness_answer{a=\"1} 42.0");
        let err = check_openmetrics(&broken).expect_err("an unclosed label value");
        assert!(err.contains("not valid OpenMetrics"), "{err}");

        let prom = Prometheus::start("exporter", Target::Addr(exporter.addr));
        let answer = prom.wait_for("harness_answer scraped", FIRST_SAMPLE_TIMEOUT, |p| {
            Ok(p.query("harness_answer")?.into_iter().next())
        });
        assert_eq!(answer.value, 42.0, "{answer:?}");
        assert_eq!(
            answer.labels.get("instance"),
            Some(&exporter.addr.to_string())
        );
        let targets = prom.targets().expect("targets");
        assert_eq!(targets.len(), 1, "{targets:?}");
        assert_eq!(targets[0].scrape_url, url);
        assert_eq!(targets[0].health, "up", "{targets:?}");
        assert_eq!(targets[0].last_error, "", "{targets:?}");
    }
}
