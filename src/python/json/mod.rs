//! JSON for events, JSON only (never pickle): the encoder writes Python objects straight to
//! JSON text (orjson's manner, [`encode`]); the decoder is serde_json building Python objects
//! as it parses ([`decode`]); the records around an event (its metadata, the Redis stream
//! payload) are serde structs ([`records`]).

mod decode;
mod encode;
mod keys;
pub mod records;
mod write;

use pyo3::prelude::*;

pub use decode::decode;
pub use encode::{encode, isoformat};

/// Encodes a Python object as compact JSON text (see `oxbus.errors.SerializationError` for
/// what cannot be encoded).
#[pyfunction]
pub fn encode_json(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    encode(obj)
}

/// Decodes JSON text into `dict`, `list`, `str`, `int`, `float`, `bool` and `None`.
#[pyfunction]
pub fn decode_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    decode(py, text)
}
