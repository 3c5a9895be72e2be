//! One conformance suite for every transport: the promises written on
//! `skald::transport::Transport`, written once and checked against RabbitMQ and
//! PostgreSQL and Redis (the real servers) and the in-memory transport alike. A new transport
//! (issue #12) gets its harness here and one test at the bottom.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::maybe_done;
use futures_util::stream::BoxStream;
use skald::config::{Config, TransportKind};
use skald::transport::memory::MemoryTransport;
use skald::transport::postgres::PgTransport;
use skald::transport::redis::RedisTransport;
use skald::transport::redis::durability::Durability;
use skald::transport::redis::keys::Keys;
use skald::transport::{Delivery, Endpoint, Transport};

use crate::helpers::{TestEnv, test_sagas};
use crate::redis_server::RedisServer;

/// A transport under test, and how to reach it again after its consumer died.
enum Harness {
    /// A real server, through the transport `SKALD_TRANSPORT` would choose.
    Server(Box<TestEnv>),
    Memory(MemoryTransport),
    /// A private Redis this harness can kill and restart.
    Redis(Box<RedisHarness>),
}

/// A consumer's connections, as [`Harness::connections`] lists them: the server's
/// connection ids, or (Redis) the transport whose leases and connections to end.
struct Connections(Vec<String>, Option<Arc<RedisTransport>>);

/// A private Redis, and every transport opened on it (to kill one).
struct RedisHarness {
    server: Mutex<RedisServer>,
    config: Config,
    opened: Mutex<Vec<Arc<RedisTransport>>>,
}

/// The suite's Redis configuration for the server at `url`, with `more` variables set
/// (or overridden).
fn redis_config(url: String, more: &[(&str, &str)]) -> Config {
    let mut vars = vec![
        ("SKALD_TRANSPORT", "redis".to_string()),
        ("REDIS_URL", url),
        ("SKALD_NAMESPACE", "conformance".into()),
        ("SKALD_PARTITIONS", "4".into()),
        ("SKALD_SUBSCRIBE_STAGGER_MS", "0".into()),
        ("SKALD_PREFETCH", "64".into()),
        // The failover delay: short, so the suite runs quickly.
        ("SKALD_REDIS_LEASE_MS", "1000".into()),
    ];
    vars.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
    Config::from_lookup(|name| {
        vars.iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    })
    .expect("a valid configuration")
}

impl RedisHarness {
    fn new() -> RedisHarness {
        let server = RedisServer::start();
        let config = redis_config(server.url(), &[]);
        RedisHarness {
            server: Mutex::new(server),
            config,
            opened: Mutex::new(Vec::new()),
        }
    }

    /// A new transport on this server for `home`, remembered (to kill it later).
    async fn open(&self, home: Endpoint) -> Arc<dyn Transport> {
        let t = RedisTransport::connect(&self.config, home)
            .await
            .expect("connect");
        self.opened.lock().unwrap().push(t.clone());
        t
    }

    fn find(&self, t: &Arc<dyn Transport>) -> Arc<RedisTransport> {
        let opened = self.opened.lock().unwrap();
        opened
            .iter()
            .find(|o| std::ptr::addr_eq(Arc::as_ptr(o), Arc::as_ptr(t)))
            .expect("a transport this harness opened")
            .clone()
    }
}

impl Harness {
    async fn server(transport: TransportKind) -> Harness {
        Harness::Server(Box::new(TestEnv::on(transport, test_sagas()).await))
    }

    /// A connection (a new one for a server: the old one is what dies).
    async fn open(&self) -> Arc<dyn Transport> {
        match self {
            Harness::Server(env) => skald::transport::connect(&env.config, Endpoint::Orchestrator)
                .await
                .expect("connect"),
            Harness::Memory(t) => Arc::new(t.clone()),
            Harness::Redis(r) => r.open(Endpoint::Orchestrator).await,
        }
    }

    /// A connection whose home is participant service `name`'s endpoint.
    async fn open_service(&self, name: &str) -> Arc<dyn Transport> {
        match self {
            Harness::Server(env) => skald::transport::connect(&env.config, env.service(name))
                .await
                .expect("connect"),
            Harness::Memory(t) => Arc::new(t.endpoint(&Endpoint::Service(name.into()))),
            Harness::Redis(r) => r.open(Endpoint::Service(name.into())).await,
        }
    }

