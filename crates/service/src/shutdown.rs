//! Graceful shutdown: what ends the service, and in what order it stops.
//!
//! On SIGTERM or ctrl-c the listener closes (no new connections), requests being answered
//! finish (a held request waits at most `max_wait_seconds`), no new build starts, and builds
//! in flight get `shutdown_grace_seconds` to finish and push. What is still running then is
//! abandoned: see [`super::state::Builds::drain`] for why that leaves nothing half-visible.

/// Resolves on SIGTERM or ctrl-c (SIGINT).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c: shutting down"),
        _ = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}

/// What shutting down did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ShutdownReport {
    /// Builds still running when the grace period ended, stopped before pushing a manifest.
    pub abandoned_builds: usize,
}
