//! A TCP proxy on 127.0.0.1 that a test can cut, to kill a store's network
//! path without stopping the shared test server.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use tokio::{net::TcpListener, task::JoinSet};

/// Forwards every connection to `target` until dropped or cut.
pub struct Proxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, task }
    }

    /// Closes the listener and every forwarded connection: the store behind
    /// it becomes unreachable.
    pub fn cut(&self) {
        self.task.abort();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `host:port` of a `scheme://[user@]host:port/...` URL.
pub fn url_addr(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).expect("URL with a scheme");
    let rest = rest.rsplit('@').next().expect("host");
    let host_port = rest.split('/').next().expect("host:port");
    host_port.parse().expect("numeric host:port")
}

/// `url` with its `host:port` replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    url.replacen(&url_addr(url).to_string(), &addr.to_string(), 1)
}
