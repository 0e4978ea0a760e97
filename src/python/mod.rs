//! The `PyO3` layer: the `oxbus._oxbus` module. Thin wrappers that convert and delegate to the
//! engine in `crate::core`; the public API is the Python package `oxbus`.

mod bus;
mod completion;
mod envelope;
mod errors;
mod events;
mod json;
mod runtime;
mod store;
mod sync;
mod transport;
mod worker;

use pyo3::prelude::*;

/// The native half of oxbus. Import `oxbus`, not this module.
#[pymodule]
fn _oxbus(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<bus::PyBusCore>()?;
    m.add_class::<worker::PyWorker>()?;
    m.add_class::<envelope::PyEnvelope>()?;
    m.add_class::<bus::PyRetryPolicy>()?;
    m.add_class::<store::PyStoreCore>()?;
    m.add_class::<completion::PyResolver>()?;
    m.add_class::<transport::PyTransportCore>()?;
    m.add_class::<transport::PyBridgeCore>()?;
    m.add_class::<store::PyFlusher>()?;
    m.add_function(wrap_pyfunction!(envelope::current_envelope, m)?)?;
    m.add_function(wrap_pyfunction!(envelope::new_event_id, m)?)?;
    m.add_function(wrap_pyfunction!(completion::await_probe, m)?)?;
    m.add_function(wrap_pyfunction!(json::encode_json, m)?)?;
    m.add_function(wrap_pyfunction!(json::decode_json, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    runtime::register(m)?;
    Ok(())
}
