//! `StoreCore`: the SQLite log from Python. Every call queues a request for the writer thread
//! and returns a loop future; the writer answers a whole batch at once, and one
//! `call_soon_threadsafe` per batch and loop resolves all its futures on the loop thread. The
//! writer thread holds the GIL only for that hand-off, never while SQLite works, and uses
//! `runtime::attach` so it never touches an exiting interpreter.
//!
//! This module holds the Python class; `flush` the hand-offs to and from the writer thread,
//! `record` an event as a log record, `convert` the answers as Python objects.

mod convert;
mod flush;
mod record;

use std::sync::Arc;

use pyo3::exceptions::PyRuntimeError;
use pyo3::intern;
use pyo3::prelude::*;

use crate::python::completion::{Completions, PyResolver};
use crate::python::errors;
use crate::python::errors::to_py;
use crate::python::json::records::Metadata;
use crate::python::runtime;
use crate::store::log::{DeadRow, Synchronous};
use crate::store::now::Logged;
use crate::store::pacing::Pacing;
use crate::store::saga::{DeadlineRow, SagaRow, SagaWrite};
use crate::store::writer::{Op, Writer};
use crate::store::StoreError;

use convert::value_of;
use flush::{Outbox, PySink};
pub use flush::{PyFlusher, PyTurnEnd};
pub use record::record_of;
use record::{log_stream, meta_value};

/// The native half of `oxbus.SqliteEventStore`.
#[pyclass(frozen, name = "StoreCore", module = "oxbus._oxbus")]
pub struct PyStoreCore {
    writer: Arc<Writer>,
    completions: Arc<Completions>,
    outbox: Arc<Outbox>,
    flusher: Py<PyFlusher>,
    /// When a publish may commit on the asyncio thread (see `crate::store::pacing`).
    pacing: Arc<Pacing>,
    turn_end: Py<PyTurnEnd>,
    path: String,
}

impl PyStoreCore {
    /// The writer, for a durable bus's workers to record finished deliveries on.
    pub fn writer(&self) -> Arc<Writer> {
        Arc::clone(&self.writer)
    }

    /// Queues a request for the end of this loop turn; returns its future.
    fn submit(&self, py: Python<'_>, op: Op) -> PyResult<Py<PyAny>> {
        if self.writer.is_closed() {
            return Err(to_py(&StoreError::Closed(self.path.clone())));
        }
        let (token, fut, loop_) = self.completions.register(py)?;
        let first = {
            let mut ops = self.outbox.ops.lock();
            ops.push((token, op));
            ops.len() == 1
        };
        if first {
            loop_.call_method1(intern!(py, "call_soon"), (self.flusher.bind(py),))?;
        }
        Ok(fut)
    }
}

#[pymethods]
impl PyStoreCore {
    #[new]
    #[pyo3(signature = (path, synchronous="normal", read_only=false))]
    fn new(py: Python<'_>, path: String, synchronous: &str, read_only: bool) -> PyResult<Self> {
        let sync = Synchronous::parse(synchronous)
            .map_err(|e| errors::configuration_error(e.to_string()))?;
        let completions = Arc::new(Completions::default());
        let resolver = Py::new(py, PyResolver::new(Arc::clone(&completions)))?;
        let sink = Arc::new(PySink {
            completions: Arc::clone(&completions),
            resolver,
        });
        let writer = Arc::new(
            py.detach(|| {
                if read_only {
                    Writer::open_read_only(&path, sink)
                } else {
                    Writer::open(&path, sync, sink)
                }
            })
            .map_err(|e| to_py(&e))?,
        );
        let outbox = Arc::new(Outbox::default());
        let pacing = Arc::new(Pacing::default());
        let flusher = Py::new(
            py,
            PyFlusher {
                writer: Arc::clone(&writer),
                outbox: Arc::clone(&outbox),
                completions: Arc::clone(&completions),
                pacing: Arc::clone(&pacing),
            },
        )?;
        let turn_end = Py::new(py, PyTurnEnd(Arc::clone(&pacing)))?;
        Ok(Self {
            writer,
            completions,
            outbox,
            flusher,
            pacing,
            turn_end,
            path,
        })
    }

