//! The mock's accept loop and connections: hyper HTTP/1.1 with keep-alive, a graceful stop, and
//! the split between the control API and intake requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::control::{control, CONTROL_PREFIX};
use super::intake::intake;
use super::state::Shared;
use super::Body;

/// How long in-flight answers get to finish at shutdown before their connections are closed.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors), so as not to spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Service error that makes hyper close the connection without answering.
#[derive(Debug, thiserror::Error)]
pub(super) enum NoAnswer {
    #[error("connection dropped on purpose (fault injection)")]
    Dropped,
    #[error("the request body could not be read: {0}")]
    BodyRead(hyper::Error),
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.count_connection();
                    let conn = serve_connection(stream, peer, Arc::clone(&shared), &graceful);
                    connections.spawn(conn);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mock intake cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            // A stop request, or the MockIntake was dropped.
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("mock intake: closing connections still busy at shutdown");
    }
    connections.shutdown().await;
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    graceful: &GracefulShutdown,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // Answers are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    let conn = graceful.watch(conn);
    async move {
        if let Err(e) = conn.await {
            tracing::debug!(peer = %peer, error = %e, "mock intake connection closed");
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, NoAnswer> {
    if req.uri().path().starts_with(CONTROL_PREFIX) {
        return Ok(control(&shared, req).await);
    }
    intake(&shared, req).await
}
