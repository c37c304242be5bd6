//! Drains the [`Outbox`] over MQTT: QoS 1 `Up::Telemetry` batches on
//! `edgefleet/v1/devices/{id}/up/telemetry`, oldest first, one batch in flight.
//!
//! # The hook the MQTT module provides
//!
//! The publisher publishes through a `rumqttc::AsyncClient` but does not poll
//! the event loop. Whoever polls it calls [`forward_event`] for every `Ok(event)`
//! and [`forward_disconnected`] for every `Err(_)` of `EventLoop::poll`; both
//! are non-blocking `try_send`s into a bounded tokio channel whose receiver is
//! given to [`Publisher::new`]:
//!
//! ```ignore
//! let (link_tx, link_rx) = tokio::sync::mpsc::channel(telemetry::publisher::LINK_CHANNEL_CAPACITY);
//! // in the mqtt task:
//! match eventloop.poll().await {
//!     Ok(ev) => { telemetry::forward_event(&ev, &link_tx); /* own handling */ }
//!     Err(e) => { telemetry::publisher::forward_disconnected(&link_tx); /* backoff */ }
//! }
//! ```
//!
//! [`LinkEvent`]s: `Connected` (ConnAck), `Disconnected`, `Sent(pkid)` (an
//! outgoing QoS 1/2 publish) and `PubAck(pkid)`.
//!
//! # Delivery rule
//!
//! A batch's records are deleted from the outbox only after the broker's
//! PubAck for the publish that carried it. rumqttc does not return the packet
//! id from `publish`, so the publisher takes as its own the first `Sent(pkid)`
//! seen after it enqueued the batch (requests are handled in FIFO order, and
//! it enqueues only while connected, with nothing of its own in flight). This
//! is exact when the client carries no other QoS >= 1 publishes — use
//! [`spawn_connection`] for a dedicated telemetry connection (recommended;
//! it also keeps a telemetry backlog from delaying update traffic). On a
//! shared connection another module's publish may be taken for ours; the
//! batch is then acknowledged early, but rumqttc still retransmits our
//! publish from its pending queue after a reconnect, so it can be lost only if
//! the process dies in that window. If no PubAck arrives within
//! `ack_timeout` the batch is published again (QoS 1 allows duplicates;
//! receivers de-duplicate by `seq`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgefleet_protocol::messages::{TelemetryBatch, Up};
use edgefleet_protocol::topics::{self, UpKind};
use edgefleet_protocol::{DeviceId, MAX_MESSAGE_BYTES};
use rand::Rng as _;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Error, Outbox};

/// Suggested capacity of the link-event channel (events are a few bytes).
pub const LINK_CHANNEL_CAPACITY: usize = 1024;

/// What the MQTT module tells the publisher about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// A ConnAck was received (the connection is usable).
    Connected {
        /// The broker resumed a previous session.
        session_present: bool,
    },
    /// The event loop returned an error; it will reconnect.
    Disconnected,
    /// An outgoing QoS 1/2 publish with this packet id was written.
    Sent(u16),
    /// The broker acknowledged the QoS 1 publish with this packet id.
    PubAck(u16),
}

/// Maps an event-loop event to a [`LinkEvent`] and sends it without blocking.
/// If the channel is full the event is dropped; the publisher then recovers
/// through its ack timeout.
pub fn forward_event(event: &Event, tx: &mpsc::Sender<LinkEvent>) {
    let ev = match event {
        Event::Incoming(Packet::ConnAck(ca)) => LinkEvent::Connected {
            session_present: ca.session_present,
        },
        Event::Incoming(Packet::PubAck(pa)) => LinkEvent::PubAck(pa.pkid),
        Event::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0 => LinkEvent::Sent(*pkid),
        _ => return,
    };
    let _ = tx.try_send(ev);
}

/// Tells the publisher that `EventLoop::poll` returned an error.
pub fn forward_disconnected(tx: &mpsc::Sender<LinkEvent>) {
    let _ = tx.try_send(LinkEvent::Disconnected);
}

