//! The `PyO3` layer: the `oxbus._oxbus` module. Thin wrappers that convert and delegate to the
//! engine in `crate::core`; the public API is the Python package `oxbus`.

mod bus;
mod completion;
mod context;
mod envelope;
mod errors;
mod events;
mod futures;
mod json;
mod publish;
mod retry;
mod route;
mod runtime;
mod store;
mod sync;
mod transport;
mod wake;
mod worker;

use pyo3::prelude::*;

/// The native half of oxbus. Import `oxbus`, not this module.
#[pymodule]
mod _oxbus {
    use pyo3::prelude::*;

    #[pymodule_export]
    use super::bus::PyBusCore;
    #[pymodule_export]
    use super::completion::{await_probe, PyResolver};
    #[pymodule_export]
    use super::envelope::{current_envelope, new_event_id, PyEnvelope};
    #[pymodule_export]
    use super::json::{decode_json, encode_json};
    #[pymodule_export]
    use super::publish::{publisher, publishing, PyPublish};
    #[pymodule_export]
    use super::retry::PyRetryPolicy;
    #[pymodule_export]
    use super::store::{PyFlusher, PyStoreCore, PyTurnEnd};
    #[pymodule_export]
    use super::transport::{PyAmqpBridgeCore, PyBridgeCore, PyTransportCore};
    #[pymodule_export]
    use super::worker::PyWorker;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        super::sync::require_gil(m.py())?;
        super::publish::install_slots(m.py())?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        super::runtime::register(m)
    }
}
