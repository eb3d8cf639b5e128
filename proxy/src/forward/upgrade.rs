//! Protocol switches (WebSocket and other `Upgrade`s): once the upstream
//! answers 101, the two connections are joined into a byte tunnel.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Joins the client's and the upstream's upgraded connections. Runs as its
/// own task on the current worker and ends when either side closes, or
/// when the listener's drain timeout passes (`drain_deadline`). The client
/// side is the listener's guarded socket, which holds the connection's slot
/// in the listener, so the tunnel counts as an open connection until this
/// task drops it.
pub fn tunnel(
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    drain_deadline: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let joined = async {
            let (down, up) = match tokio::try_join!(downstream, upstream) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!("upgrade did not complete: {e}");
                    return;
                }
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                tracing::debug!("upgraded tunnel closed: {e}");
            }
        };
        // Selected here, not only in the guarded socket: a copy blocked on
        // the upstream side never touches the client side to notice.
        tokio::select! {
            () = joined => {}
            () = crate::lifecycle::drain_deadline_passed(drain_deadline) => {
                tracing::debug!("upgraded tunnel closed: the listener's drain timeout passed");
            }
        }
    });
}
