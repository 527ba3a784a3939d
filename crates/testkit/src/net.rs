//! Loopback networking for the multi-process tests: free ports, a scrape of a Prometheus
//! endpoint, and a TCP proxy that a test can cut, the way a firewall cuts a link (used to
//! partition coordinator processes from each other without network namespaces).
//!
//! Each directed link (A dials B) gets its own [`Proxy`]; A is told B lives at the proxy's
//! address. Cutting a link resets the connections it carries and, until healed, black-holes
//! new ones: they are accepted and then never answered, as packets dropped by a partition
//! would be, so the dialer sees timeouts rather than a polite refusal.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A loopback port free at the time of the call (another process may take it before the
/// caller binds it; the tests live with that), and never one this process was given before:
/// the kernel may hand the same free port to two calls in a row, and a cluster whose members
/// were given one port twice cannot start.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`), where it never hands out
/// ports of its own: a process the test started binding `127.0.0.1:0`, or dialing out, cannot
/// take a port given here before the test binds it. (It did: a coordinator's public port, bound
/// to :0, once got the port just given for its metrics.) Where that range leaves too little
/// below it, any free port.
///
/// # Panics
/// When no loopback port can be bound.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    /// The lowest port handed out here.
    const LOW: u16 = 10_000;
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ephemeral = ephemeral_low().unwrap_or(32_768);
    if ephemeral > LOW + 1_000 {
        let span = u32::from(ephemeral - LOW);
        // Spread over the range by process, so test processes running at once rarely meet.
        let start = std::process::id().wrapping_mul(7_919) % span;
        for k in 0..span {
            let port = LOW + ((start + k) % span) as u16;
            if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0");
        let port = l.local_addr().expect("local addr").port();
        if given.insert(port) {
            return port;
        }
    }
}

/// The first port of the kernel's ephemeral range, when it says.
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `127.0.0.1:PORT` with a [`free_port`].
///
/// # Panics
/// As [`free_port`].
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// `http://A,http://B,…` for addresses `A`, `B`, … (`host:port`): a worker's list of
/// coordinators.
pub fn url_list<S: AsRef<str>>(addrs: impl IntoIterator<Item = S>) -> String {
    addrs
        .into_iter()
        .map(|a| format!("http://{}", a.as_ref()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `GET /metrics` from `addr` (`host:port`) over a plain TCP connection: the whole response,
/// status line and headers included.
///
/// # Panics
/// When the endpoint does not answer `200 OK` within 10 s.
pub fn scrape(addr: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: tessera\r\n\r\n")
        .expect("send the scrape");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read the scrape");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// The value of the first sample `name` in a Prometheus exposition, whatever its labels
/// (`name 3` or `name{model_name="m"} 3`).
///
/// # Panics
/// When `text` has no such sample.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

/// One directed link; dropping it stops the proxy and every connection it carries.
pub struct Proxy {
    /// host:port to dial instead of the target.
    pub address: String,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `target` (`host:port`); must be
    /// called within a Tokio runtime, which runs the proxy until it is dropped.
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

    /// Cuts (`true`) or heals (`false`) the link: cutting resets the connections it carries
    /// and black-holes new ones until healed.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Ensures that free ports are distinct, bindable, and below the kernel's ephemeral range
    /// (where a `:0` bind of another process cannot take them).
    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..64).map(|_| free_port()).collect();
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        if let Some(low) = ephemeral_low().filter(|&l| l > 11_000) {
            assert!(ports.iter().all(|&p| p < low), "{ports:?} vs {low}");
        }
        for p in ports {
            drop(std::net::TcpListener::bind(("127.0.0.1", p)).expect("bindable"));
        }
    }
}
