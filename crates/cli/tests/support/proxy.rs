//! A loopback TCP proxy that a test can cut, the way a firewall cuts a link: used to partition
//! coordinator processes from each other without network namespaces.
//!
//! Each directed link (A dials B) gets its own proxy; A is told B lives at the proxy's address.
//! Cutting a link resets the connections it carries and, until healed, black-holes new ones:
//! they are accepted and then never answered, as packets dropped by a partition would be, so
//! the dialer sees timeouts rather than a polite refusal.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One directed link; dropping it stops the proxy and every connection it carries.
pub struct Proxy {
    /// host:port to dial instead of the target.
    pub address: String,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy port");
        let address = listener.local_addr().expect("proxy address").to_string();
        let (cut, cut_rx) = watch::channel(false);
        let target = Arc::new(target);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(carry(inbound, Arc::clone(&target), cut_rx.clone()));
            }
        });
        Self { address, cut, task }
    }

    /// Cuts (`true`) or heals (`false`) the link.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Connections watch the sender: dropping it (with the proxy) ends them.
    }
}

/// Carries one connection until either side closes it, the link is cut, or the proxy goes.
async fn carry(mut inbound: TcpStream, target: Arc<String>, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        // Black hole: hold the connection silently until the link heals, then drop it so the
        // dialer reconnects through a working link.
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Ok(Ok(mut outbound)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target.as_str())).await
    else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.wait_for(|c| *c) => {
            // Reset rather than close: a partition gives no orderly goodbye.
            let _ = inbound.set_zero_linger();
            let _ = outbound.set_zero_linger();
        }
    }
}
