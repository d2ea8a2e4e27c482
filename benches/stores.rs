//! The Redis and PostgreSQL stores against a raw client doing the same reads
//! and writes, and the store calls each request makes through the layer.
//!
//! Needs servers: `scripts/with-servers cargo bench --bench stores --all-features`.
//! Without `TEST_REDIS_URL` and `TEST_DATABASE_URL` it measures nothing and
//! says so.
// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]

#[cfg(all(feature = "redis", feature = "postgres"))]
mod real {
    use std::{
        future::Future,
        pin::Pin,
        sync::{
            atomic::{AtomicU64, Ordering},
            Arc,
        },
        time::{Duration, Instant},
    };

    use async_trait::async_trait;
    use bytes::Bytes;
    use criterion::{Criterion, Throughput};
    use tower::{Layer, ServiceExt};
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::{BeginOutcome, Completion, LockToken, PostgresStore, RedisStore, StoreError},
        IdempotencyLayer, Store,
    };

    use crate::common::{
        drain, handler, raw_postgres, raw_redis, request,
        store_steps::{first_use, replay, store_hot},
    };

    /// Counts the calls the layer makes to a store; each call of the shipped
    /// stores is one round trip (one command or script, one statement).
    #[derive(Debug, Clone)]
    struct Counting<S> {
        inner: S,
        calls: Arc<AtomicU64>,
    }

    #[async_trait]
    impl<S: Store> Store for Counting<S> {
        async fn begin(
            &self,
            key: &RecordKey,
            fp: &Fingerprint,
            lease: Duration,
        ) -> Result<BeginOutcome, StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.inner.begin(key, fp, lease).await
        }
        async fn complete(
            &self,
            key: &RecordKey,
            fingerprint: &Fingerprint,
            token: LockToken,
            outcome: Completion,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.inner
                .complete(key, fingerprint, token, outcome, ttl)
                .await
        }
        async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.inner.release(key, token).await
        }
        async fn fence(
            &self,
            key: &RecordKey,
            token: LockToken,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.inner.fence(key, token, ttl).await
        }
        async fn renew(
            &self,
            key: &RecordKey,
            token: LockToken,
            lease: Duration,
        ) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.inner.renew(key, token, lease).await
        }
    }

    async fn redis_evals(url: &str) -> u64 {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// Redis's own CPU time so far (user + system, seconds), from `INFO cpu`.
    async fn redis_cpu(conn: &mut impl redis::aio::ConnectionLike) -> f64 {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(conn)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
            .sum()
    }

    /// One call of a step, as a future of its own.
    type Step<'a> = Box<dyn FnMut() -> Pin<Box<dyn Future<Output = ()> + Send>> + 'a>;

    /// A step of a store and the same step of its raw client.
    struct Pair<'a> {
        step: &'static str,
        /// The criterion rows: the store's, then the raw client's.
        rows: [&'static str; 2],
        ours: Step<'a>,
        raw: Step<'a>,
    }

    /// A Redis store's first use and replay, each beside the raw client's.
    fn redis_pairs<'a, C>(
        store: &'a RedisStore,
        raw: &'a C,
        encoded: &'a Bytes,
        key: &'a dyn Fn(u64) -> RecordKey,
        fresh: &'a AtomicU64,
        hot: RecordKey,
    ) -> Vec<Pair<'a>>
    where
        C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
    {
        vec![
            Pair {
                step: "first use",
                rows: ["first_use", "raw_set_nx_then_set"],
                ours: Box::new(move || {
                    let (store, encoded) = (store.clone(), encoded.clone());
                    let k = key(fresh.fetch_add(1, Ordering::Relaxed));
                    Box::pin(async move { first_use(&store, &k, encoded).await })
                }),
                raw: Box::new(move || {
                    let (mut conn, encoded) = (raw.clone(), encoded.clone());
                    let k = key(fresh.fetch_add(1, Ordering::Relaxed));
                    Box::pin(async move { raw_redis::first_use(&mut conn, &k, &encoded).await })
                }),
            },
            Pair {
                step: "replay",
                rows: ["replay", "raw_get"],
                ours: Box::new(move || {
                    let store = store.clone();
                    Box::pin(async move { replay(&store, &hot).await })
                }),
                raw: Box::new(move || {
                    let mut conn = raw.clone();
                    Box::pin(async move { raw_redis::get(&mut conn).await })
                }),
            },
        ]
    }

    /// A PostgreSQL store's first use and replay, each beside raw sqlx's.
    fn postgres_pairs<'a>(
        store: &'a PostgresStore,
        pool: &'a sqlx::PgPool,
        encoded: &'a Bytes,
        key: &'a dyn Fn(u64) -> RecordKey,
        fresh: &'a AtomicU64,
        hot: RecordKey,
    ) -> Vec<Pair<'a>> {
        vec![
            Pair {
                step: "first use",
                rows: ["first_use", "raw_insert_then_update"],
                ours: Box::new(move || {
                    let (store, encoded) = (store.clone(), encoded.clone());
                    let k = key(fresh.fetch_add(1, Ordering::Relaxed));
                    Box::pin(async move { first_use(&store, &k, encoded).await })
                }),
                raw: Box::new(move || {
                    let (pool, encoded) = (pool.clone(), encoded.clone());
                    let k = key(fresh.fetch_add(1, Ordering::Relaxed));
                    Box::pin(
                        async move { raw_postgres::insert_then_update(&pool, &k, &encoded).await },
                    )
                }),
            },
            Pair {
                step: "replay",
                rows: ["replay", "raw_select"],
                ours: Box::new(move || {
                    let store = store.clone();
                    Box::pin(async move { replay(&store, &hot).await })
                }),
                raw: Box::new(move || {
                    let pool = pool.clone();
                    Box::pin(async move { raw_postgres::select(&pool, &hot).await })
                }),
            },
        ]
    }

    type Group<'g> = criterion::BenchmarkGroup<'g, criterion::measurement::WallTime>;

    /// The criterion row of each side of each pair, named `{prefix}/{row}`.
    fn rows(
        group: &mut Group<'_>,
        rt: &tokio::runtime::Runtime,
        in_flight: usize,
        prefix: &str,
        pairs: &mut [Pair<'_>],
    ) {
        for pair in pairs {
            for (row, step) in pair.rows.into_iter().zip([&mut pair.ours, &mut pair.raw]) {
                group.bench_function(format!("{prefix}/{row}"), |b| {
                    b.iter_custom(|n| time(rt, n, in_flight, |_| step()))
                });
            }
        }
    }

    /// Each step of a store against the same step of its raw client,
    /// interleaved over five rounds of `calls` calls `in_flight` at a time,
    /// each side first in every other round (store, raw, raw, store, …), so
    /// that neither always runs on what the other left warm; medians of the
    /// time per call and, given a Redis connection, of what each call costs
    /// that Redis (its CPU time). Interleaving keeps the machine's drift out
    /// of the ratios, which the criterion rows, measured one after the
    /// other, cannot.
    fn interleaved(
        rt: &tokio::runtime::Runtime,
        store: &str,
        in_flight: usize,
        calls: u64,
        pairs: &mut [Pair<'_>],
        redis: Option<&redis::aio::MultiplexedConnection>,
    ) {
        let measure = |step: &mut Step<'_>| {
            let cpu = || redis.map_or(0.0, |conn| rt.block_on(redis_cpu(&mut conn.clone())));
            let before = cpu();
            let elapsed = time(rt, calls, in_flight, |_| step());
            let used = cpu() - before;
            (
                elapsed.as_secs_f64() * 1e6 / calls as f64,
                used * 1e6 / calls as f64,
            )
        };
        let median = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        for Pair {
            step: name,
            ours,
            raw,
            ..
        } in pairs
        {
            let (mut rounds, mut raw_rounds) = (Vec::new(), Vec::new());
            for round in 0..5 {
                if round % 2 == 0 {
                    rounds.push(measure(ours));
                    raw_rounds.push(measure(raw));
                } else {
                    raw_rounds.push(measure(raw));
                    rounds.push(measure(ours));
                }
            }
            let [(time, cpu), (raw_time, raw_cpu)] = [rounds, raw_rounds].map(|rounds| {
                let (times, cpus): (Vec<f64>, Vec<f64>) = rounds.into_iter().unzip();
                (median(times), median(cpus))
            });
            print!(
                "interleaved, {store} {name}, {in_flight} in flight: {time:.1} µs per call \
                 (raw {raw_time:.1} µs, throughput ratio {:.2})",
                raw_time / time
            );
            if redis.is_some() {
                print!("; Redis CPU {cpu:.1} µs per call (raw {raw_cpu:.1} µs)");
            }
            println!();
        }
    }

    /// Store calls per first use and per replay through the whole layer.
    async fn calls_per_request(name: &str, store: Arc<dyn Store>, redis_url: Option<&str>) {
        let calls = Arc::new(AtomicU64::new(0));
        let counting = Counting {
            inner: store,
            calls: Arc::clone(&calls),
        };
        let svc = IdempotencyLayer::new(counting).layer(tower::service_fn(handler));
        let body = Bytes::from_static(b"{\"amount\":1}");
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        const N: u64 = 200;
        let evals_before = match redis_url {
            Some(url) => redis_evals(url).await,
            None => 0,
        };
        for i in 0..N {
            drain(
                svc.clone()
                    .oneshot(request(Some(&format!("rt-{run}-{i}")), &body))
                    .await
                    .unwrap(),
            )
            .await;
        }
        let first_use = calls.swap(0, Ordering::Relaxed);
        for i in 0..N {
            drain(
                svc.clone()
                    .oneshot(request(Some(&format!("rt-{run}-{i}")), &body))
                    .await
                    .unwrap(),
            )
            .await;
        }
        let replay = calls.load(Ordering::Relaxed);
        assert!(first_use >= N, "every first use reached the store");
        print!(
            "{name}: store calls per request: first use {:.2}, replay {:.2}",
            first_use as f64 / N as f64,
            replay as f64 / N as f64
        );
        if let Some(url) = redis_url {
            let evals = redis_evals(url).await - evals_before;
            print!(
                "; Redis EVAL/EVALSHA per request {:.2}",
                evals as f64 / (2 * N) as f64
            );
        }
        println!();
    }

    /// A handler whose effect is a row in `bench_effects`, inserted in a
    /// transaction of its own, with or without the layer's fence in it.
    fn effect_handler(
        pool: sqlx::PgPool,
        store: PostgresStore,
        fenced: bool,
    ) -> impl tower::Service<
        http::Request<tower_idempotency::body::RequestBody<http_body_util::Full<Bytes>>>,
        Response = http::Response<http_body_util::Full<Bytes>>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |request: http::Request<_>| {
            let (pool, store) = (pool.clone(), store.clone());
            let execution = request
                .extensions()
                .get::<tower_idempotency::Execution>()
                .cloned()
                .expect("a keyed request");
            async move {
                let mut tx = pool.begin().await.unwrap();
                if fenced {
                    store.fence_in(&mut tx, &execution).await.unwrap();
                }
                sqlx::query("INSERT INTO bench_effects (record_key) VALUES ($1)")
                    .bind(&execution.record_key().as_bytes()[..])
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                let mut response =
                    http::Response::new(http_body_util::Full::new(Bytes::from_static(b"{}")));
                *response.status_mut() = http::StatusCode::CREATED;
                Ok(response)
            }
        })
    }

    /// How many calls a concurrent row keeps in flight, as a server's
    /// concurrent requests would.
    const IN_FLIGHT: usize = 16;

    /// Runs `iters` calls of `f`, `in_flight` of them at a time.
    fn time<F, Fut>(
        rt: &tokio::runtime::Runtime,
        iters: u64,
        in_flight: usize,
        mut f: F,
    ) -> Duration
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        rt.block_on(async {
            let start = Instant::now();
            let mut running = tokio::task::JoinSet::new();
            for i in 0..iters {
                if running.len() >= in_flight {
                    running
                        .join_next()
                        .await
                        .expect("a call")
                        .expect("no panic");
                }
                running.spawn(f(i));
            }
            while let Some(done) = running.join_next().await {
                done.expect("no panic");
            }
            start.elapsed()
        })
    }

    /// A store on the Redis (or Valkey) at `url`, and a raw connection to it.
    async fn redis_and_raw(url: &str) -> (RedisStore, redis::aio::MultiplexedConnection) {
        let store = RedisStore::connect(url)
            .await
            .unwrap()
            .with_prefix("bench:");
        let raw = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        (store, raw)
    }

    pub(crate) fn stores(c: &mut Criterion) {
        let (Ok(redis_url), Ok(database_url)) = (
            std::env::var("TEST_REDIS_URL"),
            std::env::var("TEST_DATABASE_URL"),
        ) else {
            println!("stores: TEST_REDIS_URL and TEST_DATABASE_URL are not set; run under scripts/with-servers");
            return;
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Valkey 8.1 takes `SET … IFEQ`, so its store completes without a
        // script.
        let valkey_url = std::env::var("TEST_VALKEY_URL").ok();
        let (redis_store, raw_conn, valkey, pg_store, pool) = rt.block_on(async {
            let (redis_store, raw) = redis_and_raw(&redis_url).await;
            let valkey = match &valkey_url {
                Some(url) => Some(redis_and_raw(url).await),
                None => None,
            };
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect(&database_url)
                .await
                .unwrap();
            let pg_store = PostgresStore::new(pool.clone())
                .with_table("bench_records")
                .unwrap();
            pg_store.migrate().await.unwrap();
            raw_postgres::create_table(&pool).await;
            sqlx::raw_sql("CREATE TABLE IF NOT EXISTS bench_effects (record_key BYTEA NOT NULL)")
                .execute(&pool)
                .await
                .unwrap();
            calls_per_request("redis", Arc::new(redis_store.clone()), Some(&redis_url)).await;
            if let Some((store, _)) = &valkey {
                calls_per_request("valkey", Arc::new(store.clone()), valkey_url.as_deref()).await;
            }
            calls_per_request("postgres", Arc::new(pg_store.clone()), None).await;
            (redis_store, raw, valkey, pg_store, pool)
        });

        let encoded = tower_idempotency::conformance::sample_response().encode();
        let run = format!("{:?}", Instant::now());
        let key = |i: u64| RecordKey::new(run.as_bytes(), &i.to_string());
        // Every timed first use takes a key never used before.
        let fresh = AtomicU64::new(0);
        let fresh = &fresh;

        for in_flight in [1, IN_FLIGHT] {
            let mut group = c.benchmark_group(if in_flight == 1 {
                "stores".to_owned()
            } else {
                format!("stores_{in_flight}_in_flight")
            });
            group.throughput(Throughput::Elements(1));
            group.sample_size(20);

            let hot = key(u64::MAX);
            rt.block_on(async {
                store_hot(&redis_store, &hot, &encoded).await;
                store_hot(&pg_store, &hot, &encoded).await;
                raw_redis::store_hot(&mut raw_conn.clone(), &encoded).await;
                if let Some((store, raw)) = &valkey {
                    store_hot(store, &hot, &encoded).await;
                    raw_redis::store_hot(&mut raw.clone(), &encoded).await;
                }
                raw_postgres::store_hot(&pool, &hot, &encoded).await;
            });
            let calls = if in_flight == 1 { 500 } else { 4_000 };
            let mut pairs = redis_pairs(&redis_store, &raw_conn, &encoded, &key, fresh, hot);
            rows(&mut group, &rt, in_flight, "redis", &mut pairs);
            interleaved(&rt, "Redis", in_flight, calls, &mut pairs, Some(&raw_conn));
            if let Some((store, raw)) = &valkey {
                let mut pairs = redis_pairs(store, raw, &encoded, &key, fresh, hot);
                rows(&mut group, &rt, in_flight, "valkey", &mut pairs);
                interleaved(&rt, "Valkey", in_flight, calls, &mut pairs, Some(raw));
            }
            let mut pairs = postgres_pairs(&pg_store, &pool, &encoded, &key, fresh, hot);
            rows(&mut group, &rt, in_flight, "postgres", &mut pairs);
            interleaved(&rt, "PostgreSQL", in_flight, calls, &mut pairs, None);
            // A first use whose handler commits an effect, through the whole
            // layer: the fence is one more statement in the handler's
            // transaction.
            for (name, fenced) in [
                ("postgres/effect_unfenced", false),
                ("postgres/effect_fenced", true),
            ] {
                let svc = IdempotencyLayer::new(pg_store.clone()).layer(effect_handler(
                    pool.clone(),
                    pg_store.clone(),
                    fenced,
                ));
                let body = Bytes::from_static(b"{\"amount\":1}");
                group.bench_function(name, |b| {
                    b.iter_custom(|n| {
                        time(&rt, n, in_flight, |_| {
                            let svc = svc.clone();
                            let k = key(fresh.fetch_add(1, Ordering::Relaxed)).to_hex();
                            let request = request(Some(&k), &body);
                            async move {
                                let response = svc.oneshot(request).await.unwrap();
                                // A first use that ran its effect, not a refusal.
                                assert_eq!(response.status(), http::StatusCode::CREATED);
                                drain(response).await;
                            }
                        })
                    })
                });
            }
            if let Ok(nodes) = std::env::var("TEST_REDIS_CLUSTER_URLS") {
                cluster(&mut group, &rt, in_flight, &nodes, &encoded, &key, fresh);
            }
            group.finish();
        }
    }

    /// The same steps on a Redis Cluster, against redis-rs's raw cluster
    /// client doing the same reads and writes, and the cost of waiting for
    /// a replica to acknowledge each write.
    fn cluster(
        group: &mut Group<'_>,
        rt: &tokio::runtime::Runtime,
        in_flight: usize,
        nodes: &str,
        encoded: &Bytes,
        key: &dyn Fn(u64) -> RecordKey,
        fresh: &AtomicU64,
    ) {
        let nodes: Vec<&str> = nodes.split(',').collect();
        let (store, raw) = rt.block_on(async {
            let store = RedisStore::connect_cluster(&nodes)
                .await
                .unwrap()
                .with_prefix("bench:");
            let raw = redis::cluster::ClusterClient::new(nodes.clone())
                .unwrap()
                .get_async_connection()
                .await
                .unwrap();
            (store, raw)
        });
        let acked = store.clone().with_replica_acks(1, Duration::from_secs(1));
        group.bench_function("redis_cluster/first_use_with_replica_acks", |b| {
            b.iter_custom(|n| {
                time(rt, n, in_flight, |_| {
                    let (store, encoded) = (acked.clone(), encoded.clone());
                    let k = key(fresh.fetch_add(1, Ordering::Relaxed));
                    async move { first_use(&store, &k, encoded).await }
                })
            })
        });
        let hot = key(u64::MAX - 1);
        rt.block_on(async {
            store_hot(&store, &hot, encoded).await;
            raw_redis::store_hot(&mut raw.clone(), encoded).await;
        });
        let calls = if in_flight == 1 { 500 } else { 4_000 };
        let mut pairs = redis_pairs(&store, &raw, encoded, key, fresh, hot);
        rows(group, rt, in_flight, "redis_cluster", &mut pairs);
        interleaved(rt, "Redis Cluster", in_flight, calls, &mut pairs, None);
    }
}

mod common;

#[cfg(all(feature = "redis", feature = "postgres"))]
fn stores(c: &mut criterion::Criterion) {
    real::stores(c);
}

#[cfg(not(all(feature = "redis", feature = "postgres")))]
fn stores(_: &mut criterion::Criterion) {
    println!("stores: build with --features redis,postgres,conformance to measure the stores");
}

criterion::criterion_group! {
    name = benches;
    config = criterion::Criterion::default()
        .measurement_time(std::time::Duration::from_secs(3))
        .warm_up_time(std::time::Duration::from_secs(1));
    targets = stores
}
criterion::criterion_main!(benches);
