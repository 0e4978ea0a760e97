//! Where a group's dead letters are kept, on each kind of broker: the one entry point that
//! `oxbus dlq` and `bus.dead_letters` use to read, retry and remove them. The fields they
//! carry and the retried message's body are in [`super::dead`]; each broker's reading and
//! writing in its own `dead` module.

use std::time::Duration;

use super::dead::DeadEntry;
use super::TransportError;

/// Where a group's dead letters are, on each kind of broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A RabbitMQ group: its dead-letter queue (`<queue>.dead`).
    RabbitMq {
        /// The broker.
        url: String,
        /// The dead-letter queue.
        queue: String,
    },
    /// A Redis Streams group: its entries in the dead-letter stream (`<stream>:dead`, which
    /// every group of the stream shares).
    Redis {
        /// The server.
        url: String,
        /// The dead-letter stream.
        stream: String,
        /// The consumer group.
        group: String,
    },
}

impl Place {
    /// Every dead letter there, oldest first (nothing changes).
    ///
    /// # Errors
    /// The broker cannot be reached or does not answer within `timeout`, naming it.
    pub async fn list(&self, timeout: Duration) -> Result<Vec<DeadEntry>, TransportError> {
        match self {
            Self::RabbitMq { url, queue } => super::rabbitmq::dead::list(url, queue, timeout).await,
            Self::Redis { url, stream, group } => {
                super::redis_streams::dead::list(url, stream, group, timeout).await
            }
        }
    }

    /// Sends those of `ids` (`None`: all) back to their group, each for the subscription that
    /// failed only (see [`super::dead::retry_payload`]), and removes them; returns how many.
    ///
    /// # Errors
    /// As [`Place::list`].
    pub async fn retry(
        &self,
        ids: Option<&[String]>,
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        match self {
            Self::RabbitMq { url, queue } => {
                super::rabbitmq::dead::retry(url, queue, ids, timeout).await
            }
            Self::Redis { url, stream, group } => {
                super::redis_streams::dead::retry(url, stream, group, ids, timeout).await
            }
        }
    }

    /// Removes those of `ids` (`None`: all); returns how many.
    ///
    /// # Errors
    /// As [`Place::list`].
    pub async fn remove(
        &self,
        ids: Option<&[String]>,
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        match self {
            Self::RabbitMq { url, queue } => {
                super::rabbitmq::dead::remove(url, queue, ids, timeout).await
            }
            Self::Redis { url, stream, group } => {
                super::redis_streams::dead::remove(url, stream, group, ids, timeout).await
            }
        }
    }
}
