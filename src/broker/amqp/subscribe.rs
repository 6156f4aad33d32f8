//! Subscribing a group: a channel of its own with the group's prefetch, the
//! topology declared, then a consumer whose deliveries become herald
//! [`Delivery`]s settled through [`AmqpAcker`]. Each subscription owns its
//! channel, so closing it requeues exactly that consumer's unsettled
//! deliveries, and a partitioned subscription's channel consumes only its
//! partition: closing it hands over exactly that partition (a cancelled
//! single-active consumer keeps its successor waiting until its channel closes).

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;

use super::codec::message_from;
use super::connection::{AmqpBroker, Role};
use super::settle::{AckWindow, AmqpAcker, SharedWindow};
use super::topology::{declare_exchange, declare_group, declare_own_partition, Bound, Shape};
use crate::broker::{
    partition_exchange, Delivery, SubscribeSpec, Subscriber, Subscription, SubscriptionControl,
};
use crate::error::BrokerError;

impl Subscriber for AmqpBroker {
    fn subscribe(&self, spec: SubscribeSpec) -> BoxFuture<'_, Result<Subscription, BrokerError>> {
        async move {
            let inner = self.link_for(Role::Consume).await?;
            let channel = inner.connection.create_channel().await?;
            channel
                .basic_qos(spec.prefetch.max(1), BasicQosOptions::default())
                .await?;
            declare_exchange(&inner.connection, &inner.exchange).await?;
            if let Some(partition) = spec.partition {
                partition.check(&spec.queue)?;
            }
            let shape = Shape::of(self.options());
            // The whole group's topology once per connection and group
            // layout; another partition of it then declares its own queue.
            let layout = format!(
                "{:?}",
                (&spec.queue, spec.partition.map(|p| p.count), &spec.bindings, &spec.retry_delays)
            );
            let prepared = inner
                .prepared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&layout);
            let queue = if prepared {
                declare_own_partition(&channel, &spec, shape).await?
            } else {
                let group = Bound::Queue(&spec.queue);
                let exchange = partition_exchange(&spec.queue);
                let hashed = Bound::Exchange(&exchange);
                match spec.partition {
                    Some(partition) => {
                        // The plain queue's record first: it refuses fewer
                        // partitions than before, and herald's keys on the
                        // plain queue are unbound (it stops receiving).
                        let plain = inner
                            .sync_bindings(&channel, group, &[], self, Some(partition.count))
                            .await?;
                        if !plain.bindings.is_empty() {
                            inner.warn_if_plain_holds(&spec.queue).await?;
                        }
                        let queue = declare_group(&inner.connection, &channel, &spec, shape).await?;
                        inner
                            .sync_bindings(&channel, hashed, &spec.bindings, self, None)
                            .await?;
                        inner
                            .prepared
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(layout);
                        queue
                    }
                    None => {
                        let queue = declare_group(&inner.connection, &channel, &spec, shape).await?;
                        let plain = inner
                            .sync_bindings(&channel, group, &spec.bindings, self, None)
                            .await?;
                        if plain.partitions.is_some() {
                            // Partitioned before: the hash exchange stops receiving.
                            inner.sync_bindings(&channel, hashed, &[], self, None).await?;
                            log::warn!(
                                target: "herald::broker",
                                "group={} is no longer partitioned: exchange {exchange} is unbound, \
                                 and its partition queues {}.p* receive nothing more; drain them \
                                 before deleting them",
                                spec.queue,
                                spec.queue
                            );
                        }
                        queue
                    }
                }
            };
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let tag = consumer.tag();
            log::info!(
                target: "herald::broker",
                "consuming queue={} bindings={:?} prefetch={} consumer_tag={}",
                queue,
                spec.bindings,
                spec.prefetch,
                tag
            );
            let broker = self.clone();
            let spec = Arc::new(spec);
            let window = SharedWindow::default();
            let deliveries = consumer
                .map(move |delivery| {
                    let delivery = delivery?;
                    let message = message_from(&delivery);
                    AckWindow::delivered(&window, delivery.delivery_tag);
                    let acker = AmqpAcker {
                        acker: delivery.acker,
                        tag: delivery.delivery_tag,
                        window: window.clone(),
                        broker: broker.clone(),
                        spec: spec.clone(),
                    };
                    Ok(Delivery::new(
                        message,
                        delivery.redelivered,
                        Box::new(acker),
                    ))
                })
                .boxed();
            Ok(Subscription {
                deliveries,
                control: Box::new(AmqpControl { channel, tag }),
            })
        }
        .boxed()
    }

    /// RabbitMQ closes the channel of a publish whose `user_id` is not the
    /// publishing connection's user.
    fn validates_user_ids(&self) -> bool {
        true
    }
}

/// Cancels or closes one subscription's consumer on its own channel.
struct AmqpControl {
    channel: Channel,
    tag: ShortString,
}

impl SubscriptionControl for AmqpControl {
    fn cancel(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            if self.channel.status().connected() {
                self.channel
                    .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
                    .await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        async move {
            if self.channel.status().connected() {
                self.channel.close(200, "closing".into()).await?;
            }
            Ok(())
        }
        .boxed()
    }
}
