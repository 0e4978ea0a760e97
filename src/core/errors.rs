//! The engine's errors. Every message names the offending value.

/// What can go wrong inside the engine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    /// A configuration number out of range.
    #[error("{name} must be {rule}, got {value}")]
    InvalidSetting {
        /// The keyword as the user typed it.
        name: &'static str,
        /// What it must be, e.g. ">= 1".
        rule: &'static str,
        /// What was given.
        value: String,
    },
    /// A routing pattern that is not a dotted topic.
    #[error("invalid event type pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The bus was used before it was started.
    #[error("the bus is not started: call `await bus.start()` (or use `async with bus:`) before publishing")]
    NotStarted,
    /// The bus is stopping or stopped.
    #[error("{}", if *stopping { "the bus is stopping: publishing during `stop()` is refused so no event is silently lost" } else { "the bus is stopped: publishing after `stop()` is refused so no event is silently lost" })]
    Closed {
        /// Whether `stop()` is still draining.
        stopping: bool,
    },
    /// The queue holds `capacity` events already.
    #[error("the bus queue is full ({capacity} events queued, max_queue_size={capacity})")]
    QueueFull {
        /// The configured `max_queue_size`.
        capacity: usize,
    },
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, CoreError>;
