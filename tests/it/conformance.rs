//! One conformance suite for every transport: the promises written on
//! `skald::transport::Transport`, checked against RabbitMQ (the real broker) and the
//! in-memory transport alike. A new transport (issue #12) gets its harness here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use skald::transport::memory::MemoryTransport;
use skald::transport::rabbitmq::RabbitTransport;
use skald::transport::{Delivery, Endpoint, Transport};

use crate::helpers::{TestEnv, test_sagas};

/// A transport under test, and how to reach it again after its consumer died.
enum Harness {
    Rabbit(Box<TestEnv>),
    Memory(MemoryTransport),
}

impl Harness {
    /// A connection (a new one for RabbitMQ: the old one is what dies).
    async fn open(&self) -> Arc<dyn Transport> {
        match self {
            Harness::Rabbit(env) => RabbitTransport::connect(&env.config)
                .await
                .expect("connect"),
            Harness::Memory(t) => Arc::new(t.clone()),
        }
    }

    /// A connection whose home is participant service `name`'s endpoint.
    async fn open_service(&self, name: &str) -> Arc<dyn Transport> {
        match self {
            Harness::Rabbit(env) => RabbitTransport::connect_as(&env.config, env.service(name))
                .await
                .expect("connect"),
            Harness::Memory(t) => Arc::new(t.endpoint(&Endpoint::Service(name.into()))),
        }
    }

    /// Dead letters stored so far.
    async fn dead_letters(&self) -> usize {
        match self {
            Harness::Rabbit(env) => env.queue_depth(&env.topology().dead_queue).await as usize,
            Harness::Memory(t) => t.dead_letters().len(),
        }
    }

    async fn cleanup(self) {
        if let Harness::Rabbit(env) = self {
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

const WAIT: Duration = Duration::from_secs(10);

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

/// 2 and 5: unacked deliveries of a consumer that dies come again, in order, before
/// anything newer of their key, flagged redelivered; the ack acks exactly one delivery.
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
    drop((b0, b2));
    t.close().await; // the consumer dies with b0 and b2 unacked
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
    let got = take(&mut stream, 1, WAIT).await;
    assert_eq!(bodies(&got), ["late"]);
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "early: {:?}",
        sent.elapsed()
    );
    ack_all(got).await;
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
    for i in 0..30 {
        let key = format!("k{}", i % 3);
        t.publish(&key, format!("{key}:{i}").as_bytes(), 0)
            .await
            .expect("confirmed");
    }
    let mut stream = t.consume().await.expect("consume");
    // Acked as they come: a consumer holds at most its prefetch unacked.
    let mut got = Vec::new();
    for _ in 0..30 {
        let one = take(&mut stream, 1, WAIT).await;
        got.extend(bodies(&one));
        ack_all(one).await;
    }
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

async fn keeps_every_promise(h: &Harness) {
    published_messages_are_delivered_and_acked_ones_are_gone(h).await;
    a_dead_consumers_unacked_deliveries_come_again_in_order(h).await;
    a_delayed_message_is_never_early(h).await;
    a_dead_letter_is_stored(h).await;
    each_keys_messages_arrive_in_publish_order(h).await;
    send_to_reaches_only_that_endpoint(h).await;
}

#[actix_rt::test]
async fn rabbitmq_keeps_every_transport_promise() {
    let h = Harness::Rabbit(Box::new(TestEnv::new(test_sagas()).await));
    keeps_every_promise(&h).await;
    h.cleanup().await;
}

#[actix_rt::test]
async fn the_in_memory_transport_keeps_every_transport_promise() {
    let h = Harness::Memory(MemoryTransport::new());
    keeps_every_promise(&h).await;
    h.cleanup().await;
}