    /// The transport connections open now (to kill later): on Redis, those of the
    /// transport opened last.
    async fn connections(&self) -> Connections {
        match self {
            Harness::Server(env) => Connections(env.transport_connections().await, None),
            Harness::Memory(_) => Connections(Vec::new(), None),
            Harness::Redis(r) => Connections(Vec::new(), r.opened.lock().unwrap().last().cloned()),
        }
    }

    /// Kills `connections` on the server's side: their consumer dies as in a crash.
    async fn kill(&self, connections: Connections) {
        match self {
            Harness::Server(env) => {
                assert!(!connections.0.is_empty(), "a consumer's connection to kill");
                env.kill_transport_connections(&connections.0).await;
            }
            Harness::Memory(t) => t.crash(),
            Harness::Redis(r) => {
                // It stops renewing its leases and its connections are cut
                // (`CLIENT KILL`), as when its process dies.
                let redis = connections.1.expect("a consumer to kill");
                let ids = redis.client_ids().await;
                redis.abandon();
                let server = r.server.lock().unwrap();
                for id in ids {
                    server.cli(&["CLIENT", "KILL", "ID", &id.to_string()]);
                }
            }
        }
    }

    /// Kills the server (SIGKILL) and starts it again, when this harness can: the
    /// shared RabbitMQ and PostgreSQL cannot be restarted under other tests, the
    /// in-memory transport has nothing to restart.
    fn restart_server(&self) {
        if let Harness::Redis(r) = self {
            r.server.lock().unwrap().restart();
        }
    }

    /// Whether a second consumer may subscribe while the first one lives (and wait,
    /// receiving nothing of its keys). The in-memory transport has one consumer.
    fn has_standbys(&self) -> bool {
        !matches!(self, Harness::Memory(_))
    }

    /// Dead letters stored so far.
    async fn dead_letters(&self) -> usize {
        match self {
            Harness::Server(env) => env.dead_letter_depth().await as usize,
            Harness::Memory(t) => t.dead_letters().len(),
            Harness::Redis(r) => {
                let dead = Keys::new(&r.config.namespace, &Endpoint::Orchestrator, 4).dead();
                let server = r.server.lock().unwrap();
                server.cli(&["XLEN", &dead]).parse().expect("a count")
            }
        }
    }

    async fn cleanup(self) {
        if let Harness::Server(env) = self {
            (*env).cleanup().await;
        }
    }
}

/// Up to `n` deliveries from `stream`, waiting at most `within` for each.
async fn take(
    stream: &mut BoxStream<'static, Delivery>,
    n: usize,
    within: Duration,
) -> Vec<Delivery> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(within, stream.next()).await {
            Ok(Some(d)) => got.push(d),
            _ => break,
        }
    }
    got
}

fn bodies(ds: &[Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8_lossy(&d.body).to_string())
        .collect()
}

async fn ack_all(ds: Vec<Delivery>) {
    for d in ds {
        d.ack().await.expect("ack");
    }
}

/// Publishes (confirmed, in order) `n` messages `<prefix><i % keys>:<i>` under the
/// keys `<prefix><i % keys>`.
async fn publish_round_robin(t: &dyn Transport, prefix: &str, keys: usize, n: usize) {
    for i in 0..n {
        let key = format!("{prefix}{}", i % keys);
        t.publish(&key, format!("{key}:{i}").as_bytes(), 0)
            .await
            .expect("confirmed");
    }
}

/// Up to `n` deliveries, each acked as it comes (a consumer holds at most its
/// prefetch unacked): their bodies and redelivered flags.
async fn take_acking(stream: &mut BoxStream<'static, Delivery>, n: usize) -> Vec<(String, bool)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let one = take(stream, 1, WAIT).await;
        got.extend(
            one.iter()
                .map(|d| (String::from_utf8_lossy(&d.body).to_string(), d.redelivered)),
        );
        ack_all(one).await;
    }
    got
}

const WAIT: Duration = Duration::from_secs(10);

/// Fails if less than `delay_ms` passed since `sent`.
fn assert_not_early(sent: Instant, delay_ms: u64) {
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(delay_ms),
        "early: {waited:?}"
    );
}

/// Publishes `<key>0` … `<key><n-1>` under `key`, each confirmed, in order.
async fn publish_numbered(t: &Arc<dyn Transport>, key: &str, n: usize) {
    for i in 0..n {
        t.publish(key, format!("{key}{i}").as_bytes(), 0)
            .await
            .expect("confirmed");
    }
}

