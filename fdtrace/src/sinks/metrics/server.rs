//! The HTTP side: `/metrics` and `/healthz` served by axum on a thread of
//! their own (a current-thread runtime there): a report over a node's
//! processes holds the session's thread for tens of milliseconds, and a
//! scrape that came then would wait for it.
use std::{io, net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

use super::{SharedState, model::healthy};

/// The OpenMetrics text format's content type
/// (<https://github.com/prometheus/OpenMetrics/blob/v1.0.0/specification/OpenMetrics.md#overall-structure>).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct App {
    shared: SharedState,
    interval: Duration,
}

/// Binds `addr` now (so that an address in use ends fdtrace before it
/// traces anything) and serves it from a thread of its own.
pub fn spawn(addr: SocketAddr, interval: Duration, shared: SharedState) -> io::Result<()> {
    let std = std::net::TcpListener::bind(addr).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("--metrics {addr}: cannot listen there: {e}"),
        )
    })?;
    std.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(App { shared, interval });
    std::thread::Builder::new()
        .name("fdtrace-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(std) {
                    Ok(listener) => axum::serve(listener, app).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    eprintln!("fdtrace: --metrics {addr} stopped serving: {e}");
                }
            });
        })?;
    Ok(())
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let text = app
        .shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .exposition
        .clone();
    // Shared with the next scrapes until the next report: not copied.
    ([(header::CONTENT_TYPE, OPENMETRICS)], text)
}

async fn healthz(State(app): State<App>) -> impl IntoResponse {
    let last = app.shared.lock().unwrap_or_else(|e| e.into_inner()).last;
    if healthy(last, std::time::Instant::now(), app.interval) {
        (StatusCode::OK, "ok\n")
    } else if last.is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "not tracing yet\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no report for three intervals\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, TcpListener},
        sync::{Arc, Mutex},
        time::Instant,
    };

    use super::*;
    use crate::sinks::metrics::Shared;

    /// `GET path` over HTTP/1.0: the status line, the headers and the
    /// body; an error after 5 s without an answer.
    fn get_blocking(addr: SocketAddr, path: &str) -> io::Result<(String, String)> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        Ok((head.to_string(), body.to_string()))
    }

    /// [`get_blocking`] from a blocking thread of the test's runtime.
    async fn get(addr: SocketAddr, path: &str) -> io::Result<(String, String)> {
        let path = path.to_string();
        tokio::task::spawn_blocking(move || get_blocking(addr, &path))
            .await
            .expect("the GET thread")
    }

    /// A report holds the session's thread (here: a sleep outside any
    /// runtime) for as long as it takes; a scrape meanwhile is answered at
    /// once, from the last rendering.
    #[test]
    fn a_scrape_does_not_wait_for_a_report() {
        let shared = Arc::new(Mutex::new(Shared {
            exposition: "x 1\n# EOF\n".into(),
            last: Some(Instant::now()),
        }));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)));
        let rt = runtime();
        let _in_runtime = rt.enter();
        spawn(addr, Duration::from_secs(1), shared).unwrap();
        let scrape = std::thread::spawn(move || {
            let t = Instant::now();
            get_blocking(addr, "/metrics").map(|(_, body)| (body, t.elapsed()))
        });
        std::thread::sleep(Duration::from_millis(1500));
        let (body, took) = scrape.join().unwrap().expect("answered");
        assert_eq!(body, "x 1\n# EOF\n");
        assert!(
            took < Duration::from_millis(500),
            "answered after {took:?}, while the session's thread was busy"
        );
    }

    fn free_port(ip: Ipv4Addr) -> u16 {
        TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn healthz_turns_503_after_three_intervals_without_a_report() {
        let interval = Duration::from_millis(100);
        let shared = Arc::new(Mutex::new(Shared {
            exposition: "x 1\n# EOF\n".into(),
            last: Some(Instant::now()),
        }));
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)));
        runtime().block_on(async {
            spawn(addr, interval, shared.clone()).unwrap();
            let (status, body) = get(addr, "/healthz").await.unwrap();
            assert!(status.contains(" 200 "), "{status}");
            assert_eq!(body, "ok\n");
            // Two intervals late: still healthy; past three: 503, while
            // /metrics still serves the last rendering.
            tokio::time::sleep(interval * 2).await;
            assert!(get(addr, "/healthz").await.unwrap().0.contains(" 200 "));
            tokio::time::sleep(interval * 2).await;
            let (status, body) = get(addr, "/healthz").await.unwrap();
            assert!(status.contains(" 503 "), "{status}");
            assert_eq!(body, "no report for three intervals\n");
            let (head, body) = get(addr, "/metrics").await.unwrap();
            assert!(head.contains(" 200 "), "{head}");
            assert!(
                head.to_ascii_lowercase().contains(
                    "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
                ),
                "{head}"
            );
            assert_eq!(body, "x 1\n# EOF\n");
            // A report: healthy again.
            shared.lock().unwrap().last = Some(Instant::now());
            assert!(get(addr, "/healthz").await.unwrap().0.contains(" 200 "));
            assert!(get(addr, "/nope").await.unwrap().0.contains(" 404 "));
        });
    }

    #[test]
    fn binds_exactly_the_address_given() {
        let other = Ipv4Addr::new(127, 0, 0, 2);
        let port = free_port(other);
        let shared = Arc::new(Mutex::new(Shared {
            exposition: "# EOF\n".into(),
            last: Some(Instant::now()),
        }));
        runtime().block_on(async {
            spawn((other, port).into(), Duration::from_secs(1), shared.clone()).unwrap();
            assert!(get((other, port).into(), "/healthz").await.is_ok());
            // Not 127.0.0.1, not the wildcard.
            let refused = get((Ipv4Addr::LOCALHOST, port).into(), "/healthz").await;
            assert_eq!(
                refused.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionRefused)
            );
            // Taken: an error that names the address.
            let Err(e) = spawn((other, port).into(), Duration::from_secs(1), shared) else {
                panic!("bound 127.0.0.2:{port} twice");
            };
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
            let text = e.to_string();
            assert!(
                text.contains(&format!("--metrics 127.0.0.2:{port}")),
                "{text}"
            );
            assert!(text.contains("in use"), "{text}");
        });
    }
}
