//! The end of a loop turn for the pacing of commits made at once on the asyncio thread (the
//! rules are in `crate::store::pacing`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use pyo3::prelude::*;

use crate::store::pacing::Pacing;

/// Scheduled with `loop.call_soon` by the first commit at once of a loop turn: the turn ends.
#[pyclass(frozen, name = "TurnEnd", module = "oxbus._oxbus")]
pub struct PyTurnEnd(pub Arc<Pacing>);

#[pymethods]
impl PyTurnEnd {
    fn __call__(&self) {
        self.0.this_turn.store(0, Relaxed);
    }
}
