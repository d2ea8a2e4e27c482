//! A TCP proxy on 127.0.0.1 that a test can cut, to kill a store's network
//! path without stopping the shared test server, or have lose one answer.
#![allow(dead_code, unreachable_pub)]

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// Forwards every connection to `target` until dropped or cut.
pub struct Proxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    answers: Arc<Answers>,
}

/// Whether the next answer is to be lost, and how many were.
#[derive(Default)]
struct Answers {
    lose_next: AtomicBool,
    lost: AtomicUsize,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let answers = Arc::new(Answers::default());
        let shared = Arc::clone(&answers);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let answers = Arc::clone(&shared);
                connections.spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        forward(inbound, outbound, &answers).await;
                    }
                });
            }
        });
        Self {
            addr,
            task,
            answers,
        }
    }

    /// Closes the listener and every forwarded connection: the store behind
    /// it becomes unreachable.
    pub fn cut(&self) {
        self.task.abort();
    }

    /// The next chunk the target sends, on any connection, is not passed
    /// on: that connection is closed instead. In a quiet test that chunk
    /// is the answer to the one request in flight. What the client sent has
    /// reached the target, so a write was applied and its client never
    /// hears of it. Later connections are forwarded as before.
    pub fn lose_next_answer(&self) {
        self.answers.lose_next.store(true, Ordering::SeqCst);
    }

    /// How many answers were lost.
    pub fn answers_lost(&self) -> usize {
        self.answers.lost.load(Ordering::SeqCst)
    }
}

/// Both ways until the target closes, a write to the client fails, or an
/// answer is lost; then both connections close.
async fn forward(inbound: TcpStream, outbound: TcpStream, answers: &Answers) {
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_target, mut to_target) = outbound.into_split();
    let requests = async move {
        let _ = tokio::io::copy(&mut from_client, &mut to_target).await;
        let _ = to_target.shutdown().await;
        // The target's answers to what was sent are still forwarded.
        std::future::pending::<()>().await;
    };
    let replies = async move {
        let mut buffer = vec![0; 16 * 1024];
        loop {
            let read = match from_target.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            if answers.lose_next.swap(false, Ordering::SeqCst) {
                answers.lost.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if to_client.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = requests => {}
        () = replies => {}
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
