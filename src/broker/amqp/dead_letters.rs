//! A group's dead-letter queue as an operator sees it: listing, redriving
//! and purging. Each operation works on a channel of its own, so letters it
//! holds unacked go back to the queue, in order, when that channel closes.

use futures_util::future::{BoxFuture, FutureExt};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};

use super::codec::message_from;
use super::connection::AmqpBroker;
use crate::broker::{
    dead_letter_queue, partition_exchange, redriven, DeadLetters, GroupLayout, Listing,
    ListingBounds, Message,
};
use crate::error::BrokerError;

impl DeadLetters for AmqpBroker {
    /// lapin hands over each letter whole (`basic_get` assembles the body,
    /// and tells how many letters are left): each is cut at once and its
    /// whole body dropped before the next is fetched, and none is fetched
    /// once the letters fetched (bodies, headers, properties) reach the
    /// bound. At most one whole body is in memory at a time.
    fn list_bounded(
        &self,
        queue: &str,
        bounds: ListingBounds,
    ) -> BoxFuture<'_, Result<Listing, BrokerError>> {
        let dlq = dead_letter_queue(queue);
        async move {
            let channel = self.inspection_channel().await?;
            let mut listing = Listing::default();
            // Held unacked, then all requeued together, as in `list`.
            while listing.wants_more(&bounds) {
                let got = channel
                    .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                    .await?;
                let Some(mut letter) = got else { break };
                let left = usize::try_from(letter.message_count).unwrap_or(usize::MAX);
                // The whole body is moved, not copied; `keep` cuts it in place.
                let body = std::mem::take(&mut letter.delivery.data);
                let mut message = message_from(&letter.delivery);
                message.body = body;
                listing.keep(message, left, &bounds);
            }
            channel.close(200, "listed".into()).await?;
            Ok(listing)
        }
        .boxed()
    }

    fn list(&self, queue: &str, limit: usize) -> BoxFuture<'_, Result<Vec<Message>, BrokerError>> {
        let dlq = dead_letter_queue(queue);
        async move {
            let channel = self.inspection_channel().await?;
            let mut letters = Vec::new();
            // Held unacked, then all requeued together: nothing is lost and the
            // broker puts them back in their order.
            while letters.len() < limit {
                let got = channel
                    .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                    .await?;
                match got {
                    Some(letter) => letters.push(message_from(&letter.delivery)),
                    None => break,
                }
            }
            channel.close(200, "listed".into()).await?;
            Ok(letters)
        }
        .boxed()
    }

    fn redrive<'a>(
        &'a self,
        queue: &'a str,
        layout: GroupLayout,
        message_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, BrokerError>> {
        async move {
            let dlq = dead_letter_queue(queue);
            let exchange = partition_exchange(queue);
            // Only the letters there now: one that fails again comes back at the
            // tail and must not be redriven in a loop.
            let present = self.queue_depth(&dlq).await?;
            let channel = self.inspection_channel().await?;
            let mut moved = 0;
            for _ in 0..present {
                let Some(letter) = channel
                    .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                    .await?
                else {
                    break;
                };
                let message = message_from(&letter.delivery);
                if message_id.is_some() && message.message_id.as_deref() != message_id {
                    continue; // stays unacked: requeued when the channel closes
                }
                // Into the queue (or the partitions) first, then off the
                // dead-letter queue.
                let again = redriven(message);
                match layout {
                    GroupLayout::Plain => self.send_to_queue(queue, &again).await?,
                    GroupLayout::Partitioned => self.send_to_exchange(&exchange, &again).await?,
                }
                letter
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await?;
                moved += 1;
            }
            channel.close(200, "redriven".into()).await?;
            Ok(moved)
        }
        .boxed()
    }

    fn purge(&self, queue: &str) -> BoxFuture<'_, Result<usize, BrokerError>> {
        let dlq = dead_letter_queue(queue);
        async move {
            let channel = self.inspection_channel().await?;
            let purged = channel
                .queue_purge(dlq.as_str().into(), QueuePurgeOptions::default())
                .await?;
            channel.close(200, "purged".into()).await?;
            Ok(purged as usize)
        }
        .boxed()
    }
}