/// 1: a confirmed publish is kept, though its publisher goes away before anybody
/// consumes it.
async fn a_confirmed_publish_outlives_its_publisher(h: &Harness) {
    let publisher = h.open().await;
    publisher.publish("z", b"kept", 0).await.expect("confirmed");
    publisher.close().await;
    let t = h.open().await;
    let mut stream = t.consume().await.expect("consume");
    let got = take(&mut stream, 1, WAIT).await;
    assert_eq!(bodies(&got), ["kept"]);
    ack_all(got).await;
    t.close().await;
}

/// 1 and 2: a confirmed publish is delivered; an acked delivery never comes again.
async fn published_messages_are_delivered_and_acked_ones_are_gone(h: &Harness) {
    let t = h.open().await;
    for i in 0..3 {
        t.publish("a", format!("a{i}").as_bytes(), 0)
            .await
            .expect("confirmed");
    }
    let mut stream = t.consume().await.expect("consume");
    let got = take(&mut stream, 3, WAIT).await;
    assert_eq!(bodies(&got), ["a0", "a1", "a2"]);
    assert!(got.iter().all(|d| !d.redelivered));
    ack_all(got).await;
    t.close().await;
    let t = h.open().await;
    let mut stream = t.consume().await.expect("consume");
    assert!(
        take(&mut stream, 1, Duration::from_millis(700))
            .await
            .is_empty(),
        "acked means gone"
    );
    t.close().await;
}

/// 2 and 5: unacked deliveries of a consumer whose connection is killed come again,
/// in order, before anything newer of their key, flagged redelivered; the ack acks
/// exactly one delivery.
async fn a_dead_consumers_unacked_deliveries_come_again_in_order(h: &Harness) {
    let t = h.open().await;
    for i in 0..3 {
        t.publish("b", format!("b{i}").as_bytes(), 0)
            .await
            .expect("confirmed");
    }
    let mut stream = t.consume().await.expect("consume");
    let got = take(&mut stream, 3, WAIT).await;
    assert_eq!(bodies(&got), ["b0", "b1", "b2"]);
    let mut got = got.into_iter();
    let (b0, b1, b2) = (
        got.next().unwrap(),
        got.next().unwrap(),
        got.next().unwrap(),
    );
    b1.ack().await.expect("ack exactly b1");
    let victim = h.connections().await;
    h.kill(victim).await; // the consumer dies with b0 and b2 unacked
    drop((b0, b2, stream, t));
    let t = h.open().await;
    t.publish("b", b"b3", 0).await.expect("confirmed");
    let mut stream = t.consume().await.expect("consume");
    let again = take(&mut stream, 3, WAIT).await;
    assert_eq!(
        bodies(&again),
        ["b0", "b2", "b3"],
        "unacked first, in order; b1 gone"
    );
    assert!(again[0].redelivered && again[1].redelivered);
    ack_all(again).await;
    t.close().await;
}

/// 3: a delayed message is never delivered before its delay.
async fn a_delayed_message_is_never_early(h: &Harness) {
    let t = h.open().await;
    let mut stream = t.consume().await.expect("consume");
    let sent = Instant::now();
    t.publish("c", b"late", 300).await.expect("confirmed");
    expect_delayed(&mut stream, "late", sent, Duration::from_millis(300)).await;
    t.close().await;
}

/// Takes the next delivery, which must be `body` and come no earlier than `delay`
/// after `sent`, and acks it.
async fn expect_delayed(
    stream: &mut BoxStream<'static, Delivery>,
    body: &str,
    sent: Instant,
    delay: Duration,
) {
    let got = take(stream, 1, WAIT).await;
    assert_eq!(bodies(&got), [body]);
    assert!(sent.elapsed() >= delay, "early: {:?}", sent.elapsed());
    ack_all(got).await;
}

/// 3: a delayed message waits durably: its publisher and the consumer go away, and
/// a new consumer still gets it, not before its delay.
async fn a_delayed_message_survives_a_restart_and_is_never_early(h: &Harness) {
    let t = h.open().await;
    let sent = Instant::now();
    t.publish("d", b"after restart", 1_500)
        .await
        .expect("confirmed");
    t.close().await;
    let t = h.open().await;
    let mut stream = t.consume().await.expect("consume");
    expect_delayed(
        &mut stream,
        "after restart",
        sent,
        Duration::from_millis(1_500),
    )
    .await;
    t.close().await;
}

/// 4: a dead letter is stored.
async fn a_dead_letter_is_stored(h: &Harness) {
    let before = h.dead_letters().await;
    let t = h.open().await;
    t.dead_letter(b"poison", "malformed", "not json")
        .await
        .expect("confirmed");
    t.close().await;
    assert_eq!(h.dead_letters().await, before + 1);
}