    /// The file path as given.
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Whether `close()` has run.
    #[getter]
    fn closed(&self) -> bool {
        self.writer.is_closed()
    }

    /// Finishes queued work and closes the connection (without holding the GIL).
    fn close(&self, py: Python<'_>) {
        self.flusher.get().flush(py);
        py.detach(|| self.writer.close());
    }

    /// `close()` as an awaitable: the writer finishes queued work and closes on the shared
    /// runtime's blocking pool, the loop thread never waits for SQLite. Idempotent.
    fn close_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.flusher.get().flush(py);
        let writer = Arc::clone(&self.writer);
        let handle = runtime::handle()?;
        runtime::future_into_py(py, async move {
            handle
                .spawn_blocking(move || writer.close())
                .await
                .map_err(|e| PyRuntimeError::new_err(format!("closing the store failed: {e}")))
        })
    }

    /// Appends to a stream -> future of (new version, first position).
    #[pyo3(signature = (stream_id, events, expected_version=None))]
    fn append(
        &self,
        py: Python<'_>,
        stream_id: String,
        events: &Bound<'_, PyAny>,
        expected_version: Option<i64>,
    ) -> PyResult<Py<PyAny>> {
        if let Some(v) = expected_version {
            if v < 0 {
                return Err(errors::configuration_error(format!(
                    "expected_version must be >= 0, got {v}"
                )));
            }
        }
        self.submit(
            py,
            Op::Append {
                stream: stream_id,
                events: events
                    .try_iter()?
                    .map(|e| record_of(&e?, None))
                    .collect::<PyResult<_>>()?,
                expected: expected_version,
            },
        )
    }

    /// Logs one event published on a durable bus: its position (an int) when it was committed
    /// at once on this thread, else a future of `[position]`, after which the publisher calls
    /// `settled()` once it has dispatched the event (see `crate::store::pacing`).
    #[pyo3(signature = (event, key=None, correlation_id=None))]
    fn log(
        &self,
        py: Python<'_>,
        event: &Bound<'_, PyAny>,
        key: Option<&Bound<'_, PyAny>>,
        correlation_id: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let items = vec![(log_stream(event, key)?, record_of(event, correlation_id)?)];
        if self.pacing.may_commit_now() {
            // Before anything is written: once committed, the event is the caller's to
            // dispatch, so nothing after the commit may fail the call.
            let loop_ = Completions::running_loop(py)?;
            let writer = &self.writer;
            match py.detach(|| writer.log_now(&items)) {
                Some(Ok(Logged::Positions(p))) => {
                    if self.pacing.committed_now() {
                        let end = self.turn_end.bind(py);
                        if let Err(e) = loop_.call_method1(intern!(py, "call_soon"), (end,)) {
                            // No end of turn to count on: this turn's count starts over now.
                            self.pacing
                                .this_turn
                                .store(0, std::sync::atomic::Ordering::Relaxed);
                            e.write_unraisable(py, None);
                        }
                    }
                    return Ok(p[0].into_pyobject(py)?.into_any().unbind());
                }
                Some(Ok(Logged::Unconfirmed(p))) => {
                    let fut = self.submit(py, Op::Confirm(p))?;
                    self.pacing.wait();
                    return Ok(fut);
                }
                Some(Err(e)) => return Err(to_py(&e)),
                None => {}
            }
        }
        let fut = self.submit(py, Op::Log { items })?;
        self.pacing.wait();
        Ok(fut)
    }

    /// A publisher that got a future from `log` or `log_many` has dispatched its events (or
    /// given up): later publishes may commit at once again.
    fn settled(&self) {
        self.pacing.settled();
    }

    /// Logs several events in one atomic group -> future of their positions. A large group
    /// goes to the writer in parts while it is encoded, so SQLite inserts the first events
    /// while the last are still being encoded; an encoding error abandons the whole group.
    fn log_many(&self, py: Python<'_>, events: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        const PART: usize = 128;
        if self.writer.is_closed() {
            return Err(to_py(&StoreError::Closed(self.path.clone())));
        }
        let mut group = self.writer.log_group();
        let mut chunk = Vec::with_capacity(PART);
        for e in events.try_iter()? {
            let e = e?;
            chunk.push((log_stream(&e, None)?, record_of(&e, None)?));
            if chunk.len() == PART {
                let part = std::mem::replace(&mut chunk, Vec::with_capacity(PART));
                group.part(part).map_err(|e| to_py(&e))?;
            }
        }
        if !group.started() {
            // Small: one request with the others of this loop turn.
            let fut = self.submit(py, Op::Log { items: chunk })?;
            self.pacing.wait();
            return Ok(fut);
        }
        let (token, fut, _) = self.completions.register(py)?;
        if let Err(e) = group.end(token, chunk) {
            self.completions.forget(token);
            return Err(to_py(&e));
        }
        self.pacing.wait();
        Ok(fut)
    }

    /// Records a finished delivery (no future: it is committed with the next transaction).
    fn mark_done(&self, subscription: &str, position: i64) -> PyResult<()> {
        self.writer
            .mark_done(subscription.into(), position)
            .map_err(|e| to_py(&e))
    }

    /// Rows of a stream after a version -> future of a list of row tuples.
    fn read(&self, py: Python<'_>, stream_id: String, after_version: i64) -> PyResult<Py<PyAny>> {
        self.submit(
            py,
            Op::Read {
                stream: stream_id,
                after_version,
            },
        )
    }

    /// Rows after a position -> future of a list of row tuples.
    fn read_all(&self, py: Python<'_>, after_position: i64, limit: i64) -> PyResult<Py<PyAny>> {
        if limit < 1 {
            return Err(errors::configuration_error(format!(
                "limit must be >= 1, got {limit}"
            )));
        }
        self.submit(
            py,
            Op::ReadAll {
                after_position,
                limit,
            },
        )
    }

    /// The row at a position -> future of a row tuple or None.
    fn at(&self, py: Python<'_>, position: i64) -> PyResult<Py<PyAny>> {
        self.submit(py, Op::At(position))
    }

    fn save_snapshot(
        &self,
        py: Python<'_>,
        stream_id: String,
        version: i64,
        state: String,
    ) -> PyResult<Py<PyAny>> {
        self.submit(
            py,
            Op::SaveSnapshot {
                stream: stream_id,
                version,
                state,
            },
        )
    }

    fn load_snapshot(&self, py: Python<'_>, stream_id: String) -> PyResult<Py<PyAny>> {
        self.submit(py, Op::LoadSnapshot { stream: stream_id })
    }

    fn register_subscription(
        &self,
        py: Python<'_>,
        name: String,
        from_beginning: bool,
    ) -> PyResult<Py<PyAny>> {
        self.submit(
            py,
            Op::Register {
                name,
                from_beginning,
            },
        )
    }

    fn undelivered(
        &self,
        py: Python<'_>,
        subscription: String,
        start_after: i64,
    ) -> PyResult<Py<PyAny>> {
        self.submit(
            py,
            Op::Undelivered {
                subscription,
                start_after,
            },
        )
    }

    #[pyo3(signature = (position, subscription, attempts, first_failed_at, last_failed_at, error_type, error_message, traceback, key_hash=None, parked_behind=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_dead_letter(
        &self,
        py: Python<'_>,
        position: i64,
        subscription: String,
        attempts: i64,
        first_failed_at: String,
        last_failed_at: String,
        error_type: String,
        error_message: String,
        traceback: String,
        key_hash: Option<i64>,
        parked_behind: Option<i64>,
    ) -> PyResult<Py<PyAny>> {
        let d = DeadRow {
            id: 0,
            position,
            subscription,
            attempts,
            first_failed_at,
            last_failed_at,
            error_type,
            error_message,
            traceback,
            key_hash,
            parked_behind,
        };
        self.submit(py, Op::AddDeadLetter(d))
    }

    /// One read-only SQL statement -> future of a list of row tuples (the admin tools' counts
    /// and listings, read through this store's SQLite, never a second copy of SQLite).
    #[pyo3(signature = (sql, params=None))]
    fn query(
        &self,
        py: Python<'_>,
        sql: String,
        params: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let params = match params {
            None => Vec::new(),
            Some(ps) => ps
                .try_iter()?
                .map(|p| value_of(&p?))
                .collect::<PyResult<_>>()?,
        };
        self.submit(py, Op::Query { sql, params })
    }

    /// Re-queues dead letters (all with None) for the next start -> future of a list of
    /// (id, subscription, position).
    #[pyo3(signature = (ids=None))]
    fn requeue_dead_letters(&self, py: Python<'_>, ids: Option<Vec<i64>>) -> PyResult<Py<PyAny>> {
        self.submit(py, Op::Requeue(ids))
    }

    /// Changes a saga instance -> future of the positions of `events` (logged in the same
    /// transaction, with the progress mark `done`), or of None when `applied` was applied
    /// already (nothing written). `instance`: (status, step, state JSON, compensations JSON,
    /// error, correlation id, steps, compensated), None to keep it; `deadlines`: every
    /// (name, due, event JSON) of the instance, None to keep them; `events`: (event, key,
    /// correlation id, cause) to log, cause being None or (subscription, causation id): the
    /// step a deadline or a give-up publishes for.
    #[pyo3(signature = (saga, key, instance, applied, deadlines, events, done))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn saga_write(
        &self,
        py: Python<'_>,
        saga: String,
        key: String,
        instance: Option<(
            String,
            Option<String>,
            String,
            String,
            Option<String>,
            Option<String>,
            i64,
            bool,
        )>,
        applied: Option<String>,
        deadlines: Option<Vec<(String, f64, String)>>,
        events: &Bound<'_, PyAny>,
        done: Option<(String, i64)>,
    ) -> PyResult<Py<PyAny>> {
        let instance = instance.map(
            |(status, step, state, compensations, error, correlation_id, steps, compensated)| {
                SagaRow {
                    status,
                    step,
                    state,
                    compensations,
                    error,
                    correlation_id,
                    steps,
                    compensated,
                }
            },
        );
        let deadlines = deadlines.map(|ds| {
            ds.into_iter()
                .map(|(name, due, event)| DeadlineRow { name, due, event })
                .collect()
        });
        let events = events
            .try_iter()?
            .map(|item| {
                let (e, k, c, cause): (
                    Bound<'_, PyAny>,
                    Option<Bound<'_, PyAny>>,
                    Option<Bound<'_, PyAny>>,
                    Option<(String, String)>,
                ) = item?.extract()?;
                let mut record = record_of(&e, c.as_ref())?;
                if let Some((subscription, causation_id)) = cause {
                    // Published for a step outside its call (a deadline, a give-up): the
                    // metadata names the step and its event, as a call's publish would.
                    record.metadata = serde_json::to_string(&Metadata {
                        correlation_id: meta_value(c.as_ref())?,
                        causation_id: Some(serde_json::Value::String(causation_id)),
                        subscription: Some(subscription),
                    })
                    .map_err(|e| {
                        errors::serialization_error(format!("cannot encode metadata: {e}"))
                    })?;
                }
                Ok((log_stream(&e, k.as_ref())?, record))
            })
            .collect::<PyResult<_>>()?;
        let write = SagaWrite {
            saga,
            key,
            instance,
            applied,
            deadlines,
            events,
            done,
        };
        write.check().map_err(|e| to_py(&e))?;
        self.submit(py, Op::Saga(Box::new(write)))
    }

    fn dead_letters(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.submit(py, Op::DeadLetters)
    }

    #[pyo3(signature = (ids=None))]
    fn remove_dead_letters(&self, py: Python<'_>, ids: Option<Vec<i64>>) -> PyResult<Py<PyAny>> {
        self.submit(py, Op::RemoveDeadLetters(ids))
    }
}
