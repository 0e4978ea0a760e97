//! The hand-offs between the loop thread and the writer thread: requests made during one
//! loop turn go to the writer together at its end (`PyFlusher`), or are committed at once on
//! the loop thread when the pacing allows (`crate::store::pacing`; `PyTurnEnd` ends its turn);
//! the writer's answers come back a batch at a time (`PySink`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::python::completion::{Completions, PyResolver};
use crate::python::errors::to_py;
use crate::python::futures::Outcome;
use crate::store::now::{LogBatch, Logged};
use crate::store::pacing::Pacing;
use crate::store::writer::{Op, Reply, Sink, Writer};

use super::convert::reply_to_py;

/// A batch of the writer's answers, by token.
type Done = Vec<(u64, crate::store::Result<Reply>)>;

/// Hands the writer's answers to the loop thread: one `call_soon_threadsafe` per batch and
/// loop resolves all their futures.
pub(super) struct PySink {
    pub(super) completions: Arc<Completions>,
    pub(super) resolver: Py<PyResolver>,
}

impl Sink for PySink {
    fn deliver(&self, results: Done) {
        let outcomes = results
            .into_iter()
            .map(|(t, r)| {
                let f: Outcome =
                    Box::new(move |py| r.map_err(|e| to_py(&e)).and_then(|r| reply_to_py(py, r)));
                (t, f)
            })
            .collect();
        self.completions.complete(&self.resolver, outcomes);
    }
}

/// Requests made during one turn of the loop, sent to the writer together at its end.
#[derive(Default)]
pub(super) struct Outbox {
    /// The requests, with the tokens of their futures.
    pub(super) ops: Mutex<Vec<(u64, Op)>>,
}

/// Sends the outbox to the writer; scheduled with `loop.call_soon` by the first request of a
/// loop turn, so requests from many tasks reach the writer in one message and share one commit.
#[pyclass(frozen, name = "StoreFlusher", module = "oxbus._oxbus")]
pub struct PyFlusher {
    pub(super) writer: Arc<Writer>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) completions: Arc<Completions>,
    pub(super) pacing: Arc<Pacing>,
}

impl PyFlusher {
    /// Sends the requests of this loop turn: committed here when they may be, else to the
    /// writer thread.
    pub(super) fn flush(&self, py: Python<'_>) {
        let ops = std::mem::take(&mut *self.outbox.ops.lock());
        let logs = ops
            .iter()
            .filter(|(_, op)| matches!(op, Op::Log { .. }))
            .count();
        if logs > 0 {
            self.pacing.last_batch.store(logs, Relaxed);
        }
        let Err(ops) = self.commit_now(py, ops) else {
            return;
        };
        let tokens: Vec<u64> = ops.iter().map(|(t, _)| *t).filter(|t| *t != 0).collect();
        if let Err(e) = self.writer.submit_many(ops) {
            // Closed under our feet: fail the waiting futures instead of losing them.
            let err = to_py(&e);
            for t in tokens {
                self.completions.fail_now(py, t, &err);
            }
        }
    }

    /// Commits a batch of bus-log requests on this thread, as one transaction, and resolves
    /// their futures (see `crate::store::pacing`); hands the batch back when it cannot: other
    /// requests in it, earlier bus-log requests still unsettled, futures of another loop, the
    /// writer busy, or an error (the writer thread then runs it, isolating the failing
    /// request).
    fn commit_now(&self, py: Python<'_>, ops: Vec<(u64, Op)>) -> Result<(), Vec<(u64, Op)>> {
        let batch = LogBatch::merge(ops)?;
        let tokens = batch.tokens();
        let mine = self.pacing.waiting.load(Relaxed) == batch.requests()
            && Completions::running_loop(py)
                .is_ok_and(|loop_| self.completions.all_on(&tokens, &loop_));
        if !mine {
            return Err(batch.unmerge(None));
        }
        let writer = &self.writer;
        let positions = match py.detach(|| writer.log_now(&batch.items)) {
            Some(Ok(Logged::Positions(p))) => p,
            // The writer thread checks (and saves) the WAL before they are acknowledged.
            Some(Ok(Logged::Unconfirmed(p))) => return Err(batch.unmerge(Some(p))),
            Some(Err(_)) | None => return Err(batch.unmerge(None)),
        };
        for (t, part) in batch.split(positions) {
            match PyList::new(py, part) {
                Ok(list) => self.completions.resolve_now(py, t, list.as_any()),
                Err(e) => self.completions.fail_now(py, t, &e),
            }
        }
        Ok(())
    }
}

#[pymethods]
impl PyFlusher {
    fn __call__(&self, py: Python<'_>) {
        self.flush(py);
    }
}

/// Scheduled with `loop.call_soon` by the first commit at once of a loop turn: the turn ends.
#[pyclass(frozen, name = "TurnEnd", module = "oxbus._oxbus")]
pub struct PyTurnEnd(pub Arc<Pacing>);

#[pymethods]
impl PyTurnEnd {
    fn __call__(&self) {
        self.0.this_turn.store(0, Relaxed);
    }
}