/// 5: per-key FIFO with several keys interleaved.
async fn each_keys_messages_arrive_in_publish_order(h: &Harness) {
    let t = h.open().await;
    publish_round_robin(t.as_ref(), "k", 3, 30).await;
    let mut stream = t.consume().await.expect("consume");
    let got: Vec<String> = take_acking(&mut stream, 30)
        .await
        .into_iter()
        .map(|(body, _)| body)
        .collect();
    assert_eq!(got.len(), 30);
    for key in ["k0", "k1", "k2"] {
        let seq: Vec<u32> = got
            .iter()
            .filter_map(|b| {
                b.strip_prefix(&format!("{key}:"))
                    .map(|n| n.parse().unwrap())
            })
            .collect();
        let mut sorted = seq.clone();
        sorted.sort();
        assert_eq!(seq, sorted, "{key} in publish order");
    }
    t.close().await;
}

/// 5: publishes of one key in flight together keep the order of the calls, though
/// they are confirmed in any order: 60 are called, each future polled once in call
/// order (as `FuturesUnordered` does), then awaited last first. More than fit in a
/// Redis connection's request queue (50): a publish waiting for room there used to be
/// overtaken by a later one polled first.
async fn publishes_in_flight_together_keep_call_order(h: &Harness) {
    const N: usize = 60;
    let t = h.open().await;
    let sent: Vec<String> = (0..N).map(|i| format!("o{i}")).collect();
    let mut confirms: Vec<_> = sent
        .iter()
        .map(|body| maybe_done(t.publish("o", body.as_bytes(), 0)))
        .collect();
    poll_fn(|cx| {
        for confirm in &mut confirms {
            let _ = Pin::new(confirm).poll(cx);
        }
        Poll::Ready(())
    })
    .await;
    for mut confirm in confirms.into_iter().rev() {
        (&mut confirm).await;
        Pin::new(&mut confirm)
            .take_output()
            .expect("a finished publish")
            .expect("confirmed");
    }
    let mut stream = t.consume().await.expect("consume");
    let got: Vec<String> = take_acking(&mut stream, N)
        .await
        .into_iter()
        .map(|(body, _)| body)
        .collect();
    assert_eq!(got, sent, "in call order");
    t.close().await;
}

/// 5: two consumers and a failover in the middle: while the first lives, the second
/// gets nothing of its keys; when the first is killed, the second gets what it had not
/// acked first, then the rest, each key in publish order.
async fn a_standby_takes_over_a_killed_consumers_keys_in_order(h: &Harness) {
    let t = h.open().await;
    publish_round_robin(t.as_ref(), "f", 2, 10).await;
    let mut first = t.consume().await.expect("consume");
    // Of what the first consumer got, each key's first message is acked; the rest is
    // held, never acked (at least one: four messages of two keys).
    let mut acked: Vec<String> = Vec::new();
    let mut held: Vec<Delivery> = Vec::new();
    for d in take(&mut first, 4, WAIT).await {
        let body = String::from_utf8_lossy(&d.body).to_string();
        if acked.iter().any(|a| a[..2] == body[..2]) {
            held.push(d);
        } else {
            acked.push(body);
            d.ack().await.expect("ack");
        }
    }
    assert_eq!(acked.len() + held.len(), 4);
    let held_keys: Vec<String> = held
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body[..2]).to_string())
        .collect();
    let victim = h.connections().await;

    let standby = h.open().await;
    let mut second = None;
    if h.has_standbys() {
        let mut stream = standby.consume().await.expect("consume");
        assert!(
            take(&mut stream, 1, Duration::from_millis(2_500))
                .await
                .is_empty(),
            "a standby gets nothing of keys another consumer holds"
        );
        second = Some(stream);
    }
    h.kill(victim).await;
    drop((held, first, t));
    let mut second = match second {
        Some(stream) => stream,
        None => standby.consume().await.expect("consume"),
    };
    let rest = take_acking(&mut second, 10 - acked.len()).await;
    for key in ["f0", "f1"] {
        let of_key: Vec<&(String, bool)> =
            rest.iter().filter(|(b, _)| b.starts_with(key)).collect();
        let expected: Vec<String> = (0..10)
            .map(|i| format!("f{}:{i}", i % 2))
            .filter(|b| b.starts_with(key) && !acked.contains(b))
            .collect();
        assert_eq!(
            of_key.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>(),
            expected,
            "{key}: the unacked ones first, then the rest, in publish order"
        );
        if held_keys.iter().any(|k| k == key) {
            assert!(of_key[0].1, "{key}: an unacked one is flagged redelivered");
        }
    }
    standby.close().await;
}

