//! Redis at scale: a real Redis Cluster of three masters, records spread
//! over all of them, a master that fails over with and without replica
//! acknowledgements, a shard lost for good, and servers that may evict.
#![cfg(feature = "redis")]

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use cluster::Cluster;
use common::{post, read, send, unique_key};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::Layer;
use tower_idempotency::{body::RequestBody, store::RedisStore, IdempotencyLayer};

type Handler = tower::util::BoxCloneSyncService<
    Request<RequestBody<Full<Bytes>>>,
    Response<Full<Bytes>>,
    std::convert::Infallible,
>;

/// Runs per key, for a handler that answers 201.
#[derive(Clone, Default)]
struct RunsPerKey(Arc<Mutex<HashMap<String, usize>>>);

impl RunsPerKey {
    /// A handler that answers at once.
    fn handler(&self) -> Handler {
        self.handler_held_until(tokio::sync::watch::channel(true).1)
    }

    /// A handler that answers once `released` turns true, or after
    /// [`HELD_AT_MOST`], so that a slow test's requests end within their
    /// lease.
    fn handler_held_until(&self, released: tokio::sync::watch::Receiver<bool>) -> Handler {
        let runs = self.clone();
        tower::util::BoxCloneSyncService::new(tower::service_fn(
            move |request: Request<RequestBody<Full<Bytes>>>| {
                let key = request.headers()["idempotency-key"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                *runs.0.lock().unwrap().entry(key).or_default() += 1;
                let mut released = released.clone();
                async move {
                    let _ = tokio::time::timeout(HELD_AT_MOST, released.wait_for(|go| *go)).await;
                    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                    *response.status_mut() = StatusCode::CREATED;
                    Ok(response)
                }
            },
        ))
    }

    /// Keys whose handler has started.
    fn started(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn twice(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .values()
            .filter(|runs| **runs > 1)
            .count()
    }
}

/// How many records under `prefix` each master of the shared cluster holds.
fn keys_per_master(prefix: &str) -> Vec<(String, usize)> {
    let cli = |port: &str, args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", port])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cluster::shared_nodes()
        .iter()
        .filter(|url| cli(url.rsplit(':').next().unwrap(), &["role"]).starts_with("master"))
        .map(|url| {
            let port = url.rsplit(':').next().unwrap();
            let out = std::process::Command::new("redis-cli")
                .args(["-p", port, "--scan", "--pattern", &format!("{prefix}*")])
                .output()
                .expect("redis-cli --scan");
            let keys = String::from_utf8_lossy(&out.stdout).lines().count();
            (url.clone(), keys)
        })
        .collect()
}

/// Each key's first use, then each key's replay, through `svc`: 201 both
/// times, and only the second replayed.
async fn first_uses_then_replays(svc: &tower_idempotency::Idempotency<Handler>, keys: &[String]) {
    for replay in [false, true] {
        for key in keys {
            let request = post("/payments", Some(key), "{}");
            let response = tower::ServiceExt::oneshot(svc.clone(), request)
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::CREATED);
            let replayed = response.headers().contains_key("idempotent-replayed");
            assert_eq!(replayed, replay);
        }
    }
}

/// The layer on a store under `prefix` on the shared test cluster.
async fn layer_on_the_shared_cluster(prefix: &str) -> IdempotencyLayer {
    let store = RedisStore::connect_cluster(cluster::shared_nodes())
        .await
        .expect("connect to the test cluster");
    IdempotencyLayer::new(store.with_prefix(prefix))
}

#[tokio::test]
async fn records_spread_over_every_master_of_the_cluster() {
    let prefix = format!("{}:", unique_key("spread"));
    let runs = RunsPerKey::default();
    let svc = layer_on_the_shared_cluster(&prefix)
        .await
        .layer(runs.handler());
    for i in 0..300 {
        let response = tower::ServiceExt::oneshot(
            svc.clone(),
            post("/payments", Some(&format!("k{i}")), "{}"),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let per_master = keys_per_master(&prefix);
    eprintln!("records per master: {per_master:?}");
    assert_eq!(per_master.len(), 3, "{per_master:?}");
    assert!(per_master.iter().all(|(_, n)| *n > 0), "{per_master:?}");
    assert_eq!(per_master.iter().map(|(_, n)| n).sum::<usize>(), 300);
}

/// A prefix with a hash tag keeps every record on the tag's one slot.
#[tokio::test]
async fn records_under_a_hash_tagged_prefix_share_one_master() {
    let tag = unique_key("tagged");
    let prefix = format!("{{{tag}}}:");
    let runs = RunsPerKey::default();
    let svc = layer_on_the_shared_cluster(&prefix)
        .await
        .layer(runs.handler());
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    first_uses_then_replays(&svc, &keys).await;
    assert_eq!(runs.twice(), 0);
    let per_master = keys_per_master(&prefix);
    let holding: Vec<_> = per_master.iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(holding.len(), 1, "{per_master:?}");
    assert_eq!(holding[0].1, 20, "{per_master:?}");
}

/// The Valkey that scripts/with-servers built, which takes `SET … IFEQ`.
fn valkey_server() -> String {
    std::env::var("TEST_VALKEY_SERVER")
        .expect("TEST_VALKEY_SERVER is not set: run the tests with ./scripts/test")
}

/// `complete` while its key's slot moves from one master to another
/// (resharding: the slot `MIGRATING` on the old master, `IMPORTING` on the
/// new), with the lock still on the old master or already moved: the
/// record is stored either way, and replays once the slot has moved.
#[tokio::test]
async fn complete_while_the_keys_slot_is_migrated_stores_the_record() {
    complete_during_migration("redis-server".to_owned()).await;
}

/// The same on Valkey, where `complete` is a native `SET … IFEQ`, which is
/// sent on to the new master once the lock has moved (`ASK`).
#[tokio::test]
async fn native_complete_while_the_keys_slot_is_migrated_stores_the_record() {
    complete_during_migration(valkey_server()).await;
}

async fn complete_during_migration(server: String) {
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion},
        Store,
    };
    let cluster = tokio::task::spawn_blocking(move || Cluster::start_with(&server, 3, 0))
        .await
        .unwrap();
    let store = RedisStore::connect_cluster(cluster.urls())
        .await
        .expect("connect to the cluster")
        .with_prefix("resharding:");
    let (fingerprint, lease) = (Fingerprint::from_bytes([8; 32]), Duration::from_secs(60));
    for lock_moved in [false, true] {
        let key = RecordKey::new(b"resharding", &unique_key("migrated"));
        let name = format!("resharding:{}", key.to_hex());
        let Ok(BeginOutcome::Acquired(token)) = store.begin(&key, &fingerprint, lease).await else {
            panic!("a fresh key is acquired");
        };
        let node = |port: u16| cluster.nodes.iter().find(|n| n.port == port).unwrap();
        let any = node(cluster.masters()[0]);
        let slot = any.cli(&["cluster", "keyslot", &name]).trim().to_owned();
        let owner = cluster.master_of_slot(slot.parse().unwrap());
        let (source, target) = (
            node(owner),
            node(
                *cluster
                    .masters()
                    .iter()
                    .find(|port| **port != owner)
                    .unwrap(),
            ),
        );
        let id = |node: &cluster::Node| node.cli(&["cluster", "myid"]).trim().to_owned();
        let (source_id, target_id) = (id(source), id(target));
        target.cli(&["cluster", "setslot", &slot, "importing", &source_id]);
        source.cli(&["cluster", "setslot", &slot, "migrating", &target_id]);
        let migrate = || {
            let moved = source.cli(&[
                "migrate",
                "127.0.0.1",
                &target.port.to_string(),
                "",
                "0",
                "5000",
                "keys",
                &name,
            ]);
            assert!(moved.contains("OK") || moved.contains("NOKEY"), "{moved}");
        };
        if lock_moved {
            migrate();
        }
        let record = Bytes::from_static(b"charged once");
        let completed = store
            .complete(
                &key,
                &fingerprint,
                token,
                Completion::Response(record.clone()),
                lease,
            )
            .await;
        assert!(completed.is_ok(), "lock moved: {lock_moved}: {completed:?}");
        migrate();
        for node in [source, target] {
            node.cli(&["cluster", "setslot", &slot, "node", &target_id]);
        }
        let replay = store.begin(&key, &fingerprint, lease).await;
        assert!(
            matches!(&replay, Ok(BeginOutcome::Completed(found)) if *found == record),
            "lock moved: {lock_moved}: {replay:?}"
        );
    }
}

/// How long a failover test's first requests are held at most: shorter
/// than the lease, so that a slow test's held locks never lapse.
const HELD_AT_MOST: Duration = Duration::from_secs(45);

/// Longer than any request of a failover test is held, so that no lock
/// depends on a renewal, which the failover could cut off.
const FAILOVER_LEASE: Duration = Duration::from_secs(60);

/// What a failover does to locks held on the master that fails, on a
/// cluster of `server`s: 12 requests take their locks and are held, the
/// master of one shard is killed (once each holds its lock or was refused
/// one; with a lagging replica and replica acks, while one waits for its
/// ack), its replica takes over, and every key is retried while the first
/// requests are still held, through a store without replica acks, so
/// that a lock that survived answers 409 and a lost one runs again; then
/// the first requests are released, and every key is sent once more.
async fn failover_while_locks_are_held(
    server: &str,
    replica_acks: bool,
    lagging_replica: bool,
) -> Failover {
    let server = server.to_owned();
    let mut cluster = tokio::task::spawn_blocking(move || Cluster::start_with(&server, 3, 1))
        .await
        .unwrap();
    let mut store = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    if replica_acks {
        store = store.with_replica_acks(1, Duration::from_secs(1));
    }
    let runs = RunsPerKey::default();
    let layer = IdempotencyLayer::new(store).with_lease(FAILOVER_LEASE);
    let (release, released) = tokio::sync::watch::channel(false);
    let svc = common::app(&layer, runs.handler_held_until(released));
    let victim = cluster.masters()[0];
    let replica = cluster.replica_of(victim);
    if lagging_replica {
        // The replica stops, and its link is cut: what the master writes
        // from now on stays in the master's backlog, as when replication
        // lags behind.
        cluster.node(replica).signal("STOP");
        cluster
            .node(victim)
            .cli(&["client", "kill", "type", "replica"]);
    }
    let keys: Vec<String> = (0..12).map(|i| format!("failover-{i}")).collect();
    let held_since = std::time::Instant::now();
    let firsts: Vec<_> = keys
        .iter()
        .map(|key| common::spawn_send(&svc, post("/payments", Some(key), "{}")))
        .collect();
    // With a lagging replica and replica acks, the master fails while a
    // request waits for its lock's ack. Otherwise once every request
    // holds its lock (or was refused one): a lock taken only after the
    // failover would be no test of it.
    let mut victim_waits_for_an_ack = || cluster.node(victim).cli(&["dbsize"]).trim() != "0";
    let settled = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ready = if lagging_replica && replica_acks {
                victim_waits_for_an_ack()
            } else {
                let done = firsts.iter().filter(|first| first.is_finished()).count();
                runs.started() + done == keys.len()
            };
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(settled.is_ok(), "the first requests took their locks");
    cluster.node(victim).kill();
    if lagging_replica {
        cluster.node(replica).signal("CONT");
    }
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_for_failover(victim);
        cluster
    })
    .await
    .unwrap();
    // Every key again, while the first requests are held.
    let plain = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let retries = common::app(
        &IdempotencyLayer::new(plain).with_lease(FAILOVER_LEASE),
        runs.handler(),
    );
    let mut found = 0;
    for key in &keys {
        for _ in 0..20 {
            let retry = send(&retries, post("/payments", Some(key), "{}")).await;
            if retry.status() == StatusCode::CONFLICT {
                found += 1;
            }
            if retry.status() != StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        held_since.elapsed() < HELD_AT_MOST,
        "the first requests may have been let go before their retries: nothing was tested"
    );
    release.send(true).unwrap();
    let mut refused = 0;
    for first in firsts {
        let (head, _) = first.await.unwrap();
        if head.status == StatusCode::SERVICE_UNAVAILABLE {
            refused += 1;
        }
    }
    let mut replayed = 0;
    for key in &keys {
        let again = send(&retries, post("/payments", Some(key), "{}")).await;
        if again.headers().contains_key("idempotent-replayed") {
            replayed += 1;
        }
    }
    drop(cluster);
    Failover {
        twice: runs.twice(),
        refused,
        found,
        replayed,
    }
}

