//! One mapping from engine errors to the exceptions of `oxbus.errors`: every `From<...> for
//! PyErr` of the engine's error types is here, and nowhere else.
//!
//! The exception classes are defined in Python (`python/oxbus/errors.py`) so they can also
//! inherit what drop-in users already catch (`RuntimeError`, `asyncio.QueueFull`, `TypeError`,
//! `ValueError`); this module looks each up once and raises it.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::core::CoreError;
use crate::store::StoreError;
use crate::transport::TransportError;

macro_rules! oxbus_error {
    ($fn_name:ident, $class:literal) => {
        #[doc = concat!("`oxbus.errors.", $class, "` with a message.")]
        pub fn $fn_name(msg: impl Into<String>) -> PyErr {
            static CELL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            let msg: String = msg.into();
            Python::attach(|py| match CELL.import(py, "oxbus.errors", $class) {
                Ok(cls) => PyErr::from_type(cls.clone(), msg),
                Err(e) => e,
            })
        }
    };
}

oxbus_error!(oxbus_error, "OxbusError");
oxbus_error!(bus_not_started, "BusNotStarted");
oxbus_error!(bus_closed, "BusClosed");
oxbus_error!(queue_full, "QueueFull");
oxbus_error!(invalid_event, "InvalidEvent");
oxbus_error!(invalid_subscription, "InvalidSubscription");
oxbus_error!(configuration_error, "ConfigurationError");
oxbus_error!(concurrency_error, "ConcurrencyError");
oxbus_error!(storage_error, "StorageError");
oxbus_error!(transport_error, "TransportError");
oxbus_error!(serialization_error, "SerializationError");

/// Whether `err` says the bus is not running (`BusClosed` or `BusNotStarted`).
pub fn is_bus_closed(py: Python<'_>, err: &PyErr) -> bool {
    ["BusClosed", "BusNotStarted"].iter().any(|name| {
        py.import("oxbus.errors")
            .and_then(|m| m.getattr(*name))
            .is_ok_and(|cls| err.is_instance(py, &cls))
    })
}

/// Maps an engine error (of the core, the store or a transport) to its Python exception.
pub fn to_py<E>(e: &E) -> PyErr
where
    for<'a> &'a E: Into<PyErr>,
{
    e.into()
}

impl From<&CoreError> for PyErr {
    fn from(e: &CoreError) -> Self {
        match e {
            CoreError::InvalidSetting { .. } => configuration_error(e.to_string()),
            CoreError::InvalidPattern { .. } => invalid_subscription(e.to_string()),
            CoreError::QueueFull { .. } => queue_full(e.to_string()),
            CoreError::NotStarted => bus_not_started(e.to_string()),
            CoreError::Closed { .. } => bus_closed(e.to_string()),
        }
    }
}

impl From<&StoreError> for PyErr {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::Concurrency { .. } => concurrency_error(e.to_string()),
            StoreError::Invalid(_)
            | StoreError::Sqlite { .. }
            | StoreError::Closed(_)
            | StoreError::Detached(_) => storage_error(e.to_string()),
        }
    }
}

impl From<&TransportError> for PyErr {
    fn from(e: &TransportError) -> Self {
        match e {
            TransportError::Invalid(_) => configuration_error(e.to_string()),
            TransportError::Broker { .. } | TransportError::Stopped(_) => {
                transport_error(e.to_string())
            }
        }
    }
}

macro_rules! by_value {
    ($($t:ty),*) => {$(
        impl From<$t> for PyErr {
            fn from(e: $t) -> Self {
                (&e).into()
            }
        }
    )*};
}

by_value!(CoreError, StoreError, TransportError);

/// A `ConfigurationError` for setting `name`, which must be `rule`, given `value`.
pub fn invalid_setting(name: &'static str, rule: &'static str, value: &impl ToString) -> PyErr {
    to_py(&CoreError::InvalidSetting {
        name,
        rule,
        value: value.to_string(),
    })
}
