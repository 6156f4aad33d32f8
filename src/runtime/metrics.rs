//! Prometheus metrics of one context. Message counters and the handler
//! histogram are updated where things happen; gauges (mailbox depth, outbox,
//! consumer state) and the per-actor counters are read from the live
//! counters when scraped.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::mailbox::ActorSnapshot;
use crate::store::WriterSnapshot;

/// What happened to a delivery, for the message counters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fate {
    Acked,
    Failed,
    Retried,
    DeadLettered,
}

/// Outbox rows by status, read when scraped.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OutboxCounts {
    pub(crate) pending: i64,
    pub(crate) unrouted: i64,
    pub(crate) parked: i64,
}

/// A context's Prometheus metrics: messages by event and outcome, handler
/// durations, mailbox depths, restarts, outbox and REST requests.
pub struct Metrics {
    registry: Registry,
    context: String,
    received: IntCounterVec,
    acked: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    dead_lettered: IntCounterVec,
    untrusted: IntCounterVec,
    handler_seconds: HistogramVec,
    mailbox_depth: IntGaugeVec,
    restarts: IntCounterVec,
    outbox_pending: IntGaugeVec,
    outbox_unrouted: IntGaugeVec,
    outbox_parked: IntGaugeVec,
    publish_failures: IntCounterVec,
    consumer_state: IntGaugeVec,
    http_requests: IntCounterVec,
    db_batches: IntCounterVec,
    db_units: IntCounterVec,
    db_failed_units: IntCounterVec,
    db_largest_batch: IntGaugeVec,
    cache_entries: IntGaugeVec,
    partitions_held: IntGaugeVec,
    partition_instances: IntGaugeVec,
    outbox_listening: IntGaugeVec,
    cache_hits: IntCounterVec,
    cache_misses: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

impl Metrics {
    pub(crate) fn new(context: &str) -> Self {
        let r = Registry::new();
        let by_event = ["context", "event"];
        let handler_seconds = HistogramVec::new(
            HistogramOpts::new(
                "herald_handler_duration_seconds",
                "Handler run time per delivery",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")),
            &by_event,
        )
        .expect("valid metric");
        r.register(Box::new(handler_seconds.clone()))
            .expect("registered once");
        Metrics {
            context: context.to_owned(),
            received: counter(
                &r,
                "herald_messages_received_total",
                "Deliveries taken from the broker",
                &by_event,
            ),
            acked: counter(
                &r,
                "herald_messages_acked_total",
                "Deliveries acked after their handler committed",
                &by_event,
            ),
            failed: counter(
                &r,
                "herald_messages_failed_total",
                "Deliveries whose handler failed",
                &by_event,
            ),
            retried: counter(
                &r,
                "herald_messages_retried_total",
                "Deliveries sent to a retry queue",
                &by_event,
            ),
            dead_lettered: counter(
                &r,
                "herald_messages_dead_lettered_total",
                "Deliveries sent to the dead-letter queue",
                &by_event,
            ),
            untrusted: counter(
                &r,
                "herald_untrusted_producers_total",
                "Deliveries dead-lettered because their publisher is not the event's owner",
                &by_event,
            ),
            handler_seconds,
            mailbox_depth: gauge(
                &r,
                "herald_mailbox_depth",
                "Messages waiting in an actor's mailbox",
                &["actor"],
            ),
            restarts: counter(
                &r,
                "herald_actor_restarts_total",
                "Restarts of an actor by its supervisor",
                &["actor"],
            ),
            outbox_pending: gauge(
                &r,
                "herald_outbox_pending",
                "Outbox rows waiting to be published",
                &["context"],
            ),
            outbox_unrouted: gauge(
                &r,
                "herald_outbox_unrouted",
                "Outbox rows no queue was bound for",
                &["context"],
            ),
            outbox_parked: gauge(
                &r,
                "herald_outbox_parked",
                "Outbox rows parked after the broker kept refusing them",
                &["context"],
            ),
            publish_failures: counter(
                &r,
                "herald_publish_failures_total",
                "Outbox publishes that failed",
                &["context"],
            ),
            consumer_state: gauge(
                &r,
                "herald_consumer_state",
                "1 for the consumer's current state",
                &["context", "state"],
            ),
            http_requests: counter(
                &r,
                "herald_http_requests_total",
                "REST requests by route and status",
                &["route", "status"],
            ),
            db_batches: counter(
                &r,
                "herald_db_batches_total",
                "Transactions of the database writer (one per group commit)",
                &["context"],
            ),
            db_units: counter(
                &r,
                "herald_db_units_total",
                "Units of work (a delivery's or a command's writes) committed in them",
                &["context"],
            ),
            db_failed_units: counter(
                &r,
                "herald_db_failed_units_total",
                "Units rolled back (alone, or with their batch)",
                &["context"],
            ),
            db_largest_batch: gauge(
                &r,
                "herald_db_largest_batch",
                "The most units one transaction committed so far",
                &["context"],
            ),
            cache_entries: gauge(
                &r,
                "herald_aggregate_cache_entries",
                "Aggregates the writer keeps decided in memory",
                &["context"],
            ),
            partitions_held: gauge(
                &r,
                "herald_partitions_held",
                "Partitions this instance consumes (a partitioned context)",
                &["context", "instance"],
            ),
            partition_instances: gauge(
                &r,
                "herald_partition_instances",
                "Instances of the context alive at the last lease round",
                &["context"],
            ),
            outbox_listening: gauge(
                &r,
                "herald_outbox_listening",
                "1 while other instances' outbox announcements reach this relay \
                 (a partitioned context on PostgreSQL), 0 while they cannot",
                &["context"],
            ),
            cache_hits: counter(
                &r,
                "herald_aggregate_cache_hits_total",
                "Commands decided on a cached aggregate",
                &["context"],
            ),
            cache_misses: counter(
                &r,
                "herald_aggregate_cache_misses_total",
                "Commands that loaded their aggregate from the store",
                &["context"],
            ),
            registry: r,
        }
    }

    pub(crate) fn received(&self, event: &str) {
        self.received
            .with_label_values(&[&self.context, event])
            .inc();
    }

    pub(crate) fn settled(&self, event: &str, fate: Fate) {
        let counter = match fate {
            Fate::Acked => &self.acked,
            Fate::Failed => &self.failed,
            Fate::Retried => &self.retried,
            Fate::DeadLettered => &self.dead_lettered,
        };
        counter.with_label_values(&[&self.context, event]).inc();
    }

    /// Counts a delivery refused as published by someone other than its owner.
    pub(crate) fn untrusted(&self, event: &str) {
        self.untrusted
            .with_label_values(&[&self.context, event])
            .inc();
    }

    pub(crate) fn handled(&self, event: &str, seconds: f64) {
        self.handler_seconds
            .with_label_values(&[&self.context, event])
            .observe(seconds);
    }

    /// Counts one REST request (`route` is the matched pattern, not the path).
    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// The Prometheus text exposition, with the gauges read now.
    pub(crate) fn render(
        &self,
        actors: &[ActorSnapshot],
        outbox: Option<OutboxCounts>,
        writer: Option<WriterSnapshot>,
        consumer: &str,
        publish_failures: u64,
        partitions: Option<&super::context::PartitionsView>,
    ) -> String {
        if let Some(view) = partitions {
            let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.partitions_held
                .with_label_values(&[&self.context, &view.instance])
                .set(count(view.held.len()));
            self.partition_instances
                .with_label_values(&[&self.context])
                .set(count(view.live_instances));
            if let Some(listening) = view.listening {
                self.outbox_listening
                    .with_label_values(&[&self.context])
                    .set(i64::from(listening));
            }
        }
        if let Some(writer) = writer {
            let total = |counter: &IntCounterVec, value: u64| {
                let counter = counter.with_label_values(&[&self.context]);
                counter.inc_by(value.saturating_sub(counter.get()));
            };
            total(&self.db_batches, writer.batches);
            total(&self.db_units, writer.units);
            total(&self.db_failed_units, writer.failed_units);
            total(&self.cache_hits, writer.cache.hits);
            total(&self.cache_misses, writer.cache.misses);
            self.db_largest_batch
                .with_label_values(&[&self.context])
                .set(i64::try_from(writer.largest_batch).unwrap_or(i64::MAX));
            self.cache_entries
                .with_label_values(&[&self.context])
                .set(i64::try_from(writer.cache.entries).unwrap_or(i64::MAX));
        }
        for actor in actors {
            let depth = i64::try_from(actor.depth).unwrap_or(i64::MAX);
            self.mailbox_depth
                .with_label_values(&[&actor.name])
                .set(depth);
            let restarts = self.restarts.with_label_values(&[&actor.name]);
            restarts.inc_by(actor.restarts.saturating_sub(restarts.get()));
        }
        if let Some(counts) = outbox {
            self.outbox_pending
                .with_label_values(&[&self.context])
                .set(counts.pending);
            self.outbox_unrouted
                .with_label_values(&[&self.context])
                .set(counts.unrouted);
            self.outbox_parked
                .with_label_values(&[&self.context])
                .set(counts.parked);
        }
        let failures = self.publish_failures.with_label_values(&[&self.context]);
        failures.inc_by(publish_failures.saturating_sub(failures.get()));
        for state in ["consuming", "paused", "reconnecting"] {
            self.consumer_state
                .with_label_values(&[&self.context, state])
                .set(i64::from(state == consumer));
        }
        let mut text = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut text);
        String::from_utf8(text).unwrap_or_default()
    }
}
