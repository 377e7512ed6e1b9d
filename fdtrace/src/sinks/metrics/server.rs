//! The HTTP side: `/metrics` and `/healthz` served by axum on the session's
//! current-thread runtime, between the session's own steps.
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
/// traces anything) and serves it from a task of the current runtime.
pub fn spawn(addr: SocketAddr, interval: Duration, shared: SharedState) -> io::Result<()> {
    let std = std::net::TcpListener::bind(addr).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("--metrics {addr}: cannot listen there: {e}"),
        )
    })?;
    std.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(App { shared, interval });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("fdtrace: --metrics {addr} stopped serving: {e}");
        }
    });
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
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no report for three intervals\n",
        )
    }
}