/// What [`failover_while_locks_are_held`] saw, of its 12 keys.
#[derive(Debug)]
struct Failover {
    /// Keys whose handler ran twice.
    twice: usize,
    /// Keys whose first request was refused with 503.
    refused: usize,
    /// Keys whose retry, while the first request was held, found its lock.
    found: usize,
    /// Keys that replayed once every request was done.
    replayed: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_a_lagging_replica_loses_locks_without_replica_acks() {
    let seen = failover_while_locks_are_held("redis-server", false, true).await;
    eprintln!("failover, no replica acks, lagging replica: {seen:?}");
    assert!(
        seen.twice > 0,
        "the locks on the failed master were lost with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_replica_acks_never_runs_a_key_twice() {
    let seen = failover_while_locks_are_held("redis-server", true, true).await;
    eprintln!("failover, replica acks, lagging replica: {seen:?}");
    assert_eq!(seen.twice, 0);
    assert!(
        seen.refused > 0,
        "the locks the replica never had were refused"
    );
    failover_with_a_healthy_replica_and_replica_acks("redis-server").await;
}

/// On Valkey, whose completions are native `SET … IFEQ`s against the lock
/// the new master kept (a completion the failover cut off is retried
/// through the script).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_valkey_with_replica_acks_never_runs_a_key_twice() {
    failover_with_a_healthy_replica_and_replica_acks(&valkey_server()).await;
}

/// With replica acks and a replica that keeps up, every lock survives the
/// failover and every completion lands on the new master.
async fn failover_with_a_healthy_replica_and_replica_acks(server: &str) -> Failover {
    let seen = failover_while_locks_are_held(server, true, false).await;
    eprintln!("{server} failover, replica acks, healthy replica: {seen:?}");
    assert_eq!(seen.twice, 0);
    assert_eq!(seen.refused, 0, "acknowledged locks run");
    assert_eq!(
        seen.found, 12,
        "every acknowledged lock survived the failover"
    );
    assert_eq!(
        seen.replayed, 12,
        "every completion landed on the new master"
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_shard_fails_only_its_own_keys() {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start(3, 0))
        .await
        .unwrap();
    let store = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let runs = RunsPerKey::default();
    let svc = common::app(&IdempotencyLayer::new(store), runs.handler());
    let before: Vec<String> = (0..30).map(|i| format!("before-{i}")).collect();
    for key in &before {
        assert_eq!(
            send(&svc, post("/payments", Some(key), "{}"))
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    cluster.node(cluster.masters()[0]).kill();
    let (mut served, mut refused, mut replayed) = (0, 0, 0);
    for i in 0..60 {
        match send(&svc, post("/payments", Some(&format!("after-{i}")), "{}"))
            .await
            .status()
        {
            StatusCode::CREATED => served += 1,
            StatusCode::SERVICE_UNAVAILABLE => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    for key in &before {
        let (head, _) = read(send(&svc, post("/payments", Some(key), "{}")).await).await;
        if head.headers.contains_key("idempotent-replayed") {
            replayed += 1;
        }
    }
    eprintln!("one of three shards lost: {served} new keys served, {refused} refused; {replayed} of 30 earlier keys replayed");
    assert!(
        served > 0 && refused > 0,
        "served {served}, refused {refused}"
    );
    assert!(replayed > 0 && replayed < 30, "replayed {replayed}");
    assert_eq!(runs.twice(), 0);
}

#[tokio::test]
async fn a_server_that_may_evict_keys_is_warned_about() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--maxmemory-policy", "volatile-lru"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start redis-server");
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Stop(server);
    let url = format!("redis://127.0.0.1:{port}");
    let (captured, _guard) = common::capture_logs();
    let mut connected = None;
    for _ in 0..50 {
        if let Ok(store) = RedisStore::connect(&url).await {
            connected = Some(store);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    connected.expect("connect to the evicting server");
    let log = captured.text();
    assert!(log.contains("maxmemory-policy volatile-lru"), "{log}");
    assert!(log.contains("noeviction"), "{log}");
}

#[tokio::test]
async fn a_server_that_never_evicts_is_not_warned_about() {
    let (captured, _guard) = common::capture_logs();
    let url = std::env::var("TEST_REDIS_URL").expect("TEST_REDIS_URL");
    RedisStore::connect(&url).await.unwrap();
    RedisStore::connect_cluster(cluster::shared_nodes())
        .await
        .unwrap();
    assert!(
        !captured.text().contains("may evict"),
        "{}",
        captured.text()
    );
}

/// On a Valkey cluster, first uses through the layer run no script on any
/// master, and every record replays.
#[tokio::test]
async fn first_uses_on_a_valkey_cluster_run_no_script() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_with(&valkey_server(), 3, 0))
        .await
        .unwrap();
    let store = RedisStore::connect_cluster(cluster.urls())
        .await
        .expect("connect to the cluster");
    let runs = RunsPerKey::default();
    let svc = IdempotencyLayer::new(store).layer(runs.handler());
    let keys: Vec<String> = (0..30).map(|_| unique_key("native")).collect();
    first_uses_then_replays(&svc, &keys).await;
    assert_eq!(runs.twice(), 0);
    for port in cluster.masters() {
        let stats = cluster
            .nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap()
            .cli(&["info", "commandstats"]);
        assert!(!stats.contains("cmdstat_evalsha"), "{port}: {stats}");
    }
}
