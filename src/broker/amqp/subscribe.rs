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
use super::topology::{declare_exchange, declare_group, Bound, Shape};
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
            inner.refuse_shrinking(&spec).await?;
            let shape = Shape::of(self.options());
            let queue = declare_group(&inner.connection, &channel, &spec, shape).await?;
            let exchange = partition_exchange(&spec.queue);
            let bound = match spec.partition {
                None => Bound::Queue(&spec.queue),
                Some(_) => Bound::Exchange(&exchange),
            };
            inner
                .sync_bindings(&channel, bound, &spec.bindings, self)
                .await?;
            inner.retire(&spec, self).await?;
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
