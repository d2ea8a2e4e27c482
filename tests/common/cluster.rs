//! Redis Clusters of a test's own, from Debian's `redis-server` and
//! `redis-cli`, for tests that kill nodes; and the shared one that
//! `scripts/with-servers` starts (`TEST_REDIS_CLUSTER_URLS`).
#![allow(dead_code, unreachable_pub)]

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The node URLs of the shared test cluster.
pub fn shared_nodes() -> Vec<String> {
    std::env::var("TEST_REDIS_CLUSTER_URLS")
        .expect("TEST_REDIS_CLUSTER_URLS is not set: run the tests with ./scripts/test")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// One node of a cluster: its port and its process.
pub struct Node {
    pub port: u16,
    pub child: Option<Child>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a machine that dies would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running node").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// `redis-cli` against this node.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of `masters` masters with `replicas` replicas each, stopped
/// when dropped.
pub struct Cluster {
    pub nodes: Vec<Node>,
    shards: usize,
    dir: std::path::PathBuf,
}

impl Cluster {
    pub fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with("redis-server", masters, replicas)
    }

    /// A cluster of `server`s: `redis-server`, or the Valkey that
    /// scripts/with-servers names in `TEST_VALKEY_SERVER`.
    pub fn start_with(server: &str, masters: usize, replicas: usize) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-cluster-{}-{}",
            std::process::id(),
            crate::common::free_port()
        ));
        let nodes: Vec<Node> = (0..masters * (1 + replicas))
            .map(|_| {
                let port = crate::common::free_port();
                let node_dir = dir.join(port.to_string());
                std::fs::create_dir_all(&node_dir).expect("node directory");
                let child = Command::new(server)
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args([
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--cluster-enabled",
                        "yes",
                    ])
                    .args(["--cluster-node-timeout", "1000"])
                    .args(["--cluster-require-full-coverage", "no"])
                    // Replicas sync at once rather than 5 s after they ask.
                    .args(["--repl-diskless-sync-delay", "0"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|err| panic!("start {server}: {err}"));
                Node {
                    port,
                    child: Some(child),
                }
            })
            .collect();
        for node in &nodes {
            wait_until(|| node.cli(&["ping"]).contains("PONG"), "a node to start");
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self {
            nodes,
            shards: masters,
            dir,
        };
        wait_until(
            || {
                cluster
                    .nodes
                    .iter()
                    .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
                    && cluster.masters().len() == masters
                    && cluster.replicas_of_all() == masters * replicas
            },
            "the cluster to form",
        );
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// `cluster nodes`, as one node sees it, one line a node.
    fn view(&self) -> Vec<String> {
        let alive = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node");
        alive
            .cli(&["cluster", "nodes"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Ports of the masters that serve slots, as the cluster sees them.
    pub fn masters(&self) -> Vec<u16> {
        self.view()
            .iter()
            .filter(|line| {
                line.contains("master") && !line.contains("fail") && line.split(' ').count() > 8
            })
            .filter_map(|line| port_of(line))
            .collect()
    }

    fn replicas_of_all(&self) -> usize {
        self.view()
            .iter()
            .filter(|line| line.contains("slave"))
            .count()
    }

    /// The port of the replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let view = self.view();
        let id = view
            .iter()
            .find(|line| line.contains(&format!(":{port}@")))
            .and_then(|line| line.split(' ').next())
            .expect("the master's id")
            .to_owned();
        view.iter()
            .find(|line| line.contains("slave") && line.contains(&id))
            .and_then(|line| port_of(line))
            .expect("a replica of the master")
    }

    /// The port of the master that serves `slot`.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        let serves = |range: &str| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            let bound = |end: &str| end.parse::<u16>().ok();
            bound(first).is_some_and(|first| first <= slot)
                && bound(last).is_some_and(|last| slot <= last)
        };
        self.view()
            .iter()
            .find(|line| line.split(' ').skip(8).any(serves))
            .and_then(|line| port_of(line))
            .expect("a master serves the slot")
    }

    pub fn node(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node on that port")
    }

    /// Waits until the replica of the master on `port` (killed) has taken
    /// its slots over and the cluster serves every slot again.
    pub fn wait_for_failover(&self, port: u16) {
        wait_until(
            || {
                let masters = self.masters();
                masters.len() == self.shards
                    && !masters.contains(&port)
                    && self
                        .nodes
                        .iter()
                        .filter(|n| n.child.is_some())
                        .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
            },
            "a replica to take over",
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The port in a line of `cluster nodes` (`id 127.0.0.1:port@bus …`).
fn port_of(line: &str) -> Option<u16> {
    line.split(' ')
        .nth(1)?
        .split(':')
        .nth(1)?
        .split('@')
        .next()?
        .parse()
        .ok()
}