/// Endpoints: a message sent to a service before that service ever ran is kept for it,
/// reaches only its consumer, and its reply reaches skald's intake, both confirmed.
async fn send_to_reaches_only_that_endpoint(h: &Harness) {
    let skald = h.open().await;
    skald
        .send_to(&Endpoint::Service("stock".into()), "e", b"command")
        .await
        .expect("confirmed, though the service never ran");
    let service = h.open_service("stock").await;
    let mut commands = service.consume().await.expect("consume");
    let got = take(&mut commands, 1, WAIT).await;
    assert_eq!(bodies(&got), ["command"]);
    ack_all(got).await;
    service
        .send_to(&Endpoint::Orchestrator, "e", b"reply")
        .await
        .expect("confirmed");
    let mut intake = skald.consume().await.expect("consume");
    let got = take(&mut intake, 2, Duration::from_secs(2)).await;
    assert_eq!(bodies(&got), ["reply"], "the command never reached skald");
    ack_all(got).await;
    service.close().await;
    skald.close().await;
}

/// 1 and 3 through a crash of the server (where the harness can restart it): a delayed
/// message and an unacked delivery survive it; the delay is still never early.
async fn a_delayed_message_and_an_unacked_delivery_survive_a_server_restart(h: &Harness) {
    let t = h.open().await;
    let sent = Instant::now();
    t.publish("r", b"delayed", 1_500).await.expect("confirmed");
    t.publish("r", b"unacked", 0).await.expect("confirmed");
    let mut stream = t.consume().await.expect("consume");
    let got = take(&mut stream, 1, WAIT).await;
    assert_eq!(bodies(&got), ["unacked"]);
    let victim = h.connections().await;
    drop((got, stream));
    h.kill(victim).await;
    drop(t);
    // Without a restart, the rest still holds: the same as a dead consumer.
    h.restart_server();
    let t = h.open().await;
    let mut stream = t.consume().await.expect("consume");
    let got = take(&mut stream, 2, WAIT).await;
    assert_eq!(bodies(&got), ["unacked", "delayed"]);
    assert!(got[0].redelivered);
    assert_not_early(sent, 1_500);
    ack_all(got).await;
    t.close().await;
}

/// The dashboard's queue depths count what waits to be delivered.
async fn queue_depths_count_waiting_messages(h: &Harness) {
    let t = h.open().await;
    let total = |depths: Vec<(String, u32)>| depths.iter().map(|(_, n)| n).sum::<u32>();
    let before = total(t.queue_depths().await.expect("depths"));
    publish_numbered(&t, "q", 2).await;
    assert_eq!(total(t.queue_depths().await.expect("depths")), before + 2);
    let mut stream = t.consume().await.expect("consume");
    let got = take(&mut stream, 2, WAIT).await;
    assert_eq!(bodies(&got), ["q0", "q1"]);
    ack_all(got).await;
    t.close().await;
}

async fn keeps_every_promise(h: &Harness) {
    a_confirmed_publish_outlives_its_publisher(h).await;
    published_messages_are_delivered_and_acked_ones_are_gone(h).await;
    a_dead_consumers_unacked_deliveries_come_again_in_order(h).await;
    a_delayed_message_is_never_early(h).await;
    a_delayed_message_survives_a_restart_and_is_never_early(h).await;
    a_dead_letter_is_stored(h).await;
    each_keys_messages_arrive_in_publish_order(h).await;
    publishes_in_flight_together_keep_call_order(h).await;
    a_standby_takes_over_a_killed_consumers_keys_in_order(h).await;
    send_to_reaches_only_that_endpoint(h).await;
    a_delayed_message_and_an_unacked_delivery_survive_a_server_restart(h).await;
    queue_depths_count_waiting_messages(h).await;
}

#[actix_rt::test]
async fn rabbitmq_keeps_every_transport_promise() {
    let h = Harness::server(TransportKind::RabbitMq).await;
    keeps_every_promise(&h).await;
    h.cleanup().await;
}

#[actix_rt::test]
async fn postgres_keeps_every_transport_promise() {
    let h = Harness::server(TransportKind::Postgres).await;
    keeps_every_promise(&h).await;
    h.cleanup().await;
}