/// Jittered exponential reconnect backoff ("full jitter": a uniform delay in
/// `[0, min(max, initial * 2^attempt)]`), so a fleet that lost its broker does
/// not reconnect in lock step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    /// 500 ms doubling up to 30 s (docs/specs/mqtt.md).
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before reconnect attempt `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceil = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let ms = u64::try_from(ceil.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
    }
}

/// Starts a dedicated MQTT connection for telemetry: a task polls the event
/// loop, forwards [`LinkEvent`]s, and reconnects with [`Backoff`] after errors.
/// TCP_NODELAY is set here (QoS 1 throughput collapses without it); the
/// caller sets the maximum packet size
/// ([`edgefleet_protocol::MQTT_MAX_PACKET_BYTES`]), keep-alive and credentials on `opts`.
/// The task ends when every `AsyncClient` clone and the returned receiver are dropped.
pub fn spawn_connection(
    opts: MqttOptions,
    backoff: Backoff,
) -> (AsyncClient, mpsc::Receiver<LinkEvent>, JoinHandle<()>) {
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, rx) = mpsc::channel(LINK_CHANNEL_CAPACITY);
    let task = tokio::spawn(drive(eventloop, tx, backoff));
    (client, rx, task)
}

async fn drive(mut eventloop: EventLoop, tx: mpsc::Sender<LinkEvent>, backoff: Backoff) {
    let mut attempt = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(ev) => {
                if matches!(ev, Event::Incoming(Packet::ConnAck(_))) {
                    attempt = 0;
                }
                forward_event(&ev, &tx);
            }
            Err(e) => {
                if tx.is_closed() {
                    return;
                }
                tracing::debug!(error = %e, attempt, "telemetry mqtt connection error");
                forward_disconnected(&tx);
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The device whose topic and `device_id` the batches carry.
    pub device_id: DeviceId,
    /// Most records in one batch.
    pub max_batch_records: usize,
    /// Most bytes of one encoded batch message; capped at
    /// [`edgefleet_protocol::MAX_MESSAGE_BYTES`].
    pub max_batch_bytes: usize,
    /// Republish a batch if its PubAck has not arrived after this long.
    pub ack_timeout: Duration,
}

impl PublisherConfig {
    /// Defaults for `device_id`: 500 records, 256 KiB, 30 s ack timeout.
    pub fn new(device_id: DeviceId) -> Self {
        PublisherConfig {
            device_id,
            max_batch_records: 500,
            max_batch_bytes: 256 * 1024,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of a running publisher (shared, lock-free).
#[derive(Debug, Default)]
pub struct PublisherCounters {
    /// Records acknowledged by the broker and deleted from the outbox.
    pub delivered_records: AtomicU64,
    /// Batches acknowledged.
    pub delivered_batches: AtomicU64,
    /// Batches published again after an ack timeout.
    pub republished_batches: AtomicU64,
}

/// The outbox-draining loop.
pub struct Publisher {
    outbox: Arc<Outbox>,
    client: AsyncClient,
    link: mpsc::Receiver<LinkEvent>,
    cfg: PublisherConfig,
    topic: String,
    connected: bool,
    counters: Arc<PublisherCounters>,
}

impl Publisher {
    /// A publisher that is not yet connected: it publishes after the first
    /// [`LinkEvent::Connected`]. Pass `assume_connected` via
    /// [`Publisher::with_connected`] if the client was already connected when
    /// the hook was installed.
    pub fn new(
        outbox: Arc<Outbox>,
        client: AsyncClient,
        link: mpsc::Receiver<LinkEvent>,
        cfg: PublisherConfig,
    ) -> Self {
        let topic = topics::up(&cfg.device_id, UpKind::Telemetry);
        Publisher {
            outbox,
            client,
            link,
            cfg,
            topic,
            connected: false,
            counters: Arc::default(),
        }
    }

    /// Sets whether the connection is currently up.
    pub fn with_connected(mut self, connected: bool) -> Self {
        self.connected = connected;
        self
    }

    /// The counters, to read while [`Publisher::run`] runs.
    pub fn counters(&self) -> Arc<PublisherCounters> {
        Arc::clone(&self.counters)
    }

    /// The telemetry topic of this device.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected { .. } => self.connected = true,
            LinkEvent::Disconnected => self.connected = false,
            LinkEvent::Sent(_) | LinkEvent::PubAck(_) => {}
        }
    }

    /// The next batch: oldest records, within the record and byte limits.
    fn next_batch(&self) -> Result<Option<(u64, Vec<u8>)>, Error> {
        let mut records = self.outbox.peek(self.cfg.max_batch_records.max(1))?;
        let limit = self.cfg.max_batch_bytes.clamp(1024, MAX_MESSAGE_BYTES);
        loop {
            let Some(last) = records.last().map(|r| r.seq) else {
                return Ok(None);
            };
            let n = records.len();
            let msg = Up::Telemetry(TelemetryBatch {
                device_id: self.cfg.device_id.clone(),
                records,
            });
            match msg.encode() {
                Ok(bytes) if bytes.len() <= limit || n == 1 => return Ok(Some((last, bytes))),
                Ok(_) | Err(edgefleet_protocol::Error::TooLarge { .. }) if n > 1 => {
                    let Up::Telemetry(b) = msg else {
                        return Ok(None);
                    };
                    records = b.records;
                    records.truncate(n / 2);
                }
                Ok(_) => return Ok(None),
                Err(source) => {
                    return Err(Error::Message {
                        topic: self.topic.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Runs until `shutdown` resolves (then returns `Ok`) or the link channel
    /// closes ([`Error::LinkClosed`]). Outbox errors are logged and retried
    /// after a second; they do not stop the loop.
    ///
    /// # Errors
    /// [`Error::LinkClosed`]; [`Error::Publish`] when the client's event loop is gone.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        loop {
            // Process what is already queued (stale Sent/PubAck from earlier
            // retransmissions must not be taken for the next batch's).
            while let Ok(ev) = self.link.try_recv() {
                self.on_link(ev);
            }
            if !self.connected {
                tokio::select! {
                    ev = self.link.recv() => self.on_link(ev.ok_or(Error::LinkClosed)?),
                    () = &mut shutdown => return Ok(()),
                }
                continue;
            }
            let batch = match self.next_batch() {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "telemetry outbox read failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = &mut shutdown => return Ok(()),
                    }
                    continue;
                }
            };
            let Some((last_seq, bytes)) = batch else {
                tokio::select! {
                    () = self.outbox.notified() => {}
                    ev = self.link.recv() => self.on_link(ev.ok_or(Error::LinkClosed)?),
                    // Design: a missed notification (append before we started
                    // waiting) costs at most this long.
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = &mut shutdown => return Ok(()),
                }
                continue;
            };
            self.client
                .publish(self.topic.clone(), QoS::AtLeastOnce, false, bytes)
                .await
                .map_err(|e| Error::Publish {
                    topic: self.topic.clone(),
                    source: Box::new(e),
                })?;
            let deadline = tokio::time::Instant::now() + self.cfg.ack_timeout;
            let mut pkid: Option<u16> = None;
            let acked = loop {
                tokio::select! {
                    ev = self.link.recv() => match ev.ok_or(Error::LinkClosed)? {
                        LinkEvent::Sent(p) => { pkid.get_or_insert(p); }
                        LinkEvent::PubAck(p) if Some(p) == pkid => break true,
                        // rumqttc keeps unacknowledged publishes and resends
                        // them (same pkid) after reconnecting: keep waiting.
                        other => self.on_link(other),
                    },
                    () = tokio::time::sleep_until(deadline) => break false,
                    () = &mut shutdown => return Ok(()),
                }
            };
            if acked {
                match self.outbox.ack(last_seq) {
                    Ok(n) => {
                        self.counters
                            .delivered_records
                            .fetch_add(n, Ordering::Relaxed);
                        self.counters
                            .delivered_batches
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, last_seq, "telemetry outbox ack failed; batch will be sent again")
                    }
                }
            } else {
                tracing::debug!(
                    last_seq,
                    ?pkid,
                    "telemetry batch not acknowledged in time; publishing again"
                );
                self.counters
                    .republished_batches
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            assert!(d <= Duration::from_secs(2));
            if attempt == 0 {
                assert!(d <= Duration::from_millis(100));
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| b.delay(10)).collect();
        assert!(spread.len() > 10, "delays are jittered");
    }

    #[test]
    fn forward_maps_events() {
        let (tx, mut rx) = mpsc::channel(8);
        forward_event(&Event::Outgoing(Outgoing::Publish(0)), &tx);
        forward_event(&Event::Outgoing(Outgoing::Publish(7)), &tx);
        forward_event(
            &Event::Incoming(Packet::PubAck(rumqttc::PubAck::new(7))),
            &tx,
        );
        forward_event(
            &Event::Incoming(Packet::ConnAck(rumqttc::ConnAck::new(
                rumqttc::ConnectReturnCode::Success,
                true,
            ))),
            &tx,
        );
        forward_disconnected(&tx);
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            vec![
                LinkEvent::Sent(7),
                LinkEvent::PubAck(7),
                LinkEvent::Connected {
                    session_present: true
                },
                LinkEvent::Disconnected
            ]
        );
    }
}
