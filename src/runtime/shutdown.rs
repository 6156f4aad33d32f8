//! What stops a running context: a signal from outside or an escalation from
//! inside. The ordered phases themselves live in [`crate::Context::shutdown`].

/// Resolves on Ctrl-C or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                log::warn!(target: "herald::shutdown", "cannot watch SIGTERM ({error}); Ctrl-C only");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    log::info!(target: "herald::shutdown", "shutdown signal received");
}
