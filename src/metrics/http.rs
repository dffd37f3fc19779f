//! The `/metrics` endpoint: one thread answering `GET /metrics` with the
//! OpenMetrics text (404 for anything else). It only reads the metrics, so
//! a slow or stuck scraper delays other scrapes, never I/O.

use super::{bind_addr, Metrics};
use std::net::SocketAddr;
use std::sync::Arc;
use tiny_http::{Header, Method, Response, Server};

/// The content type Prometheus asks for and prometheus-client writes.
const CONTENT_TYPE: &[u8] = b"application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bind `addr` (see [`bind_addr`]) and serve `metrics` there from a
/// thread of its own, for the life of the process. Returns the address
/// bound (port 0 picks one).
pub fn serve(addr: &str, metrics: Arc<Metrics>) -> Result<SocketAddr, String> {
    let addr = bind_addr(addr);
    let server = Server::http(&addr).map_err(|e| format!("metrics {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("metrics {addr}: not an IP address"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let found =
                    *req.method() == Method::Get && req.url().split('?').next() == Some("/metrics");
                let r = if !found {
                    req.respond(Response::from_string("not found\n").with_status_code(404))
                } else {
                    match metrics.encode() {
                        Ok(text) => {
                            let mut resp = Response::from_string(text);
                            if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], CONTENT_TYPE) {
                                resp = resp.with_header(h);
                            }
                            req.respond(resp)
                        }
                        Err(e) => {
                            log::error!("metrics: encoding failed: {e}");
                            req.respond(
                                Response::from_string("encoding failed\n").with_status_code(500),
                            )
                        }
                    }
                };
                if let Err(e) = r {
                    log::debug!("metrics: reply not sent: {e}");
                }
            }
        })
        .map_err(|e| format!("metrics: cannot start the HTTP thread: {e}"))?;
    Ok(bound)
}