#[actix_rt::test]
async fn the_in_memory_transport_keeps_every_transport_promise() {
    let h = Harness::Memory(MemoryTransport::new());
    keeps_every_promise(&h).await;
    h.cleanup().await;
}

/// Endpoints (PostgreSQL): a command sent to a service before it first starts is kept
/// for it, and only that service's consumer gets it.
#[actix_rt::test]
async fn postgres_keeps_a_command_sent_to_a_service_before_it_starts() {
    let env = TestEnv::on(TransportKind::Postgres, test_sagas()).await;
    let payments = Endpoint::Service("payments".into());
    let skald_side = PgTransport::connect(&env.config, Endpoint::Orchestrator)
        .await
        .expect("connect");
    skald_side
        .send_to(&payments, "order-1", b"charge")
        .await
        .expect("committed");
    let mut intake = skald_side.consume().await.expect("consume");
    assert!(
        take(&mut intake, 1, Duration::from_millis(700))
            .await
            .is_empty(),
        "skald's intake does not get a service's command"
    );
    let service = PgTransport::connect(&env.config, payments)
        .await
        .expect("connect");
    let waiting: u32 = service
        .queue_depths()
        .await
        .expect("depths")
        .iter()
        .filter(|(q, _)| q.starts_with("payments.p."))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(waiting, 1, "kept for the service");
    let mut stream = service.consume().await.expect("consume");
    let got = take(&mut stream, 1, WAIT).await;
    assert_eq!(bodies(&got), ["charge"]);
    ack_all(got).await;
    service.close().await;
    skald_side.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn redis_keeps_every_transport_promise() {
    let h = Harness::Redis(Box::new(RedisHarness::new()));
    keeps_every_promise(&h).await;
    h.cleanup().await;
}

/// On Redis a publish is queued at the call: one called before `close`, its future not
/// yet polled, is still sent; one called after fails at once, saying why.
#[actix_rt::test]
async fn on_redis_a_publish_before_close_is_sent_and_one_after_fails() {
    let h = Harness::Redis(Box::new(RedisHarness::new()));
    let t = h.open().await;
    let before = t.publish("x", b"before", 0);
    t.close().await;
    before.await.expect("sent, though awaited only after close");
    let after = t
        .publish("x", b"after", 0)
        .await
        .expect_err("the transport is closed");
    assert!(after.to_string().contains("closed"), "{after}");
    let t = h.open().await;
    let mut stream = t.consume().await.expect("consume");
    let got = take(&mut stream, 2, Duration::from_millis(1_500)).await;
    assert_eq!(bodies(&got), ["before"]);
    ack_all(got).await;
    t.close().await;
}

/// Fencing: once another consumer holds a partition's lease, the old owner's ack of a
/// delivery from it is refused, and the entry stays with the new owner.
#[actix_rt::test]
async fn on_redis_a_stale_owner_cannot_ack_after_losing_its_lease() {
    let h = Harness::Redis(Box::new(RedisHarness::new()));
    let a = h.open().await;
    a.publish("s", b"s0", 0).await.expect("confirmed");
    let mut from_a = a.consume().await.expect("consume");
    let stale = take(&mut from_a, 1, WAIT).await.pop().expect("s0");
    let Harness::Redis(r) = &h else {
        unreachable!()
    };
    r.find(&a).abandon(); // a pauses: its lease runs out, its connection lives on
    let b = h.open().await;
    let mut from_b = b.consume().await.expect("consume");
    let again = take(&mut from_b, 1, WAIT).await;
    assert_eq!(bodies(&again), ["s0"]);
    let refused = stale
        .ack()
        .await
        .expect_err("a stale owner's ack is fenced");
    assert!(refused.to_string().contains("lease"), "{refused}");
    ack_all(again).await;
    b.close().await;
    assert!(
        take(&mut from_b, 1, Duration::from_millis(300))
            .await
            .is_empty(),
        "acked once, by the owner"
    );
}

/// `skald run` warns when Redis cannot keep what it acknowledged: the machine's shared
/// Redis (no append-only file) is judged at risk, the tests' private one is not.
#[actix_rt::test]
async fn redis_persistence_is_judged_from_the_servers_settings() {
    let h = RedisHarness::new();
    let private = RedisTransport::connect(&h.config, Endpoint::Orchestrator)
        .await
        .expect("connect");
    assert_eq!(private.durability().await, Durability::Kept);
    h.server
        .lock()
        .unwrap()
        .cli(&["CONFIG", "SET", "appendfsync", "everysec"]);
    let judged = private.durability().await;
    assert!(
        matches!(&judged, Durability::AtRisk(why) if why.contains("appendfsync always")),
        "{judged:?}"
    );
    private.close().await;
}

/// The machine's shared Redis keeps no append-only file: `skald run` on it says, at
/// start-up, that acknowledged messages can be lost, and what to set.
#[actix_rt::test]
async fn skald_run_warns_when_redis_cannot_keep_what_it_acknowledged() {
    use std::io::BufRead;
    let env = TestEnv::new(test_sagas()).await;
    let mut child = env
        .skald(&["run"])
        .env("SKALD_TRANSPORT", "redis")
        .env("REDIS_URL", skald::config::DEFAULT_REDIS_URL)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn skald run");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    // The warning comes before `consuming`; either ends the wait.
    let deadline = Instant::now() + Duration::from_secs(60);
    let warning = std::iter::from_fn(|| {
        lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    })
    .find(|l| l.contains("Redis can lose messages it acknowledged") || l.contains("consuming"));
    let _ = child.kill();
    let _ = child.wait();
    skald::transport::redis::delete_namespace(
        skald::config::DEFAULT_REDIS_URL,
        &env.config.namespace,
    )
    .await
    .expect("remove the test's keys");
    env.cleanup().await;
    let warning = warning.expect("skald run logged something");
    assert!(
        warning.contains("Redis can lose messages it acknowledged")
            && warning.contains("set appendonly yes and appendfsync always"),
        "{warning}"
    );
}

/// A lease blip: partition `key`'s lease is held by another consumer for a moment,
/// so this process's ack of a delivery from it is refused; then the lease is this
/// process's again — without the keeper seeing it lapse, as when it was re-taken while
/// the partition's pending entries were being claimed. The entry, still pending, is
/// delivered again (flagged redelivered) and acked once.
#[actix_rt::test]
async fn on_redis_an_ack_refused_after_a_lease_blip_is_delivered_again() {
    let h = Harness::Redis(Box::new(RedisHarness::new()));
    let Harness::Redis(r) = &h else {
        unreachable!()
    };
    let t = h.open().await;
    t.publish("blip", b"blip0", 0).await.expect("confirmed");
    let mut stream = t.consume().await.expect("consume");
    let first = take(&mut stream, 1, WAIT).await.pop().expect("blip0");
    let keys = Keys::new(&r.config.namespace, &Endpoint::Orchestrator, 4);
    let lease = keys.lease(keys.partition_of("blip"));
    let ours = r.server.lock().unwrap().cli(&["GET", &lease]);
    assert!(!ours.is_empty(), "this process holds the lease");

    // Given another consumer holds the lease for a moment
    r.server
        .lock()
        .unwrap()
        .cli(&["SET", &lease, "another-consumer", "PX", "5000"]);
    // when this process acks, its ack is refused
    let refused = first.ack().await.expect_err("fenced");
    assert!(refused.to_string().contains("lease"), "{refused}");
    // and the lease is this process's again.
    r.server
        .lock()
        .unwrap()
        .cli(&["SET", &lease, &ours, "PX", "5000"]);

    // Then the entry comes again, and once acked it is gone.
    let again = take(&mut stream, 1, WAIT).await;
    assert_eq!(
        bodies(&again),
        ["blip0"],
        "the refused entry is delivered again"
    );
    assert!(again[0].redelivered);
    ack_all(again).await;
    assert!(
        take(&mut stream, 1, Duration::from_millis(700))
            .await
            .is_empty(),
        "acked once"
    );
    t.close().await;
}

/// `WAIT`: with `SKALD_REDIS_WAIT_REPLICAS=1` a publish and an ack return once the
/// replica has them, on a primary that keeps nothing on disk (which skald then judges
/// able to keep its promise); with the replica gone, a publish fails as not accepted
/// after `SKALD_REDIS_WAIT_MS`, and the durability check says why.
#[actix_rt::test]
async fn on_redis_writes_wait_for_replicas_and_fail_without_them() {
    let primary = RedisServer::start_with(&["--appendonly", "no"]);
    let replica = primary.replica();
    let config = redis_config(
        primary.url(),
        &[
            ("SKALD_REDIS_WAIT_REPLICAS", "1"),
            ("SKALD_REDIS_WAIT_MS", "400"),
        ],
    );
    let t = RedisTransport::connect(&config, Endpoint::Orchestrator)
        .await
        .expect("connect");
    assert_eq!(t.durability().await, Durability::Kept);
    let keys = Keys::new(&config.namespace, &Endpoint::Orchestrator, 4);
    let stream_of_w = keys.stream(keys.partition_of("w"));

    // A publish returns once the replica has it (read there at once, no waiting).
    t.publish("w", b"w0", 0).await.expect("replicated");
    assert_eq!(replica.cli(&["XLEN", &stream_of_w]), "1");
    // So does an ack: the replica no longer has the entry.
    let mut stream = t.consume().await.expect("consume");
    let got = take(&mut stream, 1, WAIT).await;
    assert_eq!(bodies(&got), ["w0"]);
    ack_all(got).await;
    assert_eq!(replica.cli(&["XLEN", &stream_of_w]), "0");
    // A delayed publish and a dead letter wait too.
    t.publish("w", b"later", 60_000).await.expect("replicated");
    assert_eq!(replica.cli(&["ZCARD", &keys.delayed()]), "1");
    t.dead_letter(b"poison", "malformed", "test")
        .await
        .expect("replicated");
    assert_eq!(replica.cli(&["XLEN", &keys.dead()]), "1");

    // Without the replica, a publish is not accepted, after the wait.
    drop(replica);
    let sent = Instant::now();
    let refused = t
        .publish("w", b"w1", 0)
        .await
        .expect_err("no replica acknowledged it");
    assert!(
        sent.elapsed() >= Duration::from_millis(400),
        "{:?}",
        sent.elapsed()
    );
    assert!(
        matches!(&refused, skald::transport::TransportError::NotAccepted(why)
            if why.contains("only 0 of the 1 replicas")),
        "{refused}"
    );
    let judged = t.durability().await;
    assert!(
        matches!(&judged, Durability::AtRisk(why) if why.contains("1 but 0 replicas")),
        "{judged:?}"
    );
    t.close().await;
}

/// A wrong password is a configuration error, not an outage: connecting fails at once
/// with `Refused`, naming the server and what to change; so does a missing one.
#[actix_rt::test]
async fn on_redis_a_wrong_or_missing_password_is_refused_at_once() {
    let server = RedisServer::start_with(&["--requirepass", "right"]);
    let url = |auth: &str| format!("redis://{auth}127.0.0.1:{}", server.port());
    for (auth, fix) in [
        (":wrong@", "check the user name and password in REDIS_URL"),
        (
            "nobody:right@",
            "check the user name and password in REDIS_URL",
        ),
        ("", "the server requires a password"),
    ] {
        let config = redis_config(url(auth), &[]);
        let started = Instant::now();
        let refused = RedisTransport::connect(&config, Endpoint::Orchestrator)
            .await
            .err()
            .unwrap_or_else(|| panic!("{auth:?} is refused"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not waited for: {:?}",
            started.elapsed()
        );
        assert!(
            matches!(&refused, skald::transport::TransportError::Refused(_)),
            "{auth:?}: {refused:?}"
        );
        let said = refused.to_string();
        let server_named = format!("Redis at 127.0.0.1:{}", server.port());
        assert!(
            said.starts_with("the transport refuses skald's configuration: ")
                && said.contains(&server_named)
                && said.contains(fix),
            "{auth:?}: {said}"
        );
        assert!(!said.contains("right"), "the password is not shown: {said}");
    }
    let config = redis_config(url(":right@"), &[]);
    let t = RedisTransport::connect(&config, Endpoint::Orchestrator)
        .await
        .expect("the right password connects");
    t.close().await;
}

/// `skald run` with a wrong Redis password exits at once with status 1 and one line
/// saying what to change, instead of waiting out `SKALD_STARTUP_TIMEOUT_MS`.
#[actix_rt::test]
async fn skald_run_stops_at_once_when_redis_refuses_its_password() {
    let server = RedisServer::start_with(&["--requirepass", "right"]);
    let env = TestEnv::new(test_sagas()).await;
    let started = Instant::now();
    let mut child = env
        .skald(&["run"])
        .env("SKALD_TRANSPORT", "redis")
        .env(
            "REDIS_URL",
            format!("redis://:wrong@127.0.0.1:{}", server.port()),
        )
        .env("SKALD_STARTUP_TIMEOUT_MS", "60000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn skald run");
    let status = crate::helpers::wait_child(&mut child, Duration::from_secs(30));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !stderr.contains("not reachable yet"),
        "not waited on: {stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("the transport refuses skald's configuration"))
        .unwrap_or_else(|| panic!("the refusal is said: {stderr}"));
    assert!(line.contains("password in REDIS_URL"), "{line}");
    env.cleanup().await;
}
